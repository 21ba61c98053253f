"""The output directory: never mix two runs, never lose one, resume only from readable
checkpoints, fail at start-up when it cannot be written (``hf_longtail.resume`` through
``scripts/train.py``, and the Trainer's checkpoint order).

The run directories here are real: ``scripts/train.py`` (in-process, seconds) trains 4 steps with
a checkpoint every 2, and the tests re-run it the way a user would.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import pytest
from _reliability_helpers import (
    TINY_RUN,
    run_files,
    tiny_vit,
    train_dataset,
    training_args,
)
from safetensors.torch import load_file

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses import LongTailLossConfig
from hf_longtail.losses.total_loss import LOSS_WEIGHTS_NAME
from hf_longtail.resume import ResumeMismatchError

RECIPE = {
    "model_name_or_path": "resnet20_cifar",
    "dataset": {"name": "digits", "imbalance_factor": 10.0},
    "loss": LongTailLossConfig(ccar=True).to_dict(),
}


@pytest.fixture(scope="module")
def finished_run(train, tmp_path_factory):
    """A real finished run: checkpoint-2, checkpoint-4, model, results, longtail_run.json."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main([*TINY_RUN, "--output_dir", str(out)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    """A private copy of the run as a kill during its final evaluation leaves it (every
    checkpoint and the final model, no results, no ``finished`` marker in its record), for a
    test to re-run or damage. A finished run is never re-run in place
    (``test_finished_runs.py``)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _unfinish(out)
    return out


def _unfinish(out):
    record = json.loads((out / "longtail_run.json").read_text())
    del record["finished"]
    (out / "longtail_run.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out / "all_results.json").unlink()


def _args(train, out, *, overwrite=False, resume=None):
    training = training_args(out, resume_from_checkpoint=resume)
    return training, train.RunArguments(overwrite_output_dir=overwrite)


def _steps_trained(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["step"] for h in state["log_history"] if "loss" in h]


def test_a_different_run_is_refused_naming_the_change_and_the_three_ways_out(train, run_dir):
    before = run_files(run_dir)
    with pytest.raises(FileExistsError) as err:
        train.main(
            [*TINY_RUN, "--output_dir", str(run_dir), "--model_name_or_path", "resnet32_cifar"]
        )
    message = str(err.value)
    assert "already holds a different run" in message and "checkpoint-4" in message
    assert "model_name_or_path: 'resnet20_cifar' -> 'resnet32_cifar'" in message
    for way_out in ("--overwrite_output_dir", "--resume_from_checkpoint true", "--output_dir"):
        assert way_out in message
    assert run_files(run_dir) == before  # nothing was touched


def test_finished_run_without_checkpoints_is_kept(train, tmp_path):
    """No checkpoint to resume: the same command changes nothing, another recipe is refused,
    and a run with results but no finished marker (an older version's) is refused too."""
    out = tmp_path / "run"
    no_saves = [*TINY_RUN, "--output_dir", str(out), "--save_strategy", "no", "--max_steps", "1"]
    train.main(no_saves)
    before = run_files(out)
    assert train.main(no_saves) == json.loads((out / "all_results.json").read_text())
    assert run_files(out) == before
    with pytest.raises(FileExistsError, match=r"already holds a different run \(finished"):
        train.main([*no_saves, "--car_weight", "0.1"])
    record = json.loads((out / "longtail_run.json").read_text())
    del record["finished"]
    (out / "longtail_run.json").write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match="already holds a previous run"):
        train.main(no_saves)


def test_identical_rerun_continues_the_run(train, run_dir, caplog):
    """The recipe compared is the recipe written: re-running the command (here with a longer
    run) resumes from the last checkpoint, and the record says so."""
    with caplog.at_level(logging.INFO, logger="hf_longtail.resume"):
        train.main([*TINY_RUN, "--output_dir", str(run_dir), "--max_steps", "6"])
    assert f"Resuming the same run from {run_dir / 'checkpoint-4'}" in caplog.text
    assert _steps_trained(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 added, not restarted
    record = json.loads((run_dir / "longtail_run.json").read_text())
    assert record["resumes"] == [{"checkpoint": "checkpoint-4", "changed": {"max_steps": [4, 6]}}]
    assert record["training"]["max_steps"] == 6


@pytest.mark.parametrize(
    ("flags", "changed"),
    [
        (["--car_weight", "0.1"], "loss.car_weight: 0.5 -> 0.1"),
        (["--loss", "ldam"], "loss.base: 'ce' -> 'ldam'"),
        (["--imbalance_factor", "5"], "dataset.imbalance_factor: 10.0 -> 5.0"),
        (["--dataset_name", "./elsewhere"], "dataset.name: 'digits' -> './elsewhere'"),
        (["--seed", "1"], "training.seed: 0 -> 1"),
    ],
    ids=["car_weight", "loss", "imbalance_factor", "dataset", "seed"],
)
@pytest.mark.parametrize("resume", ["true", "checkpoint-4"])
def test_resume_with_a_changed_recipe_is_refused_before_loading(
    train, run_dir, flags, changed, resume
):
    before = run_files(run_dir)
    target = "true" if resume == "true" else str(run_dir / resume)
    argv = [*TINY_RUN, "--output_dir", str(run_dir), "--resume_from_checkpoint", target, *flags]
    with pytest.raises(ResumeMismatchError, match=r"Cannot resume .*checkpoint-4") as err:
        train.main(argv)
    assert changed in str(err.value)
    assert run_files(run_dir) == before  # the record still describes the run that was trained


def test_resume_on_a_dataset_that_changed_under_its_name_is_refused(train, tmp_path):
    """Same options, but the local dataset was rebuilt with more images: the class counts,
    known once the data are loaded, are compared before the model is built."""
    from _reliability_helpers import image_dataset
    from datasets import DatasetDict

    source, out = tmp_path / "data", tmp_path / "run"

    def build(counts):
        splits = {"train": image_dataset(counts, seed=1), "test": image_dataset((3, 3, 3, 3))}
        DatasetDict(splits).save_to_disk(source)

    argv = [*TINY_RUN, "--output_dir", str(out), "--dataset_name", str(source)]
    argv += ["--imbalance_factor", "2", "--image_size", "8"]
    build((20, 16, 12, 8))
    train.main(argv)
    _unfinish(out)  # killed before its final files: the re-run would resume it
    before = run_files(out)
    shutil.rmtree(source)
    build((30, 16, 12, 8))
    with pytest.raises(
        ResumeMismatchError, match=r"dataset\.class_counts: \[20, 15, 12, 8\] -> \[30, 16, 12, 8\]"
    ):
        train.main(argv)
    assert run_files(out) == before


def test_the_trainer_refuses_a_checkpoint_of_another_recipe(run_dir, tmp_path):
    """Python users resuming with LongTailTrainer directly: the checkpoint's recipe file."""
    recipe = json.loads((run_dir / "checkpoint-4" / "longtail_recipe.json").read_text())
    assert recipe["loss"]["car_weight"] == 0.5 and recipe["num_labels"] == 10
    trainer = LongTailTrainer(
        model=tiny_vit(num_labels=6),
        args=training_args(tmp_path / "other", max_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
    )
    with pytest.raises(ResumeMismatchError) as err:
        trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-4"))
    message = str(err.value)
    for change in ("loss.car_weight: 0.5 -> 0.0", "num_labels: 10 -> 6", "class_counts"):
        assert change in message


def test_overwrite_deletes_only_after_everything_is_validated(train, run_dir):
    before = run_files(run_dir)
    for bad in (["--eval_split", "nope"], ["--train_transform", "model"]):
        with pytest.raises((KeyError, ValueError)):
            train.main(
                [*TINY_RUN, "--output_dir", str(run_dir), "--overwrite_output_dir", "true", *bad]
            )
        assert run_files(run_dir) == before  # the previous run survives a failed start
    train.main(
        [
            *TINY_RUN,
            "--output_dir",
            str(run_dir),
            "--overwrite_output_dir",
            "true",
            "--loss",
            "focal",
        ]
    )
    assert json.loads((run_dir / "longtail_run.json").read_text())["loss"]["base"] == "focal"
    assert "resumes" not in json.loads((run_dir / "longtail_run.json").read_text())
    assert _steps_trained(run_dir) == [1, 2, 3, 4]  # a fresh run


def test_resume_wins_over_overwrite(train, run_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_longtail.resume"):
        train.main(
            [*TINY_RUN, "--output_dir", str(run_dir), "--max_steps", "6",
             "--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"]
        )  # fmt: skip
    assert "resuming" in caplog.text and "nothing is deleted" in caplog.text
    assert _steps_trained(run_dir) == [1, 2, 3, 4, 5, 6]


def test_no_bundled_config_sets_overwrite():
    from _reliability_helpers import REPO_ROOT

    for config in sorted((REPO_ROOT / "scripts" / "configs").glob("*.yaml")):
        assert "overwrite_output_dir" not in config.read_text(), config.name


def test_resume_true_without_a_checkpoint_is_an_error(train, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no readable checkpoint-\* directory"):
        train.prepare_output_dir(*_args(train, out, resume="true"), RECIPE)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("delete trainer_state.json", "trainer_state.json is missing"),
        ("empty trainer_state.json", "trainer_state.json is empty"),
        ("truncated trainer_state.json", "trainer_state.json cannot be read"),
        ("truncated model.safetensors", "model.safetensors is truncated"),
    ],
)
def test_unreadable_checkpoint_is_skipped_naming_the_file(train, run_dir, caplog, damage, named):
    """A kill or a full disk during a checkpoint write: resume takes the previous readable one
    (automatically or with --resume_from_checkpoint true); an explicit path is refused."""
    action, name = damage.split(" ", 1)
    path = run_dir / "checkpoint-4" / name
    if action == "delete":
        path.unlink()
    elif action == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for resume in (None, "true"):
        with caplog.at_level(logging.WARNING, logger="hf_longtail.resume"):
            plan = train.prepare_output_dir(*_args(train, run_dir, resume=resume), _record(run_dir))
        assert plan.resume == str(run_dir / "checkpoint-2")
        assert (
            f"Ignoring checkpoint {run_dir / 'checkpoint-4'}" in caplog.text
            and named in caplog.text
        )
    with pytest.raises(FileNotFoundError, match=rf"cannot be resumed from: .*{named}"):
        train.prepare_output_dir(
            *_args(train, run_dir, resume=str(run_dir / "checkpoint-4")), _record(run_dir)
        )
    # The real run continues from checkpoint-2 and rewrites checkpoint-4 whole.
    train.main([*TINY_RUN, "--output_dir", str(run_dir), "--resume_from_checkpoint", "true"])
    assert _steps_trained(run_dir) == [1, 2, 3, 4]
    assert (
        json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"]
        == 4
    )


def test_same_run_stopped_before_its_first_checkpoint_starts_again(train, run_dir, caplog):
    """Killed while writing its first checkpoint (no results, no readable checkpoint): the
    re-submitted job starts over instead of asking for a flag."""
    for name in ("checkpoint-4", "model.safetensors"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run_dir / "checkpoint-2" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="hf_longtail.resume"):
        train.main([*TINY_RUN, "--output_dir", str(run_dir)])
    assert "holds the same run without a readable checkpoint: starting it again" in caplog.text
    assert _steps_trained(run_dir) == [1, 2, 3, 4]
    assert (
        json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["global_step"]
        == 2
    )


def _record(out):
    return json.loads((out / "longtail_run.json").read_text())


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
    state = load_file(folder / LOSS_WEIGHTS_NAME)
    assert int(state["regularizer.num_steps"]) == 2
