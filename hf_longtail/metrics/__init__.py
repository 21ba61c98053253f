"""Long-tail evaluation metrics (plain numpy/torch; no trainer, losses or data import).

- :func:`long_tail_metrics` -- all metrics of one set of logits or predictions;
- :class:`LongTailMetricAccumulator` -- the same, accumulated batch by batch;
- :func:`make_compute_metrics` -- a ``compute_metrics`` for ``transformers.Trainer``;
- :func:`load_evaluate_metric` -- the ``evaluate.Metric`` wrapper, loaded offline;
- :func:`plot_per_class_accuracy`, :func:`plot_confusion_matrix` -- PNG plots (matplotlib,
  imported on first use);
- :func:`mean_std`, :func:`paired_difference` -- statistics over seeds for benchmarks (mean ±
  sample std; paired per-seed difference with a Student-t interval);
- helpers: :func:`confusion_matrix`, :func:`confusion_spectral_norm`,
  :func:`expected_calibration_error`, :func:`logit_adjust`, :func:`shot_groups`.
"""

from __future__ import annotations

from typing import Any

from hf_longtail.metrics.evaluate_metric import EVALUATE_METRIC_PATH, load_evaluate_metric
from hf_longtail.metrics.functions import (
    POSTHOC_TAUS,
    LongTailMetricAccumulator,
    confusion_matrix,
    confusion_spectral_norm,
    expected_calibration_error,
    log_prior,
    logit_adjust,
    long_tail_metrics,
    select_logit_adjustment_tau,
    shot_groups,
)
from hf_longtail.metrics.seed_stats import PairedDifference, mean_std, paired_difference
from hf_longtail.metrics.trainer_metrics import (
    IGNORE_INDEX,
    LongTailComputeMetrics,
    make_compute_metrics,
)

__all__ = [
    "EVALUATE_METRIC_PATH",
    "IGNORE_INDEX",
    "POSTHOC_TAUS",
    "LongTailComputeMetrics",
    "LongTailMetricAccumulator",
    "PairedDifference",
    "confusion_matrix",
    "confusion_spectral_norm",
    "expected_calibration_error",
    "load_evaluate_metric",
    "log_prior",
    "logit_adjust",
    "long_tail_metrics",
    "make_compute_metrics",
    "mean_std",
    "paired_difference",
    "plot_confusion_matrix",
    "plot_per_class_accuracy",
    "select_logit_adjustment_tau",
    "shot_groups",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing matplotlib costs ~0.5 s and is only needed when a plot is written.
    if name in ("plot_per_class_accuracy", "plot_confusion_matrix"):
        from hf_longtail.metrics import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'hf_longtail.metrics' has no attribute {name!r}")
