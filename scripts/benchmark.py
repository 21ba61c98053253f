#!/usr/bin/env python
"""Every long-tail method side by side on CIFAR-10-LT, with honest statistics over seeds.

Presets (``--preset``):

- ``linear``: the ImageNet EfficientNet-Lite0 frozen, its features cached once, a linear head
  trained per method (:mod:`benchmark_linear`, in one process through ``LongTailTrainer``), IF 10,
  50 and 100, 5 seeds; plus a sweep of CAR / CCAR settings chosen on validation per IF.
- ``finetune``: the same backbone fully fine-tuned, IF 100, one ``scripts/train.py`` process per
  (method, seed); the tuned CCAR / CAR settings come from the ``linear`` preset's choices.
- ``scratch``: CIFAR ResNet-32 from scratch for 6 epochs (a CPU budget).
- ``paper``: the 200-epoch ResNet-32 protocol (GPU).

Protocol: a validation split that is not the test set (the library's balanced hold-out,
``--validation_split heldout``); tau of post-hoc LA / tau-norm and every swept setting are chosen
on it; the test split is evaluated once per run. Every run writes its own record
(``benchmarks/results/<name>_runs/<run>.json``) the moment it ends and a re-run skips finished
runs, so a preset can span sittings. The results JSON (``<name>.json``), the tables
(``<name>.md``) and the plot (``<name>.png``) are rebuilt from the records; ``--update-readme``
rewrites the preset's block of README.md. Statistics: mean ± sample std over seeds; each method
against its base (CE or LA) as the paired per-seed difference with a 95% t interval
(:mod:`hf_longtail.metrics.seed_stats`).

    python scripts/benchmark.py --preset linear                 # resumable; progress and ETA
    python scripts/benchmark.py --preset finetune --update-readme
    python scripts/benchmark.py --preset scratch --methods ce ce_ccar_car --seeds 0
    python scripts/benchmark.py --report benchmarks/results/cifar10lt_lite0_linear.json \\
        --update-readme

The CIFAR-10 parquet is found at ``--data`` or ``$HF_LONGTAIL_CIFAR10`` or
``../shared/data/cifar10`` next to the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS_DIR = REPO / "benchmarks" / "results"
LEGACY_README_START = "<!-- benchmark-results:start -->"
LEGACY_README_END = "<!-- benchmark-results:end -->"

# name -> (label, train.py loss flags, base compared with). All share the preset's data, model,
# schedule and seeds. ``stage``: a decoupled second stage on the CE run of the same seed;
# ``tuned``: loss settings from the linear preset's validation sweep.
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"label": "CE", "flags": {"loss": "ce"}, "base": None},
    "ce_ccar": {"label": "CE + CCAR (paper)", "flags": {"loss": "ce", "ccar": True}},
    "ce_ccar_emf": {
        "label": "CE + CCAR (e_minus_f)",
        "flags": {"loss": "ce", "ccar": True, "ccar_variant": "e_minus_f"},
    },
    "ce_car": {"label": "CE + CAR", "flags": {"loss": "ce", "car_weight": 0.5}},
    "ce_ccar_car": {
        "label": "CE + CCAR + CAR",
        "flags": {"loss": "ce", "ccar": True, "car_weight": 0.5},
    },
    "focal": {"label": "Focal (gamma 1)", "flags": {"loss": "focal", "focal_gamma": 1.0}},
    "cb": {"label": "Class-balanced CE", "flags": {"loss": "cb"}},
    # As published: LDAM's cosine classifier (NormedLinear), DRW for the last 20% of the schedule.
    "ldam_drw": {
        "label": "LDAM-DRW",
        "flags": {"loss": "ldam", "classifier": "cosine", "drw_fraction": 0.8},
    },
    "la": {"label": "Logit-adjusted loss", "flags": {"loss": "la"}},
    "la_ccar": {"label": "LA + CCAR", "flags": {"loss": "la", "ccar": True}, "base": "la"},
    "la_ccar_car": {
        "label": "LA + CCAR + CAR",
        "flags": {"loss": "la", "ccar": True, "car_weight": 0.5},
        "base": "la",
    },
    "bs": {"label": "Balanced softmax", "flags": {"loss": "bs"}},
    "bs_ccar_car": {
        "label": "BS + CCAR + CAR",
        "flags": {"loss": "bs", "ccar": True, "car_weight": 0.5},
        "base": "bs",
    },
    "ce_posthoc_la": {
        "label": "CE + post-hoc LA",
        "flags": {"loss": "ce", "posthoc_tau": "auto"},
    },
    # The same adjustment as a stage on the finished CE run of the same seed (one training run
    # gives both rows; ``ce_posthoc_la`` trains CE again with the identical recipe).
    "ce_posthoc_la_stage": {
        "label": "CE + post-hoc LA",
        "flags": {"stage": "posthoc_la"},
        "from": "ce",
    },
    "ce_crt": {"label": "CE then cRT", "flags": {"stage": "crt"}, "from": "ce"},
    "ce_ccar_car_tuned": {
        "label": "CE + CCAR + CAR (tuned on val, linear)",
        "flags": {"loss": "ce"},
        "tuned": ("ccar", "car"),
    },
    "la_ccar_car_tuned": {
        "label": "LA + CCAR + CAR (tuned on val, linear)",
        "flags": {"loss": "la"},
        "tuned": ("ccar", "car"),
        "base": "la",
    },
}
SCRATCH_METHODS = [
    m for m in METHODS if "stage" not in METHODS[m]["flags"] and not m.endswith("_tuned")
]
# In the order a sitting runs them: the goals first (headline, then the tuned settings).
FINETUNE_METHODS = [
    "ce",
    "la",
    "ce_ccar_car",
    "la_ccar_car",
    "ce_ccar_car_tuned",
    "la_ccar_car_tuned",
    "ce_crt",
    "ce_posthoc_la_stage",
    "bs",
    "ce_ccar",
    "ce_car",
]

# Many / few-shot thresholds for CIFAR-10-LT: the library's defaults (100 / 20, ImageNet-LT's)
# leave CIFAR-10-LT with no few-shot class, so the benchmark uses 1500 / 200 (IF 100: 3 many,
# 4 medium, 3 few classes), the same in every preset and recorded in each results file.
THRESHOLDS = {"many": 1500, "few": 200}
VALIDATION_PER_CLASS = 100

PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR ResNet-32 from scratch in ~5 minutes per method on 2 CPU cores (the LDAM recipe's
    # shape: SGD momentum 0.9, warm-up, decay).
    "scratch": {
        "kind": "train.py",
        "dataset": "cifar10",
        "imbalance_factors": [100],
        "epochs": 6,
        "methods": SCRATCH_METHODS,
        "headline": ["ce", "ce_ccar_car", "la", "la_ccar_car", "ldam_drw"],
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
        "kind": "train.py",
        "dataset": "cifar10",
        "imbalance_factors": [100],
        "epochs": 200,
        "methods": SCRATCH_METHODS,
        "headline": ["ce", "ce_ccar_car", "la", "la_ccar_car", "ldam_drw"],
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
    # Full fine-tuning of the ImageNet EfficientNet-Lite0, recipe chosen on CE's validation
    # curve (benchmarks/results/cifar10lt_lite0_finetune_recipe.json, README "Results"): the
    # CIFAR pad-and-crop (the processor's random-resized crops trained worse), SGD with cosine
    # decay, batch 64; at 96 px only 3 epochs fit the ~10-minute budget and CE stopped at 51.0%
    # validation balanced accuracy as the rate decayed, while 64 px allows 6 epochs and CE's
    # curve flattens near 57% (56.0 -> 56.6 over epochs 4 -> 5).
    "finetune": {
        "kind": "train.py",
        "dataset": "cifar10",
        "imbalance_factors": [100],
        "epochs": 6,
        "methods": FINETUNE_METHODS,
        "headline": ["ce", "la", "ce_ccar_car", "la_ccar_car"],
        "seeds": {"headline": [0, 1, 2], "other": [0]},
        "choices_from": "cifar10lt_lite0_linear",
        "train": {
            "model_name_or_path": "efficientnet_lite0_in1k",
            "train_transform": "pad_crop",
            "image_size": 64,
            "learning_rate": 0.05,
            "per_device_train_batch_size": 64,
            "per_device_eval_batch_size": 256,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 1e-4,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.03,
            "dataloader_num_workers": 1,
            "pixel_cache": "on",
            # The checkpoint is chosen on the validation hold-out (balanced accuracy).
            "eval_strategy": "epoch",
            "load_best_model_at_end": True,
            "metric_for_best_model": "balanced_accuracy",
        },
        "stage": {  # cRT on the CE run (scripts/configs/decoupled_stage.yaml's recipe)
            "num_train_epochs": 30,
            "per_device_train_batch_size": 128,
            "learning_rate": 0.05,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 5e-4,
            "lr_scheduler_type": "cosine",
        },
    },
    "linear": {
        "kind": "linear",
        "dataset": "cifar10",
        "model": "efficientnet_lite0_in1k",
        "image_size": 128,
        "imbalance_factors": [100, 50, 10],
        "imbalance_seed": 0,
        "seeds": [0, 1, 2, 3, 4],
        "sweep_seeds": [0],
        "validation_per_class": VALIDATION_PER_CLASS,
        # 100 epochs of SGD on the 1280 x 10 head; batch 1024 with the linear-scaled learning
        # rate of the 256 / 0.1 config (fewer, larger steps: the head's step costs ~1 ms, the
        # Trainer's per-step overhead several).
        "train": {
            "num_train_epochs": 100,
            "per_device_train_batch_size": 1024,
            "learning_rate": 0.4,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 5e-4,
            "lr_scheduler_type": "cosine",
        },
    },
}
# cRT / LWS: decoupled_stage.yaml's 30 epochs, batch and lr scaled as the head's.
PRESETS["linear"]["stage"] = {**PRESETS["linear"]["train"], "num_train_epochs": 30}

# Published full-protocol numbers (ResNet-32, 200 epochs, CIFAR-10-LT IF 100): reported by the
# methods' own papers/repositories, NOT produced by this harness.
PUBLISHED = {("cifar10", 100, "resnet32_cifar"): {"ce": 70.4, "ldam_drw": 77.0, "la": 77.9}}

TABLE_METRICS = (
    ("accuracy", "Overall"),
    ("many_shot_accuracy", "Many"),
    ("medium_shot_accuracy", "Medium"),
    ("few_shot_accuracy", "Few"),
    ("worst_class_accuracy", "Worst-class"),
    ("balanced_accuracy", "Balanced"),
    ("ece", "ECE"),
)
CONTENTION_NOTE = (
    "Wall times were measured with one thread on a 2-core machine shared with other jobs "
    "(load average ~4): they are inflated and noisy; the ratios to CE are more reliable than "
    "the absolute seconds."
)


# --------------------------------------------------------------------------- utilities
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
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for pkg in ("torch", "torchvision", "transformers", "datasets", "accelerate", "timm"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:  # pragma: no cover
            info[pkg] = None
    import hf_longtail

    info["hf_longtail"] = hf_longtail.__version__
    return info


def run_key(method: str, factor: float, seed: int) -> str:
    """File stem of one run's record: ``<method>_if<IF>_seed<seed>``."""
    return f"{method}_if{factor:g}_seed{seed}"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename: a reader (or a later
    sitting after a kill) sees the whole old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


class Progress:
    """``[12/300] la seed 3 IF 100 ...`` lines with the elapsed time and an ETA (the mean time
    of the runs done in this sitting times the runs left)."""

    def __init__(self, total: int, done_before: int) -> None:
        self.total, self.done_before = total, done_before
        self.start, self.finished, self.index = time.perf_counter(), 0, 0

    def _position(self) -> str:
        return f"[{self.done_before + self.index}/{self.done_before + self.total}]"

    def begin(self, text: str) -> None:
        self.index += 1
        elapsed = time.perf_counter() - self.start
        left = self.total - self.index + 1
        eta = f"{_duration(elapsed / self.finished * left)}" if self.finished else "?"
        print(f"{self._position()} {text} (elapsed {_duration(elapsed)}, ETA {eta})", flush=True)

    def skip(self, text: str, why: str) -> None:
        # another process has (or had) this run: it leaves this process's ETA
        self.total -= 1
        self.done_before += 1
        print(f"{self._position()} {text}: {why}", flush=True)

    def end(self, seconds: float, record: dict) -> None:
        self.finished += 1
        test = record.get("test") or {}
        print(
            f"    {seconds:.1f} s: accuracy {100 * test.get('accuracy', float('nan')):.2f}, "
            f"worst-class {100 * test.get('worst_class_accuracy', float('nan')):.2f}",
            flush=True,
        )


@contextlib.contextmanager
def claim_run(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` (an advisory ``flock``) while this process runs one benchmark run; yield
    False at once if another process holds it. Several sittings of one preset can then run side
    by side on one machine, each taking the runs nobody else has; the kernel drops the lock of
    a killed process, so a run stopped mid-way is resumed by whichever process comes next."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): one process at a time
        yield True
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_claimed(lock: Path) -> bool:
    """Whether a process (this one included) holds ``lock`` now (see :func:`claim_run`)."""
    if not lock.is_file():
        return False
    with claim_run(lock) as mine:
        return not mine


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_runs(runs_dir: Path) -> list[dict]:
    """Every finished run record in ``runs_dir`` (sorted by file name)."""
    if not runs_dir.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


# ------------------------------------------------------------------- train.py presets
def train_py_supports(option: str) -> bool:
    """Whether ``scripts/train.py`` of this tree has the option (e.g. ``validation_per_class``
    among the data arguments, ``posthoc_tau`` accepting ``auto``)."""
    from hf_longtail.arguments import DataArguments

    return option in {f.name for f in dataclasses.fields(DataArguments)}


def protocol_flags() -> dict[str, Any]:
    """The validation protocol of every train.py run: the library's balanced hold-out (when this
    tree has it), the benchmark's shot thresholds."""
    flags: dict[str, Any] = {
        "many_shot_threshold": THRESHOLDS["many"],
        "few_shot_threshold": THRESHOLDS["few"],
    }
    if train_py_supports("validation_per_class"):
        flags.update(validation_split="heldout", validation_per_class=VALIDATION_PER_CLASS)
    return flags


def _as_flags(values: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            flags += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def tuned_settings(preset: dict, factor: float) -> dict[str, dict]:
    """The CCAR / CAR settings the linear preset chose on validation for ``factor``."""
    source = RESULTS_DIR / f"{preset.get('choices_from')}.json"
    choices = {}
    if source.is_file():
        choices = json.loads(source.read_text()).get("choices", {}).get(f"{factor:g}", {})
    if not choices:
        raise SystemExit(
            f"The tuned methods need the linear preset's choices for IF {factor:g} in {source}; "
            "run `python scripts/benchmark.py --preset linear` first (or leave the *_tuned "
            "methods out with --methods)."
        )
    return choices


def run_flags(
    preset: dict,
    method: str,
    seed: int,
    factor: float,
    data: Path,
    out: Path,
    epochs: float,
    work_root: Path,
    overrides: dict[str, str] | None = None,
) -> list[str]:
    """The scripts/train.py command line of one (method, seed) run.

    ``overrides`` (``--set key=value``) change machine-dependent settings such as
    ``dataloader_num_workers`` without changing the preset's recipe.
    """
    spec = METHODS[method]
    if "stage" in spec["flags"]:
        source = work_root / run_key(spec["from"], factor, seed)
        values = {
            "stage": spec["flags"]["stage"],
            "from_run": str(source),
            "output_dir": str(out),
            "seed": seed,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
            **preset["stage"],
        }
        if train_py_supports("validation_per_class"):
            values.update(validation_split="heldout")
        else:
            values["validation_per_class"] = VALIDATION_PER_CLASS
        return [str(REPO / "scripts" / "configs" / "decoupled_stage.yaml"), *_as_flags(values)]
    values: dict[str, Any] = {
        "dataset_name": str(data),
        "imbalance_factor": factor,
        "imbalance_profile": "exp",
        "num_train_epochs": epochs,
        "seed": seed,
        "output_dir": str(out),
        "eval_strategy": "no",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "logging_strategy": "epoch",
        "report_to": "none",
        "disable_tqdm": True,
        **protocol_flags(),
        **preset["train"],
    }
    loss = dict(spec["flags"])
    fraction = loss.pop("drw_fraction", None)
    if fraction is not None:  # DRW starts at the same fraction of the schedule (160/200)
        loss["drw_epoch"] = math.floor(fraction * epochs)
    if loss.get("posthoc_tau") == "auto" and not train_py_supports("validation_per_class"):
        loss["posthoc_tau"] = 1.0  # a tree without the validation split: the published tau
    for family in spec.get("tuned") or ():
        loss.update(tuned_settings(preset, factor)[family]["settings"])
    values.update(loss)
    values.update(overrides or {})
    return _as_flags(values)


COMMAND_FILE = "benchmark_command.json"


def check_work_dir(out: Path, cmd: list[str]) -> None:
    """Resume only the run this command started: ``out`` must be new, or hold the record of
    exactly this command (``benchmark_command.json``, written here before the run starts). A
    directory left by another recipe (a changed preset) is neither resumed nor read as this
    run's result, and never deleted: the preset stops and says what to move."""
    marker = out / COMMAND_FILE
    argv = [str(a) for a in cmd[1:]]  # not the interpreter: a new virtualenv is the same run
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous == argv:
            return
        changed = sorted(set(previous) ^ set(argv))
        raise SystemExit(
            f"{out} holds a run of a different command (differing arguments: "
            f"{' '.join(changed[:8])}); the preset's recipe changed since it ran. Move that "
            "directory away (or pass --work_dir) to run the current recipe."
        )
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(
            f"{out} holds files but no {COMMAND_FILE}, so it cannot be told apart from a run of "
            "another recipe; move it away (or pass --work_dir)."
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, argv)


def resume_step(out: Path) -> int:
    """The optimizer step train.py continues from in ``out`` (its last readable checkpoint, the
    one ``--resume_from_checkpoint true`` takes); 0 for a fresh run. A resumed run's
    ``train_runtime`` covers only the steps after it, so the time per epoch needs it."""
    from hf_longtail.resume import last_readable_checkpoint

    checkpoint = last_readable_checkpoint(out)
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def epochs_timed(record: dict) -> float | None:
    """Epochs that ``record["train_runtime_s"]`` measured: ``epochs * (1 - resumed / steps)``
    (all of them for a run that started fresh, or a record older than the resume fields)."""
    epochs, steps = record.get("epochs"), record.get("max_steps")
    if not epochs:
        return None
    resumed = record.get("resumed_from_step") or 0
    return epochs * (1 - resumed / steps) if steps else epochs


def run_train_py(cmd: list[str], out: Path) -> tuple[dict, float, int | None]:
    """Run one train.py command (resuming its own checkpoints if a sitting stopped it) and
    return ``(all_results.json, wall seconds, step it resumed from)``; the step is ``None``
    when the run had already finished and is only read (where it started is unknown then)."""
    results = out / "all_results.json"
    check_work_dir(out, cmd)
    start = time.perf_counter()
    if results.is_file():  # finished before its record was written; just read it
        return json.loads(results.read_text()), time.perf_counter() - start, None
    resumed = resume_step(out)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}).")
    return json.loads(results.read_text()), time.perf_counter() - start, resumed


def train_py_record(metrics: dict, method: str, seed: int, factor: float, epochs) -> dict:
    """A run record from train.py's ``all_results.json``."""

    def prefixed(prefix):
        out = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        return out or None

    spec = METHODS[method]
    stage = "stage" in spec["flags"]
    return {
        "method": method,
        "seed": seed,
        "imbalance_factor": factor,
        "epochs": None if stage else epochs,
        "train_runtime_s": metrics.get("train_runtime"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "peak_gpu_mem_mb": metrics.get("peak_gpu_mem_mb"),
        "tau": metrics.get("posthoc_tau"),
        "validation": prefixed("validation_") or prefixed("eval_"),
        "test": prefixed("test_"),
    }


CURVE_KEYS = ("eval_balanced_accuracy", "eval_accuracy", "eval_worst_class_accuracy", "eval_loss")


def validation_curve(out: Path) -> list[dict] | None:
    """The per-epoch validation metrics of a train.py run (``trainer_state.json``'s log
    history): what shows whether a short schedule had converged."""
    state = out / "trainer_state.json"
    if not state.is_file():
        return None
    curve = [
        {
            "epoch": entry["epoch"],
            **{k[len("eval_") :]: entry[k] for k in CURVE_KEYS if k in entry},
        }
        for entry in json.loads(state.read_text()).get("log_history", [])
        if "eval_balanced_accuracy" in entry
    ]
    return curve or None


def plan_train_py(preset: dict, args) -> list[tuple[str, int, float]]:
    """(method, seed, IF) of a train.py preset, CE of each seed before what starts from it."""
    methods = args.methods or preset["methods"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    factors = [args.imbalance_factor] if args.imbalance_factor else preset["imbalance_factors"]
    plan = []

    def headline(method: str) -> bool:
        # a second stage is cheap next to training: it gets every seed of the run it starts from
        return method in preset["headline"] or METHODS[method].get("from") in preset["headline"]

    for factor in factors:
        for method in methods:
            group = "headline" if headline(method) else "other"
            seeds = args.seeds if args.seeds is not None else preset["seeds"][group]
            plan += [(method, seed, factor) for seed in seeds]
    for method, seed, factor in list(plan):
        source = METHODS[method].get("from")
        if source and (source, seed, factor) not in plan:
            raise SystemExit(f"{method} seed {seed} starts from the {source} run: add {source}.")

    def priority(run: tuple[str, int, float]) -> tuple:
        # A preset that spans sittings gives paired results early: per IF, the headline methods
        # seed by seed (a stage after the training runs of its seed), then the rest.
        method, seed, factor = run
        first = headline(method)
        return (
            factors.index(factor),
            not first,
            seed if first else 0,
            bool(METHODS[method].get("from")),
            methods.index(method),
        )

    return sorted(plan, key=priority)


def run_train_py_preset(args, name: str, preset: dict) -> Path:
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    data = find_cifar(args.dataset or preset["dataset"], args.data)
    runs_dir = RESULTS_DIR / f"{name}_runs"
    work_root = Path(args.work_dir or (REPO / "outputs" / "benchmark" / name))
    overrides = dict(item.split("=", 1) for item in args.set or [])
    plan = plan_train_py(preset, args)
    todo = [r for r in plan if not (runs_dir / f"{run_key(r[0], r[2], r[1])}.json").is_file()]
    print(f"[benchmark] {name}: {len(todo)} runs to do, {len(plan) - len(todo)} already done")
    meta = {
        "name": name,
        "preset": args.preset,
        "dataset": args.dataset or preset["dataset"],
        "imbalance_factors": sorted({r[2] for r in plan}),
        "epochs": epochs,
        "recipe": preset["train"],
        "protocol": protocol_flags(),
        "overrides": overrides,
        "thresholds": THRESHOLDS,
        "methods": {m: METHODS[m] for m in preset["methods"]},
        "model": preset["train"]["model_name_or_path"],
    }
    progress = Progress(len(todo), len(plan) - len(todo))
    for method, seed, factor in todo:
        key = run_key(method, factor, seed)
        out = work_root / key
        text = f"{method} seed {seed} IF {factor:g}"
        with claim_run(work_root / f".{key}.lock") as mine:
            if not mine or (runs_dir / f"{key}.json").is_file():
                progress.skip(text, "running in another process" if not mine else "done")
                continue
            cmd = [sys.executable, str(REPO / "scripts" / "train.py")]
            cmd += run_flags(preset, method, seed, factor, data, out, epochs, work_root, overrides)
            progress.begin(text)
            metrics, wall, resumed = run_train_py(cmd, out)
            record = train_py_record(metrics, method, seed, factor, epochs)
            if resumed is not None and not METHODS[method]["flags"].get("stage"):
                state = json.loads((out / "trainer_state.json").read_text())
                record.update(resumed_from_step=resumed, max_steps=state["max_steps"])
            record["validation_curve"] = validation_curve(out)
            record["wall_s"] = wall
            record["command"] = cmd[1:]
            write_json_atomic(runs_dir / f"{key}.json", record)
        progress.end(wall, record)
        write_results(name, meta, runs_dir)
    path = write_results(name, meta, runs_dir)
    write_report(path, update_readme=args.update_readme)
    return path


# ---------------------------------------------------------------------- linear preset
def run_linear_preset(args, name: str, preset: dict) -> Path:
    """The linear preset in this process (:mod:`benchmark_linear`); sweep first per IF."""
    import benchmark_linear as bl
    import torch

    torch.set_num_threads(args.threads)
    data = find_cifar(preset["dataset"], args.data)
    runs_dir = RESULTS_DIR / f"{name}_runs"
    sweep_dir = RESULTS_DIR / f"{name}_sweep"
    work_root = Path(args.work_dir or (REPO / "outputs" / "benchmark" / name))
    factors = [args.imbalance_factor] if args.imbalance_factor else preset["imbalance_factors"]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    methods = args.methods or list(bl.LINEAR_METHODS)
    unknown = [m for m in methods if m not in bl.LINEAR_METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; valid: {', '.join(bl.LINEAR_METHODS)}")
    sweep = {} if args.no_sweep else bl.sweep_configs()
    # Order, per IF as listed: the headline methods at published settings seed by seed (the
    # issue's goals first), the sweep, the tuned headline methods, then the rest.
    tuned = {m for m in methods if bl.LINEAR_METHODS[m]["kind"] == "tuned"}
    first = [m for m in bl.LINEAR_HEADLINE if m in methods and m not in tuned]
    then = [m for m in bl.LINEAR_HEADLINE if m in tuned]
    rest = [m for m in methods if m not in first and m not in then]
    plan = []
    for factor in factors:
        plan += [("method", m, s, factor) for s in seeds for m in first]
        plan += [("sweep", k, s, factor) for k in sweep for s in preset["sweep_seeds"]]
        plan += [("method", m, s, factor) for s in seeds for m in then]
        plan += [("method", m, s, factor) for m in rest for s in seeds]

    def path_of(item):
        kind, key, seed, factor = item
        return (sweep_dir if kind == "sweep" else runs_dir) / f"{run_key(key, factor, seed)}.json"

    todo = [item for item in plan if not path_of(item).is_file()]
    print(f"[benchmark] {name}: {len(todo)} runs to do, {len(plan) - len(todo)} already done")
    meta = {
        "name": name,
        "preset": args.preset,
        "dataset": preset["dataset"],
        "model": preset["model"],
        "image_size": preset["image_size"],
        "imbalance_factors": factors,
        "epochs": preset["train"]["num_train_epochs"],
        "recipe": preset["train"],
        "stage_recipe": preset["stage"],
        "thresholds": THRESHOLDS,
        "protocol": {"validation_per_class": preset["validation_per_class"]},
        "methods": {m: bl.LINEAR_METHODS[m] for m in methods},
        "sweep": {k: {"family": f, "settings": s} for k, (f, s) in bl.sweep_configs().items()},
    }
    if not todo:
        path = write_results(name, meta, runs_dir, sweep_dir)
        write_report(path, update_readme=args.update_readme)
        return path
    model, splits = bl.linear_features(preset, data, preset["model"])
    meta["validation"] = {f"{f:g}": splits[f].validation_source for f in factors}
    progress = Progress(len(todo), len(plan) - len(todo))
    runners: dict[float, Any] = {}

    def lock_of(item):
        kind, key, seed, factor = item
        return work_root / f".{kind}-{run_key(key, factor, seed)}.lock"

    for i, item in enumerate(todo, 1):
        kind, key, seed, factor = item
        text = f"{key} seed {seed} IF {factor:g}"
        with claim_run(lock_of(item)) as mine:
            if not mine or path_of(item).is_file():
                progress.skip(text, "running in another process" if not mine else "done")
                continue
            spec = bl.LINEAR_METHODS["ce"] if kind == "sweep" else bl.LINEAR_METHODS[key]
            chosen = None
            if spec["kind"] == "tuned":
                done = {
                    r["sweep_id"]: r
                    for r in load_runs(sweep_dir)
                    if r["imbalance_factor"] == factor and r["seed"] in preset["sweep_seeds"]
                }
                missing = sorted(set(bl.sweep_configs()) - set(done))
                busy = [
                    m
                    for m in missing
                    for s in preset["sweep_seeds"]
                    if not path_of(("sweep", m, s, factor)).is_file()
                    and is_claimed(lock_of(("sweep", m, s, factor)))
                ]
                if busy:  # another sitting is still sweeping: the next sitting runs this one
                    progress.skip(text, f"the sweep is still running elsewhere ({busy[0]}, ...)")
                    continue
                if missing:
                    raise SystemExit(
                        f"{key} at IF {factor:g} needs the whole sweep; {len(missing)} settings "
                        f"are missing ({missing[0]}, ...): run without --no_sweep first."
                    )
                chosen = bl.choose(done)
            if factor not in runners:
                runners[factor] = bl.LinearRunner(
                    model,
                    splits[factor],
                    preset["train"],
                    preset["stage"],
                    THRESHOLDS,
                    work_root / f"if{factor:g}",
                )
            runner = runners[factor]
            progress.begin(text)
            start = time.perf_counter()
            if kind == "sweep":
                family, settings = sweep[key]
                spec = spec | {"loss": {"base": "ce", **settings}}
                record = runner.run(spec, seed)
                record.update(sweep_id=key, family=family)
            else:
                record = runner.run(spec, seed, chosen)
                record["method"] = key
                if chosen is not None:
                    record["chosen"] = chosen
            record.update(seed=seed, imbalance_factor=factor, peak_rss_mb=peak_rss_mb())
            record["wall_s"] = time.perf_counter() - start
            write_json_atomic(path_of(item), record)
        progress.end(record["wall_s"], record)
        if i % 10 == 0 or i == len(todo):
            write_results(name, meta, runs_dir, sweep_dir)
    path = write_results(name, meta, runs_dir, sweep_dir)
    write_report(path, update_readme=args.update_readme)
    return path


# -------------------------------------------------------------------------- statistics
def _metric(run: dict, key: str):
    return (run.get("test") or run.get("metrics") or {}).get(key)


def summarize(payload: dict, factor: float) -> list[dict]:
    """Per method at one IF: mean ± sample std over seeds of every table metric, the paired
    difference to its base, wall time per epoch relative to CE, peak memory."""
    from hf_longtail.metrics.seed_stats import mean_std, paired_difference

    methods = payload.get("methods") or {}
    by_method: dict[str, dict[int, dict]] = {}
    for run in payload["runs"]:
        if float(run.get("imbalance_factor", factor)) == float(factor):
            by_method.setdefault(run["method"], {})[run["seed"]] = run

    def epoch_time(runs):
        times = [
            r["train_runtime_s"] / epochs_timed(r)
            for r in runs.values()
            if r.get("train_runtime_s") and epochs_timed(r)
        ]
        return sum(times) / len(times) if times else None

    ce_time = epoch_time(by_method.get("ce", {}))
    order = [m for m in methods if m in by_method] + sorted(set(by_method) - set(methods))
    rows = []
    for method in order:
        runs = by_method[method]
        spec = methods.get(method) or {}
        base = spec.get("base", "ce") if method != "ce" else None
        row: dict[str, Any] = {
            "method": method,
            "label": spec.get("label", method),
            "base": base,
            "seeds": sorted(runs),
            "paired": {},
        }
        for key, _ in TABLE_METRICS:
            row[key] = mean_std([_metric(r, key) for r in runs.values()])
            if base and base in by_method:
                diff = paired_difference(
                    {s: _metric(r, key) for s, r in runs.items()},
                    {s: _metric(r, key) for s, r in by_method[base].items()},
                )
                row["paired"][key] = diff.to_dict() if diff else None
        t = epoch_time(runs)
        row["epoch_time_s"] = t
        row["time_ratio"] = t / ce_time if t and ce_time else None
        peaks = [r["peak_rss_mb"] for r in runs.values() if r.get("peak_rss_mb")]
        row["peak_rss_mb"] = max(peaks) if peaks else None
        taus = [r["tau"] for r in runs.values() if r.get("tau") is not None]
        row["taus"] = taus or None
        rows.append(row)
    return rows


#: Smallest paired mean difference (1 point) called an effect on the tail: with the subset fixed,
#: seeds differ only in the head's initialisation and batch order, so intervals are narrow and
#: a 0.3-point difference can exclude 0 without mattering.
MIN_EFFECT = 0.01


def tail_verdicts(rows: list[dict]) -> dict[str, list[str]]:
    """Which methods help the tail, by the paired 95% interval of the worst-class and few-shot
    accuracy differences to their base: ``helps`` (an interval above 0 with a mean of at least
    :data:`MIN_EFFECT`, none such below), ``hurts`` (the mirror), ``mixed`` (both), ``no clear
    effect`` (intervals covering 0 or means under 1 point), ``single seed`` (no interval)."""
    out: dict[str, list[str]] = {
        "helps": [],
        "hurts": [],
        "no clear effect": [],
        "mixed": [],
        "single seed": [],
    }
    for row in rows:
        if not row["base"] or not row["paired"]:
            continue
        diffs = [row["paired"].get(k) for k in ("worst_class_accuracy", "few_shot_accuracy")]
        diffs = [d for d in diffs if d]
        if not diffs:
            continue
        if all(d["low"] is None for d in diffs):
            out["single seed"].append(row["method"])
            continue
        up = any(d["low"] is not None and d["low"] > 0 and d["mean"] >= MIN_EFFECT for d in diffs)
        down = any(
            d["high"] is not None and d["high"] < 0 and d["mean"] <= -MIN_EFFECT for d in diffs
        )
        verdict = "mixed" if up and down else "helps" if up else "hurts" if down else None
        out[verdict or "no clear effect"].append(row["method"])
    return out


GOALS = (
    # (method, base, metric, threshold on the paired mean, what the issue asks)
    ("ce_ccar_car", "ce", "accuracy", 0.03, "CE + CCAR + CAR >= CE + 3 points overall"),
    ("ce_ccar_car", "ce", "worst_class_accuracy", 0.08, "... and + 8 points worst-class"),
    ("la_ccar_car", "la", "worst_class_accuracy", 0.0, "LA + CCAR + CAR > LA on worst-class"),
)


def goal_lines(rows: list[dict], seeds_needed: int = 1) -> list[str]:
    """The issue's goals, checked against the paired differences (published and tuned
    settings): a threshold above 0 on the paired mean, a threshold of 0 with the whole 95%
    interval above 0. A comparison over fewer than ``seeds_needed`` seed pairs (the preset's
    headline seeds; a preset still running) is shown but not judged."""
    by = {r["method"]: r for r in rows}
    lines = []
    for method, base, key, threshold, text in GOALS:
        for variant in (method, f"{method}_tuned"):
            d = (by.get(variant) or {}).get("paired", {}).get(key)
            if not d or by[variant]["base"] != base:
                continue
            if threshold > 0:
                met = d["mean"] >= threshold
            else:
                met = d["low"] is not None and d["low"] > 0
            interval = (
                "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
            )
            verdict = "met" if met else "not met"
            if d["n"] < seeds_needed:
                verdict = f"not judged yet ({d['n']} of {seeds_needed} seeds)"
            lines.append(
                f"- {text} ({by[variant]['label']}): {100 * d['mean']:+.1f}{interval} over "
                f"{d['n']} seed{'s' if d['n'] != 1 else ''}: **{verdict}**."
            )
    return lines


def seeds_needed(payload: dict) -> int:
    """How many paired seeds the preset's goal comparisons are meant to have."""
    preset = PRESETS.get(payload.get("preset", ""), {})
    seeds = preset.get("seeds")
    if isinstance(seeds, dict):
        return len(seeds.get("headline", ()))
    return len(seeds or ()) or 1


# -------------------------------------------------------------------------- the report
def write_results(name: str, meta: dict, runs_dir: Path, sweep_dir: Path | None = None) -> Path:
    """``<name>.json``: the preset's metadata, every run record, the sweep and its choices."""
    payload = dict(meta)
    payload["environment"] = environment()
    payload["contention"] = CONTENTION_NOTE
    payload["runs"] = load_runs(runs_dir)
    if sweep_dir is not None:
        import benchmark_linear as bl

        sweep_runs = load_runs(sweep_dir)
        payload["sweep_runs"] = sweep_runs
        payload["choices"] = {}
        for factor in meta["imbalance_factors"]:
            at = {r["sweep_id"]: r for r in sweep_runs if r["imbalance_factor"] == factor}
            if at:
                payload["choices"][f"{factor:g}"] = bl.choose(at)
    path = RESULTS_DIR / f"{name}.json"
    write_json_atomic(path, payload)
    return path


def _cell(mean, std, key):
    if mean is None:
        return "n/a"
    scale, digits = (1.0, 3) if key == "ece" else (100.0, 1)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _diff_cell(d, key):
    if not d:
        return ""
    scale, digits = (1.0, 3) if key == "ece" else (100.0, 1)
    text = f"{d['mean'] * scale:+.{digits}f}"
    if d["low"] is not None:
        text += f" [{d['low'] * scale:+.{digits}f}, {d['high'] * scale:+.{digits}f}]"
        if d["low"] > 0 or d["high"] < 0:
            text = f"**{text}**"
    return text


def _effect(row: dict) -> str:
    """``worst-class +27.5, few-shot +23.1``: the paired mean differences in points."""
    parts = []
    for key, name in (("worst_class_accuracy", "worst-class"), ("few_shot_accuracy", "few-shot")):
        d = row["paired"].get(key)
        if d:
            parts.append(f"{name} {100 * d['mean']:+.1f}")
    return ", ".join(parts)


def factor_tables(payload: dict, factor: float) -> str:
    """The markdown of one IF: results table, paired differences, the plain statement."""
    rows = summarize(payload, factor)
    if not rows:
        return f"### IF {factor:g}\n\nNot run yet.\n"
    published = PUBLISHED.get((payload["dataset"], factor, payload.get("model")), {})
    head = "| Method | Seeds | " + " | ".join(label for _, label in TABLE_METRICS)
    head += " | s/epoch | vs CE | Peak RSS (MB) |"
    if published:
        head += " Published (200 ep) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [_cell(*row[key], key) for key, _ in TABLE_METRICS]
        cells += [
            f"{row['epoch_time_s']:.2f}" if row["epoch_time_s"] else "n/a",
            f"{row['time_ratio']:.2f}x" if row["time_ratio"] else "n/a",
            f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "n/a",
        ]
        if published:
            cells.append(str(published.get(row["method"], "")))
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    paired_keys = [k for k, _ in TABLE_METRICS]
    diff_head = "| Method | vs | " + " | ".join(f"Δ {label}" for _, label in TABLE_METRICS) + " |"
    diff_lines = [diff_head, "|" + "---|" * (diff_head.count("|") - 1)]
    labels = {r["method"]: r["label"] for r in rows}
    for row in rows:
        if not row["base"] or not row["paired"]:
            continue
        cells = [_diff_cell(row["paired"].get(k), k) for k in paired_keys]
        base = labels.get(row["base"], row["base"])
        diff_lines.append(f"| {row['label']} | {base} | " + " | ".join(cells) + " |")
    verdicts = tail_verdicts(rows)
    by_method = {r["method"]: r for r in rows}
    statement = []
    for verdict, text in (
        ("helps", "**Help the tail**"),
        ("hurts", "**Hurt the tail**"),
        ("mixed", "**Mixed**"),
        ("no clear effect", "**No clear effect on the tail** (or under 1 point)"),
        ("single seed", "Single seed (not judged)"),
    ):
        if verdicts[verdict]:
            names = ", ".join(f"{labels[m]} ({_effect(by_method[m])})" for m in verdicts[verdict])
            statement.append(f"- {text} (paired 95% interval of worst-class or few-shot): {names}.")
    out = [
        f"### IF {factor:g}\n",
        *lines,
        "",
        "Paired per-seed differences to the base "
        "(points; ECE as a fraction; 95% t interval; bold: excludes 0):",
        "",
        *diff_lines,
        "",
    ]
    out += ["Which methods help the tail at this IF (generated from the intervals above):", ""]
    out += statement or ["- no paired comparison yet."]
    goals = goal_lines(rows, seeds_needed(payload))
    if goals:
        out += ["", "The issue's goals at this IF:", "", *goals]
    curves = curve_lines(payload, factor, labels)
    if curves:
        out += ["", "Validation balanced accuracy (%) after each epoch, mean over seeds:", ""]
        out += curves
    return "\n".join(out) + "\n"


def curve_lines(payload: dict, factor: float, labels: dict[str, str]) -> list[str]:
    """Per method, the mean validation balanced accuracy after each epoch (runs that recorded
    ``validation_curve``): how close to converged a short schedule left each method."""
    by_method: dict[str, list[list[dict]]] = {}
    for run in payload["runs"]:
        if float(run.get("imbalance_factor", factor)) == float(factor) and run.get(
            "validation_curve"
        ):
            by_method.setdefault(run["method"], []).append(run["validation_curve"])
    lines = []
    order = [m for m in labels if m in by_method] + [m for m in by_method if m not in labels]
    for method in order:
        curves = by_method[method]
        epochs = sorted({round(p["epoch"], 2) for c in curves for p in c})
        cells = []
        for epoch in epochs:
            values = [
                p["balanced_accuracy"] for c in curves for p in c if round(p["epoch"], 2) == epoch
            ]
            cells.append(f"{100 * sum(values) / len(values):.1f} (ep {epoch:g})")
        lines.append(f"- {labels.get(method, method)}: " + " -> ".join(cells))
    return lines


def sweep_table(payload: dict) -> str:
    """The validation sweep per IF: the published setting beside the chosen one."""
    import benchmark_linear as bl

    lines = []
    for factor, chosen in (payload.get("choices") or {}).items():
        runs = {
            r["sweep_id"]: r
            for r in payload["sweep_runs"]
            if f"{r['imbalance_factor']:g}" == factor
        }
        for family, published in (("car", bl.PUBLISHED_CAR), ("ccar", bl.PUBLISHED_CCAR)):
            pick = chosen.get(family)
            pub = next(
                (
                    k
                    for k, (f, s) in bl.sweep_configs().items()
                    if f == family and all(s.get(x) == v for x, v in published.items())
                ),
                None,
            )
            if not pick or pub not in runs:
                continue
            val_pub = runs[pub]["validation"]["balanced_accuracy"]
            lines.append(
                f"| {factor} | {family.upper()} | `{pub}` | {100 * val_pub:.1f} | "
                f"`{pick['sweep_id']}` | {100 * pick['validation_balanced_accuracy']:.1f} | "
                f"{pick['candidates']} |"
            )
    if not lines:
        return ""
    head = (
        "| IF | Family | Published setting | Val. balanced acc. | Chosen on validation | "
        "Val. balanced acc. | Candidates |\n|---|---|---|---|---|---|---|"
    )
    return (
        "Sweep on validation (CE base, seed 0; the tuned rows above use the chosen settings):\n\n"
        + (head + "\n" + "\n".join(lines) + "\n")
    )


def _memory_note(payload: dict) -> str:
    if payload.get("preset") != "linear":
        return ""
    return (
        " Peak RSS is that of the one process running every head (backbone and cached "
        "features included), so it is the same for every method; the head itself is 12,810 "
        "parameters."
    )


#: The finetune preset's step-cost measurement (scripts/bench_step_cost.py --json): a run's
#: epoch time on a shared machine is too noisy for a 3% goal, interleaved steps are not.
STEP_COST_FILES = {"finetune": "step_cost_finetune.json"}
STEP_COST_GOAL = 1.03


def step_cost_lines(payload: dict, results_dir: Path | None = None) -> list[str]:
    """The issue's step-cost goal (CCAR + CAR within 3% of CE's step) from the preset's
    interleaved step-time measurement, if it was made."""
    name = STEP_COST_FILES.get(payload.get("preset", ""))
    path = (results_dir or RESULTS_DIR) / name if name else None
    if path is None or not path.is_file():
        return []
    record = json.loads(path.read_text())
    ratios, ms = record["ratio_to_ce"], record["median_ms"]
    lines = [
        f"Step cost ({record['setting']}; `python scripts/bench_step_cost.py "
        f"--model {record['args']['model']} --image_size {record['args']['image_size']} "
        f"--batch {record['args']['batch']} --threads {record['args']['threads']}`, "
        f"torch {record['machine']['torch']}, {record['machine']['cpu_count']} CPUs, load "
        f"average {(record['machine'].get('load_average') or [float('nan')])[0]:.1f}; the "
        "methods' steps interleave, so a busy machine slows them alike):",
        "",
    ]
    for method in ratios:
        lines.append(f"- {method}: {ms[method]:.0f} ms, {ratios[method]:.3f}x CE")
    for method in ("ce_ccar_car", "ce_ccar_car_tuned"):
        if method in ratios:
            met = ratios[method] <= STEP_COST_GOAL
            lines.append(
                f"- Goal, {method} step within 3% of CE's: {ratios[method]:.3f}x: "
                f"**{'met' if met else 'not met'}**."
            )
    return ["", *lines, ""]


def markdown_report(payload: dict) -> str:
    """Every IF's tables, the sweep, the step cost, and the machine / versions line."""
    env = payload["environment"]
    parts = [factor_tables(payload, f) for f in payload.get("imbalance_factors", [100])]
    step_cost = step_cost_lines(payload)
    if step_cost:
        parts.append("\n".join(step_cost))
    sweep = sweep_table(payload) if payload.get("sweep_runs") else ""
    if sweep:
        parts.append(sweep)
    epochs = payload.get("epochs")
    parts.append(
        f"*{payload['dataset'].upper()}-LT, preset `{payload['preset']}`, model "
        f"`{payload.get('model')}`, {epochs} epochs; accuracies in %, mean ± sample std over "
        f"seeds; ECE as a fraction; many-shot > {payload.get('thresholds', THRESHOLDS)['many']}"
        f" and few-shot < {payload.get('thresholds', THRESHOLDS)['few']} training images. "
        f"Machine: {env.get('cuda') or env.get('processor')} ({env.get('cpu_count')} CPUs, "
        f"{env.get('torch_threads')} torch threads), Python {env.get('python')}, torch "
        f"{env.get('torch')}, transformers {env.get('transformers')}, datasets "
        f"{env.get('datasets')}, hf-longtail {env.get('hf_longtail')}. "
        f"{len(payload['runs']) + len(payload.get('sweep_runs') or [])} runs, "
        f"{_duration(sum(r.get('wall_s') or 0 for r in payload['runs']))} of run wall time "
        f"(+ {_duration(sum(r.get('wall_s') or 0 for r in payload.get('sweep_runs') or []))} "
        f"sweep). {payload.get('contention', '')}{_memory_note(payload)}*\n"
    )
    return "\n".join(parts)


def plot(payload: dict, path: Path) -> None:
    """Bar chart per IF of overall, few-shot, worst-class and balanced accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("accuracy", "few_shot_accuracy", "worst_class_accuracy", "balanced_accuracy")
    all_rows = {f: summarize(payload, f) for f in payload.get("imbalance_factors", [100])}
    all_rows = {f: rows for f, rows in all_rows.items() if rows} or {100: []}
    factors = list(all_rows)
    width_n = max(len(r) for r in all_rows.values()) or 1
    fig, axes = plt.subplots(
        len(factors), 1, figsize=(max(8, 0.6 * width_n), 4.2 * len(factors)), squeeze=False
    )
    for ax, factor in zip(axes[:, 0], factors):
        rows = all_rows[factor]
        x = np.arange(len(rows))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            means = [100 * (r[key][0] or 0) for r in rows]
            errs = [100 * (r[key][1] or 0) for r in rows]
            ax.bar(x + (i - 1.5) * width, means, width, yerr=errs, label=key.replace("_", " "))
        ax.set_xticks(x, [r["label"] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{payload['name']}, IF {factor:g} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_markers(preset: str) -> tuple[str, str]:
    """The README markers of a preset's generated block (``scratch`` keeps the old ones)."""
    if preset in ("scratch", "cpu"):
        return LEGACY_README_START, LEGACY_README_END
    return f"<!-- benchmark-results:{preset}:start -->", f"<!-- benchmark-results:{preset}:end -->"


def write_readme_block(readme: Path, payload: dict, table: str, result_path: Path) -> None:
    """Replace the text between the preset's markers (only that) with the generated block."""
    start, end = readme_markers(payload["preset"])
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(
            f"{readme} lacks the {start} / {end} markers; add them where the table should go."
        )
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    rel = result_path.relative_to(REPO) if result_path.is_relative_to(REPO) else result_path
    block = (
        f"{start}\n<!-- generated by scripts/benchmark.py --report {rel} --update-readme; do not "
        f"edit by hand -->\n\n{table}\n![{payload['name']}]({Path(rel).with_suffix('.png')})\n{end}"
    )
    readme.write_text(before + block + after)


def refresh_from_records(payload: dict, result_path: Path) -> None:
    """Take the runs (and sweep) from the per-run records beside the JSON when they exist: the
    JSON is rewritten only every few runs, the records as each run ends."""
    runs_dir = result_path.with_name(f"{result_path.stem}_runs")
    if runs_dir.is_dir():
        payload["runs"] = load_runs(runs_dir)
    sweep_dir = result_path.with_name(f"{result_path.stem}_sweep")
    if sweep_dir.is_dir():
        import benchmark_linear as bl

        payload["sweep_runs"] = load_runs(sweep_dir)
        payload["choices"] = {}
        for factor in payload.get("imbalance_factors", []):
            at = {
                r["sweep_id"]: r for r in payload["sweep_runs"] if r["imbalance_factor"] == factor
            }
            if at:
                payload["choices"][f"{factor:g}"] = bl.choose(at)


def write_report(result_path: Path, update_readme: bool = False, readme: Path | None = None) -> str:
    """Write ``<name>.md`` and ``<name>.png`` beside the JSON; with ``update_readme`` also the
    preset's block of ``readme`` (default the repository's README.md)."""
    result_path = Path(result_path).resolve()
    payload = json.loads(result_path.read_text())
    refresh_from_records(payload, result_path)
    payload.setdefault("imbalance_factors", [payload.get("imbalance_factor", 100)])
    if "methods" in payload:  # legacy files: {method: {"label", "flags"}} without bases
        for method, spec in payload["methods"].items():
            spec.setdefault("base", METHODS.get(method, {}).get("base", "ce"))
    payload.setdefault("model", (payload.get("recipe") or {}).get("model_name_or_path"))
    table = markdown_report(payload)
    result_path.with_suffix(".md").write_text(f"# {payload['name']}\n\n{table}")
    plot(payload, result_path.with_suffix(".png"))
    if update_readme:
        write_readme_block(readme or REPO / "README.md", payload, table, result_path)
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="scratch")
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default=None)
    parser.add_argument("--data", help="directory with the CIFAR train/test parquet files")
    parser.add_argument("--imbalance_factor", type=float, default=None, help="only this IF")
    parser.add_argument("--epochs", type=float, default=None, help="override the preset")
    parser.add_argument("--methods", nargs="+", help="subset of the preset's methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    parser.add_argument("--name", help="results name (default from dataset/model/preset)")
    parser.add_argument("--work_dir", help="where the per-run output directories go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (linear preset)")
    parser.add_argument("--no_sweep", action="store_true", help="linear: skip the sweep")
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
        return
    preset = PRESETS[args.preset]
    default_names = {
        "linear": "cifar10lt_lite0_linear",
        "finetune": "cifar10lt_lite0_finetune",
        "scratch": "cifar10lt_resnet32_scratch",
        "paper": "cifar10lt_resnet32_paper",
    }
    name = args.name or default_names[args.preset]
    if preset["kind"] == "linear":
        run_linear_preset(args, name, preset)
    else:
        run_train_py_preset(args, name, preset)


if __name__ == "__main__":
    main()
