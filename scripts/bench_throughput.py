#!/usr/bin/env python
"""Throughput of the LongTailTrainer path vs a hand-written PyTorch loop, same model/data/schedule.

For each workload the two runs go one after the other in this process:

- **trainer**: the library as ``scripts/train.py`` uses it -- CIFAR-10-LT (imbalance factor 100,
  ``make_long_tailed``), ``cifar_transforms(size=S)`` attached with ``with_transforms``,
  ``create_model``, ``LongTailTrainer`` (CE) with ``--pixel_cache`` (default ``auto``: the
  decode-once fast path) and ``dataloader_num_workers`` as given; ``trainer.train()`` is timed
  (it includes building or loading the pixel store).
- **plain**: written here, no project code in its data or training path: the same
  ``make_long_tailed`` rows are decoded once with PIL into a uint8 tensor (resized once with
  PIL bilinear to S when S differs from 32), each batch is augmented on tensors with a
  per-sample random crop (4-pixel zero padding) and a per-sample horizontal flip, normalised
  with the CIFAR mean/std, and fed to the same model (``create_model``, same seed, so the same
  initial weights) with ``torch.optim.SGD`` and a cosine schedule equal to the Trainer's.

Both: batch 128, SGD lr 0.1 momentum 0.9 weight decay 2e-4 (on every parameter in both), cosine
to 0 without warm-up, no gradient clipping, seed 0, the same number of optimizer steps and the same
epoch boundaries (a new random order per epoch, last batch kept).

Workloads: ``resnet32`` (``resnet32_cifar`` at 32 px) and ``efficientnet_lite0``
(``timm/efficientnet_lite0``, random init -- timing only -- at ``--lite0_size`` px, default 128).
Also measured: images/s of each input pipeline alone (batches drawn, no model) and of the model
step alone (forward + backward + SGD on a fixed batch).

Usage::

    python scripts/bench_throughput.py                       # both workloads, full budgets
    python scripts/bench_throughput.py --workload resnet32 --epochs 5
    python scripts/bench_throughput.py --max_steps 60 --lite0_steps 12 --json out.json
    python scripts/bench_throughput.py --max_steps 100 --rounds 3   # on a shared machine

With ``--rounds N`` the pair of runs is repeated N times with the order rotated, and the median
ratio is reported. The Trainer's pixel store lives in ``OUTPUT_DIR/pixel_cache``, emptied at the
start, so round 1 includes building it (the plain loop decodes in every round).

Machine, versions, thread count and the load average (before/after) are printed and written to
``--json``. On a shared machine the ratio is only as good as the load was steady.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as scripts/train.py

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
WORKLOADS = {
    "resnet32": {"model": "resnet32_cifar", "size": 32},
    "efficientnet_lite0": {"model": "timm/efficientnet_lite0", "size": None},
}


# ------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    import datasets
    import timm
    import torchvision
    import transformers

    import hf_longtail

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "timm": timm.__version__,
        "hf_longtail": hf_longtail.__version__,
        "git_commit": commit,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------------- data
def long_tailed_rows(cifar10: Path):
    """CIFAR-10-LT (IF 100) training rows via the library's subsampling (data only)."""
    import datasets

    from hf_longtail.data import make_long_tailed

    train = datasets.load_dataset(str(cifar10), split="train")
    return make_long_tailed(train, 100, profile="exp", seed=0)


def decode_once(rows, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain loop: PNG bytes -> uint8 [N, 3, S, S] (PIL bilinear resize once if S != 32)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    raw = rows.cast_column("img", ImageFeature(decode=False))
    images = np.empty((len(raw), 3, size, size), dtype=np.uint8)
    for start in range(0, len(raw), 1024):
        chunk = raw[start : start + 1024]
        for k, value in enumerate(chunk["img"]):
            image = Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            images[start + k] = np.asarray(image).transpose(2, 0, 1)
    labels = torch.tensor(rows["label"], dtype=torch.long)
    return torch.from_numpy(images), labels


def augment(batch: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop (zero padding ``pad``) + horizontal flip of a uint8 batch, then
    float and CIFAR normalisation -- gather-based, written independently of the library."""
    b, c, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # b,1,h,1
    cols = left[:, None] + torch.arange(w)  # b,w
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # b,1,1,w
    index = torch.arange(b)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    out = padded[index, channel, rows, cols].float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std)


# --------------------------------------------------------------------------------- runs
def build_model(name: str):
    from hf_longtail.models import create_model

    torch.manual_seed(0)
    names = [f"class_{i}" for i in range(10)]
    return create_model(name, num_labels=10, id2label=names, pretrained=False)


def cosine(step: int, total: int) -> float:
    """transformers' cosine schedule without warm-up: ``0.5 * (1 + cos(pi * step / total))``."""
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * step / max(1, total))))


def run_plain(rows, model_name: str, size: int, steps: int, batch: int, lr: float) -> dict:
    t0 = time.perf_counter()
    images, labels = decode_once(rows, size)
    t_decode = time.perf_counter() - t0
    model = build_model(model_name)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps))
    g = torch.Generator().manual_seed(0)
    n = labels.numel()
    done, losses = 0, []
    t1 = time.perf_counter()
    while done < steps:
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x = augment(images[idx], g)
            out = model(pixel_values=x).logits
            loss = F.cross_entropy(out.float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            done += 1
            if done == steps:
                break
    t_train = time.perf_counter() - t1
    # The input pipeline alone: the same batches, no model.
    t2 = time.perf_counter()
    count = 0
    order = torch.randperm(n, generator=g)
    for start in range(0, min(n, 20 * batch), batch):
        count += augment(images[order[start : start + batch]], g).shape[0]
    pipe = count / (time.perf_counter() - t2)
    return {
        "decode_s": t_decode,
        "train_s": t_train,
        "total_s": t_decode + t_train,
        "steps": done,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "pipeline_images_per_s": pipe,
    }


def run_trainer(
    rows,
    model_name: str,
    size: int,
    steps: int,
    batch: int,
    lr: float,
    pixel_cache: str,
    workers: int,
    out_dir: Path,
    cache_dir: Path | None = None,
) -> dict:
    from transformers import TrainingArguments

    from hf_longtail import LongTailTrainer
    from hf_longtail.data import cifar_transforms, collate_fn, with_transforms

    train_tf, _ = cifar_transforms(size=size)
    dataset = with_transforms(rows, train_tf, "img", "label")
    model = build_model(model_name)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=0.0,
        logging_steps=steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = LongTailTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate_fn,
        pixel_cache=pixel_cache,
        pixel_cache_dir=cache_dir,
    )
    # Building (or loading) the pixel store happens when the first DataLoader is made: timed
    # apart, as the plain loop's decode is.
    t0 = time.perf_counter()
    trainer.get_train_dataloader()
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = trainer.train()
    t_train = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loader = trainer.get_train_dataloader()
    fast = type(loader.dataset).__name__ == "PixelStoreDataset"
    # The input pipeline alone: batches of the Trainer's own DataLoader, no model.
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t1 = time.perf_counter()
    count = 0
    for _ in range(20):
        try:
            count += next(it)["pixel_values"].shape[0]
        except StopIteration:
            break
    pipe = count / (time.perf_counter() - t1)
    del it
    return {
        "setup_s": t_setup,
        "train_s": t_train,
        "total_s": t_setup + t_train,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "logged_losses": losses,
        "fast_path": fast,
        "dataloader_workers": loader.num_workers if hasattr(loader, "num_workers") else None,
        "pipeline_images_per_s": pipe,
    }


def streaming_pipeline_rate(rows, size: int, batch: int, workers: int, batches: int = 20) -> float:
    """Images/s of the streaming PIL path (decode + per-image transform in ``workers`` DataLoader
    workers) alone, for comparison: the Trainer's DataLoader with ``pixel_cache="off"``."""
    from transformers import TrainingArguments

    from hf_longtail import LongTailTrainer
    from hf_longtail.data import cifar_transforms, collate_fn, with_transforms

    train_tf, _ = cifar_transforms(size=size)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_throughput_"),
        per_device_train_batch_size=batch,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=workers,
        remove_unused_columns=False,
    )
    trainer = LongTailTrainer(
        model=build_model("resnet20_cifar"),
        args=args,
        train_dataset=with_transforms(rows, train_tf, "img", "label"),
        data_collator=collate_fn,
        pixel_cache="off",
    )
    it = iter(trainer.get_train_dataloader())
    next(it)
    t0 = time.perf_counter()
    count = sum(next(it)["pixel_values"].shape[0] for _ in range(batches))
    rate = count / (time.perf_counter() - t0)
    del it
    return rate


def model_step_rate(model_name: str, size: int, batch: int, steps: int = 5) -> float:
    """Images/s of forward + backward + SGD step on one fixed batch (no input pipeline)."""
    model = build_model(model_name)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def bench_workload(name: str, args, rows, out_dir: Path) -> dict:
    spec = WORKLOADS[name]
    size = spec["size"] or args.lite0_size
    steps_per_epoch = math.ceil(len(rows) / args.batch_size)
    if name == "efficientnet_lite0":
        steps = args.lite0_steps or steps_per_epoch * args.lite0_epochs
    else:
        steps = args.max_steps or steps_per_epoch * args.epochs
    print(f"\n== {name}: {spec['model']} at {size} px, {steps} steps of batch {args.batch_size} ==")
    # First, and also as the process warm-up both runs then profit from equally (allocator,
    # oneDNN primitives for these shapes): the model step alone.
    step_rate = model_step_rate(spec["model"], size, args.batch_size)
    rounds: list[dict] = []
    for index in range(args.rounds):
        # Rotating the order each round cancels a drift of the machine's load between them.
        plain_first = (index % 2 == 0) == (args.order == "plain-first")
        runs: dict = {}
        for which in ["plain", "trainer"] if plain_first else ["trainer", "plain"]:
            load = load_average()
            if which == "plain":
                runs["plain"] = run_plain(
                    rows, spec["model"], size, steps, args.batch_size, args.lr
                )
            else:
                runs["trainer"] = run_trainer(
                    rows,
                    spec["model"],
                    size,
                    steps,
                    args.batch_size,
                    args.lr,
                    args.pixel_cache,
                    args.workers,
                    out_dir / name,
                    out_dir / "pixel_cache",
                )
            runs[which]["load_average_before"] = load
            runs[which]["load_average_after"] = load_average()
            r = runs[which]
            print(
                f"  round {index + 1} {which:<8} {r['total_s']:8.1f} s  ({r['steps']} steps, "
                f"input pipeline alone {r['pipeline_images_per_s']:,.0f} images/s; load {load} "
                f"-> {load_average()})"
            )
        runs["ratio"] = runs["trainer"]["total_s"] / runs["plain"]["total_s"]
        runs["ratio_training_loops"] = runs["trainer"]["train_s"] / runs["plain"]["train_s"]
        rounds.append(runs)
    streaming = streaming_pipeline_rate(rows, size, args.batch_size, args.workers)
    ratio = float(np.median([r["ratio"] for r in rounds]))
    train_ratio = float(np.median([r["ratio_training_loops"] for r in rounds]))
    first = rounds[0]
    per_round = ", ".join(f"{r['ratio']:.3f}" for r in rounds)
    print(f"  model step alone: {step_rate:,.0f} images/s")
    print(
        f"  streaming PIL path alone ({args.workers} workers, for comparison): "
        f"{streaming:,.0f} images/s"
    )
    print(
        f"  wall-time ratio trainer / plain: {ratio:.3f}x (median of {len(rounds)} round(s): "
        f"{per_round}; set-up included: plain decode "
        f"{first['plain']['decode_s']:.1f} s per run, trainer store build "
        f"{first['trainer']['setup_s']:.1f} s in round 1, then reused; training loops only: "
        f"{train_ratio:.3f}x)  [trainer fast path: {first['trainer']['fast_path']}, "
        f"workers {first['trainer']['dataloader_workers']}]"
    )
    return {
        "model": spec["model"],
        "image_size": size,
        "steps": steps,
        "rounds": rounds,
        "runs": first,
        "model_step_images_per_s": step_rate,
        "streaming_pipeline_images_per_s": streaming,
        "ratio": ratio,
        "ratio_training_loops": train_ratio,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = os.environ.get("HF_LONGTAIL_CIFAR10") or str(REPO.parent / "shared/data/cifar10")
    parser.add_argument("--cifar10", default=default, help="folder with train.parquet")
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    parser.add_argument("--epochs", type=int, default=5, help="ResNet-32 epochs")
    parser.add_argument("--max_steps", type=int, default=None, help="ResNet-32 steps (overrides)")
    parser.add_argument("--lite0_size", type=int, default=128, help="EfficientNet-Lite0 px")
    parser.add_argument("--lite0_epochs", type=int, default=1)
    parser.add_argument("--lite0_steps", type=int, default=None, help="(overrides the epochs)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--pixel_cache", choices=["auto", "on", "off"], default="auto")
    parser.add_argument(
        "--workers", type=int, default=2, help="dataloader_num_workers of the Trainer run"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--order", choices=["plain-first", "trainer-first"], default="plain-first")
    parser.add_argument(
        "--rounds", type=int, default=1, help="plain/trainer pairs, order rotated; median ratio"
    )
    parser.add_argument("--output_dir", default="outputs/bench_throughput")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("hf_longtail").setLevel(logging.WARNING)
    info = machine_info()
    print(
        f"torch {info['torch']}, transformers {info['transformers']}, timm {info['timm']}, "
        f"hf_longtail {info['hf_longtail']} ({info['git_commit']}); {info['cpu']}, "
        f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads; "
        f"load average {load_average()}"
    )
    path = Path(args.cifar10)
    if not (path / "train.parquet").is_file():
        sys.exit(f"no CIFAR-10 parquet at {path} (pass --cifar10 or set HF_LONGTAIL_CIFAR10)")
    rows = long_tailed_rows(path)
    # A fresh pixel cache: round 1 of the Trainer pays the decode, as a first run would.
    shutil.rmtree(Path(args.output_dir) / "pixel_cache", ignore_errors=True)
    names = list(WORKLOADS) if args.workload == "both" else [args.workload]
    results = {
        "machine": info,
        "args": vars(args),
        "load_average_start": load_average(),
        "dataset": {"name": "CIFAR-10-LT", "imbalance_factor": 100, "train_size": len(rows)},
        "workloads": {},
    }
    for name in names:
        results["workloads"][name] = bench_workload(name, args, rows, Path(args.output_dir))
    results["load_average_end"] = load_average()
    print("\nsummary (wall-time ratio trainer / plain, goal <= 1.05x):")
    for name, r in results["workloads"].items():
        per_round = ", ".join(f"{x['ratio']:.3f}" for x in r["rounds"])
        print(
            f"  {name:<20} {r['ratio']:.3f}x (median; rounds {per_round}), {r['steps']} steps at "
            f"{r['image_size']} px; load average {results['load_average_start']} -> "
            f"{results['load_average_end']}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
