"""Corrupt or truncated image files met while reading batches (``on_bad_image``).

A small JPEG dataset on disk with one truncated file and one that is not an image at all, read
through a real ``DataLoader`` (single process and worker processes) and through the Trainer.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _reliability_helpers import eval_transform, image_arrays, tiny_vit, training_args
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from hf_longtail import LongTailTrainer
from hf_longtail.data import (
    BadImageError,
    bad_image_count,
    collate_fn,
    find_bad_images,
    with_transforms,
)
from hf_longtail.losses import LongTailLossConfig

COUNTS = (6, 4, 2)
TRUNCATED, GARBAGE = 3, 8  # rows of the two bad files


def _jpeg_dataset(root):
    """12 JPEG files (8x8, labels by class), file 3 truncated to half, file 8 random bytes."""
    images, labels = image_arrays(COUNTS, size=8, seed=1)
    root.mkdir()
    paths = []
    for i, array in enumerate(images):
        path = root / f"{i:02d}.jpg"
        PILImage.fromarray(array).save(path, quality=95)
        paths.append(str(path))
    data = (root / f"{TRUNCATED:02d}.jpg").read_bytes()
    (root / f"{TRUNCATED:02d}.jpg").write_bytes(data[: len(data) // 2])
    (root / f"{GARBAGE:02d}.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(COUNTS))})
    return Dataset.from_dict({"image": paths, "label": labels}, features=features), paths


def _loader(dataset, **kwargs):
    return torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn, **kwargs)


def test_raise_names_the_truncated_file(tmp_path):
    dataset, paths = _jpeg_dataset(tmp_path / "jpg")
    loader = _loader(with_transforms(dataset, eval_transform(), on_bad_image="raise"))
    with pytest.raises(BadImageError) as err:
        list(loader)
    message = str(err.value)
    assert repr(paths[TRUNCATED]) in message  # the first bad file met, in batch 0
    assert "on_bad_image='skip'" in message and "find_bad_images" in message


def test_raise_from_worker_processes_does_not_hang(tmp_path):
    dataset, _paths = _jpeg_dataset(tmp_path / "jpg")
    loader = _loader(
        with_transforms(dataset, eval_transform(), on_bad_image="raise"),
        num_workers=2,
        timeout=120,  # a worker that died silently would raise here instead of hanging
    )
    with pytest.raises(BadImageError, match=r"cannot decode image file '.*\.jpg'"):
        list(loader)


def test_skip_drops_and_counts_exactly_the_bad_rows(tmp_path):
    dataset, paths = _jpeg_dataset(tmp_path / "jpg")
    transformed = with_transforms(dataset, eval_transform(), on_bad_image="skip")
    batches = list(_loader(transformed))
    # Batches of rows 0-3 (3 is truncated), 4-7, 8-11 (8 is not an image).
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 4, 3]
    assert bad_image_count(transformed) == 2
    good = [i for i in range(len(dataset)) if i not in (TRUNCATED, GARBAGE)]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == [dataset["label"][i] for i in good]
    # The surviving pixels are those of the same files decoded directly.
    pixels = torch.cat([b["pixel_values"] for b in batches])
    expected = torch.stack([eval_transform()(PILImage.open(paths[i]).convert("RGB")) for i in good])
    torch.testing.assert_close(pixels, expected)


def test_find_bad_images_lists_the_rows(tmp_path):
    dataset, _ = _jpeg_dataset(tmp_path / "jpg")
    bad = find_bad_images(dataset)
    assert [row for row, _ in bad] == [TRUNCATED, GARBAGE]
    assert all(message.startswith(("OSError", "UnidentifiedImageError")) for _, message in bad)
    # Works on a transformed dataset too (the transform is ignored while scanning).
    transformed = with_transforms(dataset, eval_transform())
    assert [row for row, _ in find_bad_images(transformed)] == [TRUNCATED, GARBAGE]


def test_embedded_bytes_are_identified_by_size_and_hash(tmp_path):
    dataset, paths = _jpeg_dataset(tmp_path / "jpg")
    # Same images stored inside the dataset (as in parquet), with no file name.
    blobs = [Path(p).read_bytes() for p in paths]
    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(COUNTS))})
    embedded = Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in blobs], "label": dataset["label"]},
        features=features,
    )
    loader = _loader(with_transforms(embedded, eval_transform()))
    with pytest.raises(BadImageError) as err:
        list(loader)
    digest = hashlib.sha1(blobs[TRUNCATED]).hexdigest()[:12]
    label = dataset["label"][TRUNCATED]
    assert (
        f"embedded image ({len(blobs[TRUNCATED])} bytes, sha1 {digest}..., label {label})"
        in str(err.value)
    )


def test_missing_file_is_named_and_skippable(tmp_path):
    dataset, _paths = _jpeg_dataset(tmp_path / "jpg")
    (tmp_path / "jpg" / "00.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image file '.*00\.jpg' .* does not exist"):
        list(_loader(with_transforms(dataset, eval_transform())))
    skipping = with_transforms(dataset, eval_transform(), on_bad_image="skip")
    assert sum(b["labels"].shape[0] for b in _loader(skipping)) == len(dataset) - 3
    assert bad_image_count(skipping) == 3


def test_a_batch_of_only_bad_images_is_an_error_not_an_empty_batch(tmp_path):
    dataset, _ = _jpeg_dataset(tmp_path / "jpg")
    only_bad = with_transforms(
        dataset.select([TRUNCATED, GARBAGE]), eval_transform(), on_bad_image="skip"
    )
    with pytest.raises(BadImageError, match=r"all 2 images of this batch are unreadable"):
        list(_loader(only_bad))


def test_invalid_policy_is_refused(tmp_path):
    dataset, _ = _jpeg_dataset(tmp_path / "jpg")
    with pytest.raises(ValueError, match=r"on_bad_image must be one of \('raise', 'skip'\)"):
        with_transforms(dataset, eval_transform(), on_bad_image="ignore")


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_trainer_meets_the_bad_files_during_training(tmp_path, policy):
    dataset, _paths = _jpeg_dataset(tmp_path / "jpg")
    transformed = with_transforms(dataset, eval_transform(), on_bad_image=policy)
    trainer = LongTailTrainer(
        model=tiny_vit(len(COUNTS)),
        args=training_args(tmp_path / "out", per_device_train_batch_size=4, num_train_epochs=2),
        train_dataset=transformed,
        data_collator=collate_fn,
        loss_config=LongTailLossConfig(ccar=True, car_weight=0.5),
        sampler="class_balanced",
    )
    if policy == "raise":
        with pytest.raises(BadImageError, match=r"cannot decode image file"):
            trainer.train()
        return
    trainer.train()
    assert trainer.state.global_step == 6  # 3 batches per epoch, none lost
    # The class-balanced order draws each bad row a known number of times over the 2 epochs.
    sampler = trainer._get_train_sampler().sampler
    drawn = np.concatenate([sampler.global_order(e) for e in (0, 1)]).tolist()
    expected_skips = sum(drawn.count(row) for row in (TRUNCATED, GARBAGE))
    assert expected_skips > 0
    assert bad_image_count(transformed) == expected_skips
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_train_script_passes_on_bad_image_through(tmp_path, policy):
    """scripts/train.py on a parquet dataset with one truncated JPEG among its training images."""
    from _reliability_helpers import load_train_module

    images, labels = image_arrays((20, 12, 8), size=8, seed=2)
    blobs = []
    for array in images:
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    blobs[0] = blobs[0][: len(blobs[0]) // 2]
    features = Features({"image": Image(), "label": ClassLabel(num_classes=3)})
    data = Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in blobs], "label": labels}, features=features
    )
    data.to_parquet(tmp_path / "data.parquet")
    argv = [
        "--dataset_name", str(tmp_path / "data.parquet"), "--imbalance_factor", "2",
        "--model_name_or_path", "resnet20_cifar", "--train_transform", "cifar10",
        "--image_size", "16", "--per_device_train_batch_size", "16", "--max_steps", "4",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--on_bad_image", policy, "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    train = load_train_module()
    if policy == "raise":
        # Found by the pre-flight check, before training...
        with pytest.raises(BadImageError, match=r"before training: split 'train', source row 0: "):
            train.main(argv)
        assert not (tmp_path / "run" / "trainer_state.json").exists()
        # ... and, beyond the pre-flight's sample, by the transform in its batch.
        with pytest.raises(BadImageError, match=r"embedded image \(\d+ bytes, sha1 "):
            train.main([*argv, "--preflight_sample", "0"])
        return
    results = train.main([*argv, "--preflight_sample", "0"])  # the transform skips it
    assert math.isfinite(results["train_loss"])
    assert (tmp_path / "run" / "model.safetensors").is_file()
