"""LoRA (peft) through scripts/train.py: adapters + head trained, adapter-aware run directory and
card, reload reproduces the evaluation, --lora_merge saves a plain model, resume, targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_train import load_train_script
from _readme import python_block

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory) -> Path:
    """A tiny pretrained-style ViT checkpoint (3 classes, so its head is replaced)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    source = tmp_path_factory.mktemp("vit") / "vit-3"
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(source)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3).save_pretrained(
        source
    )
    return source


def _argv(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset_name", "digits", "--imbalance_factor", "10",
        "--model_name_or_path", str(source), "--lora_r", "4", "--lora_alpha", "8",
        "--optim", "adamw_torch", "--learning_rate", "0.01", "--ccar", "true",
        "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "128", "--max_eval_samples", "128",
        "--save_strategy", "no", "--eval_strategy", "no", "--logging_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]  # fmt: skip


def _eval_accuracy(model, out: Path) -> float:
    """Accuracy of ``model`` on the run's evaluation images, preprocessed as the run did."""
    from hf_longtail.data import load_long_tailed, select_transforms, with_transforms
    from hf_longtail.models import create_image_processor

    ds = load_long_tailed("digits", imbalance_factor=10)["test"]
    ds = ds.shuffle(seed=0).select(range(128)).flatten_indices()
    processor = create_image_processor(str(out))
    _, _, eval_tf = select_transforms("auto", processor)
    ds = with_transforms(ds, eval_tf, "image", "label")
    pixels = torch.stack([torch.as_tensor(row["pixel_values"]) for row in ds])
    labels = np.array([row["labels"] for row in ds])
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    return float((logits.argmax(-1).numpy() == labels).mean()), logits


@pytest.fixture(scope="module")
def adapter_run(train_script, vit_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    results = train_script.main(_argv(vit_source, out))
    return out, results


def test_lora_run_saves_an_adapter_and_an_adapter_aware_card(adapter_run, vit_source):
    out, results = adapter_run
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # no full copy of the base weights
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(vit_source.resolve())
    assert adapter["modules_to_save"] == ["classifier"]
    # transformers 5 ViT names (peft's old example's query/value match nothing there).
    assert set(adapter["target_modules"]) == {
        f"vit.layers.0.{m}" for m in ("attention.q_proj", "attention.k_proj",
                                       "attention.v_proj", "attention.o_proj", "mlp.fc1",
                                       "mlp.fc2")
    }  # fmt: skip
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "auto"}
    assert run["base_model"] == str(vit_source.resolve()) and run["lora_saved_as"] == "adapter"
    # Only adapters (A: r x in, B: out x r per target) and the 10-class head are trainable.
    lora = sum(4 * (i + o) for i, o in [(16, 16)] * 4 + [(16, 32), (32, 16)])
    assert run["trainable_parameters"] == lora + 10 * 16 + 10
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card
    assert "PeftModel.from_pretrained" in card
    assert 0.0 <= results["test_accuracy"] <= 1.0


def test_lora_card_names_a_hub_base_model(adapter_run, tmp_path):
    from hf_longtail.hub import build_model_card

    out, _ = adapter_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    run = json.loads((copy / "longtail_run.json").read_text())
    run["base_model"] = "google/vit-base-patch16-224-in21k"
    (copy / "longtail_run.json").write_text(json.dumps(run))
    card = build_model_card(copy)
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert card.data.library_name == "peft"
    assert '"google/vit-base-patch16-224-in21k", config=config' in card.content


def test_saved_adapter_reloads_and_reproduces_the_evaluation(adapter_run):
    from hf_longtail.models.lora import load_lora_model

    out, results = adapter_run
    model = load_lora_model(out)
    assert isinstance(model, peft.PeftModel)
    accuracy, _ = _eval_accuracy(model, out)
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    # The card's snippet, as a user would run it (base from the adapter's own record).
    from transformers import AutoConfig, AutoModelForImageClassification

    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForImageClassification.from_pretrained(
        base_path, config=AutoConfig.from_pretrained(out), ignore_mismatched_sizes=True
    )
    again = peft.PeftModel.from_pretrained(base, str(out))
    assert _eval_accuracy(again, out)[0] == pytest.approx(accuracy)


def test_only_adapters_and_head_train(vit_source):
    from hf_longtail.models import create_model
    from hf_longtail.models.lora import LoraOptions, apply_lora

    model = create_model(str(vit_source), num_labels=10)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = apply_lora(model, LoraOptions(r=2))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable)
    # A step moves nothing else.
    optim = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0)
    lora(pixel_values=torch.randn(4, 3, 16, 16)).logits.sum().backward()
    optim.step()
    for name, param in lora.get_base_model().named_parameters():
        if "lora_" in name or "classifier" in name:
            continue
        torch.testing.assert_close(param, frozen[name.replace(".base_layer", "")], msg=name)


def test_lora_merge_saves_a_plain_model_with_the_same_predictions(
    train_script, vit_source, adapter_run, tmp_path
):
    from transformers import AutoModelForImageClassification

    from hf_longtail.models.lora import load_lora_model

    out = tmp_path / "merged"
    results = train_script.main(_argv(vit_source, out, "--lora_merge", "true"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForImageClassification.from_pretrained(out)
    assert not isinstance(merged, peft.PeftModel)
    merged_accuracy, merged_logits = _eval_accuracy(merged, out)
    assert merged_accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    # Same seed and recipe as the adapter run: the merged model predicts what the adapter does.
    _, adapter_logits = _eval_accuracy(load_lora_model(adapter_run[0]), adapter_run[0])
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "- lora" in card
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["lora_saved_as"] == "merged"


def test_lora_run_resumes_from_its_checkpoint(train_script, vit_source, tmp_path):
    """A LoRA run stopped after its first checkpoint resumes to the uninterrupted result."""
    from safetensors.torch import load_file

    every = ["--save_strategy", "steps", "--save_steps", "3", "--full_determinism", "true"]
    reference = tmp_path / "reference"
    train_script.main(_argv(vit_source, reference, *every))
    assert (reference / "checkpoint-3" / "adapter_model.safetensors").is_file()
    # What a kill between step 3 and 6 leaves: the run record and checkpoint-3.
    out = tmp_path / "interrupted"
    out.mkdir()
    record = json.loads((reference / "longtail_run.json").read_text())
    del record["finished"]  # written after the final files: a kill at step 4 leaves none
    (out / "longtail_run.json").write_text(json.dumps(record))
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    train_script.main(_argv(vit_source, out, *every))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    resumes = json.loads((out / "longtail_run.json").read_text())["resumes"]
    assert [r["checkpoint"] for r in resumes] == ["checkpoint-3"]
    # Equal final adapters and head: the resume loaded the adapter state (a fresh adapter at
    # step 3 would end elsewhere).
    got, want = (
        load_file(out / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    # Another rank is another recipe: refused, naming the field.
    with pytest.raises(FileExistsError, match=r"lora\.r: 4 -> 8"):
        train_script.main(_argv(vit_source, out, *every, "--lora_r", "8"))


def test_targets_per_architecture_and_clear_errors():
    from hf_longtail.models import create_model
    from hf_longtail.models.lora import resolve_target_modules

    resnet = create_model("resnet20_cifar", num_labels=5)
    convs = resolve_target_modules(resnet, "auto")
    assert convs and all(isinstance(resnet.get_submodule(n), torch.nn.Conv2d) for n in convs)
    assert "classifier" not in convs
    with pytest.raises(ValueError, match=r"selects no layer.*'all-conv'"):
        resolve_target_modules(resnet, "all-linear")  # the head is its only linear layer
    with pytest.raises(ValueError, match="selects no layer"):
        resolve_target_modules(resnet, "query,value")
    lite0 = create_model("timm:tf_efficientnet_lite0", num_labels=5, pretrained=False)
    targets = resolve_target_modules(lite0, "auto")
    assert targets and "timm_model.classifier" not in targets
    assert all(lite0.get_submodule(n).groups == 1 for n in targets)  # no depthwise conv


def test_bad_lora_options_are_refused_before_work(train_script, tmp_path):
    out = tmp_path / "run"
    for flags, match in (
        (["--lora_r", "0"], "--lora_r must be an integer >= 1"),
        (["--lora_r", "4", "--lora_dropout", "1.5"], "--lora_dropout"),
        (["--lora_merge", "true"], "--lora_merge needs --lora_r"),
        (["--lora_r", "4", "--freeze_backbone", "true"], "--freeze_backbone"),
    ):
        with pytest.raises(ValueError, match=match):
            train_script.main(["--output_dir", str(out), *flags])
    assert not out.exists()


def test_second_stage_refuses_an_adapter_run(train_script, adapter_run, tmp_path):
    out, _ = adapter_run
    with pytest.raises(ValueError, match=r"holds a LoRA adapter.*--lora_merge true"):
        train_script.main(
            ["--stage", "crt", "--from_run", str(out), "--output_dir", str(tmp_path / "s")]
        )


def test_posthoc_tau_is_in_the_saved_adapter(train_script, vit_source, tmp_path):
    """A tau folded into the head of an adapter run is saved with the head (modules_to_save):
    the reloaded adapter predicts what the run reported, and the head differs from tau 0."""
    from hf_longtail.models.lora import load_lora_model

    out = tmp_path / "tau"
    results = train_script.main(_argv(vit_source, out, "--posthoc_tau", "2.0"))
    assert json.loads((out / "longtail_run.json").read_text())["posthoc"]["tau"] == 2.0
    accuracy, logits = _eval_accuracy(load_lora_model(out), out)
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-9)
    plain = tmp_path / "plain"
    train_script.main(_argv(vit_source, plain))
    _, plain_logits = _eval_accuracy(load_lora_model(plain), plain)
    # Same seed and data: the logits differ by -2 log prior, a per-class constant.
    shift = (logits - plain_logits).mean(0)
    assert torch.allclose(logits - plain_logits, shift.expand_as(logits), atol=1e-4)
    assert shift.std() > 0.1


def test_readme_lora_loading_snippet(adapter_run, vit_source):
    """README's peft loading block as written, with its Hub base model and output directory
    replaced by this run's local ones: it reproduces the run's accuracy."""
    out, results = adapter_run
    code = python_block("PeftModel.from_pretrained(base")
    code = code.replace('"google/vit-base-patch16-224-in21k"', repr(str(vit_source)))
    code = code.replace('"outputs/vit-c100lt-lora"', repr(str(out)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert _eval_accuracy(namespace["model"], out)[0] == pytest.approx(results["test_accuracy"])
