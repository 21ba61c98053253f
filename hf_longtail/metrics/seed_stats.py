"""Statistics over seeds for benchmarks: mean ± sample std, paired differences with t intervals.

A benchmark runs each method with several seeds, and a method and its base (e.g. CE + CCAR + CAR
against CE) share each seed's data order and initialisation. The honest comparison is then the
*paired* difference ``d_s = metric(method, s) - metric(base, s)`` over the seeds both have, with
the 95% Student-t interval ``mean(d) ± t_{0.975, n-1} * sd(d) / sqrt(n)``. Plain numpy/math: no
scipy needed at run time (the tests check the quantiles against ``scipy.stats.t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "PairedDifference",
    "mean_std",
    "paired_difference",
    "student_t_cdf",
    "student_t_quantile",
]


def student_t_cdf(x: float, df: int) -> float:
    """``P(T <= x)`` for Student's t with a positive integer ``df`` (closed form).

    With ``theta = atan(x / sqrt(df))`` (Abramowitz & Stegun 26.7.3-4), ``A(x) = P(|T| <= x)`` is
    ``2/pi (theta + sin cos (1 + 2/3 cos^2 + ... ))`` for odd ``df`` and
    ``sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)`` for even ``df``; ``cdf = (1 + A) / 2``.

    Raises:
        ValueError: ``df`` is not a positive integer.
    """
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer; got {df!r}")
    df = int(df)
    theta = math.atan(abs(x) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        series, term = 0.0, 0.0
        if df > 1:
            term = series = c
            for k in range(3, df, 2):  # cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)
                term *= (k - 1) / k * c * c
                series += term
        a = 2.0 / math.pi * (theta + s * series)
    else:
        term = series = 1.0
        for k in range(2, df, 2):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...
            term *= (k - 1) / k * c * c
            series += term
        a = s * series
    a = min(max(a, 0.0), 1.0)
    return 0.5 * (1.0 + a) if x >= 0 else 0.5 * (1.0 - a)


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df``: the ``x`` with
    ``student_t_cdf(x, df) = p``, by bisection to 1e-12 (``p`` in (0, 1))."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p!r}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, sample std with n - 1)`` of the non-``None`` values; std is ``None`` below two
    values and both are ``None`` with none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class PairedDifference:
    """Paired per-seed difference ``method - base`` and its two-sided t interval.

    ``low``/``high`` are ``None`` with fewer than two pairs (no spread to estimate). ``seeds``
    are the seeds both had, in order; ``differences`` the per-seed values.
    """

    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int
    seeds: list
    differences: list[float]
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0 (``False`` without one)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


def paired_difference(
    method: Mapping[object, float | None],
    base: Mapping[object, float | None],
    confidence: float = 0.95,
) -> PairedDifference | None:
    """Paired difference over the seeds present (and not ``None``) in both ``{seed: value}`` maps.

    ``d_s = method[s] - base[s]``; ``mean(d) ± t_{(1+c)/2, n-1} * sd(d) / sqrt(n)`` with the
    sample std ``sd``. Returns ``None`` when no seed is shared.
    """
    seeds = [s for s in method if s in base and method[s] is not None and base[s] is not None]
    seeds.sort(key=lambda s: (str(type(s)), s))
    if not seeds:
        return None
    diffs = [float(method[s]) - float(base[s]) for s in seeds]
    mean, std = mean_std(diffs)
    low = high = None
    if std is not None:
        half = student_t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * std
        half /= math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return PairedDifference(mean, std, low, high, len(diffs), seeds, diffs, confidence)
