#!/usr/bin/env python
"""CPU benchmark of the long-tail losses: CE vs CE + CCAR + CAR, and fast CAR vs full-SVD CAR.

Per training step (forward + backward, batch B = 128 by default) for K = 10, 100, 1000, 2000,
8142:

- ``CE``: plain cross-entropy (``build_loss(None, counts)``);
- ``CE+CCAR``: CCAR-weighted cross-entropy;
- ``CE+CCAR+CAR``: the full loss (alpha = 0.5), and the time it adds to CE;
- ``CAR fast``: :class:`ConfusionSpectralRegularizer` alone at its defaults (batch columns only,
  lazily scaled EMA, the exact top singular pair from the ``auto`` solver);
- ``CAR SVD``: the authors' approach: the dense K x K batch confusion from a
  ``(K x B) @ (B x K)`` matmul, a dense EMA update and a full SVD every step
  (``torch.linalg.svdvals`` with gradient, which computes U and V), started from the fast module's
  EMA so that it decomposes a full matrix from its first timed step, and the speed-up of
  ``CAR fast`` over it. The two are timed round-robin against each other (one step of each in
  turn), so load from other processes hits both alike; ``CAR fast`` is that pairing's median;
- ``grad err``: the largest relative difference between the two gradients (fast vs full SVD,
  same batches, same EMA recursion) over ``--agree-steps`` steps, where the full SVD is affordable.

A second table (``--solver-ks``) times the two exact solvers of CAR against each other, dense
``eigh`` and warm-started subspace iteration, to place ``EXACT_SOLVER_MAX_K`` (``solver="auto"``).

Times are medians over repeated steps after warm-up (``time.perf_counter``), with the number of
torch threads set explicitly. The full-SVD approach at K = 8142 takes minutes per step on a few CPU
cores, so it runs ``--svd-reps`` times without warm-up there (LAPACK has nothing to warm up that a
first call would not).

Usage::

    python scripts/bench_losses.py                       # the full tables (~15 min on 2 cores)
    python scripts/bench_losses.py --ks 10,100 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_longtail.losses import (
    ConfusionSpectralRegularizer,
    LongTailLossConfig,
    build_loss,
    car_class_weights,
)
from hf_longtail.losses.car import EXACT_SOLVER_MAX_K


def long_tailed_counts(k: int, n_max: int = 500, imbalance: float = 100.0) -> torch.Tensor:
    """Exponential profile ``n_max * imbalance^(-c/(K-1))`` (CIFAR-LT style), at least 1."""
    c = torch.arange(k, dtype=torch.float64)
    return (n_max * imbalance ** (-c / max(k - 1, 1))).floor().clamp_min(1)


class DenseSVDCAR(torch.nn.Module):
    """CAR as in the authors' code: dense batch matmul, dense EMA, full SVD every step."""

    def __init__(self, counts: torch.Tensor, alpha=0.5, beta=0.5, r0=0.2, tau=1.0) -> None:
        super().__init__()
        k = counts.numel()
        self.alpha, self.beta, self.tau = alpha, beta, tau
        self.register_buffer("w", car_class_weights(counts, r0).float())
        self.register_buffer("ema", torch.zeros(k, k))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        onehot = F.one_hot(labels, k).to(logits.dtype)
        probs = torch.softmax(logits / self.tau, dim=1)
        gate = torch.sigmoid(logits - logits.gather(1, labels[:, None])).detach()
        contrib = gate * probs * (1 - onehot)
        batch = contrib.T @ onehot / onehot.sum(0).clamp_min(1)  # dense (K x B) @ (B x K)
        cbar = self.beta * self.ema + (1 - self.beta) * batch
        sigma = torch.linalg.svdvals(cbar * self.w)[0]  # full SVD (U, V) when grad is needed
        self.ema = cbar.detach()
        return self.alpha * sigma


def gradient_agreement(
    counts: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> float:
    """Largest relative gradient difference, fast CAR vs :class:`DenseSVDCAR`, step by step.

    Both start from an empty EMA and see the same batches, so they hold the same ``Cbar``; the
    full SVD's autograd gives the exact ``u1 v1^T``.
    """
    fast, dense = ConfusionSpectralRegularizer(counts, alpha=0.5), DenseSVDCAR(counts)
    worst = 0.0
    for i in range(steps):
        z, y = batches[i % len(batches)]
        (g_fast,) = torch.autograd.grad(fast(z, y), z)
        (g_dense,) = torch.autograd.grad(dense(z, y), z)
        worst = max(worst, float((g_fast - g_dense).norm() / g_dense.norm()))
    return worst


def make_batches(
    k: int, batch: int, device: torch.device, n: int = 8
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Long-tailed counts and ``n`` batches of random logits with labels drawn from the prior."""
    counts = long_tailed_counts(k)
    prior = counts / counts.sum()
    g = torch.Generator().manual_seed(k)
    batches = []
    for _ in range(n):
        z = torch.randn(batch, k, generator=g) * 2
        y = torch.multinomial(prior.float(), batch, replacement=True, generator=g)
        batches.append((z.to(device).requires_grad_(True), y.to(device)))
    return counts, batches


def solver_table(ks: list[int], args: argparse.Namespace, device: torch.device) -> dict:
    """Time CAR's dense ``exact`` solver against ``subspace`` iteration; print the crossover."""
    print(
        f"\nCAR solvers (forward+backward, median ms): dense eigh vs subspace iteration\n"
        f"{'K':>6} | {'exact':>8} | {'subspace':>8} | {'iters':>5} | faster"
    )
    out = {}
    for k in ks:
        counts, batches = make_batches(k, args.batch, device)
        mods = {s: ConfusionSpectralRegularizer(counts, solver=s) for s in ("exact", "subspace")}
        res = time_interleaved(
            {s: make_step(m.to(device), batches) for s, m in mods.items()},
            args.min_time / 2,
            args.max_reps,
            5,
            device,
        )
        out[k] = res
        faster = "exact" if res["exact"] < res["subspace"] else "subspace"
        print(
            f"{k:>6} | {res['exact'] * 1e3:>8.3f} | {res['subspace'] * 1e3:>8.3f} | "
            f"{mods['subspace'].last_iterations:>5} | {faster}",
            flush=True,
        )
    exact_wins = [k for k, r in out.items() if r["exact"] < r["subspace"]]
    print(
        f"exact is faster up to K = {max(exact_wins) if exact_wins else 'none'}; "
        f"solver='auto' uses exact for K <= {EXACT_SOLVER_MAX_K}"
    )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """A forward + backward step on the i-th batch (cycled)."""

    def step(i: int) -> None:
        z, y = batches[i % len(batches)]
        z.grad = None
        module(z, y).backward()

    return step


def time_interleaved(
    steps: dict[str, Callable[[int], None]],
    min_time: float,
    max_reps: int,
    warmup: int,
    device: torch.device,
    min_reps: int = 3,
) -> dict[str, float]:
    """Median seconds per step of each entry, timed round-robin after ``warmup`` steps each.

    Round-robin: a burst of load from another process hits every entry alike, so differences
    between entries (the time CCAR + CAR add to CE) stay meaningful on a shared machine.
    """
    for step in steps.values():
        for i in range(warmup):
            step(i)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    rep = 0
    while rep < max_reps and (rep < min_reps or time.perf_counter() - start < min_time):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(warmup + rep)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        rep += 1
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    """Run the benchmark and print the table; returns ``{K: {cell: seconds per step}}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="10,100,1000,2000,8142", help="comma-separated K")
    parser.add_argument(
        "--solver-ks",
        default="16,32,64,100,128,200,300,500,1000",
        help="K values of the exact-vs-subspace solver table ('' skips it)",
    )
    parser.add_argument("--agree-steps", type=int, default=20, help="steps of the grad check")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--min-time", type=float, default=8.0, help="seconds of timing per K")
    parser.add_argument("--max-reps", type=int, default=300)
    parser.add_argument("--svd-reps", type=int, default=1, help="full-SVD reps when K >= 4096")
    parser.add_argument("--device", default="cpu", help="cpu (the reference setting) or cuda")
    parser.add_argument("--skip-svd", action="store_true", help="do not time the full-SVD approach")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{platform.machine()} {os.cpu_count()} CPUs | device {device} | B={args.batch} | "
        "forward+backward per step, median ms"
    )
    header = (
        f"{'K':>6} | {'CE':>8} | {'CE+CCAR':>8} | {'CE+CCAR+CAR':>11} | {'added':>7} | "
        f"{'CAR fast':>9} | {'CAR full-SVD':>12} | {'SVD/fast':>9} | {'grad err':>8}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        counts, batches = make_batches(k, args.batch, device)
        modules = {
            "ce": build_loss(None, counts),
            "ccar": build_loss(LongTailLossConfig(ccar=True), counts),
            "full": build_loss(LongTailLossConfig(ccar=True, car_weight=0.5), counts),
            "car": ConfusionSpectralRegularizer(counts, alpha=0.5),
        }
        steps = {name: make_step(m.to(device), batches) for name, m in modules.items()}
        res = time_interleaved(steps, args.min_time, args.max_reps, 5, device)
        res["svd"] = float("nan")
        if not args.skip_svd:
            big = k >= 4096 and device.type == "cpu"  # minutes per step: few reps, no warm-up
            dense = DenseSVDCAR(counts).to(device)
            # Start from the fast module's EMA (the same recursion over the same batches), so the
            # full SVD times a full matrix from its first step on, not an almost empty one.
            dense.ema = modules["car"].confusion.clone()
            # Fast and full-SVD CAR timed against each other, round-robin: the ratio is fair
            # under load from other processes; "CAR fast" is this pairing's median.
            pair = time_interleaved(
                {"car": steps["car"], "svd": make_step(dense, batches)},
                0.0 if big else args.min_time / 4,
                args.svd_reps if big else args.max_reps,
                0 if big else 2,
                device,
                min_reps=args.svd_reps if big else 3,
            )
            res["car"], res["svd"] = pair["car"], pair["svd"]
        res["grad_err"] = float("nan")
        if not args.skip_svd and k <= 2000 and args.agree_steps > 0:
            res["grad_err"] = gradient_agreement(counts, batches, args.agree_steps)
        results[k] = res
        print(
            f"{k:>6} | {res['ce'] * 1e3:>8.3f} | {res['ccar'] * 1e3:>8.3f} | "
            f"{res['full'] * 1e3:>11.3f} | {(res['full'] - res['ce']) * 1e3:>7.3f} | "
            f"{res['car'] * 1e3:>9.3f} | {res['svd'] * 1e3:>12.1f} | "
            f"{res['svd'] / res['car']:>8.0f}x | {res['grad_err']:>8.1e}",
            flush=True,
        )
    print(
        "\nadded = (CE+CCAR+CAR) - CE; SVD/fast = CAR full-SVD / CAR fast; grad err = largest "
        f"relative gradient difference over {args.agree_steps} steps (K <= 2000). "
        f"Full SVD at K >= 4096 on CPU: {args.svd_reps} rep(s), no warm-up."
    )
    solver_ks = [int(k) for k in args.solver_ks.split(",") if k.strip()]
    if solver_ks:
        solver_table(solver_ks, args, device)
    return results


if __name__ == "__main__":
    main()
