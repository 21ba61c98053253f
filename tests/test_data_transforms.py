"""Transforms (RGB conversion, CIFAR protocol, image processors, timm), lazy application, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from hf_longtail.data import (
    MixupCollator,
    apply_transforms,
    build_transforms,
    cifar_transforms,
    collate_fn,
    load_split_file,
    to_rgb,
    transforms_from_image_processor,
    transforms_from_timm,
    with_transforms,
)
from hf_longtail.data.transforms import CIFAR10_MEAN, CIFAR10_STD

MEAN = np.array(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
STD = np.array(CIFAR10_STD, dtype=np.float32)[:, None, None]


def _rand_rgb(h=32, w=32, seed=0) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalised(img: PILImage.Image) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


# ---------------------------------------------------------------- RGB


def test_to_rgb_modes():
    gray = PILImage.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    out = np.asarray(to_rgb(gray))
    assert out.shape == (3, 4, 3) and all(
        np.array_equal(out[..., c], np.asarray(gray)) for c in range(3)
    )
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 1] = (10, 20, 30, 0)  # transparent: white, not black
    out = np.asarray(to_rgb(PILImage.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]
    pal = PILImage.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert np.asarray(to_rgb(pal)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    deep = PILImage.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I")
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 255]
    cmyk = PILImage.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert to_rgb(cmyk).mode == "RGB"
    assert to_rgb(np.full((2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb("not an image")


# ---------------------------------------------------------------- CIFAR protocol


def test_cifar_eval_is_exact_normalisation():
    img = _rand_rgb()
    _, eval_tf = cifar_transforms()
    out = eval_tf(img)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), _normalised(img), atol=1e-5)


def test_cifar_train_is_a_padded_crop_or_its_flip():
    img = _rand_rgb(seed=1)
    train_tf, _ = cifar_transforms()
    padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)))
    candidates = []
    for dy in range(9):
        for dx in range(9):
            win = PILImage.fromarray(padded[dy : dy + 32, dx : dx + 32])
            candidates.append(_normalised(win))
            candidates.append(_normalised(win.transpose(PILImage.FLIP_LEFT_RIGHT)))
    seen_flip = set()
    for _ in range(8):
        out = train_tf(img).numpy()
        errs = [np.abs(out - c).max() for c in candidates]
        best = int(np.argmin(errs))
        assert errs[best] < 1e-5
        seen_flip.add(best % 2)
    assert seen_flip == {0, 1}  # both flipped and unflipped occur in 8 seeded draws


def test_small_and_gray_images_become_3x32x32():
    train_tf, eval_tf = cifar_transforms(auto_augment="randaugment")
    gray8 = PILImage.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert train_tf(gray8).shape == (3, 32, 32)
    assert eval_tf(gray8).shape == (3, 32, 32)
    ta, _ = build_transforms("cifar100", auto_augment="trivialaugment")
    assert ta(_rand_rgb()).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown auto_augment"):
        cifar_transforms(auto_augment="autoaugment-v9")
    with pytest.raises(ValueError, match="unknown transform preset"):
        build_transforms("imagenet")


# ---------------------------------------------------------------- image processors / timm


def test_image_processor_height_width_matches_processor():
    from transformers import DeiTImageProcessor, ViTImageProcessor

    for processor, side in ((ViTImageProcessor(), 224), (DeiTImageProcessor(), 256)):
        img = _rand_rgb(side, side, seed=2)
        ref = processor(images=img, return_tensors="pt").pixel_values[0]
        train_tf, eval_tf = transforms_from_image_processor(processor)
        torch.testing.assert_close(eval_tf(img), ref, atol=1e-5, rtol=0)
        assert train_tf(img).shape == ref.shape == (3, 224, 224)


def test_image_processor_shortest_edge_shapes():
    from transformers import BitImageProcessor, ConvNextImageProcessor

    wide = _rand_rgb(120, 300, seed=3)
    for processor, side in (
        (ConvNextImageProcessor(size={"shortest_edge": 64}), 64),  # resize 73, crop 64
        (ConvNextImageProcessor(size={"shortest_edge": 384}), 384),  # warp
        (BitImageProcessor(size={"shortest_edge": 80}, crop_size={"height": 72, "width": 72}), 72),
    ):
        train_tf, eval_tf = transforms_from_image_processor(processor)
        assert eval_tf(wide).shape == (3, side, side)
        assert train_tf(wide).shape == (3, side, side)
        ref = processor(images=wide, return_tensors="pt").pixel_values[0]
        assert ref.shape == (3, side, side)
    # A smooth image makes resampling differences small: the 384 warp agrees closely.
    ramp = np.linspace(0, 255, 300, dtype=np.float32)[None, :, None].repeat(120, 0).repeat(3, 2)
    smooth = PILImage.fromarray(ramp.astype(np.uint8))
    processor = ConvNextImageProcessor(size={"shortest_edge": 384})
    ref = processor(images=smooth, return_tensors="pt").pixel_values[0]
    _, eval_tf = transforms_from_image_processor(processor)
    assert (eval_tf(smooth) - ref).abs().mean() < 0.02


def test_timm_data_config_and_model():
    import timm

    cfg = {
        "input_size": (3, 40, 40),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    train_tf, eval_tf = transforms_from_timm(cfg, auto_augment="randaugment")
    img = _rand_rgb(40, 40, seed=4)
    expected = (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(eval_tf(img).numpy(), expected, atol=1e-5)
    assert train_tf(PILImage.fromarray(np.zeros((50, 60), np.uint8))).shape == (3, 40, 40)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    train_tf, eval_tf = build_transforms(model)
    assert eval_tf(_rand_rgb(64, 80)).shape == (3, 224, 224)
    with pytest.raises(TypeError, match="cannot build transforms"):
        build_transforms(42)


def test_image_size_overrides_the_model_resolution_and_keeps_normalisation():
    from transformers import ConvNextImageProcessor, TimmWrapperImageProcessor

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    processor = TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture="x")
    white = PILImage.new("RGB", (20, 30), (255, 255, 255))
    train_tf, eval_tf = build_transforms(processor, image_size=48)
    assert train_tf(white).shape == (3, 48, 48)  # (colour jitter: values vary)
    out = eval_tf(white)
    assert out.shape == (3, 48, 48)
    torch.testing.assert_close(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    # An image processor with a crop fraction (ConvNeXt: resize 64/0.875 = 73, crop 64) keeps
    # the fraction at the new side: 32 -> resize 36 (73 * 32/64, rounded), crop 32.
    convnext = ConvNextImageProcessor(size={"shortest_edge": 64})
    _, eval_tf = transforms_from_image_processor(convnext, image_size=32)
    assert eval_tf(_rand_rgb(120, 300)).shape == (3, 32, 32)
    assert next(op for op in eval_tf.transforms if type(op).__name__ == "Resize").size == [36]


def test_select_transforms_protocols():
    from transformers import TimmWrapperImageProcessor

    from hf_longtail.data import select_transforms

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.25,) * 3, "crop_pct": 0.875, "crop_mode": "center"}  # fmt: skip
    processor = TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture="x")
    assert select_transforms("auto", None)[0] == "cifar"
    assert select_transforms("auto", processor)[0] == "model"
    # pad_crop: CIFAR geometry (resize to the side, pad 1/8, crop, flip) with the model's mean/std.
    name, train_tf, eval_tf = select_transforms("pad_crop", processor, image_size=32)
    img = _rand_rgb(8, 8, seed=5)
    expected = (
        np.asarray(img.resize((32, 32), PILImage.BILINEAR), np.float32) / 255.0 - 0.5
    ) / 0.25
    np.testing.assert_allclose(eval_tf(img).numpy(), expected.transpose(2, 0, 1), atol=0.02)
    assert name == "pad_crop" and train_tf(img).shape == (3, 32, 32)
    assert [op.padding for op in train_tf.transforms if hasattr(op, "padding")] == [[4, 4, 4, 4]]
    assert select_transforms("pad_crop", None)[0] == "cifar"  # no processor: CIFAR protocol
    with pytest.raises(ValueError, match="no image processor"):
        select_transforms("model", None)
    with pytest.raises(ValueError, match="train_transform='imagenet'"):
        select_transforms("imagenet", processor)


# ---------------------------------------------------------------- lazy application


def test_with_transforms_is_lazy_and_outputs_model_keys(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(4):
        PILImage.new("L" if i % 2 else "RGBA", (8, 8), 100).save(root / f"{i}.png")
        lines.append(f"{i}.png {i % 2}")
    (tmp_path / "split.txt").write_text("\n".join(lines))
    ds = load_split_file(tmp_path / "split.txt", root)
    _, eval_tf = cifar_transforms()
    out = with_transforms(ds, eval_tf)
    # Nothing was decoded up front: deleting a file only breaks the row that reads it.
    (root / "3.png").unlink()
    row = out[1]
    assert set(row) == {"pixel_values", "labels"}
    assert row["pixel_values"].shape == (3, 32, 32) and row["labels"] == 1
    assert isinstance(row["labels"], int)
    with pytest.raises(FileNotFoundError):
        out[3]
    # The source dataset is not modified and keeps its description.
    assert set(ds[0]) == {"image", "label"}


def test_apply_transforms_train_vs_eval_and_collate():
    feats = Features({"img": Image(), "fine": ClassLabel(num_classes=3)})
    data = {"img": [_rand_rgb(seed=s) for s in range(6)], "fine": [0, 1, 2, 0, 1, 2]}
    dd = DatasetDict(
        {
            "train": Dataset.from_dict(data, features=feats),
            "test": Dataset.from_dict(data, features=feats),
        }
    )
    train_tf, eval_tf = cifar_transforms()
    out = apply_transforms(dd, train_tf, eval_tf)
    np.testing.assert_allclose(
        out["test"][2]["pixel_values"].numpy(), _normalised(data["img"][2]), atol=1e-5
    )
    batch = collate_fn([out["train"][i] for i in range(5)])
    assert (
        batch["pixel_values"].shape == (5, 3, 32, 32)
        and batch["pixel_values"].dtype == torch.float32
    )
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1] and batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collate_fn([{"img": 1, "fine": 0}])


# ---------------------------------------------------------------- mixup / cutmix


def _rows(n, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.rand(3, 8, 8, generator=g), "labels": int(i % k)} for i in range(n)
    ]


def test_mixup_soft_targets_and_mixing_identity():
    rows = _rows(6)
    collator = MixupCollator(num_classes=5, mixup_alpha=1.0, cutmix_alpha=0.0)
    batch = collator(rows)
    x = torch.stack([r["pixel_values"] for r in rows])
    y = torch.tensor([r["labels"] for r in rows])
    soft = batch["labels"]
    assert soft.shape == (6, 5) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    # Row 0 pairs with row 5 (flip): labels 0 and 0 -> recover lam from row 1 (label 1 vs 4).
    lam = float(soft[1, y[1]])
    torch.testing.assert_close(soft[1, y[4]], torch.tensor(1 - lam))
    torch.testing.assert_close(batch["pixel_values"], lam * x + (1 - lam) * x.flip(0))


def test_mixup_odd_batch_cutmix_and_smoothing():
    rows = _rows(5)
    collator = MixupCollator(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    batch = collator(rows)
    assert batch["pixel_values"].shape == (5, 3, 8, 8)
    last = batch["labels"][4]
    expected = torch.full((5,), 0.02)
    expected[rows[4]["labels"]] = 0.92
    torch.testing.assert_close(last, expected)
    torch.testing.assert_close(batch["pixel_values"][4], rows[4]["pixel_values"])
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="both 0"):
        MixupCollator(5, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        MixupCollator(3)(rows)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_mixup_workers_draw_different_lambdas():
    rows = _rows(8, k=2)
    loader = torch.utils.data.DataLoader(
        _Rows(rows),
        batch_size=2,
        num_workers=2,
        collate_fn=MixupCollator(num_classes=2, mixup_alpha=1.0, cutmix_alpha=0.0),
    )
    torch.manual_seed(0)
    lams = [round(float(b["labels"][0, 0]), 6) for b in loader]
    # Batches 0 and 1 come from different workers: they must not repeat each other's lam.
    assert lams[0] != lams[1]
