"""Interrupting a real ``scripts/train.py`` run and resuming it loses nothing.

One short run (digits, ResNet-20 at 16x16, CE + CCAR + CAR, class-balanced sampler, random-crop
and flip augmentation, 40 steps of which 17 per epoch, checkpoints every 20 steps) is run once
uninterrupted and then:

- stopped with SIGTERM / SIGINT a few steps in: it must checkpoint the step it stopped at and
  exit with 128 + signal;
- resumed from that mid-epoch checkpoint, and separately from the periodic checkpoint left by a
  SIGKILL: the final weights, CAR state, optimizer state and test metrics must equal the
  uninterrupted run's.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from _reliability_helpers import TrainRun, run_train
from safetensors.torch import load_file

from hf_longtail.losses.total_loss import LOSS_WEIGHTS_NAME

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 40, 20
CONFIG = f"""
dataset_name: digits
imbalance_factor: 10
many_shot_threshold: 60
few_shot_threshold: 20
model_name_or_path: resnet20_cifar
train_transform: cifar10
image_size: 16
loss: ce
ccar: true
car_weight: 0.5
sampler: class_balanced
max_steps: {MAX_STEPS}
per_device_train_batch_size: 32
per_device_eval_batch_size: 256
learning_rate: 0.05
optim: sgd
optim_args: momentum=0.9
weight_decay: 0.0005
lr_scheduler_type: cosine
logging_steps: 1
eval_strategy: "no"
save_strategy: steps
save_steps: {SAVE_STEPS}
report_to: none
disable_tqdm: true
seed: 0
full_determinism: true
dataloader_num_workers: 0
use_cpu: true
"""
LOSS_LINE = re.compile(r"^\{'loss': ", re.MULTILINE)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "short.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, log = run_train([str(config), "--output_dir", str(out)], out.parent / "log.txt")
    assert code == 0, log[-4000:]
    assert len(LOSS_LINE.findall(log)) == MAX_STEPS
    return out


def _logged_steps(run: TrainRun) -> int:
    return len(LOSS_LINE.findall(run.log()))


def _checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*") if p.is_dir()}


def _assert_same_run(out: Path, reference: Path) -> None:
    """Final weights, CAR state, optimizer state and test metrics equal the reference's."""
    weights, expected = (
        load_file(out / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=0, atol=1e-6, msg=key)
    final = f"checkpoint-{MAX_STEPS}"
    loss_state = load_file(out / final / LOSS_WEIGHTS_NAME)
    loss_expected = load_file(reference / final / LOSS_WEIGHTS_NAME)
    assert loss_state.keys() == loss_expected.keys()
    for key, value in loss_expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(loss_state[key], value, rtol=0, atol=1e-6, msg=key)
        else:
            assert loss_state[key] == value, key
    assert int(loss_state["regularizer.num_steps"]) == MAX_STEPS
    optim = torch.load(out / final / "optimizer.pt", weights_only=True)["state"]
    optim_expected = torch.load(reference / final / "optimizer.pt", weights_only=True)["state"]
    for index, slot in optim_expected.items():
        torch.testing.assert_close(
            optim[index]["momentum_buffer"], slot["momentum_buffer"], rtol=0, atol=1e-6
        )
    state = json.loads((out / final / "trainer_state.json").read_text())
    state_expected = json.loads((reference / final / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"]) == (
        state_expected["global_step"],
        state_expected["epoch"],
    )
    # Same per-step training losses over the whole run (the resumed part recomputed them).
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    losses_expected = [h["loss"] for h in state_expected["log_history"] if "loss" in h]
    assert losses == pytest.approx(losses_expected, abs=1e-6)
    results = json.loads((out / "all_results.json").read_text())
    results_expected = json.loads((reference / "all_results.json").read_text())
    for key, value in results_expected.items():
        if key.startswith("test_") and key != "test_loss":
            assert results[key] == value, key
    assert results["test_loss"] == pytest.approx(results_expected["test_loss"], abs=1e-6)


def _stopped_run(
    config: Path, out: Path, sig: int, *extra: str, group: bool = False
) -> tuple[TrainRun, int]:
    """Start a run, send ``sig`` (to its whole process group if ``group``) once 3 steps are
    logged, return it with its exit code."""
    argv = [str(config), "--output_dir", str(out), *extra]
    run = TrainRun(argv, out.parent / f"log-{sig}.txt")
    try:
        run.wait_for(lambda: _logged_steps(run) >= 3)
        run.send_group(sig) if group else run.send(sig)
        code = run.wait()
    except BaseException:
        run.kill()
        raise
    return run, code


def _assert_checkpoint_at_stop(run: TrainRun, out: Path, sig: int) -> int:
    log = run.log()
    assert f"Stopped by {signal.Signals(sig).name} after saving a checkpoint" in log
    assert not (out / "all_results.json").exists()  # it stopped, it did not finish
    step = _logged_steps(run)  # one log line per completed step
    assert 3 <= step < SAVE_STEPS
    # Exactly one checkpoint, at the step the signal stopped, complete, with the CAR state.
    assert list(_checkpoints(out)) == [step]
    folder = out / f"checkpoint-{step}"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == step
    loss_state = load_file(folder / LOSS_WEIGHTS_NAME)
    assert int(loss_state["regularizer.num_steps"]) == step
    return step


def test_sigterm_checkpoints_then_resume_matches_uninterrupted(config, reference, tmp_path):
    out = tmp_path / "run"
    run, code = _stopped_run(config, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, run.log()[-4000:]
    step = _assert_checkpoint_at_stop(run, out, signal.SIGTERM)

    code, log = run_train(
        [str(config), "--output_dir", str(out), "--resume_from_checkpoint", "true"],
        tmp_path / "resume.txt",
    )
    assert code == 0, log[-4000:]
    assert len(LOSS_LINE.findall(log)) == MAX_STEPS - step  # it went on from the stop
    _assert_same_run(out, reference)


def test_sigint_checkpoints_and_exits_130(config, tmp_path):
    out = tmp_path / "run"
    run, code = _stopped_run(config, out, signal.SIGINT)
    assert code == 128 + signal.SIGINT, run.log()[-4000:]
    _assert_checkpoint_at_stop(run, out, signal.SIGINT)


def test_sigkill_then_resume_from_last_checkpoint_matches_uninterrupted(
    config, reference, tmp_path
):
    out = tmp_path / "run"
    run = TrainRun([str(config), "--output_dir", str(out)], tmp_path / "killed.txt")
    try:
        run.wait_for(lambda: (out / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").is_file())
        run.send(signal.SIGKILL)
        code = run.wait()
    except BaseException:
        run.kill()
        raise
    assert code == -signal.SIGKILL
    assert not (out / "all_results.json").exists()
    killed_at = _logged_steps(run)
    assert SAVE_STEPS <= killed_at < MAX_STEPS
    # SAVE_STEPS = 20 is mid-epoch (17 steps per epoch): the resume skips into epoch 1.
    code, log = run_train(
        [str(config), "--output_dir", str(out), "--resume_from_checkpoint", "true"],
        tmp_path / "resume.txt",
    )
    assert code == 0, log[-4000:]
    assert len(LOSS_LINE.findall(log)) == MAX_STEPS - SAVE_STEPS
    _assert_same_run(out, reference)


def _group_alive(pgid: int) -> list[int]:
    """Processes still in the process group ``pgid`` (from /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_with_dataloader_workers_still_checkpoints(
    config, tmp_path, sig
):
    """A scheduler's cancel / a container stop / Ctrl-C signals the whole process group,
    DataLoader workers included. The workers ignore it (the main process would otherwise crash
    on 'DataLoader worker is killed by signal' before checkpointing); the main process
    checkpoints the step it stopped at, and re-running the same command continues from there."""
    out = tmp_path / "run"
    workers = ("--dataloader_num_workers", "2")
    run, code = _stopped_run(config, out, sig, *workers, group=True)
    assert code == 128 + sig, run.log()[-4000:]
    assert "is killed by signal" not in run.log()
    step = _assert_checkpoint_at_stop(run, out, sig)
    deadline = time.monotonic() + 20
    while _group_alive(run.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(run.process.pid)  # no worker left behind
    if sig == signal.SIGINT:
        return  # the resume is the same for both signals
    argv = [str(config), "--output_dir", str(out), *workers]
    code, log = run_train(argv, tmp_path / "rerun.txt")  # the same command again
    assert code == 0, log[-4000:]
    assert f"Resuming the same run from {out / f'checkpoint-{step}'}" in log
    assert len(LOSS_LINE.findall(log)) == MAX_STEPS - step
    final = out / f"checkpoint-{MAX_STEPS}"
    loss_state = load_file(final / LOSS_WEIGHTS_NAME)
    assert int(loss_state["regularizer.num_steps"]) == MAX_STEPS


def test_a_repeated_signal_is_one_stop_request_but_a_late_second_ctrl_c_is_not(tmp_path):
    """torchrun forwards the SIGTERM its process group already delivered: the repeat must not
    kill a worker mid-checkpoint. A second Ctrl-C more than a second later still interrupts."""
    import os

    from _reliability_helpers import tiny_vit, train_dataset, training_args

    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn
    from hf_longtail.trainer import install_signal_checkpointing

    trainer = LongTailTrainer(
        model=tiny_vit(), args=training_args(tmp_path), train_dataset=train_dataset(),
        data_collator=collate_fn,
    )  # fmt: skip
    callback = install_signal_checkpointing(trainer)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy: ignored
        assert callback.received == signal.SIGTERM
        callback.received = None
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within a second: the same Ctrl-C
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # an impatient second Ctrl-C
    finally:
        callback.restore()
