"""LongTailLossConfig (validation, serialization) and build_loss / LongTailLoss composition."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_longtail.losses import (
    BaseLoss,
    CCARLoss,
    ConfusionSpectralRegularizer,
    LongTailLoss,
    LongTailLossConfig,
    build_loss,
    create_base_loss,
    head_class_mask,
    register_base_loss,
)

COUNTS = [500, 250, 100, 60, 30, 10, 4]
K = len(COUNTS)


def _batch(step=0, b=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(b, K, generator=g, dtype=dtype) * 2, torch.randint(0, K, (b,), generator=g)


# ----------------------------------------------------------------------------- config
def test_round_trip_through_json():
    cfg = LongTailLossConfig(
        base="ldam", drw_epoch=160, ccar=True, ccar_variant="e_minus_f", car_weight=0.3
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert LongTailLossConfig.from_dict(data) == cfg
    assert LongTailLossConfig.from_dict({}) == LongTailLossConfig()


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"unknown LongTailLossConfig key.*car_alpha, omega"):
        LongTailLossConfig.from_dict({"base": "ce", "omega": 0.5, "car_alpha": 1.0})
    with pytest.raises(TypeError, match="expects a dict"):
        LongTailLossConfig.from_dict([("base", "ce")])


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (
            {"base": "hinge"},
            ValueError,
            "unknown base loss 'hinge'; valid: bs, cb, ce, focal, la, ldam",
        ),
        ({"ccar_omega": 0.0}, ValueError, r"ccar_omega must be in \(0, 1\]; got 0.0"),
        ({"ccar_omega": 1.5}, ValueError, "ccar_omega"),
        ({"car_weight": -1.0}, ValueError, "car_weight must be >= 0"),
        ({"car_beta": 1.0}, ValueError, r"car_beta must be in \[0, 1\)"),
        ({"car_tau": 0.0}, ValueError, "car_tau"),
        ({"car_r0": -0.1}, ValueError, "car_r0"),
        ({"ccar_variant": "exp"}, ValueError, "ccar_variant must be one of"),
        ({"cb_loss_type": "hinge"}, ValueError, "cb_loss_type"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"drw_epoch": -2}, ValueError, "drw_epoch"),
        ({"car_max_iterations": 0}, ValueError, "car_max_iterations must be an int >= 1"),
        ({"car_subspace_size": 2.5}, ValueError, "car_subspace_size must be an int >= 1"),
        ({"car_tol": 0.0}, ValueError, "car_tol must be > 0"),
        ({"car_count_offset": -1.0}, ValueError, "car_count_offset must be > 0"),
        ({"car_margin": float("inf")}, ValueError, "car_margin must be finite"),
        ({"car_solver": "svd"}, ValueError, "car_solver must be one of"),
        ({"car_ema": "local"}, ValueError, "car_ema must be one of"),
        ({"car_weights": "inverse"}, ValueError, "car_weights must be one of"),
        ({"ccar": "yes"}, TypeError, "ccar must be a bool"),
        ({"car_weight": "0.5"}, TypeError, "car_weight must be a number"),
        ({"base": "focal", "base_options": {"gama": 1}}, ValueError, r"base_options \['gama'\]"),
    ],
)
def test_post_init_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        LongTailLossConfig(**kwargs)


def test_configs_from_the_inexact_solver_era_load_with_a_warning():
    # Run records of hf-longtail 0.1 hold the power-iteration knobs; they are dropped, loudly.
    old = {"base": "ce", "car_weight": 0.5, "car_power_iterations": 3, "car_power_tol": 1e-4}
    with pytest.warns(UserWarning, match="car_power_iterations, car_power_tol"):
        cfg = LongTailLossConfig.from_dict(old)
    assert cfg.car_weight == 0.5 and cfg.car_solver == "auto"


def test_car_options_reach_the_regularizer():
    cfg = LongTailLossConfig(
        car_weight=0.5,
        car_margin=0.3,
        car_weights="count",
        car_count_offset=5.0,
        car_ema="per_class",
        car_solver="subspace",
        car_subspace_size=4,
        car_max_iterations=7,
        car_tol=1e-3,
    )
    reg = build_loss(cfg, COUNTS).regularizer
    assert (reg.margin, reg.weight_form, reg.count_offset, reg.ema) == (
        0.3,
        "count",
        5.0,
        "per_class",
    )
    assert (reg.resolved_solver, reg.subspace_size, reg.max_iterations, reg.tol) == (
        "subspace",
        4,
        7,
        1e-3,
    )


def test_base_loss_kwargs_map_fields_to_the_chosen_base():
    cfg = LongTailLossConfig(base="focal", focal_gamma=1.0, label_smoothing=0.1)
    kw = cfg.base_loss_kwargs()
    assert kw["gamma"] == 1.0 and "label_smoothing" not in kw
    assert LongTailLossConfig(base="ldam", ldam_s=10).base_loss_kwargs()["s"] == 10
    assert LongTailLossConfig(base="la", la_tau=0.5).base_loss_kwargs()["tau"] == 0.5


# ----------------------------------------------------------------------------- build_loss
@pytest.mark.parametrize("base", ["ce", "focal", "cb", "ldam", "la", "bs"])
@pytest.mark.parametrize(
    ("ccar", "car_weight"), [(False, 0.0), (True, 0.0), (True, 0.5), (False, 0.3)]
)
def test_total_equals_the_composition_of_its_parts(base, ccar, car_weight):
    cfg = LongTailLossConfig(base=base, ccar=ccar, car_weight=car_weight)
    loss = build_loss(cfg, COUNTS)
    assert isinstance(loss, LongTailLoss)
    assert isinstance(loss.criterion, CCARLoss) == ccar
    assert (loss.regularizer is not None) == (car_weight > 0)
    kwargs = cfg.base_loss_kwargs()
    part = (
        CCARLoss(COUNTS, base=base, **kwargs) if ccar else create_base_loss(base, COUNTS, **kwargs)
    )
    reg = ConfusionSpectralRegularizer(COUNTS, alpha=car_weight) if car_weight else None
    for step in range(3):  # several steps: the CAR EMA must advance identically
        z, y = _batch(step)
        expected = part(z, y) + (reg(z, y) if reg is not None else 0.0)
        torch.testing.assert_close(loss(z, y), expected)


def test_last_stats():
    loss = build_loss(LongTailLossConfig(base="ce", ccar=True, car_weight=0.5), COUNTS)
    z, y = _batch(3, b=32)
    reg_twin = ConfusionSpectralRegularizer(COUNTS, alpha=0.5)
    total = loss(z, y)
    stats = loss.last_stats
    assert set(stats) == {
        "base_loss",
        "ccar_loss",
        "ccar_weight_mean",
        "ccar_weight_head",
        "ccar_weight_tail",
        "car_sigma",
        "car_loss",
        "loss",
    }
    assert all(
        v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in stats.values()
    )
    # Independent weights: paper formula with f_c = N_c / N.
    freq = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    p_t = torch.softmax(z.double(), 1).gather(1, y[:, None]).squeeze(1)
    f = freq[y]
    f_prime = torch.where(p_t < 0.75, f, 1 - f)
    omega = torch.exp(-f_prime * (0.75 - p_t))
    head = torch.tensor([c > 100 for c in COUNTS])[y]  # many-shot (the shared rule)
    assert head.any() and (~head).any()
    torch.testing.assert_close(
        stats["ccar_weight_mean"].double(), omega.mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        stats["ccar_weight_head"].double(), omega[head].mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        stats["ccar_weight_tail"].double(), omega[~head].mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(stats["base_loss"], torch.nn.functional.cross_entropy(z, y))
    torch.testing.assert_close(stats["car_loss"], reg_twin(z, y).detach())
    torch.testing.assert_close(stats["car_sigma"], stats["car_loss"] / 0.5)
    torch.testing.assert_close(stats["loss"], total.detach())
    torch.testing.assert_close(stats["loss"], stats["ccar_loss"] + stats["car_loss"])
    plain = build_loss(None, COUNTS)
    plain(z, y)
    assert set(plain.last_stats) == {"base_loss", "loss"}


def test_head_classes_are_the_many_shot_classes_of_the_shared_rule():
    """The losses' head/tail statistics use the metrics' and the card's many-shot rule."""
    from hf_longtail.class_counts import ShotThresholds

    counts = [500, 101, 100, 40, 19, 3]
    assert head_class_mask(counts).tolist() == [ShotThresholds().group(n) == "many" for n in counts]
    assert head_class_mask(counts).tolist() == [True, True, False, False, False, False]
    assert head_class_mask(counts, many_threshold=30).tolist() == [True] * 4 + [False] * 2
    assert not head_class_mask([7, 7, 7]).any()
    loss = build_loss(None, counts, many_threshold=30)
    assert loss.head_classes.tolist() == [True] * 4 + [False] * 2


def test_set_epoch_drives_drw_and_state_dict_captures_everything():
    loss = build_loss({"base": "ldam", "drw_epoch": 2, "ccar": True, "car_weight": 0.5}, COUNTS)
    z, y = _batch(1)
    before = loss(z, y).item()
    loss.set_epoch(2.5)
    assert loss.base_loss.weights_active
    state = loss.state_dict()
    assert {"regularizer.ema_columns", "regularizer.u", "regularizer.num_steps"} <= set(state)
    restored = build_loss({"base": "ldam", "drw_epoch": 2, "ccar": True, "car_weight": 0.5}, COUNTS)
    restored.load_state_dict(state)
    assert restored.base_loss.epoch == 2.5
    z2, y2 = _batch(2)
    assert torch.equal(loss(z2, y2), restored(z2, y2))
    assert loss(z2, y2).item() != before


def test_eval_mode_propagates_to_car():
    loss = build_loss(LongTailLossConfig(car_weight=0.5), COUNTS)
    loss.eval()
    loss(*_batch(0))
    assert int(loss.regularizer.num_steps) == 0
    loss.train()
    loss(*_batch(0))
    assert int(loss.regularizer.num_steps) == 1


def test_bf16_logits_give_float32_total_and_extreme_logits_are_finite():
    loss = build_loss(LongTailLossConfig(base="la", ccar=True, car_weight=0.5), COUNTS)
    layer = torch.nn.Linear(3, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(8, 3))
        total = loss(logits, torch.arange(8) % K)
    assert logits.dtype == torch.bfloat16 and total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(layer.weight.grad).all()
    z = torch.full((4, K), -1e4)
    z[:, 0] = 1e4
    z.requires_grad_(True)
    total = loss(z, torch.tensor([0, 1, 2, 6]))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all()


def test_build_loss_inputs():
    assert isinstance(build_loss(None, COUNTS).criterion, BaseLoss)
    with pytest.raises(TypeError, match="LongTailLossConfig or a dict"):
        build_loss("ce", COUNTS)
    with pytest.raises(ValueError, match="logits have 5 columns but class_counts has 7"):
        build_loss(None, COUNTS)(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))


def test_custom_base_through_config_base_options():
    @register_base_loss("test_power_nll")
    class PowerNLL(BaseLoss):
        def __init__(self, class_counts, *, power: float = 1.0, **kwargs):
            super().__init__(class_counts, **kwargs)
            self.power = power

        def unweighted_loss(self, log_probs, adjusted, target, labels, soft):
            return (-log_probs.gather(1, labels[:, None]).squeeze(1)) ** self.power

    cfg = LongTailLossConfig(base="test_power_nll", base_options={"power": 2.0})
    z, y = _batch(5, dtype=torch.float64)
    nll = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(build_loss(cfg, COUNTS)(z, y), (nll**2).mean().float())
    assert math.isclose(LongTailLossConfig.from_dict(cfg.to_dict()).base_options["power"], 2.0)
