"""``LongTailLossConfig``: one flat, serializable description of a long-tail loss (peft style).

A config names a base loss and its parameters, switches CCAR on or off and sets the CAR weight
(``car_weight = 0`` disables CAR). ``build_loss(config, class_counts)`` turns it into a module.
Parameters of bases other than ``base`` are ignored (so a config can be edited from one base to
another); ``base_options`` passes extra keyword arguments to a custom registered base loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from hf_longtail.losses.base import (
    CB_LOSS_TYPES,
    WEIGHT_REDUCTIONS,
    _accepted_kwargs,
    get_base_loss_class,
    list_base_losses,
)
from hf_longtail.losses.car import CAR_EMA_MODES, CAR_SOLVERS, CAR_WEIGHT_FORMS
from hf_longtail.losses.ccar import P_T_SOURCES
from hf_longtail.losses.functional import CCAR_VARIANTS, parse_class_weights

__all__ = ["LongTailLossConfig"]

# Which config field feeds which keyword of each built-in base loss.
_BASE_FIELDS: dict[str, dict[str, str]] = {
    "ce": {"label_smoothing": "label_smoothing"},
    "focal": {"gamma": "focal_gamma"},
    "cb": {"beta": "cb_beta", "loss_type": "cb_loss_type", "gamma": "focal_gamma"},
    "ldam": {"max_m": "ldam_max_m", "s": "ldam_s"},
    "la": {"tau": "la_tau", "label_smoothing": "label_smoothing"},
    "bs": {"label_smoothing": "label_smoothing"},
}
_NUMERIC_FIELDS = (
    "label_smoothing",
    "focal_gamma",
    "cb_beta",
    "ldam_max_m",
    "ldam_s",
    "la_tau",
    "drw_epoch",
    "drw_beta",
    "ccar_omega",
    "car_weight",
    "car_beta",
    "car_r0",
    "car_tau",
    "car_margin",
    "car_count_offset",
    "car_tol",
)
# Keys of configs written before the exact CAR solvers (0.1); dropped with a warning on load.
_LEGACY_KEYS = {
    "car_power_iterations": "car_max_iterations",
    "car_power_tol": "car_tol",
}
_COMMON_FIELDS = {
    "drw_epoch": "drw_epoch",
    "drw_beta": "drw_beta",
    "weight_reduction": "weight_reduction",
    "validate": "validate",
}


@dataclass
class LongTailLossConfig:
    """Configuration of the total loss ``base (+ CCAR) + CAR``.

    Base loss (``base`` in ``ce``, ``focal``, ``cb``, ``ldam``, ``la``, ``bs`` or any registered
    name):
        label_smoothing: ``ce``, ``la``, ``bs``.
        focal_gamma: ``focal``, and ``cb`` with ``cb_loss_type="focal"``.
        cb_beta, cb_loss_type: ``cb`` (effective-number beta; ``softmax``/``sigmoid``/``focal``).
        ldam_max_m, ldam_s: ``ldam`` margin and scale.
        la_tau: ``la`` adjustment strength.
        drw_epoch, drw_beta: deferred re-weighting from ``drw_epoch`` (any base; ``None`` = off).
        weight_reduction: ``auto``/``mean``/``weighted_mean`` batch reduction with class weights.
        class_weights: plain per-class weights (``"auto"``: inverse frequency, mean 1; or one
            positive number per class), from epoch 0 or ``drw_epoch``; not with ``cb``.
        base_options: extra keyword arguments for the base loss (custom registered losses).

    CCAR (``ccar`` on/off): ``ccar_omega`` in (0, 1], ``ccar_variant`` (``paper``/``e_minus_f``/``notebook``),
    ``ccar_detach_weight``, ``ccar_p_t_from`` (``adjusted``/``raw``).

    CAR: ``car_weight`` = alpha >= 0 (0 disables), ``car_beta`` in [0, 1), ``car_r0`` >= 0,
    ``car_tau`` > 0, ``car_detach_gate``, ``car_margin`` (gate margin gamma, 0), ``car_weights``
    (``frequency``/``count`` class-weight form), ``car_count_offset`` > 0 (count form),
    ``car_ema`` (``global``/``per_class``), ``car_solver`` (``auto``/``exact``/``subspace``),
    ``car_subspace_size`` >= 1, ``car_max_iterations`` >= 1, ``car_tol`` > 0 (residual bound on
    the top singular pair). See :class:`~hf_longtail.losses.ConfusionSpectralRegularizer`.

    ``validate``: check labels and logits on every call (one device sync per step).
    """

    base: str = field(
        default="ce",
        metadata={
            "aliases": ["--loss"],
            "help": "Base loss: ce, focal, cb, ldam, la, bs or a registered name (also --loss, "
            "and the config-file key 'loss').",
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing in [0, 1) (ce, la, bs)."}
    )
    focal_gamma: float = field(
        default=2.0, metadata={"help": "Focal gamma >= 0 (focal; cb with cb_loss_type focal)."}
    )
    cb_beta: float = field(
        default=0.9999, metadata={"help": "Class-balanced effective-number beta in [0, 1)."}
    )
    cb_loss_type: Literal[CB_LOSS_TYPES] = field(
        default="softmax", metadata={"help": "Class-balanced loss form."}
    )
    ldam_max_m: float = field(default=0.5, metadata={"help": "LDAM largest margin (>= 0)."})
    ldam_s: float = field(default=30.0, metadata={"help": "LDAM logit scale (> 0)."})
    la_tau: float = field(default=1.0, metadata={"help": "Logit-adjusted loss tau."})
    drw_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Deferred re-weighting from this epoch (e.g. LDAM-DRW: 160); off if unset."
        },
    )
    drw_beta: float = field(
        default=0.9999, metadata={"help": "DRW effective-number beta in [0, 1)."}
    )
    weight_reduction: Literal[WEIGHT_REDUCTIONS] = field(
        default="auto", metadata={"help": "Batch reduction with class weights."}
    )
    # A string on the command line ("auto" or "1,2,0.5"); __post_init__ makes a list of it.
    class_weights: list[float] | str | None = field(
        default=None,
        metadata={
            "help": "Plain per-class loss weights (weighted CE with base ce): 'auto' = inverse "
            "frequency normalised to mean 1, w_c = (1/N_c) / mean_j(1/N_j), or one positive "
            "weight per class, '1,2.5,4'. From epoch 0, or from drw_epoch if set; not with cb."
        },
    )
    # ``str``/``None`` so the command line can pass it as JSON; __post_init__ makes it a dict.
    base_options: dict[str, Any] | str | None = field(
        default_factory=dict,
        metadata={"help": "Extra keyword arguments of a custom base loss, as a JSON object."},
    )
    ccar: bool = field(default=False, metadata={"help": "Wrap the base loss in CCAR."})
    ccar_omega: float = field(
        default=0.75, metadata={"help": "CCAR phase threshold omega in (0, 1]."}
    )
    ccar_variant: Literal[CCAR_VARIANTS] = field(
        default="paper", metadata={"help": "CCAR weight formula."}
    )
    ccar_detach_weight: bool = field(
        default=False, metadata={"help": "CCAR as a pure reweighting (no gradient via Omega)."}
    )
    ccar_p_t_from: Literal[P_T_SOURCES] = field(
        default="adjusted",
        metadata={"help": "p_t from the base loss's adjusted logits or the raw logits."},
    )
    car_weight: float = field(default=0.0, metadata={"help": "CAR alpha >= 0 (0 disables CAR)."})
    car_beta: float = field(default=0.5, metadata={"help": "CAR EMA beta in [0, 1)."})
    car_r0: float = field(default=0.2, metadata={"help": "CAR frequency-weight offset r0 >= 0."})
    car_tau: float = field(default=1.0, metadata={"help": "CAR softmax temperature > 0."})
    car_detach_gate: bool = field(
        default=True, metadata={"help": "No gradient through CAR's sigmoid gate."}
    )
    car_margin: float = field(
        default=0.0, metadata={"help": "CAR gate margin gamma in sigmoid(gamma + f_i - f_y)."}
    )
    car_weights: Literal[CAR_WEIGHT_FORMS] = field(
        default="frequency",
        metadata={"help": "CAR class weights: (N_j/N + r0)^-1/2 or (N_j + offset)^-1/2."},
    )
    car_count_offset: float = field(
        default=10.0, metadata={"help": "CAR count-form offset > 0 (car_weights count)."}
    )
    car_ema: Literal[CAR_EMA_MODES] = field(
        default="global", metadata={"help": "CAR EMA: global (published) or batch columns only."}
    )
    car_solver: Literal[CAR_SOLVERS] = field(
        default="auto", metadata={"help": "CAR top singular pair solver."}
    )
    car_subspace_size: int = field(
        default=8, metadata={"help": "CAR subspace solver block size >= 1."}
    )
    car_max_iterations: int = field(
        default=100, metadata={"help": "CAR solver iteration cap >= 1."}
    )
    car_tol: float = field(
        default=1e-4, metadata={"help": "CAR residual bound on the top singular pair (> 0)."}
    )
    validate: bool = field(
        default=True,
        metadata={"help": "Check labels and logits on every call (one device sync per step)."},
    )

    def __post_init__(self) -> None:
        """Validate every field; errors name the field, the value and the valid range."""
        get_base_loss_class(self.base)  # unknown name -> ValueError listing the valid ones
        for name in ("ccar", "ccar_detach_weight", "car_detach_gate", "validate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        for name in _NUMERIC_FIELDS:
            value = getattr(self, name)
            if value is None and name == "drw_epoch":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LongTailLossConfig.{name} must be a number; got {value!r}")
            # NaN fails every range check below; inf would pass some (car_weight >= 0, la_tau).
            if name != "drw_epoch" and not math.isfinite(value):
                raise ValueError(f"LongTailLossConfig.{name} must be finite; got {value!r}")
        if self.base_options is None:
            self.base_options = {}
        elif isinstance(self.base_options, str):  # the command line passes JSON
            try:
                self.base_options = json.loads(self.base_options)
            except ValueError as err:
                raise ValueError(
                    f"LongTailLossConfig.base_options must be a JSON object; got "
                    f"{self.base_options!r} ({err})"
                ) from None
        if not isinstance(self.base_options, dict):
            raise TypeError(f"base_options must be a dict; got {type(self.base_options).__name__}")
        if self.class_weights is not None and not (
            isinstance(self.class_weights, str) and self.class_weights.strip().lower() == "auto"
        ):
            try:
                self.class_weights = parse_class_weights(self.class_weights)
            except ValueError as err:
                raise ValueError(f"LongTailLossConfig.{err}") from None
        elif isinstance(self.class_weights, str):
            self.class_weights = "auto"
        if self.class_weights is not None and self.base == "cb":
            raise ValueError(
                "LongTailLossConfig.class_weights cannot be combined with base 'cb', which has "
                "its own class weights; use base 'ce' for plain weighted cross-entropy."
            )
        _check(
            0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", self.label_smoothing
        )
        _check(self.focal_gamma >= 0, "focal_gamma", ">= 0", self.focal_gamma)
        _check(0.0 <= self.cb_beta < 1.0, "cb_beta", "in [0, 1)", self.cb_beta)
        _check(
            self.cb_loss_type in CB_LOSS_TYPES,
            "cb_loss_type",
            f"one of {CB_LOSS_TYPES}",
            self.cb_loss_type,
        )
        _check(self.ldam_max_m >= 0, "ldam_max_m", ">= 0", self.ldam_max_m)
        _check(self.ldam_s > 0, "ldam_s", "> 0", self.ldam_s)
        _check(
            self.drw_epoch is None or self.drw_epoch >= 0,
            "drw_epoch",
            ">= 0 or None",
            self.drw_epoch,
        )
        _check(0.0 <= self.drw_beta < 1.0, "drw_beta", "in [0, 1)", self.drw_beta)
        _check(
            self.weight_reduction in WEIGHT_REDUCTIONS,
            "weight_reduction",
            f"one of {WEIGHT_REDUCTIONS}",
            self.weight_reduction,
        )
        _check(0.0 < self.ccar_omega <= 1.0, "ccar_omega", "in (0, 1]", self.ccar_omega)
        _check(
            self.ccar_variant in CCAR_VARIANTS,
            "ccar_variant",
            f"one of {CCAR_VARIANTS}",
            self.ccar_variant,
        )
        _check(
            self.ccar_p_t_from in P_T_SOURCES,
            "ccar_p_t_from",
            f"one of {P_T_SOURCES}",
            self.ccar_p_t_from,
        )
        _check(self.car_weight >= 0, "car_weight", ">= 0 (0 disables CAR)", self.car_weight)
        _check(0.0 <= self.car_beta < 1.0, "car_beta", "in [0, 1)", self.car_beta)
        _check(self.car_r0 >= 0, "car_r0", ">= 0", self.car_r0)
        _check(self.car_tau > 0, "car_tau", "> 0", self.car_tau)
        _check(self.car_count_offset > 0, "car_count_offset", "> 0", self.car_count_offset)
        _check(self.car_tol > 0, "car_tol", "> 0", self.car_tol)
        for name, choices in (
            ("car_weights", CAR_WEIGHT_FORMS),
            ("car_ema", CAR_EMA_MODES),
            ("car_solver", CAR_SOLVERS),
        ):
            _check(getattr(self, name) in choices, name, f"one of {choices}", getattr(self, name))
        for name in ("car_subspace_size", "car_max_iterations"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            _check(ok, name, "an int >= 1", value)
        if self.base_options:
            accepted = _accepted_kwargs(get_base_loss_class(self.base))
            unknown = sorted(set(self.base_options) - accepted)
            if unknown:
                raise ValueError(
                    f"base_options {unknown} are not parameters of base loss {self.base!r}; "
                    f"accepted: {', '.join(sorted(accepted))}"
                )

    @property
    def supports_label_smoothing(self) -> bool:
        """Whether ``label_smoothing`` reaches the base loss (``ce``, ``la``, ``bs``)."""
        return "label_smoothing" in _BASE_FIELDS.get(self.base, {})

    @property
    def car_enabled(self) -> bool:
        """Whether CAR is part of the loss (``car_weight > 0``)."""
        return self.car_weight > 0

    def base_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_base_loss(self.base, counts, **kwargs)``."""
        mapping = {**_BASE_FIELDS.get(self.base, {}), **_COMMON_FIELDS}
        kwargs = {key: getattr(self, attr) for key, attr in mapping.items()}
        if self.class_weights is not None:  # only then: custom bases need not know the keyword
            kwargs["class_weights"] = self.class_weights
        kwargs.update(self.base_options)
        return kwargs

    def ccar_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``CCARLoss(counts, base=..., **kwargs)``: every ``ccar_*``
        field without its prefix (``ccar`` itself, the switch, excluded), plus ``validate``."""
        return self._prefixed_kwargs("ccar_")

    def car_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ConfusionSpectralRegularizer(counts, **kwargs)``: every
        ``car_*`` field without its prefix (``car_weight`` as ``alpha``), plus ``validate``."""
        kwargs = self._prefixed_kwargs("car_")
        kwargs["alpha"] = kwargs.pop("weight")
        return kwargs

    def _prefixed_kwargs(self, prefix: str) -> dict[str, Any]:
        kwargs = {
            f.name[len(prefix) :]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.startswith(prefix)
        }
        kwargs["validate"] = self.validate
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of every field (JSON/YAML serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongTailLossConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise naming them."""
        if not isinstance(data, dict):
            raise TypeError(
                f"LongTailLossConfig.from_dict expects a dict; got {type(data).__name__}"
            )
        legacy = sorted(set(data) & set(_LEGACY_KEYS))
        if legacy:
            warnings.warn(
                f"LongTailLossConfig: ignoring {', '.join(legacy)} (the inexact power iteration "
                "of hf-longtail 0.1, whose CAR gradient was wrong on real trajectories); CAR now "
                f"uses {', '.join(_LEGACY_KEYS[k] for k in legacy)} with an exact solver",
                UserWarning,
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k not in _LEGACY_KEYS}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"unknown LongTailLossConfig key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**data)

    @staticmethod
    def valid_bases() -> list[str]:
        """Registered base-loss names."""
        return list_base_losses()


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"LongTailLossConfig.{name} must be {expected}; got {value!r}")
