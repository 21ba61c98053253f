"""LoRA fine-tuning of an image classifier through ``peft`` (LIFT-style light fine-tuning).

:func:`apply_lora` wraps a model in a ``peft.PeftModel``: LoRA adapters on the chosen layers
(``W x + (alpha / r) B A x``, ``A`` random, ``B = 0`` so training starts from the pretrained
function), and the classification head (:func:`hf_longtail.features.find_classifier`) trained in
full and saved with the adapter (``modules_to_save``): it is new for a long-tailed dataset.
Every other parameter is frozen.

Target layers (``target_modules``), resolved on the model into exact module names:

- ``"auto"`` (default of ``scripts/train.py``): ``"all-linear"`` when the backbone has
  ``nn.Linear`` layers (ViT: ``q_proj``/``k_proj``/``v_proj``/``o_proj``/``fc1``/``fc2`` in
  transformers 5; the ``query``/``value`` of peft's older ViT example match nothing there),
  else ``"all-conv"`` (a CNN such as EfficientNet-Lite0 or the CIFAR ResNets, whose only
  linear layer is the head);
- ``"all-linear"``: every ``nn.Linear`` outside the head; ``"all-conv"``: every ``nn.Conv2d``
  outside the head except depthwise ones (``groups > 1``, a few parameters each);
- anything else: comma-separated names; a module is targeted when its qualified name equals one
  of them or ends with ``.<name>`` (peft's rule), e.g. ``q_proj,v_proj``.

A choice that selects nothing raises ``ValueError`` naming the layer types the model has.

A saved LoRA run directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (the
adapters and the head) and the base model's ``config.json`` with the run's labels
(:func:`save_base_config`); :func:`load_lora_model` (or ``peft.PeftModel.from_pretrained`` on the
base model built with that config) reloads it. :func:`merge_lora` folds the adapters into the
weights for a plain ``from_pretrained``-loadable model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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


def _layers(model: nn.Module, kind: str, head: str) -> list[str]:
    inside_head = (head, head + ".")
    names = []
    for name, module in model.named_modules():
        if name == head or name.startswith(inside_head[1]):
            continue
        if kind == "linear" and isinstance(module, nn.Linear):
            names.append(name)
        elif kind == "conv" and isinstance(module, nn.Conv2d) and module.groups == 1:
            names.append(name)
    return names


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
        selected = linear or conv
    elif spec == ["all-linear"]:
        selected = linear
    elif spec == ["all-conv"]:
        selected = conv
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
            and name != head
            and not name.startswith(head + ".")
            and any(name == s or name.endswith("." + s) for s in spec)
        ]
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
    modules and the classification head in ``modules_to_save``; only the adapters and the head
    are trainable. ``base_model_name_or_path`` (default: the model's ``name_or_path``) is what
    ``adapter_config.json`` names as the base to load the adapter onto
    (:func:`hf_longtail.models.pretrained_source`). The base model's config keeps the run's
    labels (saved by :func:`save_base_config`)."""
    peft = _require_peft()
    from hf_longtail.features import find_classifier

    head, _ = find_classifier(model)
    targets = resolve_target_modules(model, options.target_modules)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=[head],
        **options.extra,
    )
    peft_model = peft.get_peft_model(model, config)
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    return peft_model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients (adapters + head for a LoRA model)."""
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
