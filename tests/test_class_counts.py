"""The one class-count object (hf_longtail.class_counts.ClassCounts) and its rules, applied the
same way by the losses, the metrics, the sampler and the hub."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_longtail.class_counts import ClassCounts, ShotThresholds
from hf_longtail.data.samplers import ClassAwareSampler, sampling_distribution
from hf_longtail.hub.card import class_count_summary
from hf_longtail.losses import build_loss, create_base_loss, log_class_prior
from hf_longtail.metrics import logit_adjust, long_tail_metrics, shot_groups

# A long tail that crosses both default thresholds (100 / 20) and the custom ones (50 / 10),
# with an unseen class.
COUNTS = [400, 120, 101, 100, 60, 50, 30, 20, 19, 10, 9, 0]


# ------------------------------------------------------------------ one validation rule
def _consumers(name):
    """Every public entry point that takes training counts, as f(counts) -> anything."""
    return {
        "ClassCounts": lambda c: ClassCounts(c, name=name),
        "losses": lambda c: create_base_loss("la", c),
        "metrics": lambda c: long_tail_metrics([0, 1], [0, 1], c),
        "sampler": lambda c: sampling_distribution(c),
        "card": lambda c: class_count_summary(c),
    }


@pytest.mark.parametrize(
    ("counts", "error", "message"),
    [
        ([10, -3, 2], ValueError, r"\[1\] = -3 is negative"),
        ([10, 2, float("nan")], ValueError, r"\[2\] = nan is not finite"),
        ([10, 2.5], ValueError, r"\[1\] = 2\.5 is not an integer"),
        ([10, True], TypeError, r"\[1\] = True is not a number"),
        ([7], ValueError, "at least 2 classes"),
        ([0, 0, 0], ValueError, "sums to 0"),
        ([[1, 2], [3, 4]], ValueError, "must be 1-D"),
        ("12", TypeError, "sequence of per-class"),
    ],
)
def test_one_validation_rule_everywhere(counts, error, message):
    """Losses, metrics, sampler and card refuse the same counts with the same message, which
    names the position and the value."""
    for consume in _consumers("class_counts").values():
        with pytest.raises(error, match=message):
            consume(counts)


@pytest.mark.parametrize("convert", [np.asarray, torch.tensor])
@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([10.0, -3.0, 2.0], r"\[1\] = -3 is negative"),
        ([10.0, 2.0, float("inf")], r"\[2\] = inf is not finite"),
        ([10.0, 2.5], r"\[1\] = 2\.5 is not an integer"),
    ],
)
def test_array_input_gets_the_same_errors(convert, counts, message):
    for consume in _consumers("class_counts").values():
        with pytest.raises(ValueError, match=message):
            consume(convert(counts))


def test_accepted_forms_give_the_same_object():
    expected = ClassCounts(COUNTS)
    for form in (
        tuple(COUNTS),
        np.asarray(COUNTS),
        np.asarray(COUNTS, dtype=np.float32),
        torch.tensor(COUNTS),
        torch.tensor(COUNTS, dtype=torch.float64),
        expected,
    ):
        got = ClassCounts.coerce(form)
        assert got == expected and all(type(c) is int for c in got)
    assert list(expected) == COUNTS and len(expected) == 12 and expected[0] == 400
    assert expected.total == sum(COUNTS) and json.loads(json.dumps(expected.to_list())) == COUNTS
    with pytest.raises(ValueError, match="class_names has 2 entries but class_counts has 12"):
        ClassCounts(COUNTS, names=["a", "b"])


def test_from_labels_counts_like_bincount():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=500)
    reference = np.bincount(labels, minlength=9).tolist()
    assert ClassCounts.from_labels(labels, 9).to_list() == reference
    assert ClassCounts.from_labels(labels.tolist(), 9).to_list() == reference
    names = [f"c{i}" for i in range(9)]
    assert ClassCounts.from_labels(labels, 9, names).names == tuple(names)
    with pytest.raises(ValueError, match=r"labels\[2\] = 9 is out of range"):
        ClassCounts.from_labels(np.array([0, 1, 9]), 9)
    with pytest.raises(ValueError, match=r"labels\[1\] = -1 is negative"):
        ClassCounts.from_labels([0, -1], 3)


# ------------------------------------------------------------------ one log-prior rule
def test_log_prior_with_zero_counts_is_shared_by_losses_and_metrics():
    """A zero count takes the smallest positive count; losses and metrics use that prior."""
    counts = [0, 40, 10, 0, 30]
    filled = [10, 40, 10, 10, 30]
    reference = [math.log(n / sum(filled)) for n in filled]
    np.testing.assert_allclose(ClassCounts(counts).log_prior(), reference, rtol=0, atol=1e-15)
    with pytest.warns(UserWarning, match="zero training samples"):
        losses_prior = log_class_prior(counts)
    np.testing.assert_allclose(losses_prior.numpy(), reference, rtol=0, atol=1e-15)
    logits = np.random.default_rng(1).normal(size=(8, 5))
    np.testing.assert_allclose(
        logit_adjust(logits, counts, tau=0.7), logits - 0.7 * np.array(reference), atol=1e-12
    )
    assert all(math.isfinite(v) for v in ClassCounts(counts).log_prior())


# ------------------------------------------------------------------ one shot-group rule
@pytest.mark.parametrize("thresholds", [ShotThresholds(), ShotThresholds(many=50, few=10)])
def test_shot_groups_are_the_same_in_losses_metrics_and_card(thresholds):
    counts = ClassCounts(COUNTS)
    groups = counts.shot_groups(thresholds)
    expected = {
        g: [c for c, n in enumerate(COUNTS) if thresholds.group(n) == g]
        for g in ("many", "medium", "few")
    }
    assert groups == expected
    many, few = thresholds.many, thresholds.few
    # Independent reference: the definition, written out.
    assert groups["many"] == [c for c, n in enumerate(COUNTS) if n > many]
    assert groups["few"] == [c for c, n in enumerate(COUNTS) if n < few]

    # Metrics.
    assert shot_groups(COUNTS, many, few) == groups
    labels = np.arange(len(COUNTS))
    report = long_tail_metrics(labels, labels, COUNTS, many_threshold=many, few_threshold=few)
    assert [report[f"num_{g}"] for g in groups] == [len(ids) for ids in groups.values()]
    # Card (the same numbers in the model and dataset cards).
    summary = class_count_summary(COUNTS, thresholds.to_dict())
    assert [summary[g] for g in groups] == [len(ids) for ids in groups.values()]
    assert (summary["many_threshold"], summary["few_threshold"]) == (many, few)
    # Losses: head = many-shot, tail = every other class.
    with pytest.warns(UserWarning, match="zero training samples"):
        loss = build_loss({"ccar": True}, COUNTS, many_threshold=many)
    assert loss.head_classes.nonzero().flatten().tolist() == groups["many"]
    tail_only = torch.tensor(groups["medium"] + groups["few"])
    loss(torch.randn(len(tail_only), len(COUNTS)), tail_only)
    assert "ccar_weight_tail" in loss.last_stats and "ccar_weight_head" not in loss.last_stats


def test_thresholds_are_checked_and_read_from_a_record():
    assert ShotThresholds.coerce({"many": 50}) == ShotThresholds(50, 20)
    assert ShotThresholds.coerce(None) == ShotThresholds(100, 20)
    with pytest.raises(ValueError, match=r"`few_threshold` \(60\) must not exceed"):
        ShotThresholds.coerce({"many": 50, "few": 60})
    with pytest.raises(ValueError, match="unknown shot-threshold key"):
        ShotThresholds.coerce({"medium": 3})


# ------------------------------------------------------------------ sampler: counted once
def test_sampler_uses_given_counts_and_checks_them_against_the_rows():
    labels = np.repeat(np.arange(4), [30, 10, 3, 1])
    counted = ClassAwareSampler(labels, seed=2, num_replicas=1, rank=0)
    given = ClassAwareSampler(
        labels, seed=2, num_replicas=1, rank=0, class_counts=ClassCounts([30, 10, 3, 1, 0])
    )
    assert counted.class_counts.tolist() == [30, 10, 3, 1]
    assert given.class_counts.tolist() == [30, 10, 3, 1, 0]  # a trailing class never seen
    assert counted.global_order(3).tolist() == given.global_order(3).tolist()
    with pytest.raises(ValueError, match=r"class_counts \[30, 10, 4, 0\] do not match"):
        ClassAwareSampler(labels, class_counts=[30, 10, 4, 0])
    with pytest.raises(ValueError, match="label 3 is the largest"):
        ClassAwareSampler(labels, class_counts=[30, 10, 4])
