#!/usr/bin/env python
"""CPU benchmark of the long-tail losses: CE vs CE + CCAR + CAR, and fast CAR vs full-SVD CAR.

Per training step (forward + backward, batch B = 128 by default) for K = 10, 100, 1000, 8142:

- ``CE``: plain cross-entropy (``build_loss(None, counts)``);
- ``CE+CCAR``: CCAR-weighted cross-entropy;
- ``CE+CCAR+CAR``: the full loss (alpha = 0.5), and the time it adds to CE;
- ``CAR fast``: :class:`ConfusionSpectralRegularizer` alone (batch columns only, lazily scaled EMA,
  one warm-started power iteration);
- ``CAR SVD``: the authors' approach: the dense K x K batch confusion from a
  ``(K x B) @ (B x K)`` matmul, a dense EMA update and a full SVD every step
  (``torch.linalg.svdvals`` with gradient, which computes U and V), and the speed-up of ``CAR fast``
  over it.

Times are medians over repeated steps after warm-up (``time.perf_counter``), with the number of
torch threads set explicitly. The full-SVD approach at K = 8142 takes minutes per step on a few CPU
cores, so it runs ``--svd-reps`` times without warm-up there (LAPACK has nothing to warm up that a
first call would not).

Usage::

    python scripts/bench_losses.py                       # the full table (~10 min on 2 cores)
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
    parser.add_argument("--ks", default="10,100,1000,8142", help="comma-separated class counts")
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
        f"{'CAR fast':>9} | {'CAR full-SVD':>12} | {'SVD/fast':>9}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        counts = long_tailed_counts(k)
        prior = counts / counts.sum()
        g = torch.Generator().manual_seed(k)
        batches = []
        for _ in range(8):
            z = torch.randn(args.batch, k, generator=g) * 2
            y = torch.multinomial(prior.float(), args.batch, replacement=True, generator=g)
            batches.append((z.to(device).requires_grad_(True), y.to(device)))
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
            res["svd"] = time_interleaved(
                {"svd": make_step(DenseSVDCAR(counts).to(device), batches)},
                0.0 if big else args.min_time / 4,
                args.svd_reps if big else args.max_reps,
                0 if big else 2,
                device,
                min_reps=args.svd_reps if big else 3,
            )["svd"]
        results[k] = res
        print(
            f"{k:>6} | {res['ce'] * 1e3:>8.3f} | {res['ccar'] * 1e3:>8.3f} | "
            f"{res['full'] * 1e3:>11.3f} | {(res['full'] - res['ce']) * 1e3:>7.3f} | "
            f"{res['car'] * 1e3:>9.3f} | {res['svd'] * 1e3:>12.1f} | "
            f"{res['svd'] / res['car']:>8.0f}x",
            flush=True,
        )
    print(
        "\nadded = (CE+CCAR+CAR) - CE; SVD/fast = CAR full-SVD / CAR fast. "
        f"Full SVD at K >= 4096 on CPU: {args.svd_reps} rep(s), no warm-up."
    )
    return results


if __name__ == "__main__":
    main()
