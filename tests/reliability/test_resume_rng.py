"""A mid-epoch resume reproduces random augmentation, mixup and CPU dropout exactly.

``transformers.Trainer`` resumes mid-epoch by skipping the first batches without loading them and
restores the checkpoint's RNG state only after prefetching the next ones; with a plain global RNG
every later augmentation is drawn differently. ``LongTailTrainer`` re-seeds the host RNGs before
each batch (``BatchSeededSampler``), which these in-process runs check with torch (random crop,
flip, dropout) and NumPy (timm mixup) randomness together.
"""

from __future__ import annotations

import pytest
import torch
from _reliability_helpers import image_dataset, model_state, training_args
from torchvision.transforms import v2

from hf_longtail import LongTailTrainer
from hf_longtail.data import MixupCollator, with_transforms
from hf_longtail.losses import LongTailLossConfig


def _augmenting_dataset():
    augment = v2.Compose(
        [
            v2.RandomCrop(8, padding=2),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    return with_transforms(image_dataset(), augment)


def _dropout_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
        num_labels=6,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def _trainer(output_dir, **overrides):
    return LongTailTrainer(
        model=_dropout_vit(),
        args=training_args(
            output_dir, max_steps=10, optim="sgd", optim_args="momentum=0.9", **overrides
        ),
        train_dataset=_augmenting_dataset(),
        data_collator=MixupCollator(num_classes=6, mixup_alpha=0.4, cutmix_alpha=0.0),
        loss_config=LongTailLossConfig(base="ce", ccar=True, car_weight=0.5),
        sampler="class_balanced",
    )


@pytest.mark.parametrize("stop", [3, 6, 8])  # mid-epoch 0, the epoch boundary, mid-epoch 1
def test_mid_epoch_resume_with_augmentation_mixup_and_dropout_is_exact(tmp_path, stop):
    full = _trainer(tmp_path / "full", save_strategy="steps", save_steps=stop)
    full.train()
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop}"))
    assert resumed.state.global_step == full.state.global_step == 10
    expected, actual = model_state(full.model), model_state(resumed.model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    for key, value in full.loss_fn.state_dict().items():
        torch.testing.assert_close(resumed.loss_fn.state_dict()[key], value, rtol=0, atol=1e-6)
    losses = [h["loss"] for h in full.state.log_history if "loss" in h][stop:]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h][-len(losses) :]
    assert resumed_losses == pytest.approx(losses, abs=1e-6)


def test_without_reseeding_the_resume_would_differ(tmp_path, monkeypatch):
    """The property above is not vacuous: with the parent's sampler and RNG handling (the
    re-seeding wrapper removed) the same resume ends elsewhere."""
    from transformers import Trainer

    def plain_sampler(self, train_dataset=None):
        from hf_longtail.data.samplers import build_class_aware_sampler

        return build_class_aware_sampler(
            self.train_dataset, "class_balanced", seed=self.args.seed, num_replicas=1, rank=0
        )

    monkeypatch.setattr(LongTailTrainer, "_get_train_sampler", plain_sampler)
    monkeypatch.setattr(LongTailTrainer, "_load_rng_state", Trainer._load_rng_state)
    full = _trainer(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    expected, actual = model_state(full.model), model_state(resumed.model)
    assert max((actual[k] - expected[k]).abs().max() for k in expected) > 1e-3
