"""Shared pieces of the reliability suite: tiny local models and data, the train script module,
and a runner for ``scripts/train.py`` in a subprocess that can be interrupted.

Nothing touches the Hub: models are built from configs, images are generated or are the bundled
``digits``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The one-layer LayerNorm ViT (per-sample maths, so data-parallel runs match one process to
# round-off) is shared with the trainer tests; re-exported for the reliability tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _helpers_train import tiny_vit as tiny_vit

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"

#: Long-tailed class counts of the synthetic training set (96 images: six global batches of 16).
COUNTS = (40, 24, 14, 8, 6, 4)


def load_train_module():
    """``scripts/train.py`` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("hf_longtail_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def image_arrays(counts: Sequence[int] = COUNTS, size: int = 8, seed: int = 0):
    """``(images, labels)``: uint8 RGB arrays whose mean colour depends on the class, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    palette = rng.uniform(40, 215, size=(len(counts), 3))
    images = [
        np.clip(palette[y] + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
        for y in labels
    ]
    return images, labels.tolist()


def image_dataset(counts: Sequence[int] = COUNTS, size: int = 8, seed: int = 0, names=None):
    """A ``datasets.Dataset`` with an ``Image`` column ``image`` and a ``ClassLabel`` ``label``."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    images, labels = image_arrays(counts, size, seed)
    names = names or [f"class_{i}" for i in range(len(counts))]
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(a) for a in images], "label": labels}, features=features
    )


def eval_transform():
    """Deterministic PIL -> normalised float tensor (no augmentation)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        ]
    )


def train_dataset(counts: Sequence[int] = COUNTS, size: int = 8, seed: int = 0):
    """``image_dataset`` with ``eval_transform`` attached (rows: pixel_values, labels)."""
    from hf_longtail.data import with_transforms

    return with_transforms(image_dataset(counts, size, seed), eval_transform())


def training_args(output_dir: str | os.PathLike, **overrides: Any):
    """Small CPU ``TrainingArguments``: plain SGD, no saving, no reporting, one data process."""
    from transformers import TrainingArguments

    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 16,
        "learning_rate": 0.1,
        "optim": "sgd",
        "num_train_epochs": 1,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter and buffer."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test environment for child processes: offline, unbuffered, no GPU."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            # Tiny tensors: a second OpenMP thread only spins on a loaded machine.
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


#: A complete digits run of ``scripts/train.py`` in seconds: ResNet-20 on 16x16 images, CE + CCAR +
#: CAR, 4 steps of 32 with a checkpoint every 2 (flags may be appended to override any of them).
TINY_RUN = [
    "--dataset_name", "digits", "--imbalance_factor", "10",
    "--many_shot_threshold", "60", "--few_shot_threshold", "20",
    "--model_name_or_path", "resnet20_cifar", "--train_transform", "cifar10", "--image_size", "16",
    "--loss", "ce", "--ccar", "true", "--car_weight", "0.5",
    "--max_steps", "4", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
    "--learning_rate", "0.05", "--optim", "sgd", "--logging_steps", "1",
    "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "2",
    "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
    "--dataloader_num_workers", "0", "--use_cpu", "true",
]  # fmt: skip


def run_files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes): a run directory's exact content. The
    lock file is left out: it names the latest process that opened the directory (a refused
    launch included), and is no part of the run."""
    from hf_longtail.resume import LOCK_FILE

    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


class TrainRun:
    """``scripts/train.py`` (or ``launcher`` + it) in its own process group, output in
    ``log_path``."""

    def __init__(self, args: Sequence[str], log_path: Path, launcher: Sequence[str] = ()) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, *launcher, str(TRAIN_SCRIPT), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=REPO_ROOT,
            start_new_session=True,  # our signals reach this run only, never pytest
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], timeout: float = 240.0) -> None:
        """Poll ``condition`` every 10 ms; fail (and kill the run) if the run ends or time is up,
        so a broken run can never hang the suite."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the run ended (exit {self.process.returncode}) before the condition held:\n"
                    + self.log()[-4000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("timed out waiting for the run:\n" + self.log()[-4000:])
            time.sleep(0.01)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def send_group(self, sig: int) -> None:
        """``sig`` to the run's whole process group (its DataLoader workers, torchrun's
        workers), as a cluster scheduler's cancel or a container stop delivers it."""
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 240.0) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            raise
        finally:
            self._log.close()
        return code


def run_train(
    args: Sequence[str], log_path: Path, timeout: float = 240.0, launcher: Sequence[str] = ()
) -> tuple[int, str]:
    """Run ``scripts/train.py`` to the end; ``(exit code, output)``."""
    run = TrainRun(args, log_path, launcher)
    code = run.wait(timeout)
    return code, run.log()
