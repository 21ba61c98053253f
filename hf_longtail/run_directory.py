"""The run output directory: its file names (defined once) and the writers of its files.

A finished run directory holds, top level:

- the model (``config.json`` + weights) and its preprocessing (``preprocessor_config.json``),
  written by ``LongTailTrainer.save_model``, so ``pipeline("image-classification", dir)`` and
  ``AutoImageProcessor.from_pretrained(dir)`` work (after ``import hf_longtail`` for the CIFAR
  ResNets);
- the loss (``longtail_loss.json`` + ``longtail_loss.safetensors``,
  :meth:`~hf_longtail.losses.LongTailLoss.save_pretrained`);
- :data:`RUN_FILE` ``longtail_run.json``: what was trained (model, dataset construction and class
  counts, loss recipe, training summary, metric thresholds; schema in ``docs/design.md``);
- :data:`RESULTS_FILE` ``all_results.json``: training metrics and the final ``test_*`` metrics;
- the plots :data:`PER_CLASS_PLOT` and :data:`CONFUSION_PLOT`, and the long-tail model card
  :data:`CARD_FILE` (``README.md``, :mod:`hf_longtail.hub.card`).

``LongTailTrainer`` (``save_run_record``, ``evaluate_and_save``, ``create_model_card``,
``push_to_hub``) and the decoupled second stage write it with :func:`write_evaluation`;
:mod:`hf_longtail.resume` and :mod:`hf_longtail.hub` read it with the names defined here.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_longtail.class_counts import DEFAULT_THRESHOLDS, ShotThresholds

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "CARD_FILE",
    "CONFIG_FILE",
    "CONFUSION_PLOT",
    "DEFAULT_THRESHOLDS",
    "PER_CLASS_PLOT",
    "PROCESSOR_FILES",
    "RESULTS_FILE",
    "RUN_FILE",
    "WEIGHT_FILES",
    "format_summary",
    "jsonable",
    "peak_memory",
    "thresholds_of",
    "write_evaluation",
    "write_json",
]

CONFIG_FILE = "config.json"
RUN_FILE = "longtail_run.json"
RESULTS_FILE = "all_results.json"
CARD_FILE = "README.md"
PER_CLASS_PLOT = "per_class_accuracy.png"
CONFUSION_PLOT = "confusion_matrix.png"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",  # a LoRA run saved as its adapter (hf_longtail.models.lora)
)
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def jsonable(value: Any) -> Any:
    """``value`` if JSON has it (str, int, float, bool, None), else its enum value or ``str``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically (a temporary file renamed into
    place): a crash never leaves half a results file or run record."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=jsonable) + "\n")
    tmp.replace(path)
    return path


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    import resource

    import torch

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def thresholds_of(run_record: Mapping[str, Any] | None) -> dict[str, float]:
    """The run's shot-group thresholds ``{"many", "few"}`` (the defaults when not recorded),
    checked by :class:`~hf_longtail.class_counts.ShotThresholds`."""
    recorded = (run_record or {}).get("metric_thresholds") or {}
    return ShotThresholds.coerce(recorded).to_dict()


def write_evaluation(
    output_dir: str | Path,
    *,
    results: Mapping[str, Any],
    run_record: Mapping[str, Any],
    test_metrics: Mapping[str, Any],
    predictions: Any,
    labels: Any,
    finished_step: int | None = None,
) -> None:
    """Write the evaluated run's files into ``output_dir``: ``all_results.json``,
    ``longtail_run.json``, the two plots and the long-tail model card.

    With ``finished_step`` the run record is written once more after the card, with
    ``finished: {"global_step": finished_step}``: the marker that every final file is in place
    (:func:`hf_longtail.resume.finished_step`), so a re-run of the command changes nothing and a
    run killed before it finishes what is missing.

    ``run_record["dataset"]`` gives the class counts and names, ``run_record
    ["metric_thresholds"]`` the shot groups; ``test_metrics`` are
    :func:`~hf_longtail.metrics.long_tail_metrics` of ``predictions`` (class ids) against
    ``labels``. A card that cannot be built (the directory lacks the saved model) is logged as a
    warning naming what is missing: the results themselves are complete.
    """
    from hf_longtail.hub import OutputDirError, write_model_card
    from hf_longtail.metrics import confusion_matrix
    from hf_longtail.metrics.plots import plot_confusion_matrix, plot_per_class_accuracy

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = run_record["dataset"]
    counts, names = dataset["class_counts"], dataset["class_names"]
    thresholds = thresholds_of(run_record)
    write_json(out / RESULTS_FILE, results)
    write_json(out / RUN_FILE, run_record)
    plot_per_class_accuracy(
        test_metrics["per_class_accuracy"],
        counts,
        out / PER_CLASS_PLOT,
        class_names=names,
        many_threshold=thresholds["many"],
        few_threshold=thresholds["few"],
    )
    confusion = confusion_matrix(predictions, labels, len(names))
    plot_confusion_matrix(
        confusion, out / CONFUSION_PLOT, class_names=names, train_class_counts=counts
    )
    try:
        write_model_card(out)
    except OutputDirError as err:  # the run itself is complete: say why there is no card
        logger.warning("No model card written: %s", err)
    if finished_step is not None:
        write_json(out / RUN_FILE, {**run_record, "finished": {"global_step": int(finished_step)}})


def format_summary(metrics: Mapping[str, Any], thresholds: Mapping[str, int]) -> str:
    """The long-tail test metrics as a small table (percent), for a terminal."""

    def pct(value: Any) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    rows: Sequence[tuple[str, Any]] = (
        ("overall accuracy", metrics["accuracy"]),
        (f"many-shot (>{thresholds['many']})", metrics["many_shot_accuracy"]),
        ("medium-shot", metrics["medium_shot_accuracy"]),
        (f"few-shot (<{thresholds['few']})", metrics["few_shot_accuracy"]),
        ("worst-class", metrics["worst_class_accuracy"]),
        ("balanced accuracy", metrics["balanced_accuracy"]),
        ("macro F1", metrics["macro_f1"]),
        ("ECE (15 bins)", metrics.get("ece")),
    )
    lines = ["", "Long-tail test metrics (%)"]
    lines += [f"  {name:<24}{pct(value)}" for name, value in rows]
    worst = metrics.get("worst_class_name", metrics.get("worst_class"))
    lines.append(f"  {'worst class':<24}{worst}")
    return "\n".join(lines)
