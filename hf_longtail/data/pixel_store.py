"""Decode once, augment batches: the pixel-cache fast path of the input pipeline.

The streaming path (:func:`~hf_longtail.data.with_transforms`) decodes every image and runs its
PIL transform every time a row is read, every epoch. For a dataset that fits in a few GiB that
cost is paid again and again (it measured up to 45% of a ResNet-32 step on 2 cores). The fast
path instead:

1. splits the dataset's transform with :func:`~hf_longtail.data.batch_augment.plan_fast_transform`
   into a deterministic prefix (``ToRGB``, resize, centre crop), per-sample random ops and a
   float tail;
2. decodes every image ONCE, applies the prefix (with the reference objects, so the stored pixels
   are the PIL path's) and keeps the result as a compact ``uint8`` array ``[N, C, H, W]``
   (:class:`PixelStore`): an ``.npy`` memory map in ``cache_dir`` (reused across epochs and runs),
   or in memory for an in-memory dataset without a ``cache_dir``;
3. serves batches (:class:`PixelStoreDataset`, ``__getitems__``) by gathering rows and applying the
   random ops and the tail to the whole batch with one ``torch.Generator`` per batch.

**Determinism.** The generator of a batch is seeded by the :class:`~hf_longtail.data.samplers.
SeededIndex` values that ``BatchSeededSampler(tag_batches=True)`` yields (a function of
``(seed, epoch, batch index)``), so a batch is the same whatever the number of DataLoader workers
and whether the run was resumed mid-epoch. Untagged indices (a plain sampler) draw the batch seed
from torch's global RNG, like the streaming transforms do.

**Cache key.** ``sha256`` of the format version, the source dataset's ``_fingerprint`` (which
``datasets`` derives from the data files and every ``select``/``map``/cast applied), its
``split``, the number of rows, the image and label columns, the decode mode and the prefix ops with
their resize settings (:meth:`FastTransformPlan.prefix_key`). A directory
``<cache_dir>/<key>/`` holds ``images.npy``, ``labels.npy``, ``valid.npy`` and ``meta.json``
(written last, into a temporary directory renamed into place: a crash never leaves a store that
looks complete).

**Automatic choice** (:func:`pixel_dataset`, ``mode="auto"``): the fast path is used when the
transform is supported, the decoded-and-prefixed images all have one size and the store would take
at most ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 4 GiB; e.g. CIFAR-10-LT at 32 px is
38 MB, at 128 px 610 MB, ImageNet-LT at 224 px 17 GB: it stays on the streaming JPEG path);
``"on"`` forces it (an unsupported transform is then an error naming the op), ``"off"`` never uses
it.

**Unreadable images** follow the dataset transform's ``on_bad_image``: ``"raise"`` raises the
:class:`~hf_longtail.data.BadImageError` of the streaming path while the store is built (before
training starts); ``"skip"`` logs them, marks them invalid in ``valid.npy`` and drops them from
every batch they are drawn into (as :func:`~hf_longtail.data.collate_fn` drops ``None`` rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_longtail.data.batch_augment import (
    BatchTransform,
    FastTransformPlan,
    UnsupportedTransformError,
    plan_fast_transform,
)
from hf_longtail.data.collate import PrecollatedBatch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "PIXEL_CACHE_MODES",
    "PixelStore",
    "PixelStoreDataset",
    "PixelStoreTooLargeError",
    "build_pixel_store",
    "default_cache_dir",
    "pixel_cache_key",
    "pixel_dataset",
]

logger = logging.getLogger(__name__)

#: ``"auto"``: fast path when supported and small enough; ``"on"``: always (errors otherwise);
#: ``"off"``: the streaming PIL path.
PIXEL_CACHE_MODES = ("auto", "on", "off")
#: Largest store ``"auto"`` builds (bytes of uint8 pixels).
DEFAULT_MAX_BYTES = 4 * 1024**3
_FORMAT = "hf_longtail.pixel_store/v1"
_DECODE_BATCH = 256


def default_cache_dir() -> Path:
    """``$HF_LONGTAIL_PIXEL_CACHE``, else ``$HF_HOME/hf_longtail/pixel_cache`` (``HF_HOME``
    defaulting to ``~/.cache/huggingface``)."""
    explicit = os.environ.get("HF_LONGTAIL_PIXEL_CACHE")
    if explicit:
        return Path(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return Path(home) / "hf_longtail" / "pixel_cache"


@dataclass
class PixelStore:
    """Decoded, prefixed images of one dataset: ``images`` uint8 ``[N, C, H, W]`` (a memory map
    when on disk), ``labels`` int64 ``[N]``, ``valid`` bool ``[N]`` (False: unreadable image
    skipped), ``bad`` ``[(row, description)]``, ``path`` (``None`` in memory), ``key``."""

    images: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    bad: list
    key: str
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def _transform_of(dataset: Any):
    """The :class:`ImageClassificationTransform` attached by ``with_transforms``, else None."""
    from hf_longtail.data.transforms import ImageClassificationTransform

    fmt = getattr(dataset, "format", None) or {}
    transform = (fmt.get("format_kwargs") or {}).get("transform")
    return transform if isinstance(transform, ImageClassificationTransform) else None


def pixel_cache_key(dataset: Any, plan: FastTransformPlan) -> str:
    """The store key of ``dataset`` (with its ``with_transforms`` transform) under ``plan``: a
    hex sha256 of everything the stored pixels depend on (module docstring)."""
    fn = _transform_of(dataset)
    decoder_mode = getattr(getattr(fn, "_decoder", None), "mode", None)
    parts = {
        "format": _FORMAT,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "split": str(getattr(dataset, "split", None)),
        "num_rows": len(dataset),
        "image_column": getattr(fn, "image_column", None),
        "label_column": getattr(fn, "label_column", None),
        "mode": decoder_mode,
        "prefix": plan.prefix_key(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _raw_rows(dataset: Any, columns: list[str]):
    """The un-transformed rows of ``dataset`` (the image column is ``Image(decode=False)`` after
    ``with_transforms``: bytes/paths, decoded by the transform's own decoder)."""
    return dataset.with_format(None).select_columns(columns)


def _as_array(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise UnsupportedTransformError(
            f"the transform prefix produced an array of shape {array.shape}, not H x W x C"
        )
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class PixelStoreTooLargeError(ValueError):
    """The store would exceed ``max_bytes`` (``"auto"`` then keeps the streaming path)."""


def _decode_into(
    dataset: Any,
    plan: FastTransformPlan,
    allocate,
    max_bytes: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Decode every row with the dataset transform's decoder and error policy, apply the prefix
    and write it into ``allocate(shape)``; returns ``(images, labels, valid, bad)``."""
    from hf_longtail.data.transforms import ImageClassificationTransform

    fn = _transform_of(dataset)
    decode = ImageClassificationTransform(
        plan.prefix_transform(),
        fn.image_column,
        fn.label_column,
        on_bad_image=fn.on_bad_image,
        image_mode=fn._decoder.mode,
        source_rows=getattr(fn, "source_rows", None),
    )
    raw = _raw_rows(dataset, [fn.image_column, fn.label_column])
    n = len(raw)
    images = None
    labels = np.zeros(n, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    bad: list = []
    for start in range(0, n, _DECODE_BATCH):
        rows = raw[start : start + _DECODE_BATCH]
        before = decode.num_bad_images
        out = decode(rows)
        labels[start : start + len(out["labels"])] = out["labels"]
        if decode.num_bad_images != before:
            for offset, pixels in enumerate(out["pixel_values"]):
                if pixels is None:
                    bad.append((start + offset, "unreadable image (skipped)"))
        for offset, pixels in enumerate(out["pixel_values"]):
            if pixels is None:
                continue
            array = _as_array(pixels)
            row = start + offset
            if images is None:
                shape = (n, *array.shape)
                nbytes = int(np.prod(shape))
                if max_bytes is not None and nbytes > max_bytes:
                    raise PixelStoreTooLargeError(_too_large(nbytes, max_bytes))
                images = allocate(shape)
            if array.shape != images.shape[1:]:
                raise UnsupportedTransformError(
                    f"row {row} is {tuple(array.shape[1:])} (C={array.shape[0]}) after the "
                    f"prefix {plan.prefix_key() or '(none)'} but row {int(np.argmax(valid))} is "
                    f"{tuple(images.shape[2:])} (C={images.shape[1]}): the store needs one size; "
                    f"resize to a fixed size first or use the streaming path"
                )
            images[row] = array
            valid[row] = True
    if images is None:
        raise UnsupportedTransformError("no readable image in the dataset")
    return images, labels, valid, bad


def build_pixel_store(
    dataset: Any,
    plan: FastTransformPlan | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> PixelStore:
    """The :class:`PixelStore` of ``dataset`` (a ``datasets.Dataset`` with a
    :func:`~hf_longtail.data.with_transforms` transform): loaded from ``cache_dir`` when a store
    with its key is there, else decoded once (and written there when ``cache_dir`` is given).

    Raises:
        UnsupportedTransformError: no ``with_transforms`` transform, an unsupported op, or
            images of different sizes after the prefix.
        BadImageError / FileNotFoundError: an unreadable image with ``on_bad_image="raise"``
            (also when a cached store built with ``"skip"`` recorded one).
        PixelStoreTooLargeError: the store would exceed ``max_bytes``.
    """
    fn = _transform_of(dataset)
    if fn is None:
        raise UnsupportedTransformError(
            "the dataset has no transform attached by hf_longtail.data.with_transforms"
        )
    plan = plan if plan is not None else plan_fast_transform(fn.transform)
    key = pixel_cache_key(dataset, plan)
    if cache_dir is None:
        images, labels, valid, bad = _decode_into(dataset, plan, _zeros, max_bytes)
        return _checked(PixelStore(images, labels, valid, bad, key), fn)
    folder = Path(cache_dir) / key
    store = _load(folder, key)
    if store is not None:
        logger.info("pixel cache: reusing %s (%d images)", folder, len(store.labels))
        return _checked(store, fn)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        holder: dict[str, np.ndarray] = {}

        def allocate(shape):
            holder["images"] = np.lib.format.open_memmap(
                tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape
            )
            return holder["images"]

        images, labels, valid, bad = _decode_into(dataset, plan, allocate, max_bytes)
        images.flush()
        del images
        holder.clear()  # close the memory map before the directory is renamed
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "valid.npy", valid)
        meta = {"format": _FORMAT, "key": key, "num_rows": int(labels.size), "bad": bad}
        (tmp / "meta.json").write_text(json.dumps(meta))
        # mkdtemp makes it private (0700); a cache is shared like any other file here.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a DDP rank) finished the same store first
            pass
        logger.info("pixel cache: wrote %s (%d images)", folder, labels.size)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    store = _load(folder, key)
    if store is None:
        raise OSError(f"pixel cache {folder} could not be read back after writing it")
    return _checked(store, fn)


def _zeros(shape) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def _too_large(nbytes: int, max_bytes: int | None) -> str:
    return (
        f"the pixel store would take {nbytes / 2**30:.2f} GiB > max_bytes="
        f"{(max_bytes or 0) / 2**30:.2f} GiB; use the streaming path (pixel_cache='off') or "
        f"raise the limit"
    )


def _load(folder: Path, key: str) -> PixelStore | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return None
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
        valid = np.load(folder / "valid.npy")
    except (OSError, ValueError) as err:
        logger.warning("pixel cache %s is unreadable (%s); decoding again", folder, err)
        return None
    if images.shape[0] != meta["num_rows"] or labels.shape[0] != meta["num_rows"]:
        return None
    bad = [tuple(b) for b in meta.get("bad", [])]
    return PixelStore(images, labels, valid, bad, key, folder)


def _checked(store: PixelStore, fn: Any) -> PixelStore:
    """A store with skipped images used under ``on_bad_image="raise"`` raises like the
    streaming path would (naming the rows)."""
    if store.bad and fn.on_bad_image == "raise":
        from hf_longtail.data.transforms import BadImageError

        rows = [int(r) for r, _ in store.bad]
        finder = getattr(fn, "source_rows", None)
        where = f"row(s) {rows[:20]} of this dataset"
        if finder is not None and len(finder.rows) == store.labels.shape[0]:
            from hf_longtail.data.subsampling import source_row_text

            where = source_row_text(None, finder.split, finder.rows[rows])
        raise BadImageError(
            f"{len(rows)} unreadable image(s) at {where} "
            f"(recorded in the pixel cache {store.path}). Replace or remove them "
            "(hf_longtail.data.find_bad_images lists them), or pass on_bad_image='skip'."
        )
    return store


class PixelStoreDataset(torch.utils.data.Dataset):
    """A map-style dataset over a :class:`PixelStore` that yields what the streaming dataset
    yields (``{"pixel_values": FloatTensor[C,h,w], "labels": int}``), batch-wise.

    ``__getitems__(indices)`` (what ``DataLoader`` calls with a batch of indices) gathers the
    rows, drops unreadable ones, applies ``transform`` to the uint8 batch with a generator seeded
    by ``indices[0].batch_seed`` (a :class:`~hf_longtail.data.samplers.SeededIndex`) or, for
    plain indices, by a draw from torch's global RNG, and returns a
    :class:`~hf_longtail.data.collate.PrecollatedBatch` (a list of row dicts that
    :func:`~hf_longtail.data.collate_fn` turns into the batch without stacking again).
    """

    def __init__(
        self, store: PixelStore, transform: BatchTransform, source_transform: Any = None
    ) -> None:
        self.store = store
        self.transform = transform
        self.labels = store.labels
        # The streaming dataset's transform: skipped rows are counted on it, so
        # bad_image_count(dataset) means the same on both paths.
        self.source_transform = source_transform

    def __len__(self) -> int:
        return int(self.store.labels.shape[0])

    def _generator(self, indices) -> torch.Generator | None:
        if not self.transform.plan.random_ops:
            return None
        seed = getattr(indices[0], "batch_seed", None) if len(indices) else None
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(int(seed))

    def __getitems__(self, indices) -> PrecollatedBatch:
        generator = self._generator(indices)
        rows = np.asarray([int(i) for i in indices], dtype=np.int64)
        keep = self.store.valid[rows]
        if not keep.all():
            if not keep.any():
                from hf_longtail.data.transforms import BadImageError

                raise BadImageError(
                    f"all {rows.size} images of this batch are unreadable (skipped with "
                    "on_bad_image='skip'); list the bad rows with "
                    "hf_longtail.data.find_bad_images(dataset)"
                )
            dropped = rows[~keep].tolist()
            if self.source_transform is not None:
                self.source_transform.num_bad_images += len(dropped)
            logger.warning("skipping unreadable image(s) at row(s) %s of this batch", dropped)
            rows = rows[keep]
        # Sorted reads of the memory map, then back to batch order.
        order = np.argsort(rows, kind="stable")
        gathered = np.empty((rows.size, *self.store.images.shape[1:]), dtype=np.uint8)
        gathered[order] = self.store.images[rows[order]]
        pixels = self.transform(torch.from_numpy(gathered), generator)
        labels = torch.from_numpy(self.store.labels[rows].copy())
        return PrecollatedBatch({"pixel_values": pixels, "labels": labels})

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([index]).batch
        return {"pixel_values": batch["pixel_values"][0], "labels": int(batch["labels"][0])}


def pixel_dataset(
    dataset: Any,
    mode: str = "auto",
    *,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> PixelStoreDataset | None:
    """The fast-path dataset for ``dataset``, or ``None`` to keep the streaming path.

    ``mode``: ``"off"`` -> ``None``; ``"auto"`` -> ``None`` (with an INFO log saying why) when
    ``dataset`` has no ``with_transforms`` transform, the transform has an unsupported op, the
    images differ in size after the prefix, or the store would exceed ``max_bytes``; ``"on"`` ->
    those cases raise (no size limit). ``cache_dir``: where stores are kept; ``None`` uses
    :func:`default_cache_dir` for a dataset backed by Arrow cache files and memory for an
    in-memory one.

    Raises:
        ValueError: unknown ``mode``; with ``"on"``, why the fast path cannot be used.
    """
    if mode not in PIXEL_CACHE_MODES:
        raise ValueError(f"pixel_cache={mode!r} is not valid; use one of {PIXEL_CACHE_MODES}")
    if mode == "off":
        return None
    fn = _transform_of(dataset)
    try:
        if fn is None:
            raise UnsupportedTransformError(
                "the dataset has no transform attached by hf_longtail.data.with_transforms"
            )
        plan = plan_fast_transform(fn.transform)
        if cache_dir is None and getattr(dataset, "cache_files", None):
            cache_dir = default_cache_dir()
        store = build_pixel_store(
            dataset,
            plan,
            cache_dir=cache_dir,
            max_bytes=max_bytes if mode == "auto" else None,
        )
    except (UnsupportedTransformError, PixelStoreTooLargeError) as err:
        if mode == "on":
            raise ValueError(f"pixel_cache='on' cannot be used: {err}") from err
        logger.info("pixel cache not used (streaming PIL path): %s", err)
        return None
    return PixelStoreDataset(store, BatchTransform(plan), fn)
