"""LongTailTrainer through the real transformers.Trainer: accumulation, eval, resume, logging, DRW.

Every run uses the tiny ViT of ``_helpers_train`` (LayerNorm only, no dropout) on 8x8 synthetic
images, one CPU thread, and plain SGD unless said otherwise, so a run is well under a second and
two runs that should agree can be compared to float32 round-off.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers_train import (
    COUNTS,
    loss_state,
    model_state,
    tiny_vit,
    train_dataset,
    training_args,
)
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.losses import LongTailLossConfig, build_loss
from hf_longtail.losses.total_loss import LOSS_WEIGHTS_NAME

#: 16 training images: one optimizer step of batch 16 = the whole set = two micro-batches of 8.
COUNTS16 = (6, 4, 3, 2, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


class GradCapture(TrainerCallback):
    """Keeps a copy of every parameter's gradient right before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


class RecordingTrainer(LongTailTrainer):
    """Records each training micro-batch and the DRW switch seen by the loss at that moment."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self.drw_seen: list[tuple[float, bool]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.micro_batches.append({k: v.detach().clone() for k, v in inputs.items()})
            base = self.loss_fn.base_loss
            self.drw_seen.append((self.state.epoch or 0.0, base.weights_active))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _trainer(tmp_path, loss_config, *, cls=LongTailTrainer, counts=COUNTS, **arg_overrides):
    extra = {
        k: arg_overrides.pop(k)
        for k in (
            "sampler",
            "lr_milestones",
            "lr_gamma",
            "eval_dataset",
            "callbacks",
            "shot_thresholds",
        )
        if k in arg_overrides
    }
    return cls(
        model=tiny_vit(len(counts)),
        args=training_args(tmp_path, **arg_overrides),
        train_dataset=train_dataset(counts),
        data_collator=collate_fn,
        loss_config=loss_config,
        **extra,
    )


def _reference_grads(micro_batches, loss_config, counts, accumulation):
    """Gradients of ``sum_mb loss(mb) / accumulation`` with a fresh model and loss, in order."""
    model = tiny_vit(len(counts))
    model.train()
    loss_fn = build_loss(loss_config, counts).train()
    loss_fn.set_epoch(0.0)
    for mb in micro_batches:
        logits = model(pixel_values=mb["pixel_values"]).logits
        (loss_fn(logits, mb["labels"]) / accumulation).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss_fn


def _assert_grads_close(actual, expected, rtol=1e-5, atol=1e-7):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------ gradient accumulation
ACCUMULATION_EXACT = {
    "ce+ccar": LongTailLossConfig(base="ce", ccar=True),
    "ldam": LongTailLossConfig(base="ldam"),
    "la+ccar": LongTailLossConfig(base="la", ccar=True),
    "cb": LongTailLossConfig(base="cb", cb_beta=0.99),
    "ldam-drw-mean": LongTailLossConfig(base="ldam", drw_epoch=0, weight_reduction="mean"),
}


def _one_step(tmp_path, config, batch, accumulation, cls=LongTailTrainer):
    """One optimizer step over the 16 images of COUNTS16: ``(trainer, gradient before it)``."""
    capture = GradCapture()
    trainer = _trainer(
        tmp_path / f"b{batch}",
        config,
        cls=cls,
        counts=COUNTS16,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        callbacks=[capture],
    )
    trainer.train()
    assert trainer.state.global_step == 1 and len(capture.grads) == 1
    return trainer, capture.grads[0]


@pytest.mark.parametrize("name", list(ACCUMULATION_EXACT))
def test_accumulation_2x8_equals_batch_16(tmp_path, name):
    config = ACCUMULATION_EXACT[name]
    runs = {}
    for batch, accumulation in ((16, 1), (8, 2)):
        trainer, grads = _one_step(tmp_path, config, batch, accumulation)
        runs[batch] = (grads, model_state(trainer.model))

    grads16, weights16 = runs[16]
    grads8, weights8 = runs[8]
    _assert_grads_close(grads8, grads16)
    for key in weights16:
        torch.testing.assert_close(weights8[key], weights16[key], rtol=1e-5, atol=1e-7, msg=key)

    # Both equal the plain large-batch gradient of the loss, computed without the Trainer.
    ds = train_dataset(COUNTS16)
    full = collate_fn([ds[i] for i in range(len(ds))])
    reference, _ = _reference_grads([full], config, COUNTS16, accumulation=1)
    _assert_grads_close(grads16, reference)
    assert max(float(g.abs().max()) for g in grads16.values()) > 1e-3  # a real gradient


MICRO_BATCH_DOCUMENTED = {
    # CAR: one EMA step (one CAR batch) per micro-batch.
    "ce+ccar+car": LongTailLossConfig(base="ce", ccar=True, car_weight=0.5),
    # LDAM-DRW's weighted mean renormalises the class weights within each micro-batch.
    "ldam-drw-weighted": LongTailLossConfig(base="ldam", drw_epoch=0),
}


@pytest.mark.parametrize("name", list(MICRO_BATCH_DOCUMENTED))
def test_accumulation_treats_each_micro_batch_as_one_loss_batch(tmp_path, name):
    """Documented behaviour: the accumulated gradient is ``sum_mb loss_mb / 2`` with the loss
    state (CAR EMA) advanced once per micro-batch, in micro-batch order."""
    config = MICRO_BATCH_DOCUMENTED[name]
    capture = GradCapture()
    trainer = _trainer(
        tmp_path,
        config,
        cls=RecordingTrainer,
        counts=COUNTS16,
        gradient_accumulation_steps=2,
        max_steps=1,
        callbacks=[capture],
    )
    trainer.train()
    assert len(trainer.micro_batches) == 2
    reference, ref_loss = _reference_grads(trainer.micro_batches, config, COUNTS16, 2)
    _assert_grads_close(capture.grads[0], reference)

    state, expected_state = loss_state(trainer), ref_loss.state_dict()
    assert state.keys() == expected_state.keys()
    for key in expected_state:
        torch.testing.assert_close(state[key], expected_state[key], rtol=1e-5, atol=1e-7)
    if config.car_weight > 0:
        # One optimizer step, two CAR steps (the EMA advanced once per micro-batch).
        assert trainer.state.global_step == 1
        assert int(trainer.loss_fn.regularizer.num_steps) == 2


class WithoutScaledForGaFlag(RecordingTrainer):
    """The parent as released before ``loss_is_scaled_for_ga`` (transformers 5.16 and older).

    Its ``training_step`` then decides from ``model_accepts_loss_kwargs``, ``num_items_in_batch``
    and ``compute_loss_func`` alone: reading the flag as ``None`` is exactly that rule (the same
    code as 5.5.4 - 5.16.1, where the unfixed trainer gave 2x the gradient). Older 4.x rules
    (divide iff ``num_items_in_batch is None``, or iff ``not model_accepts_loss_kwargs``) are
    checked below through what the step receives.
    """

    loss_is_scaled_for_ga = property(lambda self: None, lambda self, value: None)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.items_seen: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.items_seen.append(num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_accumulation_exact_without_loss_is_scaled_for_ga(tmp_path):
    """ViT's forward takes **kwargs: without the flag, 2 x 8 gave twice the batch-16 gradient."""
    import inspect

    assert any(
        p.kind == inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(tiny_vit().forward).parameters.values()
    )
    config = LongTailLossConfig(base="ce", ccar=True)
    grads, seen = {}, {}
    for batch, accumulation in ((16, 1), (8, 2)):
        trainer, grads[batch] = _one_step(
            tmp_path, config, batch, accumulation, cls=WithoutScaledForGaFlag
        )
        assert trainer.loss_is_scaled_for_ga is None
        seen[batch] = (trainer.model_accepts_loss_kwargs, trainer.items_seen)
    ds = train_dataset(COUNTS16)
    reference, _ = _reference_grads([collate_fn([ds[i] for i in range(16)])], config, COUNTS16, 1)
    _assert_grads_close(grads[16], reference)
    _assert_grads_close(grads[8], reference)
    # What makes the older rules divide too: 4.50 reads model_accepts_loss_kwargs, 4.48 whether
    # num_items_in_batch (counted only for models that accept loss kwargs) is None.
    assert seen == {16: (False, [None]), 8: (False, [None, None])}


# ------------------------------------------------------------------ arguments the parent honours
def test_label_smoothing_factor_is_applied_by_the_loss(tmp_path):
    capture = GradCapture()
    trainer = _trainer(
        tmp_path,
        LongTailLossConfig(base="la"),
        counts=COUNTS16,
        per_device_train_batch_size=16,
        max_steps=1,
        label_smoothing_factor=0.2,
        callbacks=[capture],
    )
    assert trainer.loss_config.label_smoothing == 0.2
    assert trainer.label_smoother is None  # never applied a second time
    trainer.train()
    ds = train_dataset(COUNTS16)
    full = collate_fn([ds[i] for i in range(16)])
    smoothed = LongTailLossConfig(base="la", label_smoothing=0.2)
    reference, _ = _reference_grads([full], smoothed, COUNTS16, 1)
    _assert_grads_close(capture.grads[0], reference)
    unsmoothed, _ = _reference_grads([full], LongTailLossConfig(base="la"), COUNTS16, 1)
    assert not torch.allclose(unsmoothed["classifier.weight"], reference["classifier.weight"])


def test_label_smoothing_factor_equal_to_the_loss_config_is_accepted(tmp_path):
    config = LongTailLossConfig(base="ce", label_smoothing=0.1)
    trainer = _trainer(tmp_path, config, label_smoothing_factor=0.1)
    assert trainer.loss_config == config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (LongTailLossConfig(base="ldam"), "base loss 'ldam' has no label smoothing"),
        (LongTailLossConfig(base="focal"), "base loss 'focal' has no label smoothing"),
        (LongTailLossConfig(base="ce", label_smoothing=0.05), "disagrees .* label_smoothing=0.05"),
    ],
)
def test_label_smoothing_factor_that_cannot_apply_is_refused(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, config, label_smoothing_factor=0.1)


def test_compute_loss_func_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func would be silently ignored"):
        LongTailTrainer(
            model=tiny_vit(),
            args=training_args(tmp_path),
            train_dataset=train_dataset(),
            data_collator=collate_fn,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )


# ------------------------------------------------------------------ eval does not advance state
def test_evaluation_batches_never_advance_car_or_drw(tmp_path):
    config = LongTailLossConfig(base="ldam", ccar=True, car_weight=0.5, drw_epoch=1)
    eval_ds = train_dataset((3, 3, 3, 3, 3, 3), seed=1)
    trainer = _trainer(
        tmp_path,
        config,
        max_steps=5,
        learning_rate=0.01,
        eval_strategy="steps",
        eval_steps=2,
        eval_dataset=eval_ds,
    )
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evals][:2] == [2, 4]
    # Five training micro-batches advanced CAR; the 2-batch evaluations in between did not.
    assert int(trainer.loss_fn.regularizer.num_steps) == 5

    before = loss_state(trainer)
    epoch_before = trainer.loss_fn.base_loss.epoch
    metrics = trainer.evaluate()
    after = loss_state(trainer)
    assert math.isfinite(metrics["eval_loss"])
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert trainer.loss_fn.base_loss.epoch == epoch_before

    # The next training step advances it again (eval mode did not stick).
    trainer.args.max_steps = 6
    trainer.train()
    assert int(trainer.loss_fn.regularizer.num_steps) == 5 + 6


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("sampler", ["class_balanced", "random"])
def test_resume_mid_run_is_identical_to_uninterrupted(tmp_path, sampler):
    """36 images / batch 8 = 5 steps per epoch: stop at step 3 (mid-epoch 0), resume to step 8
    (mid-epoch 1), with momentum, warm-up + milestone lr and CE+CCAR+CAR: bit-identical."""
    config = LongTailLossConfig(base="ce", ccar=True, car_weight=0.5)
    common = {
        "max_steps": 8,
        "optim_args": "momentum=0.9",
        "warmup_steps": 2,
        "sampler": sampler,
        "lr_milestones": [1.0],
        "lr_gamma": 0.1,
    }
    full = _trainer(
        tmp_path / "full",
        config,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=None,
        **common,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(checkpoint / LOSS_WEIGHTS_NAME)
    assert int(saved["regularizer.num_steps"]) == 3

    resumed = _trainer(tmp_path / "resumed", config, save_strategy="no", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 8

    weights_full, weights_resumed = model_state(full.model), model_state(resumed.model)
    for key in weights_full:
        torch.testing.assert_close(weights_resumed[key], weights_full[key], rtol=0, atol=0)
    state_full, state_resumed = loss_state(full), loss_state(resumed)
    assert state_full.keys() == state_resumed.keys()
    assert {"regularizer.ema_columns", "regularizer.u", "regularizer.v"} <= state_full.keys()
    for key in state_full:
        torch.testing.assert_close(state_resumed[key], state_full[key], rtol=0, atol=0)
    assert int(resumed.loss_fn.regularizer.num_steps) == 8


def test_resume_restores_loss_state_before_first_resumed_step(tmp_path):
    """The checkpointed CAR state is loaded (not rebuilt) before the first resumed step."""
    config = LongTailLossConfig(base="ce", car_weight=0.5, drw_epoch=1)
    first = _trainer(tmp_path / "a", config, max_steps=3, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = load_file(checkpoint / LOSS_WEIGHTS_NAME)
    assert int(saved["regularizer.num_steps"]) == 3

    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(loss_state(again))

    again = _trainer(tmp_path / "b", config, max_steps=5, callbacks=[Snapshot()])
    assert int(again.loss_fn.regularizer.num_steps) == 0
    again.train(resume_from_checkpoint=str(checkpoint))
    car_keys = {k.removeprefix("regularizer.") for k in saved if k.startswith("regularizer.")}
    assert car_keys == {"ema_columns", "ema_scale", "u", "v", "basis", "basis_image",
                        "basis_image_step", "num_steps"}  # fmt: skip
    car_keys = [f"regularizer.{k}" for k in sorted(car_keys)]
    for key in car_keys:
        assert torch.equal(seen[key], saved[key]), key
    assert int(again.loss_fn.regularizer.num_steps) == 5


def test_checkpoint_and_saved_model_rebuild_the_exact_loss(tmp_path):
    """LongTailLoss.from_pretrained(checkpoint or output_dir) of a real run: same config, counts,
    class names and state, and it continues exactly like the trainer's own loss."""
    from hf_longtail.losses import LongTailLoss

    config = LongTailLossConfig(base="la", ccar=True, car_weight=0.5, drw_epoch=1)
    trainer = _trainer(tmp_path, config, max_steps=4, save_strategy="steps", save_steps=4)
    trainer.train()
    trainer.save_model()
    names = trainer.train_dataset.features["label"].names
    for folder in (tmp_path / "checkpoint-4", tmp_path):
        restored = LongTailLoss.from_pretrained(folder)
        assert restored.config == trainer.loss_config
        assert restored.class_counts == list(COUNTS) and restored.class_names == names
        state = loss_state(trainer)
        assert restored.state_dict().keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(restored.state_dict()[key], value), key
        assert int(restored.regularizer.num_steps) == 4
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(16, len(COUNTS), generator=g), torch.arange(16) % len(COUNTS)
    expected = trainer.loss_fn.cpu().train()(logits, labels)
    assert torch.equal(restored.train()(logits, labels), expected)


def test_resume_still_reads_the_loss_state_of_older_checkpoints(tmp_path):
    """A checkpoint written before save_pretrained (longtail_loss_state.pt) still resumes with its
    CAR state."""
    import json

    from hf_longtail.trainer import LEGACY_LOSS_STATE_NAME

    config = LongTailLossConfig(base="ce", car_weight=0.5)
    first = _trainer(tmp_path / "a", config, max_steps=3, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = load_file(checkpoint / LOSS_WEIGHTS_NAME)
    torch.save(saved, checkpoint / LEGACY_LOSS_STATE_NAME)
    (checkpoint / LOSS_WEIGHTS_NAME).unlink()
    (checkpoint / "longtail_loss.json").unlink()
    again = _trainer(tmp_path / "b", config, max_steps=4)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert int(again.loss_fn.regularizer.num_steps) == 4  # 3 restored + 1
    assert (
        json.loads((checkpoint / "longtail_recipe.json").read_text())["loss"]["car_weight"] == 0.5
    )


def test_resume_reloads_weights_saved_under_legacy_names(tmp_path):
    """transformers v5 saves ViT under its legacy parameter names and Trainer's resume loads
    them non-strictly (upstream bug): LongTailTrainer must still restore every weight."""
    from hf_longtail.models import create_model
    from hf_longtail.trainer import reload_renamed_weights

    vit = tiny_vit()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(1.0)  # differ from the fresh initialisation below
    vit.save_pretrained(tmp_path / "vit")
    fresh = tiny_vit()
    assert reload_renamed_weights(fresh, tmp_path / "vit")
    for key, value in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    resnet = create_model("resnet20_cifar", num_labels=3)
    resnet.save_pretrained(tmp_path / "resnet")
    assert not reload_renamed_weights(resnet, tmp_path / "resnet")  # names match: no reload


def test_load_best_model_at_end_restores_every_weight_of_the_best_checkpoint(tmp_path):
    """Same upstream renaming bug on load_best_model_at_end: the best checkpoint (step 1 here,
    by construction of the metric) must come back whole, not mixed with the last weights."""
    from transformers import ViTForImageClassification

    calls = []

    def compute_metrics(prediction):
        calls.append(1)
        return {"score": 1.0 if len(calls) == 1 else 0.0}

    trainer = _trainer(
        tmp_path,
        LongTailLossConfig(base="ce", car_weight=0.5),
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        eval_dataset=train_dataset((3, 3, 3, 3, 3, 3), seed=1),
    )
    trainer.compute_metrics = compute_metrics
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    best = ViTForImageClassification.from_pretrained(trainer.state.best_model_checkpoint)
    last = ViTForImageClassification.from_pretrained(tmp_path / "checkpoint-3")
    for key, value in best.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert any(not torch.equal(v, last.state_dict()[k]) for k, v in best.state_dict().items())


# ------------------------------------------------------------------ lr milestones
def test_lr_milestones_use_the_real_epoch_length_with_max_steps(tmp_path):
    """5 optimizer steps per epoch; milestone at epoch 1 must hit step 5, whatever max_steps."""
    seen = []

    class LR(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = _trainer(
        tmp_path,
        LongTailLossConfig(),
        max_steps=8,
        warmup_steps=2,
        lr_milestones=[1.0],
        lr_gamma=0.1,
        callbacks=[LR()],
    )
    trainer.train()
    lr = 0.1
    expected = [lr * 0.5, lr, lr, lr, lr, lr * 0.1, lr * 0.1, lr * 0.1]
    assert seen == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ logging
def test_log_history_has_the_loss_parts_averaged_over_the_window(tmp_path):
    config = LongTailLossConfig(base="ce", ccar=True, car_weight=0.5)
    # Head = many-shot (the shared shot-group rule); COUNTS' largest classes are 12 and 8.
    thresholds = {"many": 6, "few": 3}
    trainer = _trainer(
        tmp_path,
        config,
        max_steps=4,
        logging_strategy="steps",
        logging_steps=2,
        shot_thresholds=thresholds,
    )
    assert trainer.loss_fn.head_classes.tolist() == [c > 6 for c in COUNTS]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4]
    for key in (
        "base_loss",
        "ccar_weight_mean",
        "ccar_weight_head",
        "ccar_weight_tail",
        "car_sigma",
    ):
        assert all(math.isfinite(log[key]) for log in logs), key
    # CCAR weights are exp(-f'(omega - p_t)) with f' <= 1: within (e^-1, e^0.25).
    assert all(math.exp(-1) < log["ccar_weight_mean"] < math.exp(0.25) for log in logs)
    assert all(log["car_sigma"] > 0 for log in logs)


def test_logged_base_loss_is_the_window_mean_of_cross_entropy(tmp_path):
    """With lr 0 the weights never change, so the window mean can be recomputed exactly."""
    config = LongTailLossConfig(base="ce", ccar=True, car_weight=0.5)
    trainer = _trainer(
        tmp_path,
        config,
        cls=RecordingTrainer,
        max_steps=4,
        learning_rate=0.0,
        logging_strategy="steps",
        logging_steps=2,
    )
    trainer.train()
    model = trainer.model.eval()
    with torch.no_grad():
        ce = [
            float(F.cross_entropy(model(pixel_values=mb["pixel_values"]).logits, mb["labels"]))
            for mb in trainer.micro_batches
        ]
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[0]["base_loss"] == pytest.approx((ce[0] + ce[1]) / 2, abs=2e-6)
    assert logs[1]["base_loss"] == pytest.approx((ce[2] + ce[3]) / 2, abs=2e-6)


# ------------------------------------------------------------------ DRW by epoch
def _ldam_drw_reference(logits, labels, counts, max_m=0.5, s=30.0, beta=0.9999):
    """Cao et al.'s LDAMLoss with the DRW per-class weights of their training script."""
    n = torch.tensor(counts, dtype=torch.float64)
    m = 1.0 / n.sqrt().sqrt()
    m = (m * (max_m / m.max())).float()
    shifted = logits - F.one_hot(labels, len(counts)).float() * m[labels][:, None]
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    weights = (weights / weights.sum() * len(counts)).float()
    return F.cross_entropy(s * shifted, labels, weight=weights)


def test_drw_switches_on_at_its_epoch(tmp_path):
    config = LongTailLossConfig(base="ldam", drw_epoch=1)
    trainer = _trainer(
        tmp_path, config, cls=RecordingTrainer, num_train_epochs=2, learning_rate=0.01
    )
    trainer.train()
    seen = trainer.drw_seen
    assert len(seen) == 10  # 2 epochs x 5 steps
    assert [active for _, active in seen] == [False] * 5 + [True] * 5
    assert all(epoch < 1 for epoch, _ in seen[:5]) and all(epoch >= 1 for epoch, _ in seen[5:])
    assert trainer.loss_fn.base_loss.epoch == pytest.approx(1.8)  # start of the last step

    # On: the loss of a batch is LDAM with the effective-number class weights (weighted mean).
    logits = torch.randn(12, len(COUNTS)) * 3
    labels = torch.arange(12) % len(COUNTS)
    trainer.loss_fn.eval()
    got = trainer.loss_fn(logits, labels)
    torch.testing.assert_close(got, _ldam_drw_reference(logits, labels, COUNTS))
    trainer.loss_fn.set_epoch(0.0)
    torch.testing.assert_close(
        trainer.loss_fn(logits, labels),
        _ldam_drw_reference(logits, labels, COUNTS, beta=0.0),  # beta 0: all weights 1
    )


def test_progressive_sampler_horizon_follows_max_steps(tmp_path):
    """With max_steps, the progressive schedule spans the epochs the run makes, not the default 3."""
    train = train_dataset()
    n = len(train)
    steps = 4 * math.ceil(n / 4) + 1  # four full epochs and one step of a fifth
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=steps)
    assert args.num_train_epochs != 5
    trainer = LongTailTrainer(
        model=tiny_vit(), args=args, train_dataset=train, sampler="progressive"
    )
    sampler = trainer._get_train_sampler()
    sampler = getattr(sampler, "sampler", sampler)  # unwrap the per-batch re-seeding wrapper
    assert sampler.total_epochs == 5.0
    args.max_steps, args.num_train_epochs = -1, 7
    assert getattr(trainer._get_train_sampler(), "sampler", None).total_epochs == 7.0
