"""Input checks shared by every loss in :mod:`hf_longtail.losses`.

All checks raise :class:`ValueError` (or :class:`TypeError` for a wrong type) with a message that
names the offending value and says how to fix it. They run before any expensive work.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from hf_longtail.class_counts import ClassCounts, fill_zero_counts

__all__ = ["CheckedTarget", "as_class_counts", "check_logits_and_target"]

# Rows of a soft target must sum to 1 within this tolerance (mixup/cutmix in bf16 drift a little).
_SOFT_TARGET_ATOL = 1e-3


def as_class_counts(class_counts: Any, name: str = "class_counts") -> torch.Tensor:
    """Validate training-set class counts and return them as a 1-D float64 CPU tensor.

    The validation is :class:`hf_longtail.class_counts.ClassCounts`'s, the one rule of the
    package: a sequence, NumPy array, tensor or ``ClassCounts`` with one entry per class
    (``K >= 2``), every entry a non-negative integer, at least one ``> 0``; errors name the
    position and the value.

    Classes with zero training samples are allowed (a :class:`UserWarning` names them); what each
    loss does with them is documented on the loss (never inf/NaN).
    """
    counts = ClassCounts.coerce(class_counts, name=name)
    zero = [c for c, n in enumerate(counts) if n == 0]
    if zero:
        shown = ", ".join(map(str, zero[:10])) + (" ..." if len(zero) > 10 else "")
        warnings.warn(
            f"{name}: {len(zero)} class(es) have zero training samples (class {shown}); "
            "see the loss docstrings for how they are handled",
            UserWarning,
            # A fixed location: Python then shows the message once, not once per loss component.
            stacklevel=1,
        )
    return torch.tensor(counts.counts, dtype=torch.float64)


def safe_counts(counts: torch.Tensor) -> torch.Tensor:
    """Counts with zeros replaced by the smallest positive count.

    Used wherever a count enters a logarithm, a power or a reciprocal (logit adjustment, balanced
    softmax, LDAM margins, effective-number weights): a class never seen in training is treated
    like the rarest observed class instead of producing ``-inf``/``inf``. The rule is
    :func:`hf_longtail.class_counts.fill_zero_counts`, which the metrics' post-hoc adjustment uses too.
    """
    return fill_zero_counts(counts)


class CheckedTarget(NamedTuple):
    """Validated targets: ``target`` as given (labels or soft), ``labels`` hard, ``soft`` flag."""

    target: torch.Tensor
    labels: torch.Tensor
    soft: bool


def check_logits_and_target(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    *,
    check_values: bool = True,
    allow_soft: bool = True,
    who: str = "loss",
) -> CheckedTarget:
    """Check ``logits`` (B, K) against ``target`` and return hard labels.

    ``target`` is either integer class indices of shape (B,) or a soft target of shape (B, K)
    (probabilities, e.g. from mixup/cutmix); for a soft target the hard label is its argmax.
    Shape and dtype checks always run; with ``check_values`` the label range, the finiteness of
    the logits and the soft-target rows are checked too (this reads values, i.e. a device sync).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{who}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"{who}: labels must be a torch.Tensor of class indices, got {type(target).__name__}"
        )
    if logits.dim() != 2:
        raise ValueError(
            f"{who}: logits must have shape (batch, num_classes); got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"{who}: logits must be floating point, got dtype {logits.dtype}")
    batch, width = logits.shape
    if width != num_classes:
        raise ValueError(
            f"{who}: logits have {width} columns but class_counts has {num_classes} entries; "
            "class_counts must give the training count of every class the model predicts"
        )
    if batch == 0:
        raise ValueError(f"{who}: empty batch (logits have 0 rows)")
    soft = target.dim() == 2
    if soft:
        if not allow_soft:
            raise ValueError(
                f"{who}: soft (probability) targets are not supported by this loss; "
                "pass integer class labels of shape (batch,)"
            )
        if tuple(target.shape) != (batch, width):
            raise ValueError(
                f"{who}: soft targets must have the logits' shape {(batch, width)}; "
                f"got {tuple(target.shape)}"
            )
        if not target.is_floating_point():
            raise TypeError(f"{who}: soft targets must be floating point, got {target.dtype}")
    else:
        if target.dim() != 1:
            raise ValueError(
                f"{who}: labels must have shape (batch,) of class indices or (batch, num_classes) "
                f"of probabilities; got shape {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"{who}: labels must be integer class indices, got dtype {target.dtype}; "
                "for soft targets pass a (batch, num_classes) probability tensor"
            )
        if target.shape[0] != batch:
            raise ValueError(
                f"{who}: {target.shape[0]} labels for {batch} rows of logits; they must match"
            )
    if check_values:
        # One reduction in the common case: the sum is finite iff every entry is (barring an
        # overflow of the sum itself, which the full check below then clears).
        if not bool(torch.isfinite(logits.detach().sum(dtype=torch.float32))) and not bool(
            torch.isfinite(logits).all()
        ):
            finite = torch.isfinite(logits)
            n_bad = int((~finite).sum())
            row = int((~finite).any(dim=1).nonzero()[0])
            raise ValueError(
                f"{who}: logits contain {n_bad} non-finite value(s) (NaN or inf), first in row "
                f"{row}; the model diverged or the input is corrupt (lower the learning rate, "
                "check the data); pass validate=False to skip this check"
            )
        if soft:
            t = target.detach().float()
            if not bool(torch.isfinite(t).all()) or bool((t < -1e-6).any()):
                raise ValueError(f"{who}: soft targets must be finite and non-negative")
            err = (t.sum(dim=1) - 1).abs()
            if bool((err > _SOFT_TARGET_ATOL).any()):
                row = int((err > _SOFT_TARGET_ATOL).nonzero()[0])
                raise ValueError(
                    f"{who}: soft target row {row} sums to {t[row].sum().item():.6g}, not 1; "
                    "soft targets must be probability distributions over the classes"
                )
        else:
            lo, hi = torch.stack(torch.aminmax(target)).tolist()
            if lo < 0 or hi >= num_classes:
                bad_mask = (target < 0) | (target >= num_classes)
                pos = int(bad_mask.nonzero()[0])
                value = int(target[pos])
                hint = (
                    " (ignore_index -100 is not supported: drop those samples)" if value < 0 else ""
                )
                raise ValueError(
                    f"{who}: label {value} at batch position {pos} is out of range; valid labels "
                    f"are 0..{num_classes - 1} ({num_classes} classes from class_counts){hint}"
                )
    labels = target.argmax(dim=1) if soft else target.long()
    return CheckedTarget(target, labels, soft)
