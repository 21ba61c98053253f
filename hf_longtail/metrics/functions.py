"""Long-tail classification metrics as plain numpy functions (torch tensors accepted as input).

Conventions used throughout this module (and by the Trainer ``compute_metrics`` built on it):

- ``K`` is the number of classes, fixed by ``len(train_class_counts)``.
- A *shot group* is defined by the number of **training** images of a class ``n_c``:
  many-shot ``n_c > many_threshold``, medium-shot ``few_threshold <= n_c <= many_threshold``,
  few-shot ``n_c < few_threshold`` (defaults 100 / 20). This is the convention of the
  decoupling / classifier-balancing code (Kang et al., 2020) and of most later long-tail work.
  OLTR's original code (Liu et al., 2019) used ``n_c >= 100`` for many-shot and ``n_c <= 20`` for
  few-shot; with integer counts that is ``many_threshold=99, few_threshold=21`` here.
- A group accuracy is the **mean of the per-class accuracies** (recalls) of the classes in the
  group, as in OLTR/decoupling, not the pooled accuracy over the group's samples.
- Classes with no evaluation sample have per-class accuracy ``None`` and are left out of every
  mean (group accuracies, balanced accuracy, worst class). A group with no evaluated class has
  accuracy ``None`` (not NaN: the dict must stay strict-JSON serialisable).
- The confusion matrix returned by :func:`confusion_matrix` follows scikit-learn: rows are the
  true class, columns the predicted class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_longtail.class_counts import DEFAULT_THRESHOLDS, ClassCounts, ShotThresholds

__all__ = [
    "LongTailMetricAccumulator",
    "confusion_matrix",
    "confusion_spectral_norm",
    "expected_calibration_error",
    "logit_adjust",
    "long_tail_metrics",
    "shot_groups",
]

# Above this size the exact SVD (O(K^3)) is replaced by ARPACK on the sparse confusion matrix.
_DENSE_SVD_MAX_CLASSES = 1024
# Rows converted to float64 at a time, so iNaturalist-size logits (24k x 8142) never double in RAM.
_CHUNK_ROWS = 4096


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or (nested) sequence to a numpy array."""
    if x is None:
        raise ValueError(f"`{name}` is None; pass an array, a list or a torch tensor.")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_class_counts(train_class_counts: Any) -> np.ndarray:
    """The validated counts (:class:`~hf_longtail.class_counts.ClassCounts`'s rule) as int64."""
    counts = ClassCounts.coerce(train_class_counts, name="train_class_counts")
    return np.asarray(counts.counts, dtype=np.int64)


def _as_labels(labels: Any, num_classes: int, name: str = "labels") -> np.ndarray:
    arr = _to_numpy(labels, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one class id per sample); got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or np.any(arr != np.round(arr)):
            raise ValueError(f"`{name}` must hold integer class ids; got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes}) (K = len(train_class_counts)); found values "
            f"in [{arr.min()}, {arr.max()}]. Check that the evaluation split uses the same label "
            "ids as the training split (and drop ignored samples, e.g. label -100)."
        )
    return arr


def shot_groups(
    train_class_counts: Sequence[int] | np.ndarray,
    many_threshold: float = DEFAULT_THRESHOLDS["many"],
    few_threshold: float = DEFAULT_THRESHOLDS["few"],
) -> dict[str, list[int]]:
    """Split class ids into shot groups by their number of training images ``n_c``.

    ``many``: ``n_c > many_threshold``; ``medium``: ``few_threshold <= n_c <= many_threshold``;
    ``few``: ``n_c < few_threshold``. (OLTR's original code used ``>= 100`` / ``<= 20``; pass
    ``many_threshold=99, few_threshold=21`` to reproduce it with integer counts.)

    Returns ``{"many": [...], "medium": [...], "few": [...]}`` with sorted class ids
    (:meth:`hf_longtail.class_counts.ClassCounts.shot_groups`, the one shot-group rule).
    """
    thresholds = ShotThresholds(many_threshold, few_threshold)
    counts = ClassCounts.coerce(train_class_counts, name="train_class_counts")
    return counts.shot_groups(thresholds)


def logit_adjust(
    logits: Any, train_class_counts: Sequence[int] | np.ndarray, tau: float = 1.0
) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., 2021): ``logits - tau * log(prior)``.

    ``prior_c = n_c / sum(n)`` from the training counts. A class with zero training images gets
    the count of the rarest observed class (:func:`hf_longtail.class_counts.fill_zero_counts`, the
    rule of the losses' priors), so its adjustment stays finite and equals
    :func:`hf_longtail.losses.post_hoc_logit_adjust`. Returns a float64 numpy array.
    """
    counts = ClassCounts.coerce(train_class_counts, name="train_class_counts")
    z = _to_numpy(logits, "logits").astype(np.float64)
    if z.ndim != 2 or z.shape[1] != len(counts):
        raise ValueError(
            f"`logits` must have shape (N, {len(counts)}) to match train_class_counts; got "
            f"{z.shape}."
        )
    return z - float(tau) * np.asarray(counts.log_prior())


def log_prior(train_class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``log(prior_c)``, ``prior_c = n_c / sum(n)`` (zero counts filled as in
    :func:`logit_adjust`): the vector that post-hoc logit adjustment subtracts ``tau`` times."""
    counts = ClassCounts.coerce(train_class_counts, name="train_class_counts")
    return np.asarray(counts.log_prior())


#: The tau grid of ``--posthoc_tau auto``: 0, 0.25, ..., 2.0.
POSTHOC_TAUS = tuple(0.25 * i for i in range(9))


def select_logit_adjustment_tau(
    logits: Any,
    labels: Any,
    train_class_counts: Sequence[int] | np.ndarray,
    taus: Sequence[float] = POSTHOC_TAUS,
) -> tuple[float, dict[float, float]]:
    """``(best tau, {tau: balanced accuracy})`` of :func:`logit_adjust` on *validation* logits.

    The criterion is balanced accuracy (mean per-class recall over the classes present in
    ``labels``), so an imbalanced validation split does not favour the head classes; ties go to
    the smaller tau (the smaller change). Pass validation predictions only: choosing on the
    split the results are reported on would overstate them.
    """
    if not len(taus):
        raise ValueError("taus is empty: give at least one tau to try.")
    counts = _as_class_counts(train_class_counts)
    z = _to_numpy(logits, "logits").astype(np.float64)
    y = _as_labels(labels, counts.size)
    present = np.unique(y)
    scores: dict[float, float] = {}
    for tau in taus:
        pred = logit_adjust(z, counts, float(tau)).argmax(-1)
        scores[float(tau)] = float(np.mean([(pred[y == c] == c).mean() for c in present]))
    best = max(sorted(scores), key=lambda t: (scores[t], -t))
    return best, scores


def confusion_matrix(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Count matrix ``M[t, p]`` = number of samples of true class ``t`` predicted as ``p``.

    Rows are true classes and columns predicted classes (scikit-learn's convention). Returns an
    int64 array of shape ``(num_classes, num_classes)``.
    """
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be >= 1; got {num_classes}.")
    k = int(num_classes)
    y = _as_labels(labels, k, "labels")
    p = _as_labels(predictions, k, "predictions")
    if y.shape != p.shape:
        raise ValueError(
            f"`predictions` ({p.shape[0]}) and `labels` ({y.shape[0]}) differ in length."
        )
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def _spectral_norm_from_pairs(true: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Spectral norm of ``C[p, t] = #(pred=p, true=t) / n_t`` with a zero diagonal."""
    k = num_classes
    n_true = np.bincount(true, minlength=k).astype(np.float64)
    off = true != pred
    if not np.any(off):
        return 0.0
    t, p = true[off], pred[off]
    w = 1.0 / n_true[t]
    if k <= _DENSE_SVD_MAX_CLASSES:
        c = np.zeros((k, k), dtype=np.float64)
        np.add.at(c, (p, t), w)
        return float(np.linalg.norm(c, 2))
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    c = coo_matrix((w, (p, t)), shape=(k, k)).tocsr()
    # Fixed start vector: ARPACK is otherwise seeded randomly and the value would wobble.
    s = svds(c, k=1, v0=np.ones(k) / np.sqrt(k), return_singular_vectors=False)
    return float(s[0])


def confusion_spectral_norm(confusion: Any) -> float:
    """Spectral norm of the normalised off-diagonal confusion matrix, as CAR defines it.

    Given counts ``M[t, p]`` (rows true, columns predicted, as returned by
    :func:`confusion_matrix`), CAR's matrix is ``C[p, t] = M[t, p] / n_t`` with
    ``n_t = sum_p M[t, p]`` (rows predicted, columns true, each column normalised by its true-class
    count) and ``C[c, c] = 0``. The result is the largest singular value ``||C||_2``; classes
    with no sample give a zero column. Transposing does not change the spectral norm, so only
    the normalisation by true-class count matters. This is the hard-prediction, unweighted
    counterpart of the matrix CAR regularises (``hf_longtail.losses``: same orientation and
    normalisation, soft probabilities, EMA, and columns scaled by class weights ``w``).
    """
    m = _to_numpy(confusion, "confusion").astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`confusion` must be a square (K, K) matrix; got shape {m.shape}.")
    n_true = m.sum(axis=1)
    c = np.divide(m, n_true[:, None], out=np.zeros_like(m), where=n_true[:, None] > 0).T
    np.fill_diagonal(c, 0.0)
    return float(np.linalg.norm(c, 2)) if c.size else 0.0


def _confidence_and_prediction(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max softmax probability and argmax, stable for any finite logits (float64)."""
    pred = np.argmax(z, axis=1)
    zmax = z[np.arange(z.shape[0]), pred]
    # max softmax = 1 / sum_j exp(z_j - z_max); the sum is >= 1, so no overflow or 0/0.
    conf = 1.0 / np.exp(z - zmax[:, None]).sum(axis=1)
    return conf, pred


def _ece_bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Bins (lo, hi] with edges linspace(0, 1, B+1), exactly as in Guo et al.'s reference code.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def expected_calibration_error(logits: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where the confidence of a sample is its
    maximum softmax probability, ``B_b`` the samples whose confidence falls in
    ``((b-1)/n_bins, b/n_bins]``, ``acc`` the fraction of correct argmax predictions and ``conf``
    the mean confidence in the bin (Guo et al., 2017). Softmax is computed in float64.
    """
    z = _to_numpy(logits, "logits")
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"`logits` must have shape (N, K) with K >= 2 classes; got {z.shape}.")
    acc = LongTailMetricAccumulator(np.ones(z.shape[1], dtype=np.int64), ece_bins=n_bins)
    acc.update(z, labels)
    return acc._ece()  # type: ignore[return-value]


class LongTailMetricAccumulator:
    """Streaming version of :func:`long_tail_metrics`: ``update`` batch by batch, then ``compute``.

    Memory is O(N) integers plus O(ece_bins) floats, whatever the number of classes, so it also
    serves iNaturalist-size evaluations and the Trainer's ``batch_eval_metrics`` mode. Results are
    identical to calling :func:`long_tail_metrics` once on the concatenated inputs.

    Args (the metric options; :func:`long_tail_metrics`, :class:`LongTailComputeMetrics` and
    the ``evaluate`` metric pass theirs on to here):
        train_class_counts: training images per class (length ``K``): a list, an array, a tensor
            or a :class:`~hf_longtail.class_counts.ClassCounts` (its names serve as
            ``class_names`` when those are not given); it fixes ``K`` and the shot groups.
        many_threshold, few_threshold: shot-group thresholds
            (:class:`~hf_longtail.class_counts.ShotThresholds`): many-shot
            ``n_c > many_threshold``, few-shot ``n_c < few_threshold``, medium-shot otherwise
            (OLTR's original code: ``>= 100`` / ``<= 20``, i.e. ``many_threshold=99,
            few_threshold=21``).
        class_names: optional names (length ``K``) used for ``worst_class_name``.
        ece_bins: number of equal-width confidence bins of the ECE (15, as in Guo et al., 2017).
        logit_adjustment_tau: if set, logits are replaced by ``logits - tau * log(prior)`` before
            anything else (predictions and ECE both use the adjusted logits; logits only).
    """

    def __init__(
        self,
        train_class_counts: Sequence[int] | np.ndarray,
        many_threshold: float = DEFAULT_THRESHOLDS["many"],
        few_threshold: float = DEFAULT_THRESHOLDS["few"],
        class_names: Sequence[str] | None = None,
        ece_bins: int = 15,
        logit_adjustment_tau: float | None = None,
    ) -> None:
        self.thresholds = ShotThresholds(many_threshold, few_threshold)
        self.class_counts = ClassCounts.coerce(
            train_class_counts, class_names, name="train_class_counts"
        )
        self.train_class_counts = np.asarray(self.class_counts.counts, dtype=np.int64)
        self.num_classes = len(self.class_counts)
        if int(ece_bins) < 1:
            raise ValueError(f"`ece_bins` must be >= 1; got {ece_bins}.")
        names = self.class_counts.names
        self.class_names = list(names) if names is not None else None
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.ece_bins = int(ece_bins)
        self.logit_adjustment_tau = logit_adjustment_tau
        self._log_prior = (
            np.asarray(self.class_counts.log_prior()) if logit_adjustment_tau is not None else None
        )
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._labels: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._bin_count = np.zeros(self.ece_bins, dtype=np.int64)
        self._bin_conf = np.zeros(self.ece_bins, dtype=np.float64)
        self._bin_correct = np.zeros(self.ece_bins, dtype=np.float64)
        self._only_logits = True

    @property
    def num_samples(self) -> int:
        """Number of samples accumulated so far."""
        return int(sum(x.size for x in self._labels))

    def update(self, logits_or_predictions: Any, labels: Any) -> None:
        """Add a batch: logits of shape ``(N, K)`` (floats) or predicted ids of shape ``(N,)``."""
        k = self.num_classes
        x = _to_numpy(logits_or_predictions, "logits_or_predictions")
        if x.ndim == 2 and x.shape[1] == 1 and k != 1:
            x = x[:, 0]  # (N, 1) predicted ids
        if x.ndim == 2:
            if x.shape[1] != k:
                raise ValueError(
                    f"logits have {x.shape[1]} columns but train_class_counts has {k} classes; "
                    "the model head and the class counts must describe the same label set."
                )
            if not np.issubdtype(x.dtype, np.number):
                raise ValueError(f"logits must be numeric; got dtype {x.dtype}.")
            y = _as_labels(labels, k)
            if y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"logits ({x.shape[0]} rows) and labels ({y.shape[0]}) differ in length."
                )
            preds = np.empty(y.shape[0], dtype=np.int64)
            for s in range(0, x.shape[0], _CHUNK_ROWS):
                z = x[s : s + _CHUNK_ROWS].astype(np.float64)
                if not np.all(np.isfinite(z)):
                    bad = int(np.sum(~np.isfinite(z)))
                    raise ValueError(
                        f"logits contain {bad} NaN/inf values (rows {s}..{s + z.shape[0] - 1}); "
                        "the model has diverged or overflowed in half precision."
                    )
                if self.logit_adjustment_tau is not None:
                    z = z - float(self.logit_adjustment_tau) * self._log_prior
                conf, p = _confidence_and_prediction(z)
                preds[s : s + z.shape[0]] = p
                idx = _ece_bin_index(conf, self.ece_bins)
                self._bin_count += np.bincount(idx, minlength=self.ece_bins)
                self._bin_conf += np.bincount(idx, weights=conf, minlength=self.ece_bins)
                correct = (p == y[s : s + z.shape[0]]).astype(np.float64)
                self._bin_correct += np.bincount(idx, weights=correct, minlength=self.ece_bins)
        elif x.ndim == 1:
            if self.logit_adjustment_tau is not None:
                raise ValueError(
                    "`logit_adjustment_tau` needs logits of shape (N, K); got predicted class ids."
                )
            preds = _as_labels(x, k, "predictions")
            y = _as_labels(labels, k)
            if y.shape[0] != preds.shape[0]:
                raise ValueError(
                    f"predictions ({preds.shape[0]}) and labels ({y.shape[0]}) differ in length."
                )
            self._only_logits = False
        else:
            raise ValueError(
                "`logits_or_predictions` must be logits of shape (N, K) or predicted class ids of "
                f"shape (N,); got shape {x.shape}."
            )
        self._labels.append(y)
        self._preds.append(preds)

    def _ece(self) -> float | None:
        if not self._only_logits:
            return None
        n = self._bin_count.sum()
        if n == 0:
            return None
        nz = self._bin_count > 0
        gap = np.abs(self._bin_correct[nz] - self._bin_conf[nz])  # = |B| * |acc - conf|
        return float(gap.sum() / n)

    def compute(self) -> dict[str, Any]:
        """Return the metrics dict described in :func:`long_tail_metrics`."""
        if self.num_samples == 0:
            raise ValueError("No samples to evaluate: call update() with a non-empty batch first.")
        k = self.num_classes
        y = np.concatenate(self._labels)
        p = np.concatenate(self._preds)
        n_true = np.bincount(y, minlength=k)
        n_pred = np.bincount(p, minlength=k)
        tp = np.bincount(y[p == y], minlength=k)

        evaluated = n_true > 0
        recall = np.divide(tp, n_true, out=np.zeros(k), where=evaluated)
        per_class: list[float | None] = [float(r) if e else None for r, e in zip(recall, evaluated)]

        groups = self.class_counts.shot_groups(self.thresholds)

        def group_mean(ids: list[int]) -> float | None:
            ids = [i for i in ids if evaluated[i]]
            return float(np.mean(recall[ids])) if ids else None

        # Macro F1 over the classes present in labels or predictions (scikit-learn's default
        # label set); F1 = 2TP / (2TP + FP + FN), 0 when a class is never right.
        present = (n_true > 0) | (n_pred > 0)
        f1 = 2.0 * tp[present] / (n_true[present] + n_pred[present])

        eval_ids = np.flatnonzero(evaluated)
        worst = int(eval_ids[np.argmin(recall[eval_ids])])
        out: dict[str, Any] = {
            "accuracy": float(tp.sum() / y.size),
            "many_shot_accuracy": group_mean(groups["many"]),
            "medium_shot_accuracy": group_mean(groups["medium"]),
            "few_shot_accuracy": group_mean(groups["few"]),
            "balanced_accuracy": float(recall[evaluated].mean()),
            "macro_f1": float(f1.mean()),
            "worst_class_accuracy": float(recall[worst]),
            "worst_class": worst,
        }
        if self.class_names is not None:
            out["worst_class_name"] = self.class_names[worst]
        out.update(
            {
                "ece": self._ece(),
                "confusion_spectral_norm": _spectral_norm_from_pairs(y, p, k),
                "per_class_accuracy": per_class,
                "num_many": len(groups["many"]),
                "num_medium": len(groups["medium"]),
                "num_few": len(groups["few"]),
                "num_evaluated_classes": int(evaluated.sum()),
                "num_samples": int(y.size),
            }
        )
        return out

    def confusion_matrix(self) -> np.ndarray:
        """Counts ``M[t, p]`` (rows true, columns predicted) of everything accumulated so far."""
        y = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        p = np.concatenate(self._preds) if self._preds else np.zeros(0, np.int64)
        return confusion_matrix(p, y, self.num_classes)


def long_tail_metrics(
    logits_or_predictions: Any,
    labels: Any,
    train_class_counts: Sequence[int] | np.ndarray | ClassCounts,
    **options: Any,
) -> dict[str, Any]:
    """All long-tail evaluation metrics of one set of predictions.

    Args:
        logits_or_predictions: logits ``(N, K)`` (numpy / torch / list) or predicted class ids
            ``(N,)``. With ids only, ``ece`` is ``None`` and logit adjustment is unavailable.
        labels: true class ids ``(N,)`` in ``[0, K)``.
        train_class_counts: training images per class, length ``K`` (defines the shot groups).
        options: the metric options of :class:`LongTailMetricAccumulator` (``many_threshold``,
            ``few_threshold``, ``class_names``, ``ece_bins``, ``logit_adjustment_tau``).

    Returns a JSON-serialisable dict (Python floats/ints, ``None`` for undefined values):

    - ``accuracy``: top-1 accuracy over all samples;
    - ``many_shot_accuracy`` / ``medium_shot_accuracy`` / ``few_shot_accuracy``: mean per-class
      accuracy of the group's evaluated classes (``None`` if the group has none);
    - ``balanced_accuracy``: mean per-class recall over classes with evaluation samples
      (= ``sklearn.metrics.balanced_accuracy_score``);
    - ``macro_f1``: unweighted mean F1 over classes present in labels or predictions
      (= ``sklearn.metrics.f1_score(average="macro", zero_division=0)``);
    - ``worst_class_accuracy``, ``worst_class`` (lowest id on ties) and, with names,
      ``worst_class_name``;
    - ``ece``: expected calibration error, ``None`` without logits;
    - ``confusion_spectral_norm``: ``||C||_2`` with ``C[p, t] = #(pred=p, true=t) / n_t`` and a
      zero diagonal (CAR's definition, see :func:`confusion_spectral_norm`);
    - ``per_class_accuracy``: list of ``K`` recalls, ``None`` for classes without samples;
    - ``num_many`` / ``num_medium`` / ``num_few``: classes per group (all ``K`` classes, by
      training count); ``num_evaluated_classes``; ``num_samples``.
    """
    acc = LongTailMetricAccumulator(train_class_counts, **options)
    acc.update(logits_or_predictions, labels)
    return acc.compute()
