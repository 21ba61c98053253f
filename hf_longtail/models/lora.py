"""LoRA fine-tuning of an image classifier through ``peft`` (LIFT-style light fine-tuning).

:func:`apply_lora` wraps a model in a ``peft.PeftModel``: LoRA adapters on the chosen layers
(``W x + (alpha / r) B A x``, ``A`` random, ``B = 0`` so training starts from the pretrained
function), and the classification head (:func:`hf_longtail.features.find_classifier`) trained in
full and saved with the adapter (``modules_to_save``): it is new for a long-tailed dataset.
BatchNorm layers (CNNs) are in ``modules_to_save`` too: a training step updates their running
statistics whatever is frozen, and an adapter without them would reload onto the base's old
statistics and predict something else than the run evaluated (peft saves only what
``modules_to_save`` and the adapters hold). Every other parameter is frozen.

Target layers (``target_modules``), resolved on the model into exact module names:

- ``"auto"`` (default of ``scripts/train.py``): ``"all-linear"`` when the backbone has
  ``nn.Linear`` layers (ViT: ``q_proj``/``k_proj``/``v_proj``/``o_proj``/``fc1``/``fc2`` in
  transformers 5; the ``query``/``value`` of peft's older ViT example match nothing there),
  else ``"all-conv"`` (a CNN such as EfficientNet-Lite0 or the CIFAR ResNets, whose only
  linear layer is the head);
- ``"all-linear"``: every ``nn.Linear`` outside the head; ``"all-conv"``: every ``nn.Conv2d``
  outside the head except depthwise ones (``groups > 1``, a few parameters each) and those peft
  cannot adapt: a subclass whose constructor does not take ``nn.Conv2d``'s arguments (peft
  builds the adapter's ``A`` as another instance of the layer's class, with ``padding_mode``),
  such as timm's ``Conv2dSame`` (TensorFlow "same" padding: EfficientNet-Lite0's stem). Those
  are skipped with an info log;
- anything else: comma-separated names; a module is targeted when its qualified name equals one
  of them or ends with ``.<name>`` (peft's rule), e.g. ``q_proj,v_proj``.

A choice that selects nothing raises ``ValueError`` naming the layer types the model has; names
that select a layer peft cannot adapt raise ``ValueError`` naming it.

A saved LoRA run directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (the
adapters and the head) and the base model's ``config.json`` with the run's labels
(:func:`save_base_config`); :func:`load_lora_model` (or ``peft.PeftModel.from_pretrained`` on the
base model built with that config) reloads it. That needs the base weights to be loadable:
a LoRA run on random weights (``--no_pretrained``, a from-scratch model) must be saved merged
(:func:`merge_lora`, ``--lora_merge true``), which ``scripts/train.py`` requires up front.
:func:`merge_lora` folds the adapters into the weights for a plain ``from_pretrained``-loadable
model.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGET_PRESETS",
    "LoraOptions",
    "apply_lora",
    "is_lora_model",
    "load_lora_model",
    "lora_base_model",
    "merge_lora",
    "merge_trainer_model",
    "resolve_target_modules",
    "running_stat_modules",
    "save_base_config",
    "trainable_parameters",
]

#: The named target choices (anything else is a comma-separated list of module names).
LORA_TARGET_PRESETS = ("auto", "all-linear", "all-conv")

_PEFT_MISSING = (
    "LoRA needs the `peft` package: `pip install peft` (or `pip install hf-longtail[peft]`)."
)


@dataclass
class LoraOptions:
    """The LoRA recipe: rank ``r`` >= 1, scale ``alpha`` > 0 (the update is ``alpha / r * BA``),
    ``dropout`` in [0, 1) on the adapters' input, ``target_modules`` (see the module docstring)."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora_r must be an integer >= 1; got {self.r!r}.")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"--lora_alpha must be a number > 0; got {self.alpha!r}.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"--lora_dropout must be in [0, 1); got {self.dropout!r}.")
        if isinstance(self.target_modules, str):
            names = [t.strip() for t in self.target_modules.split(",") if t.strip()]
            if not names:
                raise ValueError(
                    "--lora_target_modules is empty; use 'auto', 'all-linear', 'all-conv' or "
                    "module names such as 'q_proj,v_proj'."
                )


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(_PEFT_MISSING) from err
    return peft


#: The keyword arguments peft's LoRA ``Conv2d`` passes when it builds the adapter's ``A`` and
#: ``B`` as new instances of the adapted layer's own class.
_PEFT_CONV_KWARGS = ("dilation", "padding_mode", "groups", "bias")


def _peft_cannot_adapt(module: nn.Module) -> str | None:
    """Why peft's LoRA cannot wrap ``module`` (``None`` when it can). A ``nn.Conv2d`` subclass
    with its own constructor (timm's ``Conv2dSame``: no ``padding_mode``) fails inside peft
    with a bare ``TypeError``, after the model and the data are loaded."""
    if not isinstance(module, nn.Conv2d) or type(module).__init__ is nn.Conv2d.__init__:
        return None
    params = inspect.signature(type(module).__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params}
    missing = [k for k in _PEFT_CONV_KWARGS if k not in names]
    if not missing:
        return None
    return (
        f"{type(module).__name__} does not take {', '.join(missing)} (peft builds the LoRA "
        "layers as instances of the adapted layer's class)"
    )


def _outside(name: str, head: str) -> bool:
    return name != head and not name.startswith(head + ".")


def _layers(model: nn.Module, kind: str, head: str) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not _outside(name, head):
            continue
        if kind == "linear" and isinstance(module, nn.Linear):
            names.append(name)
        elif kind == "conv" and isinstance(module, nn.Conv2d) and module.groups == 1:
            names.append(name)
    return names


def _adaptable(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` without the layers peft cannot adapt (logged: the preset is a best effort)."""
    kept, skipped = [], []
    for name in names:
        why = _peft_cannot_adapt(model.get_submodule(name))
        if why is None:
            kept.append(name)
        else:
            skipped.append(f"{name} ({why})")
    if skipped:
        logger.info(
            "LoRA: %d layer(s) get no adapter, peft cannot adapt them: %s",
            len(skipped),
            "; ".join(skipped),
        )
    return kept


def running_stat_modules(model: nn.Module) -> list[str]:
    """The qualified names of the normalization layers outside the head that keep running
    statistics (BatchNorm, timm's ``BatchNormAct2d``): trained with the adapters and saved in
    ``modules_to_save``, since every training step changes their statistics."""
    from hf_longtail.features import find_classifier

    head, _ = find_classifier(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats and _outside(name, head)
    ]


def resolve_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The qualified names of the modules of ``model`` that get LoRA adapters (never the head).

    ``target_modules``: ``"auto"``, ``"all-linear"``, ``"all-conv"`` or names (a list, or a
    comma-separated string) matched as peft does (equal, or a ``.<name>`` suffix). Raises
    ``ValueError`` when nothing is selected, naming what the model offers.
    """
    from hf_longtail.features import find_classifier

    head, _ = find_classifier(model)
    spec = target_modules
    if isinstance(spec, str):
        spec = [t.strip() for t in spec.split(",") if t.strip()]
    spec = list(spec)
    linear, conv = _layers(model, "linear", head), _layers(model, "conv", head)
    if spec == ["auto"]:
        selected = _adaptable(model, linear or conv)
    elif spec == ["all-linear"]:
        selected = _adaptable(model, linear)
    elif spec == ["all-conv"]:
        selected = _adaptable(model, conv)
    else:
        unknown = [s for s in spec if s in LORA_TARGET_PRESETS]
        if unknown:
            raise ValueError(
                f"--lora_target_modules: {unknown[0]!r} cannot be combined with module names."
            )
        selected = [
            name
            for name, _ in model.named_modules()
            if name
            and _outside(name, head)
            and any(name == s or name.endswith("." + s) for s in spec)
        ]
        refused = [(n, _peft_cannot_adapt(model.get_submodule(n))) for n in selected]
        refused = [(n, why) for n, why in refused if why]
        if refused:
            name, why = refused[0]
            raise ValueError(
                f"--lora_target_modules {','.join(spec)!r} selects {len(refused)} layer(s) that "
                f"peft cannot adapt, e.g. {name!r}: {why}. Leave them out (the 'auto' / "
                "'all-conv' presets skip them)."
            )
    if not selected:
        leaf_types = sorted(
            {
                type(m).__name__
                for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(head)
            }
        )
        examples = sorted({n.rsplit(".", 1)[-1] for n in linear + conv})[:8]
        raise ValueError(
            f"--lora_target_modules {','.join(spec)!r} selects no layer of "
            f"{type(model).__name__} (the classifier {head!r} is trained in full and never "
            f"adapted). It has {len(linear)} linear and {len(conv)} non-depthwise conv layers "
            f"outside the head ({', '.join(leaf_types) or 'none'}; names end with e.g. "
            f"{examples}). Use 'auto', 'all-linear' (transformers ViTs), 'all-conv' (CNNs) or "
            "some of those names."
        )
    return selected


def apply_lora(
    model: nn.Module, options: LoraOptions, base_model_name_or_path: str | None = None
) -> nn.Module:
    """``model`` wrapped in a ``peft.PeftModel`` with LoRA adapters on the resolved target
    modules, and the classification head and the BatchNorm layers
    (:func:`running_stat_modules`) in ``modules_to_save``; only those are trainable and saved.
    ``base_model_name_or_path`` (default: the model's ``name_or_path``) is what
    ``adapter_config.json`` names as the base to load the adapter onto
    (:func:`hf_longtail.models.pretrained_source`): it must hold the weights ``model`` starts
    from, so a model with random weights has to be saved merged (:func:`merge_lora`). The base
    model's config keeps the run's labels (saved by :func:`save_base_config`)."""
    peft = _require_peft()
    from hf_longtail.features import find_classifier

    head, _ = find_classifier(model)
    targets = resolve_target_modules(model, options.target_modules)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=[head, *running_stat_modules(model)],
        **options.extra,
    )
    peft_model = peft.get_peft_model(model, config)
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    return peft_model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients (adapters, head and BatchNorm layers for a
    LoRA model)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_trainer_model(trainer: Any) -> nn.Module:
    """Replace a trainer's LoRA model by :func:`merge_lora` of it (after training, before
    ``save_model`` / the final evaluation), so the run saves and evaluates the plain model."""
    merged = merge_lora(trainer.accelerator.unwrap_model(trainer.model))
    trainer.model = trainer.model_wrapped = merged
    return merged


def is_lora_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when it is absent)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (with the adapters injected)."""
    return model.get_base_model()


def save_base_config(model: nn.Module, output_dir: str | os.PathLike) -> None:
    """Write the base model's ``config.json`` (the run's ``id2label``, the architecture) beside
    the adapter, so the run directory says what the model is (card, ``AutoConfig``) and
    :func:`load_lora_model` can rebuild the base with the run's head size."""
    lora_base_model(model).config.save_pretrained(os.fspath(output_dir))


def load_lora_model(
    run_dir: str | os.PathLike, base_model: str | None = None, **kwargs: Any
) -> Any:
    """Reload a saved LoRA run: the base model (``base_model``, default the adapter's
    ``base_model_name_or_path``) built with the run's ``config.json`` (its labels; the
    pretrained head of another size is dropped, the trained one comes from the adapter), then
    ``peft.PeftModel.from_pretrained``. ``kwargs`` go to the base model's ``from_pretrained``.
    Returns the ``PeftModel`` in eval mode."""
    peft = _require_peft()
    from transformers import AutoConfig, AutoModelForImageClassification

    run_dir = os.fspath(run_dir)
    if base_model is None:
        base_model = peft.PeftConfig.from_pretrained(run_dir).base_model_name_or_path
    config = AutoConfig.from_pretrained(run_dir)
    base = AutoModelForImageClassification.from_pretrained(
        base_model, config=config, ignore_mismatched_sizes=True, **kwargs
    )
    return peft.PeftModel.from_pretrained(base, run_dir).eval()


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters folded into its weights
    (``W + alpha / r * BA``) and the trained head in place (``merge_and_unload``)."""
    return model.merge_and_unload()
