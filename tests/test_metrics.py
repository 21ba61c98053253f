"""hf_longtail.metrics: values against hand computations and independent references."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from hf_longtail.metrics import (
    LongTailMetricAccumulator,
    confusion_matrix,
    confusion_spectral_norm,
    expected_calibration_error,
    logit_adjust,
    long_tail_metrics,
    shot_groups,
)

REQUIRED_KEYS = {
    "accuracy",
    "many_shot_accuracy",
    "medium_shot_accuracy",
    "few_shot_accuracy",
    "worst_class_accuracy",
    "worst_class",
    "balanced_accuracy",
    "macro_f1",
    "ece",
    "per_class_accuracy",
    "confusion_spectral_norm",
    "num_many",
    "num_medium",
    "num_few",
}


def _random_case(n=600, k=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) * 2.0
    logits[np.arange(n), labels] += rng.uniform(0, 3, n)  # better than chance, imperfect
    counts = np.round(300 * 0.02 ** (np.arange(k) / (k - 1))).astype(int)
    return logits, labels, counts


# ------------------------------------------------------------------ shot groups
def test_shot_groups_boundaries_follow_decoupling_convention():
    counts = [101, 100, 20, 19, 0, 5000]
    g = shot_groups(counts)
    assert g == {"many": [0, 5], "medium": [1, 2], "few": [3, 4]}
    # OLTR's original >= 100 / <= 20 is many_threshold=99, few_threshold=21 with integer counts.
    g = shot_groups(counts, many_threshold=99, few_threshold=21)
    assert g == {"many": [0, 1, 5], "medium": [], "few": [2, 3, 4]}


def test_shot_groups_rejects_inverted_thresholds():
    with pytest.raises(ValueError, match="few_threshold"):
        shot_groups([10, 20], many_threshold=10, few_threshold=50)


# ------------------------------------------------------------------ hand-computed case
def test_hand_computed_small_case():
    # K=4; training counts put class 0 in many, 1 in medium, 2 and 3 in few.
    counts = [200, 50, 10, 5]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 0, 0, 0])
    r = long_tail_metrics(preds, labels, counts, class_names=["a", "b", "c", "d"])
    assert REQUIRED_KEYS <= set(r)
    # per-class recall: 3/4, 1/2, 1/3, 0/1
    np.testing.assert_allclose(r["per_class_accuracy"], [0.75, 0.5, 1 / 3, 0.0])
    assert r["accuracy"] == pytest.approx(5 / 10)
    assert r["many_shot_accuracy"] == pytest.approx(0.75)
    assert r["medium_shot_accuracy"] == pytest.approx(0.5)
    # mean of per-class accuracies (1/3 + 0) / 2, not pooled accuracy 1/4 over the group's samples
    assert r["few_shot_accuracy"] == pytest.approx(1 / 6)
    assert r["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1 / 3 + 0) / 4)
    assert (r["worst_class"], r["worst_class_name"], r["worst_class_accuracy"]) == (3, "d", 0.0)
    assert (r["num_many"], r["num_medium"], r["num_few"]) == (1, 1, 2)
    assert r["ece"] is None  # predictions only
    # F1 = 2TP / (2TP + FP + FN): c0 tp3 fp4 fn1 -> 6/11; c1 tp1 fp1 fn1 -> 2/4;
    # c2 tp1 fp0 fn2 -> 2/4; c3 -> 0
    assert r["macro_f1"] == pytest.approx((6 / 11 + 0.5 + 0.5 + 0.0) / 4)


def test_spectral_norm_hand_computed():
    # Two classes; class 0: 4 samples, 1 predicted as 1; class 1: 2 samples, 1 predicted as 0.
    labels = [0, 0, 0, 0, 1, 1]
    preds = [0, 0, 0, 1, 1, 0]
    # C[p, t] = #(p, t) / n_t, zero diagonal: C[1, 0] = 1/4, C[0, 1] = 1/2 -> ||C||_2 = 1/2.
    r = long_tail_metrics(preds, labels, [10, 10])
    assert r["confusion_spectral_norm"] == pytest.approx(0.5)
    assert confusion_spectral_norm(confusion_matrix(preds, labels, 2)) == pytest.approx(0.5)
    assert long_tail_metrics(labels, labels, [10, 10])["confusion_spectral_norm"] == 0.0


# ------------------------------------------------------------------ sklearn references
def test_against_sklearn_random():
    logits, labels, counts = _random_case()
    preds = logits.argmax(1)
    r = long_tail_metrics(logits, labels, counts)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert r["macro_f1"] == pytest.approx(
        skm.f1_score(labels, preds, average="macro", zero_division=0)
    )
    recall = skm.recall_score(labels, preds, average=None, labels=np.arange(12), zero_division=0)
    np.testing.assert_allclose(r["per_class_accuracy"], recall)
    assert r["worst_class_accuracy"] == pytest.approx(recall.min())
    assert r["worst_class"] == int(np.argmin(recall))
    np.testing.assert_array_equal(
        confusion_matrix(preds, labels, 12),
        skm.confusion_matrix(labels, preds, labels=np.arange(12)),
    )
    # shot groups against an explicit loop
    for group, sel in (
        ("many", counts > 100),
        ("medium", (counts >= 20) & (counts <= 100)),
        ("few", counts < 20),
    ):
        assert r[f"{group}_shot_accuracy"] == pytest.approx(recall[sel].mean())
        assert r[f"num_{group}"] == int(sel.sum())


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classes_without_eval_samples_are_excluded_and_json_safe():
    # 5 classes; class 3 never appears in labels but is predicted, class 4 appears nowhere.
    counts = [500, 300, 50, 10, 2]
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 3, 1, 1, 2, 0, 3])
    r = long_tail_metrics(preds, labels, counts)
    assert r["per_class_accuracy"][3] is None and r["per_class_accuracy"][4] is None
    assert r["few_shot_accuracy"] is None  # group {3, 4} has no evaluated class
    assert r["num_few"] == 2 and r["num_evaluated_classes"] == 3
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    # sklearn's macro F1 averages over labels present in y_true or y_pred: {0, 1, 2, 3}
    assert r["macro_f1"] == pytest.approx(
        skm.f1_score(labels, preds, average="macro", zero_division=0)
    )
    assert r["worst_class"] == 2
    json.dumps(r, allow_nan=False)  # strict JSON: no NaN anywhere


# ------------------------------------------------------------------ ECE
def _ece_reference(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al. (2017) reference: loop over (lo, hi] bins with torch softmax."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred.eq(torch.as_tensor(labels))
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in itertools.pairwise(edges):
        in_bin = conf.gt(lo) & conf.le(hi)
        if in_bin.any():
            ece += (
                in_bin.double().mean()
                * (conf[in_bin].mean() - correct[in_bin].double().mean()).abs()
            )
    return float(ece)


def test_ece_hand_computed():
    # Two samples with confidence 0.9 (one right), two with 0.6 (both right), K=2.
    def logit_for(p):
        return math.log(p / (1 - p))

    logits = np.array(
        [[logit_for(0.9), 0], [logit_for(0.9), 0], [logit_for(0.6), 0], [logit_for(0.6), 0]]
    )
    labels = np.array([0, 1, 0, 0])
    # bins: 0.9 -> |0.5 - 0.9| * 2/4 = 0.2; 0.6 -> |1.0 - 0.6| * 2/4 = 0.2
    assert expected_calibration_error(logits, labels) == pytest.approx(0.4)
    assert long_tail_metrics(logits, labels, [5, 5])["ece"] == pytest.approx(0.4)


def test_ece_against_reference_random():
    logits, labels, counts = _random_case(n=2000, k=7, seed=3)
    assert long_tail_metrics(logits, labels, counts)["ece"] == pytest.approx(
        _ece_reference(logits, labels), abs=1e-12
    )
    assert expected_calibration_error(logits, labels, n_bins=5) == pytest.approx(
        _ece_reference(logits, labels, 5), abs=1e-12
    )


def test_extreme_and_half_precision_logits_give_finite_metrics():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor(
        [[1e30, -1e30, 0.0], [-3e38, 3e38, 1.0], [0.0, 0.0, 1e-30], [5.0, 5.0, 5.0]]
    )
    r = long_tail_metrics(logits, labels, [100, 50, 10])
    assert all(math.isfinite(v) for v in (r["ece"], r["accuracy"], r["confusion_spectral_norm"]))
    assert r["accuracy"] == pytest.approx(3 / 4)  # row 3 ties -> argmax 0 (first index): wrong
    r16 = long_tail_metrics(logits.clamp(-6e4, 6e4).to(torch.bfloat16), labels, [100, 50, 10])
    assert math.isfinite(r16["ece"])


def test_nan_logits_raise():
    with pytest.raises(ValueError, match="NaN"):
        long_tail_metrics(np.array([[0.0, np.nan]]), [0], [1, 1])


# ------------------------------------------------------------------ logit adjustment
def test_logit_adjustment_matches_explicit_formula():
    logits, labels, counts = _random_case(seed=5)
    tau = 1.0
    prior = counts / counts.sum()
    adjusted = logits - tau * np.log(prior)
    np.testing.assert_allclose(logit_adjust(logits, counts, tau), adjusted)
    r = long_tail_metrics(logits, labels, counts, logit_adjustment_tau=tau)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(labels, adjusted.argmax(1)))
    assert r["ece"] == pytest.approx(_ece_reference(adjusted, labels), abs=1e-12)
    # Adjustment favours tail classes: few-shot accuracy must not drop on this data.
    plain = long_tail_metrics(logits, labels, counts)
    assert r["few_shot_accuracy"] >= plain["few_shot_accuracy"]


def test_zero_count_classes_get_the_losses_prior_everywhere():
    """One rule for unseen classes (the rarest observed count), in metrics and losses alike."""
    from hf_longtail.losses import create_base_loss, log_class_prior, post_hoc_logit_adjust

    counts = np.array([500, 40, 0, 7, 0, 120])
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, size=(64, counts.size))
    labels = rng.integers(0, counts.size, size=64)
    # Independent reference: the zero counts become 7, the smallest positive count.
    filled = np.array([500, 40, 7, 7, 7, 120], dtype=np.float64)
    reference = logits - 0.8 * np.log(filled / filled.sum())

    metric_side = logit_adjust(logits, counts, tau=0.8)
    with pytest.warns(UserWarning, match="zero training samples"):
        loss_side = post_hoc_logit_adjust(torch.from_numpy(logits), counts, tau=0.8)
        la = create_base_loss("la", counts, tau=0.8, validate=False)
        bs = create_base_loss("bs", counts, validate=False)
        log_prior = log_class_prior(counts)
    np.testing.assert_allclose(metric_side, reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(loss_side.numpy(), metric_side, rtol=0, atol=1e-12)
    np.testing.assert_allclose(log_prior.numpy(), np.log(filled / filled.sum()), atol=1e-12)
    # The training losses shift by the same prior: LA by +tau log pi, BS by log N (same softmax).
    z = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    np.testing.assert_allclose(
        la.adjust_logits(z, y).numpy(), logits + 0.8 * np.log(filled / filled.sum()), atol=1e-5
    )
    np.testing.assert_allclose(
        torch.softmax(bs.adjust_logits(z, y), 1).numpy(),
        torch.softmax(torch.from_numpy(logits + np.log(filled)), 1).numpy(),
        atol=1e-6,
    )
    # The streaming metrics predict from the same adjusted logits.
    r = long_tail_metrics(logits, labels, counts, logit_adjustment_tau=0.8)
    assert r["accuracy"] == pytest.approx(float(np.mean(reference.argmax(1) == labels)))


def test_every_count_zero_is_refused_by_the_one_count_rule():
    # A training set without images describes no long tail: refused like the losses refuse it
    # (hf_longtail.class_counts.ClassCounts), with or without logit adjustment.
    logits = np.array([[1.0, 0.0], [0.0, 1.0]])
    for tau in (None, 1.0):
        with pytest.raises(ValueError, match=r"train_class_counts sums to 0"):
            long_tail_metrics(logits, [0, 1], [0, 0], logit_adjustment_tau=tau)


def test_logit_adjustment_needs_logits():
    with pytest.raises(ValueError, match="logit_adjustment_tau"):
        long_tail_metrics([0, 1], [0, 1], [3, 3], logit_adjustment_tau=1.0)


# ------------------------------------------------------------------ streaming
def test_accumulator_matches_one_shot():
    logits, labels, counts = _random_case(n=500, seed=7)
    acc = LongTailMetricAccumulator(counts)
    for s in range(0, 500, 64):
        acc.update(torch.as_tensor(logits[s : s + 64]), torch.as_tensor(labels[s : s + 64]))
    assert acc.num_samples == 500
    assert acc.compute() == long_tail_metrics(logits, labels, counts)
    np.testing.assert_array_equal(
        acc.confusion_matrix(), confusion_matrix(logits.argmax(1), labels, 12)
    )


def test_large_k_sparse_spectral_norm_matches_dense(monkeypatch):
    import hf_longtail.metrics.functions as core

    monkeypatch.setattr(core, "_DENSE_SVD_MAX_CLASSES", 50)  # force the ARPACK path cheaply
    rng = np.random.default_rng(1)
    k, n = 300, 3000
    labels = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
    r = long_tail_metrics(preds, labels, np.full(k, 30))
    c = np.zeros((k, k))
    n_true = np.bincount(labels, minlength=k)
    for t, p in zip(labels, preds):
        if t != p:
            c[p, t] += 1.0 / n_true[t]
    assert r["confusion_spectral_norm"] == pytest.approx(
        np.linalg.svd(c, compute_uv=False)[0], rel=1e-9
    )


# ------------------------------------------------------------------ input validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(logits_or_predictions=[0, 5], labels=[0, 1], train_class_counts=[3, 3]), r"\[0, 2\)"),
        (
            dict(logits_or_predictions=[0, 1], labels=[0, 2], train_class_counts=[3, 3]),
            "same label ids",
        ),
        (dict(logits_or_predictions=[0, 1, 1], labels=[0, 1], train_class_counts=[3, 3]), "length"),
        (
            dict(logits_or_predictions=np.zeros((2, 3)), labels=[0, 1], train_class_counts=[3, 3]),
            "3 columns",
        ),
        (
            dict(logits_or_predictions=[0, 1], labels=[0, 1], train_class_counts=[3, -1]),
            r"train_class_counts\[1\] = -1 is negative",
        ),
        (dict(logits_or_predictions=[], labels=[], train_class_counts=[3, 3]), "No samples"),
        (
            dict(
                logits_or_predictions=[0, 1],
                labels=[0, 1],
                train_class_counts=[3, 3],
                class_names=["a"],
            ),
            "class_names",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        long_tail_metrics(**kwargs)


def test_metrics_package_imports_no_trainer_losses_or_data():
    code = (
        "import sys, hf_longtail.metrics as m; m.long_tail_metrics([0], [0], [1, 1]);"
        "bad = [x for x in sys.modules if x.startswith(('hf_longtail.trainer', 'hf_longtail.losses',"
        " 'hf_longtail.data', 'transformers', 'matplotlib'))]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
