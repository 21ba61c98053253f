"""Frozen backbones: freezing, the classifier head, and an on-disk cache of backbone features.

Training only the classifier of a pretrained network (a linear probe, or the second stage of
decoupled training) does not need the backbone at every step: its output for an image never
changes. This module

- finds the classifier head of any image classifier (:func:`find_classifier`: timm models through
  transformers' TimmWrapper, ``model.classifier`` of transformers / hf-longtail models, else the
  last ``nn.Linear`` with ``num_labels`` outputs); its *input* is what "features" means here;
- freezes everything but the head (:func:`freeze_backbone`; optionally the last stage too), keeping
  the frozen modules in eval mode so BatchNorm statistics and dropout stay fixed even when a
  ``Trainer`` calls ``model.train()``;
- computes the features of a split once (:func:`cached_features`, with a progress bar) and stores
  them as a ``datasets.Dataset`` (``save_to_disk``) under a key that hashes the backbone's weights,
  the transform and the split's content; a later call with the same three loads it instead.

``LongTailTrainer`` trains on such a feature dataset directly: a batch holding ``features`` (and no
``pixel_values``) goes through the head only, so every loss, sampler, metric, checkpoint and the
saved model (the full model, backbone included) are those of an ordinary run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FEATURES_COLUMN",
    "cached_features",
    "compute_features",
    "dataset_fingerprint",
    "feature_cache_key",
    "find_classifier",
    "fold_logit_adjustment",
    "freeze_backbone",
    "head_linear",
    "is_feature_dataset",
    "logit_adjustment_target",
    "model_fingerprint",
    "set_classifier",
    "transform_fingerprint",
]

logger = logging.getLogger(__name__)

FEATURES_COLUMN = "features"
_CACHE_FORMAT = "hf_longtail.features/v1"
_STAGE_LISTS = re.compile(r"(^|\.)(layer|layers|stages|blocks)$")


# ------------------------------------------------------------------------------ the head
def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of the classification head of ``model``.

    The head maps the pooled backbone features to the logits: for a transformers
    ``TimmWrapperForImageClassification`` it is timm's classifier
    (``timm_model.<pretrained_cfg["classifier"]>``); otherwise ``model.classifier`` when present
    (ViT, ConvNeXt, ResNet, hf-longtail's CIFAR ResNets); otherwise the last ``nn.Linear`` whose
    ``out_features`` is ``model.config.num_labels``.

    Raises:
        ValueError: no head can be identified (the message names the model class).
    """
    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module) and hasattr(timm_model, "get_classifier"):
        cfg = getattr(timm_model, "pretrained_cfg", None) or {}
        name = cfg.get("classifier") if isinstance(cfg, dict) else None
        if isinstance(name, str):
            try:
                return f"timm_model.{name}", timm_model.get_submodule(name)
            except AttributeError:
                pass
        head = timm_model.get_classifier()
        for qualified, module in model.named_modules():
            if module is head:
                return qualified, module
    if isinstance(getattr(model, "classifier", None), nn.Module):
        return "classifier", model.classifier
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    last = None
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            last = (qualified, module)
    if last is None:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__}: no timm classifier, "
            "no `classifier` attribute and no nn.Linear with num_labels outputs."
        )
    return last


def set_classifier(model: nn.Module, module: nn.Module) -> nn.Module:
    """Replace the head found by :func:`find_classifier` with ``module``; returns the old head."""
    name, old = find_classifier(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
    return old


def head_linear(head: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a head (the head itself, or e.g. ``Sequential(Flatten, Linear)``).

    Raises:
        TypeError: the head holds no ``nn.Linear`` (e.g. hf-longtail's cosine ``NormedLinear``,
            whose class vectors are normalised by construction).
    """
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(
            f"the classification head is a {type(head).__name__}, not a linear layer "
            "(w_j . x + b_j); this operation needs one."
        )
    return linears[-1]


def logit_adjustment_target(model: nn.Module, train_class_counts: Any) -> nn.Linear:
    """The linear layer :func:`fold_logit_adjustment` would change, after every check it makes;
    nothing is modified, so a caller can refuse a model before doing expensive work.

    Raises:
        TypeError: a head without an ``nn.Linear`` (the cosine classifier ``NormedLinear``).
        ValueError: a linear layer without bias (a bias added here would not be loaded back by
            the model's class), or as many outputs as classes in ``train_class_counts``.
    """
    from hf_longtail.metrics import log_prior

    name, head = find_classifier(model)
    try:
        linear = head_linear(head)
    except TypeError as err:
        raise TypeError(
            f"cannot fold the post-hoc logit adjustment into {name!r}: {err} A cosine classifier "
            "has no bias, and one added here would not be saved with the model's config; use "
            "--classifier linear, or a loss that adjusts the logits while training (--loss la)."
        ) from None
    classes = log_prior(train_class_counts).size
    if linear.out_features != classes:
        raise ValueError(
            f"the classifier {name!r} has {linear.out_features} outputs but train_class_counts "
            f"has {classes} classes."
        )
    if linear.bias is None:
        raise ValueError(
            f"the classifier {name!r} has no bias to fold the post-hoc logit adjustment into; a "
            "bias added here would not be loaded back by the model's class. Use a loss that "
            "adjusts the logits while training (--loss la) instead of --posthoc_tau."
        )
    return linear


def fold_logit_adjustment(model: nn.Module, train_class_counts: Any, tau: float) -> torch.Tensor:
    """Fold post-hoc logit adjustment into the classifier: ``b_c <- b_c - tau * log(prior_c)``.

    The head's last ``nn.Linear`` (:func:`find_classifier`, :func:`head_linear`: a transformers
    ``classifier``, a timm head through TimmWrapper, the CIFAR ResNets' ``classifier``) then
    outputs ``logits - tau * log(prior)`` (:func:`hf_longtail.metrics.logit_adjust`, prior from
    ``train_class_counts``) for every input, so the saved model, loaded with plain
    ``from_pretrained`` and argmax, predicts the adjusted classes. Returns the offsets added.

    Raises: as :func:`logit_adjustment_target`.
    """
    from hf_longtail.metrics import log_prior

    linear = logit_adjustment_target(model, train_class_counts)
    prior = log_prior(train_class_counts)
    offsets = torch.as_tensor(-float(tau) * prior, dtype=linear.bias.dtype)
    with torch.no_grad():
        linear.bias.add_(offsets.to(linear.bias.device))
    return offsets


# ------------------------------------------------------------------------------ freezing
def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _last_stage_prefixes(model: nn.Module, head_name: str) -> list[str]:
    """Parameter-name prefixes of the last stage of the backbone (see :func:`freeze_backbone`)."""
    timm_model = getattr(model, "timm_model", None)
    if isinstance(timm_model, nn.Module) and hasattr(timm_model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(timm_model, timm_model.group_matcher(coarse=True))
        head = head_name[len("timm_model.") :]
        body = [
            [n for n in names if not (n == head or n.startswith(head + "."))]
            for _, names in sorted(groups.items())
        ]
        body = [names for names in body if names]
        if body:
            return [f"timm_model.{n}" for n in body[-1]]
    names = [n for n, _ in model.named_parameters()]
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList | nn.Sequential) and _STAGE_LISTS.search(n) and len(m)
    ]
    if not lists:
        raise ValueError(
            f"cannot tell the last stage of {type(model).__name__} (no timm group_matcher and no "
            "`layer`/`layers`/`stages`/`blocks` module list); freeze its parameters yourself "
            "(requires_grad) or use freeze_backbone without train_last_stage."
        )
    list_name, stages = lists[-1]
    last = f"{list_name}.{len(stages) - 1}."
    first = next(i for i, n in enumerate(names) if n.startswith(last))
    # The last stage, and whatever follows it in registration order (a final norm), but not the head.
    return [n for n in names[first:] if not (n == head_name or n.startswith(head_name + "."))]


def freeze_backbone(model: nn.Module, train_last_stage: bool = False) -> list[str]:
    """Freeze every parameter except the classifier head (and the backbone's last stage).

    - Trainable afterwards: the head of :func:`find_classifier`; with ``train_last_stage`` also
      the last stage: for timm models the last coarse parameter group of timm's
      ``group_matcher`` (e.g. EfficientNet's last block group with ``conv_head``/``bn2``, a ViT's
      last block with the final norm), otherwise the last element of the last
      ``layer``/``layers``/``stages``/``blocks`` module list plus the parameters registered after
      it (a final LayerNorm).
    - Every module whose parameters are all frozen stays in eval mode from now on (its ``train``
      is pinned to ``eval``): BatchNorm uses and keeps its running statistics, dropout is off,
      whatever ``model.train()`` a training loop calls.

    Returns the names of the trainable parameters.
    """
    head_name, _ = find_classifier(model)
    trainable_prefixes = [head_name + "."]
    exact = set(_last_stage_prefixes(model, head_name)) if train_last_stage else set()
    trainable = []
    for name, param in model.named_parameters():
        keep = name in exact or any(name.startswith(p) for p in trainable_prefixes)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"freeze_backbone left no trainable parameter in {type(model).__name__}.")
    _pin_frozen_modules_to_eval(model)
    return trainable


def _pin_frozen_modules_to_eval(model: nn.Module) -> None:
    def fully_frozen(module: nn.Module) -> bool:
        # Stateless modules (dropout, pooling, activations) are not "frozen": beside a trainable
        # part they keep their training behaviour; inside a frozen parent they follow it.
        has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        return has_state and all(not p.requires_grad for p in module.parameters())

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if fully_frozen(child):
                child.eval()
                child.train = types.MethodType(_eval_only_train, child)
            else:
                visit(child)

    visit(model)


# -------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the backbone: the class, and the name, dtype, shape and bytes of every tensor of
    ``state_dict()`` except the head's (a retrained head reuses the same features)."""
    head_name, _ = find_classifier(model)
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        if name.startswith(head_name + "."):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def transform_fingerprint(transform: Callable[[Any], torch.Tensor]) -> str:
    """A stable hash of a transform: ``datasets``' pickle-based ``Hasher`` (the parameters of
    every op), falling back on its ``repr`` (which torchvision/timm ops fill with parameters)."""
    from datasets.fingerprint import Hasher

    try:
        return Hasher.hash(transform)
    except Exception:
        return hashlib.sha256(repr(transform).encode()).hexdigest()[:16]


def dataset_fingerprint(dataset: Any, image_column: str, label_column: str) -> str:
    """SHA-256 of a split's content: its length, features and the Arrow data of the image and
    label columns (encoded bytes / paths, not decoded pixels), row by row in dataset order.

    Unlike ``Dataset._fingerprint`` it is the same in every process for the same data (an
    in-memory dataset gets a random fingerprint per process).
    """
    import pyarrow as pa
    from datasets import Image as ImageFeature

    raw = dataset.with_format(None).select_columns([image_column, label_column])
    if isinstance(raw.features[image_column], ImageFeature):
        raw = raw.cast_column(image_column, ImageFeature(decode=False))
    digest = hashlib.sha256(f"{len(raw)}|{raw.features!r}".encode())
    arrow = raw.with_format("arrow")
    for start in range(0, len(raw), 2048):
        table = arrow[start : start + 2048].combine_chunks()
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def feature_cache_key(
    model: nn.Module, transform: Callable, dataset: Any, image_column: str, label_column: str
) -> str:
    """The cache key of a split's features: 32 hex digits of SHA-256 over the model, transform
    and split fingerprints (and the cache format version)."""
    parts = [
        _CACHE_FORMAT,
        model_fingerprint(model),
        transform_fingerprint(transform),
        dataset_fingerprint(dataset, image_column, label_column),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------- extraction
def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


@torch.no_grad()
def compute_features(
    model: nn.Module,
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    on_bad_image: str = "raise",
    progress: bool | None = None,
    description: str = "features",
):
    """Features (the input of the classifier head) of every row of ``dataset``.

    The model runs in eval mode under ``torch.no_grad`` on ``transform(image)`` (use the
    deterministic evaluation transform: features are computed once, without augmentation); a
    forward hook on the head captures its input. Returns a ``datasets.Dataset`` with columns
    ``features`` (``List(float32, length=d)``) and ``labels`` (the split's ``ClassLabel``), in
    row order, formatted as torch tensors. Unreadable images follow ``on_bad_image`` ("skip" drops
    the row). ``progress`` shows a tqdm bar (default: unless datasets' bars are disabled).
    """
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4: the same feature under its old name
        from datasets import Sequence as List
    from datasets.utils.logging import is_progress_bar_enabled
    from tqdm.auto import tqdm

    from hf_longtail.data import collate_fn, detect_columns, with_transforms

    image_column, label_column = detect_columns(dataset, image_column, label_column)
    view = with_transforms(
        dataset, transform, image_column, label_column, on_bad_image=on_bad_image
    )
    _, head = find_classifier(model)
    captured: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    chunks, labels = [], []
    show = is_progress_bar_enabled() if progress is None else progress
    try:
        for rows in tqdm(
            list(_batches(len(view), batch_size)),
            desc=f"Computing {description}",
            unit="batch",
            disable=not show,
        ):
            examples = view.__getitems__(list(rows))  # a list of row dicts
            kept = [e for e in examples if e["pixel_values"] is not None]
            if not kept:
                continue
            batch = collate_fn(kept)
            model(pixel_values=batch["pixel_values"].to(device))
            chunks.append(captured["x"].detach().float().flatten(1).cpu().numpy())
            labels.append(batch["labels"].numpy())
    finally:
        hook.remove()
        model.train(was_training)
    if not chunks:
        raise ValueError(f"{description}: no readable image in the dataset, no feature computed.")
    matrix = np.concatenate(chunks)
    label_feature = dataset.features[label_column]
    if not isinstance(label_feature, ClassLabel):
        label_feature = Value("int64")
    features = Features(
        {
            FEATURES_COLUMN: List(Value("float32"), length=matrix.shape[1]),
            "labels": label_feature,
        }
    )
    out = Dataset.from_dict(
        {FEATURES_COLUMN: matrix, "labels": np.concatenate(labels)}, features=features
    )
    return out.with_format("torch")


def cached_features(
    model: nn.Module,
    dataset: Any,
    transform: Callable[[Any], torch.Tensor],
    *,
    cache_dir: str | os.PathLike | None = None,
    split: str = "split",
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    on_bad_image: str = "raise",
    progress: bool | None = None,
):
    """:func:`compute_features`, stored on disk and reused.

    The features live in ``<cache_dir>/<key>/`` (``Dataset.save_to_disk``, written under a
    temporary name and renamed, so an interrupted run never leaves a partial entry), with
    ``key = feature_cache_key(model, transform, dataset)``: another backbone (any weight
    changed), another transform (size, normalisation) or other rows give another key, while
    re-training a head (or loading the same model in another process) hits the cache.
    ``cache_dir`` defaults to ``hf_longtail_cache_dir()/features``. ``split`` only labels the
    progress bar and the record.

    Returns the feature ``Dataset`` (torch format), with ``cache_hit`` and ``cache_path``
    recorded in its ``info.description`` JSON for inspection.
    """
    from datasets import load_from_disk

    from hf_longtail.data import detect_columns
    from hf_longtail.models.pretrained import hf_longtail_cache_dir

    image_column, label_column = detect_columns(dataset, image_column, label_column)
    root = Path(cache_dir) if cache_dir is not None else hf_longtail_cache_dir() / "features"
    key = feature_cache_key(model, transform, dataset, image_column, label_column)
    path = root / key
    if (path / "dataset_info.json").is_file():
        logger.info("Feature cache hit for %s: %s", split, path)
        return _with_record(load_from_disk(str(path)).with_format("torch"), path, True, split)
    started = time.perf_counter()
    features = compute_features(
        model,
        dataset,
        transform,
        image_column=image_column,
        label_column=label_column,
        batch_size=batch_size,
        on_bad_image=on_bad_image,
        progress=progress,
        description=f"{split} features",
    )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        record = {"format": _CACHE_FORMAT, "split": split, "rows": len(features)}
        features.info.description = json.dumps(record)
        features.save_to_disk(str(tmp / "data"))
        try:
            os.rename(tmp / "data", path)
        except OSError:
            if not (path / "dataset_info.json").is_file():
                raise  # not a concurrent writer that finished first: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Cached %d %s features in %s (computed in %.1f s)",
        len(features),
        split,
        path,
        time.perf_counter() - started,
    )
    return _with_record(load_from_disk(str(path)).with_format("torch"), path, False, split)


def _with_record(dataset: Any, path: Path, hit: bool, split: str) -> Any:
    dataset.info.description = json.dumps(
        {"format": _CACHE_FORMAT, "split": split, "cache_path": str(path), "cache_hit": hit}
    )
    return dataset


def is_feature_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` holds cached features (a ``features`` column) rather than images."""
    names = getattr(dataset, "column_names", None)
    return isinstance(names, list) and FEATURES_COLUMN in names
