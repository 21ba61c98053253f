"""Build the long-tailed version of a labelled dataset by index selection (no image is decoded).

Which rows are kept: every row gets a key ``u = Generator(PCG64(seed)).random(N)[row]`` (one draw
per row of the source, in row order) and, within each class, the ``n_c`` rows with the smallest
keys are kept. This depends only on the PCG64 stream (stable across machines, platforms and
NumPy versions) and on the label column, so the same call gives the same rows everywhere. Two
useful consequences: for a fixed seed the subsets are nested (the IF=100 subset of a class is
contained in its IF=50 subset), and the rows are returned in their original order
(``Dataset.select`` with sorted indices keeps reads sequential).

Provenance record: the result's ``info.description`` holds a human-readable sentence and one line
``hf_longtail: {json}`` with ``class_counts`` (class 0 first), ``class_names``, ``profile``,
``imbalance_factor``, ``seed``, ``source`` and friends. ``DatasetInfo.description`` is written by
``save_to_disk`` (``dataset_info.json``) and read back by ``load_from_disk``. ``push_to_hub`` keeps
only the features and the split sizes of the info, so on the Hub the counts are recovered by
counting the label column (which :func:`class_counts` always does: the record is provenance),
and :func:`longtail_record` gives the JSON to paste into the dataset card.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict

from hf_longtail.data.columns import detect_label_column, ensure_class_label, label_array
from hf_longtail.data.profiles import long_tailed_counts, validate_imbalance_factor

__all__ = [
    "RECORD_PREFIX",
    "class_counts",
    "construction_facts",
    "heldout_split_indices",
    "long_tailed_indices",
    "longtail_record",
    "make_long_tailed",
    "source_row_text",
    "source_rows",
    "stratified_split_indices",
    "validation_record",
    "write_longtail_record",
]

logger = logging.getLogger(__name__)

#: Start of the description line that carries the JSON record.
RECORD_PREFIX = "hf_longtail: "
_RECORD_RE = re.compile(r"^hf_longtail: (\{.*\})[ \t]*$", re.MULTILINE)
_RECORD_FORMAT = "hf_longtail.longtail/v1"


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _row_keys(num_rows: int, seed: int) -> np.ndarray:
    # Generator.random on PCG64 is the most stable NumPy stream (no algorithm-dependent methods
    # such as choice/permutation whose implementation may change between NumPy versions).
    return np.random.Generator(np.random.PCG64(seed)).random(num_rows)


def _ranks_within_class(labels: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """(order, rank): ``order`` sorts rows by (label, key); ``rank[j]`` is the position of
    ``order[j]`` among the rows of its class in that order (0 = smallest key)."""
    keys = _row_keys(labels.shape[0], seed)
    order = np.lexsort((keys, labels))
    available = np.bincount(labels, minlength=num_classes)
    starts = np.concatenate(([0], np.cumsum(available)[:-1]))
    rank = np.arange(labels.shape[0], dtype=np.int64) - starts[labels[order]]
    return order, rank


def source_rows(dataset: Dataset) -> np.ndarray:
    """The row of the source split that each row of ``dataset`` is (int64, ``dataset`` order).

    Subsets are made by index selection (the long-tailed subset, the carved test split, the
    hold-outs, ``filter``, ``shuffle``, dropping unreadable rows): ``datasets`` keeps one
    indices mapping into the table the source split was loaded as, and this reads it (no image
    is touched). Row ``r`` of the result is therefore the row the user finds with
    ``datasets.load_dataset(...)[split][r]`` (or ``load_from_disk``). A dataset that was never
    subset gives ``0 .. n - 1``; ``flatten_indices``, a ``map`` or ``save_to_disk`` of a subset
    make the subset itself the new source.
    """
    indices = getattr(dataset, "_indices", None)
    if indices is None:
        return np.arange(dataset.num_rows, dtype=np.int64)
    return np.asarray(indices.column(0).to_numpy(), dtype=np.int64)


def source_row_text(split: str | None, source_split: str | None, rows: Sequence[int]) -> str:
    """How an error names rows of the source split (``rows``, e.g. from :func:`source_rows`):
    ``"split 'train', source row 17"``; ``"split 'test' (from the source's 'train' split),
    source row 17"`` for a split drawn from a source split of another name (a carved test
    split); with ``split=None`` (the caller does not know which split it reads),
    ``"row 17 of the source's 'train' split"``, or ``"source row 17"`` when that is unknown too.
    """
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:5]) + (
        f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    )
    plural = "s" if len(rows) != 1 else ""
    if split is None:
        if source_split is None:
            return f"source row{plural} {shown}"
        return f"row{plural} {shown} of the source's {source_split!r} split"
    where = f"source row{plural} {shown}"
    if source_split is not None and source_split != split:
        return f"split {split!r} (from the source's {source_split!r} split), {where}"
    return f"split {split!r}, {where}"


def source_split_name(dataset: Dataset) -> str | None:
    """The name of the source split ``dataset`` was selected from (``"train"`` for a test split
    carved from the training split), as ``datasets`` keeps it; ``None`` when unknown."""
    split = getattr(dataset, "split", None)
    return str(split) if split is not None else None


def long_tailed_indices(
    labels: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0
) -> np.ndarray:
    """Sorted row indices keeping, for every class ``c``, the ``counts[c]`` rows of class ``c``
    with the smallest seeded keys (see the module docstring).

    Args:
        labels: integer class id per row, in ``[0, len(counts))``.
        counts: how many rows to keep per class; each must be <= the rows available.
        seed: non-negative integer seed of the PCG64 key stream.

    Raises:
        ValueError: labels out of range, or a class with fewer rows than requested.
    """
    seed = _check_seed(seed)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    num_classes = counts.shape[0]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) to match len(counts)")
    available = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(available < counts)
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"class {c} has {int(available[c])} rows but {int(counts[c])} were requested"
        )
    order, rank = _ranks_within_class(labels, num_classes, seed)
    keep = order[rank < counts[labels[order]]]
    keep.sort()
    return keep


def stratified_split_indices(
    labels: Sequence[int] | np.ndarray, test_size: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``(train_indices, test_indices)``, both sorted.

    Class ``c`` with ``a_c`` rows sends ``round(test_size * a_c)`` rows to the test side, clipped
    to ``[1, a_c - 1]`` when ``a_c >= 2`` (so every class is on both sides) and 0 when ``a_c = 1``;
    the rows chosen are those with the smallest seeded keys, as in :func:`long_tailed_indices`.
    """
    seed = _check_seed(seed)
    if not (isinstance(test_size, numbers.Real) and 0.0 < float(test_size) < 1.0):
        raise ValueError(f"test_size must be a fraction in (0, 1); got {test_size!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("cannot split an empty dataset")
    num_classes = int(labels.max()) + 1
    available = np.bincount(labels, minlength=num_classes)
    n_test = np.rint(float(test_size) * available).astype(np.int64)
    n_test = np.where(available >= 2, np.clip(n_test, 1, np.maximum(available - 1, 1)), 0)
    order, rank = _ranks_within_class(labels, num_classes, seed)
    is_test = rank < n_test[labels[order]]
    test, train = np.sort(order[is_test]), np.sort(order[~is_test])
    return train, test


def heldout_split_indices(
    labels: Sequence[int] | np.ndarray,
    per_class: int,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded balanced hold-out: ``(rest_indices, heldout_indices)``, both sorted.

    Every class ``c`` sends exactly ``per_class`` rows to the hold-out: those with the smallest
    seeded keys (as :func:`long_tailed_indices` chooses rows), so the same ``(labels, per_class,
    seed)`` gives the same rows on any machine. It is meant to run on a *source* training split
    before it is made long-tailed (``load_long_tailed(validation_per_class=...)``): the long-tailed
    subset is then drawn from the rest, so the head class keeps at most ``a_c - per_class``
    images and the hold-out is balanced and disjoint from training.

    Raises:
        ValueError: ``per_class`` not a positive integer, or a class with ``a_c <= per_class``
            rows (it would keep no training image); the message names the class, its count and
            the option to lower.
    """
    seed = _check_seed(seed)
    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer; got {per_class!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("cannot hold out a validation split from an empty dataset")
    num_classes = max(int(labels.max()) + 1, len(class_names or ()))
    available = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(available <= per_class)
    if short.size:
        c = int(short[0])
        name = f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else ""
        raise ValueError(
            f"class {c}{name} has {int(available[c])} training images, so a held-out validation "
            f"split of {per_class} per class would leave it none to train on ({short.size} such "
            f"classes); lower --validation_per_class (below {int(available[short].min())}) or "
            "use --train_val_split FRACTION (stratified, from the long-tailed training split)."
        )
    order, rank = _ranks_within_class(labels, num_classes, seed)
    is_heldout = rank < per_class
    return np.sort(order[~is_heldout]), np.sort(order[is_heldout])


def longtail_record(dataset: Dataset | DatasetDict) -> dict[str, Any] | None:
    """The provenance record written by :func:`make_long_tailed` / ``load_long_tailed`` (the JSON
    of the ``hf_longtail:`` line of ``info.description``), or ``None`` if there is none.
    For a ``DatasetDict`` the ``train`` split is read."""
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            return None
        dataset = dataset["train"]
    matches = _RECORD_RE.findall(dataset.info.description or "")
    if not matches:
        return None
    try:
        record = json.loads(matches[-1])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def validation_record(
    dataset: DatasetDict, split: str | None, validation: Dataset | None = None
) -> dict[str, Any] | None:
    """What the run record says about its validation split (``None``: the run has none).

    ``{"split", "method", "size", "class_counts", ...}``: ``method`` is ``"heldout"`` or
    ``"train_val_split"`` with the construction recorded by ``load_long_tailed`` (seed,
    ``per_class`` / ``fraction``, the source's counts), else ``"dataset"`` (the dataset's own
    split). ``validation`` is the split as used (e.g. after ``max_eval_samples``), default
    ``dataset[split]``; its labels are counted.
    """
    if split is None:
        return None
    validation = dataset[split] if validation is None else validation
    built = (longtail_record(dataset) or {}).get("validation") if split == "validation" else None
    record: dict[str, Any] = dict(built) if built else {"method": "dataset"}
    record.update({"split": split, "size": len(validation)})
    if not built:  # a built split's counts are those of its construction (rebuilt by them)
        try:
            record["class_counts"] = class_counts(validation)
        except ValueError:  # no usable label column: the size is still recorded
            pass
    return record


def construction_facts(dataset: DatasetDict, eval_split: str) -> dict[str, Any]:
    """What was done to the source to make the splits of ``dataset`` (a ``load_long_tailed``
    result), for the ``dataset`` section of the run record, from which the cards word it:

    - ``subsampled``: whether the training split is a subset drawn by a long-tail profile
      (``False`` for ``imbalance_factor=None`` and the split-file protocols, whose training
      split is the source's, every image kept);
    - ``eval_split_origin``: ``{"method": "dataset"}`` for a split of the source, or
      ``{"method": "carved", "from_split", "fraction", "seed", "size", "source_size"}`` for a
      test split carved from the source's training images (``from_split`` ``None`` for
      ``digits``, whose 30% test split comes from one pool of images).
    """
    record = longtail_record(dataset) or {}
    profile = record.get("profile")
    facts: dict[str, Any] = {"subsampled": profile not in (None, "none", "protocol")}
    carved = record.get("carved_test_split")
    if eval_split == "test" and isinstance(carved, dict):
        facts["eval_split_origin"] = {"method": "carved", **carved}
    else:
        facts["eval_split_origin"] = {"method": "dataset"}
    return facts


def write_longtail_record(dataset: Dataset, record: dict[str, Any]) -> Dataset:
    """Store ``record`` in ``dataset.info.description`` (in place, also returned): a readable
    summary line, then ``hf_longtail: {json}``, then the source's own description (any older
    ``hf_longtail:`` line removed). Survives ``save_to_disk`` / ``load_from_disk``."""
    previous = _RECORD_RE.sub("", dataset.info.description or "")
    previous = "\n".join(
        line for line in previous.splitlines() if not line.startswith("Long-tailed (hf-longtail)")
    ).strip()
    counts = record.get("class_counts") or []
    summary = (
        f"Long-tailed (hf-longtail) version of {record.get('source') or 'a dataset'}: "
        f"profile {record.get('profile')!r}, imbalance factor {record.get('imbalance_factor')}, "
        f"seed {record.get('seed')}, {sum(counts)} images over {len(counts)} classes "
        f"(class_counts in the JSON line below, class 0 first)."
    )
    text = f"{summary}\n{RECORD_PREFIX}{json.dumps(record, separators=(',', ':'))}"
    dataset.info.description = f"{text}\n\n{previous}" if previous else text
    return dataset


def class_counts(dataset: Dataset | DatasetDict, label_column: str | None = None) -> list[int]:
    """Per-class image counts (class id order) as a plain list of ints, counted from the data.

    Counts the label column (read from Arrow, no image decoded: cheap even for ImageNet-LT) with
    ``np.bincount(labels, minlength=num_classes)``, ``num_classes`` from the ``ClassLabel`` (or
    ``max + 1`` for plain integers), so the counts always describe the rows actually present
    (also after ``select``/``filter`` or a push to the Hub); the provenance record's copy in
    ``info.description`` is never read back. For a ``DatasetDict`` the ``train`` split is used.

    Raises:
        ValueError: no usable label column (see ``detect_label_column``) or string labels
            (encode them first with ``ensure_class_label``).
    """
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"class_counts of a DatasetDict reads its 'train' split; splits are "
                f"{list(dataset)}. Pass the split, e.g. class_counts(ds['{next(iter(dataset))}'])."
            )
        dataset = dataset["train"]
    if label_column is None:  # the column the long tail was built on, when recorded
        label_column = (longtail_record(dataset) or {}).get("label_column")
        if label_column not in dataset.features:
            label_column = None
    column = detect_label_column(dataset.features, label_column)
    values = label_array(dataset, column)
    feature = dataset.features[column]
    if values.dtype == object:
        raise ValueError(
            f"label column {column!r} holds strings; encode it first with "
            f"hf_longtail.data.ensure_class_label(dataset, {column!r})"
        )
    if values.size and values.min() < 0:
        row = int(np.flatnonzero(values < 0)[0])
        raise ValueError(
            f"label column {column!r} has negative label {int(values[row])} at row {row}"
        )
    minlength = feature.num_classes if isinstance(feature, ClassLabel) else 0
    return [int(n) for n in np.bincount(values, minlength=minlength)]


#: A source split whose largest class is at least this many times its smallest is "already
#: imbalanced": asking it for a long tail it cannot give points at using it as it is.
ALREADY_IMBALANCED_RATIO = 2.0


def _own_imbalance(available: np.ndarray, names: Sequence[str]) -> dict[str, Any] | None:
    """The source split's own imbalance (``ratio``, a ``sentence`` saying it), or ``None`` when
    it is (nearly) balanced."""
    big, small = int(np.argmax(available)), int(np.argmin(available))
    ratio = float(available[big]) / float(available[small])
    if ratio < ALREADY_IMBALANCED_RATIO:
        return None
    return {
        "ratio": f"{ratio:.4g}",
        "sentence": (
            f"This split is already imbalanced: its own imbalance factor is {ratio:.4g} "
            f"({int(available[big])} images in class {big} ({names[big]!r}), "
            f"{int(available[small])} in class {small} ({names[small]!r}))."
        ),
    }


def make_long_tailed(
    dataset: Dataset,
    imbalance_factor: float,
    profile: str = "exp",
    seed: int = 0,
    label_column: str | None = None,
    *,
    pareto_alpha: float = 6.0,
    on_shortfall: str = "cap",
    source: str | None = None,
) -> Dataset:
    """Long-tailed subset of ``dataset`` (a training split), with its class counts recorded.

    ``n_max`` is the largest class count of ``dataset``; class ``c`` (label order) is asked for
    ``long_tailed_counts(n_max, C, imbalance_factor, profile)[c]`` images, chosen by the seeded
    per-class keys described in the module docstring, and the rows are taken with
    ``Dataset.select`` on sorted indices (no image is decoded, nothing is copied).

    Args:
        dataset: a ``datasets.Dataset``; its label column is detected (``ClassLabel``) unless
            ``label_column`` is given. Integer/string labels are converted by
            ``ensure_class_label`` first (documented there).
        imbalance_factor: IF = n_max / n_min >= 1 (1 = balanced, i.e. ``n_max`` per class).
        profile: ``"exp"``, ``"step"`` or ``"pareto"`` (see ``long_tailed_counts``).
        seed: non-negative integer; the same seed gives the same rows on any machine.
        pareto_alpha: shape of the ``pareto`` profile.
        on_shortfall: a class with fewer images than its target: ``"cap"`` (default; keep all its
            images, log it, and record the ``requested_counts``) or ``"raise"``.
        source: name stored in the record (defaults to the dataset's ``info.dataset_name``).

    Returns:
        The subset, whose ``info.description`` carries the record (see ``longtail_record``);
        ``class_counts(result)`` gives the kept counts.

    Raises:
        ValueError / TypeError: bad ``imbalance_factor``, ``seed``, ``profile`` or
            ``on_shortfall``; a class with no image in ``dataset``; a class that the profile would
            give 0 images; a shortfall with ``on_shortfall="raise"``. All checks run before any
            row is selected.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"make_long_tailed expects a datasets.Dataset (one split), got {type(dataset).__name__}"
            + ("; pass dataset['train']" if isinstance(dataset, DatasetDict) else "")
        )
    imbalance_factor = validate_imbalance_factor(imbalance_factor)
    seed = _check_seed(seed)
    if on_shortfall not in ("cap", "raise"):
        raise ValueError(f"on_shortfall must be 'cap' or 'raise'; got {on_shortfall!r}")
    column = detect_label_column(dataset.features, label_column)
    if not isinstance(dataset.features[column], ClassLabel):
        dataset = ensure_class_label(dataset, column)
    feature: ClassLabel = dataset.features[column]
    names = list(feature.names)
    labels = label_array(dataset, column)
    if labels.size and (labels.min() < 0 or labels.max() >= feature.num_classes):
        bad = np.flatnonzero((labels < 0) | (labels >= feature.num_classes))
        row = int(bad[0])
        raise ValueError(
            f"label column {column!r} has label {int(labels[row])} at row {row}, outside "
            f"[0, {feature.num_classes}) of its ClassLabel; -1 usually marks an unlabelled row: "
            f"drop those rows first"
        )
    available = np.bincount(labels, minlength=feature.num_classes)
    empty = np.flatnonzero(available == 0)
    if empty.size:
        c = int(empty[0])
        raise ValueError(
            f"class {c} ({names[c]!r}) has no image in the source split ({empty.size} empty "
            f"classes); a long-tailed profile needs every class present. Drop the class from the "
            f"label set or use another split."
        )
    n_max = int(available.max())
    own = _own_imbalance(available, names)
    try:
        requested = np.asarray(
            long_tailed_counts(
                n_max, feature.num_classes, imbalance_factor, profile, pareto_alpha=pareto_alpha
            ),
            dtype=np.int64,
        )
    except ValueError as err:
        match = re.search(r"class index (\d+)", str(err))
        if match is None:
            raise
        c = int(match.group(1))
        if own is None:
            raise ValueError(f"{err} (class index {c} is {names[c]!r})") from None
        limit = re.search(r"imbalance_factor <= ([0-9.]+)", str(err))
        raise ValueError(
            f"imbalance_factor={imbalance_factor:g} (profile {profile!r}) would leave class "
            f"{c} ({names[c]!r}) with zero images. {own['sentence']} To train on it as it is, "
            "keeping every image, pass imbalance_factor=None (--imbalance_factor none). An "
            f"imbalance_factor <= {limit.group(1) if limit else own['ratio']} works too, but "
            "subsamples it again and throws images away."
        ) from None
    short = np.flatnonzero(available < requested)
    if short.size:
        detail = ", ".join(
            f"{c} ({names[c]!r}): {int(available[c])} < {int(requested[c])}" for c in short[:10]
        ) + (" ..." if short.size > 10 else "")
        if on_shortfall == "raise":
            raise ValueError(
                f"{short.size} classes have fewer images than the {profile!r} profile asks for "
                f"(available < requested): {detail}. Lower the imbalance factor or pass "
                f"on_shortfall='cap' to keep all their images."
            )
        if own is not None:
            # Capping an already imbalanced source gives another imbalance than the one asked
            # for; the user most likely wanted the source as it is.
            logger.warning(
                "imbalance_factor=%g: capping %d classes to their available images (%s), so the "
                "result is not the requested long tail. %s Pass imbalance_factor=None "
                "(--imbalance_factor none) to train on it as it is, keeping every image.",
                imbalance_factor,
                short.size,
                detail,
                own["sentence"],
            )
        else:
            logger.info("capping %d classes to their available images: %s", short.size, detail)
    kept = np.minimum(available, requested)
    indices = long_tailed_indices(labels, kept, seed)
    result = dataset.select(indices, keep_in_memory=True)
    record: dict[str, Any] = {
        "format": _RECORD_FORMAT,
        "source": source or dataset.info.dataset_name or dataset.info.builder_name,
        "profile": profile,
        "imbalance_factor": imbalance_factor,
        "seed": seed,
        "n_max": n_max,
        "label_column": column,
        "num_classes": int(feature.num_classes),
        "class_names": names,
        "class_counts": [int(n) for n in kept],
    }
    if profile == "pareto":
        record["pareto_alpha"] = float(pareto_alpha)
    if short.size:
        record["requested_counts"] = [int(n) for n in requested]
    return write_longtail_record(result, record)
