"""The output directory: never mix two runs, resume only from complete checkpoints, fail at
start-up when it cannot be written (``scripts/train.py``'s ``prepare_output_dir`` and the
Trainer's checkpoint order)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import pytest
import torch
from _reliability_helpers import load_train_module, tiny_vit, train_dataset, training_args

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses import LongTailLossConfig
from hf_longtail.trainer import LOSS_STATE_NAME

RECIPE = {
    "model_name_or_path": "resnet20_cifar",
    "dataset": {"name": "digits", "imbalance_factor": 10.0},
    "loss": LongTailLossConfig(ccar=True).to_dict(),
}


@pytest.fixture(scope="module")
def train():
    return load_train_module()


def _args(train, out, *, overwrite=False, resume=None):
    training = training_args(out, resume_from_checkpoint=resume)
    return training, train.RunArguments(overwrite_output_dir=overwrite)


def _checkpoint(out, step, complete=True):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _previous_run(out, recipe=RECIPE):
    out.mkdir(parents=True, exist_ok=True)
    (out / "longtail_run.json").write_text(json.dumps(recipe))


def test_a_different_run_is_refused_with_the_three_ways_out(train, tmp_path):
    out = tmp_path / "run"
    _previous_run(out, {**RECIPE, "model_name_or_path": "resnet32_cifar"})
    _checkpoint(out, 5)
    with pytest.raises(FileExistsError) as err:
        train.prepare_output_dir(*_args(train, out), RECIPE)
    message = str(err.value)
    assert "already holds a different run" in message and "checkpoint-5" in message
    for way_out in ("--overwrite_output_dir", "--resume_from_checkpoint true", "--output_dir"):
        assert way_out in message
    assert (out / "checkpoint-5").is_dir()  # nothing was touched


def test_finished_run_without_checkpoints_is_refused(train, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a previous run"):
        train.prepare_output_dir(*_args(train, out), RECIPE)


def test_overwrite_deletes_the_previous_run(train, tmp_path):
    out = tmp_path / "run"
    _previous_run(out, {**RECIPE, "loss": {"base": "ldam"}})
    _checkpoint(out, 5)
    assert train.prepare_output_dir(*_args(train, out, overwrite=True), RECIPE) is None
    assert out.is_dir() and list(out.iterdir()) == []


def test_same_recipe_resumes_automatically_from_the_last_checkpoint(train, tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    for step in (5, 10, 40):
        _checkpoint(out, step)
    resumed = train.prepare_output_dir(*_args(train, out), RECIPE)
    assert resumed == str(out / "checkpoint-40")


def test_resume_true_without_a_checkpoint_is_an_error(train, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint-\* directory"):
        train.prepare_output_dir(*_args(train, out, resume="true"), RECIPE)


def test_resume_skips_a_half_written_checkpoint(train, tmp_path, caplog):
    """SIGKILL while a checkpoint is written leaves it without trainer_state.json (the Trainer
    writes it last): resuming must take the previous complete one."""
    out = tmp_path / "run"
    _previous_run(out)
    _checkpoint(out, 20)
    _checkpoint(out, 30, complete=False)
    with caplog.at_level(logging.WARNING, logger="hf_longtail.train"):
        resumed = train.prepare_output_dir(*_args(train, out, resume=True), RECIPE)
    assert resumed == str(out / "checkpoint-20")
    assert "Ignoring incomplete checkpoint" in caplog.text and "checkpoint-30" in caplog.text
    # Also when resuming automatically (same recipe, no flag).
    assert train.prepare_output_dir(*_args(train, out), RECIPE) == str(out / "checkpoint-20")
    # An explicit path to the broken one is refused with the fix.
    with pytest.raises(FileNotFoundError, match=r"is incomplete .*--resume_from_checkpoint true"):
        train.prepare_output_dir(*_args(train, out, resume=str(out / "checkpoint-30")), RECIPE)


def test_output_dir_under_a_file_fails_at_start_up(train, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"cannot be created .*Choose another"):
        train.prepare_output_dir(*_args(train, blocker / "run"), RECIPE)
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        train.prepare_output_dir(*_args(train, blocker), RECIPE)


def test_full_disk_fails_at_start_up(train, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 50 * 2**20, 50 * 2**20)
    )
    with pytest.raises(OSError, match=r"Only 50 MiB free on the disk of .*Free some space"):
        train.prepare_output_dir(*_args(train, tmp_path / "run"), RECIPE)


def test_unwritable_output_dir_fails_at_start_up(train, tmp_path, monkeypatch):
    """We run as root, where chmod does not block writes: the probe write is made to fail as a
    read-only filesystem would (EROFS)."""
    from pathlib import Path

    def read_only(self, data):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(PermissionError, match=r"is not writable: .*Read-only file system"):
        train.prepare_output_dir(*_args(train, tmp_path / "run"), RECIPE)


def test_script_refuses_a_different_run_before_loading_anything(train, tmp_path):
    out = tmp_path / "run"
    _previous_run(out, {**RECIPE, "model_name_or_path": "something_else"})
    _checkpoint(out, 3)
    with pytest.raises(FileExistsError, match="different run"):
        train.main(["--output_dir", str(out), "--model_name_or_path", "resnet20_cifar"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "longtail_run.json"]


def test_checkpoint_writes_the_loss_state_before_its_completion_marker(tmp_path, monkeypatch):
    """A kill between the two files must not leave a complete-looking checkpoint without CAR
    state: simulate it by failing the write of trainer_state.json."""
    from transformers import TrainerState

    def killed(self, path):
        raise KeyboardInterrupt("killed while writing trainer_state.json")

    trainer = LongTailTrainer(
        model=tiny_vit(),
        args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config=LongTailLossConfig(ccar=True, car_weight=0.5),
    )
    monkeypatch.setattr(TrainerState, "save_to_json", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    folder = tmp_path / "checkpoint-2"
    assert not (folder / "trainer_state.json").exists()
    state = torch.load(folder / LOSS_STATE_NAME, weights_only=True)
    assert int(state["regularizer.num_steps"]) == 2
