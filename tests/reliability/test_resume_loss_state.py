"""Resuming a checkpoint whose loss state is missing: a CE + CCAR + CAR run refuses unless told
to start the CAR state fresh; a loss without state (plain CE) resumes without a word.

The checkpoints are real: the tiny ViT trains 2 steps through ``LongTailTrainer`` (milliseconds)
and ``scripts/train.py`` trains the digits ResNet (seconds); the tests then remove or truncate
``longtail_loss.safetensors`` the way a plain ``Trainer`` checkpoint or a damaged copy lacks it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _reliability_helpers import (
    TINY_RUN,
    model_state,
    run_files,
    tiny_vit,
    train_dataset,
    training_args,
)

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses.total_loss import LOSS_WEIGHTS_NAME

CAR = {"base": "ce", "ccar": True, "car_weight": 0.5}


def _trainer(out, loss, max_steps, **options):
    return LongTailTrainer(
        model=tiny_vit(seed=1),  # not the weights of the checkpoint: a load would change them
        args=training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config=loss,
        **options,
    )


@pytest.fixture(params=["missing", "truncated"])
def damaged_checkpoint(request, tmp_path):
    """checkpoint-2 of a CE + CCAR + CAR run, its loss state removed or cut short."""
    _trainer(tmp_path, CAR, max_steps=2).train()
    folder = tmp_path / "checkpoint-2"
    weights = folder / LOSS_WEIGHTS_NAME
    if request.param == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:40])
    return folder, request.param


def test_car_checkpoint_without_its_state_is_refused_before_the_weights_load(damaged_checkpoint):
    folder, damage = damaged_checkpoint
    before = run_files(folder.parent)
    trainer = _trainer(folder.parent, CAR, max_steps=4)
    untouched = model_state(trainer.model)
    with pytest.raises(FileNotFoundError) as err:
        trainer.train(resume_from_checkpoint=str(folder))
    message = str(err.value)
    assert f"Cannot resume from {folder}" in message
    assert LOSS_WEIGHTS_NAME in message and ("truncated" in message) == (damage == "truncated")
    assert 'loss_state_missing="fresh"' in message and "--loss_state_missing fresh" in message
    assert "regularizer.ema_columns" in message  # what would be lost
    # Refused before anything was loaded or written.
    after = model_state(trainer.model)
    assert all(torch.equal(untouched[k], after[k]) for k in untouched)
    assert trainer.state.global_step == 0
    assert run_files(folder.parent) == before


def test_fresh_resumes_with_a_new_car_state_and_says_so(damaged_checkpoint, caplog):
    folder, _ = damaged_checkpoint
    trainer = _trainer(folder.parent, CAR, max_steps=4, loss_state_missing="fresh")
    with caplog.at_level(logging.WARNING, logger="hf_longtail.trainer"):
        trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.state.global_step == 4
    # The CAR state counts only the 2 resumed steps: it was started fresh, as asked.
    assert int(trainer.loss_fn.state_dict()["regularizer.num_steps"]) == 2
    warned = [r.getMessage() for r in caplog.records if str(folder) in r.getMessage()]
    assert warned and "starts fresh" in warned[0] and "loss_state_missing='fresh'" in warned[0]


def test_plain_ce_checkpoint_without_loss_state_resumes_without_complaint(tmp_path, caplog):
    _trainer(tmp_path, {"base": "ce"}, max_steps=2).train()
    folder = tmp_path / "checkpoint-2"
    (folder / LOSS_WEIGHTS_NAME).unlink()  # e.g. a checkpoint of a plain transformers.Trainer
    trainer = _trainer(tmp_path, {"base": "ce"}, max_steps=4)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.state.global_step == 4
    assert not [r for r in caplog.records if "loss" in r.getMessage().lower()], caplog.text


def test_bad_loss_state_missing_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_state_missing='later' is not valid"):
        _trainer(tmp_path, CAR, max_steps=2, loss_state_missing="later")


def test_train_script_refuses_then_resumes_with_loss_state_missing_fresh(train, tmp_path):
    """The re-run of the same command is refused before the run record gains a resume entry;
    ``--loss_state_missing fresh`` then continues from the checkpoint."""
    out = tmp_path / "run"
    first = [*TINY_RUN, "--output_dir", str(out), "--max_steps", "2"]
    train.main(first)
    # A run killed before its final files (no finished marker): the re-run resumes checkpoint-2.
    record = json.loads((out / "longtail_run.json").read_text())
    del record["finished"]
    (out / "longtail_run.json").write_text(json.dumps(record))
    (out / "checkpoint-2" / LOSS_WEIGHTS_NAME).unlink()
    longer = [*TINY_RUN, "--output_dir", str(out), "--max_steps", "4"]
    before = run_files(out)
    with pytest.raises(FileNotFoundError, match="--loss_state_missing fresh") as err:
        train.main(longer)
    assert str(out / "checkpoint-2") in str(err.value)
    assert run_files(out) == before  # longtail_run.json records no resume that never happened
    train.main([*longer, "--loss_state_missing", "fresh"])
    record = json.loads((out / "longtail_run.json").read_text())
    assert [r["checkpoint"] for r in record["resumes"]] == ["checkpoint-2"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
