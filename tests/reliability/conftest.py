"""Reliability suite: one intra-op thread in this process and in the training subprocesses.

The tensors here are tiny; on a loaded 2-core machine a second OpenMP thread only spins
(a 40-step run went from 2 s to 47 s of training under load). Every run of a comparison uses
the same thread count, so results stay comparable.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every reliability test runs torch on one thread (tests/conftest.py ``one_thread``)."""


@pytest.fixture(scope="module")
def train():
    """``scripts/train.py`` loaded as a module (its ``main``, parsers and helpers), per test
    module."""
    from _reliability_helpers import load_train_module

    return load_train_module()
