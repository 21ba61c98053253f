"""CAR: batch surrogate, EMA, power iteration vs exact SVD (value and gradient), state, modes."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_longtail.losses import ConfusionSpectralRegularizer, car_class_weights

COUNTS = [400, 200, 120, 80, 50, 30, 20, 12, 8, 5]
K = len(COUNTS)


# ----------------------------------------------------------------------------- references
def ref_batch_matrix(z, y, tau=1.0, detach_gate=True):
    """Dense K x K batch confusion (rows predicted, columns true), one sample at a time."""
    k = z.shape[1]
    cols = []
    for j in range(k):
        rows = [i for i in range(len(y)) if int(y[i]) == j]
        if not rows:
            cols.append(torch.zeros(k, dtype=z.dtype))
            continue
        acc = torch.zeros(k, dtype=z.dtype)
        for i in rows:
            f = z[i]
            gate = torch.sigmoid(f - f[j])
            if detach_gate:
                gate = gate.detach()
            mask = torch.ones(k, dtype=z.dtype)
            mask[j] = 0
            acc = acc + gate * torch.softmax(f / tau, 0) * mask
        cols.append(acc / len(rows))
    return torch.stack(cols, dim=1)


def ref_weights(counts, r0=0.2):
    m = torch.tensor(counts, dtype=torch.float64)
    m = m / m.sum()
    w = (m + r0) ** -0.5
    return w / w.mean()


def ref_sigma(c_prev, z, y, beta=0.5, tau=1.0, detach_gate=True, counts=COUNTS):
    cbar = beta * c_prev.double() + (1 - beta) * ref_batch_matrix(z, y, tau, detach_gate)
    return torch.linalg.matrix_norm(cbar @ torch.diag(ref_weights(counts)), ord=2)


def _batch(step, b=24, k=K, dtype=torch.float64, scale=1.5):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(b, k, generator=g, dtype=dtype) * scale, torch.randint(
        0, k, (b,), generator=g
    )


# ----------------------------------------------------------------------------- surrogate + EMA
def test_weights_formula_and_zero_counts():
    torch.testing.assert_close(car_class_weights(COUNTS, 0.2), ref_weights(COUNTS, 0.2))
    reg = ConfusionSpectralRegularizer(COUNTS)
    torch.testing.assert_close(reg.weights.double(), ref_weights(COUNTS), rtol=1e-6, atol=1e-7)
    with pytest.warns(UserWarning, match="zero training samples"):
        w = car_class_weights([10, 0, 30], r0=0.2)
    torch.testing.assert_close(w, ref_weights([10, 0, 30], 0.2))
    with (
        pytest.raises(ValueError, match="r0 = 0 with zero-count classes"),
        pytest.warns(UserWarning),
    ):
        ConfusionSpectralRegularizer([10, 0, 30], r0=0.0)


def test_confusion_orientation_rows_predicted_columns_true():
    reg = ConfusionSpectralRegularizer([10, 10, 10])
    z = torch.tensor([[0.0, 0.0, 5.0], [0.0, 1.0, 4.0]])  # two samples of class 0 predicting 2
    reg(z, torch.tensor([0, 0]))
    c = reg.confusion
    assert c.shape == (3, 3)
    assert torch.count_nonzero(c[:, 1:]) == 0  # classes 1, 2 absent: zero columns
    assert c[0, 0] == 0 and c[2, 0] > c[1, 0] > 0
    torch.testing.assert_close(c.double(), 0.5 * ref_batch_matrix(z.double(), torch.tensor([0, 0])))


@pytest.mark.parametrize(("beta", "steps"), [(0.5, 140), (0.9, 40), (0.0, 5)])
def test_ema_recursion_matches_reference(beta, steps):
    # 140 steps at beta = 0.5 cross the lazy-scale fold (scale < 1e-20) twice.
    reg = ConfusionSpectralRegularizer(COUNTS, beta=beta, tau=2.0)
    cbar = torch.zeros(K, K, dtype=torch.float64)
    for step in range(steps):
        z, y = _batch(step, b=12)
        reg(z, y)
        cbar = beta * cbar + (1 - beta) * ref_batch_matrix(z, y, tau=2.0)
        torch.testing.assert_close(reg.confusion.double(), cbar, rtol=1e-5, atol=1e-7)
    assert int(reg.num_steps) == steps
    assert float(reg.ema_scale) >= 1e-20


# ----------------------------------------------------------------------------- sigma vs SVD
def test_value_matches_matrix_norm_after_warmup_on_a_fixed_matrix():
    reg = ConfusionSpectralRegularizer(COUNTS, alpha=0.5)
    z, y = _batch(0, b=64, dtype=torch.float32)
    for _ in range(60):
        c_prev = reg.confusion.clone()
        value = reg(z, y)
    assert value.dtype == torch.float32
    exact = 0.5 * ref_sigma(c_prev, z.double(), y)
    assert abs(value.item() - exact.item()) <= 1e-4 * exact.item()
    w = torch.diag(reg.weights)
    assert value.item() == pytest.approx(
        0.5 * torch.linalg.matrix_norm(reg.confusion @ w, ord=2).item(), rel=1e-4
    )


@pytest.mark.parametrize("k", [10, 300])
def test_auto_solver_picks_dense_for_small_k_and_subspace_above(k):
    from hf_longtail.losses.car import EXACT_SOLVER_MAX_K

    reg = ConfusionSpectralRegularizer([10] * k)
    assert reg.resolved_solver == ("exact" if k <= EXACT_SOLVER_MAX_K else "subspace")


def test_subspace_solver_stops_on_the_residual_and_warm_starts():
    z, y = _batch(2, b=64, dtype=torch.float32)
    reg = ConfusionSpectralRegularizer(COUNTS, solver="subspace", subspace_size=3)
    reg(z, y)
    # First step: M has only batch columns, which lie in the span of the first basis (the
    # batch's coordinate vectors), so one Rayleigh-Ritz is exact.
    assert reg.last_iterations == 1
    assert reg.last_residual <= 1e-4
    for _ in range(40):
        reg(z, y)
    assert reg.last_iterations == 1  # warm start on a converged, fixed matrix
    # A residual that cannot be reached in the allowed iterations is reported, not hidden.
    capped = ConfusionSpectralRegularizer(COUNTS, solver="subspace", max_iterations=1, tol=1e-12)
    with pytest.warns(RuntimeWarning, match="residual"):
        capped(z, y)


@pytest.mark.parametrize("solver", ["exact", "subspace"])
@pytest.mark.parametrize("detach_gate", [True, False])
def test_gradient_matches_autograd_through_exact_svd_after_warmup(detach_gate, solver):
    reg = ConfusionSpectralRegularizer(COUNTS, alpha=1.0, detach_gate=detach_gate, solver=solver)
    z, y = _batch(1, b=48)
    for _ in range(50):
        reg(z, y)
    c_prev = reg.confusion.clone()
    z_ours = z.clone().requires_grad_(True)
    value = reg(z_ours, y)
    value.backward()
    z_ref = z.clone().requires_grad_(True)
    exact = ref_sigma(c_prev, z_ref, y, detach_gate=detach_gate)
    exact.backward()
    assert value.item() == pytest.approx(exact.item(), rel=1e-5)
    torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("solver", ["exact", "subspace"])
def test_value_and_gradient_vs_exact_svd_on_a_random_history(solver):
    reg = ConfusionSpectralRegularizer(COUNTS, alpha=1.0, beta=0.7, tau=1.5, solver=solver)
    for step in range(8):  # a changing EMA: the warm start is not the next batch's answer
        reg(*_batch(step))
    reg.eval()
    z, y = _batch(100)
    z.requires_grad_(True)
    value = reg(z, y)
    (grad,) = torch.autograd.grad(value, z)
    z_ref = z.detach().clone().requires_grad_(True)
    exact = ref_sigma(reg.confusion, z_ref, y, beta=0.7, tau=1.5)
    (grad_ref,) = torch.autograd.grad(exact, z_ref)
    assert value.item() == pytest.approx(exact.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------- state and modes
@pytest.mark.parametrize("solver", ["exact", "subspace"])
@pytest.mark.parametrize("ema", ["global", "per_class"])
def test_state_dict_round_trip_restores_exactly_and_continues_identically(solver, ema):
    reg = ConfusionSpectralRegularizer(COUNTS, solver=solver, ema=ema)
    for step in range(7):
        reg(*_batch(step, dtype=torch.float32))
    state = reg.state_dict()
    assert set(state) == {
        "ema_columns",
        "ema_scale",
        "u",
        "v",
        "basis",
        "basis_image",
        "basis_image_step",
        "num_steps",
    }
    restored = ConfusionSpectralRegularizer(COUNTS, solver=solver, ema=ema)
    restored.load_state_dict(state)
    for name, buf in reg.state_dict().items():
        assert torch.equal(buf, restored.state_dict()[name]), name
    for step in range(7, 12):
        z, y = _batch(step, dtype=torch.float32)
        assert torch.equal(reg(z, y), restored(z, y))
    assert torch.equal(reg.confusion, restored.confusion)
    assert torch.equal(reg.u, restored.u) and int(restored.num_steps) == 12


def test_eval_mode_returns_the_value_without_advancing_state():
    reg = ConfusionSpectralRegularizer(COUNTS)
    for step in range(4):
        reg(*_batch(step, dtype=torch.float32))
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    twin = copy.deepcopy(reg)  # stays in train mode
    z, y = _batch(50, dtype=torch.float32)
    reg.eval()
    value = reg(z, y)
    for name, buf in reg.state_dict().items():
        assert torch.equal(buf, before[name]), name
    assert torch.equal(reg(z, y), value)  # repeatable
    assert torch.equal(twin(z, y), value)  # the value a training step would compute
    assert int(twin.num_steps) == 5 and int(reg.num_steps) == 4
    reg.train()
    reg(z, y)
    assert int(reg.num_steps) == 5


def test_reset_returns_to_zero_ema():
    reg = ConfusionSpectralRegularizer(COUNTS)
    reg(*_batch(0))
    reg.reset()
    fresh = ConfusionSpectralRegularizer(COUNTS)
    for name, buf in reg.state_dict().items():
        assert torch.equal(buf, fresh.state_dict()[name]), name


# ----------------------------------------------------------------------------- numerics / errors
@pytest.mark.parametrize("solver", ["exact", "subspace"])
def test_extreme_logits_stay_finite(solver):
    reg = ConfusionSpectralRegularizer(COUNTS, solver=solver)
    y = torch.arange(8) % K
    # Perfect, extreme predictions: the surrogate is exactly 0 and sigma too, no NaN.
    z = torch.full((8, K), -1e4)
    z[torch.arange(8), y] = 1e4
    z.requires_grad_(True)
    value = reg(z, y)
    (g,) = torch.autograd.grad(value, z)
    assert value.item() == 0.0 and torch.isfinite(g).all()
    assert torch.isfinite(reg.u).all() and torch.linalg.vector_norm(reg.u).item() == pytest.approx(
        1
    )
    # Extreme wrong predictions.
    z2 = torch.full((8, K), -1e4)
    z2[:, 0] = 1e4
    z2.requires_grad_(True)
    value = reg(z2, (torch.arange(8) % (K - 1)) + 1)
    (g,) = torch.autograd.grad(value, z2)
    assert torch.isfinite(value) and value.item() > 0 and torch.isfinite(g).all()


def test_bf16_autocast_input():
    reg = ConfusionSpectralRegularizer(COUNTS)
    layer = torch.nn.Linear(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(16, 4))
        value = reg(logits, torch.arange(16) % K)
    assert logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert reg.ema_columns.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="beta must be in"):
        ConfusionSpectralRegularizer(COUNTS, beta=1.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        ConfusionSpectralRegularizer(COUNTS, alpha=-0.1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        ConfusionSpectralRegularizer(COUNTS, tau=0)
    with pytest.raises(ValueError, match="max_iterations must be >= 1"):
        ConfusionSpectralRegularizer(COUNTS, max_iterations=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        ConfusionSpectralRegularizer(COUNTS, tol=0.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        ConfusionSpectralRegularizer(COUNTS, solver="svd")
    with pytest.raises(ValueError, match="ema must be one of"):
        ConfusionSpectralRegularizer(COUNTS, ema="local")
    with pytest.raises(ValueError, match="weights must be one of"):
        ConfusionSpectralRegularizer(COUNTS, weights="inverse")
    with (
        pytest.raises(ValueError, match="count_offset = 0 with zero-count"),
        pytest.warns(UserWarning),
    ):
        ConfusionSpectralRegularizer([10, 0, 30], weights="count", count_offset=0.0)
    reg = ConfusionSpectralRegularizer(COUNTS)
    with pytest.raises(ValueError, match="logits have 3 columns but class_counts has 10"):
        reg(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 10 at batch position 1 is out of range"):
        reg(torch.zeros(2, K), torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ConfusionSpectralRegularizer(COUNTS, distributed=True)(
            torch.zeros(2, K), torch.tensor([0, 1])
        )


# ----------------------------------------------------------------------------- options
def _cifar100_lt_counts():
    c = torch.arange(100, dtype=torch.float64)
    return (500 * 100 ** (-c / 99)).floor()


def test_weight_forms_formula_and_spread_on_cifar100_lt():
    counts = _cifar100_lt_counts()
    freq = car_class_weights(counts)
    count = car_class_weights(counts, form="count")
    ref = (counts + 10.0) ** -0.5
    torch.testing.assert_close(count, ref / ref.mean())
    assert count.mean().item() == pytest.approx(1.0)
    # The released form is nearly uniform; the earlier count form weights the tail strongly.
    assert freq.max() / freq.min() == pytest.approx(1.11, abs=0.01)
    assert count.max() / count.min() == pytest.approx(5.8, abs=0.1)
    reg = ConfusionSpectralRegularizer(counts, weights="count", count_offset=10.0)
    torch.testing.assert_close(reg.weights.double(), count, rtol=1e-6, atol=1e-7)


def test_gate_margin_matches_reference():
    gamma = 0.7
    z, y = _batch(3, b=16)
    reg = ConfusionSpectralRegularizer(COUNTS, beta=0.0, margin=gamma)
    reg(z, y)
    k = z.shape[1]
    onehot = torch.nn.functional.one_hot(y, k).double()
    gate = torch.sigmoid(gamma + z - (z * onehot).sum(1, keepdim=True))
    ref = (gate * torch.softmax(z, 1) * (1 - onehot)).T @ onehot / onehot.sum(0).clamp_min(1)
    torch.testing.assert_close(reg.confusion.double(), ref, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ref, ref_batch_matrix(z, y))  # the margin changes the surrogate


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_per_class_ema_moves_only_the_batch_columns(beta):
    reg = ConfusionSpectralRegularizer(COUNTS, beta=beta, ema="per_class")
    cbar = torch.zeros(K, K, dtype=torch.float64)
    for step in range(30):
        z, y = _batch(step, b=6)  # 6 samples, 10 classes: most columns are absent each step
        reg(z, y)
        present = torch.zeros(K, dtype=torch.bool)
        present[y] = True
        cbar = torch.where(present, beta * cbar + (1 - beta) * ref_batch_matrix(z, y), cbar)
        torch.testing.assert_close(reg.confusion.double(), cbar, rtol=1e-5, atol=1e-7)
    assert float(reg.ema_scale) == 1.0


def test_state_dict_from_before_the_subspace_solver_loads():
    # hf-longtail 0.1 checkpoints hold no warm-start block: they load, and the value is exact.
    reg = ConfusionSpectralRegularizer(COUNTS, solver="subspace")
    for step in range(5):
        reg(*_batch(step, dtype=torch.float32))
    old = {k: v for k, v in reg.state_dict().items() if k != "basis"}
    restored = ConfusionSpectralRegularizer(COUNTS, solver="subspace")
    restored.load_state_dict(old)
    z, y = _batch(9, dtype=torch.float32)
    assert restored(z, y).item() == pytest.approx(reg(z, y).item(), rel=1e-5)
