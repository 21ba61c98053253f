"""Two processes through ``accelerate launch`` (gloo on CPU): one CAR state, reduced logs.

``accelerate launch --cpu`` starts a single process; ``--multi_gpu --num_processes 2`` starts two
through torchrun, and ``TrainingArguments(use_cpu=True)`` then makes accelerate pick the
``MULTI_CPU`` (gloo) backend, so that is the command tested here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_longtail.losses import LongTailLossConfig, build_loss

HELPERS = Path(__file__).with_name("_helpers_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_share_one_car_state_and_reduce_logged_parts(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed next to this Python")
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes", "2",
        "--num_machines", "1",
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(HELPERS),
        str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)

    # The ranks trained on different shards of one class-balanced order ...
    labels = [torch.cat([rec["labels"] for rec in r["records"]]) for r in ranks]
    assert len(ranks[0]["records"]) == len(ranks[1]["records"]) == 4
    assert not torch.equal(labels[0], labels[1])
    # ... yet end with bit-identical CAR state (EMA, singular vectors, step) and weights.
    states = [r["loss_state"] for r in ranks]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["regularizer.num_steps"]) == 4
    for key, value in ranks[0]["model_state"].items():
        assert torch.equal(value, ranks[1]["model_state"][key]), key

    # The CAR state equals a single process fed the union of both ranks' batches, step by step.
    counts = [12, 8, 6, 4, 4, 2]
    reference = build_loss(LongTailLossConfig(base="ce", ccar=True, car_weight=0.5), counts)
    reference.train()
    for step in range(4):
        logits = torch.cat([r["records"][step]["logits"] for r in ranks])
        target = torch.cat([r["records"][step]["labels"] for r in ranks])
        reference(logits, target)
        car_sigmas = [r["records"][step]["stats"]["car_sigma"] for r in ranks]
        assert car_sigmas[0] == car_sigmas[1]  # the global sigma, on both ranks
        assert car_sigmas[0] == pytest.approx(float(reference.last_stats["car_sigma"]), rel=1e-5)
    expected = reference.state_dict()
    for key in ("regularizer.u", "regularizer.v", "regularizer.num_steps"):
        torch.testing.assert_close(states[0][key], expected[key], rtol=1e-5, atol=1e-6)
    conf = states[0]["regularizer.ema_columns"] * states[0]["regularizer.ema_scale"]
    ref_conf = expected["regularizer.ema_columns"] * expected["regularizer.ema_scale"]
    torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-6)

    # Logged parts are the window means averaged over the two processes (identical on both).
    logs = [[log for log in r["log_history"] if "loss" in log] for r in ranks]
    assert [log["step"] for log in logs[0]] == [2, 4]
    assert logs[0] == logs[1]
    for window, log in enumerate(logs[0]):
        steps = range(2 * window, 2 * window + 2)
        for key in ("base_loss", "ccar_weight_mean", "car_sigma"):
            per_rank = [sum(r["records"][s]["stats"][key] for s in steps) / 2 for r in ranks]
            assert log[key] == pytest.approx(sum(per_rank) / 2, abs=2e-6), key
        local = [sum(r["records"][s]["stats"]["base_loss"] for s in steps) for r in ranks]
        assert local[0] != pytest.approx(local[1])  # so the average really mixed two ranks


@pytest.mark.distributed
def test_train_script_under_two_processes_replaces_a_previous_run(tmp_path):
    """The README's ``accelerate launch`` form of scripts/train.py on 2 CPU processes, into an
    output dir that holds another run: with --overwrite_output_dir, process 0 deletes it once
    everything is validated, while the other process waits, and the run writes its results
    once."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed next to this Python")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    out.mkdir()
    (out / "longtail_run.json").write_text(json.dumps({"model_name_or_path": "another"}))
    (out / "all_results.json").write_text("{}")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(repo / "scripts" / "train.py"),
        str(repo / "scripts" / "configs" / "digits_ccar_car.yaml"),
        "--output_dir", str(out), "--overwrite_output_dir", "true",
        "--model_name_or_path", "resnet20_cifar", "--image_size", "16",
        "--max_steps", "3", "--per_device_train_batch_size", "16",
        "--save_strategy", "no", "--logging_strategy", "no",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["model_name_or_path"] == "resnet20_cifar"
    assert run["training"]["world_size"] == 2
    assert run["training"]["total_train_batch_size"] == 32
    results = json.loads((out / "all_results.json").read_text())
    assert len(results["test_per_class_accuracy"]) == 10
    assert results["test_num_samples"] == run["dataset"]["eval_size"]  # every image, once
    assert "Long-tail test metrics" in done.stdout  # printed by process 0
    assert done.stdout.count("Long-tail test metrics") == 1
