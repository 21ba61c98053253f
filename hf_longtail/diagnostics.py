"""Long-tail diagnostics in the experiment trackers (TensorBoard, Weights & Biases, trackio).

transformers' reporting callbacks log ints, floats (and, for TensorBoard, strings) and drop
everything else with a warning, so the per-class accuracy list of
:class:`~hf_longtail.metrics.LongTailComputeMetrics` never reached a tracker, and the final test
metrics (``Trainer.predict``) were never logged at all. This module, used by
:class:`~hf_longtail.trainer.LongTailTrainer`, closes both gaps through the trackers' own APIs:

- :func:`tracker_logs` turns one ``Trainer.log`` record into what the trackers can take:
  ``<prefix>per_class_accuracy`` becomes one scalar per class,
  ``<prefix>per_class_accuracy/<index>_<name>`` (shown as ``eval/per_class_accuracy/...`` or
  ``test/per_class_accuracy/...``; at most :data:`PER_CLASS_SCALAR_LIMIT` classes, beyond which
  the per-class plot image is logged instead), and undefined values (``None``: an empty shot
  group) are left out. The shot-group accuracies are scalars already. ``LongTailTrainer.log``
  hands this to the trackers while ``trainer_state.json`` keeps the record as computed;
- :func:`log_figures` logs matplotlib figures with each active reporting callback's own image
  API: ``SummaryWriter.add_figure`` of ``TensorBoardCallback``, ``wandb.Image`` through
  ``WandbCallback``, ``trackio.Image`` through ``TrackioCallback`` (others are skipped);
- :class:`DiagnosticsCallback` logs the confusion matrix (and, for many classes, the per-class
  plot) of every evaluation as images; ``LongTailTrainer.evaluate_and_save`` logs the final test
  metrics and images the same way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import TrainerCallback

__all__ = [
    "PER_CLASS_SCALAR_LIMIT",
    "DiagnosticsCallback",
    "evaluation_figures",
    "log_figures",
    "reporting_callbacks",
    "tracker_logs",
]

logger = logging.getLogger(__name__)

#: Up to this many classes the per-class accuracies are logged as scalars (one curve per class);
#: above it (ImageNet-LT's 1,000 classes) as the per-class plot image.
PER_CLASS_SCALAR_LIMIT = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _per_class_key(key: str, index: int, num_classes: int, names: Sequence[str] | None) -> str:
    width = len(str(max(num_classes - 1, 0)))
    name = _UNSAFE.sub("_", str(names[index])) if names and index < len(names) else ""
    return f"{key}/{index:0{width}d}" + (f"_{name}" if name and name != str(index) else "")


def tracker_logs(
    logs: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    max_classes: int = PER_CLASS_SCALAR_LIMIT,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(for the trackers, held back)`` of one log record.

    For the trackers: every int/float/str value as it is, and each ``*per_class_accuracy`` list
    of at most ``max_classes`` entries as scalars ``<key>/<index>_<name>`` (the index zero-padded
    so the classes sort in label order; classes without evaluation samples, ``None``, are left
    out). Held back (what the trackers cannot take: lists, ``None``) keeps the original values.
    """
    tracked: dict[str, Any] = {}
    held: dict[str, Any] = {}
    for key, value in logs.items():
        if value is None or isinstance(value, (list, tuple, np.ndarray)):
            held[key] = value
            if key.endswith("per_class_accuracy") and value is not None:
                values = list(value)
                if len(values) <= max_classes:
                    for i, acc in enumerate(values):
                        if acc is not None:
                            tracked[_per_class_key(key, i, len(values), class_names)] = float(acc)
        else:
            tracked[key] = value
    return tracked, held


def reporting_callbacks(callbacks: Sequence[Any]) -> dict[str, Any]:
    """``{class name: callback}`` of the reporting callbacks that can take images."""
    found = {}
    for cb in callbacks:
        name = type(cb).__name__
        if name in ("TensorBoardCallback", "WandbCallback", "TrackioCallback"):
            found[name] = cb
    return found


def log_figures(
    callbacks: Sequence[Any], args: Any, state: Any, figures: Mapping[str, Any]
) -> list[str]:
    """Log matplotlib ``figures`` (``{tag: Figure}``, e.g. ``eval/confusion_matrix``) with each
    reporting callback among ``callbacks`` that can take images, at ``state.global_step``, on
    the main process only. Returns the names of the trackers written to. A tracker that fails
    is logged as a warning (training is never stopped by a diagnostic)."""
    if not figures or not getattr(state, "is_world_process_zero", True):
        return []
    written = []
    for name, cb in reporting_callbacks(callbacks).items():
        try:
            if name == "TensorBoardCallback":
                if cb.tb_writer is None and hasattr(cb, "_init_summary_writer"):
                    cb._init_summary_writer(args)  # closed at train end: the final test logs
                if cb.tb_writer is None:
                    continue
                for tag, fig in figures.items():
                    cb.tb_writer.add_figure(tag, fig, state.global_step, close=False)
                cb.tb_writer.flush()
            elif name == "WandbCallback":
                if getattr(cb, "_wandb", None) is None or getattr(cb._wandb, "run", None) is None:
                    continue
                images = {tag: cb._wandb.Image(fig) for tag, fig in figures.items()}
                cb._wandb.log({**images, "train/global_step": state.global_step})
            elif name == "TrackioCallback":
                trackio = getattr(cb, "_trackio", None)
                if trackio is None or not getattr(cb, "_initialized", False):
                    continue
                if not hasattr(trackio, "Image"):
                    continue
                images = {tag: trackio.Image(_figure_array(fig)) for tag, fig in figures.items()}
                trackio.log({**images, "train/global_step": state.global_step})
            else:  # pragma: no cover - _reporting_callbacks only returns the three above
                continue
            written.append(name)
        except Exception as err:  # a tracker's own failure must not end the run
            logger.warning("Could not log %s to %s: %s", sorted(figures), name, err)
    return written


def _figure_array(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def evaluation_figures(
    prefix: str,
    confusion: Any,
    train_class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    per_class_accuracy: Sequence[float | None] | None = None,
    thresholds: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """``{"<prefix>/confusion_matrix": Figure, ["<prefix>/per_class_accuracy": Figure]}``: the
    row-normalised confusion matrix (head to tail) and, for more than
    :data:`PER_CLASS_SCALAR_LIMIT` classes (no per-class scalars then), the per-class accuracy
    against training frequency (:mod:`hf_longtail.metrics.plots`)."""
    from hf_longtail.class_counts import DEFAULT_THRESHOLDS
    from hf_longtail.metrics.plots import plot_confusion_matrix, plot_per_class_accuracy

    names = list(class_names) if class_names else None
    figures = {
        f"{prefix}/confusion_matrix": plot_confusion_matrix(
            confusion, None, class_names=names, train_class_counts=train_class_counts
        )
    }
    if per_class_accuracy is not None and len(per_class_accuracy) > PER_CLASS_SCALAR_LIMIT:
        thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        figures[f"{prefix}/per_class_accuracy"] = plot_per_class_accuracy(
            per_class_accuracy,
            train_class_counts,
            None,
            class_names=names,
            many_threshold=thresholds["many"],
            few_threshold=thresholds["few"],
        )
    return figures


class DiagnosticsCallback(TrainerCallback):
    """After every evaluation, log the confusion matrix (and, for many classes, the per-class
    plot) of the evaluated split as images (:func:`log_figures`). The confusion matrix is the
    one :class:`~hf_longtail.metrics.LongTailComputeMetrics` computed for that evaluation
    (``last_confusion``); with another ``compute_metrics`` nothing is logged."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        compute = getattr(self.trainer, "compute_metrics", None)
        confusion = getattr(compute, "last_confusion", None)
        if confusion is None or not state.is_world_process_zero:
            return
        if not reporting_callbacks(self.trainer.callback_handler.callbacks):
            return
        metrics = metrics or {}
        key = next((k for k in metrics if k.endswith("_per_class_accuracy")), None)
        prefix = key[: -len("_per_class_accuracy")] if key else "eval"
        trainer = self.trainer
        figures = evaluation_figures(
            prefix.replace("_", "/", 1),  # eval_x -> eval/x, as transformers' rewrite_logs
            confusion,
            trainer.class_counts,
            class_names=trainer.loss_fn.class_names,
            per_class_accuracy=metrics.get(key) if key else None,
            thresholds=trainer.shot_thresholds,
        )
        log_figures(trainer.callback_handler.callbacks, args, state, figures)
