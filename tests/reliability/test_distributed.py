"""Data-parallel training equals single-process training (2 processes, gloo on CPU).

``_ddp_train.py`` runs LongTailTrainer with CE + CCAR + CAR and the class-balanced sampler at a
global batch of 16 for 12 steps (two epochs), once in this process and once as 2 processes of 8
under ``python -m torch.distributed.run``. DDP averages the per-rank gradients of per-rank batch
means (which for a per-sample loss is the gradient of the global mean) and CAR reduces its
confusion sums over the ranks, so both runs must end with the same weights and CAR state up to
float32 reduction order.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _reliability_helpers import TINY_RUN, TrainRun, free_port, run_train, subprocess_env
from safetensors.torch import load_file

from hf_longtail.losses.total_loss import LOSS_WEIGHTS_NAME

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_ddp_train.py"
ATOL, RTOL = 2e-5, 1e-4
LOSS_LINE = re.compile(r"^\{'loss': ", re.MULTILINE)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pixel_cache", ["auto", "off"])  # pixel-cache fast path, streaming
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, pixel_cache):
    sys.path.insert(0, str(HERE))
    import _ddp_train

    single = _ddp_train.train(tmp_path, pixel_cache=pixel_cache)  # one thread, as the children
    assert single["world_size"] == 1 and single["global_step"] == _ddp_train.MAX_STEPS
    path = "PixelStoreDataset" if pixel_cache == "auto" else "Dataset"
    assert single["train_dataset_type"] == path

    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(DRIVER), str(tmp_path), "-", pixel_cache,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suffix = "-streaming" if pixel_cache == "off" else ""
    ranks = [
        torch.load(tmp_path / f"result-ws2-rank{r}{suffix}.pt", weights_only=False) for r in (0, 1)
    ]
    assert [r["train_dataset_type"] for r in ranks] == [path, path]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert all(r["global_step"] == _ddp_train.MAX_STEPS for r in ranks)

    # Same start, same end.
    for key, value in single["initial"].items():
        assert torch.equal(ranks[0]["initial"][key], value), key
    moved = max(
        (single["weights"][k] - single["initial"][k]).abs().max() for k in single["weights"]
    )
    assert moved > 100 * ATOL  # training changed the weights far beyond the tolerance
    for rank in ranks:
        for key, value in single["weights"].items():
            torch.testing.assert_close(rank["weights"][key], value, rtol=RTOL, atol=ATOL, msg=key)
        state = rank["loss_state"]
        assert int(state["regularizer.num_steps"]) == _ddp_train.MAX_STEPS
        for key, value in single["loss_state"].items():
            if value.is_floating_point():
                torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=key)
            else:
                assert torch.equal(state[key], value), key


@pytest.mark.slow
@pytest.mark.distributed
def test_a_nonfinite_batch_on_one_rank_is_skipped_without_hanging(tmp_path):
    """Rank 1 alone gets NaN logits at step 3 with ``nonfinite_loss="skip"``. CAR all-reduces
    inside the loss, so both ranks must skip that step together (a rank skipping alone would
    mismatch the collectives: a crash under gloo, a hang under NCCL); the run then goes on."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(DRIVER), str(tmp_path), "3",
    ]  # fmt: skip
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [
        torch.load(tmp_path / f"result-ws2-rank{r}-poisoned.pt", weights_only=False) for r in (0, 1)
    ]
    logs = [[h for h in r["log_history"] if "loss" in h] for r in ranks]
    assert logs[0] == logs[1]  # one reduced log, identical on both ranks
    assert [h["step"] for h in logs[0]] == list(range(1, 13))
    assert [h.get("skipped_nonfinite_steps", 0) for h in logs[0]] == [0, 0] + [1] * 10
    assert "base_loss" not in logs[0][2]  # no process ran the loss at step 3
    assert all(math.isfinite(h["base_loss"]) for i, h in enumerate(logs[0]) if i != 2)
    for rank in ranks:
        assert int(rank["loss_state"]["regularizer.num_steps"]) == 11  # step 3 never reached CAR
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
        assert torch.isfinite(value).all(), key


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run_interrupted_by_the_scheduler_resumes(tmp_path):
    """``scripts/train.py`` under ``torch.distributed.run`` (2 CPU processes, gloo), stopped by a
    SIGTERM to the whole process group (torchrun forwards it to its workers too: the repeated
    signal must not kill them mid-checkpoint), then the same command again: every process loads
    the checkpoint (the loss state used to crash ``torch.load`` with map location ``cpu:0``)
    and the run continues to its last step."""
    out = tmp_path / "run"
    launcher = [
        "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip
    argv = [*TINY_RUN, "--output_dir", str(out), "--max_steps", "10", "--save_steps", "100"]
    run = TrainRun(argv, tmp_path / "stopped.txt", launcher)
    try:
        run.wait_for(lambda: len(LOSS_LINE.findall(run.log())) >= 3, timeout=240)
        run.send_group(signal.SIGTERM)
        run.wait()
    except BaseException:
        run.kill()
        raise
    log = run.log()
    assert log.count("Stopped by SIGTERM after saving a checkpoint") == 2, log[-4000:]
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < 10
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]

    launcher[-1] = str(free_port())
    code, log = run_train(argv, tmp_path / "resumed.txt", launcher=launcher)
    assert code == 0, log[-4000:]
    assert f"Resuming the same run from {checkpoint}" in log
    assert len(LOSS_LINE.findall(log)) == 10 - step
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 11))
    loss_state = load_file(out / "checkpoint-10" / LOSS_WEIGHTS_NAME)
    assert int(loss_state["regularizer.num_steps"]) == 10  # CAR state carried over the resume
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_accuracy"] is not None
