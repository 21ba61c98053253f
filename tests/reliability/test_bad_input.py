"""Bad input fails early with a message naming the culprit and the fix (issue 7, "Bad input").

Each test builds the bad input for real (a parquet file, a split file, a YAML file, a saved
model) and goes through the public entry point a user would call; errors must appear before any
training step (for the script: before the output directory is even created).
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _reliability_helpers import (
    COUNTS,
    image_dataset,
    load_train_module,
    tiny_vit,
    train_dataset,
    training_args,
)
from datasets import ClassLabel, Features, Image, Value
from PIL import Image as PILImage

from hf_longtail.data import (
    SplitFileError,
    load_long_tailed,
    load_split_file,
    make_long_tailed,
    validate_imbalance_factor,
)
from hf_longtail.losses import (
    CCARLoss,
    ConfusionSpectralRegularizer,
    LongTailLossConfig,
    build_loss,
    ccar_weight,
    list_base_losses,
)
from hf_longtail.models import create_model, list_models


@pytest.fixture(scope="module")
def train_module():
    return load_train_module()


def _png_bytes(value: int = 128) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path, features: Features, columns: dict) -> str:
    """A parquet file carrying ``features`` in its Hugging Face schema metadata, written with
    pyarrow so that the *values* are not validated (as a hand-made or corrupted file)."""
    table = pa.table(columns, schema=features.arrow_schema)
    pq.write_table(table, path)
    return str(path)


def _images(n: int) -> list[dict]:
    return [{"bytes": _png_bytes(10 * i), "path": None} for i in range(n)]


# ----------------------------------------------------------------------------- columns
def test_no_image_column_lists_columns_and_names_the_override(tmp_path):
    features = Features({"pixels": Value("string"), "label": ClassLabel(num_classes=2)})
    path = _write_parquet(tmp_path / "d.parquet", features, {"pixels": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no column has a datasets\.Image feature") as err:
        load_long_tailed(path, imbalance_factor=None)
    assert "'pixels' (Value)" in str(err.value) and "image_column=" in str(err.value)


def test_no_label_column_lists_candidates_and_names_the_override(tmp_path):
    features = Features({"image": Image(), "score": Value("float32")})
    path = _write_parquet(
        tmp_path / "d.parquet", features, {"image": _images(2), "score": [0.1, 0.2]}
    )
    with pytest.raises(ValueError, match="no label column found") as err:
        load_long_tailed(path, imbalance_factor=None)
    assert "label_column=" in str(err.value)


def test_two_label_candidates_are_named(tmp_path):
    features = Features(
        {
            "image": Image(),
            "fine_label": ClassLabel(num_classes=4),
            "coarse_label": ClassLabel(num_classes=2),
        }
    )
    columns = {"image": _images(4), "fine_label": [0, 1, 2, 3], "coarse_label": [0, 0, 1, 1]}
    path = _write_parquet(tmp_path / "d.parquet", features, columns)
    with pytest.raises(ValueError, match="ambiguous label column") as err:
        load_long_tailed(path, imbalance_factor=None)
    assert "fine_label" in str(err.value) and "coarse_label" in str(err.value)
    # The fix the message names works.
    ds = load_long_tailed(path, imbalance_factor=None, label_column="fine_label", test_size=0.5)
    assert ds["train"].features["fine_label"].num_classes == 4


# ------------------------------------------------------------------------------ labels
def test_negative_label_names_split_row_and_value(tmp_path):
    labels = [0, 1, 2, 0, 1, -1, 2, 0]
    features = Features({"image": Image(), "label": Value("int64")})
    path = _write_parquet(tmp_path / "d.parquet", features, {"image": _images(8), "label": labels})
    with pytest.raises(ValueError, match=r"negative label -1 at row 5") as err:
        load_long_tailed(path, imbalance_factor=2)
    assert "'train'" in str(err.value) and "drop those rows" in str(err.value)


def test_label_beyond_its_class_label_names_row_and_class_count(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    columns = {"image": _images(6), "label": [0, 1, 2, 5, 1, 0]}
    path = _write_parquet(tmp_path / "d.parquet", features, columns)
    with pytest.raises(ValueError, match=r"label 5 at row 3, out of range .* 3 classes"):
        load_long_tailed(path, imbalance_factor=None)


def test_trainer_refuses_class_counts_that_do_not_cover_the_labels(tmp_path):
    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn

    # The dataset has 6 classes (labels 0..5) but class_counts only 4 entries.
    with pytest.raises(ValueError, match=r"label [45] at row \d+ .* class_counts has 4 entries"):
        LongTailTrainer(
            model=tiny_vit(4),
            args=training_args(tmp_path),
            train_dataset=train_dataset(),
            data_collator=collate_fn,
            class_counts=[40, 24, 14, 8],
        )


# ------------------------------------------------------------------ pretrained num_labels
def test_pretrained_head_of_another_size_is_resized_with_a_warning(tmp_path, caplog):
    saved = create_model("resnet20_cifar", num_labels=5)
    saved.save_pretrained(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="hf_longtail.models.factory"):
        model = create_model(str(tmp_path / "ckpt"), num_labels=10, id2label=list("abcdefghij"))
    assert re.search(r"head has 5 outputs but the dataset has 10 classes.*5 -> 10", caplog.text)
    assert model.config.num_labels == 10 and model.config.id2label[9] == "j"
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10)
    # The backbone is the pretrained one; only the head was re-initialised.
    old, new = saved.state_dict(), model.state_dict()
    backbone = [k for k in old if old[k].shape == new[k].shape and not k.startswith("classifier")]
    assert len(backbone) > 10
    for key in backbone:
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=0, msg=key)


def test_trainer_refuses_a_model_whose_head_disagrees_with_the_data(tmp_path):
    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn

    with pytest.raises(ValueError, match="model has 5 output labels but the training data has 6"):
        LongTailTrainer(
            model=tiny_vit(5),
            args=training_args(tmp_path),
            train_dataset=train_dataset(),
            data_collator=collate_fn,
        )


# ------------------------------------------------------------------- imbalance factor
@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (0.01, ValueError, r"must be >= 1.*imbalance_factor=100 instead"),
        (0.0, ValueError, r"must be >= 1"),
        (-5, ValueError, r"must be >= 1"),
        (math.nan, ValueError, r"finite"),
        (math.inf, ValueError, r"finite"),
        ("100", TypeError, r"must be a number >= 1.*got '100' of type str"),
        (True, TypeError, r"must be a number"),
        ([100], TypeError, r"must be a number"),
    ],
    ids=["0.01", "zero", "negative", "nan", "inf", "string", "bool", "list"],
)
def test_imbalance_factor_below_one_or_not_a_number(value, error, pattern):
    with pytest.raises(error, match=pattern):
        validate_imbalance_factor(value)
    with pytest.raises(error, match=pattern):
        load_long_tailed("digits", imbalance_factor=value)


def test_script_rejects_bad_imbalance_factor_before_touching_the_output_dir(
    train_module, tmp_path, capsys
):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"imbalance_factor=100 instead"):
        train_module.main(["--imbalance_factor", "0.01", "--output_dir", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit):
        train_module.main(["--imbalance_factor", "abc", "--output_dir", str(out)])
    assert re.search(r"--imbalance_factor\S*: invalid float value: 'abc'", capsys.readouterr().err)
    assert not out.exists()


def test_imbalance_factor_that_leaves_a_class_empty_names_it_and_the_limit():
    # digits: the largest training class has 128 images, so IF > 128 gives the tail 0 images;
    # the first empty class of the exp profile n_i = int(128 * IF ** (-i / 9)):
    first = next(i for i in range(10) if int(128 * (1 / 1000) ** (i / 9)) == 0)
    with pytest.raises(ValueError, match=rf"class index {first} zero images") as err:
        load_long_tailed("digits", imbalance_factor=1000)
    message = str(err.value)
    assert "imbalance_factor <= 128" in message and f"is '{first}'" in message
    counts = load_long_tailed("digits", imbalance_factor=128)["train"]
    from hf_longtail.data import class_counts

    assert min(class_counts(counts)) == 1


def test_the_hinted_imbalance_factor_trains(train_module, tmp_path):
    """The hint must be a value that works: with 49 images in the largest class, IF = 49 gives
    the tail int(49 * (1 / 49)) = int(0.999...) = 0 images. A real dataset on disk, a real
    ``scripts/train.py`` run with the hinted value."""
    from datasets import DatasetDict

    source = tmp_path / "data"
    DatasetDict(
        {"train": image_dataset((49, 30, 20, 10), seed=1), "test": image_dataset((5, 5, 5, 5))}
    ).save_to_disk(source)
    out = tmp_path / "run"
    argv = [
        "--dataset_name", str(source), "--model_name_or_path", "resnet20_cifar",
        "--train_transform", "cifar10", "--image_size", "8", "--max_steps", "1",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--output_dir", str(out),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="zero images") as err:
        train_module.main([*argv, "--imbalance_factor", "1000"])
    hint = re.search(r"imbalance_factor <= ([0-9.]+) ", str(err.value)).group(1)
    assert float(hint) < 49  # 49 itself empties the tail class
    train_module.main([*argv, "--imbalance_factor", hint])
    import json

    counts = json.loads((out / "longtail_run.json").read_text())["dataset"]["class_counts"]
    assert counts[0] == 49 and counts[-1] == 1


def test_source_class_without_images_is_named():
    ds = image_dataset((5, 4, 3), names=["a", "b", "c"])
    ds = ds.filter(lambda y: y != 1, input_columns="label")  # class 'b' now has no image
    with pytest.raises(ValueError, match=r"class 1 \('b'\) has no image in the source split"):
        make_long_tailed(ds, imbalance_factor=2)


# ------------------------------------------------------------------ f_c = 0 in the losses
@pytest.mark.parametrize("base", list_base_losses())
def test_zero_count_class_warns_and_every_loss_stays_finite(base):
    counts = [50, 10, 0, 5]
    config = LongTailLossConfig(base=base, ccar=True, car_weight=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = build_loss(config, counts).train()
    assert any("zero training samples (class 2)" in str(w.message) for w in caught)
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(32, 4, generator=gen)).requires_grad_()
    labels = torch.arange(32) % 4  # class 2 appears although it had no training image
    for _ in range(3):  # CAR's EMA over several steps
        loss = loss_fn(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), base
    assert all(
        torch.isfinite(v).all() for v in loss_fn.state_dict().values() if v.is_floating_point()
    )


def test_ccar_weight_of_a_zero_frequency_class_is_one_below_omega():
    # Omega = exp(-f' (omega - p_t)) with f' = f = 0 for p_t < omega: exactly 1.
    p_t = torch.tensor([0.0, 0.3, 0.74])
    weight = ccar_weight(p_t, torch.zeros(3), omega=0.75)
    assert torch.equal(weight, torch.ones(3))
    # Above omega f' = 1 - f = 1: exp(-(omega - p_t)) = exp(p_t - omega).
    p_t = torch.tensor([0.8, 1.0])
    expected = torch.exp(p_t - 0.75)
    torch.testing.assert_close(ccar_weight(p_t, torch.zeros(2), omega=0.75), expected)


@pytest.mark.filterwarnings("ignore:class_counts. 1 class")
def test_car_r0_zero_with_an_empty_class_is_an_error():
    with pytest.raises(ValueError, match=r"r0 = 0 with zero-count classes.*use r0 > 0"):
        build_loss(LongTailLossConfig(car_weight=0.5, car_r0=0.0), [50, 0, 5])


def test_trainer_with_an_empty_class_trains_finite(tmp_path):
    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn

    dataset = train_dataset((40, 24, 0, 8, 6, 4))  # class 2 is in the ClassLabel, never seen
    with pytest.warns(UserWarning, match="zero training samples"):
        trainer = LongTailTrainer(
            model=tiny_vit(6),
            args=training_args(tmp_path, max_steps=4),
            train_dataset=dataset,
            data_collator=collate_fn,
            loss_config=LongTailLossConfig(ccar=True, car_weight=0.5),
            sampler="class_balanced",
        )
    assert trainer.class_counts[2] == 0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------- split files
def test_split_file_problems_are_all_reported_with_line_numbers(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "with space.jpg"):
        PILImage.new("RGB", (4, 4)).save(root / name)
    split = tmp_path / "ImageNet_LT_train.txt"
    split.write_text(
        "a.jpg 0\n"  # 1 ok
        "missing.jpg 1\n"  # 2 file not found
        "just-a-path\n"  # 3 bad line
        "b.jpg one\n"  # 4 label not an integer
        "\n"  # 5 blank: skipped
        "b.jpg 7\n"  # 6 out of range for 3 classes
        "b.jpg -1\n"  # 7 negative
        "with space.jpg 2\n"  # 8 ok (the label is the last field)
    )
    with pytest.raises(SplitFileError) as err:
        load_split_file(split, root, num_classes=3)
    lines = [n for n, _ in err.value.problems]
    assert lines == [2, 3, 4, 6, 7]
    message = str(err.value)
    for expected in (
        "line 2: image file not found",
        "line 3: expected '<path> <label>'",
        "line 4: label 'one' is not an integer",
        "line 6: label 7 out of range [0, 3)",
        "line 7: label -1 out of range",
    ):
        assert expected in message
    # The same file through the protocol loader fails the same way, before any dataset exists.
    (tmp_path / "ImageNet_LT_test.txt").write_text("a.jpg 0\n")
    with pytest.raises(SplitFileError, match="line 6: label 7 out of range"):
        load_long_tailed("imagenet-lt", image_root=root, split_dir=tmp_path, num_classes=3)


# ------------------------------------------------------------------- loss hyper-parameters
@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("ccar_omega", 0.0, r"ccar_omega must be in \(0, 1\]; got 0.0"),
        ("ccar_omega", 1.5, r"ccar_omega must be in \(0, 1\]; got 1.5"),
        ("ccar_omega", math.nan, r"ccar_omega must be finite"),
        ("car_weight", -0.5, r"car_weight must be >= 0"),
        ("car_weight", math.inf, r"car_weight must be finite"),
        ("car_beta", 1.0, r"car_beta must be in \[0, 1\); got 1.0"),
        ("car_beta", -0.1, r"car_beta must be in \[0, 1\)"),
    ],
    ids=["omega=0", "omega=1.5", "omega=nan", "alpha<0", "alpha=inf", "beta=1", "beta<0"],
)
def test_loss_config_out_of_range(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        LongTailLossConfig(**{field: value})


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda c: CCARLoss(c, omega=0.0), r"omega must be in \(0, 1\]"),
        (lambda c: CCARLoss(c, omega=1.01), r"omega must be in \(0, 1\]"),
        (lambda c: ConfusionSpectralRegularizer(c, alpha=-1.0), r"alpha must be >= 0"),
        (lambda c: ConfusionSpectralRegularizer(c, beta=1.0), r"beta must be in \[0, 1\)"),
        (lambda c: ConfusionSpectralRegularizer(c, beta=-0.2), r"beta must be in \[0, 1\)"),
    ],
    ids=["ccar-omega=0", "ccar-omega>1", "car-alpha<0", "car-beta=1", "car-beta<0"],
)
def test_loss_modules_validate_their_own_arguments(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build(list(COUNTS))


def test_script_rejects_bad_loss_options_before_touching_the_output_dir(train_module, tmp_path):
    out = tmp_path / "run"
    for flags, pattern in (
        (["--ccar", "--ccar_omega", "1.5"], r"ccar_omega must be in \(0, 1\]"),
        (["--car_weight", "-1"], r"car_weight must be >= 0"),
        (["--car_beta", "1"], r"car_beta must be in \[0, 1\)"),
        (["--loss", "focall"], r"unknown base loss 'focall'; valid: bs, cb, ce, focal, la, ldam"),
        (["--nonfinite_loss", "ignore"], r"--nonfinite_loss 'ignore' is not valid"),
        (["--on_bad_image", "drop"], r"--on_bad_image 'drop' is not valid.*'skip'"),
        (["--sampler", "balanced"], r"--sampler 'balanced' is not valid"),
    ):
        with pytest.raises(ValueError, match=pattern):
            train_module.main([*flags, "--output_dir", str(out)])
        assert not out.exists(), flags


# ------------------------------------------------------------------------- unknown names
def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        LongTailLossConfig(base="focall")
    for name in list_base_losses():
        assert name in str(err.value)


def test_unknown_model_name_suggests_and_lists_registered_names():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet33_cifar'") as err:
        create_model("resnet33_cifar", num_labels=10)
    message = str(err.value)
    assert "Did you mean" in message
    for name in list_models():
        assert name in message


# --------------------------------------------------------------------------------- YAML
def test_yaml_unknown_key_is_named_with_a_suggestion(train_module, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: digits\nlearning_rte: 0.1\nccar_omgea: 0.5\n")
    with pytest.raises(ValueError) as err:
        train_module.parse_args([str(config)])
    message = str(err.value)
    assert "'ccar_omgea' (did you mean 'ccar_omega'?)" in message
    assert "'learning_rte' (did you mean 'learning_rate'?)" in message


def test_yaml_that_is_not_a_mapping_is_refused(train_module, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("- dataset_name\n- digits\n")
    with pytest.raises(ValueError, match="must hold a mapping of option names to values"):
        train_module.parse_args([str(config)])


def test_valid_yaml_with_flag_override_parses(train_module, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: digits\nccar: true\nccar_omega: 0.5\nimbalance_factor: 10\n")
    _, data, loss, _, training = train_module.parse_args(
        [str(config), "--ccar_omega", "0.9", "--output_dir", str(tmp_path / "o")]
    )
    assert (data.imbalance_factor, loss.ccar, loss.ccar_omega) == (10.0, True, 0.9)
    assert training.output_dir == str(tmp_path / "o")
    assert np.isclose(loss.ccar_omega, 0.9)
