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
from _reliability_helpers import image_dataset, model_state, tiny_vit, training_args
from torchvision.transforms import v2

from hf_longtail import LongTailTrainer
from hf_longtail.data import MixupCollator, with_transforms
from hf_longtail.losses import LongTailLossConfig


def _augmenting_dataset(resized_crop: bool = False):
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(8, scale=(0.3, 1.0))
            if resized_crop
            else v2.RandomCrop(8, padding=2),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    return with_transforms(image_dataset(), augment)


def _dropout_vit():
    return tiny_vit(num_labels=6, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1)


def _trainer(
    output_dir, pixel_cache="auto", collator=None, resized_crop=False, model=None, **overrides
):
    trainer = LongTailTrainer(
        model=model or _dropout_vit(),
        args=training_args(
            output_dir, max_steps=10, optim="sgd", optim_args="momentum=0.9", **overrides
        ),
        train_dataset=_augmenting_dataset(resized_crop),
        data_collator=collator or MixupCollator(num_classes=6, mixup_alpha=0.4, cutmix_alpha=0.0),
        loss_config=LongTailLossConfig(base="ce", ccar=True, car_weight=0.5),
        sampler="class_balanced",
        pixel_cache=pixel_cache,
    )
    fast = type(trainer.get_train_dataloader().dataset).__name__ == "PixelStoreDataset"
    assert fast == (pixel_cache != "off")  # the path under test is the one taken
    return trainer


@pytest.mark.parametrize("pixel_cache", ["off", "on"])  # streaming PIL path, fast path
@pytest.mark.parametrize("stop", [3, 6, 8])  # mid-epoch 0, the epoch boundary, mid-epoch 1
def test_mid_epoch_resume_with_augmentation_mixup_and_dropout_is_exact(tmp_path, stop, pixel_cache):
    full = _trainer(tmp_path / "full", pixel_cache, save_strategy="steps", save_steps=stop)
    full.train()
    resumed = _trainer(tmp_path / "resumed", pixel_cache)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop}"))
    _assert_same_end(full, resumed, stop)


@pytest.mark.parametrize("pixel_cache", ["on", "off"])
def test_fast_path_resume_with_workers_is_exact(tmp_path, pixel_cache):
    """Random-resized crops (a per-sample resize: the fast path keeps DataLoader workers) and
    flips; the uninterrupted run reads with 0 workers, the resumed one with 2. On the fast path
    the batch seeds travel with the indices, so the resumed run ends exactly where the
    uninterrupted one did; the streaming path (workers seeded per iterator) ends elsewhere.
    (No dropout and no mixup here: those draw from the main process's RNGs, which the sampler
    re-seeds ahead of time when workers prefetch.)"""

    from hf_longtail.data import collate_fn

    common = {"collator": collate_fn, "resized_crop": True, "pixel_cache": pixel_cache}
    full = _trainer(
        tmp_path / "full", save_strategy="steps", save_steps=3, model=tiny_vit(6), **common
    )
    assert full.get_train_dataloader().num_workers == 0
    full.train()
    resumed = _trainer(tmp_path / "resumed", dataloader_num_workers=2, model=tiny_vit(6), **common)
    assert resumed.get_train_dataloader().num_workers == 2
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    if pixel_cache == "on":
        _assert_same_end(full, resumed, 3)
    else:
        expected, actual = model_state(full.model), model_state(resumed.model)
        assert max((actual[k] - expected[k]).abs().max() for k in expected) > 1e-4


def _assert_same_end(full, resumed, stop):
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
