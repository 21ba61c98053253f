"""Offline loader of the ``long_tail_accuracy`` `evaluate` metric shipped inside the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["EVALUATE_METRIC_PATH", "load_evaluate_metric"]

EVALUATE_METRIC_PATH: str = str(Path(__file__).with_name("long_tail_accuracy.py"))
"""Path of the metric script, usable as ``evaluate.load(EVALUATE_METRIC_PATH)``."""


def load_evaluate_metric(**kwargs: Any) -> Any:
    """Return the ``long_tail_accuracy`` ``evaluate.Metric``, loaded from the local package file.

    No network access is needed (it works with ``HF_HUB_OFFLINE=1``): ``evaluate.load`` is given
    the path of the script shipped with hf-longtail. ``kwargs`` are passed to ``evaluate.load``
    (e.g. ``experiment_id``, ``num_process``/``process_id`` for distributed evaluation).
    """
    try:
        import evaluate
    except ImportError as err:  # an optional extra: nothing else in hf-longtail needs it
        raise ImportError(
            "load_evaluate_metric needs the `evaluate` package: `pip install evaluate` (or "
            "`pip install hf-longtail[evaluate]`). The same metrics without it: "
            "hf_longtail.metrics.long_tail_metrics / make_compute_metrics."
        ) from err
    return evaluate.load(EVALUATE_METRIC_PATH, **kwargs)
