#!/usr/bin/env python
"""What each loss costs in a real training step: CIFAR ResNet-32, batch 128, CPU by default.

One step = forward, the method's loss (hf_longtail.losses.build_loss, float32), backward and an
SGD update. Methods are measured round-robin with a rotating start (A B C, B C A, C A B, ...) so neither a
machine whose speed drifts (other processes, thermal limits) nor the position in a round biases a
method; the report is the median step time per
method and its ratio to CE.

    python scripts/bench_step_cost.py                   # 2 threads, 30 rounds
    python scripts/bench_step_cost.py --threads 1 --rounds 50 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_longtail.losses import LongTailLossConfig, build_loss
from hf_longtail.models import create_model

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
METHODS = {
    "ce": {"base": "ce"},
    "ce_ccar": {"base": "ce", "ccar": True},
    "ce_car": {"base": "ce", "car_weight": 0.5},
    "ce_ccar_car": {"base": "ce", "ccar": True, "car_weight": 0.5},
    "la_ccar_car": {"base": "la", "ccar": True, "car_weight": 0.5},
    "ldam": {"base": "ldam"},
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny activations of a random batch are not what training sees
    torch.manual_seed(0)
    device = torch.device(args.device)
    counts = CIFAR10_LT_IF100
    model = create_model("resnet32_cifar", num_labels=len(counts)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = {
        name: build_loss(LongTailLossConfig(**cfg), counts).to(device)
        for name, cfg in METHODS.items()
    }
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, len(counts), (args.batch,), device=device)

    def step(loss_fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(pixel_values=x).logits
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for loss_fn in losses.values():  # warm-up: allocator, oneDNN primitive caches
        for _ in range(3):
            step(loss_fn)
    times: dict[str, list[float]] = {name: [] for name in losses}
    names = list(losses)
    for r in range(args.rounds):
        # Rotate the starting method each round: the first step after another method's was
        # measured slower, a position effect that must not land on one method.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(step(losses[name]))

    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"ResNet-32 training step, batch {args.batch}, {device}, {args.threads} threads, "
        f"{args.rounds} interleaved rounds (median ms):"
    )
    print(f"{'method':<14}{'ms/step':>10}{'vs CE':>9}")
    for name, ms in medians.items():
        print(f"{name:<14}{ms:>10.1f}{ms / medians['ce']:>8.3f}x")
    return medians


if __name__ == "__main__":
    main()
