"""Long-tail diagnostics reach the trackers: per-class and shot-group scalars at every evaluation,
the final test metrics, and the confusion matrix as an image (read back from TensorBoard's event
files)."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_train import load_train_script

from hf_longtail.diagnostics import PER_CLASS_SCALAR_LIMIT, tracker_logs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tracker_logs_expands_the_per_class_list_and_holds_back_what_trackers_drop():
    logs = {
        "eval_accuracy": 0.5,
        "eval_few_shot_accuracy": None,
        "eval_worst_class_name": "cat",
        "eval_per_class_accuracy": [0.25, None, 1.0],
    }
    tracked, held = tracker_logs(logs, ["dog", "sea lion", "cat"])
    assert tracked == {
        "eval_accuracy": 0.5,
        "eval_worst_class_name": "cat",
        "eval_per_class_accuracy/0_dog": 0.25,
        "eval_per_class_accuracy/2_cat": 1.0,
    }
    assert held == {"eval_few_shot_accuracy": None, "eval_per_class_accuracy": [0.25, None, 1.0]}
    many = [0.5] * (PER_CLASS_SCALAR_LIMIT + 1)
    tracked, held = tracker_logs({"test_per_class_accuracy": many})
    assert tracked == {} and held == {"test_per_class_accuracy": many}  # an image instead
    tracked, _ = tracker_logs({"eval_per_class_accuracy": [0.1] * 12})
    assert sorted(tracked)[:2] == ["eval_per_class_accuracy/00", "eval_per_class_accuracy/01"]


def test_report_to_tensorboard_without_tensorboard_fails_before_any_work(monkeypatch, tmp_path):
    from transformers import integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"hf-longtail\[tensorboard\]"):
        load_train_script().main(["--report_to", "tensorboard", "--output_dir", str(out)])
    assert not out.exists()


def test_tensorboard_event_files_hold_the_long_tail_diagnostics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        SCALARS,
        EventAccumulator,
    )

    torch.set_num_threads(1)
    out = tmp_path / "run"
    results = load_train_script().main(
        [
            "--dataset_name", "digits", "--imbalance_factor", "10", "--image_size", "16",
            "--many_shot_threshold", "60", "--model_name_or_path", "resnet20_cifar",
            "--output_dir", str(out), "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "256", "--save_strategy", "no",
            "--validation_split", "heldout", "--validation_per_class", "5",
            "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            "--logging_strategy", "steps", "--logging_steps", "2",
            "--report_to", "tensorboard", "--disable_tqdm", "true", "--use_cpu", "true",
            "--dataloader_num_workers", "0",
        ]
    )  # fmt: skip
    event_dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    assert event_dirs, "no TensorBoard event file written"
    scalars: dict[str, list] = {}
    images: dict[str, list] = {}
    for folder in event_dirs:
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(acc.Images(tag))
    names = [str(i) for i in range(10)]  # digits' classes are named "0" ... "9"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_per_class_accuracy" in h]
    assert len(evals) == 2  # trainer_state.json keeps the list
    for i in range(len(names)):
        points = scalars[f"eval/per_class_accuracy/{i}"]
        assert [p.step for p in points] == [2, 4]
        assert [p.value for p in points] == pytest.approx(
            [h["eval_per_class_accuracy"][i] for h in evals]
        )
    for group in ("many", "medium", "few"):
        assert len(scalars[f"eval/{group}_shot_accuracy"]) == 2
    # The final test metrics, once, with their per-class scalars.
    assert [p.value for p in scalars["test/accuracy"]] == pytest.approx([results["test_accuracy"]])
    assert [p.value for p in scalars["test/few_shot_accuracy"]] == pytest.approx(
        [results["test_few_shot_accuracy"]]
    )
    assert [p.value for p in scalars["test/per_class_accuracy/9"]] == pytest.approx(
        [results["test_per_class_accuracy"][9]]
    )
    # The confusion matrix as an image at every evaluation and at the end (PNG-encoded).
    assert len(images["eval/confusion_matrix"]) == 2
    (test_image,) = images["test/confusion_matrix"]
    assert test_image.encoded_image_string.startswith(b"\x89PNG")
    assert test_image.width > 100 and test_image.height > 100
