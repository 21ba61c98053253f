"""Every snippet of README.md runs: the Python blocks are executed (the main example and the
probe / second stage continuing it to the end as written, offline, in a fresh process here; their
API in tests/test_run_directory.py; the LoRA loader in tests/test_lora.py), and every shell
command of the project is parsed by the real argument parser of the program it calls, so a
renamed or removed option in the README fails here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from _readme import REPO, code_blocks, python_block, shell_commands


class _Parsed(Exception):
    """Raised right after a script's parser accepted its arguments: nothing else runs."""


def _parse_with_main(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as parsed:
        main(argv)
    return parsed.value.args[0]


def _script_main(path: str):
    spec = importlib.util.spec_from_file_location(f"readme_{abs(hash(path))}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _project_commands() -> list[list[str]]:
    """The README's commands that call this project's programs (not pip, venv, ruff, pytest)."""
    picked = []
    for argv in shell_commands():
        if argv[:2] == ["accelerate", "launch"]:
            script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
            argv = ["python", *argv[script:]]
        if argv and argv[0] in ("python", "python3") and len(argv) > 1:
            if argv[1].startswith("scripts/") or argv[1:3] in (
                ["-m", "hf_longtail.hub"],
                ["-m", "hf_longtail.models.convert"],
            ):
                picked.append(argv)
    return picked


def test_readme_has_project_commands():
    commands = _project_commands()
    assert len(commands) >= 10
    assert ["python", "scripts/train.py", "scripts/configs/digits_ccar_car.yaml"] in commands


@pytest.mark.parametrize("argv", _project_commands(), ids=lambda argv: " ".join(argv[1:4])[:60])
def test_readme_command_parses(argv, monkeypatch):
    monkeypatch.chdir(REPO)
    # The GPU commands (--bf16, GPU configs) are parsed as on a machine with a bf16 GPU.
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    if argv[1] == "scripts/train.py":
        from hf_longtail.arguments import parse_args

        training_args = parse_args(argv[2:])[-1]
        assert training_args.output_dir
    elif argv[1:3] == ["-m", "hf_longtail.hub"]:
        from hf_longtail.hub.cli import build_parser

        assert build_parser().parse_args(argv[3:]).command in ("push", "card")
    elif argv[1:3] == ["-m", "hf_longtail.models.convert"]:
        from hf_longtail.models.convert import main

        _parse_with_main(main, argv[3:], monkeypatch)
    else:
        _parse_with_main(_script_main(argv[1]), argv[2:], monkeypatch)


def test_readme_loss_snippet_runs():
    """The 'plain PyTorch' loss block, as written: a finite float32 loss with a gradient."""
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(python_block("loss_fn = build_loss("), "README.md", "exec"), namespace)
    loss, logits = namespace["loss"], namespace["logits"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert {"base_loss", "car_sigma"} <= set(namespace["loss_fn"].last_stats)


@pytest.mark.slow
def test_python_example_and_second_stage_run_to_the_end_offline(tmp_path):
    """The main example, then the probe / second-stage block continuing it, exactly as written,
    in a fresh process in an empty directory, offline and not logged in (a new user's first
    try): both end without a traceback (the example used to end in one at
    ``trainer.push_to_hub()``), and the probe's run directory holds the model it evaluated
    (the block used to evaluate a probe it never saved), which predicts what it reported."""
    from transformers import AutoModelForImageClassification

    from hf_longtail.data import load_long_tailed, select_transforms, with_transforms

    code = python_block("trainer = LongTailTrainer(") + python_block("probe = LongTailTrainer(")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),  # no token file: not logged in
        HF_LONGTAIL_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path),
    )  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = work / "outputs"
    for run in ("digits-lt", "digits-probe", "digits-lt-tau"):
        assert (outputs / run / "model.safetensors").is_file(), run
        assert (outputs / run / "all_results.json").is_file(), run
    probe_dir = outputs / "digits-probe"
    reported = json.loads((probe_dir / "all_results.json").read_text())["test_accuracy"]
    # The saved probe, on the example's evaluation images and transform (CIFAR protocol, 16 px).
    _, _, eval_tf = select_transforms("auto", None, image_size=16)
    test = with_transforms(load_long_tailed("digits", imbalance_factor=10)["test"], eval_tf)
    rows = list(test)
    pixels = torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    model = AutoModelForImageClassification.from_pretrained(probe_dir).eval()
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    assert (predicted == labels).double().mean().item() == pytest.approx(reported, abs=1e-9)


def test_every_python_block_is_executed_by_a_test():
    """Each README python block is one of those the tests run (here, the main example in
    test_run_directory, the probe/second stage continuing it, the LoRA loader in test_lora)."""
    markers = ("trainer = LongTailTrainer(", "loss_fn = build_loss(", "probe = LongTailTrainer(",
               "PeftModel.from_pretrained(base")  # fmt: skip
    for block in code_blocks("python"):
        assert sum(marker in block for marker in markers) == 1, block[:200]


def test_readme_main_job_numbers_are_those_of_the_recorded_run():
    """README's main-job sentence and second-stage table are exactly what
    scripts/readme_numbers.py generates from its committed run record (versions included)."""
    import json

    monkey = pytest.MonkeyPatch()
    monkey.syspath_prepend(str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("readme_numbers", REPO / "scripts" /
                                                      "readme_numbers.py")  # fmt: skip
        numbers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(numbers)
    finally:
        monkey.undo()
    payload = json.loads(numbers.RESULT.read_text())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for key, block in (("main", numbers.main_block(payload)),
                       ("stages", numbers.stages_block(payload))):  # fmt: skip
        start, end = numbers.MARKERS[key]
        inside = readme.split(start, 1)[1].split(end, 1)[0]
        assert block in inside, key
    assert payload["machine"]["hf_longtail"] in readme
    assert 0.0 < payload["main"]["test_accuracy"] <= 1.0
