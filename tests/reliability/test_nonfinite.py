"""Non-finite logits or loss during training: stop with the step and the part, or skip the batch.

The NaN/inf comes from a real model whose forward is made to emit it at one chosen training
call (as a diverged layer or a corrupt batch would), so the step where it appears is known.
"""

from __future__ import annotations

import math

import pytest
import torch
from _reliability_helpers import model_state, tiny_vit, train_dataset, training_args
from transformers import TrainerCallback

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses import LongTailLossConfig
from hf_longtail.trainer import NonFiniteLossError

CONFIG = LongTailLossConfig(base="ce", ccar=True, car_weight=0.5)


class Diverging(torch.nn.Module):
    """Wraps a classifier; on training call number ``at`` its logits become ``fill``
    (``"nan"``, ``"inf"``, or ``"extreme"``: finite +-3e38, whose cross-entropy overflows)."""

    def __init__(self, model: torch.nn.Module, at: int, fill: str = "nan") -> None:
        super().__init__()
        self.model, self.at, self.fill, self.calls = model, at, fill, 0
        self.config = model.config

    def forward(self, pixel_values, **kwargs):
        out = self.model(pixel_values=pixel_values)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                logits = out.logits
                if self.fill == "nan":
                    out.logits = logits * float("nan")
                elif self.fill == "inf":
                    out.logits = logits.masked_fill(torch.ones_like(logits, dtype=bool), math.inf)
                else:  # finite logits, non-finite loss
                    sign = torch.where(torch.arange(logits.shape[1]) % 2 == 0, 1.0, -1.0)
                    out.logits = logits * 0 + 3e38 * sign
        return out


class Snapshots(TrainerCallback):
    """Model state after every optimizer step (index 0 = before training)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states.append(model_state(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states.append(model_state(model))


def _trainer(tmp_path, model, policy, max_steps=5, callbacks=None):
    return LongTailTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=max_steps),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config=CONFIG,
        sampler="class_balanced",
        nonfinite_loss=policy,
        callbacks=callbacks,
    )


def _car_steps(trainer) -> int:
    return int(trainer.loss_fn.regularizer.num_steps)


@pytest.mark.parametrize("fill", ["nan", "inf"])
def test_nonfinite_logits_stop_at_their_step_naming_logits(tmp_path, fill):
    model = Diverging(tiny_vit(), at=3, fill=fill)
    trainer = _trainer(tmp_path, model, "raise")
    with pytest.raises(NonFiniteLossError, match=r"training step 3 .*part\(s\): logits") as err:
        trainer.train()
    assert "nonfinite_loss='skip'" in str(err.value)
    assert trainer.state.global_step == 2
    # The CAR state stopped at the two good steps and never saw the bad logits.
    assert _car_steps(trainer) == 2
    state = trainer.loss_fn.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_loss_with_finite_logits_names_the_loss_part(tmp_path):
    model = Diverging(tiny_vit(), at=2, fill="extreme")
    trainer = _trainer(tmp_path, model, "raise")
    with pytest.raises(NonFiniteLossError, match=r"training step 2 .*part\(s\): base_loss"):
        trainer.train()


def test_skip_drops_exactly_the_bad_batch(tmp_path):
    """Plain SGD (no momentum, no weight decay): a skipped step must leave every weight as it
    was, and the run must go on from there with finite weights and CAR state."""
    snapshots = Snapshots()
    model = Diverging(tiny_vit(), at=3, fill="nan")
    trainer = _trainer(tmp_path, model, "skip", max_steps=5, callbacks=[snapshots])
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 1
    assert trainer.state.global_step == 5
    before, after = snapshots.states[2], snapshots.states[3]  # around step 3
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # The other steps did train.
    changed = [k for k in before if not torch.equal(snapshots.states[3][k], snapshots.states[4][k])]
    assert changed
    final = model_state(model)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert _car_steps(trainer) == 4  # the bad batch never reached CAR
    state = trainer.loss_fn.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h.get("skipped_nonfinite_steps", 0) for h in logged] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(h["loss"]) for h in logged)


def test_skip_of_a_nonfinite_loss_part_keeps_weights_finite(tmp_path):
    model = Diverging(tiny_vit(), at=2, fill="extreme")
    trainer = _trainer(tmp_path, model, "skip", max_steps=4)
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_policy_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"nonfinite_loss='ignore' is not valid.*'raise', 'skip'"):
        _trainer(tmp_path, tiny_vit(), "ignore")
