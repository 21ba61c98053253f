"""scripts/benchmark.py: every method's command line parses, and the report is computed from JSON."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("benchmark")


@pytest.fixture(scope="module")
def train():
    return _load("train")


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_every_method_builds_a_valid_train_command(bench, train, preset, tmp_path):
    for method, (_, flags) in bench.METHODS.items():
        argv = bench.run_flags(
            bench.PRESETS[preset], method, 1, tmp_path / "data", tmp_path / method, 10
        )
        model_args, data_args, config, run_args, training_args = train.parse_args(
            [*argv, "--use_cpu", "true"]
        )
        assert config.base == flags["loss"]
        assert config.ccar == flags.get("ccar", False)
        assert config.car_weight == flags.get("car_weight", 0.0)
        assert training_args.seed == 1 and training_args.num_train_epochs == 10
        assert data_args.imbalance_factor == bench.PRESETS[preset]["imbalance_factor"]
        assert data_args.posthoc_tau == flags.get("posthoc_tau")
        assert run_args.overwrite_output_dir is True
        if method == "ldam_drw":  # DRW at the same fraction of the schedule as 160/200
            assert config.drw_epoch == 8
        # LDAM-DRW as published uses a cosine classifier; every other method the linear head.
        assert model_args.classifier == ("cosine" if method == "ldam_drw" else "linear")


def test_report_is_computed_from_the_runs(bench, tmp_path, monkeypatch):
    runs = []
    accuracies = {"ce": [0.30, 0.34, 0.38], "la": [0.50, 0.46, 0.48]}
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "epochs": 2,
                    "train_runtime_s": 10.0 if method == "ce" else 12.0,
                    "peak_rss_mb": 100.0 + seed,
                    "metrics": {"accuracy": acc, "worst_class_accuracy": acc / 2, "ece": 0.1},
                }
            )
    payload = {
        "name": "unit",
        "preset": "cpu",
        "dataset": "cifar10",
        "imbalance_factor": 100,
        "epochs": 2,
        "environment": {"processor": "x86_64", "cpu_count": 2, "torch": "x", "torch_threads": 2},
        "runs": runs,
    }
    rows = {row["method"]: row for row in bench.summarize(payload)}
    mean, std = rows["la"]["accuracy"]
    assert mean == pytest.approx(statistics.mean(accuracies["la"]))
    assert std == pytest.approx(statistics.stdev(accuracies["la"]))
    assert rows["la"]["time_ratio"] == pytest.approx(1.2)
    assert rows["ce"]["peak_rss_mb"] == 102.0

    path = tmp_path / "unit.json"
    path.write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_START}\nold\n{bench.README_END}\noutro\n")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    table = bench.write_report(path, update_readme=True)
    assert "| Logit-adjusted loss | 3 | 48.0 ± 2.0 |" in table
    assert "| CE | 3 | 34.0 ± 4.0 |" in table and "| 70.4 |" in table  # published, labelled
    text = readme.read_text()
    assert "old" not in text and "48.0 ± 2.0" in text and text.endswith("outro\n")
    assert path.with_suffix(".png").stat().st_size > 0
