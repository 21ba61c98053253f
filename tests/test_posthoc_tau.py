"""Post-hoc logit adjustment: tau chosen on validation (never test), folded into the classifier
bias so that the saved model, loaded with plain ``from_pretrained`` and argmax, reproduces the
reported accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _helpers_train import COUNTS, image_dataset, load_train_script, tiny_vit, training_args

from hf_longtail.metrics import (
    POSTHOC_TAUS,
    log_prior,
    logit_adjust,
    select_logit_adjustment_tau,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_select_tau_maximises_balanced_accuracy_over_the_grid():
    rng = np.random.default_rng(0)
    counts = np.array([50, 20, 5])
    logits = rng.normal(size=(300, 3)) + 1.5 * np.log(counts / counts.sum())  # head-biased
    labels = logit_adjust(logits, counts, 1.0).argmax(-1)  # what tau = 1 gets exactly right
    tau, scores = select_logit_adjustment_tau(logits, labels, counts)
    assert set(scores) == set(POSTHOC_TAUS) and POSTHOC_TAUS == (
        0,
        0.25,
        0.5,
        0.75,
        1,
        1.25,
        1.5,
        1.75,
        2,
    )
    assert scores[1.0] == 1.0 and tau <= 1.0
    for t, score in scores.items():  # independent reference: sklearn's balanced accuracy
        from sklearn.metrics import balanced_accuracy_score

        pred = logit_adjust(logits, counts, t).argmax(-1)
        assert score == pytest.approx(balanced_accuracy_score(labels, pred))
    assert tau == min(t for t, s in scores.items() if s == max(scores.values()))


def _relabelled(ds, labels):
    from datasets import ClassLabel

    feature = ds.features["label"]
    ds = ds.remove_columns("label").add_column("label", [int(v) for v in labels])
    return ds.cast_column("label", ClassLabel(names=feature.names))


def test_auto_tau_is_chosen_on_validation_and_never_on_test(tmp_path):
    """Validation labels are what tau = 2 predicts and test labels what tau = 0 predicts: a
    selection that looked at test would pick 0."""
    from _helpers_train import eval_transform

    from hf_longtail.data import with_transforms
    from hf_longtail.trainer import LongTailTrainer

    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = image_dataset([20] * len(COUNTS), seed=5)
    with torch.no_grad():
        pixels = torch.stack([eval_transform()(im) for im in images["image"]])
        logits = model(pixel_values=pixels).logits.numpy()
    val_labels = logit_adjust(logits, COUNTS, 2.0).argmax(-1)
    test_labels = logits.argmax(-1)
    assert (val_labels != test_labels).any()  # the two splits prefer different taus
    val = with_transforms(_relabelled(images, val_labels), eval_transform())
    test = with_transforms(_relabelled(images, test_labels), eval_transform())
    trainer = LongTailTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=with_transforms(image_dataset(COUNTS), eval_transform()),
        eval_dataset=test,
        class_counts=list(COUNTS),
    )
    bias_before = model.classifier.bias.detach().clone()
    record = trainer.apply_posthoc_adjustment(
        "auto", val, validation_split="validation", taus=(0.0, 2.0)
    )
    assert record["tau"] == 2.0 and record["selected_on"] == "validation"
    assert record["grid"]["2"] > record["grid"]["0"]
    offsets = torch.as_tensor(-2.0 * log_prior(COUNTS), dtype=torch.float32)
    torch.testing.assert_close(model.classifier.bias.detach(), bias_before + offsets)
    with pytest.raises(ValueError, match="validation_dataset"):
        trainer.apply_posthoc_adjustment("auto")


def test_cosine_classifier_with_posthoc_tau_is_refused_up_front(tmp_path):
    train = load_train_script()
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="--classifier cosine has no bias"):
        train.main(
            ["--model_name_or_path", "resnet20_cifar", "--classifier", "cosine", "--loss", "ldam",
             "--posthoc_tau", "1", "--output_dir", str(out), "--use_cpu", "true"]
        )  # fmt: skip
    assert not out.exists()


@pytest.fixture(scope="module")
def baked_run(tmp_path_factory):
    train = load_train_script()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("posthoc") / "run"
    results = train.main(
        [
            "--dataset_name", "digits", "--imbalance_factor", "10", "--image_size", "16",
            "--many_shot_threshold", "60", "--model_name_or_path", "resnet20_cifar",
            "--train_transform", "cifar10", "--output_dir", str(out),
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
            "--save_strategy", "steps", "--save_steps", "16", "--eval_strategy", "no",
            "--logging_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--learning_rate", "0.002",
            "--max_steps", "16",
            "--posthoc_tau", "1.5",
        ]
    )  # fmt: skip
    return out, results


_RELOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import hf_longtail  # registers the CIFAR ResNets with the Auto classes
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from hf_longtail.data import load_long_tailed

    torch.set_num_threads(1)
    out, save_to, model_dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    processor = AutoImageProcessor.from_pretrained(out)
    test = load_long_tailed("digits", imbalance_factor=10)["test"]
    inputs = processor([im.convert("RGB") for im in test["image"]], return_tensors="pt")
    accuracies = []
    for i, model_dir in enumerate(model_dirs):
        model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            logits = model(**inputs).logits.numpy()
        np.save(f"{save_to}{i}.npy", logits)
        accuracies.append(float((logits.argmax(-1) == np.asarray(test["label"])).mean()))
    print(json.dumps(accuracies))
    """
)


@pytest.mark.slow
def test_baked_tau_reproduces_the_recorded_accuracy_after_a_fresh_load(baked_run, tmp_path):
    from huggingface_hub import ModelCard

    from hf_longtail.hub import card_metrics

    out, results = baked_run
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["posthoc"]["tau"] == 1.5 and run["posthoc"]["selected_on"] is None
    assert run["posthoc"]["folded_into"] == "classifier bias"
    card_text = (out / "README.md").read_text()
    assert "Post-hoc logit adjustment is part of this model" in card_text and "τ = 1.5" in card_text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(out), str(tmp_path / "logits"), str(out),
         str(out / "checkpoint-16")],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    reloaded, trained = json.loads(done.stdout.strip().splitlines()[-1])
    logits, raw = np.load(tmp_path / "logits0.npy"), np.load(tmp_path / "logits1.npy")
    card_accuracy = card_metrics(ModelCard.load(out / "README.md"))["accuracy"]
    n = run["dataset"]["eval_size"]
    assert reloaded == pytest.approx(results["test_accuracy"], abs=1.5 / n)
    assert card_accuracy == pytest.approx(reloaded, abs=1.5 / n)
    # The last checkpoint holds the trained model before the fold: the saved model's logits are
    # exactly its logits - 1.5 log(prior), and the adjustment changes the accuracy.
    counts = run["dataset"]["class_counts"]
    np.testing.assert_allclose(logits, logit_adjust(raw, counts, 1.5), atol=1e-4)
    assert abs(trained - reloaded) > 2 / n


def _builders():
    from hf_longtail.models import create_model

    return {
        "transformers_vit": lambda: tiny_vit(),
        "timm_wrapper": lambda: create_model(
            "timm/test_efficientnet", num_labels=len(COUNTS), pretrained=False
        ),
        "resnet_cifar": lambda: create_model("resnet20_cifar", num_labels=len(COUNTS)),
    }


@pytest.mark.parametrize("kind", ["transformers_vit", "timm_wrapper", "resnet_cifar"])
def test_folded_adjustment_survives_save_and_from_pretrained(kind, tmp_path):
    """The fold gives exactly logits - tau * log(prior), and a fresh ``from_pretrained`` of the
    saved model (transformers, timm through TimmWrapper, the CIFAR ResNet) gives the same."""
    from transformers import AutoModelForImageClassification

    from hf_longtail.features import fold_logit_adjustment

    torch.manual_seed(0)
    model = _builders()[kind]().eval()
    size = 8 if kind == "transformers_vit" else 32
    pixels = torch.randn(5, 3, size, size)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits.numpy()
    fold_logit_adjustment(model, COUNTS, 0.75)
    with torch.no_grad():
        after = model(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(after, logit_adjust(before, COUNTS, 0.75), atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(pixel_values=pixels).logits.numpy(), after, atol=1e-5)


def test_a_head_without_bias_is_refused():
    from hf_longtail.features import fold_logit_adjustment

    model = tiny_vit()
    model.classifier = torch.nn.Linear(16, len(COUNTS), bias=False)
    with pytest.raises(ValueError, match="no bias"):
        fold_logit_adjustment(model, COUNTS, 1.0)
    from hf_longtail.models import create_model

    cosine = create_model("resnet20_cifar", num_labels=len(COUNTS), normed_linear=True)
    with pytest.raises(TypeError, match="cosine classifier has no bias"):
        fold_logit_adjustment(cosine, COUNTS, 1.0)
