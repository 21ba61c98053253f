"""Train/eval image transforms and their lazy application to ``datasets`` splits.

Three ways to get a ``(train_transform, eval_transform)`` pair of PIL -> float tensor (C x H x W)
callables, all starting with :class:`ToRGB` (grayscale, RGBA, palette, CMYK and 16-bit images
become 3-channel RGB):

- :func:`cifar_transforms`: the CIFAR-LT protocol for 32x32 from-scratch training
  (random crop 32 with 4-pixel zero padding, horizontal flip, normalise with the CIFAR
  mean/std of the LDAM reference code); eval only normalises.
- :func:`transforms_from_image_processor`: size / crop / mean / std / resample of a transformers
  image processor (train: RandomResizedCrop + flip; eval: resize + centre crop).
- :func:`transforms_from_timm`: ``timm.data.resolve_data_config`` + ``create_transform``.

:func:`build_transforms` picks one of them from a name or an object. Optional ``auto_augment``:
``"randaugment"`` (torchvision ``RandAugment(num_ops=2, magnitude=9)``) or ``"trivialaugment"``
(``TrivialAugmentWide``); for timm they map to ``rand-m9-mstd0.5-inc1`` and the TrivialAugment-
style ``rand-n1-m10-mstd101-p1.0-inc1`` (one op, always applied, uniform magnitude), and any
other timm string is passed through.

:func:`with_transforms` / :func:`apply_transforms` attach them with ``Dataset.with_transform`` so
images are decoded and transformed only when a row is read; rows come out as
``{"pixel_values": FloatTensor[C, H, W], "labels": int}``. When the dataset is given to a
``transformers.Trainer``, set ``remove_unused_columns=False``: the Trainer would otherwise drop
the raw image/label columns that the transform reads.

Unreadable images (truncated or corrupt files, missing files, unknown formats) are decoded by the
transform itself, not by ``datasets``, so that ``on_bad_image`` decides what happens when a batch
meets one: ``"raise"`` (default) raises :class:`BadImageError` (or ``FileNotFoundError``) naming
the file, or for an embedded image its size, hash and label; ``"skip"`` logs it, counts it
(:func:`bad_image_count`) and returns the row with ``pixel_values=None``, which
:func:`~hf_longtail.data.collate.collate_fn` drops from the batch. :func:`find_bad_images` scans a
dataset up front and returns the row index of every unreadable image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from PIL import Image as PILImage
from torchvision.transforms import InterpolationMode, v2

from hf_longtail.data.columns import detect_columns
from hf_longtail.data.subsampling import source_row_text, source_rows, source_split_name

__all__ = [
    "AUTO_AUGMENT",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ON_BAD_IMAGE",
    "TRANSFORM_PROTOCOLS",
    "BadImageError",
    "ImageClassificationTransform",
    "ResizeIfNeeded",
    "SourceRowFinder",
    "ToRGB",
    "apply_transforms",
    "bad_image_count",
    "build_transforms",
    "cifar_transforms",
    "find_bad_images",
    "processor_mean_std",
    "protocol_image_processor",
    "select_transforms",
    "to_rgb",
    "transforms_from_image_processor",
    "transforms_from_timm",
    "with_transforms",
]

#: Normalisation of the CIFAR-LT reference code (LDAM-DRW), used for CIFAR-10 and CIFAR-100 there.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
#: Per-channel statistics of the CIFAR-100 training set.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

logger = logging.getLogger(__name__)

#: Policies for an image that cannot be read (see the module docstring).
ON_BAD_IMAGE = ("raise", "skip")
# What PIL / datasets raise for a file that is missing, truncated, corrupt or not an image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError)


class BadImageError(OSError):
    """An image that cannot be decoded (truncated or corrupt file, unknown format) was met with
    ``on_bad_image="raise"``; the message names the file (or the embedded image) and the fix."""


#: Names accepted by ``auto_augment`` (torchvision ops; timm strings map in ``_TIMM_AUTO_AUGMENT``).
AUTO_AUGMENT = ("randaugment", "trivialaugment")
_TIMM_AUTO_AUGMENT = {
    "randaugment": "rand-m9-mstd0.5-inc1",
    "trivialaugment": "rand-n1-m10-mstd101-p1.0-inc1",
}
# PIL resample codes (what image processors store) -> torchvision modes.
_PIL_TO_TV = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


def to_rgb(image: Any) -> PILImage.Image:
    """Return ``image`` as an 8-bit RGB PIL image.

    - ``RGB``: returned as is.
    - ``RGBA`` / ``LA`` / palette with transparency: alpha-composited onto white (what
      transformers' ``convert_to_rgb`` does), so transparent pixels do not turn black.
    - ``I;16*`` (16-bit grayscale): divided by 257 to 0..255; ``I`` / ``F``: clipped to 0..255
      (``F`` in [0, 1] is first scaled by 255).
    - everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...): ``Image.convert("RGB")``.
    - NumPy arrays (H x W, H x W x 1/3/4; uint8, or float in [0, 1]) are converted first.
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
            array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        image = PILImage.fromarray(array)
    if not isinstance(image, PILImage.Image):
        raise TypeError(
            f"expected a PIL image or a NumPy array, got {type(image).__name__}; is the image "
            f"column a datasets.Image feature?"
        )
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and array.size and array.max() > 255):
            array = array / 257.0
        elif mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return PILImage.fromarray(gray).convert("RGB")
    return image.convert("RGB")


class ToRGB:
    """Transform wrapper of :func:`to_rgb` (picklable, for DataLoader workers)."""

    def __call__(self, image: Any) -> PILImage.Image:
        return to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ResizeIfNeeded:
    """Resize a PIL image to ``(size, size)`` only when it is not already that size (CIFAR images
    pass through untouched; e.g. 8x8 digits are upsampled so that the 32x32 crop applies)."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size = int(size)
        self.resize = v2.Resize((self.size, self.size), interpolation=interpolation, antialias=True)

    def __call__(self, image: PILImage.Image) -> PILImage.Image:
        if image.size == (self.size, self.size):
            return image
        return self.resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class _Rescale:
    """Multiply a float tensor by ``factor`` (image processors with ``rescale_factor != 1/255``)."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.factor:g})"


def _auto_augment_op(auto_augment: str | None, interpolation: InterpolationMode) -> list[Any]:
    if auto_augment is None:
        return []
    name = auto_augment.lower()
    if name == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation)]
    if name == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    raise ValueError(f"unknown auto_augment {auto_augment!r}; choose one of {AUTO_AUGMENT} or None")


def _to_tensor(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Any]:
    ops: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return ops


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB); got mean={mean}, std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive; got {std}")


def cifar_transforms(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    *,
    size: int = 32,
    padding: int = 4,
    auto_augment: str | None = None,
) -> tuple[v2.Compose, v2.Compose]:
    """The CIFAR-LT protocol (Cao et al. 2019):

    - train: ``ToRGB`` -> resize to ``size`` if needed -> ``RandomCrop(size, padding=4)`` (zero
      padding) -> ``RandomHorizontalFlip(0.5)`` -> [auto_augment] -> float in [0, 1] ->
      ``Normalize(mean, std)``;
    - eval: ``ToRGB`` -> resize to ``size`` if needed -> float -> ``Normalize(mean, std)``.
    """
    _check_mean_std(mean, std)
    bilinear = InterpolationMode.BILINEAR
    train = v2.Compose(
        [
            ToRGB(),
            ResizeIfNeeded(size),
            v2.RandomCrop(size, padding=padding),
            v2.RandomHorizontalFlip(0.5),
            *_auto_augment_op(auto_augment, bilinear),
            *_to_tensor(mean, std),
        ]
    )
    eval_ = v2.Compose([ToRGB(), ResizeIfNeeded(size), *_to_tensor(mean, std)])
    return train, eval_


def _size_fields(size: Any) -> dict[str, int]:
    """Normalise an image-processor ``size`` (``SizeDict``, dict, int or (h, w)) to a dict with
    some of ``height``, ``width``, ``shortest_edge``, ``longest_edge``."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    keys = ("height", "width", "shortest_edge", "longest_edge")
    if isinstance(size, dict):
        values = {k: size.get(k) for k in keys}
    else:
        values = {k: getattr(size, k, None) for k in keys}
    return {k: int(v) for k, v in values.items() if v is not None}


def transforms_from_image_processor(
    processor: Any, *, auto_augment: str | None = None, image_size: int | None = None
) -> tuple[v2.Compose, v2.Compose]:
    """Train/eval transforms matching a transformers image processor.

    Output resolution ``(H, W)``: ``crop_size`` when ``do_center_crop``; else ``size`` as
    ``height``/``width``, or ``(s, s)`` for ``shortest_edge = s`` (or ``longest_edge = s``).
    Eval: ``size`` height/width -> ``Resize((h, w))``; ``shortest_edge = s`` -> ``Resize(s)`` (or
    ``Resize(int(s / crop_pct))`` when the processor has a ``crop_pct``, as ConvNeXt does below
    384, and ``Resize((s, s))`` with a ``crop_pct`` at ``s >= 384``, ConvNeXt's warp) followed by a
    centre crop to ``(H, W)`` so that every image in a batch has the same shape; ``longest_edge``
    only -> ``Resize((s, s))``. Train:
    ``RandomResizedCrop((H, W))`` + horizontal flip + [auto_augment]. Both: ``ToRGB`` first, then
    ``pixel = (x * rescale_factor - image_mean) / image_std`` like the processor (no
    normalisation when ``do_normalize`` is False), with the processor's ``resample``.
    ``image_size = s`` replaces the output resolution by ``(s, s)`` and scales the eval resize by
    the same factor (so the processor's crop fraction is kept), e.g. to fine-tune at low
    resolution on CPU.

    Raises:
        ValueError: the processor has no usable ``size``/``crop_size``.
    """
    fields = _size_fields(getattr(processor, "size", None))
    crop = _size_fields(getattr(processor, "crop_size", None))
    do_crop = bool(getattr(processor, "do_center_crop", False)) and bool(crop)
    resample = getattr(processor, "resample", None)
    interpolation = (
        resample
        if isinstance(resample, InterpolationMode)
        else _PIL_TO_TV.get(
            int(resample) if resample is not None else 2, InterpolationMode.BILINEAR
        )
    )
    if "height" in fields and "width" in fields:
        resize: Any = v2.Resize((fields["height"], fields["width"]), interpolation, antialias=True)
        out = (fields["height"], fields["width"])
    elif "shortest_edge" in fields or "longest_edge" in fields:
        edge = fields.get("shortest_edge", fields.get("longest_edge"))
        crop_pct = getattr(processor, "crop_pct", None)
        if "longest_edge" in fields and "shortest_edge" not in fields:
            resize = v2.Resize((edge, edge), interpolation, antialias=True)
        elif crop_pct and edge >= 384:
            # ConvNeXt's rule: at >= 384 the image is warped to a square, no crop.
            resize = v2.Resize((edge, edge), interpolation, antialias=True)
        else:
            resize_to = int(edge / crop_pct) if crop_pct else edge
            resize = v2.Resize(resize_to, interpolation, antialias=True)
        out = (edge, edge)
    else:
        raise ValueError(
            f"cannot read the image size of {type(processor).__name__}: size={processor.size!r}; "
            f"expected height/width, shortest_edge or longest_edge"
        )
    if do_crop:
        out = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
    if image_size is not None:
        factor = int(image_size) / out[0]
        size = resize.size
        scaled = [max(1, round(v * factor)) for v in size] if size is not None else None
        resize = v2.Resize(scaled, interpolation, antialias=True)
        out = (int(image_size), int(image_size))
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    if not getattr(processor, "do_normalize", True):
        mean = std = None
    else:
        _check_mean_std(mean, std)
    tail: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    factor = getattr(processor, "rescale_factor", 1 / 255)
    if not getattr(processor, "do_rescale", True):
        tail.append(_Rescale(255.0))
    elif factor is not None and abs(float(factor) * 255.0 - 1.0) > 1e-6:
        tail.append(_Rescale(float(factor) * 255.0))
    if mean is not None:
        tail.append(v2.Normalize(mean=list(mean), std=list(std)))
    train = v2.Compose(
        [
            ToRGB(),
            v2.RandomResizedCrop(out, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            *_auto_augment_op(auto_augment, interpolation),
            *tail,
        ]
    )
    eval_ = v2.Compose([ToRGB(), resize, v2.CenterCrop(out), *tail])
    return train, eval_


def transforms_from_timm(
    model_or_config: Any, *, auto_augment: str | None = None, image_size: int | None = None
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """Train/eval transforms from a timm model or data config.

    ``model_or_config``: a timm model (``timm.data.resolve_data_config(model=model)``), a dict
    already in data-config form (``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``) or a ``pretrained_cfg`` dict (resolved). The transforms are
    ``timm.data.create_transform(**config, is_training=True/False)`` (train: random-resized crop,
    flip, [auto_augment]; eval: resize + centre crop by ``crop_pct``), preceded by ``ToRGB``.
    ``image_size = s`` sets ``input_size`` to ``(C, s, s)`` (mean, std, interpolation and
    ``crop_pct`` unchanged).
    """
    from timm.data import create_transform, resolve_data_config

    if isinstance(model_or_config, dict):
        if "input_size" in model_or_config:
            config = dict(model_or_config)
        else:
            config = resolve_data_config(pretrained_cfg=model_or_config)
    elif isinstance(model_or_config, torch.nn.Module):
        config = resolve_data_config(model=model_or_config)
    else:
        raise TypeError(
            f"expected a timm model or a data-config dict, got {type(model_or_config).__name__}"
        )
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: v for k, v in config.items() if k in keep}
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], int(image_size), int(image_size))
    aa = None
    if auto_augment is not None:
        aa = _TIMM_AUTO_AUGMENT.get(auto_augment.lower(), auto_augment)
    train = v2.Compose([ToRGB(), create_transform(**config, is_training=True, auto_augment=aa)])
    eval_ = v2.Compose([ToRGB(), create_transform(**config, is_training=False)])
    return train, eval_


def build_transforms(
    source: Any = "cifar", *, auto_augment: str | None = None, image_size: int | None = None
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(train_transform, eval_transform)`` from ``source``:

    - ``"cifar"`` / ``"cifar10"``: :func:`cifar_transforms` with ``CIFAR10_MEAN/STD``;
      ``"cifar100"``: with ``CIFAR100_MEAN/STD``;
    - a transformers image processor (has ``image_mean`` and ``size``):
      :func:`transforms_from_image_processor`;
    - a timm model (``pretrained_cfg`` attribute), a data-config dict or transformers'
      ``TimmWrapperImageProcessor`` (its ``data_config``): :func:`transforms_from_timm`.

    ``image_size`` overrides the output side (the CIFAR protocol's ``size``, the model's input
    size) without changing the normalisation.
    """
    if isinstance(source, str):
        key = source.lower().replace("-", "").replace("_", "")
        size = {"size": int(image_size)} if image_size is not None else {}
        if key in ("cifar", "cifar10"):
            return cifar_transforms(CIFAR10_MEAN, CIFAR10_STD, auto_augment=auto_augment, **size)
        if key == "cifar100":
            return cifar_transforms(CIFAR100_MEAN, CIFAR100_STD, auto_augment=auto_augment, **size)
        raise ValueError(
            f"unknown transform preset {source!r}; use 'cifar10', 'cifar100', an image processor, "
            f"a timm model or a timm data config"
        )
    if hasattr(source, "image_mean") and hasattr(source, "size"):
        return transforms_from_image_processor(
            source, auto_augment=auto_augment, image_size=image_size
        )
    if isinstance(getattr(source, "data_config", None), dict):
        # transformers' TimmWrapperImageProcessor: the timm data config of the checkpoint.
        return transforms_from_timm(
            source.data_config, auto_augment=auto_augment, image_size=image_size
        )
    if isinstance(source, dict) or hasattr(source, "pretrained_cfg"):
        return transforms_from_timm(source, auto_augment=auto_augment, image_size=image_size)
    raise TypeError(
        f"cannot build transforms from {type(source).__name__}; pass 'cifar10', 'cifar100', a "
        f"transformers image processor, a timm model or a timm data-config dict"
    )


#: ``train_transform`` choices of :func:`select_transforms` (and ``scripts/train.py``).
TRANSFORM_PROTOCOLS = ("auto", "model", "pad_crop", "cifar", "cifar10", "cifar100")


def protocol_image_processor(protocol: str, image_size: int | None = None) -> Any:
    """A transformers image processor doing the evaluation preprocessing of a CIFAR protocol
    (``"cifar"``/``"cifar10"``/``"cifar100"``: resize to the side, default 32, bilinear ->
    rescale to [0, 1] -> normalise with the protocol's mean/std), to save beside a model that
    has none, so ``pipeline("image-classification", dir)`` and ``AutoImageProcessor`` preprocess
    images the way the model was evaluated. Raises ``ValueError`` for another protocol."""
    from transformers import ViTImageProcessor

    key = protocol.lower().replace("-", "").replace("_", "")
    stats = {"cifar": (CIFAR10_MEAN, CIFAR10_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
    stats["cifar100"] = (CIFAR100_MEAN, CIFAR100_STD)
    if key not in stats:
        raise ValueError(f"protocol {protocol!r} is not a CIFAR protocol ({sorted(stats)}).")
    mean, std = stats[key]
    side = int(image_size) if image_size is not None else 32
    return ViTImageProcessor(
        do_resize=True,
        size={"height": side, "width": side},
        resample=PILImage.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def processor_mean_std(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a transformers image processor or a timm ``TimmWrapperImageProcessor``."""
    config = getattr(processor, "data_config", None)
    if isinstance(config, dict) and "mean" in config:
        return tuple(config["mean"]), tuple(config["std"])
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(processor).__name__} has no mean/std to normalise with.")
    return tuple(mean), tuple(std)


def _processor_size(processor: Any) -> int:
    config = getattr(processor, "data_config", None)
    if isinstance(config, dict) and "input_size" in config:
        return int(config["input_size"][-1])
    fields = _size_fields(getattr(processor, "crop_size", None)) or _size_fields(
        getattr(processor, "size", None)
    )
    for key in ("height", "shortest_edge", "longest_edge"):
        if key in fields:
            return int(fields[key])
    raise ValueError(f"cannot read the input size of {type(processor).__name__}.")


def select_transforms(
    protocol: str,
    processor: Any = None,
    *,
    image_size: int | None = None,
    auto_augment: str | None = None,
) -> tuple[str, Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(resolved protocol, train transform, eval transform)`` for a model and a protocol name.

    ``protocol``: ``"auto"`` (``"model"`` when the model has an image processor, else
    ``"cifar"``), ``"model"`` (the processor's preprocessing, :func:`build_transforms`: random-
    resized crops for training, resize + centre crop for evaluation), ``"pad_crop"`` (the CIFAR
    protocol's geometry -- resize to the side, 1/8-side zero padding + random crop, flip; eval
    only resizes -- normalised with the *model's* mean/std: for small, centred images such as
    digits, where a random-resized crop of 8% of the image destroys the object; a model without
    a processor gets the plain CIFAR protocol), or ``"cifar"``/``"cifar10"``/``"cifar100"`` (the
    CIFAR protocol with that dataset's mean/std). ``image_size`` overrides the output side in
    every case. Raises ``ValueError`` for an unknown protocol, or ``"model"`` without a
    processor.
    """
    if protocol not in TRANSFORM_PROTOCOLS:
        raise ValueError(f"train_transform={protocol!r}: use one of {list(TRANSFORM_PROTOCOLS)}.")
    if protocol == "auto" or (protocol == "pad_crop" and processor is None):
        protocol = "cifar" if processor is None else "model"
    if protocol == "model" and processor is None:
        raise ValueError(
            "train_transform='model' but the model has no image processor; use "
            "train_transform='cifar10' (or 'cifar100')."
        )
    if protocol == "pad_crop":
        mean, std = processor_mean_std(processor)
        size = int(image_size) if image_size is not None else _processor_size(processor)
        train, eval_ = cifar_transforms(
            mean, std, size=size, padding=max(1, size // 8), auto_augment=auto_augment
        )
    elif protocol == "model":
        train, eval_ = build_transforms(processor, auto_augment=auto_augment, image_size=image_size)
    else:
        train, eval_ = build_transforms(protocol, auto_augment=auto_augment, image_size=image_size)
    return protocol, train, eval_


def _describe_image(value: Any, label: Any) -> str:
    if value is None or (
        isinstance(value, dict) and not value.get("path") and not value.get("bytes")
    ):
        return f"missing image (None, label {label})"
    if isinstance(value, str):
        return f"image file {value!r} (label {label})"
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        if data is None and path:
            return f"image file {path!r} (label {label})"
        if data is not None:
            digest = hashlib.sha1(data).hexdigest()[:12]
            name = f" {path!r}" if path else ""
            return f"embedded image{name} ({len(data)} bytes, sha1 {digest}..., label {label})"
    return f"image of type {type(value).__name__} (label {label})"


def _decode_image(decoder: ImageFeature, value: Any) -> Any:
    if value is None or (
        isinstance(value, dict) and not value.get("path") and not value.get("bytes")
    ):
        raise ValueError("the row has no image")
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if isinstance(value, dict):
        return decoder.decode_example(value)
    return value  # already decoded (PIL image or array)


class SourceRowFinder:
    """Names the source row(s) of an image the transform could not read.

    A batch transform sees column values only, not row numbers, so when an image fails the
    finder looks it up: the rows of ``dataset`` (mapped to the source split by
    :func:`~hf_longtail.data.subsampling.source_rows`) whose image has the same path, or the same
    bytes (candidates narrowed by label and byte length, read from the Arrow offsets), or no
    image at all. Nothing is computed until an image fails; the per-row lengths and labels are
    then kept for the next one. Pickles without its cache (a memory-mapped table pickles as its
    file path), so DataLoader workers can carry it.
    """

    def __init__(self, dataset: Dataset, image_column: str, label_column: str) -> None:
        from hf_longtail.data.subsampling import source_rows, source_split_name

        self.table = dataset.data
        self.rows = source_rows(dataset)
        self.split = source_split_name(dataset)
        self.image_column = image_column
        self.label_column = label_column
        self._columns: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_columns": None}

    def __deepcopy__(self, memo: dict) -> SourceRowFinder:
        return self  # read-only after construction: copies of the dataset may share it

    def _lengths_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        if self._columns is None:
            import pyarrow.compute as pc

            column = self.table.column(self.image_column)
            if pa.types.is_struct(column.type):
                data = pc.struct_field(column, "bytes")
            else:
                data = column
            lengths = pc.fill_null(pc.binary_length(data), -1).to_numpy()
            labels = self.table.column(self.label_column).to_numpy(zero_copy_only=False)
            self._columns = (np.asarray(lengths), np.asarray(labels))
        return self._columns

    def _matches(self, rows: np.ndarray, value: Any, label: Any) -> np.ndarray:
        import pyarrow.compute as pc

        column = self.table.column(self.image_column)
        struct = pa.types.is_struct(column.type)
        lengths, labels = self._lengths_and_labels()
        rows = rows[labels[rows] == label] if label is not None else rows
        if isinstance(value, str):
            value = {"path": value, "bytes": None}
        if not isinstance(value, dict) or (not value.get("path") and not value.get("bytes")):
            if not struct:
                valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
                return rows[~valid[rows]]
            missing = pc.and_kleene(
                pc.is_null(pc.struct_field(column, "bytes")),
                pc.is_null(pc.struct_field(column, "path")),
            )
            missing = pc.or_kleene(pc.is_null(column), missing)
            return rows[missing.to_numpy(zero_copy_only=False)[rows]]
        if value.get("bytes") is not None:
            data = value["bytes"]
            candidates = rows[lengths[rows] == len(data)]
            if not candidates.size:
                return candidates
            taken = column.take(pa.array(candidates))
            stored = pc.struct_field(taken, "bytes").to_pylist() if struct else taken.to_pylist()
            return candidates[np.asarray([b == data for b in stored], dtype=bool)]
        paths = pc.struct_field(column, "path") if struct else column
        equal = pc.fill_null(pc.equal(paths, value["path"]), False)
        return rows[equal.to_numpy(zero_copy_only=False)[rows]]

    def find(self, value: Any, label: Any = None) -> list[int]:
        """Source rows holding ``value`` (an undecoded image: path, ``{"bytes", "path"}`` or
        ``None``) with ``label``, sorted; ``[]`` if it cannot be found."""
        try:
            found = self._matches(self.rows, value, label)
            if not found.size:  # the dataset was subset after the finder was made
                found = self._matches(np.arange(len(self.table)), value, label)
        except (pa.ArrowException, KeyError, ValueError, TypeError, IndexError):
            return []  # naming the row is a courtesy; it must never hide the real error
        return sorted({int(r) for r in found})

    def describe(self, value: Any, label: Any = None) -> str:
        """``" at row 17 of the source's 'train' split"`` (leading space), or ``""`` if the image
        cannot be found."""
        rows = self.find(value, label)
        if not rows:
            return ""
        text = source_row_text(None, self.split, rows)
        if len(rows) > 1:
            text += " (identical images)"
        return f" at {text}"


class ImageClassificationTransform:
    """Batch transform for ``Dataset.set_transform``: reads ``image_column`` and ``label_column``
    of a batch (lists) and returns ``{"pixel_values": [FloatTensor[C,H,W], ...],
    "labels": [int, ...]}``. Picklable, so it works in DataLoader worker processes.

    Images may arrive decoded (PIL / NumPy) or undecoded (``{"bytes", "path"}`` dicts of an
    ``Image(decode=False)`` column, or path strings); undecoded ones are decoded here exactly as
    ``datasets.Image(mode=image_mode)`` would, and an unreadable one follows ``on_bad_image``:
    ``"raise"`` raises :class:`BadImageError` (``FileNotFoundError`` for a missing file) naming
    it; ``"skip"`` logs it, adds 1 to ``num_bad_images`` (a per-process count: each DataLoader
    worker has its own copy) and returns ``None`` as its ``pixel_values``.
    """

    def __init__(
        self,
        transform: Callable[[Any], torch.Tensor],
        image_column: str,
        label_column: str,
        *,
        on_bad_image: str = "raise",
        image_mode: str | None = None,
        source_rows: SourceRowFinder | None = None,
    ):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}; got {on_bad_image!r}")
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.on_bad_image = on_bad_image
        self.num_bad_images = 0
        self._decoder = ImageFeature(mode=image_mode)
        self.source_rows = source_rows

    def _pixels(self, value: Any, label: Any) -> torch.Tensor | None:
        try:
            image = _decode_image(self._decoder, value)
        except _DECODE_ERRORS as err:
            what = _describe_image(value, label)
            if self.source_rows is not None:
                what += self.source_rows.describe(value, label)
            if self.on_bad_image == "skip":
                self.num_bad_images += 1
                logger.warning(
                    "skipping unreadable %s: %s: %s (%d skipped so far in this process)",
                    what,
                    type(err).__name__,
                    err,
                    self.num_bad_images,
                )
                return None
            fix = (
                "Replace or remove it (hf_longtail.data.find_bad_images(dataset) lists the row "
                "of every unreadable image), or pass on_bad_image='skip' to drop such images "
                "from their batch."
            )
            if isinstance(err, FileNotFoundError):
                raise FileNotFoundError(f"{what} does not exist. {fix}") from err
            raise BadImageError(
                f"cannot decode {what}: {type(err).__name__}: {err}. {fix}"
            ) from err
        return self.transform(image)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        labels = [int(y) for y in batch[self.label_column]]
        images = batch[self.image_column]
        return {
            "pixel_values": [self._pixels(image, y) for image, y in zip(images, labels)],
            "labels": labels,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_column={self.image_column!r}, "
            f"label_column={self.label_column!r}, on_bad_image={self.on_bad_image!r}, "
            f"transform={self.transform!r})"
        )


def bad_image_count(dataset: Dataset) -> int:
    """How many unreadable images the transform attached by :func:`with_transforms` (with
    ``on_bad_image="skip"``) has skipped so far in this process (0 if no such transform)."""
    transform = (dataset.format.get("format_kwargs") or {}).get("transform")
    return int(getattr(transform, "num_bad_images", 0))


def find_bad_images(
    dataset: Dataset, image_column: str | None = None, *, batch_size: int = 256
) -> list[tuple[int, str]]:
    """Decode every image of ``dataset`` and return ``(row, error)`` for each unreadable one
    (missing, truncated or corrupt file, unknown format).

    ``row`` is the index in ``dataset`` (drop the rows with
    ``dataset.select(sorted(set(range(len(dataset))) - bad_rows))``); ``error`` is the decoding
    error followed by where the image is in the *source* split (``"(row 17 of the source's
    'train' split, file ...)"``, see :func:`~hf_longtail.data.subsampling.source_rows`: for a
    long-tailed subset the two rows differ) and its file, where there is one. A pre-flight
    scan (it decodes the whole column once, any transform set on the dataset is ignored).
    """
    if image_column is None:
        from hf_longtail.data.columns import detect_image_column

        image_column = detect_image_column(dataset.features)
    feature = dataset.features[image_column]
    mode = feature.mode if isinstance(feature, ImageFeature) else None
    raw = dataset.with_format(None).select_columns([image_column])
    if isinstance(feature, ImageFeature):
        raw = raw.cast_column(image_column, ImageFeature(mode=mode, decode=False))
    decoder = ImageFeature(mode=mode)
    origin, split = source_rows(dataset), source_split_name(dataset)
    bad: list[tuple[int, str]] = []
    for start in range(0, len(raw), batch_size):
        values = raw[start : start + batch_size][image_column]
        for offset, value in enumerate(values):
            try:
                _decode_image(decoder, value)
            except _DECODE_ERRORS as err:
                row = start + offset
                path = value if isinstance(value, str) else (value or {}).get("path")
                where = source_row_text(None, split, [origin[row]])
                where += f", file {path}" if path else ""
                bad.append((row, f"{type(err).__name__}: {err} ({where})"))
    return bad


def with_transforms(
    dataset: Dataset,
    transform: Callable[[Any], torch.Tensor],
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    on_bad_image: str = "raise",
) -> Dataset:
    """A copy of ``dataset`` whose rows are transformed on access (``Dataset.with_transform``,
    restricted to the image and label columns so no other column is decoded): rows read as
    ``{"pixel_values": FloatTensor[C,H,W], "labels": int}``. Columns are detected as in
    ``detect_columns`` unless given.

    The copy's image column is ``Image(decode=False)`` (a metadata cast, nothing is copied) and
    the transform decodes each image, so ``on_bad_image`` (``"raise"`` or ``"skip"``, see
    :class:`ImageClassificationTransform`) governs unreadable files."""
    image_column, label_column = detect_columns(dataset, image_column, label_column)
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}; got {on_bad_image!r}")
    feature = dataset.features[image_column]
    mode = feature.mode if isinstance(feature, ImageFeature) else None
    if isinstance(feature, ImageFeature) and feature.decode:
        dataset = dataset.cast_column(image_column, ImageFeature(mode=mode, decode=False))
    fn = ImageClassificationTransform(
        transform,
        image_column,
        label_column,
        on_bad_image=on_bad_image,
        image_mode=mode,
        source_rows=SourceRowFinder(dataset, image_column, label_column),
    )
    return dataset.with_transform(fn, columns=[image_column, label_column])


def apply_transforms(
    dataset: DatasetDict,
    train_transform: Callable[[Any], torch.Tensor],
    eval_transform: Callable[[Any], torch.Tensor],
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    train_split: str = "train",
    on_bad_image: str = "raise",
) -> DatasetDict:
    """A new ``DatasetDict``: ``train_split`` with ``train_transform`` and every other split with
    ``eval_transform``, via :func:`with_transforms` (lazy; the splits' data are shared;
    ``on_bad_image`` as there)."""
    image_column, label_column = detect_columns(dataset, image_column, label_column)
    return DatasetDict(
        {
            name: with_transforms(
                split,
                train_transform if name == train_split else eval_transform,
                image_column,
                label_column,
                on_bad_image=on_bad_image,
            )
            for name, split in dataset.items()
        }
    )
