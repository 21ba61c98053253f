"""`evaluate` metric script: long-tail accuracy (many/medium/few-shot, worst-class, ECE...).

Load it offline from the installed package (no Hub access)::

    from hf_longtail.metrics import load_evaluate_metric
    metric = load_evaluate_metric()
    metric.compute(predictions=preds, references=labels, train_class_counts=counts)

or ``evaluate.load(hf_longtail.metrics.EVALUATE_METRIC_PATH)``. The computation is
:func:`hf_longtail.metrics.long_tail_metrics`; this file only declares the input features.
Imports here are absolute on purpose: ``evaluate`` copies the script into its module cache, where
relative imports would be resolved as extra files to copy.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from hf_longtail.metrics.functions import long_tail_metrics

_DESCRIPTION = """
Long-tailed classification metrics: overall top-1 accuracy, many-shot (> many_threshold training
images), medium-shot and few-shot (< few_threshold) accuracy as means of per-class accuracies,
worst-class accuracy, balanced accuracy, macro F1, expected calibration error (needs logits),
per-class accuracy and the spectral norm of the normalised off-diagonal confusion matrix.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (N,) or logits (N, K).
    references: true class ids (N,).
    train_class_counts: number of training images per class (length K). Required.
    many_threshold (int, default 100), few_threshold (int, default 20): shot-group thresholds.
    class_names (list of str, optional): names, to report `worst_class_name`.
    ece_bins (int, default 15): confidence bins of the ECE.
    logit_adjustment_tau (float, optional): post-hoc logit adjustment (logits only).
Returns:
    dict with accuracy, many_shot_accuracy, medium_shot_accuracy, few_shot_accuracy,
    worst_class_accuracy, worst_class, balanced_accuracy, macro_f1, ece, per_class_accuracy,
    confusion_spectral_norm, num_many, num_medium, num_few, ...
Examples:
    >>> metric = load_evaluate_metric()
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], train_class_counts=[500, 10])["accuracy"]
    0.6666666666666666
"""

_CITATION = """
@inproceedings{liu2019large,
  title={Large-Scale Long-Tailed Recognition in an Open World},
  author={Liu, Ziwei and Miao, Zhongqi and Zhan, Xiaohang and Wang, Jiayun and Gong, Boqing and Yu, Stella X.},
  booktitle={CVPR}, year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LongTailAccuracy(evaluate.Metric):
    """`evaluate.Metric` wrapper of :func:`hf_longtail.metrics.long_tail_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted input formats: class ids, or logits (which also give the ECE).
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
            reference_urls=["https://github.com/zhmiao/OpenLongTailRecognition-OLTR"],
        )

    def _compute(
        self, predictions: Any, references: Any, train_class_counts: Any = None, **options: Any
    ) -> dict[str, Any]:
        # options: many_threshold, few_threshold, class_names, ece_bins, logit_adjustment_tau
        # (the metric options of long_tail_metrics, checked there).
        if train_class_counts is None:
            raise ValueError(
                "long_tail_accuracy needs `train_class_counts` (training images per class), e.g. "
                "metric.compute(predictions=..., references=..., train_class_counts=[5000, 2997, ...])."
            )
        return long_tail_metrics(predictions, references, train_class_counts, **options)
