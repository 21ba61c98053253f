"""Find and normalise the image and label columns of an image-classification dataset.

Detection rules (``detect_columns``):

- image column: the one column with an ``Image`` feature. An explicit ``image_column`` wins; it
  may also be a string column of file paths (loaders cast it to ``Image``).
- label column: the one ``ClassLabel`` column. If there are several (CIFAR-100 on the Hub has
  ``fine_label`` and ``coarse_label``) the error lists them and says to pass ``label_column=``.
  If there is none, an integer or string column with a conventional name (``label``, ``labels``,
  ``target``, ``class``, ...) is taken and converted by :func:`ensure_class_label`.

Conversions (``ensure_class_label``), applied jointly to all splits so that ids agree:

- integer labels -> ``ClassLabel(names=[str(i) for i in range(max_label + 1)])`` (ids unchanged);
- string labels -> ``ClassLabel(names=sorted(all distinct strings of all splits))``, the encoding
  of ``datasets.Dataset.class_encode_column`` but computed over all splits jointly (the
  ``DatasetDict`` method encodes each split on its own, which shifts the ids of a split that
  lacks a class);
- negative, null or out-of-range labels are errors naming the split, row and value.

Label values are always read from the Arrow column, never by decoding rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

__all__ = [
    "LABEL_COLUMN_NAMES",
    "detect_columns",
    "detect_image_column",
    "detect_label_column",
    "ensure_class_label",
    "ensure_image_feature",
    "label_array",
]

#: Column names taken as the label when no column is a ``ClassLabel`` (lower-case comparison).
LABEL_COLUMN_NAMES = (
    "label",
    "labels",
    "target",
    "targets",
    "class",
    "class_id",
    "class_label",
    "category",
    "category_id",
    "fine_label",
    "y",
)

_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_STR_DTYPES = {"string", "large_string"}


def _features_of(dataset: Dataset | DatasetDict) -> Features:
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("the DatasetDict has no splits")
        first = "train" if "train" in dataset else next(iter(dataset))
        return dataset[first].features
    return dataset.features


def _is_int(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in _INT_DTYPES


def _is_str(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in _STR_DTYPES


def _describe(features: Features) -> str:
    return ", ".join(f"{name!r} ({type(f).__name__})" for name, f in features.items())


def detect_image_column(features: Features, image_column: str | None = None) -> str:
    """Name of the image column: ``image_column`` if given (must exist and be an ``Image`` or a
    string column of paths), else the single column whose feature is ``datasets.Image``.

    Raises:
        ValueError: the override is missing or of the wrong type; no or several ``Image`` columns
            (the message lists the columns and the override to pass).
    """
    if image_column is not None:
        if image_column not in features:
            raise ValueError(
                f"image_column={image_column!r} is not a column; columns are: {_describe(features)}"
            )
        feature = features[image_column]
        if not (isinstance(feature, Image) or _is_str(feature)):
            raise ValueError(
                f"image_column={image_column!r} has feature {feature!r}; it must be a "
                f"datasets.Image column or a string column of image file paths"
            )
        return image_column
    candidates = [name for name, f in features.items() if isinstance(f, Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"no column has a datasets.Image feature; columns are: {_describe(features)}. "
            f"Pass image_column=<name> (a string column of file paths is cast to Image)."
        )
    raise ValueError(f"several image columns {candidates}; pass image_column= one of {candidates}")


def detect_label_column(
    features: Features, label_column: str | None = None, image_column: str | None = None
) -> str:
    """Name of the label column: ``label_column`` if given (must exist and hold a ``ClassLabel``,
    integers or strings), else the single ``ClassLabel`` column, else the single integer/string
    column named like a label (see ``LABEL_COLUMN_NAMES``).

    Raises:
        ValueError: the override is missing or of the wrong type; several candidates (CIFAR-100's
            ``fine_label`` / ``coarse_label``) or none; the message lists the candidates and says to
            pass ``label_column=``.
    """
    if label_column is not None:
        if label_column not in features:
            raise ValueError(
                f"label_column={label_column!r} is not a column; columns are: {_describe(features)}"
            )
        feature = features[label_column]
        if not (isinstance(feature, ClassLabel) or _is_int(feature) or _is_str(feature)):
            raise ValueError(
                f"label_column={label_column!r} has feature {feature!r}; class labels must be a "
                f"ClassLabel, an integer or a string column"
            )
        return label_column
    others = {name: f for name, f in features.items() if name != image_column}
    class_labels = [name for name, f in others.items() if isinstance(f, ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    if len(class_labels) > 1:
        raise ValueError(
            f"ambiguous label column: several ClassLabel columns {class_labels}; pass "
            f"label_column= one of them (e.g. label_column={class_labels[0]!r})"
        )
    named = [
        name
        for name, f in others.items()
        if name.lower() in LABEL_COLUMN_NAMES and (_is_int(f) or _is_str(f))
    ]
    if len(named) == 1:
        return named[0]
    usable = [name for name, f in others.items() if _is_int(f) or _is_str(f)]
    if len(named) > 1:
        raise ValueError(
            f"ambiguous label column: no ClassLabel and several label-like columns {named}; pass "
            f"label_column= one of them"
        )
    raise ValueError(
        f"no label column found: no ClassLabel column and no integer/string column named like a "
        f"label ({', '.join(LABEL_COLUMN_NAMES)}). Integer/string candidates: {usable or 'none'}. "
        f"Pass label_column=<name>."
    )


def detect_columns(
    dataset: Dataset | DatasetDict,
    image_column: str | None = None,
    label_column: str | None = None,
) -> tuple[str, str]:
    """``(image_column, label_column)`` of ``dataset`` (the ``train`` split of a ``DatasetDict``),
    detected from the features with the rules of this module; explicit names are validated."""
    features = _features_of(dataset)
    image = detect_image_column(features, image_column)
    label = detect_label_column(features, label_column, image_column=image)
    if image == label:
        raise ValueError(f"image_column and label_column are the same column {image!r}")
    return image, label


def label_array(dataset: Dataset, label_column: str) -> np.ndarray:
    """The label column of ``dataset`` as a NumPy array (int64 for integer/ClassLabel columns,
    object for strings), in row order, honouring a ``select``/``shuffle`` indices mapping.

    Reads the Arrow column directly: no row is decoded, whatever format or transform is set.

    Raises:
        ValueError: a null label (naming the first such row).
    """
    if label_column not in dataset.column_names:
        raise ValueError(
            f"label column {label_column!r} not in the dataset columns {dataset.column_names}"
        )
    column = dataset.data.column(label_column)
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        column = column.take(indices.column(0))
    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"label column {label_column!r} has {column.null_count} missing (null) labels, the first "
            f"at row {first}; drop those rows first (e.g. dataset.filter(lambda y: y is not None, "
            f"input_columns={label_column!r}))"
        )
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64, copy=False)
    return column.to_numpy(zero_copy_only=False)


def _check_ids(values: np.ndarray, column: str, split: str, num_classes: int | None) -> None:
    if values.size == 0:
        return
    negative = np.flatnonzero(values < 0)
    if negative.size:
        row = int(negative[0])
        raise ValueError(
            f"label column {column!r} of split {split!r} has negative label {int(values[row])} at "
            f"row {row} ({negative.size} negative in all); class ids must be 0..C-1. -1 usually "
            f"marks an unlabelled example: drop those rows first."
        )
    if num_classes is not None:
        too_big = np.flatnonzero(values >= num_classes)
        if too_big.size:
            row = int(too_big[0])
            raise ValueError(
                f"label column {column!r} of split {split!r} has label {int(values[row])} at row "
                f"{row}, out of range for its ClassLabel with {num_classes} classes"
            )


def ensure_class_label(dataset: Dataset | DatasetDict, label_column: str) -> Dataset | DatasetDict:
    """Return ``dataset`` with ``label_column`` as a validated ``ClassLabel`` in every split.

    - ``ClassLabel``: kept; every value must be in ``[0, num_classes)``.
    - integers: cast to ``ClassLabel(names=[str(i) for i in range(m + 1)])``, ``m`` the largest
      label over all splits (ids unchanged; unused ids in between get a zero count).
    - strings: ``ClassLabel(names=sorted(distinct strings over all splits))`` (the
      ``class_encode_column`` encoding, computed jointly so ids agree between splits).

    Raises:
        ValueError: null, negative or out-of-range labels (split, row and value named), or a
            column of another type.
    """
    splits = dataset if isinstance(dataset, DatasetDict) else {"(dataset)": dataset}
    feature = _features_of(dataset)[label_column]
    for name, split in splits.items():
        if split.features[label_column] != feature:
            raise ValueError(
                f"label column {label_column!r} has feature {split.features[label_column]!r} in "
                f"split {name!r} but {feature!r} in the first split; make them agree first"
            )
    if isinstance(feature, ClassLabel):
        for name, split in splits.items():
            _check_ids(label_array(split, label_column), label_column, name, feature.num_classes)
        return dataset
    if _is_int(feature):
        arrays = {name: label_array(split, label_column) for name, split in splits.items()}
        for name, values in arrays.items():
            _check_ids(values, label_column, name, None)
        top = max((int(v.max()) for v in arrays.values() if v.size), default=-1)
        if top < 0:
            raise ValueError(f"label column {label_column!r} is empty in every split")
        class_label = ClassLabel(names=[str(i) for i in range(top + 1)])
        return dataset.cast_column(label_column, class_label)
    if _is_str(feature):
        # Not DatasetDict.class_encode_column: it encodes each split on its own, so a class
        # missing from one split would shift the ids of that split. One sorted name list for all.
        names: set[str] = set()
        for split in splits.values():
            names.update(str(v) for v in np.unique(label_array(split, label_column)))
        return dataset.cast_column(label_column, ClassLabel(names=sorted(names)))
    raise ValueError(
        f"label column {label_column!r} has feature {feature!r}; class labels must be a "
        f"ClassLabel, an integer or a string column"
    )


def ensure_image_feature(
    dataset: Dataset | DatasetDict, image_column: str
) -> Dataset | DatasetDict:
    """Cast a string column of file paths to a lazily decoded ``datasets.Image`` feature
    (nothing is read; each path is opened when its row is accessed). ``Image`` columns pass."""
    feature = _features_of(dataset)[image_column]
    if isinstance(feature, Image):
        return dataset
    if _is_str(feature):
        return dataset.cast_column(image_column, Image())
    raise ValueError(
        f"image column {image_column!r} has feature {feature!r}; it must be a datasets.Image "
        f"column or a string column of file paths"
    )
