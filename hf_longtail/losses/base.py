"""Per-sample long-tail base losses and their registry.

Every base loss is an :class:`nn.Module` built from the training-set class counts. It computes
one loss value per sample (so that :class:`~hf_longtail.losses.CCARLoss` can reweight it);
``forward`` returns the batch mean. All are computed in float32 (float64 input stays float64)
with autocast disabled, so bf16/fp16 logits give a float32 loss.

Registered names (``create_base_loss(name, class_counts, **kwargs)``):

=========  ==========================================================================
``ce``     cross-entropy, optional label smoothing ``eps``:
           ``-(1 - eps) log p_y - eps * mean_c log p_c``
``focal``  focal loss (Lin et al. 2017, softmax form): ``-(1 - p_y)^gamma log p_y``
``cb``     class-balanced loss (Cui et al. 2019): ``w_y * L(z, y)`` with
           ``w_c ∝ (1 - beta) / (1 - beta^{N_c})`` (sum ``K``), ``L`` one of ``softmax`` (CE),
           ``sigmoid`` (``sum_c BCE(z_c, y_c)``) or ``focal`` (the paper's sigmoid focal:
           ``sum_c exp(-gamma (y_c z_c + log(1 + e^{-z_c}))) BCE(z_c, y_c)``)
``ldam``   LDAM (Cao et al. 2019): ``CE(s (z - m_y e_y), y)``, ``m_c = C N_c^{-1/4}``,
           ``max_c m_c = max_m``; use ``drw_epoch`` for LDAM-DRW
``la``     logit-adjusted loss (Menon et al. 2021): ``CE(z + tau log pi, y)``, ``pi_c = N_c/N``
``bs``     balanced softmax (Ren et al. 2020): ``CE(z + log N_c, y)``
=========  ==========================================================================

Deferred re-weighting (DRW, Cao et al. 2019) works with every base: with ``drw_epoch=E`` the
per-sample loss is multiplied by the effective-number weight ``w_y`` (``drw_beta``) once
``set_epoch(epoch)`` has been called with ``epoch >= E``. ``cb`` is the same weighting switched on
from epoch 0 (give it ``drw_epoch`` to defer it).

Class weights and the batch reduction (``weight_reduction``):

- ``"mean"``: ``sum_i w_i l_i / B`` (Cui et al.'s reference code);
- ``"weighted_mean"``: ``sum_i w_i l_i / sum_i w_i`` (``F.cross_entropy(weight=...)``, which
  Cao et al.'s LDAM-DRW code uses; it keeps the loss scale when the weights switch on);
- ``"auto"`` (default): ``"mean"`` for ``cb``, ``"weighted_mean"`` for DRW on the other bases.

Both are written per sample (for ``"weighted_mean"`` the weights are renormalized within the
batch, ``w_i B / sum_b w_b``) so CCAR can wrap them. Under DDP that renormalization uses each
rank's own batch (like ``F.cross_entropy(weight=...)`` does), so it is not exactly the
single-process weighted mean of the global batch; ``"mean"`` is.

Soft targets (B, K) from mixup/cutmix are supported by ``ce``, ``focal``, ``cb``, ``la``, ``bs``
(``-sum_c t_c log p_c`` and its focal/sigmoid analogues; class weights become ``sum_c t_c w_c``);
``ldam`` raises, since its margin is defined for one true class.

Zero-count classes: counts enter ``log`` (``la``, ``bs``), a power (``ldam``) or an effective
number (``cb``, DRW); there a zero count is replaced by the smallest positive count, so nothing
becomes inf/NaN. ``ce``/``focal`` do not use counts.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from hf_longtail.losses._validation import (
    CheckedTarget,
    as_class_counts,
    check_logits_and_target,
    safe_counts,
)
from hf_longtail.losses.functional import (
    _effective_number_weights,
    _ldam_margins,
    _log_prior,
    explicit_class_weights,
)

__all__ = [
    "BalancedSoftmaxLoss",
    "BaseLoss",
    "BaseOutput",
    "CELoss",
    "ClassBalancedLoss",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "create_base_loss",
    "fp32_region",
    "list_base_losses",
    "register_base_loss",
]

WEIGHT_REDUCTIONS = ("auto", "mean", "weighted_mean")


class BaseOutput(NamedTuple):
    """What :meth:`BaseLoss.compute` returns.

    ``loss`` (B,) per-sample (class-weighted) losses, ``adjusted`` the logits the loss applies
    its softmax to, ``log_probs`` their log-softmax (``None`` for losses that do not use it).
    """

    loss: torch.Tensor
    adjusted: torch.Tensor
    log_probs: torch.Tensor | None


def fp32_region(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that disables autocast on ``tensor``'s device, so the loss math runs in fp32."""
    try:
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32 (float64 is kept, so gradient checks can run in double)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class BaseLoss(nn.Module):
    """Base class of the per-sample long-tail losses.

    Subclasses implement :meth:`unweighted_loss` (and :meth:`adjust_logits` if the loss applies a
    softmax to shifted logits). The loss of sample ``i`` is ``w_i * l(adjust(z_i), y_i)`` with the
    class weight ``w_i`` of DRW/CB when active (see the module docstring), and ``forward`` returns
    the batch mean.

    Args:
        class_counts: training-set count of every class (length ``K``).
        drw_epoch: epoch from which deferred re-weighting is on (``None``: never, except ``cb``).
        drw_beta: ``beta`` of the effective-number DRW weights.
        class_weights: plain per-class weights instead of DRW's (``"auto"``: inverse frequency
            normalised to mean 1; or one positive number per class, see
            :func:`~hf_longtail.losses.functional.explicit_class_weights`), applied from epoch 0
            (from ``drw_epoch`` when given). With the default ``weight_reduction`` this is
            ``F.cross_entropy(weight=w)`` for ``ce``. Not with ``cb`` (its own weights).
        weight_reduction: ``"auto"``, ``"mean"`` or ``"weighted_mean"`` (module docstring).
        validate: check label range / finite logits on every call (one device sync).
    """

    name: ClassVar[str] = ""
    supports_soft_targets: ClassVar[bool] = True
    default_weight_reduction: ClassVar[str] = "weighted_mean"

    def __init__(
        self,
        class_counts: Any,
        *,
        drw_epoch: float | None = None,
        drw_beta: float = 0.9999,
        weight_reduction: str = "auto",
        validate: bool = True,
        class_weights: Any = None,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts)
        self.num_classes = counts.numel()
        self.register_buffer("class_counts", counts.float(), persistent=False)
        if drw_epoch is not None and not drw_epoch >= 0:
            raise ValueError(f"drw_epoch must be >= 0 or None; got {drw_epoch}")
        if not 0.0 <= drw_beta < 1.0:
            raise ValueError(f"drw_beta must be in [0, 1); got {drw_beta}")
        if weight_reduction not in WEIGHT_REDUCTIONS:
            raise ValueError(
                f"weight_reduction must be one of {', '.join(WEIGHT_REDUCTIONS)}; "
                f"got {weight_reduction!r}"
            )
        self.drw_epoch = None if drw_epoch is None else float(drw_epoch)
        self.drw_beta = float(drw_beta)
        self.weight_reduction = (
            self.default_weight_reduction if weight_reduction == "auto" else weight_reduction
        )
        self.validate = bool(validate)
        self.epoch = 0.0
        if class_weights is not None:
            if type(self)._make_class_weights is not BaseLoss._make_class_weights:
                raise ValueError(
                    f"class_weights cannot be combined with base loss {self.name!r}, which has "
                    "its own class weights; use base 'ce' (or 'focal', 'la', ...) with them."
                )
            weights = explicit_class_weights(class_weights, counts)
        else:
            weights = self._make_class_weights(counts)
        self.register_buffer(
            "class_weights", None if weights is None else weights.float(), persistent=False
        )

    # ----------------------------------------------------------------------------- schedule
    def _make_class_weights(self, counts: torch.Tensor) -> torch.Tensor | None:
        if self.drw_epoch is None:
            return None
        return _effective_number_weights(counts, self.drw_beta)

    @property
    def weights_active(self) -> bool:
        """Whether the class weights (DRW / CB) multiply the loss at the current epoch."""
        if self.class_weights is None:
            return False
        start = 0.0 if self.drw_epoch is None else self.drw_epoch
        return self.epoch >= start

    def set_epoch(self, epoch: float) -> None:
        """Set the (possibly fractional) training epoch; drives the DRW switch."""
        self.epoch = float(epoch)

    def get_extra_state(self) -> torch.Tensor:
        """The epoch as a float64 tensor, so a restored loss resumes the DRW schedule.

        A tensor (not a dict) keeps ``state_dict()`` all-tensor, e.g. for safetensors.
        """
        return torch.tensor(self.epoch, dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor | float) -> None:
        """Restore :meth:`get_extra_state`."""
        self.epoch = float(state)

    # ----------------------------------------------------------------------------- math
    def adjust_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits the loss applies its softmax to (identity unless overridden)."""
        return logits

    @property
    def needs_log_probs(self) -> bool:
        """Whether :meth:`unweighted_loss` uses ``log_softmax(adjusted)`` (computed once, shared)."""
        return True

    def unweighted_loss(
        self,
        log_probs: torch.Tensor | None,
        adjusted: torch.Tensor,
        target: torch.Tensor,
        labels: torch.Tensor,
        soft: bool,
    ) -> torch.Tensor:
        """Per-sample loss (B,) before class weights.

        ``log_probs = log_softmax(adjusted)`` (``None`` if :attr:`needs_log_probs` is false),
        ``target`` the labels or soft target, ``labels`` the hard labels.
        """
        raise NotImplementedError

    def sample_weights(self, checked: CheckedTarget, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-sample class weights ``w_i`` (B,) when active, else ``None``.

        For ``weight_reduction="weighted_mean"`` they are renormalized to mean 1 in the batch.
        """
        if not self.weights_active:
            return None
        w = self.class_weights.to(dtype)
        wi = checked.target.to(dtype) @ w if checked.soft else w[checked.labels]
        if self.weight_reduction == "weighted_mean":
            wi = wi * (wi.numel() / wi.sum())
        return wi

    def compute(self, logits: torch.Tensor, checked: CheckedTarget) -> BaseOutput:
        """Per-sample losses (B,), adjusted logits and their log-softmax, without validation.

        ``logits`` must already be float32/float64 and ``checked`` come from
        :func:`check_logits_and_target`.
        """
        adjusted = self.adjust_logits(logits, checked.labels)
        log_probs = torch.log_softmax(adjusted, dim=1) if self.needs_log_probs else None
        loss = self.unweighted_loss(
            log_probs, adjusted, checked.target, checked.labels, checked.soft
        )
        weights = self.sample_weights(checked, loss.dtype)
        if weights is not None:
            loss = loss * weights
        return BaseOutput(loss, adjusted, log_probs)

    def check(self, logits: torch.Tensor, target: torch.Tensor) -> CheckedTarget:
        """Validate ``logits``/``target`` for this loss (see :func:`check_logits_and_target`)."""
        return check_logits_and_target(
            logits,
            target,
            self.num_classes,
            check_values=self.validate,
            allow_soft=self.supports_soft_targets,
            who=f"{self.name or type(self).__name__} loss",
        )

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Validated per-sample losses (B,) in float32."""
        checked = self.check(logits, target)
        with fp32_region(logits):
            return self.compute(upcast(logits), checked).loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Batch mean of :meth:`per_sample`: a float32 scalar."""
        return self.per_sample(logits, target).mean()

    def extra_repr(self) -> str:
        drw = f", drw_epoch={self.drw_epoch}" if self.drw_epoch is not None else ""
        return f"num_classes={self.num_classes}{drw}"


# --------------------------------------------------------------------------------- registry
_BASE_LOSSES: dict[str, type[BaseLoss]] = {}
_L = TypeVar("_L", bound=type[BaseLoss])


def register_base_loss(name: str, *, override: bool = False) -> Callable[[_L], _L]:
    """Class decorator registering a :class:`BaseLoss` subclass under ``name``.

    Registered losses can be built by name (``create_base_loss``, ``LongTailLossConfig.base``)
    and wrapped by CCAR. Re-registering a name raises unless ``override=True``.
    """

    def decorator(cls: _L) -> _L:
        if not (isinstance(cls, type) and issubclass(cls, BaseLoss)):
            raise TypeError(f"register_base_loss: {cls!r} is not a BaseLoss subclass")
        if name in _BASE_LOSSES and not override and _BASE_LOSSES[name] is not cls:
            raise ValueError(
                f"a base loss named {name!r} is already registered "
                f"({_BASE_LOSSES[name].__name__}); pass override=True to replace it"
            )
        cls.name = name
        _BASE_LOSSES[name] = cls
        return cls

    return decorator


def list_base_losses() -> list[str]:
    """Names of the registered base losses, sorted."""
    return sorted(_BASE_LOSSES)


def get_base_loss_class(name: str) -> type[BaseLoss]:
    """The class registered under ``name``; unknown names raise listing the valid ones."""
    try:
        return _BASE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown base loss {name!r}; valid: {', '.join(list_base_losses())}"
        ) from None


def create_base_loss(name: str, class_counts: Any, **kwargs: Any) -> BaseLoss:
    """Build the base loss registered under ``name`` (timm-style factory).

    Unknown keyword arguments raise a :class:`TypeError` that lists the accepted ones.
    """
    cls = get_base_loss_class(name)
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"base loss {name!r} does not accept {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    return cls(class_counts, **kwargs)


def _accepted_kwargs(cls: type[BaseLoss]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, BaseLoss):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {
            p.name
            for p in params
            if p.name not in ("self", "class_counts")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
    return names


# --------------------------------------------------------------------------------- helpers
def _check_label_smoothing(eps: float) -> float:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {eps}")
    return float(eps)


def softmax_cross_entropy(
    logp: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    soft: bool,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-sample ``-sum_c q_c logp_c`` from log-probabilities ``logp`` (B, K).

    ``q`` is the one-hot label (or the soft target) smoothed as ``(1 - eps) q + eps / K``.
    """
    if soft:
        q = target.to(logp.dtype)
        if label_smoothing:
            q = q * (1.0 - label_smoothing) + label_smoothing / logp.shape[1]
        return -(q * logp).sum(dim=1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    if label_smoothing:
        return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)
    return nll


# Below this, (1 - p)^gamma is clamped: keeps d/dp finite for 0 < gamma < 1 when p == 1 exactly.
_FOCAL_EPS = 1e-12


def _focal_term(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 0:
        return torch.ones_like(logp)
    # 1 - p = -expm1(log p): accurate for confident predictions where p rounds to 1.
    return (-torch.expm1(logp)).clamp_min(_FOCAL_EPS).pow(gamma)


# --------------------------------------------------------------------------------- losses
@register_base_loss("ce")
class CELoss(BaseLoss):
    """Cross-entropy with optional label smoothing: ``-(1-eps) log p_y - eps mean_c log p_c``."""

    def __init__(self, class_counts: Any, *, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(class_counts, **kwargs)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample smoothed cross-entropy."""
        return softmax_cross_entropy(log_probs, target, labels, soft, self.label_smoothing)


@register_base_loss("focal")
class FocalLoss(BaseLoss):
    """Softmax focal loss (Lin et al., ICCV 2017): ``-(1 - p_y)^gamma log p_y``.

    ``gamma = 0`` is cross-entropy. Soft targets: ``-sum_c t_c (1 - p_c)^gamma log p_c``.
    """

    def __init__(self, class_counts: Any, *, gamma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(class_counts, **kwargs)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0; got {gamma}")
        self.gamma = float(gamma)

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample focal loss."""
        logp = log_probs
        if soft:
            return -(target.to(logp.dtype) * _focal_term(logp, self.gamma) * logp).sum(dim=1)
        logp_y = logp.gather(1, labels[:, None]).squeeze(1)
        return -_focal_term(logp_y, self.gamma) * logp_y


CB_LOSS_TYPES = ("softmax", "sigmoid", "focal")


@register_base_loss("cb")
class ClassBalancedLoss(BaseLoss):
    """Class-balanced loss (Cui et al., CVPR 2019): ``w_y L(z, y)``.

    ``w_c = (1 - beta) / (1 - beta^{N_c})`` normalized to sum ``K`` (inverse effective number).
    ``loss_type``: ``"softmax"`` (CE), ``"sigmoid"`` (``sum_c BCE(z_c, y_c)``) or ``"focal"``
    (the paper's sigmoid focal, ``sum_c exp(-gamma (y_c z_c + log(1 + e^{-z_c}))) BCE(z_c, y_c)``).
    The weights are on from epoch 0, or from ``drw_epoch`` if given. Batch reduction ``"mean"``
    by default.
    """

    default_weight_reduction: ClassVar[str] = "mean"

    def __init__(
        self,
        class_counts: Any,
        *,
        beta: float = 0.9999,
        loss_type: str = "softmax",
        gamma: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"cb beta must be in [0, 1); got {beta}")
        if loss_type not in CB_LOSS_TYPES:
            raise ValueError(
                f"cb loss_type must be one of {', '.join(CB_LOSS_TYPES)}; got {loss_type!r}"
            )
        if gamma < 0:
            raise ValueError(f"cb focal gamma must be >= 0; got {gamma}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.gamma = float(gamma)
        super().__init__(class_counts, **kwargs)

    def _make_class_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return _effective_number_weights(counts, self.beta)

    @property
    def needs_log_probs(self) -> bool:
        """Only the softmax loss type uses the log-softmax."""
        return self.loss_type == "softmax"

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample softmax CE, summed BCE or summed sigmoid focal loss."""
        if self.loss_type == "softmax":
            return softmax_cross_entropy(log_probs, target, labels, soft)
        y = target.to(adjusted.dtype) if soft else F.one_hot(labels, adjusted.shape[1])
        y = y.to(adjusted.dtype)
        bce = F.binary_cross_entropy_with_logits(adjusted, y, reduction="none")
        if self.loss_type == "focal" and self.gamma:
            # Cui et al.'s modulator (1 - p^t)^gamma written with softplus: stable at |z| ~ 1e4.
            bce = bce * torch.exp(-self.gamma * (y * adjusted + F.softplus(-adjusted)))
        return bce.sum(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, loss_type={self.loss_type!r}"


@register_base_loss("ldam")
class LDAMLoss(BaseLoss):
    """LDAM (Cao et al., NeurIPS 2019): ``CE(s * (z - m_y e_y), y)``.

    Margins ``m_c = C / N_c^{1/4}`` scaled so ``max_c m_c = max_m``. With ``drw_epoch`` this is
    LDAM-DRW (effective-number weights, ``drw_beta = 0.9999``, from that epoch; batch reduction
    ``"weighted_mean"`` as in the authors' code). Hard labels only.
    """

    supports_soft_targets: ClassVar[bool] = False

    def __init__(
        self, class_counts: Any, *, max_m: float = 0.5, s: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(class_counts, **kwargs)
        if not s > 0:
            raise ValueError(f"LDAM scale s must be > 0; got {s}")
        self.max_m = float(max_m)
        self.s = float(s)
        self.register_buffer(
            "margins", _ldam_margins(self.class_counts.double(), max_m).float(), persistent=False
        )

    def adjust_logits(self, logits, labels):
        """``s * (z - m_y e_y)``."""
        idx = labels[:, None]
        shifted = logits.gather(1, idx) - self.margins.to(logits.dtype)[labels][:, None]
        return self.s * logits.scatter(1, idx, shifted)

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample CE of the margin-adjusted, scaled logits."""
        return softmax_cross_entropy(log_probs, target, labels, soft)


@register_base_loss("la")
class LogitAdjustedLoss(BaseLoss):
    """Logit-adjusted loss (Menon et al., ICLR 2021): ``CE(z + tau * log pi, y)``, ``pi = N/sum N``."""

    def __init__(
        self,
        class_counts: Any,
        *,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(class_counts, **kwargs)
        self.tau = float(tau)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.register_buffer(
            "log_prior", _log_prior(self.class_counts.double()).float(), persistent=False
        )

    def adjust_logits(self, logits, labels):
        """``z + tau * log pi``."""
        return logits + self.tau * self.log_prior.to(logits.dtype)

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample CE of the adjusted logits."""
        return softmax_cross_entropy(log_probs, target, labels, soft, self.label_smoothing)


@register_base_loss("bs")
class BalancedSoftmaxLoss(BaseLoss):
    """Balanced softmax (Ren et al., NeurIPS 2020): ``CE(z + log N_c, y)``."""

    def __init__(self, class_counts: Any, *, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(class_counts, **kwargs)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.register_buffer(
            "log_counts",
            torch.log(safe_counts(self.class_counts.double())).float(),
            persistent=False,
        )

    def adjust_logits(self, logits, labels):
        """``z + log N_c``."""
        return logits + self.log_counts.to(logits.dtype)

    def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
        """Per-sample CE of the count-shifted logits."""
        return softmax_cross_entropy(log_probs, target, labels, soft, self.label_smoothing)
