"""Missing images, missing files and paths relative to a CSV are found before training, in the
training *and* the evaluation split, naming the split and the row (``scripts/train.py`` and
``hf_longtail.data.preflight``); ``--on_bad_image skip`` drops them there.

Each test builds a real dataset on disk (a CSV of PNG paths, a ``save_to_disk`` dataset) and
runs ``scripts/train.py`` on it as a user would; before the pre-flight check these runs crashed
mid-training, or at the final evaluation after the whole training.
"""

from __future__ import annotations

import io
import json
import logging
import re

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
    # Each named by its row in the CSV's split, wherever the stratified test carve put it.
    assert all(f"source row {row}: " in message for row in (5, 17, 40))
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
    with pytest.raises(BadImageError, match=r"split 'test', source row 7: missing image \(None\)"):
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


# ------------------------------------------------- rows of the source split, truncated images
BAD_ROW = 17  # the source row the user can open: datasets.load_dataset(...)["train"][17]


def _png(array) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _half(data: bytes) -> bytes:
    """A file cut in half (an interrupted copy or download): its header is intact."""
    return data[: len(data) // 2]


def _parquet_source(path, bad: dict[int, bytes | None]):
    """One parquet file (a training split only, so a test split is carved from it) of 8x8 PNGs:
    rows 0-129 class 0, 130-259 class 1 (head 104 after the carve, enough for IF 100); the rows
    in ``bad`` hold those bytes instead (``None``: no image)."""
    rng = np.random.default_rng(4)
    labels = [0] * 130 + [1] * 130
    values = []
    for row, label in enumerate(labels):
        array = np.clip(rng.normal(80 + 90 * label, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
        data = bad.get(row, _png(array))
        values.append(None if data is None else {"bytes": data, "path": None})
    features = Features({"image": Image(), "label": ClassLabel(names=["dark", "light"])})
    Dataset.from_dict({"image": values, "label": labels}, features=features).to_parquet(path)
    return str(path)


def _parquet_flags(source: str, out, *extra: str) -> list[str]:
    return [
        "--dataset_name", source, "--model_name_or_path", "resnet20_cifar",
        "--train_transform", "cifar10", "--image_size", "8", "--max_steps", "1",
        "--per_device_train_batch_size", "256", "--per_device_eval_batch_size", "256",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("imbalance", [[], ["--imbalance_factor", "none"]], ids=["IF100", "none"])
def test_a_missing_image_is_named_by_its_source_row(train, tmp_path, imbalance):
    """It used to be named by its row in the long-tailed subset (or, with IF none, in what the
    test carve left), a row that shows a good image when the user opens the source."""
    source = _parquet_source(tmp_path / "data.parquet", {BAD_ROW: None})
    with pytest.raises(BadImageError) as err:
        train.main(_parquet_flags(source, tmp_path / "run", *imbalance))
    message = str(err.value)
    assert re.findall(r"source row (\d+)", message) == [str(BAD_ROW)], message
    assert f"source row {BAD_ROW}: missing image (None)" in message
    assert "before any subsampling" in message and "--on_bad_image skip" in message


@pytest.mark.parametrize("pixel_cache", ["auto", "off"])
def test_an_image_met_while_reading_batches_is_named_by_its_source_row(
    train, tmp_path, pixel_cache
):
    """A truncated PNG among the training images opens (its header is intact), so it is met
    while reading: by the pixel-cache build ("auto") or in its batch ("off"). Both errors name
    the row of the source split, found from the bytes (a batch transform sees no row numbers)."""
    rng = np.random.default_rng(5)
    truncated = _half(_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    source = _parquet_source(tmp_path / "data.parquet", {BAD_ROW: truncated})
    flags = _parquet_flags(source, tmp_path / "run", "--imbalance_factor", "none")
    with pytest.raises(BadImageError) as err:
        train.main([*flags, "--pixel_cache", pixel_cache, "--preflight_sample", "0"])
    message = str(err.value)
    assert f"row {BAD_ROW} of the source's 'train' split" in message, message
    assert re.findall(r"row (\d+)", message) == [str(BAD_ROW)], message
    assert "on_bad_image='skip'" in message
    # find_bad_images on the long-tailed training split says the same.
    from hf_longtail.data import find_bad_images, load_long_tailed

    subset = load_long_tailed(source, imbalance_factor=None)["train"]
    (row, error), *others = find_bad_images(subset)
    assert not others and row != BAD_ROW  # its row in the subset ...
    assert f"(row {BAD_ROW} of the source's 'train' split)" in error  # ... and in the source


def _saved_with_truncated_test_images(root):
    """A ``save_to_disk`` DatasetDict (train + test, embedded images); test rows 3 and 7 are a
    JPEG (64 px, so that its first half holds the whole header) and a PNG cut in half."""
    images, labels = image_arrays(COUNTS, size=16, seed=6)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(COUNTS))})
    blobs = [_png(a) for a in images]
    test = blobs[60:]
    noisy = np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    test[3], test[7] = _half(_jpeg(noisy)), _half(_png(images[67]))
    for data in (test[3], test[7]):
        with PILImage.open(io.BytesIO(data)) as image:  # the header check passes them
            assert image.size in ((64, 64), (16, 16))
    DatasetDict(
        {
            "train": Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b in blobs[:60]], "label": labels[:60]},
                features=features,
            ),
            "test": Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b in test], "label": labels[60:]},
                features=features,
            ),
        }
    ).save_to_disk(root)
    return str(root)


def test_a_truncated_evaluation_image_stops_the_run_before_training(train, tmp_path):
    """Truncated images in the evaluation split used to be met by the final evaluation, after
    the whole training. The pre-flight check decodes every evaluation image (about 1 s for
    CIFAR-10's 10k test images on one core, docs/reliability.md)."""
    source = _saved_with_truncated_test_images(tmp_path / "data")
    out = tmp_path / "run"
    flags = [*_flags(source, out), "--imbalance_factor", "1"]
    with pytest.raises(BadImageError) as err:
        train.main(flags)
    message = str(err.value)
    assert "2 unusable image(s) found before training" in message
    assert "split 'test', source row 3: cannot decode embedded image: OSError" in message
    assert "split 'test', source row 7: cannot decode embedded image: OSError" in message
    assert "--on_bad_image skip" in message
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))
    # --on_bad_image skip drops them before training; the record and the card say so.
    train.main([*flags, "--on_bad_image", "skip"])
    data = json.loads((out / "longtail_run.json").read_text())["dataset"]
    assert data["eval_size"] == 18 and data["unreadable_dropped"] == {"test": 2}
    assert json.loads((out / "all_results.json").read_text())["test_num_samples"] == 18
    card = (out / "README.md").read_text()
    assert "2 unreadable images of `test` left out (`--on_bad_image skip`)" in card
