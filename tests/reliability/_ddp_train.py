"""Train the tiny ViT with LongTailTrainer (CE + CCAR + CAR, class-balanced sampler) for a fixed
number of steps at global batch 16, in 1 process or under ``torch.distributed.run`` (each of the
N processes then gets 16 / N per step), and save the final weights and loss state.

Usage: ``python _ddp_train.py OUT_DIR [POISON_STEP|-] [PIXEL_CACHE]`` or
``python -m torch.distributed.run --nproc_per_node 2 _ddp_train.py OUT_DIR [POISON_STEP|-]
[PIXEL_CACHE]`` (``PIXEL_CACHE``: ``auto``, the default, reads through the pixel-cache fast path;
``off`` through the streaming PIL transform).
With ``POISON_STEP`` the last rank's logits are NaN at that training step and the trainer runs
with ``nonfinite_loss="skip"`` and ``logging_steps=1``.
Writes ``OUT_DIR/result-ws{world_size}-rank{rank}[-poisoned][-streaming].pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reliability_helpers import (  # after the path set-up
    model_state,
    tiny_vit,
    train_dataset,
    training_args,
)

GLOBAL_BATCH = 16
MAX_STEPS = 12  # two epochs of the 96-image set: the sampler's epoch change is crossed


class _NaNAt(torch.nn.Module):
    """Wraps a classifier; its logits are NaN on training call ``at``."""

    def __init__(self, model: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.model, self.at, self.calls, self.config = model, at, 0, model.config

    def forward(self, pixel_values, **kwargs):
        out = self.model(pixel_values=pixel_values)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out.logits = out.logits * float("nan")
        return out


def train(out_dir: str | Path, poison_step: int | None = None, pixel_cache: str = "auto") -> dict:
    """Run the training described in the module docstring; returns (and saves) the result."""
    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn
    from hf_longtail.losses import LongTailLossConfig

    out_dir = Path(out_dir)
    probe = training_args(out_dir / "probe")  # world size as the launcher set it up
    world_size = probe.world_size
    args = training_args(
        out_dir / f"ws{world_size}",
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=MAX_STEPS,
        logging_steps=1 if poison_step else 4,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.2,
    )
    model = tiny_vit()
    if poison_step and probe.process_index == world_size - 1:
        model = _NaNAt(model, poison_step)
    trainer = LongTailTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config=LongTailLossConfig(base="ce", ccar=True, car_weight=0.5),
        sampler="class_balanced",
        nonfinite_loss="skip" if poison_step else "raise",
        pixel_cache=pixel_cache,
    )
    inner = trainer.model.model if isinstance(trainer.model, _NaNAt) else trainer.model
    initial = model_state(inner)
    trainer.train()
    result = {
        "world_size": world_size,
        "rank": args.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "initial": initial,
        "weights": model_state(inner),
        "loss_state": {
            k: v.detach().cpu().clone() for k, v in trainer.loss_fn.state_dict().items()
        },
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "train_dataset_type": type(trainer.get_train_dataloader().dataset).__name__,
    }
    suffix = ("-poisoned" if poison_step else "") + ("-streaming" if pixel_cache == "off" else "")
    torch.save(result, out_dir / f"result-ws{world_size}-rank{args.process_index}{suffix}.pt")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    poison = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    train(sys.argv[1], poison, sys.argv[3] if len(sys.argv) > 3 else "auto")
