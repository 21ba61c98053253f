"""The loss benchmark script runs end to end (a smoke test; its timings are not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_losses.py"


def test_bench_losses_runs_and_prints_the_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_losses", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(
        [
            "--ks",
            "6",
            "--solver-ks",
            "12",
            "--agree-steps",
            "4",
            "--batch",
            "8",
            "--min-time",
            "0",
            "--max-reps",
            "3",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "threads 1" in out and "SVD/fast" in out and "CAR solvers" in out
    cells = results[6]
    assert set(cells) == {"ce", "ccar", "full", "car", "svd", "grad_err"}
    assert all(v > 0 for k, v in cells.items() if k != "grad_err")
    # The fast regularizer's gradient is the full SVD's, step after step.
    assert cells["grad_err"] < 1e-4
    # The dense reference and the fast regularizer compute the same first-step value.
    counts = bench.long_tailed_counts(6)
    assert counts[0] == 500 and counts[-1] == 5
    import torch

    from hf_longtail.losses import ConfusionSpectralRegularizer

    z, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 6
    fast = ConfusionSpectralRegularizer(counts, solver="subspace")
    assert fast(z, y).item() == pytest.approx(
        bench.DenseSVDCAR(counts)(z.float(), y).item(), rel=1e-4
    )
