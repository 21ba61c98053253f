"""The decoupled second stage (cRT, tau-norm, LWS): formulas, validation split, run directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_train import digits_resnet_argv, load_train_script
from torch import nn

from hf_longtail.decoupled import (
    LearnableWeightScaling,
    select_tau,
    tau_normalize,
    validation_split,
)

REPO = Path(__file__).resolve().parents[1]


class _Head(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)


def test_tau_normalize_matches_the_formula():
    torch.manual_seed(0)
    w, b = torch.randn(5, 8) * torch.arange(1, 6)[:, None], torch.randn(5)
    for tau in (0.0, 0.5, 1.0, 1.7):
        model = _Head(w, b)
        tau_normalize(model, tau)
        expected = torch.stack([w[j] / w[j].norm() ** tau for j in range(5)])
        torch.testing.assert_close(model.classifier.weight, expected)
        assert torch.equal(model.classifier.bias, torch.zeros(5))  # x . w_j, no bias
    model = _Head(w, b)
    tau_normalize(model, 1.0)
    torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(model, -0.5)


def test_select_tau_uses_the_validation_features_only():
    """Class 0's vector is 4x longer: raw logits favour it; unit norms (tau=1) are exact here."""
    from datasets import ClassLabel, Dataset, Features, List, Value

    w = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    model = _Head(w, torch.zeros(2))
    x = torch.tensor([[1.0, 0.9], [0.9, 1.0], [1.0, 0.1], [0.1, 1.0]])
    y = [0, 1, 0, 1]
    feats = Dataset.from_dict(
        {"features": x.numpy(), "labels": y},
        features=Features({"features": List(Value("float32"), length=2), "labels": ClassLabel(2)}),
    ).with_format("torch")
    best, scores = select_tau(model, feats, taus=[0.0, 0.5, 1.0])
    assert scores[0.0] == 0.75 and scores[1.0] == 1.0 and best == 1.0
    assert torch.equal(model.classifier.weight, w)  # the model itself is untouched


def test_lws_folding_gives_identical_logits():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    lws = LearnableWeightScaling(linear)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    x = torch.randn(10, 6)
    torch.testing.assert_close(lws.folded()(x), lws(x))
    assert not any(p.requires_grad for p in lws.linear.parameters())
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]


def test_validation_hold_out_is_balanced_and_disjoint_from_train_and_test():
    from hf_longtail.data import load_long_tailed

    dd = load_long_tailed("digits", imbalance_factor=10)
    record = {
        "dataset": {
            "name": "digits",
            "imbalance_factor": 10,
            "profile": "exp",
            "seed": 0,
            "image_column": "image",
            "label_column": "label",
            "eval_split": "test",
            "class_counts": np.bincount(dd["train"]["label"], minlength=10).tolist(),
        }
    }
    splits = validation_split(record, per_class=15)
    assert "held out" in splits.validation_source
    val_labels = np.asarray(splits.validation["label"])
    # Class 0 is capped at all of its 125 training images (IF 10 asks for 128): nothing is left
    # to hold out, which the description says; every other class gives 15.
    assert record["dataset"]["class_counts"][0] == 125
    assert np.bincount(val_labels, minlength=10).tolist() == [0] + [15] * 9
    assert "no held-out image of class(es) 0" in splits.validation_source

    def keys(ds):
        return {im.tobytes() + bytes([y]) for im, y in zip(ds["image"], ds["label"])}

    val = keys(splits.validation)
    assert not val & keys(splits.train) and not val & keys(splits.test)
    assert len(val) == 135
    with pytest.raises(ValueError, match="class counts"):
        bad = json.loads(json.dumps(record))
        bad["dataset"]["class_counts"][0] += 1
        validation_split(bad)


# ---------------------------------------------------------------------- through train.py
@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


def _argv(out, cache, *extra):
    return digits_resnet_argv(out, "--feature_cache_dir", str(cache), *extra)


@pytest.fixture(scope="module")
def first_stage(train_script, tmp_path_factory):
    """A real (short) first-stage run: ResNet-20 from scratch on long-tailed digits."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage")
    out = root / "first"
    train_script.main(_argv(out, root / "cache", "--num_train_epochs", "3"))
    return out, root


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["crt", "tau_norm", "lws", "posthoc_la"])
def test_each_stage_writes_a_run_directory_with_its_card(train_script, first_stage, stage):
    from transformers import AutoModelForImageClassification

    import hf_longtail.models  # noqa: F401 -- registers resnet_cifar with the Auto classes

    source, root = first_stage
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    out = root / stage
    results = train_script.main(
        _argv(
            out,
            root / "cache",
            "--stage",
            stage,
            "--from_run",
            str(source),
            "--num_train_epochs",
            "20",
        )
    )
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    for name in ("config.json", "model.safetensors", "all_results.json", "longtail_run.json",
                 "per_class_accuracy.png", "confusion_matrix.png", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["stage"]["name"] == stage and run["stage"]["from_run"] == str(source)
    card = (out / "README.md").read_text()
    if stage == "posthoc_la":
        assert "Second stage: post-hoc logit adjustment" in card and "Menon et al." in card
        assert "- posthoc-la" in card and "Kang et al." not in card
    else:
        assert "Decoupled second stage" in card and "Kang et al." in card
        assert f"decoupled-{stage.replace('_', '-')}" in card
    assert 0.0 <= results["test_accuracy"] <= 1.0
    # The saved model is a normal model whose logits reproduce the reported accuracy.
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    first = AutoModelForImageClassification.from_pretrained(source).eval()
    same_backbone = [
        torch.equal(a, b)
        for (n, a), b in zip(model.state_dict().items(), first.state_dict().values())
        if not n.startswith("classifier.")
    ]
    assert all(same_backbone)
    if stage == "tau_norm":
        tau = run["stage"]["tau"]
        assert "held out" in run["stage"]["tau_selected_on"]
        assert f"τ = {tau:g}" in card
        expected = (
            first.classifier.weight / first.classifier.weight.norm(dim=1, keepdim=True) ** tau
        )
        torch.testing.assert_close(model.classifier.weight, expected)
    if stage == "lws":
        scales = torch.tensor(run["stage"]["scales"])
        torch.testing.assert_close(
            model.classifier.weight, first.classifier.weight * scales[:, None]
        )
    if stage == "crt":
        assert not torch.allclose(model.classifier.weight, first.classifier.weight)
    if stage == "posthoc_la":
        tau, grid = run["stage"]["tau"], run["stage"]["tau_grid_scores"]
        assert "held out" in run["stage"]["tau_selected_on"] and f"τ = {tau:g}" in card
        assert grid[f"{tau:g}"] == max(grid.values())  # the validation-best tau
        assert all(float(t) >= tau for t, v in grid.items() if v == grid[f"{tau:g}"])
        counts = torch.tensor(run["dataset"]["class_counts"], dtype=torch.float64)
        prior = (counts / counts.sum()).log()
        torch.testing.assert_close(model.classifier.weight, first.classifier.weight)
        torch.testing.assert_close(
            model.classifier.bias.double(), first.classifier.bias.double() - tau * prior
        )


def test_posthoc_stage_refuses_an_already_adjusted_run_before_extracting(
    train_script, first_stage, tmp_path
):
    """A source run whose head already carries a post-hoc bias would be adjusted twice: the
    stage stops before any feature is extracted (the cache directory stays unmade)."""
    import shutil

    source, _ = first_stage
    adjusted = tmp_path / "adjusted"
    shutil.copytree(source, adjusted)
    record = json.loads((adjusted / "longtail_run.json").read_text())
    record["posthoc"] = {"tau": 1.0, "selected_on": None, "folded_into": "classifier bias"}
    (adjusted / "longtail_run.json").write_text(json.dumps(record))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"already logit-adjusted.*tau = 1\.0"):
        train_script.main(
            _argv(tmp_path / "out", cache, "--stage", "posthoc_la", "--from_run", str(adjusted))
        )
    assert not cache.exists() and not (tmp_path / "out" / "longtail_run.json").exists()


def test_stage_refuses_an_existing_run_and_bad_options(train_script, first_stage):
    source, root = first_stage
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_script.main(
            _argv(source, root / "cache", "--stage", "crt", "--from_run", str(source))
        )
    with pytest.raises(ValueError, match="--stage 'xyz' is not valid"):
        train_script.main(_argv(root / "x", root / "cache", "--stage", "xyz", "--from_run", "y"))
    with pytest.raises(ValueError, match="needs --from_run"):
        train_script.main(_argv(root / "x", root / "cache", "--stage", "lws"))


@pytest.mark.slow
def test_freeze_backbone_through_train_py_reuses_the_cache(train_script, first_stage, caplog):
    import logging

    _, root = first_stage
    caplog.set_level(logging.INFO, logger="hf_longtail.features")
    runs = []
    for i in range(2):
        out = root / f"frozen{i}"
        argv = _argv(out, root / "fcache", "--freeze_backbone", "true", "--num_train_epochs", "5")
        runs.append(train_script.main(argv))
        assert (out / "README.md").is_file()
        run = json.loads((out / "longtail_run.json").read_text())
        assert run["freeze_backbone"]["feature_cache"] is True
    text = caplog.text
    assert text.count("Cached ") == 2 and text.count("Feature cache hit") == 2  # train + test
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]


def test_train_last_stage_through_train_py_changes_only_that_stage_and_the_head(
    train_script, tmp_path
):
    """ResNet-20 on digits with --freeze_backbone --train_last_stage: every tensor of the stem and
    the first two stages -- BatchNorm running statistics included -- is exactly as initialised."""
    from transformers import AutoModelForImageClassification, set_seed

    from hf_longtail.models import create_model

    out = tmp_path / "last"
    argv = _argv(out, tmp_path / "cache", "--freeze_backbone", "true", "--train_last_stage",
                 "true", "--max_steps", "3", "--seed", "0")  # fmt: skip
    train_script.main(argv)
    set_seed(0)  # train.py seeds --seed (0) before building the model
    initial = create_model("resnet20_cifar", num_labels=10, id2label=[str(i) for i in range(10)])
    trained = AutoModelForImageClassification.from_pretrained(out)
    before, after = initial.state_dict(), trained.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(("resnet.stages.2.", "classifier.")) for n in changed)
    assert any(n.startswith("resnet.stages.2.") for n in changed)
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["freeze_backbone"]["train_last_stage"] is True
    assert run["freeze_backbone"]["feature_cache"] is False


def test_posthoc_stage_refuses_a_head_it_cannot_fold_into():
    """The stage checks the head with the fold's own checks (no bias, a cosine head) and says
    which stages fit instead; a foldable head passes untouched."""
    from hf_longtail.decoupled import _check_posthoc_source
    from hf_longtail.models.resnet_cifar import NormedLinear

    record = {"dataset": {"class_counts": [50, 20, 5]}}
    no_bias = nn.Sequential()
    no_bias.classifier = nn.Linear(4, 3, bias=False)
    with pytest.raises(
        ValueError, match=r"cannot adjust --from_run run: .*'classifier' has no bias"
    ):
        _check_posthoc_source(no_bias, record, "run")
    cosine = nn.Sequential()
    cosine.classifier = NormedLinear(4, 3)
    with pytest.raises(ValueError, match=r"cosine classifier has no bias.*--stage crt or tau_norm"):
        _check_posthoc_source(cosine, record, "run")
    fine = nn.Sequential()
    fine.classifier = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    _check_posthoc_source(fine, record, "run")
    assert all(torch.equal(v, fine.state_dict()[k]) for k, v in before.items())
