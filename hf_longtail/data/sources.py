"""Load an image-classification source and return its long-tailed ``DatasetDict``.

Sources accepted by :func:`load_long_tailed` (tried in this order):

1. ``"digits"``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 images, 10 classes),
   stored as RGB PIL images in an ``Image`` column ``image`` and a ``ClassLabel`` ``label`` with
   names ``"0"``..``"9"``; a stratified 30% test split (seeded by ``split_seed``). Fully offline.
2. A long-tailed protocol name: ``"imagenet-lt"``, ``"places-lt"``, ``"inaturalist2018"`` (aliases
   without dashes/underscores, ``"inat2018"``), read from the published split files (one
   ``relative/path.jpg label`` per line) in ``split_dir`` with images under ``image_root``.
3. A local path: a ``save_to_disk`` directory; a directory holding protocol split files; a
   single ``.parquet`` / ``.arrow`` / ``.csv`` / ``.json(l)`` file; any other directory is handed
   to ``datasets.load_dataset`` (parquet/arrow shards, image folders).
4. Anything else is a Hub id for ``datasets.load_dataset`` (``uoft-cs/cifar10``, ...). Failing to
   reach the Hub raises a ``ConnectionError`` saying whether offline mode is on and how to use a
   local copy instead.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from hf_longtail.data.columns import (
    detect_columns,
    ensure_class_label,
    ensure_image_feature,
    label_array,
)
from hf_longtail.data.profiles import PROFILES, validate_imbalance_factor
from hf_longtail.data.subsampling import (
    _check_seed,
    heldout_split_indices,
    longtail_record,
    make_long_tailed,
    stratified_split_indices,
    write_longtail_record,
)

__all__ = [
    "DIGITS_TEST_SIZE",
    "PROTOCOLS",
    "SplitFileError",
    "SplitProtocol",
    "load_digits_dataset",
    "load_long_tailed",
    "load_protocol",
    "load_split_file",
]

logger = logging.getLogger(__name__)

#: Test fraction of the embedded ``digits`` source.
DIGITS_TEST_SIZE = 0.3
#: Test fraction created for a source that has only a training split.
DEFAULT_TEST_SIZE = 0.2
_EVAL_SPLIT_ORDER = ("test", "validation", "valid", "val")
_MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class SplitProtocol:
    """A published long-tailed benchmark given as split files: split name -> file name, and the
    number of classes of the protocol (used to reject out-of-range labels)."""

    name: str
    files: Mapping[str, str] = field(default_factory=dict)
    num_classes: int | None = None


#: The three standard large-scale long-tailed protocols (Liu et al. 2019; Van Horn et al. 2018),
#: with the file names of the reference code (OLTR / classifier-balancing). iNaturalist 2018 has
#: no separate test set: results are reported on its validation split.
PROTOCOLS: dict[str, SplitProtocol] = {
    "imagenet-lt": SplitProtocol(
        "ImageNet-LT",
        {
            "train": "ImageNet_LT_train.txt",
            "validation": "ImageNet_LT_val.txt",
            "test": "ImageNet_LT_test.txt",
        },
        1000,
    ),
    "places-lt": SplitProtocol(
        "Places-LT",
        {
            "train": "Places_LT_train.txt",
            "validation": "Places_LT_val.txt",
            "test": "Places_LT_test.txt",
        },
        365,
    ),
    "inaturalist2018": SplitProtocol(
        "iNaturalist 2018",
        {"train": "iNaturalist18_train.txt", "validation": "iNaturalist18_val.txt"},
        8142,
    ),
}
_PROTOCOL_ALIASES = {
    "imagenetlt": "imagenet-lt",
    "placeslt": "places-lt",
    "inaturalist2018": "inaturalist2018",
    "inaturalist18": "inaturalist2018",
    "inat2018": "inaturalist2018",
    "inat18": "inaturalist2018",
}


def _protocol_key(name: str) -> str | None:
    norm = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    return _PROTOCOL_ALIASES.get(norm)


class SplitFileError(ValueError):
    """Problems found in a split file; ``problems`` lists ``(line_number, message)`` pairs
    (1-based line numbers)."""

    def __init__(self, path: str | os.PathLike, problems: list[tuple[int, str]]):
        self.path = str(path)
        self.problems = problems
        shown = "\n".join(f"  line {n}: {msg}" for n, msg in problems[:_MAX_REPORTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _MAX_REPORTED_PROBLEMS} more"
            if len(problems) > _MAX_REPORTED_PROBLEMS
            else ""
        )
        super().__init__(
            f"{self.path}: {len(problems)} problem(s); each line must be "
            f"'<relative/path/to/image> <integer label>':\n{shown}{more}"
        )


def _parse_split_file(
    path: Path, image_root: Path, num_classes: int | None, check_files: bool
) -> tuple[list[str], list[int], list[tuple[int, str]]]:
    paths: list[str] = []
    labels: list[int] = []
    problems: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # rsplit keeps file names with spaces intact: the label is the last field.
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                problems.append((lineno, f"expected '<path> <label>', got {line!r}"))
                continue
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                problems.append((lineno, f"label {label_text!r} is not an integer"))
                continue
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                problems.append((lineno, f"label {label} out of range {bound}"))
                continue
            full = os.path.join(image_root, rel)
            if check_files and not os.path.exists(full):
                problems.append((lineno, f"image file not found: {full}"))
                continue
            paths.append(full)
            labels.append(label)
    return paths, labels, problems


def load_split_file(
    split_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    num_classes: int | None = None,
    check_files: bool = True,
) -> Dataset:
    """A ``Dataset`` with columns ``image`` (lazy ``Image`` feature over absolute file paths: no
    image is read or copied) and ``label`` (``ClassLabel`` with names ``"0"``..``"C-1"``) from a
    split file with one ``relative/path.jpg label`` per line (blank lines and ``#`` comments are
    skipped; the label is the last whitespace-separated field, so paths may contain spaces).

    ``num_classes`` defaults to ``max label + 1``. With ``check_files`` every path is checked with
    ``os.path.exists`` (cheap, no decoding) so that a missing image fails now, not mid-training.

    Raises:
        FileNotFoundError: ``split_file`` or ``image_root`` missing.
        SplitFileError: malformed lines, non-integer or out-of-range labels, missing images; all
            problems are collected and reported with their line numbers.
    """
    split_file, image_root = Path(split_file), Path(image_root)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root is not a directory: {image_root}")
    paths, labels, problems = _parse_split_file(split_file, image_root, num_classes, check_files)
    if problems:
        raise SplitFileError(split_file, problems)
    if not paths:
        raise SplitFileError(split_file, [(0, "the file lists no image")])
    if num_classes is None:
        num_classes = max(labels) + 1
    features = Features(
        {"image": Image(), "label": ClassLabel(names=[str(i) for i in range(num_classes)])}
    )
    return Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _find_protocol_files(split_dir: Path) -> tuple[str, SplitProtocol] | None:
    for key, proto in PROTOCOLS.items():
        if (split_dir / proto.files["train"]).is_file():
            return key, proto
    return None


def load_protocol(
    name: str,
    image_root: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    check_files: bool = True,
) -> DatasetDict:
    """The splits of a long-tailed protocol (``PROTOCOLS``: ImageNet-LT, Places-LT, iNaturalist
    2018) from its split files in ``split_dir`` (default ``image_root``), images under
    ``image_root``. ``num_classes`` defaults to the protocol's (1000 / 365 / 8142) and bounds the
    labels. The train file is required, plus at least one evaluation file; every file is checked
    (see :func:`load_split_file`) before any dataset is built.
    """
    key = _protocol_key(name)
    if key is None:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    proto = PROTOCOLS[key]
    split_dir = Path(split_dir if split_dir is not None else image_root)
    present = {s: split_dir / f for s, f in proto.files.items() if (split_dir / f).is_file()}
    if "train" not in present or len(present) < 2:
        raise FileNotFoundError(
            f"{proto.name} needs its split files in {split_dir}: expected "
            f"{list(proto.files.values())} (train plus at least one evaluation file); found "
            f"{[p.name for p in present.values()] or 'none'}. Pass split_dir=<folder of the .txt "
            f"files> and image_root=<folder the paths in them are relative to>."
        )
    n = num_classes if num_classes is not None else proto.num_classes
    return DatasetDict(
        {
            split: load_split_file(path, image_root, num_classes=n, check_files=check_files)
            for split, path in present.items()
        }
    )


def load_digits_dataset(test_size: float = DIGITS_TEST_SIZE, split_seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled handwritten digits as an image ``DatasetDict`` (offline).

    Each 8x8 image of intensities 0..16 becomes an 8-bit RGB PIL image
    (``round(v * 255 / 16)`` in all three channels) in an ``Image`` column ``image``; labels are a
    ``ClassLabel`` ``label`` with names ``"0"``..``"9"``. The 1,797 images are split by
    :func:`stratified_split_indices` (``test_size``, ``split_seed``) into ``train`` and ``test``.
    """
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [PILImage.fromarray(np.repeat(g[:, :, None], 3, axis=2)) for g in gray]
    labels = digits.target.astype(np.int64)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    full = Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    full.info.dataset_name = "digits"
    full.info.description = (
        "scikit-learn load_digits: 1,797 8x8 handwritten digits (UCI ML hand-written digits), "
        "as RGB images."
    )
    train_idx, test_idx = stratified_split_indices(labels, test_size, split_seed)
    return DatasetDict({"train": full.select(train_idx), "test": full.select(test_idx)})


def _offline() -> bool:
    import datasets.config

    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags) or bool(
        getattr(datasets.config, "HF_HUB_OFFLINE", False)
    )


def _load_hub(name: str, config_name: str | None, **kwargs: Any) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return datasets.load_dataset(name, config_name, **kwargs)
    except (ConnectionError, OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        why = (
            "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and it is not in "
            "the local cache"
            if _offline()
            else "the Hub could not be reached (no network?) and it is not in the local cache"
        )
        raise ConnectionError(
            f"could not load the Hub dataset {name!r}: {why}. Download it once with network "
            f"access, or pass a local path instead (a save_to_disk folder, a folder of "
            f"parquet/arrow files or an image folder), or use 'digits', the embedded offline "
            f"dataset. ({type(err).__name__}: {err})"
        ) from err
    except DatasetNotFoundError as err:
        raise FileNotFoundError(
            f"{name!r} is neither an existing local path nor a dataset on the Hub ({err})"
        ) from err


def _load_local(path: Path, config_name: str | None, **kwargs: Any) -> Any:
    import datasets

    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    ):
        return datasets.load_from_disk(str(path))
    suffix = path.suffix.lower()
    if path.is_file():
        builder = {
            ".parquet": "parquet",
            ".arrow": "arrow",
            ".csv": "csv",
            ".json": "json",
            ".jsonl": "json",
        }.get(suffix)
        if builder is None:
            raise ValueError(
                f"cannot load {path}: unsupported file type {suffix!r} (use a folder, or a "
                f".parquet/.arrow/.csv/.json file)"
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
    return datasets.load_dataset(str(path), config_name, **kwargs)


def _as_dict(loaded: Any, train_split: str) -> DatasetDict:
    if isinstance(loaded, Dataset):
        return DatasetDict({train_split: loaded})
    if isinstance(loaded, DatasetDict):
        return loaded
    raise TypeError(
        f"expected a Dataset or DatasetDict from the source, got {type(loaded).__name__} "
        f"(streaming is not supported: long-tailed subsampling needs the whole label column)"
    )


def _drop_unlabelled_splits(raw: DatasetDict, train_split: str, label_col: str) -> DatasetDict:
    """Remove evaluation splits whose labels are all -1 / null (e.g. ImageNet-1k's test split,
    published without labels): they cannot be evaluated. Partly unlabelled splits are kept, so
    that ``ensure_class_label`` reports the first bad row."""
    keep = {}
    for name, split in raw.items():
        if name != train_split and label_col in split.column_names and len(split):
            column = split.data.column(label_col)
            if column.null_count == len(column):
                logger.warning("dropping split %r: its labels are all missing", name)
                continue
            if pa.types.is_integer(column.type):
                values = label_array(split, label_col)
                if (values == -1).all():
                    logger.warning("dropping split %r: its labels are all -1 (unlabelled)", name)
                    continue
        keep[name] = split
    return DatasetDict(keep)


_TABLE_SUFFIXES = (".csv", ".json", ".jsonl")


def _paths_relative_to(raw: DatasetDict, image_column: str, folder: Path) -> DatasetDict:
    """Make the relative paths of a string image column relative to ``folder`` (the CSV/JSON
    file's folder, as ``datasets``' imagefolder does for its ``metadata.csv``), so a run does not
    depend on the directory it is started from. Absolute paths, URLs and empty values stay."""
    feature = raw[next(iter(raw))].features.get(image_column)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return raw

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        batch[image_column] = [
            p if not p or os.path.isabs(p) or "://" in p else str(folder / p)
            for p in batch[image_column]
        ]
        return batch

    return raw.map(resolve, batched=True, desc="image paths relative to the CSV folder")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name)


def load_long_tailed(
    name_or_path: str | os.PathLike,
    imbalance_factor: float | None = 100,
    profile: str = "exp",
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    config_name: str | None = None,
    train_split: str = "train",
    test_size: float | None = None,
    split_seed: int = 0,
    image_root: str | os.PathLike | None = None,
    split_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    check_files: bool = True,
    pareto_alpha: float = 6.0,
    on_shortfall: str = "cap",
    validation_per_class: int | None = None,
    train_val_split: float | None = None,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load a source (see the module docstring) and return ``DatasetDict`` with a long-tailed
    ``train`` split (first) followed by the source's evaluation split(s), untouched.

    - Columns: detected (``Image`` feature, ``ClassLabel``) or given by ``image_column`` /
      ``label_column``; a string column of paths becomes a lazy ``Image``; integer/string labels
      are converted jointly over all splits (``ensure_class_label``). Column names are kept and
      recorded (``longtail_record(ds)["image_column"]`` / ``["label_column"]``).
    - Evaluation split: every split other than ``train_split`` is kept as is, except a split
      whose labels are all -1 or missing (an unlabelled test set such as ImageNet-1k's), which is
      dropped with a warning. A source left with only a training split gets a stratified
      ``test`` split (``stratified_split_indices`` with ``test_size``, default 0.3 for
      ``digits`` and 0.2 otherwise, and ``split_seed``), made before subsampling so that it
      stays balanced (``split_seed`` is separate from ``seed`` so that all long-tailed seeds
      share one test set); the carve is logged as a warning and recorded as
      ``carved_test_split`` (``from_split``, ``fraction``, ``seed``, ``size``, ``source_size``),
      as is ``digits``' own 30% split. Evaluation splits are returned in the order test,
      validation, others.
    - Long tail: ``make_long_tailed(train, imbalance_factor, profile, seed)``. Not applied (the
      record notes it) when ``imbalance_factor is None`` (use the source as it is), for the
      ImageNet-LT / Places-LT / iNaturalist-2018 protocols (the long tail is in the split file,
      so ``imbalance_factor`` is ignored and the measured max/min ratio is recorded), and for a
      source whose ``train`` already carries a record with the same profile, IF and seed (a
      reloaded ``save_to_disk`` of this function's output).
    - Validation split (optional, returned as ``validation`` right after ``train``; refused when
      the source has its own ``validation`` split): ``validation_per_class=k`` reserves ``k``
      images of every class from the *source* training split before the long tail is drawn
      (:func:`heldout_split_indices`, seeded by ``seed``; the long-tailed subset comes from the
      rest, so the head class keeps at most ``available - k``); ``train_val_split=f`` carves a
      stratified fraction ``f`` from the long-tailed training split
      (:func:`stratified_split_indices`, seeded by ``seed``; every class keeps >= 1 training
      image). Either is recorded in the record's ``validation`` block (method, seed, per-class
      counts of the validation split and of the source), so the same call rebuilds it.
    - ``load_kwargs`` go to ``datasets.load_dataset`` (``cache_dir``, ``revision``, ...).

    Raises:
        TypeError / ValueError: invalid ``imbalance_factor``, ``profile``, ``seed``, columns or
            labels (checked before subsampling); a previously long-tailed source asked for a
            different profile; an ``imbalance_factor`` that would leave a class without images
            (for a source that is already imbalanced the message says its own imbalance factor
            and points at ``imbalance_factor=None`` first, which keeps every image).
        ConnectionError: a Hub id that cannot be fetched (offline or no network).
        FileNotFoundError: a local path that does not exist; missing protocol files.
        SplitFileError: bad lines in protocol split files (with line numbers).
    """
    if imbalance_factor is not None:
        imbalance_factor = validate_imbalance_factor(imbalance_factor)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    seed = _check_seed(seed)
    split_seed = _check_seed(split_seed)
    if validation_per_class is not None and train_val_split is not None:
        raise ValueError(
            "validation_per_class (a balanced hold-out of the source) and train_val_split (a "
            "stratified carve of the long-tailed split) both make the validation split; give one."
        )
    if train_val_split is not None and not (
        isinstance(train_val_split, numbers.Real) and 0.0 < float(train_val_split) < 1.0
    ):
        raise ValueError(
            f"train_val_split must be a fraction in (0, 1), e.g. 0.1; got {train_val_split!r}"
        )
    name = os.fspath(name_or_path)
    source_name = name
    kind = "dataset"

    protocol_key = _protocol_key(name)
    table_dir = None  # the folder of a CSV/JSON source: its relative image paths start there
    if name.lower() == "digits":
        raw = load_digits_dataset(
            test_size if test_size is not None else DIGITS_TEST_SIZE, split_seed
        )
        kind = "digits"
    elif protocol_key is not None and not Path(name).exists():
        if image_root is None:
            raise ValueError(
                f"the {PROTOCOLS[protocol_key].name} protocol needs image_root=<folder the paths "
                f"in the split files are relative to> (and split_dir=<folder of the .txt files> "
                f"if they are elsewhere)"
            )
        raw = load_protocol(
            protocol_key, image_root, split_dir, num_classes=num_classes, check_files=check_files
        )
        source_name, kind = PROTOCOLS[protocol_key].name, "protocol"
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        found = _find_protocol_files(path) if path.is_dir() else None
        if found is not None:
            key, proto = found
            raw = load_protocol(
                key,
                image_root if image_root is not None else path,
                path,
                num_classes=num_classes,
                check_files=check_files,
            )
            source_name, kind = proto.name, "protocol"
        else:
            raw = _as_dict(_load_local(path, config_name, **load_kwargs), train_split)
            if path.is_file() and path.suffix.lower() in _TABLE_SUFFIXES:
                table_dir = path.resolve().parent
    elif _looks_local(name):
        raise FileNotFoundError(f"local path does not exist: {name}")
    else:
        raw = _as_dict(_load_hub(name, config_name, **load_kwargs), train_split)

    if train_split not in raw:
        raise ValueError(
            f"no {train_split!r} split in {source_name!r}; its splits are {list(raw)}. Pass "
            f"train_split=<name of the training split>."
        )
    image_col, label_col = detect_columns(raw[train_split], image_column, label_column)
    raw = _drop_unlabelled_splits(raw, train_split, label_col)
    if table_dir is not None:
        raw = _paths_relative_to(raw, image_col, table_dir)
    raw = ensure_image_feature(raw, image_col)
    raw = ensure_class_label(raw, label_col)

    eval_names = [s for s in raw if s != train_split]
    train = raw[train_split]
    created_split = False
    test_carve: dict[str, Any] | None = None
    if kind == "digits":
        test_carve = {
            "from_split": None,  # scikit-learn's load_digits has no splits
            "fraction": test_size if test_size is not None else DIGITS_TEST_SIZE,
            "seed": split_seed,
            "size": len(raw["test"]),
            "source_size": len(raw["train"]) + len(raw["test"]),
        }
    if not eval_names:
        size = test_size if test_size is not None else DEFAULT_TEST_SIZE
        source_labels = label_array(train, label_col)
        train_idx, test_idx = stratified_split_indices(source_labels, size, split_seed)
        test_carve = {
            "from_split": train_split,
            "fraction": float(size),
            "seed": split_seed,
            "size": int(test_idx.size),
            "source_size": len(train),
            "source_class_counts": [
                int(n)
                for n in np.bincount(source_labels, minlength=train.features[label_col].num_classes)
            ],
        }
        # The user did not ask for it and it changes what is trained and evaluated: say so.
        logger.warning(
            "%s has no evaluation split: carved a stratified test split of %d images (%g%% of "
            "every class, split seed %d) from its %d %r images; %d remain for training. Give the "
            "source a test split to evaluate on your own.",
            source_name,
            test_idx.size,
            100 * size,
            split_seed,
            len(train),
            train_split,
            train_idx.size,
        )
        raw = DatasetDict({train_split: train.select(train_idx), "test": train.select(test_idx)})
        train, eval_names, created_split = raw[train_split], ["test"], True
    eval_names.sort(key=lambda s: _EVAL_SPLIT_ORDER.index(s) if s in _EVAL_SPLIT_ORDER else 99)
    making_validation = validation_per_class is not None or train_val_split is not None
    if making_validation and "validation" in raw:
        option = (
            f"validation_per_class={validation_per_class}"
            if validation_per_class is not None
            else f"train_val_split={train_val_split}"
        )
        raise ValueError(
            f"{source_name!r} has its own 'validation' split; {option} would make a second one. "
            "Use the dataset's (--validation_split validation, the default 'auto') or drop the "
            "option."
        )

    previous = longtail_record(train)
    reloaded = (
        kind != "protocol"
        and previous is not None
        and previous.get("profile") not in (None, "none")
        and sum(previous.get("class_counts") or []) == len(train)
    )
    validation = None
    validation_info: dict[str, Any] | None = None
    if validation_per_class is not None:
        if reloaded:
            raise ValueError(
                f"{source_name!r} is already long-tailed, so a balanced hold-out of its source "
                "images cannot be drawn from it; load the balanced source, or use "
                "train_val_split (--train_val_split FRACTION) to carve a stratified validation "
                "split from it."
            )
        source_labels = label_array(train, label_col)
        names = list(train.features[label_col].names)
        rest, held = heldout_split_indices(source_labels, validation_per_class, seed, names)
        validation = train.select(held)
        validation_info = {
            "method": "heldout",
            "per_class": int(validation_per_class),
            "seed": seed,
            "source_train_class_counts": [
                int(n) for n in np.bincount(source_labels, minlength=len(names))
            ],
        }
        train = train.select(rest)
    if reloaded:
        # A reloaded output of this function: reuse it (and its record) rather than subsample
        # a long-tailed set a second time.
        wanted = (profile, imbalance_factor, seed)
        have = (previous.get("profile"), previous.get("imbalance_factor"), previous.get("seed"))
        if (
            imbalance_factor is not None
            and previous.get("profile") != "protocol"
            and wanted != have
        ):
            raise ValueError(
                f"{source_name!r} is already long-tailed (profile, IF, seed = {have}); asked for "
                f"{wanted}. Pass imbalance_factor=None to use it as it is, or load the balanced "
                f"source."
            )
        lt = train
        record = dict(previous)
    elif kind == "protocol" or imbalance_factor is None:
        lt = train
        counts = np.bincount(
            label_array(lt, label_col), minlength=lt.features[label_col].num_classes
        )
        nonzero = counts[counts > 0]
        record = {
            "format": "hf_longtail.longtail/v1",
            "source": source_name,
            "profile": "protocol" if kind == "protocol" else "none",
            "imbalance_factor": float(nonzero.max() / nonzero.min()) if nonzero.size else None,
            "seed": None,
            "label_column": label_col,
            "num_classes": int(counts.size),
            "class_names": list(lt.features[label_col].names),
            "class_counts": [int(n) for n in counts],
        }
        if kind == "protocol" and imbalance_factor is not None:
            logger.info(
                "%s: imbalance_factor=%s ignored, the split file is already long-tailed",
                source_name,
                imbalance_factor,
            )
    else:
        try:
            lt = make_long_tailed(
                train,
                imbalance_factor,
                profile=profile,
                seed=seed,
                label_column=label_col,
                pareto_alpha=pareto_alpha,
                on_shortfall=on_shortfall,
                source=source_name,
            )
        except ValueError as err:
            if not created_split or test_carve is None or "imbalance_factor=None" not in str(err):
                raise
            # The split it names is what is left after the carve, not the folder the user knows.
            counts = np.asarray(test_carve["source_class_counts"])
            counts = counts[counts > 0]
            raise ValueError(
                f"{err} (The source has no test split, so a stratified "
                f"{100 * test_carve['fraction']:g}% of every class was set aside as 'test' first "
                f"(split seed {test_carve['seed']}): "
                f"its {test_carve['source_size']} {train_split!r} images, whose own imbalance "
                f"factor is {counts.max() / counts.min():.4g}, left {len(train)} to train on.)"
            ) from None
        record = dict(longtail_record(lt) or {})
    if train_val_split is not None:
        keep, carved = stratified_split_indices(label_array(lt, label_col), train_val_split, seed)
        lt, validation = lt.select(keep), lt.select(carved)
        counts_after = np.bincount(
            label_array(lt, label_col), minlength=lt.features[label_col].num_classes
        )
        validation_info = {
            "method": "train_val_split",
            "fraction": float(train_val_split),
            "seed": seed,
            "long_tailed_class_counts": record.get("class_counts"),
        }
        record["class_counts"] = [int(n) for n in counts_after]
    if validation is not None and validation_info is not None:
        validation_info["class_counts"] = [
            int(n)
            for n in np.bincount(
                label_array(validation, label_col),
                minlength=lt.features[label_col].num_classes,
            )
        ]
        record["validation"] = validation_info
    record.update(
        {
            "image_column": image_col,
            "label_column": label_col,
            "train_split": train_split,
            "eval_splits": eval_names,
            # A reloaded output keeps the fact that its test split was made by us.
            "eval_split_created": created_split or bool(record.get("eval_split_created")),
        }
    )
    if created_split or kind == "digits":
        default = DIGITS_TEST_SIZE if kind == "digits" else DEFAULT_TEST_SIZE
        record["test_size"] = test_size if test_size is not None else default
        record["split_seed"] = split_seed
    if test_carve is not None:
        # How the test split was made (fraction, seed, from which split, sizes): the run record
        # and the cards describe it from this, never as the source's own split.
        record["carved_test_split"] = {
            k: v for k, v in test_carve.items() if k != "source_class_counts"
        }
    lt = write_longtail_record(lt, record)
    splits = {"train": lt}
    if validation is not None:
        splits["validation"] = validation
    return DatasetDict({**splits, **{s: raw[s] for s in eval_names}})
