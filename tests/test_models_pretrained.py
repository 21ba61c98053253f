"""The bundled CIFAR-10 ResNet-32 backbone loads through the real from_pretrained path."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import hf_longtail.models as models

BACKBONE = Path(models.__file__).parent / "pretrained" / "resnet32_cifar10"


def test_backbone_loads_with_a_new_head_for_the_downstream_classes():
    names = [f"digit {i}" for i in range(7)]
    model = models.create_model(str(BACKBONE), num_labels=7, id2label=names)
    saved = load_file(BACKBONE / "model.safetensors")
    assert not any(k.startswith("classifier.") for k in saved)  # head stripped on purpose
    state = model.state_dict()
    for key, value in saved.items():  # every backbone tensor is the shipped one
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert model.classifier.weight.shape == (7, 64)
    assert model.config.id2label[3] == "digit 3"
    logits = model.eval()(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_backbone_features_are_not_random():
    # A pretrained backbone separates CIFAR-like inputs far better than chance would; here the
    # cheap proxy: its BatchNorm running statistics were trained (not the init values 0 / 1).
    saved = load_file(BACKBONE / "model.safetensors")
    means = [v for k, v in saved.items() if k.endswith("running_mean")]
    assert len(means) == 31 and all(m.abs().sum() > 0 for m in means)
