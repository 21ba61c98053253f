"""make_compute_metrics with transformers.Trainer / EvalPrediction, the evaluate wrapper, plots."""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_longtail.metrics import (
    EVALUATE_METRIC_PATH,
    confusion_matrix,
    load_evaluate_metric,
    long_tail_metrics,
    make_compute_metrics,
    plot_confusion_matrix,
    plot_per_class_accuracy,
)

COUNTS = [300, 120, 60, 25, 8, 3]


def _data(n=90, k=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), labels] += 1.5
    return logits, labels


# ------------------------------------------------------------------ compute_metrics
def test_compute_metrics_handles_eval_prediction_tuples_and_ignore_index():
    from transformers import EvalPrediction

    logits, labels = _data()
    fn = make_compute_metrics(COUNTS, class_names=list("abcdef"))
    hidden = np.zeros((logits.shape[0], 3), np.float32)
    labels_ign = labels.copy()
    labels_ign[:7] = -100  # ignored samples are dropped
    out = fn(EvalPrediction(predictions=(logits, hidden), label_ids=labels_ign))
    ref = long_tail_metrics(logits[7:], labels[7:], COUNTS, class_names=list("abcdef"))
    assert out == ref
    assert "compute_result" in inspect.signature(fn).parameters  # batch_eval_metrics contract
    json.dumps(out, allow_nan=False)


def test_compute_metrics_batched_mode_equals_one_shot():
    from transformers import EvalPrediction

    logits, labels = _data(n=100)
    fn = make_compute_metrics(COUNTS, logit_adjustment_tau=1.0, include_per_class=False)
    results = []
    for s in range(0, 100, 32):
        last = s + 32 >= 100
        results.append(
            fn(
                EvalPrediction(
                    torch.from_numpy(logits[s : s + 32]), torch.from_numpy(labels[s : s + 32])
                ),
                compute_result=last,
            )
        )
    assert all(r == {} for r in results[:-1])
    expected = long_tail_metrics(logits, labels, COUNTS, logit_adjustment_tau=1.0)
    expected.pop("per_class_accuracy")
    assert results[-1] == expected
    # state was reset: a new evaluation starts from scratch
    again = fn(EvalPrediction(logits[:10], labels[:10]), compute_result=True)
    assert again["num_samples"] == 10


class _TensorImages(torch.utils.data.Dataset):
    def __init__(self, n: int, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, k, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_trainer_evaluate_with_long_tail_metrics(tmp_path, batch_eval_metrics):
    from transformers import Trainer, TrainingArguments

    from hf_longtail.models import ResNetCifarConfig, ResNetCifarForImageClassification

    k = len(COUNTS)
    model = ResNetCifarForImageClassification(
        ResNetCifarConfig(num_blocks=[1], widths=[4], num_labels=k)
    ).eval()
    ds = _TensorImages(40, k, seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=16,
        report_to=[],
        use_cpu=True,
        batch_eval_metrics=batch_eval_metrics,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, eval_dataset=ds, compute_metrics=make_compute_metrics(COUNTS)
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = model(ds.x).logits
    ref = long_tail_metrics(logits, ds.y, COUNTS)
    for key, value in ref.items():
        if isinstance(value, float):
            assert metrics[f"eval_{key}"] == pytest.approx(value, abs=1e-6), key
        elif key != "per_class_accuracy":
            assert metrics[f"eval_{key}"] == value, key
    assert len(metrics["eval_per_class_accuracy"]) == k
    # log_history (saved to trainer_state.json) keeps the list and stays strict JSON
    logged = trainer.state.log_history[-1]
    assert logged["eval_per_class_accuracy"] == metrics["eval_per_class_accuracy"]
    json.dumps(trainer.state.log_history, allow_nan=False)


# ------------------------------------------------------------------ evaluate wrapper
def test_evaluate_metric_loads_offline_and_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.path.isfile(EVALUATE_METRIC_PATH)
    logits, labels = _data(n=60)
    metric = load_evaluate_metric()
    ids = metric.compute(predictions=logits.argmax(1), references=labels, train_class_counts=COUNTS)
    assert ids == long_tail_metrics(logits.argmax(1), labels, COUNTS)
    metric = load_evaluate_metric()
    for s in range(0, 60, 20):  # streaming add_batch with logits
        metric.add_batch(predictions=logits[s : s + 20], references=labels[s : s + 20])
    out = metric.compute(train_class_counts=COUNTS, many_threshold=99, few_threshold=21)
    ref = long_tail_metrics(logits, labels, COUNTS, many_threshold=99, few_threshold=21)
    assert out["ece"] == pytest.approx(ref["ece"], abs=1e-12)
    assert out["few_shot_accuracy"] == pytest.approx(ref["few_shot_accuracy"])
    with pytest.raises(ValueError, match="train_class_counts"):
        load_evaluate_metric().compute(predictions=[0], references=[0])


# ------------------------------------------------------------------ plots
def _assert_png(path, min_w=200, min_h=150):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= min_w and im.height >= min_h
        # not a blank canvas: the figure has drawn content
        arr = np.asarray(im.convert("L"))
        assert arr.std() > 5


def test_plot_per_class_accuracy_writes_png(tmp_path):
    acc = [0.9, 0.8, None, 0.4, 0.2, 0.0]
    p = plot_per_class_accuracy(
        acc, COUNTS, tmp_path / "sub" / "pc.png", class_names=list("abcdef")
    )
    _assert_png(p)
    # many classes, no names, a zero count (symlog axis)
    rng = np.random.default_rng(0)
    counts = np.concatenate([np.round(500 * 0.01 ** (np.arange(149) / 148)), [0]]).astype(int)
    _assert_png(plot_per_class_accuracy(rng.random(150).tolist(), counts, tmp_path / "pc150.png"))
    with pytest.raises(ValueError, match="entries"):
        plot_per_class_accuracy([0.5], COUNTS, tmp_path / "bad.png")


def test_plot_confusion_matrix_writes_png(tmp_path):
    logits, labels = _data()
    cm = confusion_matrix(logits.argmax(1), labels, 6)
    _assert_png(
        plot_confusion_matrix(
            cm, tmp_path / "cm.png", class_names=list("abcdef"), train_class_counts=COUNTS
        )
    )
    _assert_png(plot_confusion_matrix(cm, tmp_path / "cm_counts.png", normalize=None))
    big = np.random.default_rng(0).integers(0, 5, size=(120, 120))
    _assert_png(plot_confusion_matrix(big, tmp_path / "cm120.png", normalize="pred"))
    with pytest.raises(ValueError, match="normalize"):
        plot_confusion_matrix(cm, tmp_path / "x.png", normalize="rows")
