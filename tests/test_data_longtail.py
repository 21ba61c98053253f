"""Long-tailed builder: published counts, profiles, determinism, records, untouched test split."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_longtail.data import (
    class_counts,
    long_tailed_counts,
    long_tailed_indices,
    longtail_record,
    make_long_tailed,
    stratified_split_indices,
)

# Published training-set sizes (Cao et al. 2019, LDAM-DRW; Cui et al. 2019).
CIFAR10_LT = {100: 12406, 50: 13996, 10: 20431}
CIFAR100_LT = {100: 10847, 50: 12608, 10: 19573}


def _label_dataset(labels, num_classes: int, extra: bool = False) -> Dataset:
    data = {"label": np.asarray(labels, dtype=np.int64)}
    features = {"label": ClassLabel(num_classes=num_classes)}
    if extra:
        data["row"] = np.arange(len(labels), dtype=np.int64)
        features["row"] = Value("int64")
    return Dataset.from_dict(data, features=Features(features))


# ---------------------------------------------------------------- profiles


@pytest.mark.parametrize("imbalance_factor", [100, 50, 10])
def test_cifar100_lt_sizes_on_synthetic_label_column(imbalance_factor):
    # CIFAR-100 train: 100 classes x 500 images; only the label column matters.
    ds = _label_dataset(np.repeat(np.arange(100), 500), 100)
    lt = make_long_tailed(ds, imbalance_factor)
    assert len(lt) == CIFAR100_LT[imbalance_factor]
    assert sum(long_tailed_counts(500, 100, imbalance_factor)) == CIFAR100_LT[imbalance_factor]
    assert class_counts(lt) == long_tailed_counts(500, 100, imbalance_factor)


@pytest.mark.cifar10
@pytest.mark.parametrize("imbalance_factor", [100, 50, 10])
def test_cifar10_lt_sizes_on_real_data(cifar10_dir, imbalance_factor):
    ds = datasets.load_dataset(str(cifar10_dir), split="train")
    lt = make_long_tailed(ds, imbalance_factor)
    assert len(lt) == CIFAR10_LT[imbalance_factor]
    counts = class_counts(lt)
    # Recount from the label column independently of the record.
    labels = np.asarray(lt.data.column("label").take(lt._indices.column(0)).to_numpy())
    assert counts == np.bincount(labels, minlength=10).tolist()
    assert counts[0] == 5000 and counts[-1] == 5000 // imbalance_factor


def test_exp_profile_matches_reference_formula():
    for n_max, c, imb in [(5000, 10, 100), (500, 100, 50), (1280, 1000, 256), (7, 3, 2.5)]:
        ref = [int(n_max * (1 / imb) ** (i / (c - 1))) for i in range(c)]
        assert long_tailed_counts(n_max, c, imb) == ref


def test_step_profile():
    assert long_tailed_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    # Odd C: the extra class is a head class.
    assert long_tailed_counts(500, 3, 10, "step") == [500, 500, 50]


def test_pareto_profile_endpoints_shape_and_exp_limit():
    counts = long_tailed_counts(1280, 1000, 256, "pareto")
    assert counts[0] == 1280 and counts[-1] == 5
    assert all(np.diff(counts) <= 0)
    # Reference: Lomax survival over the normalised rank.
    b = 256 ** (1 / 6) - 1
    assert counts[500] == int(1280 * (1 + b * 500 / 999) ** -6 * (1 + 1e-12))
    # Pareto is more head-heavy than exp at the same IF: fewer images at mid-rank.
    assert counts[500] < long_tailed_counts(1280, 1000, 256, "exp")[500]
    # alpha -> inf tends to exp.
    big = long_tailed_counts(1280, 1000, 256, "pareto", pareto_alpha=1e7)
    exp = long_tailed_counts(1280, 1000, 256, "exp")
    assert max(abs(x - y) for x, y in zip(big, exp)) <= 1


@pytest.mark.parametrize("profile", ["exp", "step", "pareto"])
def test_imbalance_factor_one_is_balanced(profile):
    assert long_tailed_counts(300, 7, 1, profile) == [300] * 7


def test_imbalance_factor_validation():
    with pytest.raises(ValueError, match=r"pass imbalance_factor=100"):
        long_tailed_counts(5000, 10, 0.01)
    with pytest.raises(ValueError, match=">= 1"):
        long_tailed_counts(5000, 10, 0)
    with pytest.raises(TypeError, match="must be a number"):
        long_tailed_counts(5000, 10, "100")
    with pytest.raises(TypeError, match="must be a number"):
        long_tailed_counts(5000, 10, True)
    with pytest.raises(ValueError, match="finite"):
        long_tailed_counts(5000, 10, math.inf)
    with pytest.raises(ValueError, match="unknown profile"):
        long_tailed_counts(5000, 10, 10, "linear")
    with pytest.raises(ValueError, match="num_classes"):
        long_tailed_counts(5000, 0, 10)


def test_zero_image_class_is_an_error_naming_the_class():
    with pytest.raises(ValueError, match=r"class index 8 zero images.*imbalance_factor <= 50"):
        long_tailed_counts(50, 10, 100)
    ds = _label_dataset(np.repeat(np.arange(3), 4), 3)
    ds = ds.cast_column("label", ClassLabel(names=["cat", "dog", "emu"]))
    with pytest.raises(ValueError, match=r"class index 2 is 'emu'"):
        make_long_tailed(ds, 10)


# ---------------------------------------------------------------- selection


def test_selection_keeps_the_smallest_keys_per_class_reference():
    rng = np.random.default_rng(123)
    labels = rng.integers(0, 5, size=400)
    counts = [20, 10, 7, 3, 1]
    got = long_tailed_indices(labels, counts, seed=7)
    # Independent reference: per class, rows sorted by the seeded key, first n_c kept.
    keys = np.random.Generator(np.random.PCG64(7)).random(len(labels))
    ref = []
    for c, n in enumerate(counts):
        rows = np.flatnonzero(labels == c)
        ref.extend(rows[np.argsort(keys[rows], kind="stable")[:n]].tolist())
    assert got.tolist() == sorted(ref)
    assert np.all(np.diff(got) > 0)


def test_subsets_are_nested_across_imbalance_factors():
    labels = np.repeat(np.arange(10), 500)
    ds = _label_dataset(labels, 10, extra=True)
    rows = {}
    for imb in (10, 50, 100):
        lt = make_long_tailed(ds, imb, seed=3)
        rows[imb] = set(lt["row"])
    assert rows[100] <= rows[50] <= rows[10]


def test_determinism_same_seed_and_different_seed():
    labels = np.repeat(np.arange(10), 200)
    a = long_tailed_indices(labels, long_tailed_counts(200, 10, 20), seed=0)
    b = long_tailed_indices(labels, long_tailed_counts(200, 10, 20), seed=0)
    c = long_tailed_indices(labels, long_tailed_counts(200, 10, 20), seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# Digest of CIFAR-100-LT (IF=100, seed 0) indices over the label column repeat(arange(100), 500).
# Pinned: a change means every user's long-tailed subset changed.
_GOLDEN_SHA256 = "c481407a9ecb13f2826c67e2c7a34a6f383f810be7be18dd8a3cb35f601a12a6"
_DIGEST_SNIPPET = (
    "import hashlib, numpy as np\n"
    "from hf_longtail.data import long_tailed_indices, long_tailed_counts\n"
    "labels = np.repeat(np.arange(100), 500)\n"
    "idx = long_tailed_indices(labels, long_tailed_counts(500, 100, 100), seed=0)\n"
    "print(hashlib.sha256(idx.astype('<i8').tobytes()).hexdigest())\n"
)


def test_indices_identical_across_processes_and_pinned():
    labels = np.repeat(np.arange(100), 500)
    idx = long_tailed_indices(labels, long_tailed_counts(500, 100, 100), seed=0)
    here = hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST_SNIPPET],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=120,
    )
    assert out.stdout.strip() == here == _GOLDEN_SHA256


@pytest.mark.cifar10
def test_cifar10_rows_are_source_rows_and_test_split_untouched(cifar10_dir):
    from hf_longtail.data import load_long_tailed

    source = datasets.load_dataset(str(cifar10_dir))
    dd = load_long_tailed(str(cifar10_dir), imbalance_factor=100)
    train, test = dd["train"], dd["test"]
    assert list(dd) == ["train", "test"]
    # Test split: same rows, same bytes, same features, nothing selected.
    assert len(test) == 10000 and test.features == source["test"].features
    assert test.data.column("label").equals(source["test"].data.column("label"))
    assert test.data.column("img").equals(source["test"].data.column("img"))
    assert getattr(test, "_indices", None) is None
    # Train: every kept row is a source row of the same class (bytes compared, no decoding).
    idx = train._indices.column(0).to_numpy()
    src_labels = source["train"].data.column("label").to_numpy()
    assert np.array_equal(train.data.column("label").to_numpy()[idx], src_labels[idx])
    raw = source["train"].data.column("img")
    for j in (0, 5000, len(train) - 1):
        assert train.with_format("arrow")[j]["img"][0] == raw[int(idx[j])]
    # A couple of decoded images only.
    assert train[len(train) - 1]["img"].size == (32, 32)
    assert train[len(train) - 1]["label"] == 9


# ---------------------------------------------------------------- records


def test_record_survives_save_to_disk_and_class_counts_agrees(tmp_path):
    ds = _label_dataset(np.repeat(np.arange(10), 100), 10)
    ds.info.description = "original description"
    lt = make_long_tailed(ds, 10, seed=5, source="toy")
    expected = long_tailed_counts(100, 10, 10)
    lt.save_to_disk(str(tmp_path / "lt"))
    back = datasets.load_from_disk(str(tmp_path / "lt"))
    record = longtail_record(back)
    assert record is not None
    assert record["class_counts"] == expected
    assert (record["profile"], record["imbalance_factor"], record["seed"]) == ("exp", 10.0, 5)
    assert record["source"] == "toy" and record["label_column"] == "label"
    assert "original description" in back.info.description
    assert class_counts(back) == expected
    # The description carries one parseable JSON line.
    lines = [x for x in back.info.description.splitlines() if x.startswith("hf_longtail: ")]
    assert len(lines) == 1 and json.loads(lines[0][len("hf_longtail: ") :]) == record
    # The source's info is not modified.
    assert ds.info.description == "original description"


def test_class_counts_recounts_when_record_is_stale():
    ds = _label_dataset(np.repeat(np.arange(4), 50), 4)
    lt = make_long_tailed(ds, 10)
    assert class_counts(lt) == [50, 23, 10, 5]
    sub = lt.select(range(60))  # record no longer matches the rows
    assert class_counts(sub) == [50, 10, 0, 0]
    plain = _label_dataset([0, 2, 2, 3], 5)
    assert class_counts(plain) == [1, 0, 2, 1, 0]  # ClassLabel size, not max + 1


def test_shortfall_cap_and_raise():
    labels = np.concatenate([np.zeros(40), np.ones(100), np.full(30, 2)]).astype(int)
    ds = _label_dataset(labels, 3)
    # n_max = 100; exp IF=4 asks [100, 50, 25]: class 0 has only 40.
    lt = make_long_tailed(ds, 4)
    assert class_counts(lt) == [40, 50, 25]
    assert longtail_record(lt)["requested_counts"] == [100, 50, 25]
    with pytest.raises(ValueError, match=r"0 \('0'\): 40 < 100"):
        make_long_tailed(ds, 4, on_shortfall="raise")


def test_make_long_tailed_input_errors():
    ds = _label_dataset(np.repeat(np.arange(3), 10), 4)  # class 3 has no image
    with pytest.raises(ValueError, match=r"class 3 \('3'\) has no image"):
        make_long_tailed(ds, 2)
    ok = _label_dataset(np.repeat(np.arange(3), 10), 3)
    with pytest.raises(ValueError, match="seed"):
        make_long_tailed(ok, 2, seed=-1)
    with pytest.raises(ValueError, match="on_shortfall"):
        make_long_tailed(ok, 2, on_shortfall="ignore")
    with pytest.raises(TypeError, match=r"pass dataset\['train'\]"):
        make_long_tailed(datasets.DatasetDict({"train": ok}), 2)


def test_integer_labels_are_converted_then_subsampled():
    ds = Dataset.from_dict({"target": np.repeat(np.arange(3), 20)})
    lt = make_long_tailed(ds, 4)
    assert lt.features["target"] == ClassLabel(names=["0", "1", "2"])
    assert class_counts(lt) == [20, 10, 5]


def test_stratified_split_indices():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    train, test = stratified_split_indices(labels, 0.3, seed=0)
    assert np.bincount(labels[test], minlength=4).tolist() == [3, 6, 1, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    again = stratified_split_indices(labels, 0.3, seed=0)
    assert np.array_equal(again[1], test)
    with pytest.raises(ValueError, match="test_size"):
        stratified_split_indices(labels, 1.5)
