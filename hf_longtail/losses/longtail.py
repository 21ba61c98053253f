"""``LongTailLoss``: the total loss ``base (+ CCAR) + CAR`` as one module, and ``build_loss``.

The trainer holds one ``LongTailLoss``: ``loss(logits, labels)`` returns the float32 total,
``loss.last_stats`` the detached pieces of the last call for logging, ``loss.set_epoch(epoch)``
drives DRW, and ``loss.state_dict()`` captures all persistent state (the CAR EMA, singular vectors
and step count; the DRW epoch).

The module's train/eval mode matters: CAR advances its EMA only in training mode. The loss is not
a submodule of the model, so whoever drives it must call ``loss.train(model.training)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_longtail.losses._validation import as_class_counts
from hf_longtail.losses.base import BaseLoss, create_base_loss, fp32_region, upcast
from hf_longtail.losses.car import ConfusionSpectralRegularizer
from hf_longtail.losses.ccar import CCARLoss
from hf_longtail.losses.config import LongTailLossConfig

__all__ = ["LongTailLoss", "build_loss", "head_class_mask"]


def head_class_mask(class_counts: Any) -> torch.Tensor:
    """Head classes for the ``ccar_weight_head``/``_tail`` statistics: ``N_c > median(N)``.

    The median is the usual one (mean of the two middle counts for an even ``K``). The tail is
    every other class; a balanced dataset has no head class.
    """
    counts = as_class_counts(class_counts)
    return counts > counts.quantile(0.5)


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
    """

    def __init__(
        self,
        criterion: BaseLoss | CCARLoss,
        regularizer: ConfusionSpectralRegularizer | None = None,
        *,
        config: LongTailLossConfig | None = None,
    ) -> None:
        super().__init__()
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
        self.register_buffer(
            "head_classes", head_class_mask(base.class_counts.double()), persistent=False
        )
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


def build_loss(
    config: LongTailLossConfig | dict[str, Any] | None, class_counts: Any
) -> LongTailLoss:
    """Build the total loss described by ``config`` for the given training-set class counts.

    ``config`` may be a :class:`LongTailLossConfig`, its ``to_dict()`` form or ``None`` (plain
    cross-entropy). CCAR wraps the base loss when ``config.ccar``; CAR is added when
    ``config.car_weight > 0``.
    """
    if config is None:
        config = LongTailLossConfig()
    elif isinstance(config, dict):
        config = LongTailLossConfig.from_dict(config)
    elif not isinstance(config, LongTailLossConfig):
        raise TypeError(
            f"config must be a LongTailLossConfig or a dict; got {type(config).__name__}"
        )
    counts = as_class_counts(class_counts)
    base = create_base_loss(config.base, counts, **config.base_loss_kwargs())
    criterion: BaseLoss | CCARLoss = base
    if config.ccar:
        criterion = CCARLoss(
            counts,
            base=base,
            omega=config.ccar_omega,
            variant=config.ccar_variant,
            detach_weight=config.ccar_detach_weight,
            p_t_from=config.ccar_p_t_from,
            validate=config.validate,
        )
    regularizer = None
    if config.car_enabled:
        regularizer = ConfusionSpectralRegularizer(
            counts,
            alpha=config.car_weight,
            beta=config.car_beta,
            r0=config.car_r0,
            tau=config.car_tau,
            detach_gate=config.car_detach_gate,
            margin=config.car_margin,
            weights=config.car_weights,
            count_offset=config.car_count_offset,
            ema=config.car_ema,
            solver=config.car_solver,
            subspace_size=config.car_subspace_size,
            max_iterations=config.car_max_iterations,
            tol=config.car_tol,
            validate=config.validate,
        )
    return LongTailLoss(criterion, regularizer, config=config)
