"""Sources of load_long_tailed: digits, split-file protocols, local folders, Hub offline; columns."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_longtail.data import (
    SplitFileError,
    class_counts,
    detect_columns,
    ensure_class_label,
    load_digits_dataset,
    load_long_tailed,
    load_split_file,
    long_tailed_counts,
    longtail_record,
)

# ---------------------------------------------------------------- digits


def test_digits_is_real_offline_and_stratified():
    from sklearn.datasets import load_digits

    raw = load_digits()
    dd = load_digits_dataset()
    assert list(dd) == ["train", "test"]
    assert len(dd["train"]) + len(dd["test"]) == 1797
    assert isinstance(dd["train"].features["image"], Image)
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    # Stratified 30%: each class sends round(0.3 * n_c) images to test.
    test_counts = np.bincount(np.asarray(dd["test"]["label"]), minlength=10)
    assert test_counts.tolist() == np.rint(0.3 * np.bincount(raw.target)).astype(int).tolist()
    # The pixels are the sklearn digits, scaled to 0..255 in three equal channels.
    row = dd["test"][0]
    img = np.asarray(row["image"])
    assert row["image"].mode == "RGB" and img.shape == (8, 8, 3)
    assert np.array_equal(img[..., 0], img[..., 2])
    matches = [
        i
        for i in np.flatnonzero(raw.target == row["label"])
        if np.array_equal(np.rint(raw.images[i] * 255 / 16).astype(np.uint8), img[..., 0])
    ]
    assert matches


def test_load_long_tailed_digits_default():
    dd = load_long_tailed("digits", imbalance_factor=10)
    record = longtail_record(dd)
    train_before = load_digits_dataset()["train"]
    available = np.bincount(np.asarray(train_before["label"]), minlength=10)
    expected = np.minimum(available, long_tailed_counts(int(available.max()), 10, 10)).tolist()
    assert class_counts(dd["train"]) == expected
    assert record["image_column"] == "image" and record["label_column"] == "label"
    assert record["eval_splits"] == ["test"] and record["split_seed"] == 0
    # Test split identical to the one of load_digits_dataset (same seed), whatever the LT seed.
    other = load_long_tailed("digits", imbalance_factor=10, seed=3)
    assert other["test"]["label"] == dd["test"]["label"] == load_digits_dataset()["test"]["label"]


# ---------------------------------------------------------------- split files


def _write_tree(root: Path, n_per_class=(6, 3, 1)) -> list[str]:
    lines = []
    for c, n in enumerate(n_per_class):
        d = root / "train" / f"class {c}"  # a space in the folder name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            mode = "L" if k % 2 else "RGB"
            PILImage.new(mode, (5, 4), color=40 * c if mode == "L" else (40 * c, 0, 0)).save(
                d / f"img_{k}.png"
            )
            lines.append(f"train/class {c}/img_{k}.png {c}")
    return lines


def _protocol_tree(tmp_path: Path) -> tuple[Path, Path]:
    images, splits = tmp_path / "imagenet", tmp_path / "splits"
    splits.mkdir()
    lines = _write_tree(images)
    (splits / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (splits / "ImageNet_LT_test.txt").write_text("\n".join(lines[::2]) + "\n")
    return images, splits


def test_split_file_lazy_dataset(tmp_path):
    images = tmp_path / "root"
    lines = _write_tree(images)
    f = tmp_path / "s.txt"
    f.write_text("# comment\n\n" + "\n".join(lines) + "\n")
    ds = load_split_file(f, images)
    assert len(ds) == 10 and ds.features["label"] == ClassLabel(names=["0", "1", "2"])
    # Paths are stored, not bytes: nothing copied.
    storage = ds.data.column("image").combine_chunks()
    assert storage.field("bytes").null_count == len(ds)
    assert storage.field("path")[0].as_py() == os.path.join(images, "train/class 0/img_0.png")
    assert ds[1]["image"].size == (5, 4)


def test_split_file_errors_have_line_numbers(tmp_path):
    images = tmp_path / "root"
    lines = _write_tree(images)
    bad = [
        lines[0],
        "onlyonefield",
        "train/class 0/img_1.png seven",
        "train/class 0/img_2.png 5",
        "train/class 0/img_3.png -1",
        "train/class 0/missing.png 0",
    ]
    f = tmp_path / "bad.txt"
    f.write_text("\n".join(bad) + "\n")
    with pytest.raises(SplitFileError) as info:
        load_split_file(f, images, num_classes=3)
    problems = dict(info.value.problems)
    assert sorted(problems) == [2, 3, 4, 5, 6]
    assert "expected '<path> <label>'" in problems[2]
    assert "'seven' is not an integer" in problems[3]
    assert "label 5 out of range [0, 3)" in problems[4]
    assert "label -1 out of range" in problems[5]
    assert "image file not found" in problems[6] and "missing.png" in problems[6]
    assert "line 6:" in str(info.value)
    # check_files=False skips only the existence check.
    f.write_text(lines[0] + "\ntrain/class 0/missing.png 0\n")
    assert len(load_split_file(f, images, check_files=False)) == 2
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_split_file(tmp_path / "nope.txt", images)


def test_protocol_by_name_and_by_folder_keeps_the_file_long_tail(tmp_path):
    images, splits = _protocol_tree(tmp_path)
    dd = load_long_tailed(
        "ImageNet-LT", imbalance_factor=100, image_root=images, split_dir=splits, num_classes=3
    )
    assert list(dd) == ["train", "test"]
    assert class_counts(dd["train"]) == [6, 3, 1]  # not subsampled again
    record = longtail_record(dd)
    assert record["profile"] == "protocol" and record["source"] == "ImageNet-LT"
    assert record["imbalance_factor"] == 6.0
    assert len(dd["test"]) == 5
    # Default num_classes is the protocol's (1000): labels bounded, ClassLabel of size 1000.
    dd2 = load_long_tailed(str(splits), image_root=images)
    assert dd2["train"].features["label"].num_classes == 1000
    assert class_counts(dd2["train"])[:4] == [6, 3, 1, 0]
    with pytest.raises(ValueError, match="image_root"):
        load_long_tailed("places-lt")
    (splits / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ImageNet_LT_val\.txt"):
        load_long_tailed("imagenet_lt", image_root=images, split_dir=splits)


# ---------------------------------------------------------------- local folders & Hub


def _toy(n_per_class=(20, 20, 20), label_feature=None, labels=None, mode="RGB") -> Dataset:
    rng = np.random.default_rng(0)
    ys = labels if labels is not None else np.repeat(np.arange(len(n_per_class)), n_per_class)
    imgs = [
        PILImage.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).convert(mode)
        for _ in ys
    ]
    feature = label_feature or ClassLabel(num_classes=len(n_per_class))
    return Dataset.from_dict(
        {"image": imgs, "label": list(ys)}, features=Features({"image": Image(), "label": feature})
    )


def test_local_parquet_folder_without_test_split_gets_stratified_test(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    _toy((40, 40, 40)).to_parquet(str(folder / "train.parquet"))
    dd = load_long_tailed(str(folder), imbalance_factor=4, test_size=0.25)
    test_counts = np.bincount(np.asarray(dd["test"]["label"]), minlength=3)
    assert test_counts.tolist() == [10, 10, 10]
    assert class_counts(dd["train"]) == long_tailed_counts(30, 3, 4)
    record = longtail_record(dd)
    assert record["eval_split_created"] is True and record["test_size"] == 0.25


def test_image_folder_and_save_to_disk_roundtrip(tmp_path):
    root = tmp_path / "imgs"
    for split, n in (("train", (8, 4)), ("test", (2, 2))):
        for c, k in zip(("ant", "bee"), n):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(k):
                PILImage.new("L", (7, 7), 10 * i).save(d / f"{i}.png")
    dd = load_long_tailed(str(root), imbalance_factor=2)
    assert dd["train"].features["label"].names == ["ant", "bee"]
    assert class_counts(dd["train"]) == [8, 4]
    assert len(dd["test"]) == 4
    dd.save_to_disk(str(tmp_path / "saved"))
    again = load_long_tailed(str(tmp_path / "saved"), imbalance_factor=2)
    assert class_counts(again["train"]) == [8, 4]
    assert longtail_record(again)["imbalance_factor"] == 2.0
    with pytest.raises(ValueError, match="already long-tailed"):
        load_long_tailed(str(tmp_path / "saved"), imbalance_factor=8)
    as_is = load_long_tailed(str(tmp_path / "saved"), imbalance_factor=None)
    assert class_counts(as_is["train"]) == [8, 4]
    assert longtail_record(as_is)["imbalance_factor"] == 2.0  # provenance kept


def test_unlabelled_test_split_is_dropped_and_replaced(tmp_path):
    # ImageNet-1k style: the published test split has label -1 everywhere.
    train = _toy((30, 30))
    test = _toy((2, 2)).cast_column("label", Value("int64"))
    test = test.map(lambda row: {"label": -1}).cast_column("label", ClassLabel(num_classes=2))
    partly = _toy((2, 2))
    path = tmp_path / "unlabelled"
    DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    dd = load_long_tailed(str(path), imbalance_factor=1)
    assert list(dd) == ["train", "test"] and longtail_record(dd)["eval_split_created"] is True
    assert np.bincount(np.asarray(dd["test"]["label"])).tolist() == [6, 6]
    # Partly unlabelled: an error naming the split, row and value.
    rows = np.asarray(partly["label"])
    rows[1] = -1
    bad = partly.cast_column("label", Value("int64")).map(
        lambda row, i: {"label": int(rows[i])}, with_indices=True
    )
    bad = bad.cast_column("label", ClassLabel(num_classes=2))
    DatasetDict({"train": train, "validation": bad}).save_to_disk(str(tmp_path / "partly"))
    with pytest.raises(ValueError, match=r"split 'validation' has negative label -1 at row 1"):
        load_long_tailed(str(tmp_path / "partly"), imbalance_factor=1)


def test_hub_id_offline_message():
    # conftest sets HF_DATASETS_OFFLINE=1: no network call is attempted.
    with pytest.raises(ConnectionError, match=r"offline mode is on.*local path.*'digits'"):
        load_long_tailed("uoft-cs/cifar10")


def test_missing_local_path_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="local path does not exist"):
        load_long_tailed(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown profile"):
        load_long_tailed("digits", profile="zipf")
    with pytest.raises(ValueError, match=">= 1"):
        load_long_tailed("digits", imbalance_factor=0.5)
    with pytest.raises(ValueError, match="train_split"):
        load_long_tailed("digits", train_split="training")


# ---------------------------------------------------------------- columns


def test_two_classlabels_is_ambiguous_and_override_works(tmp_path):
    ds = _toy((4, 4))
    ds = ds.add_column("coarse_label", [0] * 8).cast_column(
        "coarse_label", ClassLabel(num_classes=1)
    )
    ds = ds.rename_column("label", "fine_label")
    with pytest.raises(ValueError, match=r"\['fine_label', 'coarse_label'\].*label_column="):
        detect_columns(ds)
    assert detect_columns(ds, label_column="fine_label") == ("image", "fine_label")
    path = tmp_path / "c100"
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="ambiguous label column"):
        load_long_tailed(str(path), imbalance_factor=1)
    dd = load_long_tailed(str(path), imbalance_factor=1, label_column="fine_label")
    assert class_counts(dd["train"]) == [4, 4]


def test_integer_and_string_labels_are_converted_jointly():
    ints = DatasetDict(
        {
            "train": Dataset.from_dict({"label": [0, 1, 1, 3]}),
            "test": Dataset.from_dict({"label": [4, 0]}),
        }
    )
    out = ensure_class_label(ints, "label")
    assert out["train"].features["label"] == ClassLabel(names=["0", "1", "2", "3", "4"])
    assert out["test"]["label"] == [4, 0]
    strs = DatasetDict(
        {
            "train": Dataset.from_dict({"label": ["dog", "cat", "dog"]}),
            "test": Dataset.from_dict({"label": ["emu", "cat"]}),
        }
    )
    out = ensure_class_label(strs, "label")
    assert out["train"].features["label"].names == ["cat", "dog", "emu"]
    assert out["train"]["label"] == [1, 0, 1] and out["test"]["label"] == [2, 0]


def test_label_errors_name_row_and_value():
    neg = Dataset.from_dict({"label": [0, 2, -1, 1]})
    with pytest.raises(ValueError, match=r"negative label -1 at row 2"):
        ensure_class_label(neg, "label")
    cl = Dataset.from_dict(
        {"label": [0, -1]}, features=Features({"label": ClassLabel(num_classes=2)})
    )
    with pytest.raises(ValueError, match=r"negative label -1 at row 1"):
        ensure_class_label(cl, "label")
    nulls = Dataset.from_dict({"label": [1, None, 0]}, features=Features({"label": Value("int64")}))
    with pytest.raises(ValueError, match=r"null\) labels, the first at row 1"):
        ensure_class_label(nulls, "label")
    floats = Dataset.from_dict({"image": ["a.png"], "label": [0.5]})
    with pytest.raises(ValueError, match="ClassLabel, an integer or a string"):
        detect_columns(floats, image_column="image", label_column="label")


def test_column_detection_errors():
    no_image = Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(ValueError, match=r"no column has a datasets\.Image feature.*image_column="):
        detect_columns(no_image)
    two = _toy((2,)).add_column("image2", [None, None]).cast_column("image2", Image())
    with pytest.raises(ValueError, match=r"several image columns \['image', 'image2'\]"):
        detect_columns(two)
    assert detect_columns(two, image_column="image2") == ("image2", "label")
    with pytest.raises(ValueError, match=r"image_column='img' is not a column"):
        detect_columns(two, image_column="img")
    with pytest.raises(ValueError, match=r"label_column='y' is not a column"):
        detect_columns(two, image_column="image", label_column="y")
    unnamed = Dataset.from_dict(
        {"image": ["a.png"], "score": [3], "id": [7]},
        features=Features({"image": Image(), "score": Value("int64"), "id": Value("int64")}),
    )
    with pytest.raises(ValueError, match=r"no label column found.*\['score', 'id'\]"):
        detect_columns(unnamed)
    # A plain integer column named like a label is taken (and converted later).
    named = unnamed.rename_column("score", "target")
    assert detect_columns(named) == ("image", "target")


def test_path_column_becomes_lazy_image(tmp_path):
    for i in range(3):
        PILImage.new("RGBA", (3, 3), (255, 0, 0, 0)).save(tmp_path / f"{i}.png")
    ds = Dataset.from_dict(
        {"file": [str(tmp_path / f"{i}.png") for i in range(3)], "label": [0, 1, 1]}
    )
    folder = tmp_path / "local"
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(folder))
    dd = load_long_tailed(str(folder), imbalance_factor=1, image_column="file")
    assert isinstance(dd["train"].features["file"], Image)
    assert dd["train"].features["label"] == ClassLabel(names=["0", "1"])
    assert dd["test"][0]["file"].size == (3, 3)


def test_cifar100_hub_layout_synthetic(tmp_path):
    # The Hub's CIFAR-100 has 'img', 'fine_label' (100) and 'coarse_label' (20).
    fine = np.repeat(np.arange(100), 500)
    train = Dataset.from_dict(
        {"img": [None] * len(fine), "fine_label": fine, "coarse_label": fine // 5},
        features=Features(
            {
                "img": Image(),
                "fine_label": ClassLabel(num_classes=100),
                "coarse_label": ClassLabel(num_classes=20),
            }
        ),
    )
    path = tmp_path / "c100"
    DatasetDict({"train": train, "test": train.select(range(100))}).save_to_disk(str(path))
    dd = load_long_tailed(str(path), imbalance_factor=100, label_column="fine_label")
    assert len(dd["train"]) == 10847
    assert len(dd["test"]) == 100


def test_datasets_version_records_description_roundtrip(tmp_path):
    # Guard for the storage choice: DatasetInfo.description must round-trip in this datasets.
    ds = Dataset.from_dict({"x": [1]})
    ds.info.description = "hf_longtail: {}"
    ds.save_to_disk(str(tmp_path / "d"))
    assert datasets.load_from_disk(str(tmp_path / "d")).info.description == "hf_longtail: {}"
