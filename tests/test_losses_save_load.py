"""``LongTailLoss.save_pretrained`` / ``from_pretrained``: the exact loss and its state, rebuilt."""

from __future__ import annotations

import json

import pytest
import torch

from hf_longtail.losses import LongTailLoss, LongTailLossConfig, build_loss
from hf_longtail.losses.total_loss import LOSS_CONFIG_NAME, LOSS_WEIGHTS_NAME

COUNTS = [300, 120, 60, 25, 10, 4]
NAMES = ["a", "b", "c", "d", "e", "f"]


def _batches(n, b=16):
    k = len(COUNTS)
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(b, k, generator=g) * 2, torch.randint(0, k, (b,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "config",
    [
        LongTailLossConfig(base="la", ccar=True, car_weight=0.5),
        LongTailLossConfig(base="ldam", drw_epoch=1.0, car_weight=0.3, car_solver="subspace"),
        LongTailLossConfig(base="ce", car_weight=1.0, car_ema="per_class", car_weights="count"),
    ],
    ids=["la_ccar_car", "ldam_drw_car_subspace", "ce_car_per_class"],
)
def test_round_trip_rebuilds_the_loss_and_continues_identically(tmp_path, config):
    loss = build_loss(config, COUNTS, class_names=NAMES)
    batches = _batches(12)
    for i, (z, y) in enumerate(batches[:6]):
        loss.set_epoch(i / 3)
        loss(z, y)
    loss.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / LOSS_CONFIG_NAME).read_text())
    assert meta["class_counts"] == COUNTS and meta["class_names"] == NAMES
    restored = LongTailLoss.from_pretrained(tmp_path)
    assert restored.config == config and restored.class_names == NAMES
    assert restored.base_loss.epoch == loss.base_loss.epoch
    for name, value in loss.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    for z, y in batches[6:]:
        assert torch.equal(loss(z, y), restored(z, y))
        assert torch.equal(loss.last_stats["loss"], restored.last_stats["loss"])


def test_missing_or_mismatched_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=LOSS_CONFIG_NAME):
        LongTailLoss.from_pretrained(tmp_path)
    build_loss(LongTailLossConfig(car_weight=0.5), COUNTS).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / LOSS_CONFIG_NAME).read_text())
    meta["config"]["car_weight"] = 0.0  # the state still holds CAR's buffers
    (tmp_path / LOSS_CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{LOSS_WEIGHTS_NAME} does not match"):
        LongTailLoss.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        build_loss(None, COUNTS, class_names=["x", "y"])
