"""bf16 autocast on CPU for a few hundred steps: the model runs in bfloat16, the loss and the
CAR state stay float32 and finite."""

from __future__ import annotations

import math

import pytest
import torch
from _reliability_helpers import tiny_vit, train_dataset, training_args

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses import LongTailLossConfig

STEPS = 300


class DtypeRecorder(LongTailTrainer):
    """Records, for every training step, the dtype the classifier head computed in (inside the
    autocast region) and the dtype of the loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []
        self._head_dtype: torch.dtype | None = None

        def hook(module, inputs, output):
            self._head_dtype = output.dtype

        self.model.classifier.register_forward_hook(hook)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            self.dtypes.append((self._head_dtype, loss.dtype))
        return (loss, outputs) if return_outputs else loss


@pytest.mark.slow
def test_bf16_cpu_autocast_keeps_losses_and_car_state_finite(tmp_path):
    trainer = DtypeRecorder(
        model=tiny_vit(),
        args=training_args(
            tmp_path,
            bf16=True,
            max_steps=STEPS,
            logging_steps=20,
            learning_rate=0.05,
            optim="sgd",
            optim_args="momentum=0.9",
        ),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config=LongTailLossConfig(base="la", ccar=True, car_weight=0.5),
        sampler="class_balanced",
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()

    assert trainer.state.global_step == STEPS
    # Autocast was really on (the head computed bf16 logits; accelerate hands them back upcast)
    # and the loss was float32 at every step.
    assert len(trainer.dtypes) == STEPS
    assert set(trainer.dtypes) == {(torch.bfloat16, torch.float32)}
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == STEPS // 20
    for entry in logged:
        for key in ("loss", "base_loss", "ccar_loss", "car_sigma", "car_loss"):
            assert math.isfinite(entry[key]), (entry["step"], key)
    assert trainer.skipped_nonfinite_steps == 0
    # It learned something: the loss went down.
    assert logged[-1]["base_loss"] < logged[0]["base_loss"]
    state = trainer.loss_fn.state_dict()
    assert int(state["regularizer.num_steps"]) == STEPS
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
            # Autocast never lowers the kept state (float32, the lazy EMA scale float64).
            assert value.dtype in (torch.float32, torch.float64), key
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
