"""Frozen backbones and the on-disk feature cache (tiny models; no real weights needed)."""

from __future__ import annotations

import pytest
import torch
from _helpers_train import COUNTS, eval_transform, image_dataset, tiny_vit, training_args

from hf_longtail.features import (
    cached_features,
    compute_features,
    feature_cache_key,
    find_classifier,
    freeze_backbone,
)


def _resnet(num_labels: int = len(COUNTS)):
    from hf_longtail.models import create_model

    torch.manual_seed(0)
    return create_model("resnet20_cifar", num_labels=num_labels, num_blocks=[1, 1, 1])


def _timm():
    from hf_longtail.models import create_model

    torch.manual_seed(0)
    return create_model("timm/test_efficientnet", num_labels=len(COUNTS), pretrained=False)


@pytest.mark.parametrize("build", [tiny_vit, _resnet, _timm], ids=["vit", "resnet_cifar", "timm"])
def test_features_are_the_heads_input(build):
    """head(features) reproduces the full model's logits on the same images (eval mode)."""
    model = build().eval()
    ds = image_dataset()
    tf = eval_transform()
    feats = compute_features(model, ds, tf, progress=False)
    assert feats.column_names == ["features", "labels"] and len(feats) == len(ds)
    batch = feats[:]
    _, head = find_classifier(model)
    pixels = torch.stack([tf(im.convert("RGB")) for im in ds["image"]])
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        got = head(batch["features"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert batch["labels"].tolist() == list(ds["label"])


def test_freeze_backbone_trains_only_the_head_and_pins_frozen_modules_to_eval():
    model = _timm()
    trainable = freeze_backbone(model)
    assert trainable == ["timm_model.classifier.weight", "timm_model.classifier.bias"]
    model.train()
    bn = model.timm_model.bn1
    assert not bn.training and model.training and model.timm_model.classifier.training
    stats = bn.running_mean.clone()
    model(pixel_values=torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, stats)  # BatchNorm statistics stay frozen


def test_train_last_stage_unfreezes_exactly_the_last_stage():
    model = _timm()
    trainable = freeze_backbone(model, train_last_stage=True)
    blocks = len(model.timm_model.blocks) - 1
    assert all(
        n.startswith((f"timm_model.blocks.{blocks}.", "timm_model.conv_head", "timm_model.bn2"))
        or n.startswith("timm_model.classifier")
        for n in trainable
    )
    assert any(n.startswith(f"timm_model.blocks.{blocks}.") for n in trainable)
    assert not any(n.startswith(f"timm_model.blocks.{blocks - 1}.") for n in trainable)
    model.train()  # the trainable last stage trains (BatchNorm in batch mode), the rest does not
    assert model.timm_model.blocks[blocks].training and model.timm_model.bn2.training
    assert not model.timm_model.blocks[0].training and not model.timm_model.bn1.training
    vit = tiny_vit()
    names = freeze_backbone(vit, train_last_stage=True)
    # transformers 5 names ViT's block list `vit.layers` (4.x: `vit.encoder.layer`).
    last_block = [n for n in names if ".0.attention." in n]
    assert last_block and all(".layer" in n for n in last_block)
    assert "vit.layernorm.weight" in names and "vit.embeddings.cls_token" not in names
    # The one-block ViT: its only block is the last stage, so only the embeddings stay frozen.
    frozen = [n for n, p in vit.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("vit.embeddings.") for n in frozen)


def test_cache_key_follows_weights_transform_and_rows():
    from torchvision.transforms import v2

    model, ds, tf = tiny_vit(), image_dataset(), eval_transform()
    key = feature_cache_key(model, tf, ds, "image", "label")
    assert key == feature_cache_key(tiny_vit(), eval_transform(), image_dataset(), "image", "label")
    # The head does not matter (a re-trained head reuses the features) ...
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert feature_cache_key(model, tf, ds, "image", "label") == key
    # ... every backbone weight, the transform and the rows do.
    other = tiny_vit()
    name = next(n for n, _ in other.named_parameters() if n.endswith("fc2.bias"))
    with torch.no_grad():
        other.get_parameter(name)[0] += 1e-3
    assert feature_cache_key(other, tf, ds, "image", "label") != key
    resized = v2.Compose([v2.Resize(6), *eval_transform().transforms])
    assert feature_cache_key(model, resized, ds, "image", "label") != key
    assert feature_cache_key(model, tf, ds.select(range(35)), "image", "label") != key
    assert feature_cache_key(model, tf, image_dataset(seed=1), "image", "label") != key


def test_second_call_reads_the_cache_without_running_the_model(tmp_path, monkeypatch):
    import hf_longtail.features as features

    model, ds, tf = tiny_vit(), image_dataset(), eval_transform()
    first = cached_features(model, ds, tf, cache_dir=tmp_path, split="train", progress=False)
    assert '"cache_hit": false' in first.info.description

    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features, "compute_features", boom)
    second = cached_features(tiny_vit(), ds, tf, cache_dir=tmp_path, split="train")
    assert '"cache_hit": true' in second.info.description
    assert torch.equal(first[:]["features"], second[:]["features"])
    assert len(list(tmp_path.iterdir())) == 1  # one entry, no temporary leftovers


def test_trainer_on_cached_features_changes_only_the_head_and_saves_the_full_model(tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_longtail import LongTailTrainer

    model, ds, tf = tiny_vit(), image_dataset(), eval_transform()
    freeze_backbone(model)
    feats = cached_features(model, ds, tf, cache_dir=tmp_path / "cache", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(tmp_path / "run", num_train_epochs=30, remove_unused_columns=True)
    trainer = LongTailTrainer(
        model=model,
        args=args,
        train_dataset=feats,
        eval_dataset=feats,
        loss_config={"base": "la", "ccar": True, "car_weight": 0.5},
        sampler="class_balanced",
    )
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    prediction = trainer.predict(feats)
    assert prediction.predictions.shape == (len(ds), len(COUNTS))
    trainer.save_model()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run").eval()
    pixels = torch.stack([tf(im) for im in ds["image"]])
    with torch.no_grad():
        logits = reloaded(pixel_values=pixels).logits.numpy()
    torch.testing.assert_close(
        torch.as_tensor(logits), torch.as_tensor(prediction.predictions), rtol=1e-4, atol=1e-5
    )
