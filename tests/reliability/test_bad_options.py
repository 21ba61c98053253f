"""Every option with a range or a type is checked before any data is loaded, naming the option;
a YAML config behaves as its flags would (YAML 1.1 quirks included), wherever it is given.

Each case goes through ``scripts/train.py``'s ``main`` as a user would call it; a refused one
must not even create the output directory.
"""

from __future__ import annotations

import json

import pytest
from _reliability_helpers import TINY_RUN


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mixup_alpha", "-1"], "--mixup_alpha must be a number >= 0; got -1.0"),
        (["--cutmix_alpha", "nan"], "--cutmix_alpha must be a number; got nan"),
        (["--image_size", "0"], "--image_size must be an integer >= 1; got 0"),
        (["--many_shot_threshold", "-5"], "--many_shot_threshold must be an integer >= 0"),
        (
            ["--few_shot_threshold", "80"],
            "--few_shot_threshold 80 is above --many_shot_threshold 60",
        ),
        (["--max_eval_samples", "0"], "--max_eval_samples must be an integer >= 1; got 0"),
        (["--lr_gamma", "0"], "--lr_gamma must be a number > 0; got 0.0"),
        (["--lr_milestones", "5", "3"], "--lr_milestones must be in increasing order"),
        (["--lr_milestones", "-1"], "--lr_milestones must hold finite epochs >= 0"),
        (["--auto_augment", "autoaugment"], "--auto_augment 'autoaugment' is not valid"),
        (["--train_transform", "imagenet"], "--train_transform 'imagenet' is not valid"),
        (["--imbalance_profile", "linear"], "--imbalance_profile 'linear' is not valid"),
        (["--imbalance_seed", "-1"], "--imbalance_seed must be an integer >= 0"),
        (["--preflight_sample", "-2"], "--preflight_sample must be an integer >= -1"),
        (["--nonfinite_skip_limit", "0"], "--nonfinite_skip_limit must be an integer >= 1"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an"),
        (["--learning_rate", "-0.1"], "--learning_rate must be a number >= 0; got -0.1"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be a number >= 0"),
        (
            ["--max_steps", "-1", "--num_train_epochs", "0"],
            "num_train_epochs=0.0 and max_steps=-1: the run would make no optimizer step",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_bad_option_is_named_before_anything_is_touched(train, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.main([*TINY_RUN, "--output_dir", str(out), *flags])
    assert message in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("learning_rate: abc\n", "option 'learning_rate' must be a number; got 'abc'"),
        ("max_steps: 2.5\n", "option 'max_steps' must be an integer; got 2.5"),
        ("save_strategy: yes\n", "option 'save_strategy' got the YAML boolean true"),
        ("eval_strategy: nope\n", "option 'eval_strategy' is 'nope' (did you mean 'no'?)"),
        ("ccar: maybe\n", "option 'ccar' must be true or false; got 'maybe'"),
        ("mixup_alpha: [0.2, 0.4]\n", "option 'mixup_alpha' must be a number"),
        ("lr_milestones: [3, abc]\n", "option 'lr_milestones' must be a number; got 'abc'"),
        ("learning_rate:\n", "option 'learning_rate' cannot be empty"),
    ],
    ids=lambda v: v.split(":")[0] if isinstance(v, str) and v.endswith("\n") else None,
)
def test_bad_yaml_value_is_named_before_anything_is_touched(train, tmp_path, yaml_text, message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train.main([str(config), *TINY_RUN, "--output_dir", str(out)])
    assert message in str(err.value)
    assert not out.exists()


def test_yaml_quirks_and_a_config_after_the_flags_train(train, tmp_path):
    """``eval_strategy: no`` (YAML reads false), one milestone as a scalar, ``5e-2`` (YAML reads
    a string), and the file given after the flags: a real run that uses all of them."""
    config = tmp_path / "config.yaml"
    config.write_text("eval_strategy: no\nlr_milestones: 3\nlearning_rate: 5e-2\nmax_steps: 3\n")
    out = tmp_path / "run"
    flags = list(TINY_RUN)
    # The file overrides TINY_RUN's defaults only where no flag is given: drop those flags.
    for name in ("--eval_strategy", "--learning_rate", "--max_steps"):
        i = flags.index(name)
        del flags[i : i + 2]
    train.main([*flags, "--output_dir", str(out), str(config), "--lr_gamma", "0.5"])
    run = json.loads((out / "longtail_run.json").read_text())
    assert run["training"]["lr_milestones"] == [3.0]
    assert run["training"]["learning_rate"] == 0.05 and run["training"]["max_steps"] == 3
    state = json.loads((out / "trainer_state.json").read_text())
    rates = [h["learning_rate"] for h in state["log_history"] if "loss" in h]
    assert rates == pytest.approx(
        [0.05, 0.05, 0.05]
    )  # LR used at steps 1-3 (milestone: end of epoch 3)


def test_two_config_files_are_refused(train, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("max_steps: 1\n")
    b.write_text("max_steps: 2\n")
    with pytest.raises(ValueError, match="Several config files given"):
        train.main([str(a), "--seed", "0", str(b)])


def test_a_json_value_of_a_flag_is_not_taken_for_a_config(train, tmp_path):
    out = tmp_path / "weird.json"
    args = train.parse_args(["--output_dir", str(out), "--max_steps", "1"])
    assert args[-1].output_dir == str(out)
