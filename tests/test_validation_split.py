"""The validation split: a balanced hold-out of the source, a stratified carve of the long-tailed
split or the dataset's own; it (never the test split) drives what is tuned, the test split is
predicted once, and a second stage re-creates it from the run record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers_train import digits_resnet_argv, image_dataset, load_train_script

from hf_longtail.data import (
    heldout_split_indices,
    label_array,
    load_long_tailed,
    longtail_record,
    stratified_split_indices,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Source training counts of the uid dataset: class 0 is the head the long tail keeps whole.
SOURCE = (30, 24, 18, 12, 9)


# ---------------------------------------------------------------------------- row selection
def test_heldout_indices_are_balanced_disjoint_complete_and_seeded():
    labels = np.random.default_rng(3).integers(0, 4, size=200)
    rest, held = heldout_split_indices(labels, 5, seed=7)
    assert np.bincount(labels[held], minlength=4).tolist() == [5] * 4
    assert not set(rest) & set(held)
    assert sorted([*rest, *held]) == list(range(200))
    again = heldout_split_indices(labels, 5, seed=7)
    assert np.array_equal(again[1], held) and np.array_equal(again[0], rest)
    assert not np.array_equal(heldout_split_indices(labels, 5, seed=8)[1], held)
    small = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match=r"class 1 \('b'\) has 3 training images.*--validation_"):
        heldout_split_indices(small, 3, class_names=["a", "b"])


def _uid_source(tmp_path, with_validation: bool = False):
    """A save_to_disk source whose every row has a unique ``uid``: train (``SOURCE`` counts),
    test (4 per class) and optionally its own validation split."""
    from datasets import DatasetDict

    def split(counts, start, seed):
        ds = image_dataset(counts, seed=seed)
        return ds.add_column("uid", list(range(start, start + len(ds))))

    splits = {"train": split(SOURCE, 0, 0), "test": split([4] * len(SOURCE), 1000, 1)}
    if with_validation:
        splits["validation"] = split([2] * len(SOURCE), 2000, 2)
    path = tmp_path / ("with_val" if with_validation else "source")
    DatasetDict(splits).save_to_disk(str(path))
    return path


def test_heldout_split_is_reserved_from_the_source_before_the_long_tail(tmp_path):
    path = _uid_source(tmp_path)
    dd = load_long_tailed(str(path), imbalance_factor=6, seed=3, validation_per_class=4)
    assert list(dd) == ["train", "validation", "test"]
    val = np.asarray(dd["validation"]["label"])
    assert np.bincount(val, minlength=5).tolist() == [4] * 5  # balanced
    uids = {name: set(dd[name]["uid"]) for name in dd}
    assert not uids["validation"] & uids["train"] and not uids["validation"] & uids["test"]
    train_counts = np.bincount(np.asarray(dd["train"]["label"]), minlength=5).tolist()
    # The head class draws from what the hold-out left (30 - 4), not from all its 30 images.
    assert train_counts[0] == SOURCE[0] - 4
    record = longtail_record(dd)
    assert record["class_counts"] == train_counts
    assert record["validation"] == {
        "method": "heldout",
        "per_class": 4,
        "seed": 3,
        "source_train_class_counts": list(SOURCE),
        "class_counts": [4] * 5,
    }
    again = load_long_tailed(str(path), imbalance_factor=6, seed=3, validation_per_class=4)
    assert set(again["validation"]["uid"]) == uids["validation"]
    assert set(again["train"]["uid"]) == uids["train"]
    other = load_long_tailed(str(path), imbalance_factor=6, seed=4, validation_per_class=4)
    assert set(other["validation"]["uid"]) != uids["validation"]
    with pytest.raises(ValueError, match=r"class 4 \('class_4'\) has 9 training images"):
        load_long_tailed(str(path), imbalance_factor=6, validation_per_class=9)


def test_train_val_split_is_stratified_from_the_long_tailed_split(tmp_path):
    path = _uid_source(tmp_path)
    plain = load_long_tailed(str(path), imbalance_factor=6, seed=3)
    dd = load_long_tailed(str(path), imbalance_factor=6, seed=3, train_val_split=0.25)
    lt_labels = label_array(plain["train"], "label")
    keep, carved = stratified_split_indices(lt_labels, 0.25, 3)  # the reference construction
    assert sorted(dd["validation"]["uid"]) == sorted(np.asarray(plain["train"]["uid"])[carved])
    assert sorted(dd["train"]["uid"]) == sorted(np.asarray(plain["train"]["uid"])[keep])
    lt_counts = np.bincount(lt_labels, minlength=5)
    val_counts = np.bincount(label_array(dd["validation"], "label"), minlength=5)
    assert (val_counts >= 1).all() and (lt_counts - val_counts >= 1).all()
    assert np.abs(val_counts - 0.25 * lt_counts).max() <= 1  # stratified
    record = longtail_record(dd)
    assert record["validation"]["method"] == "train_val_split"
    assert record["validation"]["fraction"] == 0.25
    assert record["validation"]["class_counts"] == val_counts.tolist()
    assert record["class_counts"] == (lt_counts - val_counts).tolist()


def test_a_second_validation_split_is_refused_when_the_dataset_has_one(tmp_path):
    path = _uid_source(tmp_path, with_validation=True)
    with pytest.raises(ValueError, match="has its own 'validation' split"):
        load_long_tailed(str(path), imbalance_factor=6, validation_per_class=2)
    with pytest.raises(ValueError, match="has its own 'validation' split"):
        load_long_tailed(str(path), imbalance_factor=6, train_val_split=0.2)


# ---------------------------------------------------------------------- through train.py
@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


def _argv(out, *extra):
    return digits_resnet_argv(
        out, "--per_device_eval_batch_size", "256", "--dataloader_num_workers", "0",
        "--logging_strategy", "no", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def heldout_run(train_script, tmp_path_factory):
    """A short digits run with a held-out validation split, evaluated every 2 steps, whose
    evaluation loops are counted by the size of the split they predict."""
    import transformers

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("heldout") / "run"
    seen: list[int] = []
    original = transformers.Trainer.evaluation_loop

    def counting(self, dataloader, *args, **kwargs):
        seen.append(len(dataloader.dataset))
        return original(self, dataloader, *args, **kwargs)

    transformers.Trainer.evaluation_loop = counting
    try:
        results = train_script.main(
            _argv(
                out, "--validation_split", "heldout", "--validation_per_class", "6",
                "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            )
        )  # fmt: skip
    finally:
        transformers.Trainer.evaluation_loop = original
    return out, results, seen


def test_validation_drives_evaluation_and_test_is_predicted_once(heldout_run):
    out, results, seen = heldout_run
    run = json.loads((out / "longtail_run.json").read_text())
    validation = run["dataset"]["validation"]
    assert validation["method"] == "heldout" and validation["size"] == 60
    assert validation["class_counts"] == [6] * 10 and validation["seed"] == 0
    test_size = run["dataset"]["eval_size"]
    assert test_size == 539
    # Two per-epoch evaluations on the 60 validation images, one prediction of the test split.
    assert seen == [60, 60, test_size]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["eval_num_samples"] for h in history if "eval_num_samples" in h] == [60, 60]
    assert "test_accuracy" in results
    on_disk = json.loads((out / "all_results.json").read_text())
    assert on_disk["test_accuracy"] == results["test_accuracy"]


def test_second_stage_recreates_the_recorded_validation_split(heldout_run):
    from hf_longtail.decoupled import validation_split

    out, _, _ = heldout_run
    run = json.loads((out / "longtail_run.json").read_text())
    splits = validation_split(run)
    fresh = load_long_tailed("digits", imbalance_factor=10, validation_per_class=6)

    def rows(ds):
        return sorted(im.tobytes() + bytes([y]) for im, y in zip(ds["image"], ds["label"]))

    assert rows(splits.validation) == rows(fresh["validation"])
    assert "heldout" in splits.validation_source
    assert len(splits.train) == run["dataset"]["train_size"]
    assert not set(rows(splits.validation)) & set(rows(splits.train))


def test_validation_options_are_checked_before_any_work(train_script, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="--validation_split 'test' is the evaluation split"):
        train_script.main(_argv(out, "--validation_split", "test"))
    with pytest.raises(ValueError, match="--posthoc_tau auto chooses tau on the validation"):
        train_script.main(_argv(out, "--posthoc_tau", "auto", "--validation_split", "none"))
    with pytest.raises(ValueError, match="--train_val_split must be a fraction"):
        train_script.main(_argv(out, "--train_val_split", "1.5"))
    with pytest.raises(ValueError, match="names another"):
        train_script.main(_argv(out, "--train_val_split", "0.1", "--validation_split", "heldout"))
    assert not out.exists()
    # Known only once the dataset is loaded, still before the model is built or anything written.
    with pytest.raises(ValueError, match=r"class 0 \('0'\) has 125 training images"):
        train_script.main(
            _argv(out, "--validation_split", "heldout", "--validation_per_class", "125")
        )
    with pytest.raises(
        ValueError, match="auto needs a validation split, and this dataset has none"
    ):
        train_script.main(_argv(out, "--posthoc_tau", "auto"))
    with pytest.raises(ValueError, match="is not a split of the dataset"):
        train_script.main(_argv(out, "--validation_split", "valid"))
    assert not (out / "longtail_run.json").exists()


def test_early_stopping_watches_the_validation_split(train_script, tmp_path):
    out = tmp_path / "stop"
    train_script.main(
        _argv(
            out, "--validation_split", "heldout", "--validation_per_class", "6",
            "--max_steps", "40", "--eval_strategy", "steps", "--eval_steps", "1",
            "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
            "--load_best_model_at_end", "true", "--metric_for_best_model", "balanced_accuracy",
            "--early_stopping_patience", "2",
        )
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] < 40  # stopped early
    evals = [h for h in state["log_history"] if "eval_balanced_accuracy" in h]
    assert all(h["eval_num_samples"] == 60 for h in evals)  # on the validation split
    best = max(h["eval_balanced_accuracy"] for h in evals)
    assert state["best_metric"] == best
    later = [h["eval_balanced_accuracy"] for h in evals if h["step"] > state["best_global_step"]]
    assert len(later) == 2 and max(later) <= best  # patience 2, then stop
    selection = json.loads((out / "longtail_run.json").read_text())["selection"]
    assert selection["early_stopping"] == {
        "patience": 2, "metric": "balanced_accuracy", "split": "validation",
    }  # fmt: skip
    assert selection["best_checkpoint"] == {"metric": "balanced_accuracy", "split": "validation"}
    with pytest.raises(ValueError, match="--early_stopping_patience needs --metric_for_best"):
        train_script.main(_argv(tmp_path / "x", "--early_stopping_patience", "2"))
