"""Runs that would finish with silently wrong results get a warning or a refusal: rebalancing
applied twice, a loss that diverges without NaN, ``nonfinite_loss="skip"`` skipping most steps
(and weights that are no longer finite, which are never saved), a run with no optimizer step.

Every case is a real training run (``scripts/train.py`` or ``LongTailTrainer`` on the tiny ViT).
The divergence comes from a learning rate far too high (with clipping, so it stays finite). The
non-finite values are forced at known steps (a weight overwritten with NaN after a chosen
optimizer step, NaN logits on chosen batches): when a real overflow happens depends on the
machine's rounding (thread count, SIMD width), and the assertions below name exact steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _reliability_helpers import TINY_RUN, tiny_vit, train_dataset, training_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.trainer import NonFiniteLossError


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--loss", "la"], "the logit-adjusted loss (base='la')"),
        (["--loss", "bs"], "the balanced-softmax loss (base='bs')"),
        (["--loss", "cb"], "the class-balanced loss (base='cb')"),
        (["--loss", "ldam", "--drw_epoch", "0.5"], "deferred re-weighting (drw_epoch=0.5)"),
        (["--posthoc_tau", "1"], "--posthoc_tau 1.0 rebalances twice"),
    ],
    ids=["la", "bs", "cb", "drw", "posthoc"],
)
def test_class_balanced_sampler_with_a_prior_correcting_loss_warns(train, tmp_path, flags, named):
    argv = [*TINY_RUN, "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--sampler"]
    with pytest.warns(UserWarning, match="rebalances twice") as caught:
        train.main([*argv, "class_balanced", *flags])
    assert any(named in str(w.message) for w in caught)


def test_class_balanced_sampler_with_plain_ce_does_not_warn(train, tmp_path):
    argv = [*TINY_RUN, "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main([*argv, "--sampler", "class_balanced"])
    assert not [w for w in caught if "rebalances twice" in str(w.message)]


def _trainer(out, lr: float, **kwargs):
    args_overrides = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k in ("save_strategy", "save_steps", "max_grad_norm", "save_total_limit")
    }
    args = training_args(out, max_steps=30, learning_rate=lr, **args_overrides)
    model = kwargs.pop("model", None) or tiny_vit()
    return LongTailTrainer(
        model=model, args=args, train_dataset=train_dataset(), data_collator=collate_fn, **kwargs
    )


def test_a_loss_growing_by_orders_of_magnitude_warns_with_the_step(tmp_path):
    """lr 100 with gradient clipping: the weights grow a bounded amount per step, the loss goes
    from 1.8 to thousands and never becomes NaN."""
    trainer = _trainer(tmp_path, 100.0, max_grad_norm=1.0)
    with pytest.warns(RuntimeWarning, match=r"Training diverged at step \d+: the last 5 losses"):
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))  # no NaN to catch it otherwise
    step = trainer.diverged_at_step
    assert step is not None and min(losses[step - 5 : step]) > 100 * min(losses[:3])


def test_a_healthy_run_does_not_warn(tmp_path):
    trainer = _trainer(tmp_path, 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.diverged_at_step is None
    assert not [w for w in caught if "diverged" in str(w.message)]


class _OverflowAt(TrainerCallback):
    """Writes NaN into the classifier weight at the end of optimizer step ``step``, as a weight
    that overflowed in that step's update would be: every later batch has NaN logits, and a
    skipped step (zero gradient) leaves the NaN in place."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.classifier.weight.fill_(float("nan"))


def test_skip_stops_after_consecutive_skips_and_never_saves_nonfinite_weights(tmp_path):
    """The weights become NaN at step 3 and every later batch has NaN logits. With ``skip`` the
    run used to go on skipping every step, rotating the good checkpoint away
    (``save_total_limit=1``) and saving NaN weights. Now the checkpoint of step 4 is refused and
    the run stops; checkpoint-2 (finite) is kept. A healthy learning rate, so nothing but the
    forced NaN is non-finite (lr 1000 overflowed at step 3 or 4 depending on the machine)."""
    trainer = _trainer(
        tmp_path, 0.1, nonfinite_loss="skip", save_strategy="steps", save_steps=2,
        save_total_limit=1, callbacks=[_OverflowAt(3)],
    )  # fmt: skip
    with pytest.raises(
        NonFiniteLossError,
        match=r"Not saving the checkpoint at step 4: 1 parameter tensor\(s\) are not finite "
        r"\(first: classifier\.weight\)",
    ):
        trainer.train()
    assert trainer.skipped_nonfinite_steps == 1  # the batch of step 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())

    # Without checkpoints, the skip bound stops it: the batches of steps 4 to 13 are skipped,
    # 10 in a row, during the 13th batch (so after 12 optimizer steps).
    trainer = _trainer(tmp_path / "nosave", 0.1, nonfinite_loss="skip", callbacks=[_OverflowAt(3)])
    with pytest.raises(
        NonFiniteLossError,
        match=r"skipped 10 of 13 training batches \(10 in a row, last at step 13",
    ):
        trainer.train()
    assert trainer.state.global_step == 12  # it did not run on to max_steps=30
    with pytest.raises(NonFiniteLossError, match="Not saving the model"):
        trainer.save_model()
    assert not (tmp_path / "nosave" / "model.safetensors").exists()


class _NaNMostly(torch.nn.Module):
    """NaN logits on 2 of every 3 training batches (never 10 in a row)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, pixel_values, **kwargs):
        out = self.model(pixel_values=pixel_values)
        if self.training:
            self.calls += 1
            if self.calls % 3:
                out.logits = out.logits * float("nan")
        return out


def test_skip_stops_when_most_batches_are_skipped(tmp_path):
    trainer = _trainer(tmp_path, 0.1, nonfinite_loss="skip", model=_NaNMostly(tiny_vit()))
    with pytest.raises(NonFiniteLossError, match=r"skipped 14 of 20 training batches \(2 in a row"):
        trainer.train()


def test_a_run_without_optimizer_steps_is_refused(tmp_path, train):
    with pytest.raises(
        ValueError, match=r"num_train_epochs=0 and max_steps=-1: the run would make no"
    ):
        LongTailTrainer(
            model=tiny_vit(),
            args=training_args(tmp_path, num_train_epochs=0, max_steps=-1),
            train_dataset=train_dataset(),
            data_collator=collate_fn,
        )
