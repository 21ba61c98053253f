"""scripts/train.py end to end (in-process ``main([...])``) and the ready configs.

Runs are tiny (a few optimizer steps of a CIFAR ResNet-20 or a one-layer ViT) but go through
everything the README main job does: data, model factory, LongTailTrainer, final evaluation,
``all_results.json``, ``longtail_run.json`` and the two plots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers_train import load_train_script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "scripts" / "configs").glob("*.yaml"))
TEST_METRICS = (
    "test_accuracy",
    "test_many_shot_accuracy",
    "test_medium_shot_accuracy",
    "test_few_shot_accuracy",
    "test_worst_class_accuracy",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_ece",
    "test_per_class_accuracy",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: CIFAR-10-LT, imbalance factor 100 (Cao et al. 2019): int(5000 * 0.01 ** (c / 9)).
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


pytestmark = pytest.mark.usefixtures("one_thread")


#: Flags that make any run tiny and quiet on CPU.
FAST = [
    "--max_steps", "3",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "128",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--logging_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
    "--dataloader_num_workers", "0",
]  # fmt: skip


def _digits_run(train_script, out: Path, *extra: str) -> dict:
    """The README main-job config, shrunk: ResNet-20 on 16x16 digits, 3 steps."""
    argv = [
        str(REPO / "scripts" / "configs" / "digits_ccar_car.yaml"),
        "--output_dir", str(out),
        "--model_name_or_path", "resnet20_cifar",
        "--image_size", "16",
        *FAST,
        *extra,
    ]  # fmt: skip
    return train_script.main(argv)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, train_script):
    """One shared digits run (module scope: several tests inspect the same output dir)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("digits") / "run"
    results = _digits_run(train_script, out)
    return out, results


def _check_results(results: dict, num_classes: int) -> None:
    for key in TEST_METRICS:
        assert key in results, key
    per_class = results["test_per_class_accuracy"]
    assert isinstance(per_class, list) and len(per_class) == num_classes
    present = [a for a in per_class if a is not None]
    assert results["test_balanced_accuracy"] == pytest.approx(float(np.mean(present)))
    assert results["test_worst_class_accuracy"] == pytest.approx(min(present))
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert 0.0 <= results["test_ece"] <= 1.0


# ------------------------------------------------------------------ (a) digits, output files
def test_digits_run_writes_the_documented_run_directory(digits_run):
    out, results = digits_run
    for name in ("config.json", "model.safetensors", "all_results.json", "longtail_run.json"):
        assert (out / name).is_file(), name
    for name in ("per_class_accuracy.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    saved = json.loads((out / "all_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    _check_results(saved, num_classes=10)
    assert saved["train_samples"] > 0 and "train_runtime" in saved

    run = json.loads((out / "longtail_run.json").read_text())
    assert {"hf_longtail_version", "model_name_or_path", "dataset", "loss", "training"} <= set(run)
    assert run["metric_thresholds"] == {"many": 60, "few": 20}  # from the digits config
    data = run["dataset"]
    assert data["name"] == "digits" and data["imbalance_factor"] == 10
    assert data["profile"] == "exp" and data["eval_split"] == "test"
    assert sum(data["class_counts"]) == data["train_size"]
    assert max(data["class_counts"]) / min(data["class_counts"]) == pytest.approx(10, rel=0.1)
    assert data["class_names"] == [str(d) for d in range(10)]
    assert run["loss"]["ccar"] is True and run["loss"]["car_weight"] == 0.5
    assert run["training"]["max_steps"] == 3 and run["training"]["world_size"] == 1
    assert run["training"]["pixel_cache"] == "auto"


def test_digits_run_accuracy_matches_the_saved_model(digits_run):
    """Independent check: reload the saved model, evaluate the test split, same accuracy."""
    from transformers import AutoModelForImageClassification

    import hf_longtail.models  # noqa: F401  (registers the CIFAR ResNets with the Auto classes)
    from hf_longtail.data import collate_fn, load_long_tailed, with_transforms
    from hf_longtail.data.transforms import CIFAR10_MEAN, CIFAR10_STD, cifar_transforms

    out, results = digits_run
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    test = load_long_tailed("digits", imbalance_factor=10)["test"]
    test = with_transforms(test, cifar_transforms(CIFAR10_MEAN, CIFAR10_STD, size=16)[1])
    batch = collate_fn([test[i] for i in range(len(test))])
    with torch.no_grad():
        predicted = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    accuracy = float((predicted == batch["labels"]).float().mean())
    assert results["test_accuracy"] == pytest.approx(accuracy, abs=1.5 / len(test))


def test_same_seed_gives_the_same_run(digits_run, train_script, tmp_path):
    """--seed covers the model initialisation too: a second run in the same process (the global
    RNG has moved on since the first) trains the very same weights."""
    from safetensors.torch import load_file

    out, results = digits_run
    again = _digits_run(train_script, tmp_path / "again")
    first = load_file(out / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for key in TEST_METRICS:
        assert again[key] == results[key], key


# ------------------------------------------------------------------ (e) output-dir safety
def test_output_dir_of_a_different_run_is_refused_unless_overwrite(
    digits_run, train_script, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(digits_run[0], out)
    before = (out / "all_results.json").read_bytes()
    flags = ["--overwrite_output_dir", "false", "--loss", "la"]
    with pytest.raises(FileExistsError, match="different run") as err:
        _digits_run(train_script, out, *flags)
    assert "--overwrite_output_dir" in str(err.value)
    assert (out / "all_results.json").read_bytes() == before  # untouched

    _digits_run(train_script, out, "--overwrite_output_dir", "true", "--loss", "la")
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["loss"]["base"] == "la"


# ------------------------------------------------------------------ (b) real CIFAR-10
@pytest.mark.cifar10
def test_real_cifar10_few_steps(cifar10_dir, train_script, tmp_path):
    out = tmp_path / "c10"
    argv = [
        "--dataset_name", str(cifar10_dir),
        "--imbalance_factor", "100",
        "--model_name_or_path", "resnet20_cifar",
        "--train_transform", "cifar10",
        "--loss", "ce", "--ccar", "true", "--car_weight", "0.5",
        "--max_eval_samples", "200",
        "--learning_rate", "0.05",
        "--output_dir", str(out),
        *FAST,
    ]  # fmt: skip
    results = train_script.main(argv)
    _check_results(results, num_classes=10)
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["dataset"]["class_counts"] == CIFAR10_LT_100
    assert run["dataset"]["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert run["dataset"]["image_column"] == "img" and run["dataset"]["label_column"] == "label"
    assert run["dataset"]["eval_size"] == 200
    assert results["test_num_samples"] == 200
    # CIFAR-10-LT shot groups (>100 / 20..100 / <20 images): 8 many, 2 medium, 0 few classes.
    groups = (results["test_num_many"], results["test_num_medium"], results["test_num_few"])
    assert groups == (8, 2, 0)
    assert results["test_few_shot_accuracy"] is None  # no few-shot class: reported as missing
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------ (c) local ViT, new head
def test_local_vit_checkpoint_gets_a_head_for_the_dataset(train_script, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    source = tmp_path / "vit-3"
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(source)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3)
    processor.save_pretrained(source)

    out = tmp_path / "run"
    argv = [
        "--dataset_name", "digits",
        "--imbalance_factor", "10",
        "--model_name_or_path", str(source),
        "--optim", "adamw_torch", "--learning_rate", "0.001",
        "--ccar", "true", "--car_weight", "0.5",
        "--output_dir", str(out),
        *FAST,
    ]  # fmt: skip
    results = train_script.main(argv)
    _check_results(results, num_classes=10)
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {str(i): str(i) for i in range(10)}
    assert (out / "preprocessor_config.json").is_file()
    model = ViTForImageClassification.from_pretrained(out)
    assert model.classifier.weight.shape == (10, 16)


# ------------------------------------------------------------------ (d) config files
def test_pixel_cache_option_is_checked_and_on_names_what_it_cannot_do(train_script, tmp_path):
    with pytest.raises(ValueError, match=r"--pixel_cache 'sometimes' is not valid"):
        _digits_run(train_script, tmp_path / "a", "--pixel_cache", "sometimes")
    assert not (tmp_path / "a").exists()  # refused before the output dir was touched
    with pytest.raises(ValueError, match=r"pixel_cache='on' cannot be used: .*RandAugment"):
        _digits_run(
            train_script, tmp_path / "b", "--pixel_cache", "on", "--auto_augment", "randaugment"
        )


def test_unknown_yaml_key_is_an_error_naming_it(train_script, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dataset_name: digits\nlearning_rat: 0.1\nccar: true\n")
    with pytest.raises(ValueError, match="learning_rat") as err:
        train_script.parse_args([str(config)])
    assert "learning_rate" in str(err.value)  # the suggestion


def test_flags_after_the_config_override_it(train_script):
    config = REPO / "scripts" / "configs" / "digits_ccar_car.yaml"
    values = yaml.safe_load(config.read_text())
    parsed = train_script.parse_args([str(config), "--car_weight", "0.25"])
    loss_args, training_args = parsed[2], parsed[4]
    assert loss_args.car_weight == 0.25 != values["car_weight"]  # the flag wins
    assert loss_args.ccar is values["ccar"] is True  # the file's value stays
    assert training_args.num_train_epochs == values["num_train_epochs"]


def test_the_loss_options_are_the_loss_config_itself(train_script, tmp_path):
    """One loss spec: every LongTailLossConfig field is an option (--loss / YAML `loss` alias
    base), choices come from the losses' own lists, and the config validates while parsing."""
    import dataclasses

    from hf_longtail.losses import LongTailLossConfig
    from hf_longtail.losses.car import CAR_SOLVERS

    assert not hasattr(train_script, "LossArguments")
    flags = ["--loss", "focal", "--weight_reduction", "mean", "--car_detach_gate", "false"]
    flags += ["--base_options", '{"gamma": 1.5}', "--car_solver", "subspace"]
    config = train_script.parse_args(flags)[2]
    assert isinstance(config, LongTailLossConfig)
    assert (config.base, config.weight_reduction, config.car_detach_gate) == (
        "focal",
        "mean",
        False,
    )
    assert config.base_options == {"gamma": 1.5} and config.car_solver == "subspace"
    assert train_script.parse_args(["--base", "la"])[2].base == "la"
    parser = train_script.HfArgumentParser(train_script.DATACLASSES)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(LongTailLossConfig):
        assert f.name in actions and f.metadata.get("help"), f.name
    assert tuple(actions["car_solver"].choices) == CAR_SOLVERS
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("loss: ldam\ndrw_epoch: 3\n")
    assert train_script.parse_args([str(yaml_file)])[2].base == "ldam"
    yaml_file.write_text("loss: ldam\nbase: ce\n")
    with pytest.raises(ValueError, match="sets both 'loss' and 'base'"):
        train_script.parse_args([str(yaml_file)])
    yaml_file.write_text("car_ema: per_clas\n")
    with pytest.raises(ValueError, match="did you mean 'per_class'"):
        train_script.parse_args([str(yaml_file)])
    with pytest.raises(ValueError, match=r"LongTailLossConfig.car_beta must be in \[0, 1\)"):
        train_script.parse_args(["--car_beta", "1.5"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_ready_config_parses_and_builds_its_loss(train_script, path):
    from hf_longtail.losses import LongTailLossConfig, build_loss

    # --use_cpu: a bf16 GPU recipe must still parse on a CPU-only machine.
    model_args, _, loss_config, _, training_args = train_script.parse_args(
        [str(path), "--use_cpu", "true"]
    )
    assert isinstance(loss_config, LongTailLossConfig)
    assert LongTailLossConfig.from_dict(loss_config.to_dict()) == loss_config
    build_loss(loss_config, [50, 20, 5])  # valid values, not only valid keys
    assert training_args.output_dir and model_args.model_name_or_path


@pytest.mark.parametrize("name", ["cifar10_lt_resnet32.yaml", "cifar100_lt_resnet32.yaml"])
def test_cifar_lt_configs_follow_the_ldam_drw_protocol(train_script, name):
    model_args, data_args, loss_args, run_args, args = train_script.parse_args(
        [str(REPO / "scripts" / "configs" / name)]
    )
    assert model_args.model_name_or_path == "resnet32_cifar"
    assert data_args.imbalance_factor == 100 and data_args.imbalance_profile == "exp"
    assert args.num_train_epochs == 200 and args.per_device_train_batch_size == 128
    assert args.learning_rate == 0.1 and args.weight_decay == 2e-4
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "sgd"
    assert "momentum=0.9" in args.optim_args
    assert args.warmup_steps * args.num_train_epochs == pytest.approx(5)  # 5 warm-up epochs
    # LDAM-DRW: lr x0.01 after epoch 160 and x0.0001 after epoch 180.
    assert run_args.lr_milestones == [160, 180] and run_args.lr_gamma == 0.01
    assert loss_args.ccar is True and loss_args.car_weight > 0
    if "cifar100" in name:
        assert data_args.dataset_name == "uoft-cs/cifar100"
        assert data_args.label_column_name == "fine_label"
        assert data_args.train_transform == "cifar100"
    else:
        assert data_args.dataset_name == "uoft-cs/cifar10"
        assert data_args.train_transform == "cifar10"


@pytest.mark.parametrize(
    "name", ["cifar10_lt_resnet32_ldam_drw.yaml", "cifar100_lt_resnet32_ldam_drw.yaml"]
)
def test_ldam_drw_configs_build_the_published_cosine_classifier(train_script, name):
    """LDAM-DRW (Cao et al. 2019): CE(s (cos - m_y e_y)) with s = 30 on a cosine classifier."""
    import torch.nn.functional as F

    from hf_longtail.losses import build_loss
    from hf_longtail.models import NormedLinear, create_model

    model_args, _, loss_config, run_args, args = train_script.parse_args(
        [str(REPO / "scripts" / "configs" / name)]
    )
    assert (loss_config.base, loss_config.ldam_max_m, loss_config.ldam_s) == ("ldam", 0.5, 30.0)
    assert loss_config.drw_epoch == 160 and loss_config.drw_beta == 0.9999
    assert loss_config.weight_reduction == "auto"  # weighted mean, as F.cross_entropy(weight=)
    assert not loss_config.ccar and loss_config.car_weight == 0
    assert run_args.lr_milestones == [160, 180] and run_args.lr_gamma == 0.01
    assert args.num_train_epochs == 200 and args.weight_decay == 2e-4
    assert model_args.model_name_or_path == "resnet32_cifar"
    assert model_args.classifier == "cosine" and model_args.cosine_scale == 1.0
    from hf_longtail.arguments import check_classifier

    check_classifier(model_args, loss_config)

    torch.manual_seed(0)
    model = create_model(
        model_args.model_name_or_path, num_labels=10, **train_script.classifier_kwargs(model_args)
    ).eval()
    assert isinstance(model.classifier, NormedLinear)
    assert model.config.normed_linear is True and model.config.logit_scale == 1.0
    assert not any(n.endswith("classifier.bias") for n, _ in model.named_parameters())
    with torch.no_grad():
        # Trained-looking weights: columns of different norms must not change the cosines.
        model.classifier.weight.mul_(torch.linspace(0.3, 3.0, 10))
        x = torch.randn(6, 3, 32, 32)
        logits = model(x).logits
        features = model.resnet(x).pooler_output
    w = model.classifier.weight.detach()
    cosines = torch.stack(
        [
            torch.stack([F.cosine_similarity(features[i], w[:, c], dim=0) for c in range(10)])
            for i in range(6)
        ]
    )
    torch.testing.assert_close(logits, cosines, rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1.0 + 1e-6
    # What the loss's softmax sees: s-scaled cosines with the true class's margin removed.
    counts = CIFAR10_LT_100
    loss_fn = build_loss(loss_config, counts)
    y = torch.arange(6)
    margins = 0.5 * (min(counts) / torch.tensor(counts, dtype=torch.float64)) ** 0.25
    expected = 30.0 * (cosines - F.one_hot(y, 10) * margins.float()[y][:, None])
    torch.testing.assert_close(
        loss_fn.base_loss.adjust_logits(logits, y), expected, rtol=1e-5, atol=1e-5
    )


def test_cosine_classifier_is_refused_for_a_model_that_cannot_save_it(train_script, tmp_path):
    out = tmp_path / "never"
    argv = ["--model_name_or_path", "google/vit-base-patch16-224", "--classifier", "cosine"]
    with pytest.raises(ValueError, match="CIFAR ResNets") as err:
        train_script.main([*argv, "--output_dir", str(out), *FAST])
    assert "--classifier linear" in str(err.value)
    with pytest.raises(ValueError, match="--classifier 'normed'"):
        train_script.main(["--classifier", "normed", "--output_dir", str(out), *FAST])
    assert not out.exists()  # refused before the output directory or the data


def test_ldam_run_saves_and_records_its_cosine_classifier(train_script, tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_longtail.models import NormedLinear

    out = tmp_path / "run"
    _digits_run(
        train_script, out, "--loss", "ldam", "--ccar", "false", "--car_weight", "0",
        "--drw_epoch", "0", "--classifier", "cosine", "--max_steps", "1",
    )  # fmt: skip
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["classifier"] == {"type": "cosine", "scale": 1.0}
    loaded = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(loaded.classifier, NormedLinear) and loaded.config.normed_linear is True


def test_label_smoothing_factor_is_recorded_as_the_loss_smoothing(train_script, tmp_path):
    out = tmp_path / "run"
    _digits_run(train_script, out, "--label_smoothing_factor", "0.1", "--max_steps", "1")
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["loss"]["base"] == "ce" and run["loss"]["label_smoothing"] == 0.1
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="base loss 'ldam' has no label smoothing"):
        _digits_run(train_script, refused, "--loss", "ldam", "--label_smoothing_factor", "0.1")
    assert not refused.exists()


def test_protocol_configs_name_their_split_files(train_script):
    for name, protocol, eval_split in (
        ("imagenet_lt_resnet50.yaml", "imagenet_lt", "test"),
        ("inat2018_resnet50.yaml", "inat2018", "validation"),
    ):
        model_args, data_args, *_ = train_script.parse_args(
            [str(REPO / "scripts" / "configs" / name), "--use_cpu", "true"]
        )  # fmt: skip
        assert data_args.dataset_name == protocol and data_args.eval_split == eval_split
        assert data_args.data_dir and data_args.split_dir
        assert data_args.imbalance_factor is None  # the split files define the long tail
        assert model_args.pretrained is False  # protocols train from scratch
