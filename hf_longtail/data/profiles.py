"""Per-class image counts of the long-tailed protocols (``exp``, ``step``, ``pareto``).

Everything here is pure Python on integers and floats; it never looks at a dataset. Class ``i``
is the ``i``-th class in label order (label id ``i``), so class 0 is the head and class ``C - 1``
the tail, as in the CIFAR-LT protocol of Cao et al. (LDAM, 2019).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

__all__ = [
    "PROFILES",
    "long_tailed_counts",
    "validate_imbalance_factor",
]


def validate_imbalance_factor(imbalance_factor: object) -> float:
    """Return ``imbalance_factor`` as a float after checking that it is a finite number >= 1.

    The imbalance factor is IF = n_max / n_min (e.g. 100 for CIFAR-10-LT with 5000 / 50 images).
    IF = 1 means balanced. A value in (0, 1) is almost always the inverse convention of the LDAM
    code (``imb_factor=0.01``), so the error says which value to pass instead.
    """
    if isinstance(imbalance_factor, bool) or not isinstance(imbalance_factor, numbers.Real):
        raise TypeError(
            f"imbalance_factor must be a number >= 1 (IF = n_max / n_min, e.g. 100); "
            f"got {imbalance_factor!r} of type {type(imbalance_factor).__name__}"
        )
    value = float(imbalance_factor)
    if not math.isfinite(value):
        raise ValueError(f"imbalance_factor must be a finite number >= 1; got {value}")
    if value < 1.0:
        hint = (
            f" If you meant the ratio n_min / n_max = {value:g}, pass imbalance_factor="
            f"{1.0 / value:g} instead."
            if value > 0
            else ""
        )
        raise ValueError(
            f"imbalance_factor must be >= 1 (IF = n_max / n_min; 1 gives the balanced set); "
            f"got {value:g}.{hint}"
        )
    return value


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _exp_counts(n_max: int, num_classes: int, imbalance_factor: float, **_: float) -> list[int]:
    # Written exactly as the LDAM reference code (img_max * (1/IF) ** (i / (C - 1.0)), then int)
    # so that the floating-point rounding, and hence the published totals, match bit for bit.
    if num_classes == 1:
        return [n_max]
    inv = 1.0 / imbalance_factor
    return [int(n_max * inv ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def _step_counts(n_max: int, num_classes: int, imbalance_factor: float, **_: float) -> list[int]:
    # The first ceil(C / 2) classes are the head; with an odd C the extra class goes to the head.
    n_head = num_classes - num_classes // 2
    n_tail = int(n_max / imbalance_factor)
    return [n_max] * n_head + [n_tail] * (num_classes - n_head)


def _pareto_counts(
    n_max: int, num_classes: int, imbalance_factor: float, pareto_alpha: float = 6.0, **_: float
) -> list[int]:
    if num_classes == 1:
        return [n_max]
    if not (isinstance(pareto_alpha, numbers.Real) and pareto_alpha > 0):
        raise ValueError(f"pareto_alpha must be a positive number; got {pareto_alpha!r}")
    b = imbalance_factor ** (1.0 / pareto_alpha) - 1.0
    # The relative 1e-12 nudge keeps exact integers (e.g. the tail n_max / IF) from flooring to
    # one less through the pow/root round trip.
    return [
        int(n_max * (1.0 + b * i / (num_classes - 1.0)) ** (-pareto_alpha) * (1.0 + 1e-12))
        for i in range(num_classes)
    ]


#: Registry of profile name -> function(n_max, num_classes, imbalance_factor, **kw) -> counts.
PROFILES: dict[str, Callable[..., list[int]]] = {
    "exp": _exp_counts,
    "step": _step_counts,
    "pareto": _pareto_counts,
}


def long_tailed_counts(
    n_max: int,
    num_classes: int,
    imbalance_factor: float,
    profile: str = "exp",
    *,
    pareto_alpha: float = 6.0,
) -> list[int]:
    """Per-class image counts of a long-tailed split, class 0 first (the head).

    With C classes, IF = ``imbalance_factor`` and class index i = 0 .. C-1:

    - ``exp`` (Cao et al. 2019, the CIFAR-LT standard):
      ``n_i = int(n_max * (1 / IF) ** (i / (C - 1)))``. Reproduces CIFAR-10-LT (n_max=5000,
      C=10: 12,406 / 13,996 / 20,431 images for IF = 100 / 50 / 10) and CIFAR-100-LT
      (n_max=500, C=100: 10,847 / 12,608 / 19,573).
    - ``step`` (Buda et al. 2018): the first ``ceil(C / 2)`` classes keep ``n_max``, the other
      ``floor(C / 2)`` get ``int(n_max / IF)``.
    - ``pareto`` (ImageNet-LT-like): ``n_i = int(n_max * (1 + b * i / (C - 1)) ** (-alpha))`` with
      ``b = IF ** (1 / alpha) - 1``, i.e. the Pareto (Lomax) survival function of shape ``alpha``
      (``pareto_alpha``, default 6, the value Liu et al. 2019 quote for ImageNet-LT) evaluated at
      the normalised class rank and scaled so that ``n_0 = n_max`` and ``n_{C-1} = n_max / IF``.
      Compared to ``exp`` it drops faster among the head classes and flattens in the tail; as
      ``alpha -> inf`` it tends to ``exp``.

    IF = 1 gives ``[n_max] * C`` for every profile.

    Zero-image classes: a profile that would give some class 0 images (``n_max / IF < 1``) is an
    error, not silently clamped to 1, because clamping changes the imbalance factor the caller
    asked for; the message names the first such class and the largest usable IF.

    Raises:
        TypeError / ValueError: ``imbalance_factor`` not a finite number >= 1; ``n_max`` or
            ``num_classes`` not a positive integer; unknown ``profile``; a class would get 0 images.
    """
    imbalance_factor = validate_imbalance_factor(imbalance_factor)
    n_max = _check_positive_int("n_max", n_max)
    num_classes = _check_positive_int("num_classes", num_classes)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    counts = PROFILES[profile](n_max, num_classes, imbalance_factor, pareto_alpha=pareto_alpha)
    for i, n in enumerate(counts):
        if n < 1:
            limit = _largest_usable_imbalance_factor(n_max, num_classes, profile, pareto_alpha)
            raise ValueError(
                f"profile {profile!r} with n_max={n_max} and imbalance_factor={imbalance_factor:g} "
                f"gives class index {i} zero images (n_max / IF < 1). Use imbalance_factor <= "
                f"{limit} for this source (largest class has {n_max} images)."
            )
    return counts


def _largest_usable_imbalance_factor(
    n_max: int, num_classes: int, profile: str, pareto_alpha: float
) -> str:
    """The largest IF (as printed in the error, at most 2 decimals) for which every class of
    ``profile`` gets at least one image, verified by evaluating the profile: ``n_max`` itself
    can fail through rounding (``int(49 * (1 / 49)) == 0``)."""

    def usable(factor: float) -> bool:
        counts = PROFILES[profile](n_max, num_classes, factor, pareto_alpha=pareto_alpha)
        return min(counts) >= 1

    if usable(float(n_max)):
        return str(n_max)
    low, high = 1.0, float(n_max)  # usable(1) holds: IF = 1 gives n_max everywhere
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if usable(middle) else (low, middle)
    value = math.floor(low * 100) / 100
    while not usable(value):  # guards the decimal round trip; never more than a step or two
        value = round(value - 0.01, 2)
    return f"{value:.2f}"
