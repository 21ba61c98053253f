"""CAR: the confusion spectral regularizer (arXiv 2603.16732, CVPR 2026), exact and fast.

Worst-class error is bounded by the spectral norm of the frequency-weighted confusion matrix;
CAR adds ``alpha * sigma_max(Cbar_t diag(w))`` to the loss.

Definitions (``K`` classes; the confusion matrix has rows = predicted class ``i``, columns = true
class ``j``, zero diagonal):

- batch surrogate: a sample with label ``j`` and logits ``f`` contributes
  ``c_i = sigmoid(gamma + f_i - f_j) * softmax(f / tau)_i`` for ``i != j`` and ``c_j = 0``
  (``gamma`` = ``margin``, 0 by default as in the authors' code); the sigmoid gate is detached by
  default (as in the authors' code; ``detach_gate=False`` keeps it). Column ``j`` of the batch
  matrix ``C_t`` is the mean of ``c`` over the batch samples of class ``j`` (zero if the class is
  absent from the batch);
- EMA (``ema="global"``, the published form): ``Cbar_t = beta * stopgrad(Cbar_{t-1}) +
  (1 - beta) * C_t``, ``Cbar_0 = 0``, so the gradient flows through the current batch from the
  first step on. It persists across epochs. ``ema="per_class"`` (beyond the papers) updates only
  the columns of the classes in the batch, ``Cbar_t[:, j] = beta * Cbar_{t-1}[:, j] +
  (1 - beta) * C_t[:, j]``, and keeps the others: with the global form a tail class seen in 6% of
  batches has its column halved at every step it is absent, so the EMA rarely holds tail columns;
- weights (``weights="frequency"``, the authors' released code): ``w_j = (N_j / N + r0)^{-1/2}``,
  nearly uniform (max/min about 1.1 on CIFAR-100-LT); ``weights="count"`` (the authors' earlier
  code): ``w_j = (N_j + count_offset)^{-1/2}`` (about 5.8 max/min on CIFAR-100-LT). Both are
  normalized to mean 1, so ``alpha`` means the same under either;
- value: ``alpha * sigma_max(Cbar_t diag(w))``.

Exactness. The gradient of ``sigma_max(M)`` is ``u v^T`` for the top singular pair ``(u, v)``, so
the pair must be right at every step, not only ``sigma``. With ``beta = 0.5`` half of ``M`` is
replaced every step and tail columns appear and vanish, so the top singular direction moves far
between steps (a warm-started power iteration of 3 steps, used before version 0.2, gave gradients
with a median 18% error on such trajectories). Two solvers, both exact to a tolerance:

- ``solver="exact"``: ``M`` is built densely and the top eigenpair of ``M^T M`` is computed in
  float64 (``torch.linalg.eigh``), ``O(K^3)``; the cheaper choice for small ``K``;
- ``solver="subspace"``: a block Krylov method with Rayleigh-Ritz. The first basis holds the
  previous step's top ``subspace_size`` (``p = 8``) right Ritz vectors (the warm start) and the
  coordinate vectors ``e_j`` of the batch's classes (at most 128): since
  ``M_t^T = h M_{t-1}^T + diag(w) D_t^T`` with ``D_t`` zero outside the batch's columns, the new
  top right singular vector lies in the span of ``M_{t-1}^T u`` and those ``e_j``. The basis
  ``B`` (orthonormal) then grows by one block per iteration: with ``M B = U S W^T``
  (Rayleigh-Ritz through the small Gram matrix ``(M B)^T M B``), ``v = B W_1 / |B W_1|``,
  ``sigma = |M v|``, ``u = M v / sigma`` (so ``M v = sigma u`` exactly), and the next block is
  ``M^T U_{1..p}`` made orthogonal to ``B`` (``M^T M`` applied to the top Ritz vectors); at 6
  blocks it restarts on the top ``p`` Ritz vectors. Convergence does not hinge on the gap
  ``sigma_1 / sigma_2`` (near-ties at the top do not stall it). It stops on the singular
  vectors, not on ``sigma``: once the residual ``|M^T u - sigma v| / sigma <= tol``, after at
  most ``max_iterations``. Each iteration reads ``E`` twice (``M^T U`` and the new block's image
  ``M X``) except the first, which reads it once: the images of the ``e_j`` are columns of ``M``
  (``O(U K)``) and that of the warm block is updated from the stored ``M_{t-1} X`` (buffer
  ``basis_image``) as ``h M_{t-1} X + D_t diag(w) X`` (``O(p U K)``; recomputed whenever the
  state changed since it was stored, and every 64 steps). At ``K = 2,000``, beta 0.5, that is
  about 2.9 iterations and 4.8 reads of ``E`` per step;
- ``solver="auto"`` picks ``exact`` for ``K <=`` :data:`EXACT_SOLVER_MAX_K` (the CPU crossover
  measured by ``scripts/bench_losses.py``) and ``subspace`` above.

Speed. The authors build ``C_t`` with a dense ``K x K`` matmul and run a full SVD every step
(``O(K^3)``), prohibitive at iNaturalist's ``K = 8142``. Here:

- only the batch's columns are built (``U <= B`` columns, ``O(B K)``);
- the EMA is stored *lazily scaled*: a dense buffer ``E`` and a scalar ``s`` with
  ``Cbar = s * E^T`` (``E`` row ``j`` = column ``j`` of ``Cbar``). A step multiplies ``s`` by
  ``beta`` and adds the new columns to ``U`` rows of ``E``: ``O(U K)``, no ``O(K^2)`` rewrite
  (``s`` is folded back into ``E`` when it falls below ``1e-20``);
- ``M`` is never formed by the subspace solver: ``E`` enters only through block products,
  computed as ``(p x K) @ (K x K)`` (2-3x faster than ``E^T @ X`` for thin blocks on MKL);
- ``u, v`` are detached, so the gradient is that of ``u^T M v``; only the current batch's columns
  carry a gradient (the EMA history is stop-gradient), so the backward pass is ``O(B K)``.

Memory: ``E`` is a dense float32 ``K x K`` buffer (265 MB at ``K = 8142``), saved in the
``state_dict`` together with ``s``, ``u``, ``v``, the warm-start block and its image under ``M``
and the step count, so a checkpoint restores the regularizer exactly (a resumed run continues
with the same numbers).

Modes. In training mode (``module.train()``) each call is one EMA step: the state advances. In
eval mode the value is computed the same way (the batch is blended into the EMA on the fly) but
nothing is stored, and there is no distributed communication (the value is the rank's own).

Distributed (``torch.distributed`` initialized with world size ``W > 1``, training mode): the
per-class counts and column sums of the batch are all-reduced before the EMA update, so every rank
holds the same ``Cbar``, ``u`` and ``v``; the gradient of ``sigma`` is multiplied by ``W`` so that
DDP's gradient averaging gives the update of one process with the ``W``-times batch. Every rank
must call the regularizer in lockstep (as with any collective).

Soft targets: the column of a sample is that of its target's argmax class.

Zero-count classes: ``N_j = 0`` gives the largest weight, ``r0^{-1/2}`` (frequency form, needs
``r0 > 0``) or ``count_offset^{-1/2}`` (count form, needs ``count_offset > 0``); both checked.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_longtail.losses._validation import as_class_counts, check_logits_and_target
from hf_longtail.losses.base import fp32_region, upcast

__all__ = [
    "CAR_EMA_MODES",
    "CAR_SOLVERS",
    "CAR_WEIGHT_FORMS",
    "EXACT_SOLVER_MAX_K",
    "ConfusionSpectralRegularizer",
    "car_class_weights",
    "confusion_batch_columns",
]

CAR_SOLVERS = ("auto", "exact", "subspace")
CAR_EMA_MODES = ("global", "per_class")
CAR_WEIGHT_FORMS = ("frequency", "count")

# solver="auto": dense eigh up to this K, subspace iteration above. Measured with
# `scripts/bench_losses.py --threads 1 --solver-ks ...` on a (shared, loaded) 2-core machine:
# exact 1.3 ms vs subspace 1.9 ms at K = 100, 2.2 vs 6.1 ms at K = 128, 8.2 vs 7.1 ms at
# K = 200, 70 vs 9.0 ms at K = 500.
EXACT_SOLVER_MAX_K = 128

# The subspace solver's basis grows by subspace_size vectors per iteration up to this many blocks.
_KRYLOV_BLOCKS = 6
# New basis directions below this fraction of |M^T U| are rounding, not new information.
_RANGE_RTOL = 1e-5

# The subspace solver's first basis holds the coordinate vectors of at most this many of the
# batch's classes (see _first_basis).
_COORDINATES_MAX = 128

# The stored warm-start image is replaced by a full product every this many steps, so float
# rounding cannot accumulate in it (with the per-class EMA it is carried with factor 1).
_WARM_REFRESH = 64

# Fold the lazy EMA scale into the dense buffer below this (float32 keeps 1/s * O(1) finite).
_FOLD_BELOW = 1e-20


def car_class_weights(
    class_counts: Any, r0: float = 0.2, *, form: str = "frequency", count_offset: float = 10.0
) -> torch.Tensor:
    """CAR class weights, normalized to mean 1 (float64).

    ``form="frequency"``: ``w_j = (N_j / N + r0)^{-1/2}`` (authors' released code);
    ``form="count"``: ``w_j = (N_j + count_offset)^{-1/2}`` (authors' earlier code).
    """
    counts = as_class_counts(class_counts)
    return _car_class_weights(counts, r0, form, count_offset)


def _car_class_weights(
    counts: torch.Tensor, r0: float, form: str = "frequency", count_offset: float = 10.0
) -> torch.Tensor:
    if form not in CAR_WEIGHT_FORMS:
        raise ValueError(f"CAR weights must be one of {CAR_WEIGHT_FORMS}; got {form!r}")
    if form == "frequency":
        offset, base, name = r0, counts / counts.sum(), "r0"
    else:
        offset, base, name = count_offset, counts, "count_offset"
    if not offset >= 0:
        raise ValueError(f"CAR {name} must be >= 0; got {offset}")
    if offset == 0 and bool((counts == 0).any()):
        raise ValueError(
            f"CAR {name} = 0 with zero-count classes gives infinite weights; "
            f"use {name} > 0 (default {0.2 if form == 'frequency' else 10.0}) or drop the classes"
        )
    w = (base + offset).rsqrt()
    return w / w.mean()


def confusion_batch_columns(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
    detach_gate: bool = True,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class sums of the CAR surrogate over the batch, only for the classes present.

    Returns ``(classes, sums, counts)``: ``classes`` (U,) the sorted labels present, ``sums``
    (U, K) with ``sums[k]`` = sum over the samples of class ``classes[k]`` of
    ``c_i = sigmoid(margin + f_i - f_j) softmax(f / tau)_i`` (``c_j = 0``), and ``counts`` (U,)
    their number. Column ``classes[k]`` of the batch confusion matrix is ``sums[k] / counts[k]``.
    Cost ``O(B K)``.
    """
    idx = labels[:, None]
    probs = torch.softmax(logits if tau == 1.0 else logits / tau, dim=1)
    diff = logits - logits.gather(1, idx)
    gate = torch.sigmoid(diff if margin == 0.0 else diff + margin)
    if detach_gate:
        gate = gate.detach()
    contrib = (gate * probs).scatter(1, idx, 0.0)
    classes, slot, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = contrib.new_zeros(classes.numel(), logits.shape[1]).index_add(0, slot, contrib)
    return classes, sums, counts


class _WeightedConfusion:
    """``M = Cbar_t diag(w)`` as an operator: ``coef * E^T diag(w)`` plus the batch's columns.

    ``E`` (K x K, row ``j`` = column ``j`` of the stored EMA divided by its lazy scale) enters
    only through products with blocks; the batch columns ``classes`` of ``M`` are changed by
    ``delta`` (U x K rows), i.e. ``M = (coef * E^T + D) diag(w)`` where ``D`` holds ``delta[k]``
    in column ``classes[k]`` and zeros elsewhere.

    Blocks are passed as *rows* (``p x K``, row-major): ``Xt @ E`` runs 2-3x faster than
    ``E^T @ X`` for the thin blocks used here on MKL (1.8 vs 5-6 ms at K = 2,000, p = 8, one
    thread), and the products with ``E`` are the solver's whole cost.

    ``history`` is the factor of the previous step's operator in this one: ``M_t X = history *
    M_{t-1} X + D diag(w) X`` (``beta`` for the global EMA, 1 for the per-class EMA, whose
    ``delta`` already removes the old batch columns).
    """

    def __init__(
        self,
        E: torch.Tensor | None,
        coef: float,
        w: torch.Tensor,
        classes: torch.Tensor,
        delta: torch.Tensor,
        history: float,
    ) -> None:
        self.E, self.coef, self.w, self.classes, self.delta = E, coef, w, classes, delta
        self.history = history
        self.w_b = w[classes]

    def columns(self, sel: torch.Tensor) -> torch.Tensor:
        """Columns ``classes[sel]`` of ``M`` as rows (``(M e_j)^T``): ``O(len(sel) K)``."""
        rows = self.delta[sel]
        if self.E is not None:
            rows = rows + self.E[self.classes[sel]].to(rows.dtype) * self.coef
        return rows * self.w_b[sel, None]

    def batch_rmm(self, Xt: torch.Tensor) -> torch.Tensor:
        """``(D diag(w) X)^T`` for ``X^T`` given as ``p x K`` rows: ``O(p U K)``, no pass over E."""
        return (Xt[:, self.classes] * self.w_b).mm(self.delta)

    def rmm(self, Xt: torch.Tensor) -> torch.Tensor:
        """``(M X)^T = X^T M^T`` for ``X^T`` given as ``p x K`` rows."""
        out = self.batch_rmm(Xt)
        if self.E is not None:
            wx = (Xt * self.w).to(self.E.dtype)
            out = out + wx.mm(self.E).to(out.dtype) * self.coef
        return out

    def rtmm(self, Qt: torch.Tensor) -> torch.Tensor:
        """``(M^T Q)^T = Q^T M`` for ``Q^T`` given as ``p x K`` rows."""
        if self.E is None:
            out = Qt.new_zeros(Qt.shape[0], self.w.numel())
        else:
            out = Qt.to(self.E.dtype).mm(self.E.T).to(Qt.dtype) * self.coef
        out.index_add_(1, self.classes, Qt.mm(self.delta.T))
        return out * self.w

    def dense(self) -> torch.Tensor:
        """``M`` itself (K x K)."""
        k = self.w.numel()
        rows = (
            self.E.to(self.delta.dtype) * self.coef
            if self.E is not None
            else self.delta.new_zeros(k, k)
        )
        rows = rows.index_add(0, self.classes, self.delta)  # rows of M^T before weighting
        return (self.w[:, None] * rows).T


class ConfusionSpectralRegularizer(nn.Module):
    """CAR: ``alpha * sigma_max(Cbar_t diag(w))`` with a fast EMA and an exact top singular pair.

    ``reg(logits, labels)`` returns the float32 scalar value; in training mode it advances the EMA
    (see the module docstring for the definitions, solvers, speed, memory and distributed
    behaviour).

    Args:
        class_counts: training-set count of every class (length ``K``).
        alpha: regularizer weight (paper's best 0.5; the authors' code uses 0.3).
        beta: EMA factor in ``[0, 1)`` (0.5 default, the paper's best).
        r0: offset of the frequency-form weights ``w_j = (N_j / N + r0)^{-1/2}``.
        tau: softmax temperature of the surrogate.
        detach_gate: detach the sigmoid gate (authors' choice).
        margin: ``gamma`` in the gate ``sigmoid(gamma + f_i - f_j)`` (0 as in the authors' code).
        weights: ``"frequency"`` (default, released code) or ``"count"``
            (``(N_j + count_offset)^{-1/2}``, earlier code).
        count_offset: offset of the count-form weights.
        ema: ``"global"`` (published: every column decays every step) or ``"per_class"`` (a
            column decays only when its class is in the batch).
        solver: ``"auto"``, ``"exact"`` or ``"subspace"`` (module docstring).
        subspace_size: width ``p`` of the subspace solver's warm-started block.
        max_iterations: most subspace iterations per call (a :class:`RuntimeWarning` is issued if
            the residual is still above ``tol`` then).
        tol: stop once ``|M^T u - sigma v| <= tol * sigma`` (``M v = sigma u`` holds exactly).
        distributed: ``None`` = all-reduce when ``torch.distributed`` is initialized with world
            size > 1; ``False`` never; ``True`` requires it.
        process_group: the group to reduce over (default: the world).
        validate: check labels/logits on every call.

    Attributes:
        confusion: the current ``Cbar`` (K x K, rows predicted, columns true).
        last_iterations: subspace iterations of the last call (0 for the exact solver).
        last_residual: ``|M^T u - sigma v| / sigma`` of the last call's pair.
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
        margin: float = 0.0,
        weights: str = "frequency",
        count_offset: float = 10.0,
        ema: str = "global",
        solver: str = "auto",
        subspace_size: int = 8,
        max_iterations: int = 100,
        tol: float = 1e-4,
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
        if not abs(margin) < float("inf"):
            raise ValueError(f"CAR margin must be finite; got {margin}")
        if ema not in CAR_EMA_MODES:
            raise ValueError(f"CAR ema must be one of {CAR_EMA_MODES}; got {ema!r}")
        if solver not in CAR_SOLVERS:
            raise ValueError(f"CAR solver must be one of {CAR_SOLVERS}; got {solver!r}")
        if int(subspace_size) < 1:
            raise ValueError(f"CAR subspace_size must be >= 1; got {subspace_size}")
        if int(max_iterations) < 1:
            raise ValueError(f"CAR max_iterations must be >= 1; got {max_iterations}")
        if not tol > 0:
            raise ValueError(f"CAR tol must be > 0; got {tol}")
        k = counts.numel()
        self.num_classes = k
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.r0 = float(r0)
        self.tau = float(tau)
        self.detach_gate = bool(detach_gate)
        self.margin = float(margin)
        self.weight_form = weights
        self.count_offset = float(count_offset)
        self.ema = ema
        self.solver = solver
        if solver == "auto":
            solver = "exact" if k <= EXACT_SOLVER_MAX_K else "subspace"
        self.resolved_solver = solver
        self.subspace_size = min(int(subspace_size), k)
        self.max_iterations = int(max_iterations)
        self.tol = float(tol)
        self.last_iterations = 0
        self.last_residual = 0.0
        self.distributed = distributed
        self.process_group = process_group
        self.validate = bool(validate)
        w = _car_class_weights(counts, r0, weights, count_offset).float()
        self.register_buffer("weights", w, persistent=False)
        # ema_columns[j] = column j of Cbar divided by ema_scale (lazy scaling, module docstring).
        self.register_buffer("ema_columns", torch.zeros(k, k))
        self.register_buffer("ema_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("u", torch.full((k,), k**-0.5))
        self.register_buffer("v", torch.full((k,), k**-0.5))
        self.register_buffer("basis", _initial_basis(k, self.subspace_size))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # basis_image = (M_t X)^T for the warm-start block X = basis, made at step
        # basis_image_step (-1: none); see _warm_image. Saved, so a resumed run continues with
        # the very same numbers.
        self.register_buffer("basis_image", torch.zeros(self.subspace_size, k))
        self.register_buffer("basis_image_step", torch.full((), -1, dtype=torch.long))
        self._image_key: tuple | None = None
        self._pending_image: torch.Tensor | None = None

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
        self.basis.copy_(_initial_basis(self.num_classes, self.subspace_size))
        self.num_steps.zero_()
        self.basis_image.zero_()
        self.basis_image_step.fill_(-1)
        self._image_key = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the subspace solver (<= 0.1) have no warm-start block; the
        # block only speeds up convergence, so a fresh one loses nothing but a few iterations.
        key = prefix + "basis"
        fresh = None
        if key not in state_dict and prefix + "ema_columns" in state_dict:
            fresh = _initial_basis(self.num_classes, self.subspace_size)
        # Checkpoints without the warm-start image (<= 0.2), or whose image belongs to another
        # block: one full product rebuilds it.
        if prefix + "ema_columns" in state_dict and (
            prefix + "basis_image" not in state_dict or fresh is not None
        ):
            state_dict[prefix + "basis_image"] = torch.zeros_like(self.basis_image)
            state_dict[prefix + "basis_image_step"] = torch.full((), -1, dtype=torch.long)
        if fresh is not None:
            state_dict[key] = fresh
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The loaded image is as valid as it was when saved (basis_image_step says).
        self._image_key = self._state_key()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .double() make new buffers holding the same state: the stored image
        # stays as valid as it was.
        valid = self._image_is_valid()
        out = super()._apply(fn, *args, **kwargs)
        self._image_key = self._state_key() if valid else None
        return out

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
        The value is ``u^T M v`` for the top singular pair ``(u, v)`` of ``M`` (detached), so its
        gradient is that of ``sigma_max``: ``u v^T`` through the batch's columns.
        """
        world = self._world()
        classes, sums, counts = confusion_batch_columns(
            logits, labels, self.tau, self.detach_gate, self.margin
        )
        if world > 1:
            classes, sums, counts = self._all_reduce(labels, classes, sums)
        cols = sums / counts[:, None].to(sums.dtype)  # (U, K): batch columns of C_t
        op = self._operator(classes, cols.detach())
        value, u, v, basis = self._top_singular_pair(op)
        # d sigma / d cols = (1 - beta) * u v_j w_j on batch column j (both EMA forms).
        batch_term = (1.0 - self.beta) * cols.mv(u).dot(op.w_b * v[classes])
        sigma = batch_term + (value - batch_term.detach())
        if world > 1:
            # DDP averages gradients over W ranks; each rank's batch term only sees its samples.
            sigma = sigma + (world - 1) * (batch_term - batch_term.detach())
        if self.training:
            self._commit(classes, cols.detach(), u, v, basis)
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

    # ------------------------------------------------------------------------------ solvers
    def _operator(self, classes: torch.Tensor, cols: torch.Tensor) -> _WeightedConfusion:
        beta = self.beta
        w = self.weights.to(cols.dtype)
        # Global EMA with beta = 0 keeps no history; the per-class EMA keeps absent columns.
        has_history = int(self.num_steps) > 0 and (beta > 0 or self.ema == "per_class")
        E = self.ema_columns if has_history else None
        if self.ema == "global":
            # Cbar_t = beta * s * E^T + (1 - beta) * C_t: every column decays.
            coef = beta * float(self.ema_scale)
            delta = cols * (1.0 - beta)
            history = beta
        else:
            # Only the batch's columns move: Cbar_t[:, j] = s E[j] + (1 - beta)(C_t[:, j] - s E[j]).
            coef = float(self.ema_scale)
            delta = cols * (1.0 - beta)
            if E is not None:
                delta = delta - (1.0 - beta) * coef * E[classes].to(cols.dtype)
            history = 1.0
        return _WeightedConfusion(E, coef, w, classes, delta, history)

    def _top_singular_pair(
        self, op: _WeightedConfusion
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sigma, u, v, block)`` of ``op``: exact eigh or subspace iteration (module docstring)."""
        if self.resolved_solver == "exact":
            return self._exact_pair(op)
        return self._subspace_pair(op)

    def _exact_pair(self, op):
        dtype = op.delta.dtype
        M = op.dense().double()
        evecs = torch.linalg.eigh(M.T @ M).eigenvectors  # ascending eigenvalues
        v = evecs[:, -1]
        mv = M.mv(v)
        sigma = torch.linalg.vector_norm(mv)
        if sigma > 0:
            u = mv / sigma
        else:  # M = 0 (e.g. extreme logits): any pair is a subgradient; keep the previous u
            u = self.u.double()
        self.last_iterations = 0
        self.last_residual = 0.0
        basis = evecs[:, -self.subspace_size :].flip(1).to(self.basis.dtype)
        return sigma.to(dtype), u.to(dtype), v.to(dtype), basis

    def _subspace_pair(self, op):
        dtype = op.delta.dtype
        p = self.subspace_size
        # Restart once the basis holds this many vectors (keeps the Rayleigh-Ritz problem small).
        cap = min(self.num_classes, _KRYLOV_BLOCKS * p)
        # Blocks are rows (p x K): see _WeightedConfusion on why.
        Xt = self.basis.T.to(dtype).contiguous()
        basis, images = self._first_basis(op, Xt)
        residual = float("inf")
        iterations = 0
        while True:
            iterations += 1
            Bt, MBt = torch.cat(basis, 0), torch.cat(images, 0)
            # Rayleigh-Ritz on span(B) (orthonormal rows Bt): the top right singular vectors
            # W_p of M B from the eigenvectors of its n x n Gram matrix (0.1 ms where LAPACK's
            # SVD of the K x n block takes 1-2 ms). Whatever their rounding, the pair below
            # satisfies M v = sigma u exactly, and the residual test checks the rest. The Gram
            # is formed in float64, except that of the large first basis (batch coordinates,
            # ~U + p vectors; 4x cheaper in float32): its Ritz vectors only have to start the
            # iteration, whose later, small Rayleigh-Ritz steps are float64.
            if iterations == 1 and Bt.shape[0] > 2 * p:
                G = (MBt @ MBt.T).double()
            else:
                G = MBt.double() @ MBt.double().T
            Wp = torch.linalg.eigh(G).eigenvectors[:, -p:].flip(1).T.to(dtype)
            ritz = Wp @ Bt  # rows: the top right Ritz vectors, v and the next warm start
            ritz_images = Wp @ MBt  # rows (M ritz_i)^T = s_i u_i
            norms = torch.linalg.vector_norm(ritz_images, dim=1)
            Ut = ritz_images / norms.clamp_min(torch.finfo(dtype).tiny)[:, None]
            # |v| = 1 up to the basis' rounding; dividing by it keeps M v = sigma u exact.
            v_norm = torch.linalg.vector_norm(ritz[0])
            sigma, u, v = norms[0] / v_norm, Ut[0], ritz[0] / v_norm
            if not float(norms[0]) > 0:  # M = 0 (e.g. extreme logits): any pair is a
                u = self.u.to(
                    dtype, copy=True
                )  # subgradient: keep the previous u, as the exact solver
            Z = op.rtmm(Ut)  # rows M^T u_i (M^T u_1 = sigma v_1 at the end)
            scale = float(sigma)
            residual = float(torch.linalg.vector_norm(Z[0] - sigma * v)) / scale if scale else 0.0
            if residual <= self.tol or iterations >= self.max_iterations:
                break
            if Bt.shape[0] + p > cap:  # thick restart on the top Ritz vectors: no extra product
                basis, images = [ritz], [ritz_images]
                Bt = ritz
            # The next block: M^T M applied to the top Ritz vectors, orthogonal to the basis.
            Xt = _orthogonal_complement(Z, Bt)
            if Xt is None:  # span(B) is invariant: the Ritz pair is exact
                break
            basis.append(Xt)
            images.append(op.rmm(Xt))
        if residual > self.tol:
            warnings.warn(
                f"CAR subspace solver: residual |M^T u - sigma v| / sigma = {residual:.2e} after "
                f"{iterations} iterations is above tol = {self.tol:g}; raise max_iterations or "
                "subspace_size, or use solver='exact'",
                RuntimeWarning,
                stacklevel=4,
            )
        self.last_iterations = iterations
        self.last_residual = residual
        # The images of the Ritz vectors under this step's M: the next step's warm image.
        self._pending_image = ritz_images
        # M v = sigma u holds exactly in the Ritz basis, so u^T M v = sigma.
        return sigma, u, v, ritz.T.to(self.basis.dtype)

    def _first_basis(
        self, op: _WeightedConfusion, Xt: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first Rayleigh-Ritz basis (rows) and its images under ``M``: the batch's classes'
        coordinate vectors ``e_j`` and the warm-start block with those coordinates removed.

        ``M_t^T = history * M_{t-1}^T + diag(w) D^T`` and ``D^T`` is zero outside the batch's
        classes, so the new top right singular vector lies in the span of ``M_{t-1}^T u`` and
        those ``e_j``: adding them up front halves the Krylov iterations when half of ``M`` is
        replaced every step (2.9 instead of 6.1 at K = 2,000, beta 0.5). Their images are
        columns of ``M`` (``O(U K)``, no pass over ``E``); the warm block's image comes from
        :meth:`_warm_image`. At most :data:`_COORDINATES_MAX` classes, those with the largest
        weighted change ``w_j |delta_j|``.
        """
        warm = self._warm_image(op, Xt)
        sel = torch.arange(op.classes.numel(), device=Xt.device)
        if sel.numel() > _COORDINATES_MAX:
            score = op.w_b * torch.linalg.vector_norm(op.delta, dim=1)
            sel = score.topk(_COORDINATES_MAX).indices
        cls = op.classes[sel]
        coords = Xt.new_zeros(cls.numel(), self.num_classes)
        coords[torch.arange(cls.numel(), device=Xt.device), cls] = 1.0
        columns = op.columns(sel)
        # The warm block without the coordinates cls (orthogonal to e_cls), and its image.
        rest, rest_image = Xt.clone(), warm - Xt[:, cls] @ columns
        rest[:, cls] = 0.0
        # Orthonormalise it by its float64 Gram matrix (the same map on rows and images);
        # parts below 1% of a unit vector lie in span(e_cls) to that accuracy: dropped.
        r64 = rest.double()
        values, vectors = torch.linalg.eigh(r64 @ r64.T)
        keep = values > 1e-4
        if not bool(keep.any()):
            return [coords], [columns]
        T = (vectors[:, keep] / values[keep].sqrt()).T.to(Xt.dtype)
        return [coords, T @ rest], [columns, T @ rest_image]

    def _warm_image(self, op: _WeightedConfusion, Xt: torch.Tensor) -> torch.Tensor:
        """``(M X)^T`` for the warm-start block, from the stored ``M_{t-1} X`` when it is valid.

        ``M_t X = history * M_{t-1} X + D diag(w) X`` costs ``O(p U K)`` instead of a pass over
        ``E``. The stored image is used only if the step that wrote the current state made it
        (``basis_image_step == num_steps``) and no buffer changed since (a load, a reset, an
        in-place edit, a move to another device or dtype), and it is replaced by a full product
        every :data:`_WARM_REFRESH` steps, so rounding cannot accumulate in it.
        """
        if op.E is None or not self._image_is_valid() or int(self.num_steps) % _WARM_REFRESH == 0:
            return op.rmm(Xt)
        return self.basis_image.to(Xt.dtype) * op.history + op.batch_rmm(Xt)

    def _state_key(self) -> tuple | None:
        # In-place writes to a buffer (load_state_dict, reset, user edits) bump its version
        # counter; new tensors (.to(), assignment) change its identity. Inference-mode tensors
        # have no version counter: no stored image is trusted then.
        try:
            state = (
                self.ema_columns,
                self.ema_scale,
                self.basis,
                self.basis_image,
                self.basis_image_step,
                self.weights,
                self.num_steps,
            )
            return (tuple((id(t), t._version) for t in state), self.beta, self.ema)
        except RuntimeError:
            return None

    def _image_is_valid(self) -> bool:
        key = self._image_key
        return (
            key is not None
            and int(self.basis_image_step) == int(self.num_steps)
            and key == self._state_key()
        )

    @torch.no_grad()
    def _commit(
        self,
        classes: torch.Tensor,
        cols: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        basis: torch.Tensor,
    ) -> None:
        E = self.ema_columns
        beta = self.beta
        if self.ema == "per_class":
            # Only the batch's columns move; the lazy scale stays 1 in this mode.
            new = beta * E[classes] + (1.0 - beta) * cols.to(E.dtype)
            E.index_copy_(0, classes, new)
        else:
            if beta == 0.0:
                E.zero_()
                scale = 1.0
            else:
                scale = float(self.ema_scale) * beta
                if scale < _FOLD_BELOW:
                    E.mul_(scale)
                    scale = 1.0
            E.index_add_(0, classes, cols.to(E.dtype), alpha=(1.0 - beta) / scale)
            self.ema_scale.fill_(scale)
        self.u.copy_(u)
        self.v.copy_(v)
        self.basis.copy_(basis)
        self.num_steps += 1
        image, self._pending_image = self._pending_image, None
        if image is not None:  # the subspace solver's M_t X for the block X just stored
            self.basis_image.copy_(image)
            self.basis_image_step.copy_(self.num_steps)
            self._image_key = self._state_key()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, "
            f"r0={self.r0}, tau={self.tau}, detach_gate={self.detach_gate}, "
            f"margin={self.margin}, weights={self.weight_form!r}, ema={self.ema!r}, "
            f"solver={self.resolved_solver!r}, subspace_size={self.subspace_size}, "
            f"max_iterations={self.max_iterations}, tol={self.tol}"
        )


def _orthogonal_complement(Z: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """Rows spanning the part of the row space of ``Z`` orthogonal to that of ``B`` (``B``'s
    rows orthonormal), orthonormal, at most ``K - rank(B)`` of them, or ``None`` if ``Z``'s rows
    lie in ``B``'s row space to rounding."""
    room = B.shape[1] - B.shape[0]
    if room <= 0:
        return None
    X = Z - (Z @ B.T) @ B
    X = X - (X @ B.T) @ B  # twice is enough (Kahan-Parlett) in floating point
    # The row space of X from the eigenpairs of its p x p Gram matrix in float64 (singular
    # values s_i = sqrt(lambda_i)): dependent or rounding-level rows are dropped, not
    # orthonormalised into arbitrary directions that would break the basis.
    X64 = X.double()
    values, vectors = torch.linalg.eigh(X64 @ X64.T)  # ascending
    floor = (_RANGE_RTOL * float(torch.linalg.vector_norm(Z))) ** 2
    n = min(int((values > floor).sum()), room)
    if n == 0:
        return None
    top = vectors[:, -n:].T
    Q = ((top @ X64) / values[-n:].sqrt()[:, None]).to(X.dtype)
    Q = Q - (Q @ B.T) @ B
    return torch.linalg.qr(Q.T).Q.T.contiguous()


def _initial_basis(k: int, p: int) -> torch.Tensor:
    # Start from the uniform vector (Cbar is non-negative, so its top singular vectors are too,
    # by Perron-Frobenius) completed by a fixed orthonormal block, so every rank starts alike.
    g = torch.Generator().manual_seed(0)
    block = torch.randn(k, p, generator=g, dtype=torch.float64)
    block[:, 0] = 1.0
    return torch.linalg.qr(block).Q.float()
