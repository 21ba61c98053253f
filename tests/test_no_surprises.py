"""Issue 15, section 4: what a newcomer ran into, each now explicit.

Pretrained weights that cannot be loaded fail (no silent random start, no false base model);
``accelerate launch --cpu --num_processes 2`` is refused instead of running one process; ``-h``
is grouped with the project's options first; ``--imbalance_factor none``; plain class weights;
``evaluate`` optional; ``Trainer.end()`` called; "epoch k/N" lines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers_train import load_train_script

from hf_longtail.losses import LongTailLossConfig, build_loss, create_base_loss

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--dataset_name", "digits", "--imbalance_factor", "10", "--max_steps", "2",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "128",
    "--max_eval_samples", "64", "--save_strategy", "no", "--eval_strategy", "no",
    "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


# ------------------------------------------------------------------ pretrained weights
def test_unreachable_timm_weights_stop_the_run_naming_no_pretrained(train_script, tmp_path):
    """Offline (conftest): the timm id's weights cannot be fetched; the run stops clearly and
    writes no run record that would name a base model it never loaded."""
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"(?s)Cannot load the pretrained weights.*--no_pretrained"):
        train_script.main(["--model_name_or_path", "timm/test_resnet", "--output_dir", str(out)])
    assert not (out / "longtail_run.json").exists()


def test_no_pretrained_run_claims_no_base_model(train_script, tmp_path):
    out = tmp_path / "run"
    train_script.main(
        [*FAST, "--model_name_or_path", "timm/test_resnet", "--no_pretrained", "--output_dir",
         str(out)]
    )  # fmt: skip
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["model_name_or_path"] == "timm/test_resnet" and run["base_model"] is None
    card = (out / "README.md").read_text()
    assert "base_model:" not in card and "fine-tuned from" not in card


def test_hub_id_offline_fails_naming_the_hub_and_the_id(train_script, tmp_path):
    with pytest.raises(OSError, match=r"(?s)'someone/not-cached'.*offline"):
        train_script.main(
            [*FAST, "--model_name_or_path", "someone/not-cached", "--output_dir",
             str(tmp_path / "run")]
        )  # fmt: skip


# ------------------------------------------------------------------ launch
@pytest.mark.slow  # ~14 s alone, ~22 s on the shared 2 cores: accelerate's CLI start-up
def test_accelerate_cpu_with_two_processes_is_refused_before_any_work(tmp_path):
    """accelerate 1.x's --cpu launcher starts one process whatever --num_processes says."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed next to this Python")
    out = tmp_path / "run"
    command = [
        accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "scripts" / "train.py"), "--output_dir", str(out), "--max_steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--cpu --num_processes 2` started 1 process" in done.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in done.stderr
    assert not out.exists()  # refused before the output dir or the data were touched


# ------------------------------------------------------------------ -h and parsing
def test_help_lists_the_projects_options_first_grouped():
    from hf_longtail.arguments import build_parser

    text = build_parser().format_help()
    titles = ["model:", "LoRA (peft):", "data:", "loss (LongTailLossConfig):", "run:"]
    positions = [text.index("\n" + t + "\n") for t in titles]
    assert positions == sorted(positions)
    assert text.index("transformers TrainingArguments:") > positions[-1]
    assert "YAML/JSON config file" in text.split("options:")[0]
    assert text.index("--lora_r") < text.index("--dataset_name") < text.index("--car_weight")
    assert text.index("--car_weight") < text.index("--learning_rate")
    no_pretrained = text[text.index("--no_pretrained") :].split("\n  --")[0]
    assert "random weights on purpose" in no_pretrained
    assert len(text.split("usage:")[1].split("\n\n")[0].splitlines()) == 1  # one usage line


def test_imbalance_factor_none_uses_the_source_as_it_is(train_script):
    data = train_script.parse_args(["--imbalance_factor", "none", "--drw_epoch", "None"])
    assert data[1].imbalance_factor is None and data[2].drw_epoch is None
    assert train_script.parse_args(["--imbalance_factor", "50"])[1].imbalance_factor == 50.0
    with pytest.raises(SystemExit):
        train_script.parse_args(["--imbalance_factor", "lots"])
    from hf_longtail.data import class_counts, load_long_tailed

    source = load_long_tailed("digits", imbalance_factor=None)["train"]
    subset = load_long_tailed("digits", imbalance_factor=10)["train"]
    assert len(source) > len(subset)
    assert min(class_counts(source)) > min(class_counts(subset))  # nothing subsampled


# ------------------------------------------------------------------ class weights
def test_auto_class_weights_are_inverse_frequency_with_mean_one():
    counts = [100, 50, 10, 0]
    loss = create_base_loss("ce", counts, class_weights="auto")
    expected = torch.tensor([1 / 100, 1 / 50, 1 / 10, 1 / 10], dtype=torch.float64)
    expected = expected / expected.mean()  # the zero count takes the smallest positive count
    torch.testing.assert_close(loss.class_weights.double(), expected)
    assert float(loss.class_weights.mean()) == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["auto", [1.0, 2.5, 4.0, 0.5]])
def test_class_weights_ce_is_torch_weighted_cross_entropy(spec):
    counts = [40, 20, 5, 2]
    loss_fn = build_loss(LongTailLossConfig(base="ce", class_weights=spec), counts)
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 4) * 3, torch.randint(0, 4, (64,))
    weight = (
        torch.tensor(spec)
        if isinstance(spec, list)
        else (1 / torch.tensor(counts, dtype=torch.float64)).float()
    )
    weight = weight / weight.mean() if spec == "auto" else weight
    expected = F.cross_entropy(logits, labels, weight=weight)
    torch.testing.assert_close(loss_fn(logits, labels), expected, rtol=1e-5, atol=1e-6)


def test_class_weights_are_checked_with_clear_errors(train_script):
    parsed = train_script.parse_args(["--class_weights", "1, 2,0.5"])[2]
    assert parsed.class_weights == [1.0, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"class_weights\[1\] = '-2'"):
        LongTailLossConfig(class_weights="1,-2,3")
    with pytest.raises(ValueError, match="base 'cb'"):
        LongTailLossConfig(base="cb", class_weights="auto")
    with pytest.raises(ValueError, match="has 2 values but there are 3 classes"):
        build_loss(LongTailLossConfig(class_weights=[1, 2]), [5, 3, 1])
    config = LongTailLossConfig.from_dict(LongTailLossConfig(class_weights="AUTO").to_dict())
    assert config.class_weights == "auto"


def test_class_weights_from_a_yaml_list(train_script, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("class_weights: [1, 2, 3]\n")
    assert train_script.parse_args([str(config)])[2].class_weights == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------ evaluate optional
def test_everything_but_the_evaluate_metric_works_without_evaluate():
    code = """
import sys
sys.modules["evaluate"] = None  # as if it were not installed
import numpy as np
import hf_longtail, hf_longtail.metrics, hf_longtail.trainer, hf_longtail.hub
metrics = hf_longtail.metrics.make_compute_metrics([5, 3, 1])
from transformers import EvalPrediction
out = metrics(EvalPrediction(predictions=np.eye(3)[[0, 1, 2, 0]], label_ids=np.array([0, 1, 2, 1])))
assert abs(out["accuracy"] - 0.75) < 1e-9, out
try:
    hf_longtail.metrics.load_evaluate_metric()
except ImportError as err:
    assert "pip install evaluate" in str(err), err
    print("OK")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]


# ------------------------------------------------------------------ end of a run
def test_a_run_ends_its_trainer_and_counts_epochs(train_script, tmp_path, monkeypatch, caplog):
    from hf_longtail.trainer import LongTailTrainer

    ended = []
    if hasattr(LongTailTrainer, "end"):
        original = LongTailTrainer.end
        monkeypatch.setattr(
            LongTailTrainer, "end", lambda self: (ended.append(True), original(self))
        )
    argv = [*FAST, "--model_name_or_path", "resnet20_cifar", "--image_size", "16"]
    argv = [a for a in argv if a not in ("--max_steps", "2")]
    with caplog.at_level(logging.INFO, logger="hf_longtail.trainer"):
        train_script.main(
            [*argv, "--num_train_epochs", "2", "--per_device_train_batch_size", "128",
             "--output_dir", str(tmp_path / "run")]
        )  # fmt: skip
    assert ended == ([True] if hasattr(LongTailTrainer, "end") else [])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(" done")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


def test_head_resize_is_announced_once_but_other_load_problems_are_not_hidden(tmp_path):
    """A new head for the dataset's classes gets hf-longtail's one notice, not transformers'
    LOAD REPORT too; a checkpoint that also lacks a backbone tensor keeps the full report."""
    from _helpers_train import tiny_vit
    from safetensors.torch import load_file, save_file

    from hf_longtail.models import create_model

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    source = tmp_path / "vit"
    tiny_vit(num_labels=7).save_pretrained(source)
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    keep = Keep(level=logging.WARNING)
    transformers_logger.addHandler(keep)
    level = transformers_logger.level
    transformers_logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left
    try:
        create_model(str(source), num_labels=3)
        assert not any("LOAD REPORT" in r for r in records)
        weights = load_file(source / "model.safetensors")
        dropped = next(k for k in weights if "layernorm" in k)
        save_file({k: v for k, v in weights.items() if k != dropped},
                  source / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
        create_model(str(source), num_labels=3)
    finally:
        transformers_logger.removeHandler(keep)
        transformers_logger.setLevel(level)
    assert any("LOAD REPORT" in r and "MISSING" in r for r in records)
