"""Training images per class: one object and one set of rules every package applies to them.

- :class:`ClassCounts` -- the training-set images per class (label order) and, optionally, the
  class names. It is built once at each boundary (a loss, a metric, a sampler, a card) from what
  the caller passed (a list, a NumPy array, a tensor, or the labels themselves with
  :meth:`ClassCounts.from_labels`) and validated by **one rule**: ``K >= 2`` entries, each a
  non-negative integer (an integral float such as ``100.0`` is accepted), at least one positive.
  A bad entry is named with its position and value (``class_counts[3] = -1 is negative``).
- **Zero counts** (:func:`fill_zero_counts`, :meth:`ClassCounts.log_prior`): wherever a count
  enters a logarithm, a power or a reciprocal (the class prior of logit adjustment and balanced
  softmax, LDAM margins, effective-number weights, post-hoc adjustment in the metrics) a zero is
  replaced by the **smallest positive count**: a class never seen in training is treated like
  the rarest observed class, so nothing becomes ``inf``/``NaN`` and the prior does not depend on
  the units of the counts (``max(n, 1)`` would give an unseen class of a dataset whose rarest
  class has 500 images a prior 500 times below that class).
- **Shot groups** (:class:`ShotThresholds`, :meth:`ClassCounts.shot_groups`): many-shot
  ``n_c > many``, few-shot ``n_c < few``, medium-shot otherwise, with ``many = 100`` and
  ``few = 20`` by default (:data:`DEFAULT_THRESHOLDS`, the usual ImageNet-LT split). The
  metrics, the plots, the model and dataset cards and the losses' head/tail statistics (head =
  many-shot, tail = every other class) all use this rule, with the thresholds of the run
  (``metric_thresholds`` of its record).

This module imports nothing beyond the standard library, so :mod:`hf_longtail.losses` (pure
PyTorch), :mod:`hf_longtail.metrics` (NumPy) and :mod:`hf_longtail.hub` (neither) share it
without crossing their layering. :func:`fill_zero_counts` works on NumPy arrays and torch
tensors alike.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ClassCounts",
    "ShotThresholds",
    "check_thresholds",
    "fill_zero_counts",
]

#: The default shot groups: many-shot > 100 training images, few-shot < 20.
DEFAULT_THRESHOLDS = {"many": 100, "few": 20}

#: The three shot groups, in the order every report lists them.
SHOT_GROUPS = ("many", "medium", "few")

_A = TypeVar("_A")


def fill_zero_counts(counts: _A) -> _A:
    """``counts`` (a 1-D NumPy array or torch tensor, all ``>= 0``) with every zero replaced by
    the smallest positive count; the result is floating point (same library and device).

    Raises ``ValueError`` when no count is positive (then there is no prior to fall back on).
    """
    positive = counts[counts > 0]
    if len(positive) == 0:
        raise ValueError(
            "every class count is 0: the class prior is undefined; pass the training-set "
            "images per class"
        )
    # Arithmetic instead of np.where / torch.where: the same expression serves both libraries.
    return counts * 1.0 + (counts == 0) * positive.min()


def check_thresholds(many: Any, few: Any) -> None:
    """Raise ``ValueError`` unless ``many`` and ``few`` are finite numbers with ``few <= many``
    (few-shot classes have fewer training images than many-shot ones)."""
    for name, value in (("many_threshold", many), ("few_threshold", few)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
            raise ValueError(f"`{name}` must be a number; got {value!r}.")
    if few > many:
        raise ValueError(
            f"`few_threshold` ({few}) must not exceed `many_threshold` ({many}): few-shot classes "
            "have fewer training images than many-shot ones."
        )


@dataclass(frozen=True)
class ShotThresholds:
    """The shot-group thresholds of a run: many-shot ``n_c > many``, few-shot ``n_c < few``,
    medium-shot otherwise (``few <= many``, checked by :func:`check_thresholds`).

    OLTR's original code used ``n_c >= 100`` / ``n_c <= 20``; with integer counts that is
    ``ShotThresholds(many=99, few=21)``.
    """

    many: float = DEFAULT_THRESHOLDS["many"]
    few: float = DEFAULT_THRESHOLDS["few"]

    def __post_init__(self) -> None:
        check_thresholds(self.many, self.few)

    @classmethod
    def coerce(cls, value: ShotThresholds | Mapping[str, Any] | None = None) -> ShotThresholds:
        """``value`` as thresholds: ``None`` gives the defaults, a mapping ``{"many", "few"}``
        (a run record's ``metric_thresholds``; a missing key takes its default)."""
        if isinstance(value, ShotThresholds):
            return value
        if value is None:
            return cls()
        unknown = set(value) - set(DEFAULT_THRESHOLDS)
        if unknown:
            raise ValueError(
                f"unknown shot-threshold key(s) {sorted(unknown)}; the keys are 'many' and 'few'."
            )
        return cls(**{**DEFAULT_THRESHOLDS, **value})

    def group(self, count: float) -> str:
        """``"many"`` if ``count > many``, ``"few"`` if ``count < few``, else ``"medium"``."""
        if count > self.many:
            return "many"
        if count < self.few:
            return "few"
        return "medium"

    def to_dict(self) -> dict[str, float]:
        """``{"many": ..., "few": ...}``, the form of a run record's ``metric_thresholds``."""
        return {"many": self.many, "few": self.few}


def _entries(values: Any, name: str) -> list[Any]:
    """``values`` as a flat Python list (a sequence, NumPy array or tensor), or a clear error."""
    if isinstance(values, (str, bytes, Mapping)):
        raise TypeError(
            f"{name} must be a sequence of per-class training-image counts (list, NumPy array "
            f"or tensor); got {type(values).__name__}"
        )
    if hasattr(values, "tolist"):  # NumPy arrays and torch tensors, without importing either
        values = values.tolist()
    if not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a sequence of per-class training-image counts; got "
            f"{type(values).__name__}"
        )
    values = list(values)
    nested = next((i for i, v in enumerate(values) if isinstance(v, (list, tuple))), None)
    if nested is not None:
        raise ValueError(f"{name} must be 1-D (one count per class); {name}[{nested}] is a list")
    return values


def _count_entry(value: Any, index: int, name: str) -> int:
    """One validated count: a non-negative integer (an integral float is accepted)."""
    where = f"{name}[{index}] = {value!r}"
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # a NumPy / torch scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} is not a number; counts are training images per class")
    if not math.isfinite(value):
        raise ValueError(f"{where} is not finite; counts must be integers >= 0")
    if value < 0:
        raise ValueError(f"{name}[{index}] = {value:g} is negative; counts must be >= 0")
    if value != int(value):
        raise ValueError(
            f"{where} is not an integer; counts are numbers of training images per class"
        )
    return int(value)


@dataclass(frozen=True)
class ClassCounts(Sequence[int]):
    """Training images per class (index = label id), validated once, with optional names.

    A read-only sequence of ints (``len``, indexing, iteration, ``list(counts)``), so it goes
    wherever a list of counts went. The one validation rule: ``K >= 2`` counts, each a
    non-negative integer (``100.0`` is accepted as ``100``; ``2.5``, ``-1``, ``nan`` are not,
    and the error names the position and the value), at least one positive; ``names``, when
    given, has ``K`` entries.

    Build it with :meth:`coerce` at a public boundary (a list, an array, a tensor or a
    ``ClassCounts``), or with :meth:`from_labels` from the training labels.
    """

    counts: tuple[int, ...]
    names: tuple[str, ...] | None = None

    def __init__(
        self, counts: Any, names: Sequence[str] | None = None, *, name: str = "class_counts"
    ) -> None:
        values = tuple(_count_entry(v, i, name) for i, v in enumerate(_entries(counts, name)))
        if len(values) < 2:
            raise ValueError(
                f"{name} must have at least 2 classes (one count per class); got {len(values)}"
            )
        if sum(values) <= 0:
            raise ValueError(f"{name} sums to 0; at least one class needs training samples")
        if names is not None:
            names = tuple(str(n) for n in _entries(names, "class_names"))
            if len(names) != len(values):
                raise ValueError(
                    f"class_names has {len(names)} entries but {name} has {len(values)}; pass "
                    "one name per class id."
                )
        object.__setattr__(self, "counts", values)
        object.__setattr__(self, "names", names)

    @classmethod
    def coerce(
        cls, counts: Any, names: Sequence[str] | None = None, *, name: str = "class_counts"
    ) -> ClassCounts:
        """``counts`` as a :class:`ClassCounts`: returned as is when it already is one (its
        names kept unless ``names`` is given), else validated; ``name`` is the argument's name
        in the errors (e.g. ``train_class_counts``)."""
        if isinstance(counts, ClassCounts):
            return counts if names is None else cls(counts.counts, names, name=name)
        return cls(counts, names, name=name)

    @classmethod
    def from_labels(
        cls, labels: Any, num_classes: int, names: Sequence[str] | None = None
    ) -> ClassCounts:
        """Count ``labels`` (integer class ids in ``[0, num_classes)``: a sequence, a NumPy array
        or a tensor): ``counts[c] = #{i : labels[i] == c}``. A label out of range is named with
        its position."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an integer; got {num_classes!r}")
        if hasattr(labels, "__array__") and not hasattr(labels, "detach"):
            return cls(_bincount(labels, int(num_classes)), names)
        counts = [0] * int(num_classes)
        for i, label in enumerate(_entries(labels, "labels")):
            c = _count_entry(label, i, "labels")
            if c >= num_classes:
                raise ValueError(
                    f"labels[{i}] = {c} is out of range; class ids are 0..{num_classes - 1}"
                )
            counts[c] += 1
        return cls(counts, names)

    # ------------------------------------------------------------------ sequence of ints
    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: Any) -> Any:
        return self.counts[index]

    def __iter__(self) -> Any:
        return iter(self.counts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClassCounts):
            return self.counts == other.counts and self.names == other.names
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.counts, self.names))

    @property
    def num_classes(self) -> int:
        """``K``, the number of classes."""
        return len(self.counts)

    @property
    def total(self) -> int:
        """``N = sum_c n_c``, the training-set size."""
        return sum(self.counts)

    def to_list(self) -> list[int]:
        """The counts as a plain list (for JSON)."""
        return list(self.counts)

    # ------------------------------------------------------------------ the rules
    def filled(self) -> list[int]:
        """The counts with every zero replaced by the smallest positive count (the zero-count
        rule, :func:`fill_zero_counts`)."""
        smallest = min(c for c in self.counts if c > 0)
        return [c if c > 0 else smallest for c in self.counts]

    def log_prior(self) -> list[float]:
        """``log pi_c = log(n'_c / sum n')`` with ``n'`` the :meth:`filled` counts: the class
        prior of logit adjustment, balanced softmax and post-hoc adjustment (losses and
        metrics alike), finite for every class."""
        filled = self.filled()
        log_total = math.log(sum(filled))
        return [math.log(c) - log_total for c in filled]

    def many_shot(self, many: float = DEFAULT_THRESHOLDS["many"]) -> list[bool]:
        """Per class, whether it is many-shot, ``n_c > many`` (the losses' head classes)."""
        return [c > many for c in self.counts]

    def shot_groups(
        self, thresholds: ShotThresholds | Mapping[str, Any] | None = None
    ) -> dict[str, list[int]]:
        """``{"many": [...], "medium": [...], "few": [...]}``: the sorted class ids of each shot
        group under ``thresholds`` (:class:`ShotThresholds`, a mapping, or the defaults)."""
        th = ShotThresholds.coerce(thresholds)
        groups: dict[str, list[int]] = {g: [] for g in SHOT_GROUPS}
        for c, n in enumerate(self.counts):
            groups[th.group(n)].append(c)
        return groups


def _bincount(labels: Any, num_classes: int) -> list[int]:
    """:meth:`ClassCounts.from_labels` of a NumPy array, vectorised (ImageNet-LT-size label
    columns); the same errors as the Python loop."""
    import numpy as np  # only for array input: the module itself stays dependency-free

    values = np.asarray(labels)
    if values.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per row); got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"labels must be integer class ids; got dtype {values.dtype}")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"labels[{i}] = {int(values[i])} is out of range; class ids are 0..{num_classes - 1}"
        )
    return np.bincount(values.astype(np.int64), minlength=num_classes).tolist()
