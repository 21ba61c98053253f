"""``compute_metrics`` for ``transformers.Trainer`` built on :mod:`hf_longtail.metrics.functions`.

Nothing here imports transformers: the Trainer's ``EvalPrediction`` is read by attribute
(``predictions``, ``label_ids``) or as a ``(predictions, label_ids)`` tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_longtail.class_counts import ClassCounts
from hf_longtail.metrics.functions import LongTailMetricAccumulator, _to_numpy

__all__ = ["IGNORE_INDEX", "LongTailComputeMetrics", "make_compute_metrics"]

IGNORE_INDEX = -100
"""Label value the Trainer (and PyTorch's cross-entropy) uses for "no label"; such samples are skipped."""


def _first(x: Any) -> Any:
    # Models returning extra outputs (hidden states...) make the Trainer hand over a tuple
    # whose first element is the logits.
    while isinstance(x, tuple):
        if not x:
            raise ValueError(
                "EvalPrediction.predictions is an empty tuple; the model returned no logits."
            )
        x = x[0]
    return x


def _concat(x: Any, name: str) -> np.ndarray:
    # `eval_do_concat_batches=False` gives a list of per-batch arrays.
    if isinstance(x, list) and x and hasattr(x[0], "shape"):
        return np.concatenate([_to_numpy(b, name) for b in x], axis=0)
    return _to_numpy(x, name)


class LongTailComputeMetrics:
    """Callable for ``Trainer(compute_metrics=...)`` returning :func:`long_tail_metrics` keys.

    Called as ``fn(eval_pred)`` it evaluates all predictions at once. Called as
    ``fn(eval_pred, compute_result=bool)`` (``TrainingArguments(batch_eval_metrics=True)``) it
    accumulates batch by batch and returns the metrics on the batch with ``compute_result=True``
    (``{}`` before), then resets. Samples whose label is ``-100`` are skipped.

    The returned dict is flat and JSON-serialisable; the Trainer prefixes the keys with
    ``eval_``/``test_``. Besides floats it holds ints (``worst_class``, ``num_*``), ``None`` for
    undefined values (an empty shot group, ``ece`` without logits), the list
    ``per_class_accuracy`` (when ``include_per_class``) and the string ``worst_class_name`` (when
    class names are given). ``Trainer.log`` and ``save_metrics`` accept all of them; TensorBoard's
    callback logs ints/floats, logs strings as text and drops lists and ``None`` with a warning,
    and ``metric_for_best_model`` must name a key that is never ``None``.
    """

    def __init__(
        self,
        train_class_counts: Sequence[int] | np.ndarray | ClassCounts,
        *,
        include_per_class: bool = True,
        **options: Any,
    ) -> None:
        # options: the metric options of LongTailMetricAccumulator (many_threshold,
        # few_threshold, class_names, ece_bins, logit_adjustment_tau), checked there.
        self._acc = LongTailMetricAccumulator(train_class_counts, **options)
        self.include_per_class = include_per_class
        #: Confusion matrix ``M[true, predicted]`` of the last computed evaluation (or ``None``).
        self.last_confusion: np.ndarray | None = None

    @property
    def accumulator(self) -> LongTailMetricAccumulator:
        """The underlying accumulator (e.g. for ``confusion_matrix()`` after a batched eval)."""
        return self._acc

    def _update(self, eval_pred: Any) -> None:
        if hasattr(eval_pred, "predictions"):
            preds, labels = eval_pred.predictions, eval_pred.label_ids
        else:
            preds, labels = eval_pred[0], eval_pred[1]
        if labels is None:
            raise ValueError(
                "EvalPrediction.label_ids is None: the evaluation dataset has no `labels` column "
                "(or TrainingArguments.label_names does not name it)."
            )
        preds = _concat(_first(preds), "predictions")
        labels = _concat(_first(labels), "label_ids").reshape(-1)
        keep = labels != IGNORE_INDEX
        if not np.all(keep):
            preds, labels = preds[keep], labels[keep]
        if labels.size:
            self._acc.update(preds, labels)

    def _result(self) -> dict[str, Any]:
        out = self._acc.compute()
        # Kept for the trackers' confusion-matrix image (hf_longtail.diagnostics), until the next
        # evaluation.
        self.last_confusion = self._acc.confusion_matrix()
        if not self.include_per_class:
            out.pop("per_class_accuracy")
        return out

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, Any]:
        """Evaluate ``eval_pred`` (see the class docstring for the two calling modes)."""
        if compute_result is None:
            self._acc.reset()
            try:
                self._update(eval_pred)
                return self._result()
            finally:
                self._acc.reset()
        self._update(eval_pred)
        if not compute_result:
            return {}
        try:
            return self._result()
        finally:
            self._acc.reset()


def make_compute_metrics(
    train_class_counts: Sequence[int] | np.ndarray, **options: Any
) -> LongTailComputeMetrics:
    """Build a ``compute_metrics`` for ``transformers.Trainer``: a
    :class:`LongTailComputeMetrics` with its keyword ``options`` (``many_threshold``,
    ``few_threshold``, ``class_names``, ``logit_adjustment_tau``, ``ece_bins``,
    ``include_per_class``); the options other than ``include_per_class`` are those of
    :class:`~hf_longtail.metrics.LongTailMetricAccumulator`.

    Example::

        trainer = Trainer(..., compute_metrics=make_compute_metrics(class_counts(ds["train"])))
        trainer.evaluate()["eval_few_shot_accuracy"]
    """
    return LongTailComputeMetrics(train_class_counts, **options)
