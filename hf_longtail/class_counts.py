"""Training images per class: the one set of rules every package applies to them.

- **Zero counts** (:func:`fill_zero_counts`): wherever a count enters a logarithm, a power or a
  reciprocal (the class prior of logit adjustment and balanced softmax, LDAM margins,
  effective-number weights, post-hoc adjustment in the metrics) a zero is replaced by the
  **smallest positive count**: a class never seen in training is treated like the rarest
  observed class, so nothing becomes ``inf``/``NaN`` and the prior does not depend on the units
  of the counts (``max(n, 1)`` would give an unseen class of a dataset whose rarest class has
  500 images a prior 500 times below that class).
- **Shot groups** (:func:`shot_group`, :func:`check_thresholds`): many-shot ``n_c > many``,
  few-shot ``n_c < few``, medium-shot otherwise, with ``many = 100`` and ``few = 20`` by default
  (:data:`DEFAULT_THRESHOLDS`, the usual ImageNet-LT split). The metrics, the plots, the model
  card and the losses' head/tail statistics (head = many-shot, tail = every other class) all
  use this rule, with the thresholds of the run (``metric_thresholds`` of its record).

This module imports nothing beyond the standard library, so :mod:`hf_longtail.losses` (pure
PyTorch), :mod:`hf_longtail.metrics` (NumPy) and :mod:`hf_longtail.hub` (neither) share it
without crossing their layering. The functions work on NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

import numbers
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_THRESHOLDS",
    "check_thresholds",
    "fill_zero_counts",
    "many_shot_mask",
    "shot_group",
]

#: The default shot groups: many-shot > 100 training images, few-shot < 20.
DEFAULT_THRESHOLDS = {"many": 100, "few": 20}

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


def check_thresholds(many: Any, few: Any) -> None:
    """Raise ``ValueError`` unless ``many`` and ``few`` are finite numbers with ``few <= many``
    (few-shot classes have fewer training images than many-shot ones)."""
    for name, value in (("many_threshold", many), ("few_threshold", few)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
            raise ValueError(f"`{name}` must be a number; got {value!r}.")
    if few > many:
        raise ValueError(
            f"`few_threshold` ({few}) must not exceed `many_threshold` ({many}): few-shot classes "
            "have fewer training images than many-shot ones."
        )


def shot_group(
    count: float, many: float = DEFAULT_THRESHOLDS["many"], few: float = DEFAULT_THRESHOLDS["few"]
) -> str:
    """``"many"`` if ``count > many``, ``"few"`` if ``count < few``, else ``"medium"``."""
    if count > many:
        return "many"
    if count < few:
        return "few"
    return "medium"


def many_shot_mask(counts: _A, many: float = DEFAULT_THRESHOLDS["many"]) -> _A:
    """Boolean mask of the many-shot classes, ``counts > many`` (NumPy array or torch tensor):
    the same rule as :func:`shot_group`, vectorised."""
    return counts > many
