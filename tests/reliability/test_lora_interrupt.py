"""A LoRA run stopped the way a scheduler stops it (SIGTERM to the process) checkpoints its
adapter at the step it stopped, and the resumed run ends with the adapter and head of the
uninterrupted run."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from _reliability_helpers import TrainRun, run_train
from safetensors.torch import load_file

pytest.importorskip("peft")
from test_lora import _argv, vit_source  # noqa: F401  (the tiny ViT fixture)

pytestmark = pytest.mark.slow

MAX_STEPS = 200
LOSS_LINE = re.compile(r"^\{'loss': ", re.MULTILINE)


def _run_args(source: Path, out: Path) -> list[str]:
    return _argv(
        source, out, "--max_steps", str(MAX_STEPS), "--logging_strategy", "steps",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "100",
        "--full_determinism", "true",
    )  # fmt: skip


def test_sigterm_then_resume_gives_the_uninterrupted_adapter(vit_source, tmp_path):  # noqa: F811
    reference = tmp_path / "reference"
    code, log = run_train(_run_args(vit_source, reference), tmp_path / "reference.txt")
    assert code == 0, log[-4000:]

    out = tmp_path / "stopped"
    run = TrainRun(_run_args(vit_source, out), tmp_path / "stopped.txt")
    try:
        run.wait_for(lambda: len(LOSS_LINE.findall(run.log())) >= 3)
        run.send(signal.SIGTERM)
        code = run.wait()
    except BaseException:
        run.kill()
        raise
    assert code == 128 + signal.SIGTERM, run.log()[-4000:]
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and 3 <= checkpoints[0] < MAX_STEPS
    stop = out / f"checkpoint-{checkpoints[0]}"
    assert (stop / "adapter_model.safetensors").is_file()
    assert not (out / "all_results.json").exists()

    code, log = run_train(_run_args(vit_source, out), tmp_path / "resumed.txt")
    assert code == 0, log[-4000:]
    record = json.loads((out / "longtail_run.json").read_text())
    assert [r["checkpoint"] for r in record["resumes"]] == [stop.name]
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(reference / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    results = json.loads((out / "all_results.json").read_text())
    expected = json.loads((reference / "all_results.json").read_text())
    assert results["test_accuracy"] == expected["test_accuracy"]
