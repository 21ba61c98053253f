"""Long-tail model cards and publishing to the Hugging Face Hub.

Works from a finished run output directory (``scripts/train.py``'s ``--output_dir``: model
files, ``all_results.json``, ``longtail_run.json``, the plots; see ``docs/design.md``):

- :func:`build_model_card` / :func:`write_model_card`: the long-tail card (``model-index`` with
  every long-tail metric, the dataset's long-tail construction, the loss recipe, the plot);
- :func:`push_long_tail_model`: card + model + processor + plots + results to a model repo,
  raising :class:`PushToHubError` (with the retry command) if the Hub part fails;
- :func:`push_long_tailed_dataset` / :func:`build_dataset_card`: the long-tailed
  ``DatasetDict`` with a card describing its construction and class counts;
- CLI: ``python -m hf_longtail.hub push OUTPUT_DIR --repo-id NAMESPACE/NAME`` and
  ``python -m hf_longtail.hub card OUTPUT_DIR``.

Importing this package makes no network call and does not import torch, transformers or
datasets.
"""

from __future__ import annotations

from hf_longtail.hub.card import (
    CARD_OPTIONS,
    METRIC_SPECS,
    MetricSpec,
    build_model_card,
    card_metrics,
    class_count_summary,
    eval_results_for_run,
    template_path,
    write_model_card,
)
from hf_longtail.hub.dataset import (
    build_dataset_card,
    dataset_card_counts,
    push_long_tailed_dataset,
)
from hf_longtail.hub.push import PushToHubError, files_to_push, push_long_tail_model, retry_command
from hf_longtail.hub.rundir import OutputDirError, RunDir, read_run_dir, validate_output_dir

__all__ = [
    "CARD_OPTIONS",
    "METRIC_SPECS",
    "MetricSpec",
    "OutputDirError",
    "PushToHubError",
    "RunDir",
    "build_dataset_card",
    "build_model_card",
    "card_metrics",
    "class_count_summary",
    "dataset_card_counts",
    "eval_results_for_run",
    "files_to_push",
    "push_long_tail_model",
    "push_long_tailed_dataset",
    "read_run_dir",
    "retry_command",
    "template_path",
    "validate_output_dir",
    "write_model_card",
]
