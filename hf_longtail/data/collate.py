"""Collate functions: stack transformed rows into a batch, optionally with mixup / cutmix.

Batches are ``{"pixel_values": FloatTensor[B, C, H, W], "labels": ...}`` where ``labels`` is a
``LongTensor[B]`` of class ids, or, after :class:`MixupCollator`, a ``FloatTensor[B, K]`` of soft
targets (each row sums to 1). A loss that receives such a batch must accept soft targets (the
cross-entropy against a distribution, ``-(q * log_softmax(z)).sum(-1)``); hard-label-only
losses should not be combined with mixup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MixupCollator", "PrecollatedBatch", "collate_fn"]


class PrecollatedBatch(list):
    """A batch that a dataset's ``__getitems__`` has already assembled (the pixel-cache fast
    path, :class:`~hf_longtail.data.pixel_store.PixelStoreDataset`): ``batch`` is the finished
    ``{"pixel_values": Tensor[B,C,H,W], "labels": Tensor[B]}``. As a list it holds the rows
    ``{"pixel_values": Tensor[C,H,W] (a view), "labels": int}``, so any row-wise collator still
    works; :func:`collate_fn` returns ``batch`` itself instead of stacking the rows again."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        pixels, labels = batch["pixel_values"], batch["labels"]
        super().__init__(
            {"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(len(labels))
        )
        self.batch = batch


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows ``{"pixel_values": Tensor[C,H,W], "labels": int | Tensor}`` into
    ``{"pixel_values": Tensor[B,C,H,W], "labels": Tensor[B] (long) or Tensor[B,K] (float)}``.

    A :class:`PrecollatedBatch` (the pixel-cache fast path) is returned as already assembled.
    Rows whose ``pixel_values`` is ``None`` (unreadable images skipped by a transform with
    ``on_bad_image="skip"``) are dropped, so the batch is smaller by that many rows.

    Raises:
        ValueError: an empty batch, or a row without ``pixel_values`` / ``labels`` (e.g. the
            transform was not attached, or the Trainer dropped the columns: set
            ``remove_unused_columns=False``).
        BadImageError: every image of the batch was unreadable.
    """
    if isinstance(examples, PrecollatedBatch):
        return dict(examples.batch)
    if not examples:
        raise ValueError("cannot collate an empty batch")
    missing = {"pixel_values", "labels"} - set(examples[0])
    if missing:
        raise ValueError(
            f"rows lack {sorted(missing)} (got keys {sorted(examples[0])}); attach the transform "
            f"with hf_longtail.data.with_transforms / apply_transforms, and with a Trainer set "
            f"remove_unused_columns=False"
        )
    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        from hf_longtail.data.transforms import BadImageError

        raise BadImageError(
            f"all {len(examples)} images of this batch are unreadable (skipped with "
            "on_bad_image='skip'); the data is badly damaged: list the bad rows with "
            "hf_longtail.data.find_bad_images(dataset)"
        )
    examples = kept
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
    first = examples[0]["labels"]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        labels = torch.stack([e["labels"] for e in examples]).float()
    else:
        labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}


class MixupCollator:
    """Collate + mixup / cutmix (``timm.data.Mixup``) producing soft targets.

    For a batch, with probability ``prob``, timm draws ``lam ~ Beta(alpha, alpha)`` and either
    mixes ``x' = lam * x + (1 - lam) * x.flip(0)`` (mixup) or pastes a box of ``x.flip(0)`` covering
    ``1 - lam`` of the area (cutmix; ``lam`` corrected to the box), and the targets become
    ``y' = lam * onehot_s(y) + (1 - lam) * onehot_s(y.flip(0))`` with
    ``onehot_s = (1 - smoothing) * onehot + smoothing / K``. Output ``labels`` is a
    ``FloatTensor[B, K]``: the losses receive soft targets.

    timm requires an even batch; for an odd batch the last row is kept unmixed with the target
    ``onehot_s`` (use ``drop_last=True`` to avoid it). timm draws ``lam`` from NumPy's global RNG,
    which torch's DataLoader seeds differently in each worker process.

    Args:
        num_classes: K.
        mixup_alpha, cutmix_alpha: Beta parameters (0 disables that mode).
        prob: probability of mixing a batch; switch_prob: probability of cutmix when both are on.
        label_smoothing: smoothing inside the soft targets (default 0: leave smoothing to the loss).
        mode: timm mode, ``"batch"`` (one lam per batch), ``"pair"`` or ``"elem"``.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        mode: str = "batch",
    ):
        from timm.data import Mixup

        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: nothing to mix")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def _soft(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        target = torch.full((labels.shape[0], self.num_classes), off, dtype=torch.float32)
        return target.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_fn(examples)
        x, y = batch["pixel_values"], batch["labels"]
        if y.ndim != 1:
            raise ValueError("MixupCollator expects integer class labels, got soft labels")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {y.tolist()}")
        n_even = x.shape[0] - x.shape[0] % 2
        soft = self._soft(y)
        if n_even >= 2:
            x_mix, y_mix = self.mixup(x[:n_even].contiguous(), y[:n_even])
            x = torch.cat([x_mix, x[n_even:]]) if n_even < x.shape[0] else x_mix
            soft = torch.cat([y_mix.float(), soft[n_even:]])
        return {"pixel_values": x, "labels": soft}
