"""A new user's already-imbalanced image folder, through ``scripts/train.py`` with its defaults.

The folder is ``datasets``' imagefolder layout (one subfolder per class, 40 / 12 / 5 / 2 PNGs,
no test split). It used to fail with advice to lower ``--imbalance_factor`` (which throws images
away) instead of pointing at ``--imbalance_factor none``; then the 20% test split was carved
without a log line or a record, and the card claimed the ``exp`` profile, a seeded subset and an
untouched original test split, none of which happened.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _helpers_train import table_row
from PIL import Image as PILImage

FOLDER_COUNTS = {"ant": 40, "bee": 12, "cat": 5, "dog": 2}  # already long-tailed: IF 20


def _image_folder(root):
    rng = np.random.default_rng(7)
    for label, (name, count) in enumerate(FOLDER_COUNTS.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(rng.normal(60 + 45 * label, 20, (8, 8, 3)), 0, 255)
            PILImage.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return str(root)


def _flags(folder: str, out, *extra: str) -> list[str]:
    return [
        "--dataset_name", folder, "--output_dir", str(out),
        "--model_name_or_path", "resnet20_cifar", "--image_size", "8", "--max_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_the_default_imbalance_factor_points_at_none_first(train, tmp_path):
    folder = _image_folder(tmp_path / "pets")
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.main(_flags(folder, out))  # the default --imbalance_factor 100
    message = str(err.value)
    none = message.index("--imbalance_factor none")
    assert none < message.index("imbalance_factor <= "), message  # lowering it comes second
    assert "keeping every image" in message and "throws images away" in message
    # The split it would subsample (after the 20% test carve: 32 / 10 / 4 / 1) and the folder.
    assert "its own imbalance factor is 32 (32 images in class 0 ('ant'), 1 in class 3" in message
    assert "its 59 'train' images, whose own imbalance factor is 20" in message
    assert not (out / "longtail_run.json").exists()  # before anything is built or written


def test_the_run_record_and_card_say_what_was_done(train, tmp_path, caplog):
    folder = _image_folder(tmp_path / "pets")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hf_longtail.data.sources"):
        train.main(_flags(folder, out, "--imbalance_factor", "none"))
    # (b) the carve is logged ...
    assert (
        "no evaluation split: carved a stratified test split of 12 images (20% of every class, "
        "split seed 0) from its 59 'train' images; 47 remain for training"
    ) in caplog.text
    # ... and recorded, with what was (not) done to the training split.
    data = json.loads((out / "longtail_run.json").read_text())["dataset"]
    assert data["eval_split_origin"] == {
        "method": "carved", "from_split": "train", "fraction": 0.2, "seed": 0, "size": 12,
        "source_size": 59,
    }  # fmt: skip
    assert data["subsampled"] is False and data["profile"] is None
    assert data["class_counts"] == [32, 10, 4, 1] and data["eval_size"] == 12
    # (c) every data sentence of the model card comes from that record.
    card = (out / "README.md").read_text()
    for claim in ("`exp`", "seeded random subset", "untouched", "original one", "Subsampling"):
        assert claim not in card, claim
    assert "trained on the local dataset `pets`, used as it is (every training image kept" in card
    assert table_row(card, "Long-tail profile")[1].startswith("none: not subsampled")
    assert table_row(card, "Evaluation split")[1] == (
        "`test`: a stratified 20% of every class of the source's `train` split (split seed 0), "
        "carved before training; not subsampled"
    )
    assert "The training split is the rest of the source's training images, used as it is" in card
    assert "name: pets (not subsampled)" in card  # the model-index dataset
    # The dataset card of the same splits, from their provenance record.
    from hf_longtail.data import load_long_tailed
    from hf_longtail.hub import build_dataset_card

    text = build_dataset_card(load_long_tailed(folder, imbalance_factor=None)).text
    for claim in ("long-tailed** version", "seeded random subset", "untouched", "Subsampling"):
        assert claim not in text, claim
    assert "the `train` split is the rest of the source's `train` images, used as it is" in text
    assert table_row(text, "`test` split")[1] == (
        "a stratified 20% of every class of the source's `train` split (split seed 0), carved "
        "before anything else"
    )
    assert table_row(text, "Long-tail profile")[1].startswith("none: the source's own long tail")
