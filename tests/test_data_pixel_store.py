"""The pixel-cache fast path (``hf_longtail.data.pixel_store`` / ``batch_augment``) against the
streaming PIL transforms it replaces: eval pixels identical, train crops/flips valid crops of the
padded image with torchvision's distribution, batches independent of the number of DataLoader
workers, the store decoded once and reused, and its key following source, split and size."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage
from torchvision.transforms import v2

from hf_longtail.data import (
    BatchSeededSampler,
    ClassAwareSampler,
    SeededIndex,
    build_pixel_store,
    cifar_transforms,
    collate_fn,
    pixel_dataset,
    transforms_from_image_processor,
    with_transforms,
)
from hf_longtail.data import pixel_store as ps
from hf_longtail.data.batch_augment import (
    UnsupportedTransformError,
    _RandomResizedCrop,
    plan_fast_transform,
)

COUNTS = (20, 12, 6, 3, 2, 1)  # 44 images


def _images(n: int, size=(32, 32), seed: int = 0, varied: bool = False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = size
        if varied:
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        out.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return out


def _dataset(counts=COUNTS, size=(32, 32), seed: int = 0, varied: bool = False) -> Dataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    images = [PILImage.fromarray(a) for a in _images(len(labels), size, seed, varied)]
    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(counts))})
    return Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def _reference(dataset: Dataset, rows) -> torch.Tensor:
    """The streaming path's pixels for ``rows`` (a real DataLoader batch of the PIL transform)."""
    batch = collate_fn([dataset[int(r)] for r in rows])
    return batch["pixel_values"].as_subclass(torch.Tensor)


# ------------------------------------------------------------------------- eval: identical
@pytest.mark.parametrize("size", [32, 48])  # 48: every image is resized once, in the store
def test_cifar_eval_batches_equal_the_pil_transform(size):
    _, eval_tf = cifar_transforms(size=size)
    streamed = with_transforms(_dataset(), eval_tf)
    fast = pixel_dataset(streamed, "on")
    rows = [5, 0, 43, 17, 17, 2]
    batch = collate_fn(fast.__getitems__(rows))
    assert torch.equal(batch["pixel_values"], _reference(streamed, rows))
    assert batch["labels"].tolist() == [streamed[r]["labels"] for r in rows]
    assert batch["pixel_values"].shape == (6, 3, size, size)


def test_processor_eval_resize_and_centre_crop_equal_the_pil_transform():
    """Images of many sizes, ``shortest_edge`` resize + centre crop (applied once, with PIL)."""
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(
        size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_center_crop=True
    )
    train_tf, eval_tf = transforms_from_image_processor(processor)
    streamed = with_transforms(_dataset(varied=True), eval_tf)
    fast = pixel_dataset(streamed, "on")
    assert fast.store.images.shape == (44, 3, 24, 24)
    rows = list(range(0, 44, 3))
    assert torch.equal(
        collate_fn(fast.__getitems__(rows))["pixel_values"], _reference(streamed, rows)
    )
    # The train transform (random-resized crop from the raw image) needs one source size.
    assert pixel_dataset(with_transforms(_dataset(varied=True), train_tf), "auto") is None
    with pytest.raises(ValueError, match="the store needs one size"):
        pixel_dataset(with_transforms(_dataset(varied=True), train_tf), "on")


# ------------------------------------------------------------------ train: valid crops/flips
def test_train_batches_are_crops_of_the_padded_image_with_torchvision_distribution():
    train_tf, eval_tf = cifar_transforms()
    base = _dataset()
    fast = pixel_dataset(with_transforms(base, train_tf), "on")
    reference = _reference(with_transforms(base, eval_tf), range(len(base)))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    padded = torch.nn.functional.pad(reference, (4, 4, 4, 4))
    padded[:, :, :4], padded[:, :, -4:] = (-mean / std), (-mean / std)
    padded[:, :, :, :4], padded[:, :, :, -4:] = (-mean / std), (-mean / std)
    offsets, flips = [], []
    for b in range(12):
        rows = np.random.default_rng(b).integers(0, len(base), 32)
        batch = collate_fn(fast.__getitems__([SeededIndex(int(r), 1000 + b) for r in rows]))
        for out, row in zip(batch["pixel_values"], rows):
            found = None
            for flip in (False, True):
                img = out.flip(-1) if flip else out
                for dy in range(9):
                    for dx in range(9):
                        if torch.allclose(img, padded[row, :, dy : dy + 32, dx : dx + 32]):
                            found = (dy, dx, flip)
                            break
                    if found:
                        break
                if found:
                    break
            assert found is not None, f"row {row} is not a crop of its padded image"
            offsets.append(found[:2])
            flips.append(found[2])
    n = len(flips)
    assert abs(sum(flips) / n - 0.5) < 4 * math.sqrt(0.25 / n)  # p = 0.5
    dys = np.bincount([o[0] for o in offsets], minlength=9)
    assert (dys > 0).all()  # every vertical offset of U{0..8} occurs
    assert abs(np.mean([o[1] for o in offsets]) - 4.0) < 4 * math.sqrt(80 / 12 / n)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("padding", [(1, 2, 3, 0), (2, 1), 3])
def test_random_crop_covers_exactly_the_crops_torchvision_can_make(version, padding):
    """Asymmetric paddings in both torchvision APIs: every output is a crop of the image padded
    as torchvision pads it, and every such crop position occurs."""
    import torchvision.transforms as tv1
    import torchvision.transforms.v2.functional as TF

    from hf_longtail.data.batch_augment import BatchTransform

    crop = (tv1 if version == "v1" else v2).RandomCrop((6, 5), padding=padding)
    plan = plan_fast_transform(v2.Compose([crop, v2.ToDtype(torch.float32, scale=True)]))
    image = torch.randint(0, 256, (1, 3, 6, 5), dtype=torch.uint8)
    pad = [padding] * 4 if isinstance(padding, int) else padding
    pad = pad * 2 if len(pad) == 2 else pad
    padded = TF.pad(image[0], list(pad))  # torchvision's own padding, (left, top, right, bottom)
    positions = {(i, j) for i in range(padded.shape[1] - 5) for j in range(padded.shape[2] - 4)}
    crops = {
        (i, j): TF.to_dtype(padded[:, i : i + 6, j : j + 5], torch.float32, scale=True)
        for i, j in positions
    }
    seen = set()
    transform = BatchTransform(plan)
    out = transform(image.expand(400, -1, -1, -1), torch.Generator().manual_seed(0))
    for sample in out:
        match = [p for p, c in crops.items() if torch.equal(sample, c)]
        assert match, "not a crop of the torchvision-padded image"
        seen.update(match)
    assert seen == positions


def test_random_resized_crop_boxes_follow_torchvision():
    """Area fraction and aspect ratio of the fast path's boxes vs torchvision's make_params."""
    torch.manual_seed(0)
    reference = v2.RandomResizedCrop(24)
    ours = _RandomResizedCrop((24, 24), reference.scale, reference.ratio, reference.interpolation)
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    ref = [reference.make_params([image]) for _ in range(3000)]
    ref_boxes = [(p["top"], p["left"], p["height"], p["width"]) for p in ref]
    our_boxes = ours.boxes(3000, 40, 30, torch.Generator().manual_seed(0))
    for boxes in (ref_boxes, our_boxes):
        for i, j, h, w in boxes:
            assert 0 <= i <= 40 - h and 0 <= j <= 30 - w and h > 0 and w > 0

    def stats(boxes):
        area = np.array([h * w / 1200 for _, _, h, w in boxes])
        ratio = np.log([w / h for _, _, h, w in boxes])
        return area.mean(), ratio.mean(), np.quantile(area, [0.25, 0.5, 0.75])

    a_ref, r_ref, q_ref = stats(ref_boxes)
    a_our, r_our, q_our = stats(our_boxes)
    assert abs(a_ref - a_our) < 0.03 and abs(r_ref - r_our) < 0.03
    np.testing.assert_allclose(q_ref, q_our, atol=0.05)


def test_unsupported_ops_keep_the_streaming_path():
    train_tf, _ = cifar_transforms(auto_augment="randaugment")
    with pytest.raises(UnsupportedTransformError, match="RandAugment"):
        plan_fast_transform(train_tf)
    streamed = with_transforms(_dataset(), train_tf)
    assert pixel_dataset(streamed, "auto") is None
    assert pixel_dataset(streamed, "off") is None
    with pytest.raises(ValueError, match=r"pixel_cache='on' cannot be used: .*RandAugment"):
        pixel_dataset(streamed, "on")
    with pytest.raises(ValueError, match="pixel_cache='sometimes' is not valid"):
        pixel_dataset(streamed, "sometimes")
    # auto keeps the streaming path above the size limit; on ignores it.
    _, eval_tf = cifar_transforms()
    small = with_transforms(_dataset(), eval_tf)
    assert pixel_dataset(small, "auto", max_bytes=1000) is None
    assert pixel_dataset(small, "on", max_bytes=1000) is not None


def test_timm_train_transform_is_supported():
    """timm's training transform (random-resized crop, flip, colour jitter) on the fast path."""
    from hf_longtail.data import transforms_from_timm

    config = {
        "input_size": (3, 40, 40),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
    }
    train_tf, eval_tf = transforms_from_timm(config)
    base = _dataset()
    fast = pixel_dataset(with_transforms(base, train_tf), "on")
    assert fast.transform.plan.per_sample_resize
    batch = collate_fn(fast.__getitems__([SeededIndex(r, 7) for r in range(16)]))
    assert batch["pixel_values"].shape == (16, 3, 40, 40)
    assert torch.isfinite(batch["pixel_values"]).all()
    again = collate_fn(fast.__getitems__([SeededIndex(r, 7) for r in range(16)]))
    assert torch.equal(batch["pixel_values"], again["pixel_values"])  # a function of the seed
    # The eval transform (resize 45 + centre crop 40) is pixel-identical.
    streamed = with_transforms(base, eval_tf)
    rows = [3, 1, 4, 1, 5]
    fast_eval = pixel_dataset(streamed, "on")
    assert torch.equal(
        collate_fn(fast_eval.__getitems__(rows))["pixel_values"], _reference(streamed, rows)
    )


# -------------------------------------------------------------------- seeds and workers
def test_seeded_index_is_an_int_with_its_batch_seed():
    index = SeededIndex(7, 123)
    assert index == 7 and isinstance(index, int) and index.batch_seed == 123
    copy = pickle.loads(pickle.dumps(index))
    assert copy == 7 and copy.batch_seed == 123
    sampler = ClassAwareSampler(np.repeat(np.arange(6), COUNTS), seed=3)
    tagged = BatchSeededSampler(sampler, batch_size=8, seed=3, tag_batches=True)
    plain = BatchSeededSampler(sampler, batch_size=8, seed=3)
    tagged.set_epoch(1)
    plain.set_epoch(1)
    values = list(tagged)
    assert [int(v) for v in values] == list(plain)
    seeds = [v.batch_seed for v in values]
    batches = [seeds[i : i + 8] for i in range(0, len(seeds), 8)]
    assert all(len(set(b)) == 1 for b in batches)  # one seed per batch ...
    assert len({b[0] for b in batches}) == len(batches)  # ... different for every batch
    tagged.set_epoch(2)
    assert next(iter(tagged)).batch_seed != seeds[0]  # and every epoch


def _loader_batches(fast, labels, workers: int):
    sampler = BatchSeededSampler(ClassAwareSampler(labels, seed=0), 8, seed=0, tag_batches=True)
    loader = torch.utils.data.DataLoader(
        fast, batch_size=8, sampler=sampler, collate_fn=collate_fn, num_workers=workers
    )
    out = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        out += [(b["pixel_values"], b["labels"]) for b in loader]
    return out


def test_batches_are_identical_with_0_and_2_workers():
    train_tf, _ = cifar_transforms()
    base = _dataset()
    fast = pixel_dataset(with_transforms(base, train_tf), "on")
    labels = np.asarray(base["label"])
    single = _loader_batches(fast, labels, 0)
    multi = _loader_batches(fast, labels, 2)
    assert len(single) == len(multi) == 12
    for (x0, y0), (x2, y2) in zip(single, multi):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert not torch.equal(single[0][0], single[6][0])  # epochs differ


# --------------------------------------------------------------------------- cache
def _disk_dataset(tmp_path, name: str, seed: int = 0, split: str = "train") -> Dataset:
    """A dataset backed by Arrow cache files (as load_dataset gives), like the real sources."""
    folder = tmp_path / name
    if not folder.exists():
        folder.mkdir()
        _dataset(seed=seed).to_parquet(folder / f"{split}.parquet")
    return load_dataset(str(folder), split=split, cache_dir=str(tmp_path / "hf_cache"))


def test_store_is_decoded_once_and_reused(tmp_path, monkeypatch):
    _, eval_tf = cifar_transforms()
    cache = tmp_path / "pixels"
    first = build_pixel_store(
        with_transforms(_disk_dataset(tmp_path, "a"), eval_tf), cache_dir=cache
    )
    assert first.path is not None and (first.path / "meta.json").is_file()
    assert isinstance(first.images, np.memmap)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the store is cached")

    monkeypatch.setattr(ps, "_decode_into", no_decoding)
    # A fresh load of the same source (another run) finds the store.
    again = build_pixel_store(
        with_transforms(_disk_dataset(tmp_path, "a"), eval_tf), cache_dir=cache
    )
    assert again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    # pixel_dataset keeps Arrow-backed datasets in the default directory (HF_LONGTAIL_PIXEL_CACHE:
    # the test session's), in-memory ones in memory.
    monkeypatch.undo()
    fast = pixel_dataset(with_transforms(_disk_dataset(tmp_path, "a"), eval_tf), "on")
    assert fast.store.path.parent == ps.default_cache_dir()
    assert pixel_dataset(with_transforms(_dataset(), eval_tf), "on").store.path is None


def test_cache_key_follows_source_split_and_size(tmp_path):
    def key(dataset, size=32):
        _, eval_tf = cifar_transforms(size=size)
        return ps.pixel_cache_key(with_transforms(dataset, eval_tf), plan_fast_transform(eval_tf))

    a = _disk_dataset(tmp_path, "a")
    assert key(a) == key(_disk_dataset(tmp_path, "a"))  # same source, same settings
    assert key(a) != key(a, size=48)  # resize setting
    assert key(a) != key(_disk_dataset(tmp_path, "b", seed=1))  # other pixels
    assert key(a) != key(_disk_dataset(tmp_path, "c", split="test", seed=0))  # other split
    assert key(a) != key(a.select(range(10)))  # other rows
