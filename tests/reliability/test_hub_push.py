"""Pushing a run never rewrites a file of the run: a hand-edited ``README.md`` survives, byte for
byte, a push that fails and one that succeeds (the card is uploaded from a temporary copy), and
the message after a failure says only what is true.

The run directory is real (the tiny ViT trained 2 steps by ``LongTailTrainer``, saved and
evaluated, milliseconds); the Hub is the real client in offline mode or a recording fake that
fails where the network would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
from _reliability_helpers import run_files, tiny_vit, train_dataset, training_args
from huggingface_hub import ModelCard

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.hub import build_model_card, card_metrics
from hf_longtail.hub.cli import EXIT_PUSH_FAILED, main

HAND_EDIT = "\n## Notes from the author\n\nTrained on my laptop; see the [paper](https://x.y).\n"


class RecordingApi:
    """An ``HfApi`` stand-in: records each call, fails at ``fail_at`` like a dropped network."""

    instances: ClassVar[list[RecordingApi]] = []
    fail_at: ClassVar[str | None] = None

    def __init__(self, token=None, **kwargs):
        self.token, self.calls = token or "hf_fake", []
        RecordingApi.instances.append(self)

    def _call(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name == RecordingApi.fail_at:
            raise ConnectionError("connection reset by peer")

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id=repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, *, repo_id, operations, **kwargs):
        sources = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        # Read now: the card's temporary copy is gone once the push returns.
        self._call(
            "create_commit",
            repo_id=repo_id,
            sources=sources,
            card=sources["README.md"].read_text(encoding="utf-8"),
        )
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/c/1"})()


@pytest.fixture
def hub(monkeypatch):
    RecordingApi.instances, RecordingApi.fail_at = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


@pytest.fixture
def edited_run(tmp_path):
    """A saved, evaluated run whose README.md its author then edited; and its trainer."""
    out = tmp_path / "tiny-lt"
    trainer = LongTailTrainer(
        model=tiny_vit(),
        args=training_args(out, max_steps=2, hub_model_id="me/tiny-lt"),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config={"base": "ce", "ccar": True, "car_weight": 0.5},
    )
    trainer.train()
    trainer.save_model()
    trainer.evaluate_and_save(train_dataset())
    card = out / "README.md"
    card.write_bytes(card.read_bytes() + HAND_EDIT.encode())
    return out, trainer


def test_a_failed_push_leaves_the_edited_card_and_says_only_what_is_true(edited_run, hub, capsys):
    out, _ = edited_run
    before = run_files(out)
    hub.fail_at = "create_commit"  # after the card was rendered: where the old push had
    # already regenerated README.md
    assert main(["push", str(out), "--repo-id", "me/tiny-lt"]) == EXIT_PUSH_FAILED
    assert run_files(out) == before  # README.md byte for byte, every other file too
    err = capsys.readouterr().err
    assert f"This push wrote, changed or deleted no file in {out}." in err
    assert "Retry with: python -m hf_longtail.hub push" in err and "connection reset" in err


def test_an_offline_push_with_the_real_client_leaves_the_edited_card(edited_run, capsys):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: this test must not reach the network")
    out, _ = edited_run
    before = run_files(out)
    assert main(["push", str(out), "--repo-id", "me/tiny-lt"]) == EXIT_PUSH_FAILED
    assert run_files(out) == before
    assert "offline mode is on" in capsys.readouterr().err


def test_a_successful_push_uploads_a_temporary_card_and_keeps_the_edited_one(
    edited_run, hub, caplog
):
    out, trainer = edited_run
    edited = (out / "README.md").read_bytes()
    with caplog.at_level(logging.WARNING, logger="hf_longtail.hub.push"):
        trainer.push_to_hub()
    assert (out / "README.md").read_bytes() == edited
    ((_, commit),) = [c for c in hub.instances[-1].calls if c[0] == "create_commit"]
    # The uploaded card is the one rendered for the repo, from a temporary copy outside the run.
    assert commit["card"] == str(build_model_card(out, "me/tiny-lt"))
    assert 'from_pretrained("me/tiny-lt")' in commit["card"] and HAND_EDIT not in commit["card"]
    card_source = commit["sources"]["README.md"]
    assert out not in card_source.parents and not card_source.exists()
    assert all(src == out.resolve() / n for n, src in commit["sources"].items() if n != "README.md")
    assert card_metrics(ModelCard(commit["card"]))["accuracy"] is not None
    # The author is told that their edits were not published, and how to publish them.
    assert any(
        "README.md is not the card hf-longtail generates" in r.getMessage()
        and "--keep-card" in r.getMessage()
        for r in caplog.records
    )


def test_keep_card_uploads_the_edited_card_as_it_is(edited_run, hub, caplog):
    out, _ = edited_run
    before = run_files(out)
    with caplog.at_level(logging.WARNING, logger="hf_longtail.hub.push"):
        assert main(["push", str(out), "--repo-id", "me/tiny-lt", "--keep-card"]) == 0
    assert run_files(out) == before
    ((_, commit),) = [c for c in hub.instances[-1].calls if c[0] == "create_commit"]
    assert (
        commit["card"].endswith(HAND_EDIT) and commit["sources"]["README.md"] == out / "README.md"
    )
    assert not caplog.records


def test_an_unedited_card_is_replaced_on_the_hub_without_a_warning(edited_run, hub, caplog):
    out, _ = edited_run
    card = out / "README.md"
    card.write_bytes(card.read_bytes()[: -len(HAND_EDIT.encode())])  # as evaluate_and_save wrote it
    before = run_files(out)
    with caplog.at_level(logging.WARNING, logger="hf_longtail.hub.push"):
        assert main(["push", str(out), "--repo-id", "me/tiny-lt"]) == 0
    assert run_files(out) == before and not caplog.records
