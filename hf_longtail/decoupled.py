"""The decoupled second stage (Kang et al., ICLR 2020) on top of any finished training run.

Kang et al. ("Decoupling Representation and Classifier for Long-Tailed Recognition") keep the
representation learnt on the long-tailed data and re-balance only the classifier. Three ways,
each applied here to a run directory written by ``scripts/train.py`` (its model, dataset recipe
and preprocessing are read from ``longtail_run.json``), with the backbone frozen and its features
cached (:func:`hf_longtail.features.cached_features`):

- **cRT** (classifier re-training, :func:`retrain_classifier`): the head is re-initialised and
  trained on the long-tailed training set with class-balanced sampling (every class equally
  likely per draw), with any loss of the library (default cross-entropy).
- **tau-norm** (:func:`tau_normalize`): ``w_j <- w_j / ||w_j||^tau`` for every class vector of
  the linear head, logits ``x . w_j`` without bias as in the authors' code; ``tau`` in ``[0, 1]``
  interpolates from the original head (0) to unit-norm class vectors (1). ``tau`` is chosen on a
  **validation** split (:func:`select_tau`, never on the test split): the dataset's own
  ``validation`` split when it has one, otherwise a class-balanced hold-out made of the source's
  training images that the long-tailed subset left out (so no image seen in training and none
  of the test split), see :func:`validation_split`.
- **LWS** (learnable weight scaling, :func:`learn_weight_scaling`): per-class scales ``f_j``
  (logits ``f_j (w_j . x + b_j)``) learnt with class-balanced sampling, the head's weights and the
  backbone frozen; the scales are then folded into the head (``w_j <- f_j w_j``, ``b_j <- f_j
  b_j``), which gives exactly the same logits.

Beside Kang et al.'s three, **post-hoc logit adjustment** (Menon et al., ICLR 2021) as a stage
(``"posthoc_la"``): ``b_j <- b_j - tau * log(prior_j)`` with ``tau`` chosen on the validation
split (:func:`hf_longtail.metrics.select_logit_adjustment_tau`), the same adjustment as
``--posthoc_tau auto`` at the end of training, applied to a run that is already finished (so one
trained model gives both the plain and the adjusted result without training twice).

:func:`run_second_stage` does all of it and writes a normal run directory (model, processor,
``all_results.json``, ``longtail_run.json`` with a ``stage`` block, plots, model card saying which
stage produced it). ``scripts/train.py --stage crt|tau_norm|lws|posthoc_la --from_run DIR``
calls it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_longtail.features import (
    cached_features,
    find_classifier,
    freeze_backbone,
    head_linear,
    logit_adjustment_target,
    set_classifier,
)
from hf_longtail.run_directory import RESULTS_FILE, RUN_FILE, thresholds_of

__all__ = [
    "DEFAULT_TAUS",
    "STAGES",
    "LearnableWeightScaling",
    "SecondStageResult",
    "head_logits",
    "learn_weight_scaling",
    "load_run",
    "retrain_classifier",
    "run_second_stage",
    "select_tau",
    "tau_normalize",
    "validation_split",
]

logger = logging.getLogger(__name__)

STAGES = ("crt", "tau_norm", "lws", "posthoc_la")
STAGE_NAMES = {
    "crt": "classifier re-training (cRT)",
    "tau_norm": "tau-normalised classifier",
    "lws": "learnable weight scaling (LWS)",
    "posthoc_la": "post-hoc logit adjustment",
}
_KANG = (
    "Kang et al. 2020, Decoupling Representation and Classifier for Long-Tailed Recognition (ICLR)"
)
STAGE_REFERENCES = {
    "crt": _KANG,
    "tau_norm": _KANG,
    "lws": _KANG,
    "posthoc_la": "Menon et al. 2021, Long-tail learning via logit adjustment (ICLR)",
}
#: The tau grid searched on the validation split: 0, 0.1, ..., 2.0.
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(21))


# ---------------------------------------------------------------------------------- pieces
@torch.no_grad()
def head_logits(model: nn.Module, features: Any, batch_size: int = 4096) -> np.ndarray:
    """Logits of the model's classifier head on a feature dataset (or a ``[N, d]`` tensor)."""
    _, head = find_classifier(model)
    matrix = features if isinstance(features, torch.Tensor) else _column(features, "features")
    was_training = head.training
    head.eval()
    param = next(head.parameters())
    out = [
        head(matrix[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
        for i in range(0, matrix.shape[0], batch_size)
    ]
    head.train(was_training)
    return torch.cat(out).numpy()


def _column(features: Any, name: str) -> torch.Tensor:
    """A whole column of a torch-formatted feature dataset as one tensor (``ds[:]`` formats it;
    ``ds[name]`` would be a lazy column in datasets >= 4)."""
    return torch.as_tensor(features[:][name])


def _labels(features: Any) -> np.ndarray:
    return _column(features, "labels").numpy()


def tau_normalize(model: nn.Module, tau: float) -> None:
    """In place: every class vector of the linear head becomes ``w_j / ||w_j||^tau`` and the bias
    is set to 0 (logits ``x . w_j / ||w_j||^tau``, Kang et al.'s tau-normalised classifier).

    Raises ``TypeError`` for a head without an ``nn.Linear`` (a cosine classifier is already
    normalised) and ``ValueError`` for a negative or non-finite ``tau``.
    """
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0; got {tau!r}.")
    linear = head_linear(find_classifier(model)[1])
    with torch.no_grad():
        norms = linear.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        linear.weight.div_(norms.pow(float(tau)))
        if linear.bias is not None:
            linear.bias.zero_()


def _balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    pred = logits.argmax(-1)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls))


def select_tau(
    model: nn.Module, validation_features: Any, taus: Sequence[float] = DEFAULT_TAUS
) -> tuple[float, dict[float, float]]:
    """``(best tau, {tau: validation balanced accuracy})`` of :func:`tau_normalize` over ``taus``.

    Balanced accuracy (mean per-class recall over the classes present) is the criterion, so a
    validation split that is itself imbalanced does not favour the head classes; ties go to the
    smaller tau (the smaller change). ``model`` is left unchanged.
    """
    if not taus:
        raise ValueError("taus is empty: give at least one tau to try.")
    labels = _labels(validation_features)
    scores: dict[float, float] = {}
    for tau in taus:
        trial = copy.deepcopy(find_classifier(model)[1])
        holder = _HeadOnly(trial)
        tau_normalize(holder, float(tau))
        scores[float(tau)] = _balanced_accuracy(head_logits(holder, validation_features), labels)
    best = max(sorted(scores), key=lambda t: (scores[t], -t))
    return best, scores


class _HeadOnly(nn.Module):
    """A bare head seen as a model (``find_classifier`` finds ``classifier``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.classifier = head


class LearnableWeightScaling(nn.Module):
    """A frozen linear head with learnable per-class scales: ``f * (W x + b)`` (``f`` starts at 1).

    :meth:`folded` returns the equivalent ``nn.Linear`` with ``W' = diag(f) W``, ``b' = f * b``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scales

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The plain linear layer with the scales folded in (identical logits)."""
        out = copy.deepcopy(self.linear)
        out.weight.mul_(self.scales[:, None])
        if out.bias is not None:
            out.bias.mul_(self.scales)
        for p in out.parameters():
            p.requires_grad_(True)
        return out


def _stage_args(args: Any) -> Any:
    """The training arguments of a second-stage fit: no checkpoints (it takes seconds), and the
    feature columns kept."""
    from transformers.trainer_utils import SaveStrategy

    args = copy.copy(args)
    args.save_strategy = SaveStrategy.NO
    args.remove_unused_columns = False
    return args


def _fit_head(
    model: nn.Module,
    train_features: Any,
    args: Any,
    class_counts: Sequence[int],
    loss_config: Any,
    sampler: str,
) -> dict[str, float]:
    from hf_longtail.trainer import LongTailTrainer

    trainer = LongTailTrainer(
        model=model,
        args=_stage_args(args),
        train_dataset=train_features,
        class_counts=list(class_counts),
        loss_config=loss_config,
        sampler=sampler,
    )
    return dict(trainer.train().metrics)


def retrain_classifier(
    model: nn.Module,
    train_features: Any,
    args: Any,
    class_counts: Sequence[int],
    *,
    loss_config: Any = None,
    sampler: str = "class_balanced",
) -> dict[str, float]:
    """cRT: re-initialise the head (its modules' ``reset_parameters``, seeded by ``args.seed``),
    freeze the backbone and train the head on cached training features with ``sampler`` (class-
    balanced by default, the method's) and ``loss_config`` (default CE) through
    ``LongTailTrainer``. Returns the training metrics; ``model`` is changed in place."""
    from transformers import set_seed

    set_seed(args.seed)
    freeze_backbone(model)
    _, head = find_classifier(model)
    for module in head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return _fit_head(model, train_features, args, class_counts, loss_config, sampler)


def learn_weight_scaling(
    model: nn.Module,
    train_features: Any,
    args: Any,
    class_counts: Sequence[int],
    *,
    loss_config: Any = None,
    sampler: str = "class_balanced",
) -> tuple[dict[str, float], list[float]]:
    """LWS: learn per-class scales of the (frozen) linear head on cached training features with
    class-balanced sampling, then fold them into the head. Returns ``(training metrics,
    scales)``; ``model`` is changed in place and keeps its architecture."""
    from transformers import set_seed

    set_seed(args.seed)
    freeze_backbone(model)
    _, head = find_classifier(model)
    linear = head_linear(head)
    lws = LearnableWeightScaling(linear)
    if head is linear:
        set_classifier(model, lws)
    else:  # e.g. Sequential(Flatten, Linear): replace the Linear inside the head
        _replace_child(head, linear, lws)
    try:
        metrics = _fit_head(model, train_features, args, class_counts, loss_config, sampler)
    finally:
        folded = lws.folded()
        if head is linear:
            set_classifier(model, folded)
        else:
            _replace_child(head, lws, folded)
    return metrics, [float(s) for s in lws.scales.detach().cpu()]


def _replace_child(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in parent.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError("the module to replace is not inside the head")


# ------------------------------------------------------------------------ data and runs
def load_run(from_run: str | os.PathLike) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, image processor or None, longtail_run.json)`` of a finished run directory.

    Raises ``FileNotFoundError`` naming what is missing (model files, the run record).
    """
    from hf_longtail.hub.rundir import validate_output_dir
    from hf_longtail.models import create_image_processor, create_model

    path = validate_output_dir(from_run, require_run_info=True)
    record = json.loads((path / RUN_FILE).read_text())
    model = create_model(str(path))
    processor = create_image_processor(str(path), model)
    return model, processor, record


@dataclass
class _Splits:
    train: Any
    validation: Any
    test: Any
    validation_source: str
    image_column: str
    label_column: str


def validation_split(
    record: dict[str, Any],
    *,
    validation_split_name: str | None = None,
    per_class: int = 20,
    data_dir: str | None = None,
    split_dir: str | None = None,
) -> _Splits:
    """Rebuild a run's splits from its record and pick the validation split for the stage.

    The long-tailed training split is rebuilt exactly (``load_long_tailed`` with the recorded
    dataset, imbalance factor, profile and seed, and the recorded validation construction
    ``dataset.validation``: a ``heldout`` or ``train_val_split`` validation split is re-created
    with the same rows; its class counts and those of the training split are checked against
    the record). Validation, in order of preference: ``validation_split_name`` (a split name;
    ``None``, ``"auto"`` and ``"heldout"`` choose automatically); the run's own validation split
    (the dataset's ``validation`` or the one the run built); else, for runs recorded without
    one, up to ``per_class`` images per class from the source's training images *not* in the
    long-tailed subset (seeded, as :func:`~hf_longtail.data.long_tailed_indices` chooses rows),
    so it is balanced and disjoint from both training and test images.

    Raises ``ValueError`` when none exists (e.g. the subset uses every training image) or for
    ``validation_split_name="none"``.
    """
    from hf_longtail.data import label_array, load_long_tailed, long_tailed_indices

    if validation_split_name == "none":
        raise ValueError(
            "--validation_split none: tau is chosen on a validation split, never on the "
            "evaluation split; give a split name, 'auto' or 'heldout'."
        )
    if validation_split_name in ("auto", "heldout"):
        validation_split_name = None
    ds = record.get("dataset") or {}
    common = {
        "profile": ds.get("profile") or "exp",  # None: no subset was drawn (IF none)
        "seed": ds.get("seed", 0) if ds.get("seed") is not None else 0,
        "image_column": ds.get("image_column"),
        "label_column": ds.get("label_column"),
        "config_name": ds.get("config_name"),
        "image_root": data_dir,
        "split_dir": split_dir,
    }
    recorded = ds.get("validation") or {}
    rebuild: dict[str, Any] = {}
    if recorded.get("method") == "heldout":
        rebuild = {"validation_per_class": recorded["per_class"]}
    elif recorded.get("method") == "train_val_split":
        rebuild = {"train_val_split": recorded["fraction"]}
    dd = load_long_tailed(
        ds["name"], imbalance_factor=ds.get("imbalance_factor"), **common, **rebuild
    )
    image_col, label_col = ds.get("image_column"), ds.get("label_column")
    counts = np.bincount(label_array(dd["train"], label_col), minlength=len(ds["class_counts"]))
    if counts.tolist() != list(ds["class_counts"]):
        raise ValueError(
            f"rebuilding {ds['name']!r} gave class counts {counts.tolist()}, not the run's "
            f"{ds['class_counts']}: the source data changed since the run."
        )
    if rebuild and recorded.get("class_counts") is not None:
        rebuilt = np.bincount(label_array(dd["validation"], label_col), minlength=counts.size)
        if rebuilt.tolist() != list(recorded["class_counts"]):
            raise ValueError(
                f"rebuilding the validation split of {ds['name']!r} gave class counts "
                f"{rebuilt.tolist()}, not the run's {recorded['class_counts']}: the source data "
                "changed since the run."
            )
    eval_split = ds.get("eval_split", "test")
    own = recorded.get("split") or ("validation" if "validation" in dd else None)
    wanted = validation_split_name or (own if own != eval_split else None)
    if wanted is not None:
        if wanted not in dd or wanted == eval_split:
            raise ValueError(
                f"validation split {wanted!r} is not usable (splits: {sorted(dd)}, evaluation "
                f"split {eval_split!r}); tau is never chosen on the evaluation split."
            )
        source = wanted
        if rebuild and wanted == "validation":
            source = f"validation ({recorded['method']}, rebuilt from the run record)"
        return _Splits(dd["train"], dd[wanted], dd[eval_split], source, image_col, label_col)
    full = load_long_tailed(ds["name"], imbalance_factor=None, **common)["train"]
    labels = label_array(full, label_col)
    kept = long_tailed_indices(labels, ds["class_counts"], common["seed"])
    if not np.array_equal(labels[kept], label_array(dd["train"], label_col)):
        raise ValueError("the long-tailed rows could not be located in the source training split.")
    rest = np.setdiff1d(np.arange(len(full)), kept)
    if rest.size == 0:
        raise ValueError(
            f"{ds['name']!r} has no validation split and its long-tailed training set uses every "
            "training image, so there is nothing to choose tau on; pass --validation_split NAME."
        )
    available = np.bincount(labels[rest], minlength=len(counts))
    take = np.minimum(available, per_class)
    chosen = rest[long_tailed_indices(labels[rest], take, common["seed"])]
    missing = [i for i, n in enumerate(take) if n == 0]
    source = (
        f"held out: {int(take.sum())} training images of the source not in the long-tailed "
        f"subset (up to {per_class} per class)"
    )
    if missing:
        # A class whose every training image is in the long-tailed subset (the capped head
        # class) has nothing to hold out; its training images would flatter it, so it is left out.
        logger.warning("validation hold-out has no image of classes %s", missing)
        source += f"; no held-out image of class(es) {', '.join(map(str, missing))}"
    return _Splits(dd["train"], full.select(chosen), dd[eval_split], source, image_col, label_col)


@dataclass
class SecondStageResult:
    """What :func:`run_second_stage` produced (also written into its output directory)."""

    stage: str
    output_dir: Path
    results: dict[str, Any]
    test_metrics: dict[str, Any]
    run_info: dict[str, Any]
    stage_info: dict[str, Any] = field(default_factory=dict)


def run_second_stage(
    from_run: str | os.PathLike,
    stage: str,
    output_dir: str | os.PathLike,
    args: Any,
    *,
    loss_config: Any = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    validation_split_name: str | None = None,
    validation_per_class: int = 20,
    feature_cache_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    split_dir: str | None = None,
    progress: bool | None = None,
) -> SecondStageResult:
    """Apply ``stage`` (``"crt"``, ``"tau_norm"``, ``"lws"`` or ``"posthoc_la"``) to the run in
    ``from_run`` and write the result as a run directory in ``output_dir`` (which must not hold a
    run yet).

    ``args``: ``transformers.TrainingArguments`` for cRT / LWS (epochs, batch size, learning
    rate, optimizer, seed; checkpoints are not written); ``loss_config``: their loss (default
    CE). The test metrics are those of the evaluation split of the source run; tau (tau-norm,
    post-hoc LA) is chosen on the validation split (:func:`validation_split`). ``posthoc_la``
    raises ``ValueError`` before any feature is extracted when the source run's head was already
    adjusted (``--posthoc_tau``) or has no bias to fold the adjustment into. ``output_dir`` receives ``config.json`` +
    ``model.safetensors`` (the full model), the processor, ``all_results.json`` (``test_*``),
    ``longtail_run.json`` (the source record plus ``stage``), the two plots and ``README.md``.
    """
    from hf_longtail.data import select_transforms
    from hf_longtail.metrics import long_tail_metrics

    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not valid; use one of {list(STAGES)}.")
    out = Path(output_dir)
    if (out / RUN_FILE).exists() or (out / RESULTS_FILE).exists():
        raise FileExistsError(
            f"{out} already holds a run; choose another output directory (the second stage never "
            "overwrites a run)."
        )
    model, processor, record = load_run(from_run)
    if stage == "posthoc_la":
        _check_posthoc_source(model, record, from_run)
    pre = record.get("preprocessing") or {}
    _, _, eval_tf = select_transforms(
        pre.get("train_transform", "auto"), processor, image_size=pre.get("image_size")
    )
    splits = validation_split(
        record,
        validation_split_name=validation_split_name,
        per_class=validation_per_class,
        data_dir=data_dir,
        split_dir=split_dir,
    )
    ds = record["dataset"]
    counts, names = list(ds["class_counts"]), list(ds["class_names"])
    kw = {
        "cache_dir": feature_cache_dir,
        "image_column": splits.image_column,
        "label_column": splits.label_column,
        "progress": progress,
        "batch_size": getattr(args, "per_device_eval_batch_size", 64),
    }
    model.to(args.device)
    feats = {
        "train": cached_features(model, splits.train, eval_tf, split="train", **kw),
        "test": cached_features(
            model, splits.test, eval_tf, split=ds.get("eval_split", "test"), **kw
        ),
    }
    stage_info: dict[str, Any] = {
        "name": stage,
        "description": STAGE_NAMES[stage],
        "method": STAGE_REFERENCES[stage],
        "from_run": str(Path(from_run)),
        "backbone": "frozen (cached features)",
    }
    train_metrics: dict[str, Any] = {}
    if stage in ("tau_norm", "posthoc_la"):
        feats["validation"] = cached_features(
            model, splits.validation, eval_tf, split="validation", **kw
        )
    if stage == "posthoc_la":
        from hf_longtail.features import fold_logit_adjustment
        from hf_longtail.metrics import POSTHOC_TAUS, select_logit_adjustment_tau

        tau, scores = select_logit_adjustment_tau(
            head_logits(model, feats["validation"]),
            _labels(feats["validation"]),
            counts,
            POSTHOC_TAUS,
        )
        fold_logit_adjustment(model, counts, tau)
        stage_info.update(
            {
                "tau": tau,
                "tau_selected_on": splits.validation_source,
                "tau_criterion": "validation balanced accuracy (ties: smaller tau)",
                "tau_grid_scores": {f"{t:g}": v for t, v in scores.items()},
                "folded_into": "classifier bias",
            }
        )
    elif stage == "tau_norm":
        tau, scores = select_tau(model, feats["validation"], taus)
        tau_normalize(model, tau)
        stage_info.update(
            {
                "tau": tau,
                "tau_selected_on": splits.validation_source,
                "tau_criterion": "validation balanced accuracy",
                "tau_grid_scores": {f"{t:g}": s for t, s in scores.items()},
            }
        )
    elif stage == "crt":
        train_metrics = retrain_classifier(
            model, feats["train"], args, counts, loss_config=loss_config
        )
        stage_info.update({"sampler": "class_balanced", "head": "re-initialised"})
    else:
        train_metrics, scales = learn_weight_scaling(
            model, feats["train"], args, counts, loss_config=loss_config
        )
        stage_info.update({"sampler": "class_balanced", "scales": scales})
    if loss_config is not None and stage in ("crt", "lws"):
        stage_info["loss"] = (
            loss_config.to_dict() if hasattr(loss_config, "to_dict") else loss_config
        )
    for p in model.parameters():
        p.requires_grad_(True)

    thresholds = thresholds_of(record)
    logits = head_logits(model, feats["test"])
    labels = _labels(feats["test"])
    test_metrics = long_tail_metrics(
        logits,
        labels,
        counts,
        many_threshold=thresholds["many"],
        few_threshold=thresholds["few"],
        class_names=names,
    )
    results = {**train_metrics, **{f"test_{k}": v for k, v in test_metrics.items()}}
    run_info = dict(record)
    # The first stage's post-hoc bias and its selection record describe a head this stage
    # replaced or rescaled: keep them as history, not as claims about this model.
    for key in ("posthoc", "selection"):
        if key in run_info:
            stage_info[f"first_stage_{key}"] = run_info.pop(key)
    run_info["stage"] = stage_info
    _write_stage_dir(out, model, processor, run_info, results, test_metrics, logits, labels)
    return SecondStageResult(stage, out, results, test_metrics, run_info, stage_info)


def _check_posthoc_source(model: nn.Module, record: dict, from_run: Any) -> None:
    """Refuse a post-hoc adjustment that would be applied twice or could not be saved."""
    previous = record.get("posthoc")
    if previous:
        raise ValueError(
            f"--from_run {from_run} was already logit-adjusted at the end of its training "
            f"(--posthoc_tau, tau = {previous.get('tau')}, folded into its bias); a second "
            "adjustment would stack on it. Start the stage from a run trained without "
            "--posthoc_tau."
        )
    if (record.get("stage") or {}).get("name") == "posthoc_la":
        raise ValueError(
            f"--from_run {from_run} is itself a posthoc_la stage; start from its source run "
            f"({record['stage'].get('from_run')})."
        )
    try:
        logit_adjustment_target(model, record["dataset"]["class_counts"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"--stage posthoc_la cannot adjust --from_run {from_run}: {err} For this run, "
            "--stage crt or tau_norm re-balance the head instead."
        ) from None


def _write_stage_dir(out, model, processor, run_info, results, test_metrics, logits, labels):
    from hf_longtail.run_directory import write_evaluation

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    write_evaluation(
        out,
        results=results,
        run_record=run_info,
        test_metrics=test_metrics,
        predictions=logits.argmax(-1),
        labels=labels,
    )
