"""Shared pieces of the trainer / train-script tests: a tiny model, a tiny image dataset, args.

Everything is built locally (no Hub access) and sized so that a Trainer step takes milliseconds
on one CPU thread: a one-layer ViT on 8x8 images (LayerNorm only, no BatchNorm, no dropout, so
the loss is a per-sample function of the input and gradient accumulation can be exact).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Long-tailed class counts of the synthetic training set (head 12 .. tail 2; 36 images).
COUNTS = (12, 8, 6, 4, 4, 2)


def tiny_vit(num_labels: int = len(COUNTS), image_size: int = 8, seed: int = 0, **config: Any):
    """A randomly initialised one-layer ViT image classifier (about 3k parameters); ``config``
    overrides its ``ViTConfig`` fields (e.g. dropout, sizes, ``id2label``)."""
    from transformers import ViTConfig, ViTForImageClassification

    fields = {
        "image_size": image_size,
        "patch_size": 4,
        "num_channels": 3,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "num_labels": num_labels,
        "id2label": {i: f"class_{i}" for i in range(num_labels)},
        "label2id": {f"class_{i}": i for i in range(num_labels)},
    }
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**fields, **config}))


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row of ``text`` whose first cell is ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in the card")


def image_dataset(counts: Sequence[int] = COUNTS, size: int = 8, seed: int = 0):
    """A ``datasets.Dataset`` of RGB PIL images (``image``) and a ``ClassLabel`` (``label``).

    Class ``c`` has ``counts[c]`` images whose mean colour depends on ``c`` (so there is a
    signal to fit), rows are shuffled.
    """
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    palette = rng.uniform(40, 215, size=(len(counts), 3))
    images = []
    for y in labels:
        pixels = palette[y] + rng.normal(0, 30, size=(size, size, 3))
        images.append(np.clip(pixels, 0, 255).astype(np.uint8))
    features = Features(
        {"image": Image(), "label": ClassLabel(names=[f"class_{i}" for i in range(len(counts))])}
    )
    from PIL import Image as PILImage

    return Dataset.from_dict(
        {"image": [PILImage.fromarray(a) for a in images], "label": labels.tolist()},
        features=features,
    )


def eval_transform():
    """Deterministic PIL -> normalised float tensor (no augmentation: runs must be comparable)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        ]
    )


def train_dataset(counts: Sequence[int] = COUNTS, seed: int = 0):
    """:func:`image_dataset` with the lazy ``pixel_values``/``labels`` transform attached."""
    from hf_longtail.data import with_transforms

    return with_transforms(image_dataset(counts, seed=seed), eval_transform())


def training_args(output_dir, **overrides: Any):
    """``TrainingArguments`` for fast, deterministic CPU test runs (plain SGD, constant lr)."""
    from transformers import TrainingArguments

    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 0.1,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "num_train_epochs": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "remove_unused_columns": False,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def loss_state(trainer) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainer's loss-module state (CAR EMA, u, v, step, DRW epoch)."""
    return {
        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
        for k, v in trainer.loss_fn.state_dict().items()
    }


def model_state(model) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ 2-process worker
def distributed_worker(out_dir: str) -> None:
    """One rank of the 2-process test (run under ``accelerate launch --multi_gpu``, CPU/gloo).

    Trains the tiny ViT with CE + CCAR + CAR and the class-balanced sampler for 4 steps, logging
    every 2, and writes ``rank{r}.pt``: the loss state, the model state, the log history and,
    per training step, the rank's labels, logits and ``last_stats``.
    """
    import os

    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn

    torch.set_num_threads(1)
    records: list[dict[str, Any]] = []

    class Recorder(LongTailTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if model.training:
                records.append(
                    {
                        "labels": inputs["labels"].detach().cpu(),
                        "logits": outputs.logits.detach().cpu(),
                        "stats": {k: float(v) for k, v in self.loss_fn.last_stats.items()},
                    }
                )
            return (loss, outputs) if return_outputs else loss

    args = training_args(
        out_dir,
        per_device_train_batch_size=4,
        max_steps=4,
        logging_strategy="steps",
        logging_steps=2,
    )
    trainer = Recorder(
        model=tiny_vit(),
        args=args,
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config={"base": "ce", "ccar": True, "car_weight": 0.5},
        sampler="class_balanced",
    )
    trainer.train()
    rank = args.process_index
    torch.save(
        {
            "world_size": args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "loss_state": loss_state(trainer),
            "model_state": model_state(trainer.accelerator.unwrap_model(trainer.model)),
            "log_history": trainer.state.log_history,
            "records": records,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    import sys

    distributed_worker(sys.argv[1])


def load_script(stem: str, name: str | None = None):
    """``scripts/<stem>.py`` imported once as the module ``name`` (default ``stem``; a script,
    not part of the package); registered in ``sys.modules`` before it runs, since dataclasses
    look their module up while being created."""
    name = name or stem
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_train_script():
    """``scripts/train.py`` as the module ``hf_longtail_train_script`` (:func:`load_script`)."""
    return load_script("train", "hf_longtail_train_script")


def digits_resnet_argv(out: Any, *extra: str) -> list[str]:
    """scripts/train.py flags of a small, fast run: ResNet-20 at 16 px on the bundled digits
    (imbalance factor 10), nothing saved or reported; ``extra`` flags come last and win."""
    return [
        "--dataset_name", "digits", "--imbalance_factor", "10", "--image_size", "16",
        "--many_shot_threshold", "60", "--model_name_or_path", "resnet20_cifar",
        "--output_dir", str(out), "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "128", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--use_cpu", "true", "--learning_rate", "0.05", *extra,
    ]  # fmt: skip
