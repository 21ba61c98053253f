#!/usr/bin/env python
"""What each loss costs in a real training step: CIFAR ResNet-32 (or any model), CPU by default.

One step = forward, the method's loss (hf_longtail.losses.build_loss, float32), backward and an
SGD update. Methods are measured round-robin with a rotating start (A B C, B C A, C A B, ...) so neither a
machine whose speed drifts (other processes, thermal limits) nor the position in a round biases a
method; the report is the median step time per
method and its ratio to CE.

    python scripts/bench_step_cost.py                   # 2 threads, 30 rounds
    python scripts/bench_step_cost.py --threads 1 --rounds 50 --device cpu
    # the `finetune` benchmark preset's step (pretrained Lite0, its resolution and batch):
    python scripts/bench_step_cost.py --model efficientnet_lite0_in1k --image_size 96 \
        --batch 64 --json benchmarks/results/step_cost_finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

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
    # the linear preset's tuned settings at IF 100 (the weights' form and the EMA mode are what
    # could change the cost; alpha cannot)
    "ce_ccar_car_tuned": {
        "base": "ce",
        "ccar": True,
        "ccar_omega": 0.5,
        "car_weight": 10.0,
        "car_weights": "count",
    },
    "ce_car_per_class": {"base": "ce", "car_weight": 0.5, "car_ema": "per_class"},
    "ldam": {"base": "ldam"},
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet32_cifar", help="any create_model name")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--json", help="also write the medians, ratios and machine here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny activations of a random batch are not what training sees
    torch.manual_seed(0)
    device = torch.device(args.device)
    counts = CIFAR10_LT_IF100
    model = create_model(args.model, num_labels=len(counts)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = {
        name: build_loss(LongTailLossConfig(**cfg), counts).to(device)
        for name, cfg in METHODS.items()
    }
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
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
    title = (
        f"{args.model} training step, {args.image_size} px, batch {args.batch}, {device}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds (median ms)"
    )
    print(title + ":")
    print(f"{'method':<18}{'ms/step':>10}{'vs CE':>9}")
    for name, ms in medians.items():
        print(f"{name:<18}{ms:>10.1f}{ms / medians['ce']:>8.3f}x")
    if args.json:
        record = {
            "setting": title,
            "args": vars(args),
            "median_ms": medians,
            "ratio_to_ce": {name: ms / medians["ce"] for name, ms in medians.items()},
            "methods": METHODS,
            "machine": {
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return medians


if __name__ == "__main__":
    main()
