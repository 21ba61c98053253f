"""hf_longtail.hub dataset publishing: the long-tailed DatasetDict's card and its (mocked) push."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers_train import table_row
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from huggingface_hub import DatasetCard

from hf_longtail.hub import (
    PushToHubError,
    build_dataset_card,
    dataset_card_counts,
    push_long_tailed_dataset,
)

NAMES = ["cat", "dog", "bird", "fish", "frog"]
TRAIN_COUNTS = [16, 8, 4, 2, 1]  # exp profile, n_max = 16, IF = 16
TEST_PER_CLASS = 3


def _images(labels: list[int]) -> Dataset:
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def long_tailed() -> DatasetDict:
    """A balanced source of 16 images per class, long-tailed by Dataset.select (as the data
    package does), plus an untouched balanced test split."""
    source = _images([c for c in range(5) for _ in range(16)])
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [rng.permutation(np.arange(16 * c, 16 * (c + 1)))[:n] for c, n in enumerate(TRAIN_COUNTS)]
    )
    train = source.select(np.sort(keep))
    test = _images([c for c in range(5) for _ in range(TEST_PER_CLASS)])
    return DatasetDict({"train": train, "test": test})


def test_dataset_card_counts_and_construction(long_tailed):
    card = build_dataset_card(
        long_tailed,
        "me/tiny-lt",
        source="uoft-cs/cifar10",
        imbalance_factor=16,
        profile="exp",
        seed=0,
    )
    reference = np.bincount(np.asarray(long_tailed["train"]["label"]), minlength=5).tolist()
    assert reference == TRAIN_COUNTS
    reloaded = DatasetCard(str(card))  # what the Hub would parse
    assert dataset_card_counts(reloaded) == TRAIN_COUNTS
    meta = reloaded.data.long_tail
    assert meta["class_names"] == NAMES
    assert (meta["profile"], meta["imbalance_factor"], meta["seed"]) == ("exp", 16, 0)
    data = reloaded.data.to_dict()
    assert data["task_categories"] == ["image-classification"]
    assert data["source_datasets"] == ["uoft-cs/cifar10"]
    assert data["size_categories"] == ["n<1K"]
    assert "long-tailed" in data["tags"]
    assert "license" not in data  # defer to the source dataset's license unless told
    text = reloaded.text
    for i, name in enumerate(NAMES):
        assert table_row(text, str(i)) == [str(i), name, str(TRAIN_COUNTS[i]), str(TEST_PER_CLASS)]
    assert table_row(text, "Imbalance ratio (actual, max / min count)")[1] == "16.0"
    assert table_row(text, "Few-shot classes (< 20 images)")[1] == "5"
    assert table_row(text, "Subsampling seed")[1] == "0"
    assert 'load_dataset("me/tiny-lt")' in text
    assert "2601.15924" in text and "2603.16732" in text
    assert "\n\n\n" not in str(card)


def test_dataset_card_survives_the_metadata_push_to_hub_adds(long_tailed):
    """push_to_hub rewrites README metadata (dataset_info, configs) but keeps the text."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    card = build_dataset_card(long_tailed, "me/tiny-lt", profile="exp", imbalance_factor=16)
    merged = DatasetCard(str(card))
    info = DatasetInfo(features=long_tailed["train"].features)
    DatasetInfosDict({"default": info}).to_dataset_card_data(merged.data)
    configs = {"default": {"data_files": [{"split": "train", "path": "data/train-*"}]}}
    MetadataConfigs(configs).to_dataset_card_data(merged.data)
    final = DatasetCard(str(merged))
    assert dataset_card_counts(final) == TRAIN_COUNTS
    assert "dataset_info" in final.data.to_dict() and "configs" in final.data.to_dict()
    assert final.text == card.text


def test_dataset_card_errors_name_the_problem(long_tailed):
    with pytest.raises(ValueError, match="no 'training' split"):
        build_dataset_card(long_tailed, train_split="training")
    plain = DatasetDict({"train": Dataset.from_dict({"x": [1, 2], "y": [0, 1]})})
    with pytest.raises(ValueError, match=r"no ClassLabel column \(columns: x, y\)"):
        build_dataset_card(plain)
    with pytest.raises(ValueError, match="class_encode_column"):
        build_dataset_card(plain, label_column="y")
    two = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"fine": [0, 1], "coarse": [0, 0]},
                features=Features(
                    {"fine": ClassLabel(names=["a", "b"]), "coarse": ClassLabel(names=["z"])}
                ),
            )
        }
    )
    with pytest.raises(ValueError, match=r"several ClassLabel columns \(fine, coarse\)"):
        build_dataset_card(two)
    assert dataset_card_counts(build_dataset_card(two, label_column="fine")) == [1, 1]
    # One class is no long tail: the package's one count rule (ClassCounts) refuses it.
    with pytest.raises(ValueError, match="train class counts must have at least 2 classes"):
        build_dataset_card(two, label_column="coarse")
    with pytest.raises(TypeError, match="DatasetDict"):
        build_dataset_card(long_tailed["train"])


class RecordingApi:
    def __init__(self, log: list) -> None:
        self.log = log
        self.token = "hf_fake"

    def create_repo(self, repo_id, **kwargs):
        self.log.append(("create_repo", repo_id, kwargs))

        class _Url:
            pass

        url = _Url()
        url.repo_id = repo_id
        return url

    def create_branch(self, repo_id, **kwargs):
        self.log.append(("create_branch", repo_id, kwargs))

    def upload_file(self, **kwargs):
        self.log.append(("upload_file", kwargs["repo_id"], kwargs))


def test_push_uploads_the_card_then_the_data(long_tailed, monkeypatch):
    log: list = []

    def fake_push_to_hub(self, repo_id, **kwargs):
        log.append(
            ("push_to_hub", repo_id, {**kwargs, "splits": {k: v.num_rows for k, v in self.items()}})
        )
        return "commit-info"

    monkeypatch.setattr(DatasetDict, "push_to_hub", fake_push_to_hub)
    result = push_long_tailed_dataset(
        long_tailed,
        "me/tiny-lt",
        private=True,
        token="hf_x",
        profile="exp",
        imbalance_factor=16,
        seed=0,
        revision="v1",
        api=RecordingApi(log),
    )
    assert result == "commit-info"
    assert [entry[0] for entry in log] == [
        "create_repo",
        "create_branch",
        "upload_file",
        "push_to_hub",
    ]
    create = log[0][2]
    assert create["repo_type"] == "dataset" and create["private"] is True and create["exist_ok"]
    upload = log[2][2]
    assert upload["path_in_repo"] == "README.md" and upload["repo_type"] == "dataset"
    assert upload["revision"] == "v1"
    uploaded = DatasetCard(upload["path_or_fileobj"].decode("utf-8"))
    assert dataset_card_counts(uploaded) == TRAIN_COUNTS
    push = log[3][2]
    assert push["splits"] == {"train": sum(TRAIN_COUNTS), "test": 5 * TEST_PER_CLASS}
    assert (push["private"], push["token"], push["revision"]) == (True, "hf_x", "v1")


def test_failed_dataset_push_raises_with_retry_and_changes_nothing(long_tailed, monkeypatch):
    def broken_push(self, repo_id, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(DatasetDict, "push_to_hub", broken_push)
    rows_before = {k: v.num_rows for k, v in long_tailed.items()}
    with pytest.raises(PushToHubError) as info:
        push_long_tailed_dataset(long_tailed, "me/tiny-lt", api=RecordingApi([]))
    msg = str(info.value)
    assert "while uploading the data shards" in msg and "ConnectionError" in msg
    assert "push_long_tailed_dataset(dataset_dict, 'me/tiny-lt'" in msg
    assert {k: v.num_rows for k, v in long_tailed.items()} == rows_before
    with pytest.raises(PushToHubError, match="Repo id must"):
        push_long_tailed_dataset(long_tailed, "bad id!", api=RecordingApi([]))


def test_construction_defaults_to_the_data_package_record(long_tailed):
    from hf_longtail.data import make_long_tailed

    source = _images([c for c in range(5) for _ in range(16)])
    train = make_long_tailed(source, imbalance_factor=16, profile="exp", seed=3)
    card = build_dataset_card(DatasetDict({"train": train, "test": long_tailed["test"]}))
    meta = DatasetCard(str(card)).data.long_tail
    assert (meta["profile"], meta["imbalance_factor"], meta["seed"]) == ("exp", 16, 3)
    assert meta["class_counts"] == TRAIN_COUNTS
