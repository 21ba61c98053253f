"""Benchmark of hf_longtail.data on CPU.

Measures
  1. the long-tailed index build for a 1.28M-row synthetic label column with 1000 classes
     (ImageNet scale, labels only): ``long_tailed_indices`` on a NumPy array, and the full
     ``make_long_tailed`` on a ``datasets.Dataset`` (label read + select + record); goal < 5 s;
  2. the CIFAR train pipeline (decode PNG -> RGB -> pad-4 random crop -> flip -> tensor ->
     normalise) on real CIFAR-10-LT through a torch DataLoader (batch 128, 2 workers), images/s;
  3. for comparison, one ResNet-32 (CIFAR, 0.46M parameters, defined inline: this script imports
     no other hf_longtail sub-package) SGD training step on batch 128 on the same CPU, images/s,
     and the same training loop fed by the DataLoader of (2). Subnormal floats are flushed to
     zero (``torch.set_flush_denormal``) so that the synthetic batch does not time the CPU's
     slow subnormal path.

Usage:  python scripts/bench_data.py [--cifar10 PATH] [--batches 40] [--steps 5] [--device cpu]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_index(num_rows: int = 1_281_167, num_classes: int = 1000, seed: int = 0) -> None:
    from datasets import ClassLabel, Dataset, Features

    from hf_longtail.data import long_tailed_counts, long_tailed_indices, make_long_tailed

    rng = np.random.default_rng(seed)
    # ImageNet-like class sizes (732..1300), shuffled rows.
    sizes = rng.integers(732, 1301, size=num_classes)
    sizes = np.round(sizes * num_rows / sizes.sum()).astype(np.int64)
    sizes[-1] += num_rows - sizes.sum()
    labels = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    counts = np.minimum(
        sizes, long_tailed_counts(int(sizes.max()), num_classes, 256, "exp")
    ).tolist()
    t_np = _best_of(lambda: long_tailed_indices(labels, counts, seed=0))
    ds = Dataset.from_dict(
        {"label": labels}, features=Features({"label": ClassLabel(num_classes=num_classes)})
    )
    holder = {}
    t_ds = _best_of(lambda: holder.setdefault("lt", make_long_tailed(ds, 256, seed=0)))
    print(
        f"[index] rows={labels.size:,} classes={num_classes} -> kept={len(holder['lt']):,} (IF=256)"
    )
    print(f"[index] long_tailed_indices (NumPy labels):         {t_np:.3f} s (best of 3)")
    print(f"[index] make_long_tailed (datasets.Dataset, select): {t_ds:.3f} s (best of 3)")
    print(f"[index] goal < 5 s: {'met' if max(t_np, t_ds) < 5 else 'NOT met'}")


def _cifar_loader(path: Path, batch: int, workers: int):
    import datasets

    from hf_longtail.data import cifar_transforms, collate_fn, make_long_tailed, with_transforms

    train = datasets.load_dataset(str(path), split="train")
    lt = make_long_tailed(train, 100)  # CIFAR-10-LT, 12,406 images
    train_tf, _ = cifar_transforms()
    ds = with_transforms(lt, train_tf)
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=True,
        generator=g,
        persistent_workers=workers > 0,
    )


def bench_pipeline(path: Path, batches: int, workers: int, batch: int = 128) -> float:
    loader = _cifar_loader(path, batch, workers)
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += b["pixel_values"].shape[0]
    dt = time.perf_counter() - t0
    rate = n / dt
    print(
        f"[pipeline] CIFAR-10-LT train transforms, DataLoader workers={workers} batch={batch}: "
        f"{rate:,.0f} images/s ({n} images in {dt:.2f} s)"
    )
    return rate


# ---------------------------------------------------------------- ResNet-32 (inline)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Option-A shortcut of He et al. (2016) for CIFAR: subsample + zero-pad channels.
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


def resnet32(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(5):
            layers.append(_Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def _train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def bench_step(steps: int, device: str, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = resnet32().to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(2):  # warm-up: kernel selection and first allocations
        _train_step(model, opt, x, y)
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _train_step(model, opt, x, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(
        f"[resnet32] {params / 1e6:.2f}M params, one SGD step on batch {batch} ({device}, "
        f"{torch.get_num_threads()} threads): {step * 1000:.1f} ms -> {batch / step:,.0f} images/s"
    )
    return batch / step


def bench_fed_training(path: Path, steps: int, workers: int, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = resnet32()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = _cifar_loader(path, batch, workers)
    it = iter(loader)
    b = next(it)
    _train_step(model, opt, b["pixel_values"], b["labels"])
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        _train_step(model, opt, b["pixel_values"], b["labels"])
    dt = time.perf_counter() - t0
    rate = steps * batch / dt
    print(
        f"[fed]      ResNet-32 training fed by the DataLoader (workers={workers}): "
        f"{rate:,.0f} images/s ({dt / steps * 1000:.1f} ms/step)"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = os.environ.get("HF_LONGTAIL_CIFAR10") or str(REPO.parent / "shared/data/cifar10")
    parser.add_argument("--cifar10", default=default, help="folder with train.parquet")
    parser.add_argument("--batches", type=int, default=40, help="batches timed in the pipeline")
    parser.add_argument("--steps", type=int, default=5, help="ResNet-32 steps timed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device of the ResNet-32 step")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the ResNet-32 step (default: torch's). On a busy "
        "machine use 1: a 2-thread OpenMP region whose second thread is descheduled spins ~5x "
        "slower than one thread",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Repeated SGD steps on one random batch drive some values subnormal, which x86 CPUs
    # process ~10x slower; real training does not sit there, so time with flush-to-zero.
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    bench_index()
    path = Path(args.cifar10)
    if not (path / "train.parquet").is_file():
        print(f"[pipeline] skipped: no CIFAR-10 parquet at {path} (pass --cifar10)")
        bench_step(args.steps, args.device)
        return
    pipe = bench_pipeline(path, args.batches, args.workers)
    bench_pipeline(path, max(args.batches // 4, 5), 0)
    step = bench_step(args.steps, args.device)
    print(
        f"[compare]  pipeline / ResNet-32 consumption = {pipe / step:.1f}x "
        f"({'input is not the bottleneck' if pipe > step else 'input-bound'})"
    )
    if args.device == "cpu":
        bench_fed_training(path, args.steps, args.workers)


if __name__ == "__main__":
    main()
