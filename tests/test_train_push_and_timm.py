"""scripts/train.py end to end with a timm model, and with --push_to_hub (offline and mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _helpers_train import load_train_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        "--dataset_name", "digits", "--imbalance_factor", "10",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "32", "--max_eval_samples", "32",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu", "true", "--ccar", "true", "--car_weight", "0.5", *extra,
    ]  # fmt: skip


def test_timm_architecture_trains_through_the_timm_wrapper(train_script, tmp_path):
    """A timm model (TimmWrapperForImageClassification) with its own processor's transforms."""
    out = tmp_path / "timm"
    train_script.main(
        _argv(out, "--model_name_or_path", "timm/test_resnet", "--pretrained", "false")
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "timm_wrapper" and config["num_classes"] == 10
    # The timm data config (mean/std/size) travels inside config.json, so the saved directory
    # gives back both the model and its processor.
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 10
    assert AutoImageProcessor.from_pretrained(out).data_config["input_size"][-1] == 160
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and len(results["test_per_class_accuracy"]) == 10


def test_push_failure_keeps_every_file_and_says_how_to_retry(train_script, tmp_path, capsys):
    """Offline (HF_HUB_OFFLINE=1 from conftest): the run is saved, the push fails, exit is non-zero."""
    out = tmp_path / "run"
    argv = _argv(out, "--model_name_or_path", "resnet20_cifar", "--image_size", "16")
    with pytest.raises(SystemExit) as stop:
        train_script.main([*argv, "--push_to_hub", "true", "--hub_model_id", "me/digits-lt"])
    assert stop.value.code != 0
    for name in ("config.json", "model.safetensors", "all_results.json", "longtail_run.json"):
        assert (out / name).is_file(), name
    err = capsys.readouterr().err
    assert f"python -m hf_longtail.hub push {out}" in err and "me/digits-lt" in err


def test_push_success_pushes_the_saved_run_once(train_script, tmp_path, monkeypatch):
    calls = []

    def fake_push(output_dir, repo_id, token=None, private=None, **kwargs):
        # Everything the card and the upload need is already on disk when the push starts.
        names = {p.name for p in Path(output_dir).iterdir()}
        calls.append((Path(output_dir), repo_id, names))

    import hf_longtail.hub

    monkeypatch.setattr(hf_longtail.hub, "push_long_tail_model", fake_push)
    out = tmp_path / "ok"
    argv = _argv(out, "--model_name_or_path", "resnet20_cifar", "--image_size", "16")
    train_script.main([*argv, "--push_to_hub", "true", "--hub_model_id", "me/digits-lt"])
    assert len(calls) == 1
    pushed_dir, repo_id, names = calls[0]
    assert pushed_dir == out and repo_id == "me/digits-lt"
    assert {"all_results.json", "per_class_accuracy.png", "model.safetensors"} <= names
