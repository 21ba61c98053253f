"""The one rule for classes with no training image, shared by the losses and the metrics.

Wherever a training count enters a logarithm, a power or a reciprocal (the class prior of logit
adjustment and balanced softmax, LDAM margins, effective-number weights, post-hoc adjustment in
the metrics) a zero count is replaced by the **smallest positive count**: a class never seen in
training is treated like the rarest observed class, so nothing becomes ``inf``/``NaN`` and the
prior does not depend on the units of the counts (``max(n, 1)`` would give an unseen class of a
dataset whose rarest class has 500 images a prior 500 times below that class).

This module imports nothing, so :mod:`hf_longtail.losses` (pure PyTorch) and
:mod:`hf_longtail.metrics` (NumPy, no torch import) both use it without crossing their layering.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["fill_zero_counts"]

_A = TypeVar("_A")


def fill_zero_counts(counts: _A) -> _A:
    """``counts`` (a 1-D NumPy array or torch tensor, all ``>= 0``) with every zero replaced by
    the smallest positive count; the result is floating point (same library and device).

    Raises ``ValueError`` when no count is positive (then there is no prior to fall back on).
    """
    positive = counts[counts > 0]
    if len(positive) == 0:
        raise ValueError(
            "every class count is 0: the class prior is undefined; pass the training-set "
            "images per class"
        )
    # Arithmetic instead of np.where / torch.where: the same expression serves both libraries.
    return counts * 1.0 + (counts == 0) * positive.min()
