"""``LongTailLoss``: the total loss ``base (+ CCAR) + CAR`` as one module, and ``build_loss``.

The trainer holds one ``LongTailLoss``: ``loss(logits, labels)`` returns the float32 total,
``loss.last_stats`` the detached pieces of the last call for logging, ``loss.set_epoch(epoch)``
drives DRW, and ``loss.state_dict()`` captures all persistent state (the CAR EMA, singular vectors
and step count; the DRW epoch).

The module's train/eval mode matters: CAR advances its EMA only in training mode. The loss is not
a submodule of the model, so whoever drives it must call ``loss.train(model.training)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from hf_longtail.class_counts import DEFAULT_THRESHOLDS, ClassCounts, check_thresholds
from hf_longtail.losses._validation import as_class_counts
from hf_longtail.losses.base import BaseLoss, create_base_loss, fp32_region, upcast
from hf_longtail.losses.car import ConfusionSpectralRegularizer
from hf_longtail.losses.ccar import CCARLoss
from hf_longtail.losses.config import LongTailLossConfig

__all__ = ["LOSS_CONFIG_NAME", "LOSS_WEIGHTS_NAME", "LongTailLoss", "build_loss", "head_class_mask"]

# The files written by LongTailLoss.save_pretrained (next to a model's config.json/safetensors).
LOSS_CONFIG_NAME = "longtail_loss.json"
LOSS_WEIGHTS_NAME = "longtail_loss.safetensors"


def head_class_mask(
    class_counts: Any, many_threshold: float = DEFAULT_THRESHOLDS["many"]
) -> torch.Tensor:
    """Head classes for the ``ccar_weight_head``/``_tail`` statistics: the many-shot classes,
    ``N_c > many_threshold`` (default 100), the shot-group rule the metrics and the model card
    use (:meth:`hf_longtail.class_counts.ClassCounts.many_shot`). The tail is every other class
    (medium- and few-shot)."""
    return torch.tensor(ClassCounts.coerce(class_counts).many_shot(many_threshold))


class LongTailLoss(nn.Module):
    """Total loss ``criterion + regularizer``: base loss (optionally under CCAR) plus CAR.

    ``forward(logits, labels)`` returns a float32 scalar whatever the logits' dtype and fills
    ``last_stats`` with detached float32 scalars of that call (only the keys that apply):

    - ``base_loss``: batch mean of the (class-weighted) base loss, before CCAR;
    - ``ccar_loss``, ``ccar_weight_mean``: CCAR-weighted loss and mean weight ``Omega``;
    - ``ccar_weight_head`` / ``ccar_weight_tail``: mean ``Omega`` over the batch samples of head /
      tail classes (:func:`head_class_mask`); absent when the batch has no such sample;
    - ``car_sigma``, ``car_loss``: ``sigma_max(Cbar diag(w))`` and ``alpha * sigma``;
    - ``loss``: the total.

    Args:
        criterion: a :class:`BaseLoss` or a :class:`CCARLoss`.
        regularizer: a :class:`ConfusionSpectralRegularizer` or ``None``.
        config: the config it was built from (kept for serialization), optional.
        class_names: the class names, kept for the saved files and the model card, optional.
        many_threshold: head classes of the statistics have more training samples than this
            (the many-shot rule of :mod:`hf_longtail.class_counts`; default 100).

    ``save_pretrained(dir)`` / ``from_pretrained(dir)`` write and rebuild the exact loss: its
    config, class counts and names (``longtail_loss.json``) and its state (CAR EMA, singular
    vectors, step; the DRW epoch) in ``longtail_loss.safetensors``.
    """

    def __init__(
        self,
        criterion: BaseLoss | CCARLoss,
        regularizer: ConfusionSpectralRegularizer | None = None,
        *,
        config: LongTailLossConfig | None = None,
        class_names: list[str] | None = None,
        many_threshold: float = DEFAULT_THRESHOLDS["many"],
    ) -> None:
        super().__init__()
        check_thresholds(many_threshold, many_threshold)  # a number
        if not isinstance(criterion, (BaseLoss, CCARLoss)):
            raise TypeError(
                f"criterion must be a BaseLoss or CCARLoss, got {type(criterion).__name__}"
            )
        base = criterion.base if isinstance(criterion, CCARLoss) else criterion
        if regularizer is not None and regularizer.num_classes != base.num_classes:
            raise ValueError(
                f"criterion has {base.num_classes} classes but the regularizer has "
                f"{regularizer.num_classes}"
            )
        self.criterion = criterion
        self.regularizer = regularizer
        self.config = config
        self.num_classes = base.num_classes
        if class_names is not None and len(class_names) != base.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but the loss has "
                f"{base.num_classes} classes"
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.register_buffer(
            "head_classes",
            head_class_mask(base.class_counts.double(), many_threshold),
            persistent=False,
        )
        self.many_threshold = many_threshold
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def base_loss(self) -> BaseLoss:
        """The per-sample base loss (inside CCAR if CCAR is on)."""
        return self.criterion.base if isinstance(self.criterion, CCARLoss) else self.criterion

    def set_epoch(self, epoch: float) -> None:
        """Set the (fractional) training epoch; drives deferred re-weighting."""
        self.base_loss.set_epoch(epoch)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Float32 total loss of the batch; see the class docstring for ``last_stats``."""
        checked = self.base_loss.check(logits, labels)
        stats: dict[str, torch.Tensor] = {}
        with fp32_region(logits):
            z = upcast(logits)
            if isinstance(self.criterion, CCARLoss):
                out = self.criterion.compute(z, checked)
                total = out["loss"]
                weight = out["weight"].detach()
                stats["base_loss"] = out["base"].detach().mean()
                stats["ccar_loss"] = total.detach()
                stats["ccar_weight_mean"] = weight.mean()
                head = self.head_classes[checked.labels].to(weight.dtype)
                n_head = float(head.sum())
                w_head = (weight * head).sum()
                if n_head > 0:
                    stats["ccar_weight_head"] = w_head / n_head
                if n_head < weight.numel():
                    stats["ccar_weight_tail"] = (weight.sum() - w_head) / (weight.numel() - n_head)
            else:
                total = self.criterion.compute(z, checked).loss.mean()
                stats["base_loss"] = total.detach()
            if self.regularizer is not None:
                sigma = self.regularizer.compute_sigma(z, checked.labels)
                car = self.regularizer.alpha * sigma
                stats["car_sigma"] = sigma.detach()
                stats["car_loss"] = car.detach()
                total = total + car
        total = total.float()
        stats["loss"] = total.detach()
        self.last_stats = {k: v.float() for k, v in stats.items()}
        return total

    # ------------------------------------------------------------------ files (peft style)
    @property
    def class_counts(self) -> list[int]:
        """The training-set class counts the loss was built from."""
        return ClassCounts(self.base_loss.class_counts).to_list()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``longtail_loss.json`` (config, counts, names) and ``longtail_loss.safetensors``.

        The state is written first and the JSON last (each atomically, through a temporary file
        renamed into place), so a directory holding the JSON holds the matching state.
        """
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = self.config if self.config is not None else LongTailLossConfig()
        tensors = {
            k: v.detach().to("cpu").contiguous().clone()
            for k, v in self.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        weights = os.path.join(save_directory, LOSS_WEIGHTS_NAME)
        save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
        os.replace(weights + ".tmp", weights)
        meta = {
            "config": config.to_dict(),
            "class_counts": self.class_counts,
            "class_names": self.class_names,
            "many_threshold": self.many_threshold,
        }
        path = os.path.join(save_directory, LOSS_CONFIG_NAME)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
    ) -> LongTailLoss:
        """Rebuild the loss written by :meth:`save_pretrained`: same config, counts and state.

        Raises ``FileNotFoundError`` naming the missing file, ``ValueError`` if the state does not
        match the config (e.g. a file edited by hand).
        """
        from safetensors.torch import load_file

        path = os.path.join(directory, LOSS_CONFIG_NAME)
        weights = os.path.join(directory, LOSS_WEIGHTS_NAME)
        for needed in (path, weights):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f"{needed} not found: {directory} holds no loss written by "
                    "LongTailLoss.save_pretrained"
                )
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        loss = build_loss(
            meta["config"],
            meta["class_counts"],
            class_names=meta.get("class_names"),
            many_threshold=meta.get("many_threshold", DEFAULT_THRESHOLDS["many"]),
        )
        state = load_file(weights, device=str(map_location))
        missing, unexpected = loss.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match the loss in {path}: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return loss.to(map_location)


def build_loss(
    config: LongTailLossConfig | dict[str, Any] | None,
    class_counts: Any,
    *,
    class_names: list[str] | None = None,
    many_threshold: float = DEFAULT_THRESHOLDS["many"],
) -> LongTailLoss:
    """Build the total loss described by ``config`` for the given training-set class counts.

    ``config`` may be a :class:`LongTailLossConfig`, its ``to_dict()`` form or ``None`` (plain
    cross-entropy). CCAR wraps the base loss when ``config.ccar``; CAR is added when
    ``config.car_weight > 0``. ``class_counts``: a list, array, tensor or
    :class:`~hf_longtail.class_counts.ClassCounts` (whose names serve when ``class_names`` is
    ``None``).
    """
    if config is None:
        config = LongTailLossConfig()
    elif isinstance(config, dict):
        config = LongTailLossConfig.from_dict(config)
    elif not isinstance(config, LongTailLossConfig):
        raise TypeError(
            f"config must be a LongTailLossConfig or a dict; got {type(config).__name__}"
        )
    if class_names is None and isinstance(class_counts, ClassCounts) and class_counts.names:
        class_names = list(class_counts.names)
    counts = as_class_counts(class_counts)
    base = create_base_loss(config.base, counts, **config.base_loss_kwargs())
    criterion: BaseLoss | CCARLoss = base
    if config.ccar:
        criterion = CCARLoss(counts, base=base, **config.ccar_kwargs())
    regularizer = None
    if config.car_enabled:
        regularizer = ConfusionSpectralRegularizer(counts, **config.car_kwargs())
    return LongTailLoss(
        criterion,
        regularizer,
        config=config,
        class_names=class_names,
        many_threshold=many_threshold,
    )
