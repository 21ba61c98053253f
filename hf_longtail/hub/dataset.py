"""Publish a long-tailed ``DatasetDict`` with a dataset card describing its construction.

Others can then train on the exact same subset: the parquet shards come from
``DatasetDict.push_to_hub`` and the card carries the construction (source, profile, imbalance
factor, seed) and the per-class counts, both as a table and machine-readable in the card's YAML
(``long_tail:``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import DatasetCard, DatasetCardData

from hf_longtail.class_counts import ClassCounts
from hf_longtail.hub.card import (
    DATASET_CARD_TEMPLATE,
    PROFILE_FORMULAS,
    _carved_text,
    _hub_link,
    _public_name,
    class_count_summary,
    looks_like_hub_id,
    template_path,
    tidy_markdown,
)
from hf_longtail.hub.escape import Markup, md_code, py_str, render_card
from hf_longtail.hub.push import PushToHubError, _describe_failure, _token_known

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, DatasetDict
    from huggingface_hub import CommitInfo, HfApi

DATASET_TAGS = ("long-tailed", "imbalanced", "image-classification", "hf-longtail")
DEFAULT_DATASET_COMMIT_MESSAGE = "Upload long-tailed dataset (hf-longtail)"


def _label_column(dataset: Dataset, label_column: str | None, split: str) -> str:
    from datasets import ClassLabel

    class_labels = [k for k, f in dataset.features.items() if isinstance(f, ClassLabel)]
    if label_column is not None:
        if label_column not in dataset.features:
            raise ValueError(
                f"label_column {label_column!r} is not a column of split {split!r} "
                f"(columns: {', '.join(dataset.column_names)})."
            )
        if not isinstance(dataset.features[label_column], ClassLabel):
            raise ValueError(
                f"column {label_column!r} of split {split!r} is {dataset.features[label_column]}, "
                "not a ClassLabel: encode it first with "
                f"`dataset_dict.class_encode_column({label_column!r})`."
            )
        return label_column
    if len(class_labels) == 1:
        return class_labels[0]
    if not class_labels:
        raise ValueError(
            f"split {split!r} has no ClassLabel column (columns: {', '.join(dataset.column_names)}"
            "); pass label_column= and encode it with `dataset_dict.class_encode_column(name)`."
        )
    raise ValueError(
        f"split {split!r} has several ClassLabel columns ({', '.join(class_labels)}); pass "
        "label_column= to say which one the long tail was built on."
    )


def _count(dataset: Dataset, label_column: str, num_classes: int) -> list[int]:
    """Per-class counts of a split, counted once from its label column
    (:func:`hf_longtail.data.class_counts`: Arrow, no image decoded)."""
    from hf_longtail.data import class_counts

    counts = class_counts(dataset, label_column=label_column)
    if len(counts) != num_classes:
        raise ValueError(
            f"labels of column {label_column!r} must lie in [0, {num_classes}); found label "
            f"{len(counts) - 1} (-1 marks a missing label: drop those rows first)."
        )
    return counts


def _recorded_construction(dataset: Dataset) -> dict[str, Any]:
    """The provenance record ``hf_longtail.data`` stores in ``info.description`` (or ``{}``)."""
    from hf_longtail.data import longtail_record

    record = longtail_record(dataset)
    return dict(record) if isinstance(record, dict) else {}


def _size_category(n: int) -> str:
    for bound, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if n < bound:
            return name
    return "10M<n<100M"


#: Record profiles of a training split used as it is (``imbalance_factor=None``; split files).
_NOT_SUBSAMPLED = ("none", "protocol")


def _construction_sentences(
    record: dict[str, Any],
    profile: str | None,
    train_split: str,
    counts: dict[str, Any],
    splits: list[str],
) -> dict[str, Any]:
    """The card's sentences about how the splits were made, derived from the provenance record
    (and the ``profile`` given or recorded): no subset claimed for a split used as it is, a
    carved test split described as carved, "untouched" only for the source's own splits."""
    train = md_code(train_split)
    sizes = f"from {counts['max']} to {counts['min']} images"
    carved = record.get("carved_test_split")
    carved = carved if isinstance(carved, dict) and "test" in splits else None
    if profile in PROFILE_FORMULAS:
        subset = (
            f"the {train} split keeps a seeded random subset of each class so that class sizes "
            f"decay {sizes}"
        )
        long_tail = ""
    elif profile in _NOT_SUBSAMPLED:
        what = "the published split files'" if profile == "protocol" else "the source's own"
        whose = (
            f"the rest of the source's {train} images"
            if carved and carved.get("from_split") == train_split
            else "the source's"
        )
        subset = (
            f"the {train} split is {whose}, used as it is: every image kept, class sizes {sizes}"
        )
        long_tail = f"none: {what} long tail, not subsampled (every image kept)"
    else:  # nothing recorded or given: claim no construction
        subset = f"class sizes of the {train} split go {sizes}"
        long_tail = ""
    carved_text = f"{_carved_text(carved)}, carved before anything else" if carved else ""
    others = [s for s in splits if s != train_split and not (carved_text and s == "test")]
    tail = []
    if carved_text:
        tail.append(f"the `test` split is {carved_text}")
    if others:
        tail.append("the other splits are the source's, untouched")
    return {
        "subsampled": profile in PROFILE_FORMULAS,
        "long_tail": Markup(long_tail),  # fixed text, no value from the data
        "carved_text": Markup(carved_text),
        # Markup: the split names in these sentences went through md_code.
        "intro": Markup(subset + ("; " + "; ".join(tail) if tail else "") + "."),
    }


def build_dataset_card(
    dataset_dict: DatasetDict,
    repo_id: str | None = None,
    *,
    source: str | None = None,
    imbalance_factor: float | None = None,
    profile: str | None = None,
    seed: int | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    license: str | None = None,
    thresholds: dict[str, int] | None = None,
    template: str | Path | None = None,
) -> DatasetCard:
    """Dataset card of a long-tailed ``DatasetDict`` (nothing is uploaded or written).

    The per-class counts of every split are counted from the ``ClassLabel`` column
    (``hf_longtail.data.class_counts`` when that package is installed, else a bincount);
    ``source``/``imbalance_factor``/``profile``/``seed`` describe the construction; each
    defaults to the provenance record ``hf_longtail.data`` keeps in the train split's
    ``info.description`` (``longtail_record``), else shows as "not recorded". Metadata: ``task_categories: image-classification``, tags,
    ``size_categories``, ``source_datasets`` (if ``source`` is a Hub id), ``license`` (leave
    ``None`` to defer to the source dataset's), and ``long_tail`` with the construction,
    class names and training class counts. Raises ``ValueError`` for a missing train split or
    label column.
    """
    from datasets import DatasetDict

    if not isinstance(dataset_dict, DatasetDict):
        raise TypeError(
            f"dataset_dict must be a datasets.DatasetDict (got {type(dataset_dict).__name__}); "
            "wrap a single split with DatasetDict({'train': dataset})."
        )
    if train_split not in dataset_dict:
        raise ValueError(
            f"dataset_dict has no {train_split!r} split (splits: {', '.join(dataset_dict)}); "
            "pass train_split= naming the long-tailed training split."
        )
    train = dataset_dict[train_split]
    record = _recorded_construction(train)
    source = source if source is not None else record.get("source")
    profile = profile if profile is not None else record.get("profile")
    imbalance_factor = (
        imbalance_factor if imbalance_factor is not None else record.get("imbalance_factor")
    )
    seed = seed if seed is not None else record.get("seed")
    if label_column is None and record.get("label_column") in train.features:
        label_column = record["label_column"]
    column = _label_column(train, label_column, train_split)
    names = list(train.features[column].names)
    k = len(names)
    # The training counts obey the package's one count rule (ClassCounts), as in the model card.
    train_counts = ClassCounts(_count(train, column, k), names, name=f"{train_split} class counts")
    counts = class_count_summary(train_counts, thresholds)
    other_splits = {}
    for split, ds in dataset_dict.items():
        if split == train_split or column not in ds.features:
            continue
        other_splits[split] = _count(ds, column, k)

    as_is = profile in _NOT_SUBSAMPLED
    if source:
        pretty = _public_name(source).split("/")[-1] + ("" if as_is else "-LT")
    else:
        pretty = repo_id.split("/")[-1] if repo_id else "Long-tailed dataset"
    if as_is:  # the recorded factor is then the measured ratio, not one that was asked for
        pretty_name = pretty + f" (imbalance ratio {counts['ratio']}, not subsampled)"
    else:
        pretty_name = pretty + (
            f" (imbalance factor {imbalance_factor:g})" if imbalance_factor is not None else ""
        )
    total_rows = sum(ds.num_rows for ds in dataset_dict.values())
    construction = {
        **{k: v for k, v in record.items() if k not in ("class_counts", "class_names")},
        "source": _public_name(source, default="not recorded"),
        "profile": profile,
        "imbalance_factor": imbalance_factor,
        "seed": seed,
        "train_split": train_split,
        "label_column": column,
        "class_names": names,
        "class_counts": train_counts.to_list(),
    }
    card_data = DatasetCardData(
        license=license,
        task_categories=["image-classification"],
        tags=list(DATASET_TAGS),
        pretty_name=pretty_name,
        size_categories=[_size_category(total_rows)],
        source_datasets=[source] if looks_like_hub_id(source) else None,
        long_tail=construction,
    )
    rows = [
        {
            "index": i,
            "name": names[i],
            "train": train_counts[i],
            "others": [other_splits[s][i] for s in other_splits],
        }
        for i in range(k)
    ]
    image_columns = [name for name, f in train.features.items() if type(f).__name__ == "Image"]
    sentences = _construction_sentences(record, profile, train_split, counts, list(dataset_dict))
    template_file = Path(template) if template else template_path(DATASET_CARD_TEMPLATE)
    card = render_card(
        DatasetCard,
        card_data,
        template_file,
        title=pretty_name,
        repo_ref=repo_id or "path/to/dataset",
        source_display=(
            _hub_link(source, "https://huggingface.co/datasets/")
            if looks_like_hub_id(source)
            else (
                md_code(construction["source"])
                if source
                else Markup("an image dataset (source not recorded)")
            )
        ),
        class_counts_call=md_code(f"hf_longtail.data.class_counts(dataset[{py_str(train_split)}])"),
        profile=profile or "not recorded",
        profile_formula=PROFILE_FORMULAS.get(profile or "", ""),
        synthetic=profile in PROFILE_FORMULAS,
        imbalance_factor=f"{imbalance_factor:g}"
        if imbalance_factor is not None
        else "not recorded",
        seed=seed if seed is not None else "not recorded",
        train_split=train_split,
        label_column=column,
        image_column=image_columns[0] if image_columns else "",
        counts=counts,
        splits=[(s, dataset_dict[s].num_rows) for s in dataset_dict],
        other_split_names=list(other_splits),
        rows=rows,
        **sentences,
    )
    card.content = tidy_markdown(card.content)
    return card


def push_long_tailed_dataset(
    dataset_dict: DatasetDict,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_DATASET_COMMIT_MESSAGE,
    revision: str | None = None,
    api: HfApi | None = None,
    push_kwargs: dict[str, Any] | None = None,
    **card_options: Any,
) -> CommitInfo:
    """Push a long-tailed ``DatasetDict`` and its card to the dataset repo ``repo_id``.

    The card (:func:`build_dataset_card`) is built first (bad input fails before any network
    call), then: ``create_repo(repo_type="dataset", exist_ok=True)``, the card uploaded as
    ``README.md``, then ``dataset_dict.push_to_hub`` which adds its ``dataset_info``/``configs``
    metadata to that README and keeps the card's text. Returns the data commit's ``CommitInfo``.
    ``push_kwargs`` go to ``DatasetDict.push_to_hub`` (e.g. ``max_shard_size``);
    ``card_options`` to :func:`build_dataset_card` (``source``, ``imbalance_factor``,
    ``profile``, ``seed``, ``label_column``, ``train_split``, ``license``, ``thresholds``, ...).

    Nothing local is modified. Any Hub/network failure raises :class:`PushToHubError` (the
    cause chained); calling again is safe: it re-uploads the card and replaces the shards.
    """
    from huggingface_hub.utils import validate_repo_id

    call = (
        f"push_long_tailed_dataset(dataset_dict, {repo_id!r}"
        + (", private=True" if private else "")
        + ", ...)"
    )
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise PushToHubError(
            f"Cannot push the dataset to {repo_id!r}: {err} Use 'namespace/name'.", call
        ) from err
    card = build_dataset_card(dataset_dict, repo_id, **card_options)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    stage = "creating the dataset repository"
    try:
        repo_url = api.create_repo(
            repo_id, token=token, private=private, repo_type="dataset", exist_ok=True
        )
        target = getattr(repo_url, "repo_id", None) or repo_id
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            stage = f"creating the branch {revision!r}"
            api.create_branch(
                target, branch=revision, token=token, repo_type="dataset", exist_ok=True
            )
        stage = "uploading the dataset card"
        # The card goes first: push_to_hub then merges its own metadata into this README.
        api.upload_file(
            path_or_fileobj=str(card).encode("utf-8"),
            path_in_repo="README.md",
            repo_id=target,
            repo_type="dataset",
            token=token,
            revision=revision,
            commit_message="Add long-tailed dataset card (hf-longtail)",
        )
        stage = "uploading the data shards"
        return dataset_dict.push_to_hub(
            target,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            **(push_kwargs or {}),
        )
    except Exception as err:  # broad on purpose, see push_long_tail_model
        reason = _describe_failure(err, _token_known(token, api))
        raise PushToHubError(
            f"Push of the long-tailed dataset to https://huggingface.co/datasets/{repo_id} failed "
            f"while {stage}: {reason}\nNothing local was modified. Retry by calling {call} "
            "again (it re-uploads the card and replaces the data shards).",
            call,
        ) from err


def dataset_card_counts(card: DatasetCard) -> Sequence[int]:
    """The training class counts stored in a card's ``long_tail`` metadata (see the card)."""
    block = getattr(card.data, "long_tail", None) or {}
    return list(block.get("class_counts", []))
