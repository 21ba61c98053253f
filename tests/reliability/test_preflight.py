"""Missing images, missing files and paths relative to a CSV are found before training, in the
training *and* the evaluation split, naming the split and the row (``scripts/train.py`` and
``hf_longtail.data.preflight``); ``--on_bad_image skip`` drops them there.

Each test builds a real dataset on disk (a CSV of PNG paths, a ``save_to_disk`` dataset) and
runs ``scripts/train.py`` on it as a user would; before the pre-flight check these runs crashed
mid-training, or at the final evaluation after the whole training.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _reliability_helpers import TINY_RUN, image_arrays
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from hf_longtail.data import BadImageError, check_images

COUNTS = (20, 20, 20, 20)  # balanced source, made long-tailed (IF 4) by the run


def _flags(dataset: str, out) -> list[str]:
    flags = list(TINY_RUN)
    for name in ("--dataset_name", "--imbalance_factor", "--many_shot_threshold"):
        i = flags.index(name)
        del flags[i : i + 2]
    return [
        *flags, "--dataset_name", dataset, "--imbalance_factor", "4", "--many_shot_threshold",
        "60", "--output_dir", str(out), "--save_strategy", "no",
    ]  # fmt: skip


def _csv_dataset(root, missing_rows=(), empty_rows=()):
    """``root/labels.csv`` (``file,label``) with paths relative to ``root``; PNGs in
    ``root/images``. ``missing_rows`` point at files that do not exist, ``empty_rows`` are
    empty cells (read as None)."""
    images, labels = image_arrays(COUNTS, size=16, seed=2)
    (root / "images").mkdir(parents=True)
    lines = ["file,label"]
    for i, (array, label) in enumerate(zip(images, labels)):
        name = f"images/{i:03d}.png"
        if i in empty_rows:
            name = ""
        elif i in missing_rows:
            name = f"images/gone_{i:03d}.png"
        else:
            PILImage.fromarray(array).save(root / name)
        lines.append(f"{name},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return str(root / "labels.csv")


def test_csv_paths_are_relative_to_the_csv_folder(train, tmp_path, monkeypatch):
    csv = _csv_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # not the CSV's folder: the paths must not depend on it
    out = tmp_path / "run"
    train.main([*_flags(csv, out), "--image_column_name", "file", "--label_column_name", "label"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] > 0 and results["test_accuracy"] is not None


def test_missing_files_and_empty_cells_stop_the_run_before_training(train, tmp_path):
    csv = _csv_dataset(tmp_path / "data", missing_rows=(5, 40), empty_rows=(17,))
    out = tmp_path / "run"
    flags = [*_flags(csv, out), "--image_column_name", "file", "--label_column_name", "label"]
    flags += ["--imbalance_factor", "1"]  # every source row is trained or evaluated on
    with pytest.raises(BadImageError) as err:
        train.main(flags)
    message = str(err.value)
    assert "3 unusable image(s) found before training" in message
    assert message.count("file not found: ") == 2 and "gone_005.png" in message
    assert "gone_040.png" in message and "missing image (None)" in message
    assert "split 'train' row" in message or "split 'test' row" in message
    assert "--on_bad_image skip" in message
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_skip_drops_the_bad_rows_before_training(train, tmp_path, caplog):
    csv = _csv_dataset(tmp_path / "data", missing_rows=(5, 40), empty_rows=(17,))
    out = tmp_path / "run"
    flags = [*_flags(csv, out), "--image_column_name", "file", "--label_column_name", "label"]
    flags += ["--imbalance_factor", "1"]  # every source row is trained or evaluated on
    with caplog.at_level(logging.WARNING, logger="hf_longtail.data.preflight"):
        train.main([*flags, "--on_bad_image", "skip"])
    assert "Dropping 3 unusable image row(s) before training" in caplog.text
    run = json.loads((out / "longtail_run.json").read_text())
    data = run["dataset"]
    assert sum(data["class_counts"]) == data["train_size"]  # counts of what is trained on
    assert data["train_size"] + data["eval_size"] == sum(COUNTS) - 3


def _saved_dataset(root, eval_none_row: int, garbage_row: int | None = None):
    """A ``save_to_disk`` DatasetDict (train + test, embedded PNGs); the test split's
    ``eval_none_row`` has no image, and ``garbage_row`` (train) holds bytes that are no image."""
    images, labels = image_arrays(COUNTS, size=16, seed=3)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(COUNTS))})
    pil = [PILImage.fromarray(a) for a in images]
    splits = {"train": (pil[:60], labels[:60]), "test": (pil[60:], labels[60:])}
    data = {}
    for name, (imgs, labs) in splits.items():
        values = list(imgs)
        if name == "test":
            values[eval_none_row] = None
        ds = Dataset.from_dict({"image": values, "label": labs}, features=features)
        if name == "train" and garbage_row is not None:
            ds = ds.cast_column("image", Image(decode=False))
            rows = ds.to_list()
            rows[garbage_row]["image"] = {
                "bytes": np.random.default_rng(0).bytes(200),
                "path": None,
            }
            ds = Dataset.from_list(rows, features=ds.features).cast_column("image", Image())
        data[name] = ds
    DatasetDict(data).save_to_disk(root)
    return str(root)


def test_a_missing_evaluation_image_is_found_before_training(train, tmp_path):
    """It used to crash the final evaluation, after the whole training."""
    source = _saved_dataset(tmp_path / "data", eval_none_row=7)
    out = tmp_path / "run"
    with pytest.raises(BadImageError, match=r"split 'test' row 7: missing image \(None\)"):
        train.main([*_flags(source, out), "--imbalance_factor", "1"])
    assert not (out / "trainer_state.json").exists()
    train.main([*_flags(source, out), "--imbalance_factor", "1", "--on_bad_image", "skip"])
    assert json.loads((out / "longtail_run.json").read_text())["dataset"]["eval_size"] == 19


def test_check_images_opens_headers_of_a_sample_only(tmp_path):
    """The header check is sampled (cheap on large datasets): with ``sample=None`` the garbage
    row is always found; with a sample that misses it, only the cheap checks run on it."""
    source = _saved_dataset(tmp_path / "data", eval_none_row=0, garbage_row=11)
    train_split = DatasetDict.load_from_disk(source)["train"]
    found = check_images(train_split, sample=None)
    assert [row for row, _ in found] == [11] and "cannot open embedded image" in found[0][1]
    assert check_images(train_split, sample=0) == []  # existence checks only: nothing missing
    sampled = check_images(train_split, sample=10, seed=0)
    assert sampled in ([], found)  # found if and only if row 11 is in the sample
    # A long-tailed selection of the split (rows re-indexed): the row is named in its order.
    subset = train_split.select([11, 3, 4])
    assert [row for row, _ in check_images(subset, sample=None)] == [0]
