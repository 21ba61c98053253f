"""Long-tail losses: CCAR, CAR and the long-tail baselines (pure PyTorch).

This package imports nothing but torch: no transformers, no datasets, no other hf_longtail
sub-package (only the dependency-free :mod:`hf_longtail.class_counts`, whose zero-count rule the
metrics share). Every loss takes logits ``(B, K)``, integer labels ``(B,)`` (or soft targets
``(B, K)`` where supported) and is built from the training-set class counts.

Quick start::

    from hf_longtail.losses import LongTailLossConfig, build_loss

    loss_fn = build_loss(LongTailLossConfig(base="ce", ccar=True, car_weight=0.5), class_counts)
    loss = loss_fn(logits, labels)  # float32 scalar; loss_fn.last_stats for logging
    loss_fn.set_epoch(epoch)        # drives deferred re-weighting (drw_epoch)

Components:

- :class:`CCARLoss` -- confidence- and class-aware reweighting of a base loss (arXiv 2601.15924);
- :class:`ConfusionSpectralRegularizer` -- CAR, ``alpha * sigma_max`` of the EMA
  frequency-weighted confusion matrix (arXiv 2603.16732), fast power-iteration implementation;
- base losses by name (``ce``, ``focal``, ``cb``, ``ldam``, ``la``, ``bs``):
  :func:`create_base_loss`, :func:`register_base_loss`, :func:`list_base_losses`;
- :class:`LongTailLossConfig` / :func:`build_loss` / :class:`LongTailLoss` -- the total loss;
- :func:`post_hoc_logit_adjust` and the other pure functions of :mod:`.functional`.

Numerics: all losses run in float32 with autocast disabled (float64 input stays float64), so
bf16/fp16 logits give a float32 loss; they are finite at logits of +-1e4. Inputs are validated
(shapes, class count vs logits width, label range, finite logits) before any work.
"""

from hf_longtail.losses.base import (
    BalancedSoftmaxLoss,
    BaseLoss,
    CELoss,
    ClassBalancedLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    create_base_loss,
    list_base_losses,
    register_base_loss,
)
from hf_longtail.losses.car import (
    ConfusionSpectralRegularizer,
    car_class_weights,
    confusion_batch_columns,
)
from hf_longtail.losses.ccar import CCARLoss
from hf_longtail.losses.config import LongTailLossConfig
from hf_longtail.losses.functional import (
    ccar_weight,
    class_frequencies,
    effective_number_weights,
    explicit_class_weights,
    ldam_margins,
    log_class_prior,
    post_hoc_logit_adjust,
)
from hf_longtail.losses.total_loss import LongTailLoss, build_loss, head_class_mask

__all__ = [
    "BalancedSoftmaxLoss",
    "BaseLoss",
    "CCARLoss",
    "CELoss",
    "ClassBalancedLoss",
    "ConfusionSpectralRegularizer",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "LongTailLoss",
    "LongTailLossConfig",
    "build_loss",
    "car_class_weights",
    "ccar_weight",
    "class_frequencies",
    "confusion_batch_columns",
    "create_base_loss",
    "effective_number_weights",
    "explicit_class_weights",
    "head_class_mask",
    "ldam_margins",
    "list_base_losses",
    "log_class_prior",
    "post_hoc_logit_adjust",
    "register_base_loss",
]
