"""CCAR: confidence- and class-aware reweighting of any per-sample base loss (arXiv 2601.15924).

For a sample with true class ``t``, predicted probability ``p_t`` of that class and training
frequency ``f_t = N_t / N``:

- dual phase: ``f' = f_t`` if ``p_t < omega`` else ``1 - f_t`` (``omega = 0.75`` by default);
- weight ``Omega = (e^{-f'})^{omega - p_t} = exp(-f' (omega - p_t))`` (``variant="paper"``), or
  ``Omega = (e - f')^{omega - p_t}`` (``variant="e_minus_f"``, the reading that up-weights
  uncertain samples; published sources disagree on the base, so both are offered);
- ``variant="notebook"``: the form of the author's notebook, ``Omega = (e - f_t)^{omega - p_t}``,
  base ``e - f_t`` *without* the dual phase (``f_t`` above ``omega`` too). Its author pairs it with
  the balanced-softmax base (``base="bs"``), ``p_t`` from the adjusted logits ``z + log N``
  (``p_t_from="adjusted"``, the default) and the plain batch mean below; that recipe is
  ``CCARLoss(counts, base="bs", variant="notebook")``;
- ``L = mean_i Omega_i * base_loss_i``.

Gradient. By default the weight is differentiated through. For the cross-entropy base this gives
the paper's ``dL_i/dz = Psi(p_t, gamma) (p - e_t)`` with
``Psi = gamma^{omega - p_t} (1 - p_t ln(gamma) ln(p_t))`` and ``gamma = e^{-f'}`` (paper) or
``gamma = e - f'`` (``e_minus_f``) or ``gamma = e - f_t`` (``notebook``). ``detach_weight=True`` makes CCAR a pure reweighting:
``dL_i/dz = Omega_i dl_i/dz``.

Which probability. ``p_t`` is by default the softmax of the *adjusted* logits the base loss itself
uses (``p_t_from="adjusted"``): ``z + tau log pi`` for ``la``, ``z + log N`` for ``bs``,
``s (z - m_y e_y)`` for ``ldam``, ``z`` otherwise; it is the confidence the base loss is trained
on. ``p_t_from="raw"`` uses the softmax of the model's raw logits instead (its confidence at
test time). For ``cb`` with a sigmoid/focal loss type the softmax of ``z`` is used either way.

Soft targets (mixup/cutmix): the base loss uses the full soft target; ``p_t`` and ``f_t`` are
those of the target's argmax class.

Zero-count classes: ``f_t = 0`` gives ``Omega = 1`` below ``omega`` and
``exp(-(omega - p_t))`` (paper) / ``(e - 1)^{omega - p_t}`` above it; ``notebook`` gives
``e^{omega - p_t}`` on both sides: finite, no special case.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_longtail.losses._validation import CheckedTarget, as_class_counts
from hf_longtail.losses.base import BaseLoss, create_base_loss, fp32_region, upcast
from hf_longtail.losses.functional import CCAR_VARIANTS, ccar_weight

__all__ = ["CCARLoss", "CCAROutput"]

P_T_SOURCES = ("adjusted", "raw")


class CCAROutput(dict):
    """Per-sample pieces of a CCAR forward: ``loss`` (scalar), ``base`` (B,), ``weight`` (B,)."""


class CCARLoss(nn.Module):
    """Confidence- and class-aware reweighting (CCAR) of a per-sample base loss.

    ``loss(logits, labels)`` returns ``mean_i Omega(p_t, f_t)_i * base_loss_i`` as a float32
    scalar (formulas in the module docstring).

    Args:
        class_counts: training-set count of every class (length ``K``).
        base: a registered base-loss name (``ce``, ``focal``, ``cb``, ``ldam``, ``la``, ``bs``)
            or a :class:`BaseLoss` instance (then ``base_kwargs`` must be empty).
        omega: confidence threshold of the dual phase, in ``(0, 1]``.
        variant: ``"paper"``, ``"e_minus_f"`` or ``"notebook"`` (module docstring).
        detach_weight: stop the gradient through ``Omega`` (pure reweighting).
        p_t_from: ``"adjusted"`` (the base loss's logits, default) or ``"raw"``.
        validate: check labels/logits on every call.
        **base_kwargs: forwarded to the base loss (e.g. ``gamma`` for focal, ``drw_epoch``).
    """

    def __init__(
        self,
        class_counts: Any,
        base: str | BaseLoss = "ce",
        omega: float = 0.75,
        variant: str = "paper",
        detach_weight: bool = False,
        *,
        p_t_from: str = "adjusted",
        validate: bool = True,
        **base_kwargs: Any,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts)
        if not 0.0 < omega <= 1.0:
            raise ValueError(f"CCAR omega must be in (0, 1]; got {omega}")
        if variant not in CCAR_VARIANTS:
            raise ValueError(f"unknown CCAR variant {variant!r}; valid: {', '.join(CCAR_VARIANTS)}")
        if p_t_from not in P_T_SOURCES:
            raise ValueError(f"p_t_from must be one of {', '.join(P_T_SOURCES)}; got {p_t_from!r}")
        if isinstance(base, BaseLoss):
            if base_kwargs:
                raise TypeError(
                    f"CCARLoss: base is a {type(base).__name__} instance, so base_kwargs "
                    f"({', '.join(sorted(base_kwargs))}) cannot be applied; configure the instance"
                )
            if base.num_classes != counts.numel():
                raise ValueError(
                    f"CCARLoss: base loss has {base.num_classes} classes but class_counts has "
                    f"{counts.numel()}"
                )
            self.base = base
        elif isinstance(base, str):
            self.base = create_base_loss(base, counts, validate=validate, **base_kwargs)
        else:
            raise TypeError(f"base must be a loss name or a BaseLoss, got {type(base).__name__}")
        self.num_classes = counts.numel()
        self.omega = float(omega)
        self.variant = variant
        self.detach_weight = bool(detach_weight)
        self.p_t_from = p_t_from
        self.validate = bool(validate)
        self.register_buffer("class_freq", (counts / counts.sum()).float(), persistent=False)

    def set_epoch(self, epoch: float) -> None:
        """Forward the epoch to the base loss (DRW schedule)."""
        self.base.set_epoch(epoch)

    def compute(self, logits: torch.Tensor, checked: CheckedTarget) -> CCAROutput:
        """Unvalidated forward on float32/float64 ``logits``: loss, base losses and weights."""
        base_loss, adjusted, log_probs = self.base.compute(logits, checked)
        labels = checked.labels
        if self.p_t_from == "raw" or log_probs is None:
            source = adjusted if self.p_t_from == "adjusted" else logits
            log_probs = torch.log_softmax(source, dim=1)
        # log_softmax then exp: p_t is exactly 0 or 1 at extreme logits without NaN gradients.
        p_t = log_probs.gather(1, labels[:, None]).squeeze(1).exp()
        freq = self.class_freq.to(p_t.dtype)[labels]
        weight = ccar_weight(p_t, freq, self.omega, self.variant)
        if self.detach_weight:
            weight = weight.detach()
        return CCAROutput(loss=(weight * base_loss).mean(), base=base_loss, weight=weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar batch mean ``mean_i Omega_i * base_loss_i`` (float32)."""
        checked = self.base.check(logits, labels)
        with fp32_region(logits):
            return self.compute(upcast(logits), checked)["loss"]

    def extra_repr(self) -> str:
        return (
            f"omega={self.omega}, variant={self.variant!r}, detach_weight={self.detach_weight}, "
            f"p_t_from={self.p_t_from!r}"
        )
