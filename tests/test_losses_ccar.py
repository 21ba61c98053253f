"""CCAR: weight formula, composition with every base, and the paper's analytic gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_longtail.losses import CCARLoss, ccar_weight, create_base_loss

COUNTS = [600, 300, 100, 50, 30, 15, 5]
K = len(COUNTS)
FREQ = [c / sum(COUNTS) for c in COUNTS]
VARIANTS = ["paper", "e_minus_f", "notebook"]


def _batch(b=12, dtype=torch.float64, confident_rows=4):
    g = torch.Generator().manual_seed(99)
    z = torch.randn(b, K, generator=g, dtype=dtype)
    y = torch.randint(0, K, (b,), generator=g)
    # Some rows very confident in the true class: both CCAR phases (p_t < omega, p_t >= omega).
    z[:confident_rows].scatter_(1, y[:confident_rows, None], 6.0)
    return z, y


def ref_omega(p_t: float, f: float, omega: float, variant: str) -> float:
    if variant == "notebook":  # the author's notebook: base e - f_c, no dual phase
        return (math.e - f) ** (omega - p_t)
    f_prime = f if p_t < omega else 1.0 - f
    if variant == "paper":
        return math.exp(-f_prime) ** (omega - p_t)
    return (math.e - f_prime) ** (omega - p_t)


def _p_t(z, y, shift=None):
    zz = z if shift is None else z + shift
    return torch.softmax(zz, 1).gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_formula_both_phases(variant):
    p = torch.tensor([0.0, 0.1, 0.5, 0.7499, 0.75, 0.9, 1.0], dtype=torch.float64)
    for f in (0.0, 0.01, 0.3, 1.0):
        got = ccar_weight(p, torch.full_like(p, f), 0.75, variant)
        expected = torch.tensor(
            [ref_omega(float(x), f, 0.75, variant) for x in p], dtype=torch.float64
        )
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ccar_ce_value_matches_reference(variant):
    z, y = _batch()
    loss = CCARLoss(COUNTS, base="ce", omega=0.75, variant=variant)
    p = _p_t(z, y)
    assert (p >= 0.75).any() and (p < 0.75).any()
    expected = sum(
        ref_omega(float(p[i]), FREQ[int(y[i])], 0.75, variant) * -math.log(float(p[i]))
        for i in range(len(y))
    ) / len(y)
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_analytic_psi_gradient_matches_autograd(variant):
    """dL_i/dz = Psi (p - e_t) / B, Psi = gamma^(omega - p_t) (1 - p_t ln(gamma) ln(p_t))."""
    z, y = _batch()
    z.requires_grad_(True)
    omega = 0.75
    loss = CCARLoss(COUNTS, base="ce", omega=omega, variant=variant)
    (grad,) = torch.autograd.grad(loss(z, y), z)
    p = torch.softmax(z.detach(), 1)
    p_t = p.gather(1, y[:, None]).squeeze(1)
    f = torch.tensor(FREQ, dtype=torch.float64)[y]
    f_prime = f if variant == "notebook" else torch.where(p_t < omega, f, 1 - f)
    gamma = torch.exp(-f_prime) if variant == "paper" else math.e - f_prime
    psi = gamma ** (omega - p_t) * (1 - p_t * torch.log(gamma) * torch.log(p_t))
    analytic = psi[:, None] * (p - F.one_hot(y, K)) / len(y)
    torch.testing.assert_close(grad, analytic, rtol=1e-6, atol=1e-9)


def test_notebook_variant_has_no_dual_phase():
    """Below omega the notebook weight is e_minus_f's; above it the base stays e - f_c."""
    p = torch.tensor([0.05, 0.5, 0.74, 0.76, 0.9, 1.0], dtype=torch.float64)
    f = torch.full_like(p, 0.3)
    notebook = ccar_weight(p, f, 0.75, "notebook")
    e_minus_f = ccar_weight(p, f, 0.75, "e_minus_f")
    low = p < 0.75
    torch.testing.assert_close(notebook[low], e_minus_f[low])
    torch.testing.assert_close(notebook[~low], (math.e - 0.3) ** (0.75 - p[~low]))
    assert (notebook[~low] != e_minus_f[~low]).all()  # 1 - f_c would have been e - 0.7


def test_notebook_recipe_balanced_softmax_matches_float64_reference():
    """The author's pairing: balanced softmax, p_t from z + log N, plain batch mean."""
    z, y = _batch()
    loss = CCARLoss(COUNTS, base="bs", variant="notebook")
    total = 0.0
    for i in range(len(y)):
        shifted = [float(z[i, c]) + math.log(COUNTS[c]) for c in range(K)]
        top = max(shifted)
        log_norm = top + math.log(sum(math.exp(v - top) for v in shifted))
        log_p = shifted[int(y[i])] - log_norm
        omega_i = (math.e - FREQ[int(y[i])]) ** (0.75 - math.exp(log_p))
        total += omega_i * -log_p
    p_adjusted = _p_t(z, y, torch.log(torch.tensor(COUNTS, dtype=torch.float64)))
    assert (p_adjusted >= 0.75).any() and (p_adjusted < 0.75).any()  # both sides of omega
    # rel 1e-7: the module holds f_c and log N_c in float32.
    assert loss(z, y).item() == pytest.approx(total / len(y), rel=1e-7)


@pytest.mark.parametrize("base", ["bs", "ce", "la"])
def test_notebook_gradcheck(base):
    z, y = _batch()
    z.requires_grad_(True)
    loss = CCARLoss(COUNTS, base=base, variant="notebook")
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (z,))


def test_detach_weight_gives_pure_reweighting_gradient():
    z, y = _batch()
    z.requires_grad_(True)
    loss = CCARLoss(COUNTS, detach_weight=True)
    (grad,) = torch.autograd.grad(loss(z, y), z)
    p = torch.softmax(z.detach(), 1)
    p_t = p.gather(1, y[:, None]).squeeze(1)
    w = torch.tensor(
        [ref_omega(float(p_t[i]), FREQ[int(y[i])], 0.75, "paper") for i in range(len(y))],
        dtype=torch.float64,
    )
    torch.testing.assert_close(grad, w[:, None] * (p - F.one_hot(y, K)) / len(y))


@pytest.mark.parametrize(
    ("base", "kwargs"),
    [
        ("ce", {"label_smoothing": 0.1}),
        ("focal", {"gamma": 2.0}),
        ("cb", {"loss_type": "focal"}),
        ("ldam", {"drw_epoch": 0}),
        ("la", {"tau": 1.0}),
        ("bs", {}),
    ],
)
def test_ccar_wraps_every_base(base, kwargs):
    z, y = _batch()
    ccar = CCARLoss(COUNTS, base=base, **kwargs)
    base_loss = create_base_loss(base, COUNTS, **kwargs)
    per = base_loss.per_sample(z, y)
    # p_t from the logits the base loss itself applies its softmax to.
    adjusted = base_loss.adjust_logits(z, y)
    p = _p_t(adjusted, y)
    w = torch.tensor(
        [ref_omega(float(p[i]), FREQ[int(y[i])], 0.75, "paper") for i in range(len(y))],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ccar(z, y), (w * per).mean())


def test_p_t_from_adjusted_vs_raw():
    z, y = _batch()
    log_prior = torch.tensor([math.log(f) for f in FREQ], dtype=torch.float64)
    per = create_base_loss("la", COUNTS).per_sample(z, y)
    for source, shift in (("adjusted", log_prior), ("raw", None)):
        p = _p_t(z, y, shift)
        w = torch.tensor(
            [ref_omega(float(p[i]), FREQ[int(y[i])], 0.75, "paper") for i in range(len(y))],
            dtype=torch.float64,
        )
        got = CCARLoss(COUNTS, base="la", p_t_from=source)(z, y)
        torch.testing.assert_close(got, (w * per).mean())
    assert CCARLoss(COUNTS, base="la")(z, y) != CCARLoss(COUNTS, base="la", p_t_from="raw")(z, y)


def test_soft_targets_use_argmax_class_for_the_weight():
    z, y = _batch()
    g = torch.Generator().manual_seed(3)
    other = torch.randint(0, K, y.shape, generator=g)
    t = 0.7 * F.one_hot(y, K).double() + 0.3 * F.one_hot(other, K).double()
    per = create_base_loss("ce", COUNTS).per_sample(z, t)
    p = _p_t(z, y)  # argmax of t is y (0.7 > 0.3, or 1.0 when other == y)
    w = torch.tensor(
        [ref_omega(float(p[i]), FREQ[int(y[i])], 0.75, "paper") for i in range(len(y))],
        dtype=torch.float64,
    )
    torch.testing.assert_close(CCARLoss(COUNTS)(z, t), (w * per).mean())


def test_zero_count_class_weight_is_finite():
    counts = [100, 0, 10]
    with pytest.warns(UserWarning, match="zero training samples"):
        loss = CCARLoss(counts, detach_weight=True)
    z = torch.tensor([[0.0, 0.0, 0.0], [0.0, 20.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 1])
    out = loss(z, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    # f = 0: Omega = 1 below omega; above it f' = 1 gives exp(-(omega - p_t)).
    p = _p_t(z.detach(), y)
    expected = (-torch.log(p[0]) + math.exp(-(0.75 - float(p[1]))) * -torch.log(p[1])) / 2
    torch.testing.assert_close(out.detach(), expected)


def test_extreme_logits_and_bf16():
    z = torch.tensor([[1e4, -1e4, 0, 0, 0, 0, 0], [-1e4, 1e4, 0, 0, 0, 0, 0]], requires_grad=True)
    y = torch.tensor([0, 0])
    for variant in VARIANTS:
        out = CCARLoss(COUNTS, variant=variant)(z, y)
        (g,) = torch.autograd.grad(out, z)
        assert torch.isfinite(out) and torch.isfinite(g).all()
    layer = torch.nn.Linear(3, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(5, 3))
        out = CCARLoss(COUNTS, base="focal")(logits, torch.arange(5))
    assert logits.dtype == torch.bfloat16 and out.dtype == torch.float32 and torch.isfinite(out)


def test_parameter_errors():
    with pytest.raises(ValueError, match=r"omega must be in \(0, 1\]"):
        CCARLoss(COUNTS, omega=0.0)
    with pytest.raises(
        ValueError, match="unknown CCAR variant 'exp'; valid: paper, e_minus_f, notebook"
    ):
        CCARLoss(COUNTS, variant="exp")
    with pytest.raises(ValueError, match="p_t_from"):
        CCARLoss(COUNTS, p_t_from="model")
    with pytest.raises(TypeError, match="base_kwargs"):
        CCARLoss(COUNTS, base=create_base_loss("ce", COUNTS), label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown base loss"):
        CCARLoss(COUNTS, base="hinge")
    with pytest.raises(ValueError, match=r"label 7 .* out of range"):
        CCARLoss(COUNTS)(torch.zeros(2, K), torch.tensor([0, 7]))


def test_set_epoch_reaches_the_base_drw():
    z, y = _batch()
    loss = CCARLoss(COUNTS, base="ldam", drw_epoch=5)
    before = loss(z, y)
    loss.set_epoch(5)
    assert loss.base.weights_active and loss(z, y) != before
