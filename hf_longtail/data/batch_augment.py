"""Per-sample augmentation of whole uint8 batches: the tensor half of the pixel-cache fast path.

A per-image transform pipeline (a torchvision ``v2``/``v1`` ``Compose``, possibly nested, as built
by :mod:`hf_longtail.data.transforms` or by timm) is split by :func:`plan_fast_transform` into
three parts:

1. **prefix** -- the deterministic PIL operations before the first random one (``ToRGB``,
   ``ResizeIfNeeded``, ``Resize``, ``CenterCrop``). They are applied ONCE per image, with the
   very objects of the reference transform, when the pixel store is built
   (:mod:`hf_longtail.data.pixel_store`), so the stored uint8 pixels are exactly those the PIL
   path would have at that point.
2. **random ops** -- applied per sample to a ``uint8`` batch ``[B, C, H, W]`` by
   :class:`BatchTransform`, every parameter drawn from one ``torch.Generator`` per batch:

   - ``RandomCrop(size, padding, fill=<number>, padding_mode="constant")`` (v1/v2): zero (or
     ``fill``) padding then, per sample, ``top ~ U{0..H+pt+pb-h}``, ``left ~ U{0..W+pl+pr-w}``,
     the distribution of torchvision's ``make_params``;
   - ``RandomHorizontalFlip(p)`` (v1/v2): per sample with probability ``p``;
   - ``RandomResizedCrop`` (v1/v2, and timm's ``RandomResizedCropAndInterpolation`` with one
     interpolation): torchvision's 10-attempt scale/log-ratio rejection sampling with its central
     fallback, then a per-sample ``resized_crop`` of the uint8 tensor (antialiased);
   - ``ColorJitter(brightness, contrast, saturation, hue)`` (v1/v2, timm's default
     ``color_jitter=0.4``): per sample a random order of the four adjustments and factors
     ``U[lo, hi]`` as torchvision draws them, applied with the tensor kernels.

3. **tail** -- ``ToImage``, ``ToDtype(float32, scale=True)``, ``Normalize``, ``_Rescale`` (the
   reference objects, applied to the whole batch: element-wise identical to applying them per
   image) and v1 ``ToTensor`` / timm ``MaybeToTensor`` (``x.float().div(255)``, what
   ``to_tensor`` computes for uint8).

Anything else (RandAugment, TrivialAugment, random erasing, rotations, a deterministic op after a
random one, non-constant padding, ``pad_if_needed``, several timm interpolations) raises
:class:`UnsupportedTransformError`, and the caller keeps the streaming PIL path.

Exactness: the eval path (prefix + tail) is pixel-identical to the PIL transform. The random ops
draw the same *distribution* of crop boxes / flips / jitter factors as torchvision, not the same
values (they come from the per-batch generator, which is what makes them independent of the number
of DataLoader workers and exact on a mid-epoch resume); crops and flips are exact copies of the
padded image, the resized crops and colour adjustments use torchvision's tensor kernels instead of
PIL's (differences of a few uint8 levels at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision.transforms as tv1
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "BatchTransform",
    "FastTransformPlan",
    "UnsupportedTransformError",
    "plan_fast_transform",
]


class UnsupportedTransformError(ValueError):
    """The transform has an operation the batched fast path does not implement (the message
    names it); the streaming PIL path must be used."""


def _flatten(transform: Any) -> list[Any]:
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [op for t in inner for op in _flatten(t)]
    return [transform]


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _interpolation(value: Any) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, str):
        return InterpolationMode(value.lower())
    raise UnsupportedTransformError(f"interpolation {value!r} (a random choice) is not supported")


# ------------------------------------------------------------------------------ random ops
class _RandomCrop:
    """Pad (constant ``fill``; ``padding`` = left, top, right, bottom) then a per-sample crop of
    ``size``."""

    per_sample_resize = False

    def __init__(self, size: tuple[int, int], padding: Sequence[int], fill: float) -> None:
        self.size, self.padding, self.fill = size, tuple(int(p) for p in padding), fill

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        left, top, right, bottom = self.padding
        if any(self.padding):
            x = torch.nn.functional.pad(x, (left, right, top, bottom), value=self.fill)
        b, _, height, width = x.shape
        th, tw = self.size
        if th > height or tw > width:
            raise ValueError(
                f"RandomCrop size {self.size} is larger than the padded image ({height}, {width})"
            )
        tops = torch.randint(0, height - th + 1, (b,), generator=g).tolist()
        lefts = torch.randint(0, width - tw + 1, (b,), generator=g).tolist()
        out = x.new_empty((b, x.shape[1], th, tw))
        for k, (i, j) in enumerate(zip(tops, lefts)):
            out[k] = x[k, :, i : i + th, j : j + tw]
        return out

    def key(self) -> str:
        return f"RandomCrop{self.size},pad={self.padding},fill={self.fill}"


class _HorizontalFlip:
    per_sample_resize = False

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=g) < self.p
        if bool(flip.any()):
            x = x.clone()
            x[flip] = x[flip].flip(-1)
        return x

    def key(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class _RandomResizedCrop:
    """torchvision's ``RandomResizedCrop.make_params`` per sample (10 attempts, central fallback),
    then ``resized_crop`` of each uint8 image with antialiasing."""

    per_sample_resize = True
    attempts = 10

    def __init__(self, size, scale, ratio, interpolation: InterpolationMode) -> None:
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation

    def boxes(self, b: int, height: int, width: int, g: torch.Generator) -> list[tuple]:
        """``[(top, left, h, w)] * b``, drawn as torchvision does, from ``g``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        u_area = torch.rand((b, self.attempts), generator=g, dtype=torch.float64)
        u_ratio = torch.rand((b, self.attempts), generator=g, dtype=torch.float64)
        u_pos = torch.rand((b, 2), generator=g, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        ws = torch.round(torch.sqrt(target * aspect)).long()
        hs = torch.round(torch.sqrt(target / aspect)).long()
        ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
        out = []
        for k in range(b):
            hit = torch.nonzero(ok[k])
            if hit.numel():
                a = int(hit[0])
                h, w = int(hs[k, a]), int(ws[k, a])
                i = int(u_pos[k, 0] * (height - h + 1))
                j = int(u_pos[k, 1] * (width - w + 1))
            else:
                in_ratio = width / height
                if in_ratio < min(self.ratio):
                    w, h = width, round(width / min(self.ratio))
                elif in_ratio > max(self.ratio):
                    h, w = height, round(height * max(self.ratio))
                else:
                    h, w = height, width
                i, j = (height - h) // 2, (width - w) // 2
            out.append((i, j, h, w))
        return out

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, height, width = x.shape
        out = x.new_empty((b, c, *self.size))
        for k, (i, j, h, w) in enumerate(self.boxes(b, height, width, g)):
            out[k] = TF.resized_crop(
                x[k], i, j, h, w, list(self.size), self.interpolation, antialias=True
            )
        return out

    def key(self) -> str:
        return f"RandomResizedCrop{self.size},{self.scale},{self.ratio},{self.interpolation.value}"


class _ColorJitter:
    """torchvision ``ColorJitter``: per sample a random permutation of the four adjustments and
    factors uniform in each range (``None`` ranges skipped), applied with the tensor kernels."""

    per_sample_resize = False

    def __init__(self, brightness, contrast, saturation, hue) -> None:
        self.ranges = [brightness, contrast, saturation, hue]
        self.kernels = [
            TF.adjust_brightness,
            TF.adjust_contrast,
            TF.adjust_saturation,
            TF.adjust_hue,
        ]

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        orders = torch.argsort(torch.rand((b, 4), generator=g), dim=1).tolist()
        u = torch.rand((b, 4), generator=g, dtype=torch.float64).tolist()
        out = x.clone()
        for k in range(b):
            image = out[k]
            for op in orders[k]:
                bounds = self.ranges[op]
                if bounds is None:
                    continue
                factor = bounds[0] + (bounds[1] - bounds[0]) * u[k][op]
                image = self.kernels[op](image, factor)
            out[k] = image
        return out

    def key(self) -> str:
        return f"ColorJitter{self.ranges}"


class _ToFloat255:
    """v1 ``ToTensor`` / timm ``MaybeToTensor`` on a uint8 batch: ``x.float().div(255)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div(255)

    def __repr__(self) -> str:
        return "ToFloat255()"


def _jitter_range(value: Any, center: float, bound: tuple[float, float]) -> Any:
    """A v1/v2 ColorJitter attribute -> ``(lo, hi)`` or ``None`` (no adjustment)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value == 0:
            return None
        lo, hi = center - float(value), center + float(value)
        lo = max(lo, bound[0])
        return (lo, min(hi, bound[1]))
    lo, hi = float(value[0]), float(value[1])
    return None if lo == hi == center else (lo, hi)


# ----------------------------------------------------------------------------------- plan
_PREFIX_TYPES = (v2.Resize, v2.CenterCrop, tv1.Resize, tv1.CenterCrop)


@dataclass
class FastTransformPlan:
    """A transform split into its once-per-image ``prefix`` (PIL objects of the reference
    transform), its per-sample batch ``random_ops`` and its float ``tail``."""

    prefix: list[Any] = field(default_factory=list)
    random_ops: list[Any] = field(default_factory=list)
    tail: list[Any] = field(default_factory=list)

    @property
    def per_sample_resize(self) -> bool:
        """True when a random op resizes each image (worth DataLoader workers at large sizes)."""
        return any(op.per_sample_resize for op in self.random_ops)

    def prefix_key(self) -> str:
        """What the stored pixels depend on: the prefix ops and their resize settings."""
        parts = []
        for op in self.prefix:
            attrs = {
                k: getattr(op, k)
                for k in ("size", "interpolation", "max_size", "antialias")
                if hasattr(op, k)
            }
            inner = getattr(op, "resize", None)  # ResizeIfNeeded: its interpolation
            if inner is not None:
                attrs["interpolation"] = getattr(inner, "interpolation", None)
            parts.append(f"{type(op).__module__}.{type(op).__name__}{sorted(attrs.items())}")
        return ";".join(parts)

    def prefix_transform(self):
        """The prefix as one callable (identity when empty)."""
        return v2.Compose(self.prefix) if self.prefix else _Identity()


class _Identity:
    def __call__(self, image: Any) -> Any:
        return image


def _random_op(op: Any) -> Any | None:
    """The batch version of a random op, ``None`` if ``op`` is not one we implement."""
    name = type(op).__name__
    if isinstance(op, (v2.RandomCrop, tv1.RandomCrop)):
        if op.pad_if_needed or op.padding_mode != "constant":
            raise UnsupportedTransformError(
                f"{op!r}: only constant padding without pad_if_needed is supported"
            )
        fill = getattr(op, "fill", 0)
        if isinstance(fill, dict) or not isinstance(fill, (int, float)):
            raise UnsupportedTransformError(f"{op!r}: only a single numeric fill is supported")
        padding = op.padding
        if padding is None:
            padding = [0, 0, 0, 0]
        elif isinstance(op, v2.RandomCrop):  # parsed by v2 as [left, right, top, bottom]
            left, right, top, bottom = padding
            padding = [left, top, right, bottom]
        elif isinstance(padding, int):  # v1 keeps the argument: int, (lr, tb) or (l, t, r, b)
            padding = [padding] * 4
        elif len(padding) == 1:
            padding = list(padding) * 4
        elif len(padding) == 2:
            padding = [padding[0], padding[1], padding[0], padding[1]]
        return _RandomCrop(_pair(op.size), padding, float(fill))
    if isinstance(op, (v2.RandomHorizontalFlip, tv1.RandomHorizontalFlip)):
        return _HorizontalFlip(op.p)
    if isinstance(op, (v2.RandomResizedCrop, tv1.RandomResizedCrop)) or (
        name == "RandomResizedCropAndInterpolation"
    ):
        if isinstance(op, (v2.RandomResizedCrop, tv1.RandomResizedCrop)) and not getattr(
            op, "antialias", True
        ):
            raise UnsupportedTransformError(f"{op!r}: antialias=False is not supported")
        return _RandomResizedCrop(
            _pair(op.size), op.scale, op.ratio, _interpolation(op.interpolation)
        )
    if isinstance(op, (v2.ColorJitter, tv1.ColorJitter)):
        return _ColorJitter(
            _jitter_range(op.brightness, 1.0, (0.0, math.inf)),
            _jitter_range(op.contrast, 1.0, (0.0, math.inf)),
            _jitter_range(op.saturation, 1.0, (0.0, math.inf)),
            _jitter_range(op.hue, 0.0, (-0.5, 0.5)),
        )
    return None


def _tail_op(op: Any) -> Any | None:
    name = type(op).__name__
    if isinstance(op, v2.ToDtype):
        dtype = op.dtype
        if isinstance(dtype, dict):
            dtype = dtype.get(torch.Tensor, dtype.get("others"))
        if dtype is not torch.float32 or not op.scale:
            raise UnsupportedTransformError(f"{op!r}: only ToDtype(float32, scale=True)")
        return op
    if isinstance(op, (v2.ToImage, v2.Normalize, tv1.Normalize)) or name == "_Rescale":
        return op
    if isinstance(op, tv1.ToTensor) or name == "MaybeToTensor":
        return _ToFloat255()
    return None


def plan_fast_transform(transform: Any) -> FastTransformPlan:
    """Split ``transform`` into prefix / random ops / tail (module docstring).

    Raises:
        UnsupportedTransformError: an op outside the supported set, or in an unsupported place
            (the message names it).
    """
    from hf_longtail.data.transforms import ResizeIfNeeded, ToRGB

    plan = FastTransformPlan()
    phase = 0  # 0: prefix, 1: random ops, 2: tail
    for op in _flatten(transform):
        if isinstance(op, (ToRGB, ResizeIfNeeded, *_PREFIX_TYPES)):
            if phase > 0:
                raise UnsupportedTransformError(
                    f"{op!r} comes after a random or tensor op; only a deterministic PIL prefix "
                    f"(ToRGB, ResizeIfNeeded, Resize, CenterCrop) can be applied once"
                )
            plan.prefix.append(op)
            continue
        batch_op = _random_op(op)
        if batch_op is not None:
            if phase > 1:
                raise UnsupportedTransformError(f"{op!r} comes after the tensor conversion")
            phase = 1
            plan.random_ops.append(batch_op)
            continue
        tail = _tail_op(op)
        if tail is not None:
            phase = 2
            plan.tail.append(tail)
            continue
        raise UnsupportedTransformError(
            f"{type(op).__name__} ({op!r}) has no batched implementation"
        )
    if not any(isinstance(op, (v2.ToDtype, _ToFloat255)) for op in plan.tail):
        raise UnsupportedTransformError(
            "the transform does not end in a float tensor (ToDtype(float32, scale=True) or "
            "ToTensor)"
        )
    return plan


class BatchTransform:
    """Apply a plan's random ops and tail to a uint8 batch ``[B, C, H, W]``: returns
    ``FloatTensor[B, C, h, w]``. ``generator`` draws every random parameter (the same generator
    state gives the same batch)."""

    def __init__(self, plan: FastTransformPlan) -> None:
        self.plan = plan

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = batch
        if self.plan.random_ops:
            if generator is None:
                raise ValueError("random ops need a torch.Generator")
            for op in self.plan.random_ops:
                x = op(x, generator)
        for op in self.plan.tail:
            x = op(x)
        return x.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        ops = [op.key() for op in self.plan.random_ops] + [repr(op) for op in self.plan.tail]
        return f"{type(self).__name__}({', '.join(ops)})"
