"""scripts/bench_throughput.py end to end on real CIFAR-10-LT, shrunk to a few steps: both runs make
the same number of steps, the Trainer takes the fast path, and the JSON records the machine, the
versions and every rate."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_throughput_compares_like_with_like(cifar10_dir, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_throughput", REPO / "scripts" / "bench_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    previous = torch.get_num_threads()
    try:
        results = bench.main(
            [
                "--cifar10", str(cifar10_dir), "--workload", "resnet32", "--max_steps", "3",
                "--batch_size", "32", "--threads", "1", "--workers", "1", "--rounds", "2",
                "--output_dir", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__
    assert saved["dataset"]["train_size"] == 12406  # CIFAR-10-LT, imbalance factor 100
    work = results["workloads"]["resnet32"]
    plain, trainer = work["runs"]["plain"], work["runs"]["trainer"]
    assert plain["steps"] == trainer["steps"] == work["steps"] == 3
    assert trainer["fast_path"] and trainer["dataloader_workers"] == 0
    assert math.isfinite(plain["last_loss"]) and math.isfinite(trainer["train_loss"])
    for rate in (
        plain["pipeline_images_per_s"],
        trainer["pipeline_images_per_s"],
        work["model_step_images_per_s"],
        work["streaming_pipeline_images_per_s"],
    ):
        assert math.isfinite(rate) and rate > 0
    ratios = [r["trainer"]["total_s"] / r["plain"]["total_s"] for r in work["rounds"]]
    assert len(ratios) == 2 and work["ratio"] == pytest.approx(sum(ratios) / 2)
    assert (tmp_path / "out" / "pixel_cache").is_dir()  # the store of round 1, reused in round 2
