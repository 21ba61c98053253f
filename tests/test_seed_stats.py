"""hf_longtail.metrics.seed_stats against scipy.stats (an independent reference) and a real run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from hf_longtail.metrics.seed_stats import (
    mean_std,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
)

stats = pytest.importorskip("scipy.stats")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 29, 30])
def test_t_cdf_and_quantile_match_scipy(df):
    for x in (-7.5, -2.0, -0.3, 0.0, 0.4, 1.96, 4.3, 25.0):
        assert student_t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), abs=1e-12)
    for p in (0.01, 0.1, 0.5, 0.8, 0.95, 0.975, 0.995):
        assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-9)


def test_t_rejects_bad_arguments():
    with pytest.raises(ValueError, match="df must be a positive integer"):
        student_t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="df must be a positive integer"):
        student_t_cdf(1.0, 2.5)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        student_t_quantile(1.0, 3)


def test_mean_std_is_the_sample_std():
    values = [0.31, 0.35, 0.29, 0.4]
    mean, std = mean_std([*values, None])
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([]) == (None, None)


def _interval(method, base, confidence=0.95):
    d = np.asarray(method) - np.asarray(base)
    res = stats.ttest_rel(method, base)
    ci = res.confidence_interval(confidence)
    return d.mean(), ci.low, ci.high


def test_paired_difference_matches_scipy_on_a_real_results_file():
    """CE vs LA, worst-class and overall accuracy, seeds 0-2 of the committed ResNet-32 runs."""
    payload = json.loads((REPO / "benchmarks/results/cifar10lt_if100_cpu.json").read_text())
    by = {}
    for run in payload["runs"]:
        by.setdefault(run["method"], {})[run["seed"]] = run["metrics"]
    for key in ("accuracy", "worst_class_accuracy", "ece"):
        la = {s: m[key] for s, m in by["la"].items()}
        ce = {s: m[key] for s, m in by["ce"].items()}
        seeds = sorted(set(la) & set(ce))
        assert len(seeds) == 3
        d = paired_difference(la, ce)
        mean, low, high = _interval([la[s] for s in seeds], [ce[s] for s in seeds])
        assert d.n == 3 and d.seeds == seeds
        assert d.mean == pytest.approx(mean)
        assert d.low == pytest.approx(low) and d.high == pytest.approx(high)


def test_paired_difference_hand_computed_and_edge_cases():
    # d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, t_{0.975,2} = 4.302652729749464.
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.8, 7: 0.9}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.1})
    half = 4.302652729749464 * 0.1 / math.sqrt(3)
    assert d.seeds == [0, 1, 2]  # only the shared seeds are paired
    assert d.mean == pytest.approx(0.2) and d.std == pytest.approx(0.1)
    assert (d.low, d.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert not d.excludes_zero  # 3 seeds with this spread: the interval covers 0
    tight = paired_difference({0: 0.6, 1: 0.61, 2: 0.62}, {0: 0.5, 1: 0.5, 2: 0.51})
    assert tight.low > 0 and tight.excludes_zero
    one = paired_difference({0: 0.6}, {0: 0.5})
    assert one.n == 1 and one.low is None and not one.excludes_zero
    assert paired_difference({0: 0.6}, {1: 0.5}) is None
