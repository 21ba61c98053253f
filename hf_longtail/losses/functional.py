"""Pure functions behind the losses: class priors, effective numbers, LDAM margins, CCAR weights.

Everything here is stateless and works on tensors; the :mod:`nn.Module` losses in
:mod:`hf_longtail.losses` are thin wrappers that hold the class counts.

Zero-count classes: wherever a count enters a logarithm, a power or a reciprocal it is replaced by
the smallest positive count (a class never seen in training is treated like the rarest observed
class), so no function here returns inf/NaN for them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_longtail.class_counts import ClassCounts
from hf_longtail.losses._validation import as_class_counts, safe_counts

__all__ = [
    "CCAR_VARIANTS",
    "ccar_weight",
    "class_frequencies",
    "effective_number_weights",
    "ldam_margins",
    "log_class_prior",
    "post_hoc_logit_adjust",
]

CCAR_VARIANTS = ("paper", "e_minus_f", "notebook")


def class_frequencies(class_counts: Any) -> torch.Tensor:
    """Class frequencies ``f_c = N_c / N`` (float64), ``N`` the total count. Zero counts give 0."""
    counts = as_class_counts(class_counts)
    return counts / counts.sum()


def log_class_prior(class_counts: Any) -> torch.Tensor:
    """``log(N_c / N)`` (float64), zero counts replaced by the smallest positive count first."""
    return _log_prior(as_class_counts(class_counts))


def _log_prior(counts: torch.Tensor) -> torch.Tensor:
    # The one log-prior rule (zeros filled with the smallest positive count), shared with the
    # metrics' post-hoc adjustment: ClassCounts.log_prior.
    return torch.tensor(ClassCounts(counts).log_prior(), dtype=torch.float64)


def effective_number_weights(class_counts: Any, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights of Cui et al. (CVPR 2019), normalized to sum to ``K``.

    ``w_c = (1 - beta) / (1 - beta^{N_c})`` (inverse effective number of samples), then
    ``w <- K * w / sum(w)``. ``beta = 0`` gives uniform weights; ``beta -> 1`` approaches inverse
    frequency. Zero counts are replaced by the smallest positive count. Returns float64.
    """
    return _effective_number_weights(as_class_counts(class_counts), beta)


def _effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"effective-number beta must be in [0, 1); got {beta}")
    counts = safe_counts(counts)
    if beta == 0.0:
        weights = torch.ones_like(counts)
    else:
        # 1 - beta^n = -expm1(n log beta): exact even when beta^n is close to 1 (beta ~ 0.9999).
        effective = -torch.expm1(counts * math.log(beta)) / (1.0 - beta)
        weights = 1.0 / effective
    return weights * (counts.numel() / weights.sum())


def explicit_class_weights(spec: Any, class_counts: Any) -> torch.Tensor:
    """Per-class weights given by the user (``class_weights``), as a float64 tensor of length K.

    ``spec`` is ``"auto"``: inverse frequency normalised to mean 1,
    ``w_c = (1 / N_c) / ((1 / K) sum_j 1 / N_j)`` (zero counts replaced by the smallest positive
    count); or K positive finite numbers (a sequence, or a comma-separated string such as
    ``"1,2,0.5"``), used as given. Raises ``ValueError`` naming the problem (length, value).
    """
    counts = as_class_counts(class_counts)
    k = counts.numel()
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        inverse = 1.0 / safe_counts(counts)
        return inverse / inverse.mean()
    values = parse_class_weights(spec)
    if len(values) != k:
        raise ValueError(
            f"class_weights has {len(values)} values but there are {k} classes; give one weight "
            "per class (in class-id order) or 'auto' (inverse frequency, mean 1)."
        )
    return torch.tensor(values, dtype=torch.float64)


def parse_class_weights(spec: Any) -> list[float]:
    """``class_weights`` other than ``"auto"`` as a list of positive finite floats (a sequence or
    a comma-separated string); ``ValueError`` names the first bad value."""
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        items = list(items)
    except TypeError:
        raise ValueError(
            f"class_weights must be 'auto' or one positive number per class; got {spec!r}"
        ) from None
    values = []
    for i, item in enumerate(items):
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            value = float("nan")
        if isinstance(item, bool) or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"class_weights[{i}] = {item!r} is not a positive finite number; give 'auto' or "
                "one positive weight per class, e.g. '1,2.5,4'."
            )
        values.append(value)
    if not values:
        raise ValueError("class_weights is empty; give 'auto' or one positive weight per class.")
    return values


def ldam_margins(class_counts: Any, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins of Cao et al. (NeurIPS 2019): ``m_c = C / N_c^{1/4}``, with ``max_c m_c = max_m``.

    Zero counts are replaced by the smallest positive count (they get the largest margin).
    Returns float64.
    """
    return _ldam_margins(as_class_counts(class_counts), max_m)


def _ldam_margins(counts: torch.Tensor, max_m: float) -> torch.Tensor:
    if max_m < 0:
        raise ValueError(f"LDAM max_m must be >= 0; got {max_m}")
    counts = safe_counts(counts)
    m = counts.pow(-0.25)
    return m * (max_m / m.max())


def post_hoc_logit_adjust(
    logits: torch.Tensor, class_counts: Any, tau: float = 1.0
) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): ``logits - tau * log(prior)``.

    Turns a model trained with plain cross-entropy on long-tailed data into one that targets the
    balanced error: ``argmax_y f_y(x) - tau * log pi_y``. ``prior = N_c / N``; zero counts are
    replaced by the smallest positive count. Computed and returned in float32 (float64 logits
    stay float64).
    """
    counts = as_class_counts(class_counts)
    if logits.shape[-1] != counts.numel():
        raise ValueError(
            f"post_hoc_logit_adjust: logits have {logits.shape[-1]} classes but class_counts has "
            f"{counts.numel()} entries"
        )
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_prior = _log_prior(counts).to(device=logits.device, dtype=dtype)
    return logits.to(dtype) - tau * log_prior


def ccar_weight(
    p_t: torch.Tensor,
    freq: torch.Tensor,
    omega: float = 0.75,
    variant: str = "paper",
) -> torch.Tensor:
    """CCAR sample weight ``Omega(p_t, f_c)`` (arXiv 2601.15924).

    Dual phase (``paper``, ``e_minus_f``): ``f'_c = f_c`` if ``p_t < omega`` else ``1 - f_c``.
    Then

    - ``variant="paper"``: ``Omega = (e^{-f'_c})^{omega - p_t} = exp(-f'_c (omega - p_t))``;
    - ``variant="e_minus_f"``: ``Omega = (e - f'_c)^{omega - p_t}`` (up-weights uncertain samples);
    - ``variant="notebook"``: ``Omega = (e - f_c)^{omega - p_t}``, the form of the author's
      notebook: base ``e - f_c`` *without* the dual phase (``f_c`` on both sides of ``omega``).

    ``p_t`` is the predicted probability of the true class, ``freq`` the class frequency of each
    sample's true class (same shape). Every base is positive for ``f in [0, 1]`` so the weight
    is finite for every ``p_t in [0, 1]``; a zero-count class (``f_c = 0``) gets
    ``Omega = 1`` in the low-confidence phase (``paper``, ``e_minus_f``) and
    ``e^{omega - p_t}`` everywhere (``notebook``). Differentiable in ``p_t``.
    """
    if variant not in CCAR_VARIANTS:
        raise ValueError(f"unknown CCAR variant {variant!r}; valid: {', '.join(CCAR_VARIANTS)}")
    if variant == "notebook":
        f_prime = freq
    else:
        f_prime = torch.where(p_t < omega, freq, 1.0 - freq)
    exponent = omega - p_t
    if variant == "paper":
        return torch.exp(-f_prime * exponent)
    return torch.exp(exponent * torch.log(math.e - f_prime))
