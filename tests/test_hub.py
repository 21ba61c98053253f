"""hf_longtail.hub: long-tail model cards, pushing a run directory, the CLI.

Everything runs offline: the run directory is synthesized (a tiny ViT saved with
save_pretrained, schema-correct all_results.json / longtail_run.json, tiny PNGs), and the Hub
client is a recording fake or the real HfApi under HF_HUB_OFFLINE=1 (which fails fast).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers_train import table_row, tiny_vit
from huggingface_hub import ModelCard

from hf_longtail.hub import (
    OutputDirError,
    PushToHubError,
    build_model_card,
    card_metrics,
    class_count_summary,
    files_to_push,
    push_long_tail_model,
    read_run_dir,
    write_model_card,
)
from hf_longtail.hub.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"digit {i}" for i in range(10)]
# exp profile, n_max = 150, IF = 10: 2 many-shot (> 100), 6 medium, 2 few-shot (< 20) classes.
COUNTS = [int(150 * (1 / 10) ** (i / 9)) for i in range(10)]
PER_CLASS = [0.98, 0.96, 0.95, 0.90, 0.88, 0.85, 0.80, 0.75, 0.60, 0.55]
METRIC_TYPES = {
    "accuracy": "accuracy",
    "many_shot_accuracy": "many_shot_accuracy",
    "medium_shot_accuracy": "medium_shot_accuracy",
    "few_shot_accuracy": "few_shot_accuracy",
    "worst_class_accuracy": "worst_class_accuracy",
    "balanced_accuracy": "balanced_accuracy",
    "macro_f1": "f1",
    "confusion_spectral_norm": "confusion_spectral_norm",
    "ece": "ece",
}
LABELS = {
    "accuracy": "Top-1 accuracy",
    "many_shot_accuracy": "Many-shot accuracy",
    "medium_shot_accuracy": "Medium-shot accuracy",
    "few_shot_accuracy": "Few-shot accuracy",
    "worst_class_accuracy": "Worst-class accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "confusion_spectral_norm": "Confusion spectral norm",
    "ece": "Expected calibration error",
}


def _groups(counts, many=100, few=20):
    return ["many" if c > many else "few" if c < few else "medium" for c in counts]


def _results() -> dict:
    acc = np.array(PER_CLASS)
    groups = np.array(_groups(COUNTS))
    return {
        "test_accuracy": 0.8213,
        "test_many_shot_accuracy": float(acc[groups == "many"].mean()),
        "test_medium_shot_accuracy": float(acc[groups == "medium"].mean()),
        "test_few_shot_accuracy": float(acc[groups == "few"].mean()),
        "test_worst_class_accuracy": float(acc.min()),
        "test_worst_class": int(acc.argmin()),
        "test_worst_class_name": NAMES[int(acc.argmin())],
        "test_balanced_accuracy": float(acc.mean()),
        "test_macro_f1": 0.8071,
        "test_ece": 0.0412,
        "test_confusion_spectral_norm": 0.3127,
        "test_num_samples": 150,
        "test_num_many": 2,
        "test_per_class_accuracy": PER_CLASS,
        "test_confusion_matrix": np.eye(10, dtype=int).tolist(),
        "test_loss": 0.61,
        "test_runtime": 1.25,
        "train_loss": 0.5,
        "epoch": 3.0,
        "peak_rss_mb": 900.0,
    }


def _run_info() -> dict:
    return {
        "hf_longtail_version": "0.1.0",
        "model_name_or_path": "google/vit-base-patch16-224-in21k",
        "dataset": {
            "name": "digits",
            "imbalance_factor": 10,
            "profile": "exp",
            "seed": 0,
            "class_counts": COUNTS,
            "class_names": NAMES,
            "image_column": "image",
            "label_column": "label",
            "train_size": sum(COUNTS),
            "eval_split": "test",
        },
        "loss": {
            "base": "ce",
            "label_smoothing": 0.0,
            "focal_gamma": 2.0,
            "ccar": True,
            "ccar_omega": 0.75,
            "ccar_variant": "paper",
            "ccar_detach_weight": False,
            "car_weight": 0.5,
            "car_beta": 0.5,
            "car_r0": 0.2,
            "car_tau": 1.0,
            "drw_epoch": None,
        },
        "training": {
            "learning_rate": 0.0005,
            "num_train_epochs": 3,
            "per_device_train_batch_size": 32,
            "lr_scheduler_type": "cosine",
            "seed": 0,
        },
        "metric_thresholds": {"many": 100, "few": 20},
    }


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A finished run directory, built once: tiny ViT + processor + JSONs + plots + clutter."""
    from PIL import Image
    from transformers import ViTImageProcessor

    out = tmp_path_factory.mktemp("run") / "digits-ccar-car"
    out.mkdir()
    tiny_vit(
        num_labels=10,
        hidden_size=8,
        intermediate_size=16,
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
    ).save_pretrained(out)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(out)
    (out / "all_results.json").write_text(json.dumps(_results(), indent=2))
    (out / "longtail_run.json").write_text(json.dumps(_run_info(), indent=2))
    rng = np.random.default_rng(0)
    for name in ("per_class_accuracy.png", "confusion_matrix.png"):
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(out / name)
    # What a Trainer run also leaves behind, none of which may be uploaded.
    for sub in ("checkpoint-5", "checkpoint-10"):
        (out / sub).mkdir()
        for f in ("config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"):
            (out / sub / f).write_bytes(b"checkpoint state")
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1").write_bytes(b"tb")
    for f in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (out / f).write_bytes(b"state")
    (out / "trainer_state.json").write_text("{}")
    return out


@pytest.fixture
def run_dir(run_template, tmp_path) -> Path:
    dst = tmp_path / run_template.name
    shutil.copytree(run_template, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class FakeCommitInfo:
    def __init__(self, url: str) -> None:
        self.commit_url = url


class FakeRepoUrl:
    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id


class FakeApi:
    """Records the HfApi calls the push makes; optionally raises at one of them."""

    def __init__(self, fail_at: str | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail_at, self.error = fail_at, error
        self.token = "hf_fake"

    def _record(self, name: str, kwargs: dict) -> None:
        self.calls.append((name, kwargs))
        if name == self.fail_at:
            raise self.error

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", {"repo_id": repo_id, **kwargs})
        return FakeRepoUrl(repo_id)

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", {"repo_id": repo_id, **kwargs})

    def create_commit(self, **kwargs):
        # Snapshot what would be sent now (the card's temporary copy is gone after the call).
        operations = kwargs["operations"]
        kwargs["would_upload"] = sorted(op.path_in_repo for op in operations)
        kwargs["sources"] = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        kwargs["card"] = kwargs["sources"]["README.md"].read_text(encoding="utf-8")
        self._record("create_commit", kwargs)
        return FakeCommitInfo(f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")


# ----------------------------------------------------------------------------- templates


def test_card_templates_exist_once_in_the_package():
    from hf_longtail.hub import template_path

    for name in ("longtail_model_card.md.jinja", "longtail_dataset_card.md.jinja"):
        assert template_path(name).is_file()
        assert not list(REPO_ROOT.glob(f"model_cards/**/{name}")), "one template file, not two"


# ----------------------------------------------------------------------------- model card


def test_model_index_round_trips_every_metric(run_dir):
    path = write_model_card(run_dir, "me/digits-ccar-car", license="mit")
    assert path == run_dir / "README.md"
    loaded = ModelCard.load(path)
    results = _results()
    expected = {METRIC_TYPES[k]: results[f"test_{k}"] for k in METRIC_TYPES}
    assert card_metrics(loaded) == expected  # exact: the YAML keeps the JSON floats
    evals = loaded.data.eval_results
    assert {r.task_type for r in evals} == {"image-classification"}
    assert {r.dataset_split for r in evals} == {"test"}
    assert {r.dataset_type for r in evals} == {"digits"}
    assert evals[0].dataset_args == {"imbalance_factor": 10, "profile": "exp", "seed": 0}
    by_type = {r.metric_type: r for r in evals}
    assert by_type["f1"].metric_args == {"average": "macro"}
    assert by_type["few_shot_accuracy"].metric_args["few_threshold"] == 20
    assert loaded.data.model_name == "digits-ccar-car"
    data = loaded.data.to_dict()
    assert data["license"] == "mit"
    assert data["base_model"] == "google/vit-base-patch16-224-in21k"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert set(data["tags"]) == {
        "long-tailed",
        "image-classification",
        "hf-longtail",
        "ccar",
        "car",
    }
    # "digits" is not a Hub dataset id: listing it would be a broken link on the Hub.
    assert "datasets" not in data


def test_results_table_values_equal_the_json(run_dir):
    text = build_model_card(run_dir, "me/m").text
    results = _results()
    groups = _groups(COUNTS)
    for key, label in LABELS.items():
        value = results[f"test_{key}"]
        plain = key in ("ece", "confusion_spectral_norm")
        expected = f"{value:.4f}" if plain else f"{100 * value:.2f}%"
        row = table_row(text, label)
        assert row[1] == expected, (label, row)
    assert table_row(text, "Many-shot accuracy")[2] == str(groups.count("many"))
    assert table_row(text, "Medium-shot accuracy")[2] == str(groups.count("medium"))
    assert table_row(text, "Few-shot accuracy")[2] == str(groups.count("few"))
    worst = int(np.argmin(PER_CLASS))
    assert table_row(text, "Worst-class accuracy")[2] == f"1 (`{NAMES[worst]}`)"
    assert f"**{NAMES[worst]}** (label {worst}, {COUNTS[worst]} training images)" in text
    # Per-class table: one row per class, accuracy and training count from the JSON.
    for i in range(10):
        row = table_row(text, str(i))
        assert row[1:] == [NAMES[i], str(COUNTS[i]), groups[i], f"{100 * PER_CLASS[i]:.2f}%"]
    # Lists, strings and Trainer timing are not metrics of the model.
    assert "test_loss" in text
    assert "(150 images, 10 classes, not subsampled)" in text
    for noise in (
        "test_runtime",
        "test_confusion_matrix",
        "peak_rss_mb",
        "test_worst_class_name",
        "test_num_many",
    ):
        assert noise not in text


def test_card_describes_the_long_tail_loss_plot_usage_and_citations(run_dir):
    text = build_model_card(run_dir, "me/digits-ccar-car").text
    assert table_row(text, "Imbalance factor (requested)")[1] == "10"
    ratio = max(COUNTS) / min(COUNTS)
    assert table_row(text, "Imbalance ratio (actual, max / min count)")[1] == f"{ratio:.1f}"
    assert table_row(text, "Subsampling seed")[1] == "0"
    assert table_row(text, "Training images")[1] == str(sum(COUNTS))
    median = np.median(COUNTS)
    assert table_row(text, "Images per class: max / median / min")[1] == (
        f"{max(COUNTS)} / {median:g} / {min(COUNTS)}"
    )
    assert table_row(text, "Long-tail profile")[1].startswith("`exp`")
    assert table_row(text, "CCAR re-weighting")[1] == (
        "on: ω = 0.75, variant `paper`, weight differentiated through"
    )
    assert (
        table_row(text, "CAR spectral regulariser")[1]
        == "on: α = 0.5, EMA β = 0.5, r₀ = 0.2, τ = 1"
    )
    # Only the active base loss's parameters in the recipe; all of them in the full table.
    assert table_row(text, "Base loss")[1] == "`ce`"
    assert table_row(text, "`focal_gamma`")[1] == "2"
    assert table_row(text, "`learning_rate`")[1] == "0.0005"
    assert "![Per-class test accuracy" in text and "](per_class_accuracy.png)" in text
    assert "](confusion_matrix.png)" in text
    assert 'pipeline("image-classification", model="me/digits-ccar-car")' in text
    assert "import hf_longtail" not in text  # ViT is a built-in transformers architecture
    for arxiv in ("2601.15924", "2603.16732"):
        assert f"eprint        = {{{arxiv}}}" in text
    assert "## Limitations" in text
    assert "2 of 10 classes had fewer than\n  20 training images" in text
    assert "\n\n\n" not in text


@pytest.mark.parametrize(
    ("variant", "formula", "phase"),
    [
        ("paper", "exp(−f'_c · (ω − p_t))", "f'_c = f_c while p_t < ω"),
        ("e_minus_f", "(e − f'_c)^(ω − p_t)", "f'_c = f_c while p_t < ω"),
        ("notebook", "(e − f_c)^(ω − p_t)", "no dual phase"),
    ],
)
def test_card_states_the_ccar_formula_of_the_variant(run_dir, variant, formula, phase):
    _edit_json(run_dir / "longtail_run.json", lambda d: d["loss"].update(ccar_variant=variant))
    text = build_model_card(run_dir, "me/m").text
    assert f"Ω(p_t, f_c) = {formula}," in text
    assert phase in text.replace("\n", " ")
    if variant == "notebook":
        assert "1 − f_c" not in text


def test_empty_groups_are_na_in_the_table_and_absent_from_model_index(run_dir):
    def drop(results):
        results["test_many_shot_accuracy"] = None  # no class with > 100 images
        results["test_few_shot_accuracy"] = float("nan")

    _edit_json(run_dir / "all_results.json", drop)
    _edit_json(run_dir / "longtail_run.json", lambda r: r["dataset"].update(class_counts=[90] * 10))
    path = write_model_card(run_dir, "me/m")
    raw = path.read_text()
    assert "nan" not in raw.split("---")[1].lower()  # the Hub rejects NaN in model-index
    metrics = card_metrics(ModelCard.load(path))
    assert "many_shot_accuracy" not in metrics and "few_shot_accuracy" not in metrics
    assert metrics["accuracy"] == _results()["test_accuracy"]
    text = ModelCard.load(path).text
    assert table_row(text, "Many-shot accuracy")[1:3] == ["n/a", "0"]
    assert "(no class in this group)" in table_row(text, "Many-shot accuracy")[3]


def test_custom_architecture_local_paths_and_no_processor(run_dir):
    (run_dir / "preprocessor_config.json").unlink()
    _edit_json(
        run_dir / "config.json", lambda c: c.update(model_type="resnet_cifar", image_size=None)
    )

    def local(run):
        run["model_name_or_path"] = "resnet32_cifar"
        run["dataset"]["name"] = "/home/someone/private/data/cifar10"
        run["loss"].update(ccar=False, car_weight=0.0)

    _edit_json(run_dir / "longtail_run.json", local)
    # Without the metrics package's worst_class id, the worst class is the arg-min accuracy.
    _edit_json(run_dir / "all_results.json", lambda r: r.pop("test_worst_class"))
    card = build_model_card(run_dir)  # no repo id: a local reference in the snippet
    text = str(card)
    assert "/home/someone" not in text  # local paths never leak into a public card
    assert "the local dataset `cifar10`" in card.text
    data = card.data.to_dict()
    assert "base_model" not in data  # a bare architecture name is not a Hub model
    assert "ccar" not in data["tags"] and "car" not in data["tags"]
    assert table_row(card.text, "CCAR re-weighting")[1] == "off"
    assert "import hf_longtail.models" in card.text
    assert 'AutoModelForImageClassification.from_pretrained("path/to/digits-ccar-car")' in text
    assert "pipeline(" not in text
    assert "torch.rand(1, 3, 32, 32)" in text
    worst = int(np.argmin(PER_CLASS))
    assert f"**{NAMES[worst]}** (label {worst}, {COUNTS[worst]} training images)" in text


def test_class_count_summary_against_reference():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 500, size=37).tolist()
    s = class_count_summary(counts, {"many": 100, "few": 20})
    ref = np.array(counts)
    assert (s["num_classes"], s["total"], s["max"], s["min"]) == (
        37,
        int(ref.sum()),
        int(ref.max()),
        int(ref.min()),
    )
    assert float(s["median"]) == float(np.median(ref))
    assert math.isclose(s["ratio_value"], ref.max() / ref.min())
    assert s["many"] == int((ref > 100).sum()) and s["few"] == int((ref < 20).sum())
    assert s["many"] + s["medium"] + s["few"] == 37
    empty = class_count_summary([10, 0, 3])
    assert empty["ratio_value"] == math.inf and empty["ratio"].startswith("∞")
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_count_summary([])


def test_incomplete_run_dir_names_every_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OutputDirError) as err:
        read_run_dir(tmp_path)
    msg = str(err.value)
    assert "config.json" not in msg.split("\n", 1)[1]  # present, so not reported
    for missing in ("model weights", "all_results.json", "longtail_run.json"):
        assert f"- {missing}" in msg
    assert "scripts/train.py" in msg
    with pytest.raises(OutputDirError, match="does not exist"):
        read_run_dir(tmp_path / "nope")


def test_schema_errors_say_what_is_wrong(run_dir):
    _edit_json(run_dir / "all_results.json", lambda r: r.update(test_per_class_accuracy=[0.5] * 3))
    with pytest.raises(
        OutputDirError, match=r"per_class_accuracy must have one value per class \(10"
    ):
        read_run_dir(run_dir)
    _edit_json(run_dir / "longtail_run.json", lambda r: r["dataset"].update(class_counts=[5, -1]))
    with pytest.raises(OutputDirError, match=r"dataset.class_counts\[1\] = -1 is negative"):
        read_run_dir(run_dir)
    _edit_json(run_dir / "all_results.json", lambda r: r.pop("test_accuracy"))
    _edit_json(run_dir / "longtail_run.json", lambda r: r["dataset"].update(class_counts=COUNTS))
    with pytest.raises(OutputDirError, match="has no `test_accuracy`"):
        read_run_dir(run_dir)


# ----------------------------------------------------------------------------- pushing


def test_files_to_push_excludes_checkpoints_and_training_state(run_dir):
    write_model_card(run_dir, "me/m")
    assert files_to_push(run_dir) == sorted(
        [
            "README.md",
            "all_results.json",
            "config.json",
            "confusion_matrix.png",
            "longtail_run.json",
            "model.safetensors",
            "per_class_accuracy.png",
            "preprocessor_config.json",
        ]
    )


def test_push_uploads_exactly_the_model_card_plots_and_results(run_dir):
    api = FakeApi()
    commit = push_long_tail_model(run_dir, "me/digits-ccar-car", private=True, api=api)
    assert commit.commit_url.startswith("https://huggingface.co/me/digits-ccar-car/commit/")
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    create = api.calls[0][1]
    assert create["repo_id"] == "me/digits-ccar-car"
    assert create["private"] is True and create["exist_ok"] is True
    upload = api.calls[1][1]
    # The run's files, read where they are, and the card.
    assert upload["would_upload"] == sorted([*files_to_push(run_dir), "README.md"])
    assert all(
        src == run_dir.resolve() / name
        for name, src in upload["sources"].items()
        if name != "README.md"
    )
    assert not any(f.startswith(("checkpoint-", "runs")) for f in upload["would_upload"])
    assert {"training_args.bin", "optimizer.pt", "trainer_state.json"}.isdisjoint(
        upload["would_upload"]
    )
    # The card names the repo; it was rendered into a temporary copy, not into the run dir.
    assert not (run_dir / "README.md").exists()
    card = ModelCard(upload["card"])
    assert 'model="me/digits-ccar-car"' in card.text
    assert card_metrics(card)["accuracy"] == _results()["test_accuracy"]


def test_push_to_a_revision_creates_the_branch_first(run_dir):
    api = FakeApi()
    push_long_tail_model(run_dir, "me/m", revision="v1", api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[1][1]["branch"] == "v1" and api.calls[1][1]["exist_ok"] is True
    assert api.calls[2][1]["revision"] == "v1"


def test_keep_card_uploads_the_hand_edited_readme(run_dir):
    (run_dir / "README.md").write_text("---\nlicense: mit\n---\n# my own words\n")
    api = FakeApi()
    push_long_tail_model(run_dir, "me/m", keep_card=True, api=api)
    assert (run_dir / "README.md").read_text().endswith("# my own words\n")
    assert api.calls[-1][1]["card"].endswith("# my own words\n")


def _http_error(cls, status: int):
    from huggingface_hub.utils import httpx

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(f"{status} error", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    ("fail_at", "make_error", "cause"),
    [
        ("create_commit", lambda: ConnectionError("connection reset by peer"), "network"),
        ("create_commit", lambda: TimeoutError("read timed out"), "network"),
        (
            "create_repo",
            lambda: _http_error(__import__("huggingface_hub").errors.HfHubHTTPError, 401),
            "refused the token",
        ),
        (
            "create_repo",
            lambda: _http_error(__import__("huggingface_hub").errors.RepositoryNotFoundError, 404),
            "not found",
        ),
    ],
)
def test_failed_push_keeps_local_files_and_says_how_to_retry(run_dir, fail_at, make_error, cause):
    write_model_card(run_dir, "me/digits-ccar-car")
    before = _snapshot(run_dir)
    err = make_error()
    with pytest.raises(PushToHubError) as info:
        push_long_tail_model(run_dir, "me/digits-ccar-car", api=FakeApi(fail_at, err))
    assert _snapshot(run_dir) == before  # nothing written, changed or deleted
    msg = str(info.value)
    retry = f"python -m hf_longtail.hub push {run_dir.resolve()} --repo-id me/digits-ccar-car"
    assert info.value.retry_command == retry
    assert f"Retry with: {retry}" in msg
    assert cause in msg and type(err).__name__ in msg
    assert info.value.__cause__ is err


def test_offline_push_with_the_real_client_fails_fast(run_dir):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: this test must not reach the network")
    write_model_card(run_dir, "me/m")
    before = _snapshot(run_dir)
    with pytest.raises(PushToHubError, match="offline mode is on") as info:
        push_long_tail_model(run_dir, "me/m", private=True)
    assert "--repo-id me/m --private" in str(info.value)
    assert _snapshot(run_dir) == before


def test_invalid_repo_id_and_bad_dir_fail_before_any_hub_call(run_dir, tmp_path):
    api = FakeApi()
    with pytest.raises(PushToHubError, match="Repo id must"):
        push_long_tail_model(run_dir, "not a/valid/id", api=api)
    (run_dir / "all_results.json").unlink()
    with pytest.raises(OutputDirError, match=r"all_results\.json"):
        push_long_tail_model(run_dir, "me/m", api=api)
    assert api.calls == []


# ----------------------------------------------------------------------------- CLI


def test_cli_card_writes_and_exports(run_dir, tmp_path, capsys):
    export = tmp_path / "examples" / "digits"
    assert main(["card", str(run_dir), "--repo-id", "me/m", "--export-dir", str(export)]) == 0
    assert sorted(p.name for p in export.iterdir()) == [
        "README.md",
        "confusion_matrix.png",
        "per_class_accuracy.png",
    ]
    assert (export / "README.md").read_text() == (run_dir / "README.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_cli_exit_codes_and_messages(run_dir, tmp_path, capsys):
    assert main(["card", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["push", str(run_dir), "--repo-id", "bad id!"]) == 1
    assert "Retry with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(run_dir)])  # --repo-id is required
    assert exit_info.value.code == 2


def test_cli_push_offline_in_a_subprocess(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_longtail.hub", "push", str(run_dir), "--repo-id", "me/m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"Retry with: python -m hf_longtail\.hub push \S+ --repo-id me/m", proc.stderr)
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "README.md").exists()


def test_a_custom_template_replaces_the_packaged_one(run_dir, tmp_path):
    template = tmp_path / "mine.md.jinja"
    template.write_text(
        "---\n{{ card_data }}\n---\n# {{ model_title }}: {{ counts.few }} few-shot\n"
    )
    card = build_model_card(run_dir, "me/custom", template=template)
    assert card.text.strip() == f"# custom: {_groups(COUNTS).count('few')} few-shot"
    assert card_metrics(card)["accuracy"] == _results()["test_accuracy"]
