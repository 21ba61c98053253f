"""A Hub token never lands on disk: ``transformers.Trainer`` pickles its whole
``TrainingArguments`` (``hub_token`` included) into ``training_args.bin`` in the output directory
and in every checkpoint, and ``Trainer.push_to_hub()`` uploads that folder."""

from __future__ import annotations

import secrets

from _reliability_helpers import TINY_RUN, load_train_module, tiny_vit, train_dataset, training_args

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn


def _files_holding(out, token: str) -> list[str]:
    needle = token.encode()
    return sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and needle in p.read_bytes()
    )


def test_no_file_of_a_run_holds_the_hub_token(tmp_path):
    token = "hf_" + secrets.token_hex(16)
    out = tmp_path / "run"
    load_train_module().main([*TINY_RUN, "--output_dir", str(out), "--hub_token", token])
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len([p for p in written if p.name == "training_args.bin"]) == 3  # dir + 2 checkpoints
    assert _files_holding(out, token) == []


def test_the_trainer_keeps_the_token_for_its_own_push(tmp_path):
    """Only the saved copy is redacted: the in-memory arguments keep the token for a push."""
    import torch

    token = "hf_" + secrets.token_hex(16)
    args = training_args(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=1, hub_token=token
    )
    trainer = LongTailTrainer(
        model=tiny_vit(), args=args, train_dataset=train_dataset(), data_collator=collate_fn
    )
    trainer.train()
    trainer.save_model()
    assert trainer.args.hub_token == token
    assert _files_holding(tmp_path, token) == []
    saved = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.learning_rate == args.learning_rate
