"""Base long-tail losses against independent per-sample reference implementations (float64 loops)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_longtail.losses import (
    BaseLoss,
    ClassBalancedLoss,
    create_base_loss,
    effective_number_weights,
    ldam_margins,
    list_base_losses,
    log_class_prior,
    post_hoc_logit_adjust,
    register_base_loss,
)

COUNTS = [500, 240, 120, 60, 30, 12, 5]
K = len(COUNTS)
ALL_BASES = ["ce", "focal", "cb", "ldam", "la", "bs"]


def _batch(b: int = 9, k: int = K, scale: float = 2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    z = (torch.randn(b, k, generator=g) * scale).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    y[0], y[1] = 0, k - 1  # head and rarest class always present
    return z, y


# ----------------------------------------------------------------------------- references
def _log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def ref_ce(z, y, eps=0.0, shift=None):
    out = []
    for i in range(z.shape[0]):
        row = [float(z[i, c]) + (0.0 if shift is None else shift[c]) for c in range(z.shape[1])]
        lp = _log_softmax_row(row)
        out.append(-(1 - eps) * lp[int(y[i])] - eps * sum(lp) / len(lp))
    return torch.tensor(out, dtype=torch.float64)


def ref_soft_ce(z, t, eps=0.0, shift=None):
    out = []
    k = z.shape[1]
    for i in range(z.shape[0]):
        row = [float(z[i, c]) + (0.0 if shift is None else shift[c]) for c in range(k)]
        lp = _log_softmax_row(row)
        q = [(1 - eps) * float(t[i, c]) + eps / k for c in range(k)]
        out.append(-sum(qc * lc for qc, lc in zip(q, lp)))
    return torch.tensor(out, dtype=torch.float64)


def ref_focal(z, y, gamma):
    out = []
    for i in range(z.shape[0]):
        lp = _log_softmax_row(z[i].tolist())[int(y[i])]
        out.append(-((1 - math.exp(lp)) ** gamma) * lp)
    return torch.tensor(out, dtype=torch.float64)


def ref_cb_weights(counts, beta):
    w = [(1 - beta) / (1 - beta**n) for n in counts]
    s = sum(w)
    return [x * len(w) / s for x in w]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def ref_cb(z, y, counts, beta, loss_type, gamma=2.0):
    w = ref_cb_weights(counts, beta)
    out = []
    for i in range(z.shape[0]):
        yi = int(y[i])
        if loss_type == "softmax":
            li = -_log_softmax_row(z[i].tolist())[yi]
        else:
            li = 0.0
            for c in range(z.shape[1]):
                # Published form: p^t = sigmoid(z) for the true class, 1 - sigmoid(z) otherwise.
                pt = _sigmoid(float(z[i, c])) if c == yi else 1 - _sigmoid(float(z[i, c]))
                mod = (1 - pt) ** gamma if loss_type == "focal" else 1.0
                li += -mod * math.log(pt)
        out.append(w[yi] * li)
    return torch.tensor(out, dtype=torch.float64)


def ref_ldam(z, y, counts, max_m, s):
    raw = [n**-0.25 for n in counts]
    m = [x * max_m / max(raw) for x in raw]
    out = []
    for i in range(z.shape[0]):
        yi = int(y[i])
        row = [s * (float(z[i, c]) - (m[c] if c == yi else 0.0)) for c in range(z.shape[1])]
        out.append(-_log_softmax_row(row)[yi])
    return torch.tensor(out, dtype=torch.float64)


def _log_prior(counts):
    n = sum(counts)
    return [math.log(c / n) for c in counts]


# ----------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_matches_reference_and_torch(eps):
    z, y = _batch()
    loss = create_base_loss("ce", COUNTS, label_smoothing=eps)
    per = loss.per_sample(z, y)
    torch.testing.assert_close(per, ref_ce(z, y, eps), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z, y, label_smoothing=eps))


def test_focal_matches_reference():
    z, y = _batch()
    for gamma in (0.0, 0.5, 2.0):
        per = create_base_loss("focal", COUNTS, gamma=gamma).per_sample(z, y)
        torch.testing.assert_close(per, ref_focal(z, y, gamma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal"])
def test_class_balanced_matches_reference(loss_type):
    z, y = _batch()
    beta = 0.999
    loss = create_base_loss("cb", COUNTS, beta=beta, loss_type=loss_type, gamma=1.5)
    per = loss.per_sample(z, y)
    ref = ref_cb(z, y, COUNTS, beta, loss_type, gamma=1.5)
    # Class weights are float32 buffers: float32 precision.
    torch.testing.assert_close(per, ref, rtol=1e-6, atol=1e-9)
    # Cui et al.'s reduction: plain mean over the batch.
    torch.testing.assert_close(loss(z, y), ref.mean(), rtol=1e-6, atol=1e-9)


def test_effective_number_weights_formula():
    w = effective_number_weights(COUNTS, 0.9999)
    torch.testing.assert_close(w, torch.tensor(ref_cb_weights(COUNTS, 0.9999), dtype=torch.float64))
    assert w.sum().item() == pytest.approx(K)
    torch.testing.assert_close(
        effective_number_weights(COUNTS, 0.0), torch.ones(K, dtype=torch.float64)
    )


def test_ldam_matches_reference_and_margins():
    z, y = _batch(scale=0.5)
    per = create_base_loss("ldam", COUNTS, max_m=0.5, s=30.0).per_sample(z, y)
    torch.testing.assert_close(per, ref_ldam(z, y, COUNTS, 0.5, 30.0), rtol=1e-6, atol=1e-7)
    m = ldam_margins(COUNTS, 0.5)
    assert m.max().item() == pytest.approx(0.5)
    assert m[-1].item() == pytest.approx(0.5)  # rarest class has the largest margin
    assert m[0].item() == pytest.approx(0.5 * (COUNTS[-1] / COUNTS[0]) ** 0.25)


def test_ldam_drw_switches_on_at_drw_epoch_like_the_authors_code():
    z, y = _batch(scale=0.5)
    loss = create_base_loss("ldam", COUNTS, drw_epoch=160)
    plain = ref_ldam(z, y, COUNTS, 0.5, 30.0)
    loss.set_epoch(159.5)
    torch.testing.assert_close(loss(z, y), plain.mean(), rtol=1e-6, atol=1e-7)
    loss.set_epoch(160)
    w = torch.tensor(ref_cb_weights(COUNTS, 0.9999), dtype=torch.float64)
    # Cao et al.: F.cross_entropy(s * adjusted, y, weight=per_cls_weights) -> weighted mean.
    expected = (w[y] * plain).sum() / w[y].sum()
    torch.testing.assert_close(loss(z, y), expected, rtol=1e-6, atol=1e-7)
    margins = ldam_margins(COUNTS, 0.5)
    adjusted = 30.0 * (z - F.one_hot(y, K) * margins[y][:, None])
    torch.testing.assert_close(loss(z, y), F.cross_entropy(adjusted, y, weight=w))


def test_drw_on_any_base_and_weight_reduction_mean():
    z, y = _batch()
    loss = create_base_loss("ce", COUNTS, drw_epoch=2, weight_reduction="mean")
    assert not loss.weights_active
    loss.set_epoch(2.0)
    assert loss.weights_active
    w = torch.tensor(ref_cb_weights(COUNTS, 0.9999), dtype=torch.float64)
    torch.testing.assert_close(loss(z, y), (w[y] * ref_ce(z, y)).mean())


def test_drw_epoch_survives_state_dict():
    loss = create_base_loss("ldam", COUNTS, drw_epoch=3)
    loss.set_epoch(4.25)
    restored = create_base_loss("ldam", COUNTS, drw_epoch=3)
    state = loss.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-friendly
    restored.load_state_dict(state)
    assert restored.epoch == 4.25 and restored.weights_active


def test_logit_adjusted_and_balanced_softmax_match_reference():
    z, y = _batch()
    lp = _log_prior(COUNTS)
    for tau in (1.0, 0.5):
        per = create_base_loss("la", COUNTS, tau=tau).per_sample(z, y)
        torch.testing.assert_close(per, ref_ce(z, y, shift=[tau * x for x in lp]))
    per = create_base_loss("bs", COUNTS).per_sample(z, y)
    torch.testing.assert_close(per, ref_ce(z, y, shift=[math.log(n) for n in COUNTS]))
    # Balanced softmax is logit adjustment with tau = 1 (log N_c and log pi_c differ by a constant).
    torch.testing.assert_close(per, create_base_loss("la", COUNTS).per_sample(z, y))


def test_post_hoc_logit_adjust():
    z, _ = _batch(dtype=torch.float32)
    out = post_hoc_logit_adjust(z, COUNTS, tau=0.7)
    expected = z - 0.7 * torch.tensor(_log_prior(COUNTS), dtype=torch.float32)
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        log_class_prior(COUNTS), torch.tensor(_log_prior(COUNTS), dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="7 entries"):
        post_hoc_logit_adjust(torch.zeros(2, 5), COUNTS)


# ----------------------------------------------------------------------------- soft targets
def _mixup_targets(y, k):
    g = torch.Generator().manual_seed(7)
    lam = torch.rand(y.shape[0], 1, generator=g, dtype=torch.float64)
    perm = torch.randperm(y.shape[0], generator=g)
    one = F.one_hot(y, k).double()
    return lam * one + (1 - lam) * one[perm]


@pytest.mark.parametrize("name", ["ce", "focal", "cb", "la", "bs"])
def test_one_hot_soft_targets_equal_hard_labels(name):
    z, y = _batch()
    loss = create_base_loss(name, COUNTS)
    torch.testing.assert_close(loss.per_sample(z, F.one_hot(y, K).double()), loss.per_sample(z, y))


def test_mixup_soft_targets_match_reference():
    z, y = _batch()
    t = _mixup_targets(y, K)
    torch.testing.assert_close(
        create_base_loss("ce", COUNTS, label_smoothing=0.1).per_sample(z, t), ref_soft_ce(z, t, 0.1)
    )
    torch.testing.assert_close(
        create_base_loss("la", COUNTS).per_sample(z, t), ref_soft_ce(z, t, shift=_log_prior(COUNTS))
    )
    # torch's probability-target cross-entropy as a second reference.
    torch.testing.assert_close(create_base_loss("ce", COUNTS)(z, t), F.cross_entropy(z, t))
    # cb: weight of a mixed sample is the target-weighted mix of the class weights.
    w = torch.tensor(ref_cb_weights(COUNTS, 0.9999), dtype=torch.float64)
    per = create_base_loss("cb", COUNTS).per_sample(z, t)
    torch.testing.assert_close(per, (t @ w) * ref_soft_ce(z, t))


def test_ldam_rejects_soft_targets():
    z, y = _batch()
    with pytest.raises(ValueError, match="soft"):
        create_base_loss("ldam", COUNTS)(z, F.one_hot(y, K).double())


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_factory_errors():
    assert set(ALL_BASES) <= set(list_base_losses())
    with pytest.raises(ValueError, match="unknown base loss 'nope'; valid: bs, cb, ce"):
        create_base_loss("nope", COUNTS)
    with pytest.raises(TypeError, match="does not accept gama"):
        create_base_loss("focal", COUNTS, gama=2.0)


def test_register_custom_base_loss():
    @register_base_loss("test_squared_margin")
    class SquaredMargin(BaseLoss):
        def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
            return (1 - log_probs.gather(1, labels[:, None]).squeeze(1).exp()) ** 2

    z, y = _batch()
    loss = create_base_loss("test_squared_margin", COUNTS)
    p = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(loss(z, y), ((1 - p) ** 2).mean())
    with pytest.raises(ValueError, match="already registered"):
        register_base_loss("test_squared_margin")(type("Other", (BaseLoss,), {}))
    with pytest.raises(TypeError, match="not a BaseLoss"):
        register_base_loss("test_bad")(int)


# ----------------------------------------------------------------------------- validation
def test_input_validation_messages():
    loss = create_base_loss("ce", COUNTS)
    z = torch.zeros(4, K)
    with pytest.raises(ValueError, match="logits have 5 columns but class_counts has 7 entries"):
        loss(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"label 9 at batch position 2 is out of range; valid labels are 0..6"
    ):
        loss(z, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match=r"label -100 .*ignore_index"):
        loss(z, torch.tensor([0, -100, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        loss(z, torch.zeros(4))
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        loss(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, num_classes\)"):
        loss(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    bad = z.clone()
    bad[2, 3] = float("nan")
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite value.*first in row 2"):
        loss(bad, torch.zeros(4, dtype=torch.long))
    # The check can be switched off (then NaN propagates, as documented).
    assert torch.isnan(
        create_base_loss("ce", COUNTS, validate=False)(bad, torch.zeros(4, dtype=torch.long))
    )
    soft = torch.full((4, K), 0.5)
    with pytest.raises(ValueError, match=r"soft target row 0 sums to 3\.5"):
        loss(z, soft)
    with pytest.raises(ValueError, match="empty batch"):
        loss(torch.zeros(0, K), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    ("counts", "err", "match"),
    [
        ([10, -1, 3], ValueError, r"class_counts\[1\] = -1 is negative"),
        ([10, float("nan")], ValueError, r"class_counts\[1\] = nan is not finite"),
        ([[1, 2], [3, 4]], ValueError, "must be 1-D"),
        ([5], ValueError, "at least 2 classes"),
        ([0, 0, 0], ValueError, "sums to 0"),
        ("abc", TypeError, "sequence of per-class"),
    ],
)
def test_class_count_validation(counts, err, match):
    with pytest.raises(err, match=match):
        create_base_loss("ce", counts)


def test_constructor_parameter_validation():
    with pytest.raises(ValueError, match="label_smoothing"):
        create_base_loss("ce", COUNTS, label_smoothing=1.0)
    with pytest.raises(ValueError, match="gamma"):
        create_base_loss("focal", COUNTS, gamma=-1)
    with pytest.raises(ValueError, match="loss_type"):
        ClassBalancedLoss(COUNTS, loss_type="hinge")
    with pytest.raises(ValueError, match="drw_epoch"):
        create_base_loss("ldam", COUNTS, drw_epoch=-1)
    with pytest.raises(ValueError, match="weight_reduction"):
        create_base_loss("cb", COUNTS, weight_reduction="sum")


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", ALL_BASES)
def test_zero_count_class_is_finite(name):
    counts = [100, 40, 0, 10]
    with pytest.warns(UserWarning, match="zero training samples"):
        loss = create_base_loss(name, counts, drw_epoch=0)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 2, 0])  # the zero-count class as a label too
    out = loss(z, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ALL_BASES)
def test_extreme_logits_give_finite_loss_and_grad(name):
    z = torch.tensor([[1e4, -1e4, 0, 5, -5, 1e4, -1e4]] * 3, requires_grad=True)
    y = torch.tensor([0, 1, 6])
    for gamma_kw in ({},) if name not in ("focal", "cb") else ({"gamma": 0.5}, {"gamma": 2.0}):
        kwargs = dict(gamma_kw)
        if name == "cb":
            for lt in ("softmax", "sigmoid", "focal"):
                out = create_base_loss(name, COUNTS, loss_type=lt, **kwargs)(z, y)
                (g,) = torch.autograd.grad(out, z)
                assert torch.isfinite(out) and torch.isfinite(g).all(), (lt, kwargs)
            continue
        out = create_base_loss(name, COUNTS, **kwargs)(z, y)
        (g,) = torch.autograd.grad(out, z)
        assert torch.isfinite(out) and torch.isfinite(g).all(), kwargs


@pytest.mark.parametrize("name", ALL_BASES)
def test_bf16_autocast_input_gives_float32_loss(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, K)
    x = torch.randn(8, 5)
    y = torch.arange(8) % K
    loss = create_base_loss(name, COUNTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        out = loss(logits, y)
    assert logits.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # Same value as the float32 loss of the bf16-rounded logits: nothing ran in bf16.
    torch.testing.assert_close(out, loss(logits.detach().float(), y))
    out.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_losses_package_imports_only_torch():
    code = (
        "import sys, hf_longtail.losses\n"
        "bad = [m for m in ('transformers', 'datasets', 'hf_longtail.data', 'hf_longtail.metrics',"
        " 'hf_longtail.models', 'hf_longtail.trainer', 'hf_longtail.hub') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
