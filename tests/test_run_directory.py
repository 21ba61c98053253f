"""The library owns the run directory: the README's Python example, run as written, produces the
directory scripts/train.py produces, publishes the long-tail card, and the saved model works
with transformers' pipeline / AutoImageProcessor in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from _readme import python_block

REPO = Path(__file__).resolve().parents[1]


def _readme_python_example() -> str:
    """README.md's main Python example (the block that builds the ``LongTailTrainer``)."""
    return python_block("trainer = LongTailTrainer(")


class FakeHfApi:
    """Records what a push would publish: the repo, the uploaded names and the card text."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append({"create_repo": repo_id})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, *, repo_id, operations, **kwargs):
        sources = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        FakeHfApi.calls.append(
            {
                "upload": repo_id,
                "names": sorted(sources),
                "card": sources["README.md"].read_text(encoding="utf-8"),
            }
        )
        return "commit"


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Execute the README's Python example as written (offline: bundled digits, local model),
    with the Hub client mocked in case the machine is logged in and online; returns the output
    directory and the recorded Hub calls (none offline)."""
    import huggingface_hub

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("readme")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    mp.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    namespace: dict = {"__name__": "readme_example"}
    try:
        exec(compile(_readme_python_example(), "README.md", "exec"), namespace)
    finally:
        mp.undo()
    namespace["__workdir__"] = work
    return work / "outputs" / "digits-lt", list(FakeHfApi.calls), namespace["trainer"], namespace


def _top_level_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file()}


def test_readme_example_writes_the_full_run_directory(readme_run, tmp_path):
    """Same file set as a scripts/train.py run, and the records the hub reads."""
    from hf_longtail.hub import read_run_dir
    from hf_longtail.losses import LongTailLoss

    out, _, trainer, _ = readme_run
    files = _top_level_files(out)
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "longtail_loss.json",
        "longtail_loss.safetensors",
        "all_results.json",
        "longtail_run.json",
        "per_class_accuracy.png",
        "confusion_matrix.png",
        "README.md",
    ):
        assert name in files, name

    sys.path.insert(0, str(REPO / "tests"))
    from _helpers_train import load_train_script
    from test_train_script import _digits_run

    script_out = tmp_path / "script"
    _digits_run(load_train_script(), script_out)
    ignored = {"trainer_state.json"}  # save_state: the script's bookkeeping of the training loop
    assert files == _top_level_files(script_out) - ignored

    run = read_run_dir(out)
    record = json.loads((out / "longtail_run.json").read_text())
    script_record = json.loads((script_out / "longtail_run.json").read_text())
    assert set(record) <= set(script_record) | {"resumes"}
    assert set(record["dataset"]) >= {"name", "imbalance_factor", "profile", "seed"}
    assert record["dataset"]["name"] == "digits" and record["dataset"]["imbalance_factor"] == 10
    assert record["loss"] == trainer.loss_config.to_dict()
    assert run.class_counts == trainer.class_counts and sum(run.class_counts) == len(
        trainer.train_dataset
    )
    results = json.loads((out / "all_results.json").read_text())
    script_results = json.loads((script_out / "all_results.json").read_text())
    tested = {k for k in results if k.startswith("test_")}
    assert tested == {k for k in script_results if k.startswith("test_")} and len(tested) > 10
    assert {"train_runtime", "train_loss", "peak_rss_mb"} <= set(results) & set(script_results)
    assert 0 <= results["test_accuracy"] <= 1 and results["train_samples"] == sum(run.class_counts)
    loss = LongTailLoss.from_pretrained(out)
    assert loss.config == trainer.loss_config and loss.class_names == run.class_names


def test_push_to_hub_publishes_the_long_tail_card(readme_run, monkeypatch):
    """The example's push, logged in and online (mocked Hub; offline, as in readme_run, it is
    skipped): the long-tail card with its model-index, the model, its processor, the results
    and plots; never checkpoints or training_args.bin."""
    import huggingface_hub
    from huggingface_hub import ModelCard, constants

    from hf_longtail.hub import card_metrics

    out, offline_calls, _, namespace = readme_run
    assert offline_calls == []  # offline and not logged in: the example did not try to push
    example = _readme_python_example()
    push = example[example.index("if get_token()") :]
    monkeypatch.chdir(namespace["__workdir__"])
    monkeypatch.setenv("HF_TOKEN", "hf_readme_test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    exec(compile(push, "README.md", "exec"), namespace)
    calls = FakeHfApi.calls
    assert calls[0] == {"create_repo": "your-username/digits-lt"}
    upload = calls[1]
    assert upload["upload"] == "your-username/digits-lt"
    assert {"README.md", "model.safetensors", "preprocessor_config.json"} <= set(upload["names"])
    assert {"all_results.json", "longtail_run.json", "per_class_accuracy.png"} <= set(
        upload["names"]
    )
    assert "training_args.bin" not in upload["names"]
    card = ModelCard(upload["card"])
    metrics = card_metrics(card)
    results = json.loads((out / "all_results.json").read_text())
    assert {"accuracy", "few_shot_accuracy", "worst_class_accuracy"} <= set(metrics)
    assert metrics["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert "CCAR" in upload["card"] and "imbalance factor 10" in upload["card"]


def test_create_model_card_is_the_long_tail_card(readme_run, monkeypatch):
    from huggingface_hub import ModelCard

    from hf_longtail.hub import card_metrics

    out, _, trainer, _ = readme_run
    monkeypatch.chdir(out.parent.parent)  # the README's output_dir is relative
    (out / "README.md").unlink()
    trainer.create_model_card(license="mit")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card_metrics(card)


def test_saved_run_works_with_pipeline_in_a_fresh_process(readme_run):
    """`import hf_longtail` then pipeline / AutoImageProcessor on the output directory: the
    pipeline's probabilities are the model's on the run's own evaluation transform."""
    out, _, _, _ = readme_run
    code = textwrap.dedent(
        f"""
        import torch
        import hf_longtail
        from transformers import AutoImageProcessor, pipeline
        from hf_longtail.data import load_long_tailed, select_transforms

        out = {str(out)!r}
        processor = AutoImageProcessor.from_pretrained(out)
        classify = pipeline("image-classification", model=out, device="cpu")
        ds = load_long_tailed("digits", imbalance_factor=10)["test"]
        image = ds[0]["image"]
        top = classify(image, top_k=3)
        _, _, eval_tf = select_transforms("cifar", None, image_size=16)
        with torch.no_grad():
            probs = classify.model(pixel_values=eval_tf(image)[None]).logits.softmax(-1)[0]
        names = classify.model.config.id2label
        best = int(probs.argmax())
        assert top[0]["label"] == names[best], (top, names[best])
        assert abs(top[0]["score"] - float(probs[best])) < 1e-3, (top, float(probs[best]))
        assert type(processor).__name__ == "ViTImageProcessor"
        print("OK", top[0])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr[-3000:]


def test_import_hf_longtail_stays_light_and_registers_on_use():
    code = (
        "import sys, hf_longtail, hf_longtail.losses\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig\n"
        "from hf_longtail.models import ResNetCifarConfig\n"
        "assert isinstance(AutoConfig.for_model('resnet_cifar'), ResNetCifarConfig)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_readme_probe_and_second_stage_continue_the_example(readme_run, monkeypatch):
    """The README's frozen-backbone block, run as written after the main example (it freezes
    the example's model, so this test comes last): a linear probe on cached features writes its
    run directory, and the tau-norm second stage on the example's run writes another."""
    namespace = readme_run[3]
    monkeypatch.chdir(namespace["__workdir__"])
    every = {n for n, _ in namespace["model"].named_parameters()}
    exec(compile(python_block("probe = LongTailTrainer("), "README.md", "exec"), namespace)
    trainable = {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert trainable and trainable < every  # only the head trained
    work = namespace["__workdir__"] / "outputs"
    probe = json.loads((work / "digits-probe" / "all_results.json").read_text())
    assert 0.0 <= probe["test_accuracy"] <= 1.0
    assert (work / "digits-probe" / "model.safetensors").is_file()  # it saved what it evaluated
    stage = json.loads((work / "digits-lt-tau" / "longtail_run.json").read_text())
    assert stage["stage"]["name"] == "tau_norm"
    assert (work / "digits-lt-tau" / "model.safetensors").is_file()
