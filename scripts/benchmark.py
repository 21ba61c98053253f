#!/usr/bin/env python
"""Every long-tail method side by side, through ``scripts/train.py`` (one harness, same budget).

Each (method, seed) is one ``scripts/train.py`` run in a fresh process with the preset's
settings plus the method's loss flags, so the only thing that changes between rows is the loss.
Results go to ``benchmarks/results/<name>.json`` (every metric per method and seed, wall time,
peak memory, machine and package versions), ``<name>.md`` (the table) and ``<name>.png``.

    python scripts/benchmark.py --preset cpu                      # CIFAR-10-LT IF 100, ResNet-32
    python scripts/benchmark.py --preset cpu --methods ce ce_ccar_car --seeds 0
    python scripts/benchmark.py --preset paper --dataset cifar100 --imbalance_factor 50
    python scripts/benchmark.py --report benchmarks/results/cifar10lt_if100_cpu.json --update-readme

``--report`` rebuilds the table, plot and README section from a results JSON without training.
The CIFAR-10 parquet is found at ``--data`` or ``$HF_LONGTAIL_CIFAR10`` or
``../shared/data/cifar10`` next to the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
README_START = "<!-- benchmark-results:start -->"
README_END = "<!-- benchmark-results:end -->"

# name -> (label, train.py loss flags). All share the preset's data, model, schedule and seeds.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("CE", {"loss": "ce"}),
    "ce_ccar": ("CE + CCAR (paper)", {"loss": "ce", "ccar": True}),
    "ce_ccar_emf": (
        "CE + CCAR (e_minus_f)",
        {"loss": "ce", "ccar": True, "ccar_variant": "e_minus_f"},
    ),
    "ce_car": ("CE + CAR", {"loss": "ce", "car_weight": 0.5}),
    "ce_ccar_car": ("CE + CCAR + CAR", {"loss": "ce", "ccar": True, "car_weight": 0.5}),
    "focal": ("Focal (gamma 1)", {"loss": "focal", "focal_gamma": 1.0}),
    "cb": ("Class-balanced CE", {"loss": "cb"}),
    # As published: LDAM's cosine classifier (NormedLinear), DRW for the last 20% of the schedule.
    "ldam_drw": ("LDAM-DRW", {"loss": "ldam", "classifier": "cosine", "drw_fraction": 0.8}),
    "la": ("Logit-adjusted loss", {"loss": "la"}),
    "la_ccar": ("LA + CCAR", {"loss": "la", "ccar": True}),
    "la_ccar_car": ("LA + CCAR + CAR", {"loss": "la", "ccar": True, "car_weight": 0.5}),
    "bs": ("Balanced softmax", {"loss": "bs"}),
    "bs_ccar_car": ("BS + CCAR + CAR", {"loss": "bs", "ccar": True, "car_weight": 0.5}),
    "ce_posthoc_la": ("CE + post-hoc LA", {"loss": "ce", "posthoc_tau": 1.0}),
}
HEADLINE = ("ce", "ce_ccar_car", "la", "la_ccar_car", "ldam_drw")

# Shared training recipe. `cpu` keeps the LDAM recipe's shape (SGD momentum 0.9, warm-up,
# decay) in a budget of ~5 minutes per method on 2 CPU cores; `paper` is the full protocol.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "dataset": "cifar10",
        "imbalance_factor": 100,
        "epochs": 6,
        "seeds": {"headline": [0, 1, 2], "other": [0]},
        "train": {
            "model_name_or_path": "resnet32_cifar",
            "learning_rate": 0.1,
            "per_device_train_batch_size": 128,
            "per_device_eval_batch_size": 512,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 2e-4,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.1,
            "dataloader_num_workers": 2,
        },
    },
    "paper": {
        "dataset": "cifar10",
        "imbalance_factor": 100,
        "epochs": 200,
        "seeds": {"headline": [0, 1, 2], "other": [0, 1, 2]},
        "train": {
            "model_name_or_path": "resnet32_cifar",
            "learning_rate": 0.1,
            "per_device_train_batch_size": 128,
            "per_device_eval_batch_size": 1000,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 2e-4,
            "warmup_steps": 0.025,  # 5 of 200 epochs
            "lr_milestones": [160, 180],
            "lr_gamma": 0.01,
            "dataloader_num_workers": 8,
        },
    },
}

# Published full-protocol numbers (ResNet-32, 200 epochs, CIFAR-10-LT IF 100): reported by the
# methods' own papers/repositories, NOT produced by this harness.
PUBLISHED = {
    ("cifar10", 100): {"ce": 70.4, "ldam_drw": 77.0, "la": 77.9},
}

TABLE_METRICS = (
    ("accuracy", "Overall"),
    ("many_shot_accuracy", "Many"),
    ("medium_shot_accuracy", "Medium"),
    ("few_shot_accuracy", "Few"),
    ("worst_class_accuracy", "Worst-class"),
    ("balanced_accuracy", "Balanced"),
    ("ece", "ECE"),
)


def find_cifar(name: str, explicit: str | None) -> Path:
    """Locate the local CIFAR parquet directory (never downloaded by this script)."""
    env = os.environ.get("HF_LONGTAIL_CIFAR10" if name == "cifar10" else "HF_LONGTAIL_CIFAR100")
    candidates = [Path(p) for p in (explicit, env) if p]
    candidates.append(REPO.parent / "shared" / "data" / name)
    for c in candidates:
        if (c / "train.parquet").is_file() or (c / "train").is_dir():
            return c
    raise FileNotFoundError(
        f"No local {name} found (tried {', '.join(map(str, candidates))}). Pass --data DIR "
        f"or set HF_LONGTAIL_{name.upper()} to a directory with train/test parquet files."
    )


def run_flags(
    preset: dict,
    method: str,
    seed: int,
    data: Path,
    out: Path,
    epochs: float,
    overrides: dict[str, str] | None = None,
) -> list[str]:
    """The scripts/train.py command line of one (method, seed) run.

    ``overrides`` (``--set key=value``) change machine-dependent settings such as
    ``dataloader_num_workers`` without changing the preset's recipe.
    """
    values: dict[str, Any] = {
        "dataset_name": str(data),
        "imbalance_factor": preset["imbalance_factor"],
        "imbalance_profile": "exp",
        "num_train_epochs": epochs,
        "seed": seed,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "epoch",
        "report_to": "none",
        "disable_tqdm": True,
        **preset["train"],
    }
    loss = dict(METHODS[method][1])
    fraction = loss.pop("drw_fraction", None)
    if fraction is not None:  # DRW starts at the same fraction of the schedule (160/200)
        loss["drw_epoch"] = math.floor(fraction * epochs)
    values.update(loss)
    values.update(overrides or {})
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            flags += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def environment() -> dict[str, Any]:
    """Machine and package versions recorded with every result file."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("torch", "torchvision", "transformers", "datasets", "accelerate", "timm"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:  # pragma: no cover
            info[pkg] = None
    import hf_longtail

    info["hf_longtail"] = hf_longtail.__version__
    return info


def run_benchmark(args: argparse.Namespace) -> Path:
    preset = PRESETS[args.preset]
    if args.imbalance_factor is not None:
        preset = {**preset, "imbalance_factor": args.imbalance_factor}
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    data = find_cifar(args.dataset or preset["dataset"], args.data)
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    name = args.name or (
        f"{args.dataset or preset['dataset']}lt_if{preset['imbalance_factor']:g}_{args.preset}"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result_path = RESULTS_DIR / f"{name}.json"
    # Resumable: runs already in the JSON are kept, so an interrupted benchmark continues.
    existing = json.loads(result_path.read_text()) if result_path.exists() else {}
    runs: list[dict] = existing.get("runs", []) if not args.restart else []
    done = {(r["method"], r["seed"]) for r in runs}
    work_root = Path(args.work_dir or (REPO / "outputs" / "benchmark" / name))
    overrides = dict(item.split("=", 1) for item in args.set or [])

    plan = []
    for method in methods:
        group = "headline" if method in HEADLINE else "other"
        seeds = args.seeds if args.seeds is not None else preset["seeds"][group]
        plan += [(method, seed) for seed in seeds if (method, seed) not in done]
    print(f"[benchmark] {name}: {len(plan)} runs to do, {len(done)} already in {result_path}")
    for i, (method, seed) in enumerate(plan, 1):
        out = work_root / f"{method}_seed{seed}"
        cmd = [sys.executable, str(REPO / "scripts" / "train.py")]
        cmd += run_flags(preset, method, seed, data, out, epochs, overrides)
        print(f"[benchmark] ({i}/{len(plan)}) {method} seed {seed}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode}); see above.")
        metrics = json.loads((out / "all_results.json").read_text())
        print(
            f"[benchmark]   {wall:.0f} s, accuracy {metrics.get('test_accuracy', 0):.4f}, "
            f"worst-class {metrics.get('test_worst_class_accuracy', 0):.4f}",
            flush=True,
        )
        runs.append(
            {
                "method": method,
                "seed": seed,
                "wall_s": wall,
                "epochs": epochs,
                "train_runtime_s": metrics.get("train_runtime"),
                "peak_rss_mb": metrics.get("peak_rss_mb"),
                "peak_gpu_mem_mb": metrics.get("peak_gpu_mem_mb"),
                "metrics": {
                    k[len("test_") :]: v for k, v in metrics.items() if k.startswith("test_")
                },
            }
        )
        payload = {
            "name": name,
            "preset": args.preset,
            "dataset": args.dataset or preset["dataset"],
            "imbalance_factor": preset["imbalance_factor"],
            "epochs": epochs,
            "recipe": preset["train"],
            "overrides": overrides,
            "methods": {m: {"label": METHODS[m][0], "flags": METHODS[m][1]} for m in METHODS},
            "environment": environment(),
            "runs": runs,
        }
        result_path.write_text(json.dumps(payload, indent=1) + "\n")
    write_report(result_path, update_readme=args.update_readme)
    return result_path


def summarize(payload: dict) -> list[dict]:
    """Mean and sample std over seeds per method, plus the cost relative to CE."""
    by_method: dict[str, list[dict]] = {}
    for run in payload["runs"]:
        by_method.setdefault(run["method"], []).append(run)

    def epoch_time(runs):
        times = [r["train_runtime_s"] / r["epochs"] for r in runs if r.get("train_runtime_s")]
        return statistics.mean(times) if times else None

    ce_time = epoch_time(by_method.get("ce", []))
    rows = []
    for method in [m for m in METHODS if m in by_method]:
        runs = by_method[method]
        row: dict[str, Any] = {
            "method": method,
            "label": METHODS[method][0],
            "seeds": len(runs),
        }
        for key, _ in TABLE_METRICS:
            values = [r["metrics"].get(key) for r in runs]
            values = [v for v in values if v is not None]
            row[key] = (
                (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
                if values
                else (None, None)
            )
        t = epoch_time(runs)
        row["epoch_time_s"] = t
        row["time_ratio"] = t / ce_time if t and ce_time else None
        peaks = [r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb")]
        row["peak_rss_mb"] = max(peaks) if peaks else None
        rows.append(row)
    return rows


def markdown_table(payload: dict) -> str:
    rows = summarize(payload)
    published = PUBLISHED.get((payload["dataset"], payload["imbalance_factor"]), {})
    env = payload["environment"]
    head = "| Method | Seeds | " + " | ".join(label for _, label in TABLE_METRICS)
    head += " | Published (200 ep) | s/epoch | vs CE | Peak RSS (MB) |\n"
    head += "|" + "---|" * (len(TABLE_METRICS) + 6) + "\n"
    lines = []
    for row in rows:
        cells = []
        for key, _ in TABLE_METRICS:
            mean, std = row[key]
            if mean is None:
                cells.append("n/a")
                continue
            scale = 1.0 if key == "ece" else 100.0
            digits = 3 if key == "ece" else 1
            text = f"{mean * scale:.{digits}f}"
            if std is not None:
                text += f" ± {std * scale:.{digits}f}"
            cells.append(text)
        pub = published.get(row["method"])
        extra = [
            f"{pub}" if pub is not None else "",
            f"{row['epoch_time_s']:.1f}" if row["epoch_time_s"] else "n/a",
            f"{row['time_ratio']:.3f}x" if row["time_ratio"] else "n/a",
            f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "n/a",
        ]
        lines.append(f"| {row['label']} | {row['seeds']} | " + " | ".join(cells + extra) + " |")
    note = (
        f"\n*{payload['dataset'].upper()}-LT, imbalance factor {payload['imbalance_factor']}, "
        f"{payload['epochs']} epochs, preset `{payload['preset']}`; accuracies in %, mean ± "
        f"sample std over seeds; ECE as a fraction. 'Published' = the method's own paper/repo "
        f"for the full 200-epoch protocol, not produced here. Machine: "
        f"{env.get('cuda') or env.get('processor')} ({env.get('cpu_count')} CPUs, torch "
        f"{env.get('torch')}, {env.get('torch_threads')} threads).*\n"
    )
    return head + "\n".join(lines) + "\n" + note


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summarize(payload)
    keys = ("accuracy", "few_shot_accuracy", "worst_class_accuracy", "balanced_accuracy")
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(rows)), 4.5))
    for i, key in enumerate(keys):
        means = [100 * (r[key][0] or 0) for r in rows]
        errs = [100 * (r[key][1] or 0) for r in rows]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=errs, label=key.replace("_", " "))
    ax.set_xticks(x, [r["label"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{payload['name']}: long-tail metrics per method")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result_path: Path, update_readme: bool = False) -> str:
    """Write ``<name>.md`` and ``<name>.png`` beside the JSON; optionally the README section."""
    result_path = Path(result_path).resolve()
    payload = json.loads(result_path.read_text())
    table = markdown_table(payload)
    result_path.with_suffix(".md").write_text(f"# {payload['name']}\n\n{table}")
    plot(payload, result_path.with_suffix(".png"))
    if update_readme:
        readme = REPO / "README.md"
        text = readme.read_text()
        if README_START not in text or README_END not in text:
            raise SystemExit(f"README.md lacks the {README_START} / {README_END} markers.")
        before, rest = text.split(README_START, 1)
        _, after = rest.split(README_END, 1)
        block = (
            f"{README_START}\n<!-- generated by scripts/benchmark.py --report "
            f"{result_path.relative_to(REPO)} --update-readme; do not edit by hand -->\n\n"
            f"{table}\n![{payload['name']}]({result_path.with_suffix('.png').relative_to(REPO)})"
            f"\n{README_END}"
        )
        readme.write_text(before + block + after)
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default=None)
    parser.add_argument("--data", help="directory with the CIFAR train/test parquet files")
    parser.add_argument("--imbalance_factor", type=float, default=None)
    parser.add_argument("--epochs", type=float, default=None, help="override the preset")
    parser.add_argument("--methods", nargs="+", help=f"subset of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    parser.add_argument("--name", help="results name (default from dataset/IF/preset)")
    parser.add_argument("--work_dir", help="where the per-run output directories go")
    parser.add_argument("--restart", action="store_true", help="ignore runs already recorded")
    parser.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        help="override train.py options for every run (e.g. dataloader_num_workers=8)",
    )
    parser.add_argument("--update-readme", action="store_true", dest="update_readme")
    parser.add_argument("--report", type=Path, help="only rebuild the report from this JSON")
    args = parser.parse_args(argv)
    if args.report:
        write_report(args.report, update_readme=args.update_readme)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
