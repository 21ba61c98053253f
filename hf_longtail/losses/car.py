"""CAR: the confusion spectral regularizer (arXiv 2603.16732, CVPR 2026), made fast.

Worst-class error is bounded by the spectral norm of the frequency-weighted confusion matrix;
CAR adds ``alpha * sigma_max(Cbar_t diag(w))`` to the loss.

Definitions (``K`` classes; the confusion matrix has rows = predicted class ``i``, columns = true
class ``j``, zero diagonal):

- batch surrogate: a sample with label ``j`` and logits ``f`` contributes
  ``c_i = sigmoid(f_i - f_j) * softmax(f / tau)_i`` for ``i != j`` and ``c_j = 0``; the sigmoid
  gate is detached by default (as in the authors' code; ``detach_gate=False`` keeps it). Column
  ``j`` of the batch matrix ``C_t`` is the mean of ``c`` over the batch samples of class ``j``
  (zero if the class is absent from the batch);
- EMA: ``Cbar_t = beta * stopgrad(Cbar_{t-1}) + (1 - beta) * C_t``, ``Cbar_0 = 0``, so the
  gradient flows through the current batch from the first step on. It persists across epochs;
- weights: ``w_j = (m_j + r0)^{-1/2}`` with ``m_j = N_j / N``, normalized to mean 1;
- value: ``alpha * sigma_max(Cbar_t diag(w))``.

Speed. The authors build ``C_t`` with a dense ``K x K`` matmul and run a full SVD every step
(``O(K^3)``), prohibitive at iNaturalist's ``K = 8142``. Here:

- only the batch's columns are built (``U <= B`` columns, ``O(B K)``);
- the EMA is stored *lazily scaled*: a dense buffer ``E`` and a scalar ``s`` with
  ``Cbar = s * E^T`` (``E`` row ``j`` = column ``j`` of ``Cbar``). A step multiplies ``s`` by
  ``beta`` and adds the new columns to ``U`` rows of ``E``: ``O(U K)``, no ``O(K^2)`` rewrite
  (``s`` is folded back into ``E`` when it falls below ``1e-20``, once every
  ``log(1e-20) / log(beta)`` steps);
- ``sigma_max`` comes from a warm-started power iteration on ``M = Cbar_t diag(w)`` with
  persistent, detached singular vectors ``u, v`` (buffers): ``v <- M^T u / |M^T u|``,
  ``u <- M v / |M v|``, then ``sigma = u^T M v``. Each iteration is two matrix-vector products,
  ``O(K^2)`` memory-bound, against the ``O(K^3)`` SVD. With ``u, v`` detached the gradient of
  ``u^T M v`` is ``u v^T``, the exact gradient of ``sigma_max`` once the iteration has converged;
  ``M`` changes by a fraction ``1 - beta`` per step, so a few warm-started iterations track it:
  the loop stops once ``|M^T u|`` and ``|M v|`` (two lower bounds of ``sigma``, equal at
  convergence) agree to ``power_tol`` (1e-4), after at most ``power_iterations`` (3). Only the
  current batch's columns carry a gradient (the EMA history is stop-gradient), so the backward
  pass is ``O(B K)``.

Memory: ``E`` is a dense float32 ``K x K`` buffer (265 MB at ``K = 8142``), saved in the
``state_dict`` together with ``s``, ``u``, ``v`` and the step count, so a checkpoint restores the
regularizer exactly.

Modes. In training mode (``module.train()``) each call is one EMA step: the state advances. In
eval mode the value is computed the same way (the batch is blended into the EMA on the fly) but
nothing is stored, and there is no distributed communication (the value is the rank's own).

Distributed (``torch.distributed`` initialized with world size ``W > 1``, training mode): the
per-class counts and column sums of the batch are all-reduced before the EMA update, so every rank
holds the same ``Cbar``, ``u`` and ``v``; the gradient of ``sigma`` is multiplied by ``W`` so that
DDP's gradient averaging gives the update of one process with the ``W``-times batch. Every rank
must call the regularizer in lockstep (as with any collective).

Soft targets: the column of a sample is that of its target's argmax class.

Zero-count classes: ``m_j = 0`` gives ``w_j = r0^{-1/2}``, the largest weight; this needs
``r0 > 0`` (checked).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_longtail.losses._validation import as_class_counts, check_logits_and_target
from hf_longtail.losses.base import fp32_region, upcast

__all__ = ["ConfusionSpectralRegularizer", "car_class_weights", "confusion_batch_columns"]

# Fold the lazy EMA scale into the dense buffer below this (float32 keeps 1/s * O(1) finite).
_FOLD_BELOW = 1e-20


def car_class_weights(class_counts: Any, r0: float = 0.2) -> torch.Tensor:
    """CAR frequency weights ``w_j = (N_j / N + r0)^{-1/2}`` normalized to mean 1 (float64)."""
    counts = as_class_counts(class_counts)
    return _car_class_weights(counts, r0)


def _car_class_weights(counts: torch.Tensor, r0: float) -> torch.Tensor:
    if r0 < 0:
        raise ValueError(f"CAR r0 must be >= 0; got {r0}")
    if r0 == 0 and bool((counts == 0).any()):
        raise ValueError(
            "CAR r0 = 0 with zero-count classes gives infinite weights (m_j + r0)^(-1/2); "
            "use r0 > 0 (default 0.2) or drop the classes"
        )
    w = (counts / counts.sum() + r0).rsqrt()
    return w / w.mean()


def confusion_batch_columns(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
    detach_gate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class sums of the CAR surrogate over the batch, only for the classes present.

    Returns ``(classes, sums, counts)``: ``classes`` (U,) the sorted labels present, ``sums``
    (U, K) with ``sums[k]`` = sum over the samples of class ``classes[k]`` of
    ``c_i = sigmoid(f_i - f_j) softmax(f / tau)_i`` (``c_j = 0``), and ``counts`` (U,) their
    number. Column ``classes[k]`` of the batch confusion matrix is ``sums[k] / counts[k]``.
    Cost ``O(B K)``.
    """
    idx = labels[:, None]
    probs = torch.softmax(logits if tau == 1.0 else logits / tau, dim=1)
    gate = torch.sigmoid(logits - logits.gather(1, idx))
    if detach_gate:
        gate = gate.detach()
    contrib = (gate * probs).scatter(1, idx, 0.0)
    classes, slot, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = contrib.new_zeros(classes.numel(), logits.shape[1]).index_add(0, slot, contrib)
    return classes, sums, counts


def _normalize(x: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, float]:
    # Keep the previous vector if M maps it to 0 (e.g. an all-zero confusion at extreme logits),
    # rather than collapsing the persistent state to 0 forever.
    norm = float(torch.linalg.vector_norm(x))
    return (x / norm if norm > 0 else fallback), norm


class ConfusionSpectralRegularizer(nn.Module):
    """CAR: ``alpha * sigma_max(Cbar_t diag(w))`` with a fast EMA and power iteration.

    ``reg(logits, labels)`` returns the float32 scalar value; in training mode it advances the EMA
    (see the module docstring for the definitions, speed, memory and distributed behaviour).

    Args:
        class_counts: training-set count of every class (length ``K``).
        alpha: regularizer weight (paper's best 0.5; the authors' code uses 0.3).
        beta: EMA factor in ``[0, 1)`` (0.5 default, the paper's best).
        r0: weight offset in ``w_j = (m_j + r0)^{-1/2}``.
        tau: softmax temperature of the surrogate.
        detach_gate: detach the sigmoid gate (authors' choice).
        power_iterations: most power-iteration steps per call (warm-started).
        power_tol: stop iterating once the two estimates of ``sigma`` of an iteration,
            ``|M^T u|`` and ``|M v|`` (equal at convergence), agree to this relative tolerance;
            ``0`` always runs ``power_iterations`` steps.
        distributed: ``None`` = all-reduce when ``torch.distributed`` is initialized with world
            size > 1; ``False`` never; ``True`` requires it.
        process_group: the group to reduce over (default: the world).
        validate: check labels/logits on every call.

    Attributes:
        confusion: the current ``Cbar`` (K x K, rows predicted, columns true).
    """

    def __init__(
        self,
        class_counts: Any,
        alpha: float = 0.5,
        beta: float = 0.5,
        r0: float = 0.2,
        tau: float = 1.0,
        *,
        detach_gate: bool = True,
        power_iterations: int = 3,
        power_tol: float = 1e-4,
        distributed: bool | None = None,
        process_group: Any = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        counts = as_class_counts(class_counts)
        if not alpha >= 0:
            raise ValueError(f"CAR alpha must be >= 0; got {alpha}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"CAR beta must be in [0, 1); got {beta}")
        if not tau > 0:
            raise ValueError(f"CAR tau must be > 0; got {tau}")
        if int(power_iterations) < 1:
            raise ValueError(f"power_iterations must be >= 1; got {power_iterations}")
        if not power_tol >= 0:
            raise ValueError(f"power_tol must be >= 0; got {power_tol}")
        k = counts.numel()
        self.num_classes = k
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.r0 = float(r0)
        self.tau = float(tau)
        self.detach_gate = bool(detach_gate)
        self.power_iterations = int(power_iterations)
        self.power_tol = float(power_tol)
        self.last_iterations = 0
        self.distributed = distributed
        self.process_group = process_group
        self.validate = bool(validate)
        self.register_buffer("weights", _car_class_weights(counts, r0).float(), persistent=False)
        # ema_columns[j] = column j of Cbar divided by ema_scale (lazy scaling, module docstring).
        self.register_buffer("ema_columns", torch.zeros(k, k))
        self.register_buffer("ema_scale", torch.ones((), dtype=torch.float64))
        # Uniform start: Cbar is non-negative, so its top singular vectors are too (Perron).
        self.register_buffer("u", torch.full((k,), k**-0.5))
        self.register_buffer("v", torch.full((k,), k**-0.5))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------ state
    @property
    def confusion(self) -> torch.Tensor:
        """The current EMA confusion ``Cbar`` (K x K float32, rows predicted, columns true)."""
        return (self.ema_columns * float(self.ema_scale)).T

    def reset(self) -> None:
        """Forget the EMA and the singular vectors (back to ``Cbar_0 = 0``)."""
        self.ema_columns.zero_()
        self.ema_scale.fill_(1.0)
        self.u.fill_(self.num_classes**-0.5)
        self.v.fill_(self.num_classes**-0.5)
        self.num_steps.zero_()

    def _world(self) -> int:
        if self.distributed is False or not self.training:
            return 1
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed and not ready:
            raise RuntimeError(
                "ConfusionSpectralRegularizer(distributed=True) needs torch.distributed to be "
                "initialized (init_process_group) first"
            )
        return dist.get_world_size(self.process_group) if ready else 1

    # ------------------------------------------------------------------------------ forward
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``alpha * sigma_max(Cbar_t diag(w))`` as a float32 scalar; advances the EMA in train mode."""
        checked = check_logits_and_target(
            logits, labels, self.num_classes, check_values=self.validate, who="CAR regularizer"
        )
        with fp32_region(logits):
            sigma = self.compute_sigma(upcast(logits), checked.labels)
        return self.alpha * sigma

    def compute_sigma(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sigma_max(Cbar_t diag(w))`` (differentiable in ``logits``), unvalidated.

        ``logits`` float32/float64 (B, K), ``labels`` hard (B,). Advances the state in train mode.
        """
        world = self._world()
        classes, sums, counts = confusion_batch_columns(logits, labels, self.tau, self.detach_gate)
        if world > 1:
            classes, sums, counts = self._all_reduce(labels, classes, sums)
        cols = sums / counts[:, None].to(sums.dtype)  # (U, K): batch columns of C_t
        sigma, u, v, batch_term = self._power_iteration(classes, cols)
        if world > 1:
            # DDP averages gradients over W ranks; each rank's batch term only sees its samples.
            sigma = sigma + (world - 1) * (batch_term - batch_term.detach())
        if self.training:
            self._commit(classes, cols.detach(), u, v)
        return sigma

    def _all_reduce(
        self, labels: torch.Tensor, local_classes: torch.Tensor, local_sums: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.num_classes
        group = self.process_group
        per_class = torch.bincount(labels, minlength=k)
        dist.all_reduce(per_class, group=group)
        classes = per_class.nonzero().squeeze(1)
        # Re-index the local sums onto the union of the ranks' classes.
        slot = torch.zeros(k, dtype=torch.long, device=labels.device)
        slot[classes] = torch.arange(classes.numel(), device=labels.device)
        sums = local_sums.new_zeros(classes.numel(), k).index_add(
            0, slot[local_classes], local_sums
        )
        total = sums.detach().clone()
        dist.all_reduce(total, group=group)
        # Value exactly the global sum (identical bits on every rank), gradient of the local part.
        sums = total + (sums - sums.detach())
        return classes, sums, per_class[classes]

    def _power_iteration(
        self, classes: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # M = Cbar_t diag(w), Cbar_t = beta * scale * E^T + (1 - beta) * [batch columns]:
        # E only ever enters through two mat-vecs per iteration.
        beta = self.beta
        dtype = cols.dtype
        w = self.weights.to(dtype)
        w_b = w[classes]
        batch = cols.detach() * (1.0 - beta)
        coef = beta * float(self.ema_scale)
        E = self.ema_columns if beta > 0 and int(self.num_steps) > 0 else None
        # Copies: the state is updated in place later while autograd may still hold u.
        u = self.u.to(dtype, copy=True)
        v = self.v.to(dtype, copy=True)
        dense = None
        wv_b = w_b
        done = 0
        for _ in range(self.power_iterations):
            done += 1
            # v <- M^T u / |M^T u|, (M^T u)_j = w_j <Cbar[:, j], u>
            if E is None:
                mtu = u.new_zeros(self.num_classes)
            else:
                mtu = (E.mv(u.to(E.dtype)) * coef).to(dtype)
            mtu.index_add_(0, classes, batch.mv(u))
            v, est_v = _normalize(mtu.mul_(w), v)
            # u <- M v / |M v|, M v = Cbar (w * v)
            wv_b = w_b * v[classes]
            mv = batch.T.mv(wv_b)
            if E is not None:
                dense = (E.T.mv((w * v).to(E.dtype)) * coef).to(dtype)
                mv = mv + dense
            u, est_u = _normalize(mv, u)
            # |M^T u| <= sigma and |M v| <= sigma, both equal to it at convergence.
            if abs(est_u - est_v) <= self.power_tol * est_u:
                break
        self.last_iterations = done
        # sigma = u^T M v; only the current batch's columns carry a gradient.
        batch_term = (1.0 - beta) * cols.mv(u).dot(wv_b)
        sigma = batch_term if dense is None else batch_term + u.dot(dense)
        return sigma, u, v, batch_term

    @torch.no_grad()
    def _commit(
        self, classes: torch.Tensor, cols: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> None:
        E = self.ema_columns
        if self.beta == 0.0:
            E.zero_()
            scale = 1.0
        else:
            scale = float(self.ema_scale) * self.beta
            if scale < _FOLD_BELOW:
                E.mul_(scale)
                scale = 1.0
        E.index_add_(0, classes, cols.to(E.dtype), alpha=(1.0 - self.beta) / scale)
        self.ema_scale.fill_(scale)
        self.u.copy_(u)
        self.v.copy_(v)
        self.num_steps += 1

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, "
            f"r0={self.r0}, tau={self.tau}, detach_gate={self.detach_gate}, "
            f"power_iterations={self.power_iterations}, power_tol={self.power_tol}"
        )
