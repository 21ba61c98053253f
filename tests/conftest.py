"""Shared fixtures: seeding, offline mode and the path of the real CIFAR-10 parquet."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

# Tests must never reach the Hub: a stray real call fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Pixel stores of disk-backed test datasets go to a per-session temporary directory (inherited
# by training subprocesses), never into the user's ~/.cache.
if "HF_LONGTAIL_PIXEL_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _PIXEL_CACHE = tempfile.mkdtemp(prefix="hf_longtail_pixel_cache_")
    os.environ["HF_LONGTAIL_PIXEL_CACHE"] = _PIXEL_CACHE
    atexit.register(shutil.rmtree, _PIXEL_CACHE, ignore_errors=True)
# Multi-process tests put several OpenMP pools on 2 cores; spinning waits would make them crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]


def cifar10_path() -> Path | None:
    """The real CIFAR-10 parquet directory: $HF_LONGTAIL_CIFAR10 or ../shared/data/cifar10."""
    env = os.environ.get("HF_LONGTAIL_CIFAR10")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "cifar10")
    for c in candidates:
        if (c / "train.parquet").is_file():
            return c
    return None


@pytest.fixture
def cifar10_dir() -> Path:
    path = cifar10_path()
    if path is None:
        pytest.skip(
            "real CIFAR-10 not found (set HF_LONGTAIL_CIFAR10 or provide ../shared/data/cifar10)"
        )
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 -- third-party code reads the legacy global RNG
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny ops: more OpenMP threads on a loaded machine only
    add contention); the previous setting is restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
