"""The training command line: its options, a YAML/JSON file plus flags, checked up front.

The options of ``scripts/train.py`` are :class:`ModelArguments`, :class:`DataArguments`,
:class:`~hf_longtail.losses.LongTailLossConfig` (the loss recipe itself), :class:`RunArguments`
and ``transformers.TrainingArguments`` (:data:`DATACLASSES`, :func:`parse_args`);
:func:`check_options` validates them all before anything is loaded, and
:func:`initial_run_record` is what they say about the run (the recipe a resume must keep).

``scripts/train.py`` takes ``[CONFIG.yaml] [--flag value ...]`` (the file anywhere among the
flags; the flags override it). ``HfArgumentParser`` converts flags by type, but values from a
file become parser defaults that no one converts or checks, so a YAML slip would surface hours
later, or never (a wrong type silently accepted). :func:`read_config_file` therefore checks each
value against its field's type hint and names the option:

- numbers for ``int`` / ``float`` options (YAML 1.1 reads ``5e-2`` as a string: converted);
- one number for a list option (``lr_milestones: 160``) is a one-element list;
- YAML's bare ``no`` / ``off`` (read as ``false``) for a choice option that has a ``"no"``
  choice (``eval_strategy: no``) means ``"no"``; any other boolean for a non-boolean option is
  an error saying to quote it;
- choice (``Enum`` / ``Literal``) options must hold one of their choices; unknown keys are
  named with the closest valid key; a field's ``aliases`` (``--loss`` for ``base``) are keys too.

:func:`check_number` is the shared range check for the options themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import math
import numbers
import os
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from hf_longtail.class_counts import DEFAULT_THRESHOLDS
from hf_longtail.losses import LongTailLossConfig

__all__ = [
    "CLASSIFIERS",
    "CONFIG_SUFFIXES",
    "DATACLASSES",
    "DataArguments",
    "ModelArguments",
    "RunArguments",
    "accelerate_requested_processes",
    "build_parser",
    "check_classifier",
    "check_number",
    "check_options",
    "check_world_size",
    "choose_validation_split",
    "classifier_kwargs",
    "initial_run_record",
    "lora_options",
    "parse_args",
    "parse_posthoc_tau",
    "quiet_libraries",
    "read_config_file",
    "selection_record",
    "split_config_file",
    "uses_feature_cache",
    "validation_load_kwargs",
    "validation_recipe",
]

logger = logging.getLogger("hf_longtail.train")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def split_config_file(argv: Sequence[str], value_flags: set[str]) -> tuple[Path | None, list[str]]:
    """``(config file, the other arguments)``: the config file is the one argument ending in
    ``.yaml`` / ``.yml`` / ``.json`` that is not the value of a flag (``value_flags``: the flags
    that always take a value), wherever it stands. Two such files are an error."""
    argv = list(argv)
    found = []
    for i, arg in enumerate(argv):
        if not arg.endswith(CONFIG_SUFFIXES) or arg.startswith("-"):
            continue
        previous = argv[i - 1] if i else ""
        if previous in value_flags:  # e.g. --output_dir run.json is a value, not a config
            continue
        found.append(i)
    if len(found) > 1:
        names = [argv[i] for i in found]
        raise ValueError(f"Several config files given ({names}); pass one, then flags.")
    if not found:
        return None, argv
    path = Path(argv.pop(found[0]))
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    return path, argv


def _choices(hint: Any) -> list[str]:
    choices = []
    for arg in _union_args(hint):
        if typing.get_origin(arg) is typing.Literal:
            choices += [str(value) for value in typing.get_args(arg)]
        elif isinstance(arg, type) and issubclass(arg, enum.Enum):
            choices += [str(member.value) for member in arg]
    return choices


def _union_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(name: str, value: Any, hint: Any, path: Path) -> Any:
    """``value`` converted to the option's type, or a ``ValueError`` naming the option."""
    args = _union_args(hint)
    where = f"{path}: option {name!r}"
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} cannot be empty (null); give a value or remove the key.")
    choices = _choices(hint)
    if isinstance(value, bool):
        if bool in args:
            return value
        if value is False and "no" in choices:
            return "no"  # YAML 1.1 reads a bare `no` as false
        raise ValueError(
            f"{where} got the YAML boolean {str(value).lower()}, which is not a valid value"
            + (f" (choices: {choices})" if choices else "")
            + "; quote the value, e.g. 'no'."
        )
    if bool in args:
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{where} must be true or false; got {value!r}.")
    lists = [a for a in args if typing.get_origin(a) in (list, Sequence, tuple)]
    if lists and not (isinstance(value, str) and str in args):  # report_to: none stays a str
        if not isinstance(value, (list, tuple)):
            value = [value]  # one milestone written as a scalar
        item = (typing.get_args(lists[0]) or (Any,))[0]
        return [_coerce(name, v, item, path) for v in value]
    if int in args and float not in args:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer; got {value!r}.")
    if float in args:
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 5e-2 (no dot) as a string
            except ValueError:
                pass
        if str not in args:
            raise ValueError(f"{where} must be a number; got {value!r}.")
    if choices and str(value) not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where} is {value!r}{hint_text}; choices: {choices}.")
    if isinstance(value, (dict, list)) and not any(
        typing.get_origin(a) is dict or a in (dict, Any) for a in args
    ):
        raise ValueError(f"{where} must be a single value; got {value!r}.")
    return value


def read_config_file(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The options of a YAML/JSON config file, each converted to its field's type (see the
    module docstring). Raises ``ValueError`` naming unknown keys (with the closest valid one)
    and values of the wrong type."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    hints: dict[str, Any] = {}
    aliases: dict[str, str] = {}  # e.g. the key `loss` for the field `base` (its --loss alias)
    for dc in dataclass_types:
        type_hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if f.init:
                hints[f.name] = type_hints.get(f.name, Any)
                for alias in f.metadata.get("aliases", ()):
                    aliases[alias.lstrip("-")] = f.name
    both = [(k, aliases[k]) for k in values if k in aliases and aliases[k] in values]
    if both:
        raise ValueError(f"{path} sets both {both[0][0]!r} and {both[0][1]!r}; keep one.")
    values = {aliases.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), hints, n=1)
            described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"Unknown key(s) in {path}: {', '.join(described)}. Valid keys are the options of "
            "scripts/train.py --help."
        )
    return {key: _coerce(key, value, hints[key], path) for key, value in values.items()}


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``--name`` unless ``value`` is a finite number within the
    bounds (``minimum`` / ``maximum`` inclusive, ``above`` exclusive); ``integer`` requires an
    int; ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"--{name} must be {kind}; got {value!r}.")
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
    if not low_ok or (maximum is not None and value > maximum):
        raise ValueError(f"--{name} must be {kind} {' and '.join(bounds)}; got {value!r}.")


# ------------------------------------------------------------------ the training command line
# The options of scripts/train.py beyond TrainingArguments and LongTailLossConfig (whose fields
# are options too), their parsing (config file first or last) and their up-front checks.
@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(
        default="resnet32_cifar",
        metadata={
            "help": "Hub id or local directory of an image classifier, a timm architecture "
            "('timm/<arch>'), or a local name such as 'resnet32_cifar'."
        },
    )
    pretrained: bool = field(
        default=True, metadata={"help": "Load pretrained weights where the source has them."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache directory."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token (private models)."})
    classifier: str = field(
        default="linear",
        metadata={
            "help": "'linear' (the model's own head) or 'cosine': LDAM's NormedLinear, logits "
            "= cosine_scale * cos(features, w_c), no bias, as LDAM-DRW is published (the LDAM "
            "loss applies its s = 30 itself). CIFAR ResNets (resnet*_cifar) only."
        },
    )
    cosine_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplier of the cosine logits (classifier 'cosine'): 1 with loss ldam, "
            "e.g. 16-30 with the other losses."
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Train only the classifier head (frozen modules stay in eval mode)."},
    )
    train_last_stage: bool = field(
        default=False,
        metadata={"help": "With --freeze_backbone: also train the backbone's last stage."},
    )
    feature_cache: bool = field(
        default=True,
        metadata={
            "help": "With --freeze_backbone (head only): compute each split's backbone features "
            "once, store them on disk (keyed by model, transform and split) and train on them."
        },
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Feature cache directory (default: ~/.cache/hf_longtail/features)."},
    )
    # LoRA through peft (hf_longtail.models.lora); its own group in -h.
    lora_r: int | None = field(
        default=None,
        metadata={"help": "LoRA rank: train low-rank adapters plus the head (off when unset)."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale: update = alpha/r BA."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="auto",
        metadata={
            "help": "Layers given adapters: 'auto' (all-linear for ViTs, all-conv for CNNs), "
            "'all-linear', 'all-conv' or names such as 'q_proj,v_proj'. The head is trained "
            "in full."
        },
    )
    lora_merge: bool = field(
        default=False,
        metadata={"help": "Save the adapters merged into a plain model (no peft to load it)."},
    )


CLASSIFIERS = ("linear", "cosine")


@dataclass
class DataArguments:
    """Which data, and how it is made long-tailed and fed."""

    dataset_name: str = field(
        default="digits",
        metadata={
            "help": "Hub dataset id, local directory (parquet/arrow/imagefolder/save_to_disk), "
            "a protocol name ('imagenet_lt', 'places_lt', 'inat2018') or 'digits'."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config name."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (detected from the Image feature)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column (detected from the ClassLabel feature)."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Image root for the ImageNet-LT/Places-LT/iNat protocols."}
    )
    split_dir: str | None = field(
        default=None, metadata={"help": "Directory of the protocol split files (*_train.txt)."}
    )
    imbalance_factor: float | None = field(
        default=100.0,
        metadata={
            "help": "n_max / n_min of the long-tailed training set (>= 1); null in a config: "
            "use the source as it is (the ImageNet-LT / iNaturalist split files)."
        },
    )
    imbalance_profile: str = field(default="exp", metadata={"help": "'exp', 'step' or 'pareto'."})
    imbalance_seed: int = field(default=0, metadata={"help": "Seed of the per-class subsets."})
    eval_split: str = field(default="test", metadata={"help": "Split evaluated after training."})
    train_transform: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the model's image processor, else the CIFAR protocol), 'model', "
            "'pad_crop' (CIFAR-style pad-and-crop with the model's mean/std, for small centred "
            "images; CIFAR protocol without a processor), 'cifar10' or 'cifar100' (CIFAR "
            "protocol with that dataset's mean/std)."
        },
    )
    auto_augment: str | None = field(
        default=None, metadata={"help": "'randaugment' or 'trivialaugment' on training images."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup alpha (0 disables)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0 disables)."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the input images: the CIFAR protocol's (default 32; e.g. 16 for "
            "digits) or, with the model's transforms, instead of its input size (e.g. 96)."
        },
    )
    sampler: str = field(
        default="random",
        metadata={"help": "'random', 'class_balanced', 'sqrt' or 'progressive'."},
    )
    on_bad_image: str = field(
        default="raise",
        metadata={
            "help": "An unreadable (truncated/corrupt/missing) image met while reading batches: "
            "'raise' stops naming the file; 'skip' drops it from its batch (logged, counted)."
        },
    )
    preflight_sample: int = field(
        default=1000,
        metadata={
            "help": "Before training, every row of each split is checked for a missing image "
            "and a missing file; this many random training rows also get their image header "
            "opened (-1: all rows), and every evaluation image is decoded (0: neither). Bad "
            "rows follow --on_bad_image."
        },
    )
    pixel_cache: str = field(
        default="auto",
        metadata={
            "help": "'auto': decode (and resize) the images once into a uint8 store and augment "
            "whole batches when the transform allows it and the store fits 4 GiB; 'on': always "
            "(an error says why not); 'off': decode and transform every image every epoch."
        },
    )
    pixel_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Pixel store directory (default $HF_HOME/hf_longtail/pixel_cache)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on N random evaluation images (debugging)."}
    )
    many_shot_threshold: int = field(
        default=DEFAULT_THRESHOLDS["many"],
        metadata={"help": "Many-shot: classes with more training images than this."},
    )
    few_shot_threshold: int = field(
        default=DEFAULT_THRESHOLDS["few"],
        metadata={"help": "Few-shot: classes with fewer training images than this."},
    )
    validation_split: str = field(
        default="auto",
        metadata={
            "help": "Split that chooses what is tuned (per-epoch evaluation, best checkpoint, "
            "early stopping, --posthoc_tau auto, the --stage tau): a split NAME; 'auto' (the "
            "dataset's 'validation' split if it has one other than --eval_split, else none); "
            "'heldout' (--validation_per_class images of every class reserved from the source "
            "training images before the long tail is drawn, seeded by --imbalance_seed); 'none'."
        },
    )
    validation_per_class: int = field(
        default=20,
        metadata={"help": "Images per class of --validation_split heldout (ImageNet-LT: 20)."},
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the long-tailed training split carved off as the validation "
            "split (stratified, seeded by --imbalance_seed; every class keeps a training image)."
        },
    )
    posthoc_tau: str | None = field(
        default=None,
        metadata={
            "help": "Post-hoc logit adjustment logits - tau * log(prior), folded into the saved "
            "classifier's bias: a number, or 'auto' (chosen on the validation split from "
            "0, 0.25, ..., 2 by balanced accuracy)."
        },
    )

    def __post_init__(self) -> None:
        # A flag gives the string "1.0": hold a float (or "auto") from the start.
        self.posthoc_tau = parse_posthoc_tau(self.posthoc_tau)


@dataclass
class RunArguments:
    """Run management beyond TrainingArguments."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a previous run in output_dir (deleted only once the options, data "
            "and model are validated; ignored when resuming)."
        },
    )
    lr_milestones: list[float] | None = field(
        default=None, metadata={"help": "Epochs of x lr_gamma step decay (LDAM recipe: 160 180)."}
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Step-decay factor."})
    nonfinite_loss: str = field(default="raise", metadata={"help": "'raise' or 'skip'."})
    nonfinite_skip_limit: int = field(
        default=10,
        metadata={
            "help": "With --nonfinite_loss skip: stop after this many consecutive skipped "
            "batches (or more than half of them)."
        },
    )
    save_on_signal: bool = field(
        default=True, metadata={"help": "Checkpoint on SIGTERM/SIGINT before exiting."}
    )
    loss_state_missing: str = field(
        default="refuse",
        metadata={
            "help": "Resuming from a checkpoint without the loss state CAR needs "
            "(longtail_loss.safetensors): 'refuse' (default: stop, naming the checkpoint) or "
            "'fresh' (resume with a fresh CAR state)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of "
            "--metric_for_best_model on the validation split (transformers' "
            "EarlyStoppingCallback; needs a validation split and an --eval_strategy)."
        },
    )
    stage: str | None = field(
        default=None,
        metadata={
            "help": "Decoupled second stage (Kang et al. 2020) on --from_run: 'crt' (re-train "
            "the head, class-balanced), 'tau_norm' (tau chosen on validation), 'lws', or "
            "'posthoc_la' (post-hoc logit adjustment, tau chosen on validation, folded into the "
            "bias)."
        },
    )
    from_run: str | None = field(
        default=None, metadata={"help": "With --stage: the finished run directory to start from."}
    )


# The loss recipe is hf_longtail.losses.LongTailLossConfig itself: its fields are the options
# (--loss is an alias of --base), validated by its __post_init__ while parsing.
#: The option groups of scripts/train.py, in parsing order.
DATACLASSES = (ModelArguments, DataArguments, LongTailLossConfig, RunArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml|CONFIG.json] [--flag value ...]`` into the argument dataclasses.

    The file (optional, anywhere among the arguments) provides defaults; flags override them.
    Its values are checked against the options' types (:func:`hf_longtail.arguments.
    read_config_file`): unknown keys and wrong types raise a ``ValueError`` naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    value_flags = {
        flag for action in parser._actions if action.nargs is None for flag in action.option_strings
    }
    config_path, argv = split_config_file(argv, value_flags)
    if config_path is not None:
        parser.set_defaults(**read_config_file(config_path, DATACLASSES))
    if _multi_process_without_gpu() and parser.get_default("use_cpu") is not True:
        # accelerate's multi-process launch on a machine without a GPU only becomes a gloo group
        # when use_cpu is set; otherwise every process would train alone on the same output_dir.
        parser.set_defaults(use_cpu=True)
    if "--output_dir" not in argv and parser.get_default("output_dir") is None:
        parser.set_defaults(output_dir="outputs/run")
    return parser.parse_args_into_dataclasses(args=argv)


# ------------------------------------------------------------------------------ -h / parsing
_GROUPS = (
    (ModelArguments, "model", "Which model to fine-tune, and how much of it."),
    (None, "LoRA (peft)", "Low-rank adapters plus the head (hf_longtail.models.lora)."),
    (DataArguments, "data", "Which data, how it is made long-tailed and how it is fed."),
    (LongTailLossConfig, "loss (LongTailLossConfig)", "The long-tail loss recipe."),
    (RunArguments, "run", "Run management: resume, schedules, decoupled second stage."),
    (TrainingArguments, "transformers TrainingArguments", "Trainer options (transformers)."),
)
_USAGE = "%(prog)s [CONFIG.yaml|CONFIG.json] [--option VALUE ...] [-h]"
_DESCRIPTION = (
    "Fine-tune an image classifier on long-tailed data. A YAML/JSON config file (first or last "
    "among the arguments) sets the options; flags override it. Options that take none, such as "
    "--imbalance_factor none, accept 'none'. The project's options come first, grouped; "
    "transformers' TrainingArguments follow."
)
_HELP_OVERRIDES = {
    "--pretrained": "Load the model's pretrained weights (default). Weights that cannot be "
    "loaded (offline, wrong id) are an error, never a silent random start.",
    "--no_pretrained": "Train from random weights on purpose: the architecture of "
    "--model_name_or_path without its weights (a Hub model still needs its config.json). The "
    "run record and the card then name no base model.",
}


def _none_or(kind: type) -> Any:
    def convert(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def build_parser() -> HfArgumentParser:
    """The ``HfArgumentParser`` of :data:`DATACLASSES` with a short usage line, the project's
    options first in one titled group per dataclass (LoRA options in their own), transformers'
    ``TrainingArguments`` last, ``--pretrained`` / ``--no_pretrained`` with their own help, and
    ``none`` / ``null`` accepted by the optional numeric options of the project's dataclasses
    (``--imbalance_factor none``: use the source as it is)."""
    parser = HfArgumentParser(DATACLASSES)
    parser.usage, parser.description = _USAGE, _DESCRIPTION
    owner: dict[str, int] = {}
    for index, (dc, _, _) in enumerate(_GROUPS):
        if dc is not None:
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                owner.setdefault(f.name, index)
                if dc is not TrainingArguments and type(None) in _union_args(hints[f.name]):
                    owner[f.name + "?optional"] = index
    groups = [parser.add_argument_group(title, text) for _, title, text in _GROUPS]
    for action in list(parser._optionals._group_actions):
        if action.dest not in owner:
            continue  # -h
        index = owner[action.dest]
        if action.dest.startswith("lora_"):
            index = 1
        parser._optionals._group_actions.remove(action)
        groups[index]._group_actions.append(action)
        for flag in action.option_strings:
            if flag in _HELP_OVERRIDES:
                action.help = _HELP_OVERRIDES[flag]
            elif flag == f"--no_{action.dest}":  # not the help of the positive flag again
                action.help = f"Same as --{action.dest} false."
        if action.dest + "?optional" in owner and action.type in (int, float):
            action.type = _none_or(action.type)
    parser._action_groups = [*parser._action_groups[:2], *groups]
    return parser


def quiet_libraries(training_args: TrainingArguments) -> None:
    """Library logging for a script run: with the default ``--log_level passive``,
    transformers and datasets log warnings and errors only, and transformers' own progress bars
    (writing / loading weight shards: seconds) are off; the training, evaluation and dataset
    bars (long work) stay unless ``--disable_tqdm``. An explicit ``--log_level`` is left to the
    Trainer, which applies it."""
    if training_args.log_level != "passive":
        return
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


_CPU_MULTI_PROCESS = (
    "For several CPU processes use `accelerate launch --multi_gpu --num_processes N "
    "scripts/train.py ...` (without a GPU its processes train on the CPU with gloo) or "
    "`torchrun --nproc_per_node N scripts/train.py ...`."
)


def accelerate_requested_processes() -> int | None:
    """The ``--num_processes`` of the ``accelerate launch`` that started this process through
    its single-process launcher (``--cpu``, which sets ``ACCELERATE_USE_CPU`` and no
    ``WORLD_SIZE``), read from the launcher's command line (``/proc``, Linux); ``None`` when it
    cannot be known. accelerate 1.x's ``--cpu`` always runs one process (several only with
    ``--mpirun_hostfile``), whatever ``--num_processes`` says."""
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") for a in argv) or "launch" not in argv:
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = None
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                try:
                    return int(value)
                except ValueError:
                    return None
    return None


def check_world_size(training_args: TrainingArguments) -> None:
    """Refuse a launch whose real number of processes is not the one asked for, before any
    work: ``accelerate launch --cpu --num_processes N`` (one process, whatever N), or a
    ``WORLD_SIZE`` in the environment that the process group does not have."""
    world = training_args.world_size
    requested = accelerate_requested_processes()
    if requested is not None and requested > world:
        raise ValueError(
            f"`accelerate launch --cpu --num_processes {requested}` started {world} process: "
            "accelerate's --cpu launcher runs a single process (several only through MPI with "
            f"--mpirun_hostfile). {_CPU_MULTI_PROCESS}"
        )
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world != world:
        raise ValueError(
            f"WORLD_SIZE={env_world} in the environment but this run has {world} process(es): "
            f"the launch did not form the process group it asked for. {_CPU_MULTI_PROCESS}"
        )


def _multi_process_without_gpu() -> bool:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_options(
    model_args: ModelArguments,
    data_args: DataArguments,
    loss_config: LongTailLossConfig,
    run_args: RunArguments,
    training_args: TrainingArguments,
) -> LongTailLossConfig:
    """Validate every option before the output dir, the data or the model are touched (each
    message names the option and its valid values); return the loss config with
    ``--label_smoothing_factor`` (a TrainingArguments option the loss applies) recorded in it."""
    from hf_longtail.trainer import apply_label_smoothing_factor

    loss_config = apply_label_smoothing_factor(loss_config, training_args.label_smoothing_factor)
    _check_data_and_run_options(data_args, run_args, training_args)
    check_classifier(model_args, loss_config)
    if model_args.classifier == "cosine" and data_args.posthoc_tau is not None:
        raise ValueError(
            f"--posthoc_tau {data_args.posthoc_tau} is folded into the classifier's bias so the "
            "saved model predicts what is reported, and --classifier cosine has no bias. Use "
            "--classifier linear, or drop --posthoc_tau."
        )
    _check_frozen_options(model_args, data_args, run_args)
    lora_options(model_args)  # LoRA options are checked (and peft found) before any work
    check_world_size(training_args)
    return loss_config


def lora_options(model_args: ModelArguments) -> Any:
    """The :class:`hf_longtail.models.lora.LoraOptions` of ``--lora_*`` (``None`` without
    ``--lora_r``); contradictory combinations raise ``ValueError`` naming the options, among
    them a LoRA adapter on random weights (``--no_pretrained``, a from-scratch model) without
    ``--lora_merge true``: nothing could rebuild its base, so the saved run would not reload."""
    if model_args.lora_r is None:
        if model_args.lora_merge:
            raise ValueError("--lora_merge needs --lora_r (it merges LoRA adapters).")
        return None
    from hf_longtail.models import builds_random_weights
    from hf_longtail.models.lora import LoraOptions, _require_peft

    if model_args.freeze_backbone:
        raise ValueError(
            "--lora_r and --freeze_backbone are two ways of light fine-tuning; pass one."
        )
    _require_peft()
    options = LoraOptions(
        r=model_args.lora_r,
        alpha=model_args.lora_alpha,
        dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
    )
    name = model_args.model_name_or_path
    if not model_args.lora_merge and builds_random_weights(name, model_args.pretrained):
        # The adapter file names the weights to load it onto; random ones cannot be named (a
        # local checkpoint's path would silently reload its pretrained weights instead).
        why = (
            f"--no_pretrained builds {name} with random weights"
            if not model_args.pretrained
            else f"--model_name_or_path {name} is a from-scratch model (random weights)"
        )
        raise ValueError(
            f"--lora_r {model_args.lora_r} saves only the LoRA adapter and the head, to be "
            f"loaded onto the base weights, but {why} that no one can rebuild: the saved run "
            "could not be reloaded. Pass --lora_merge true (saves the full model with the "
            "adapters merged into it), drop --lora_r (train every weight), or start from "
            "pretrained weights."
        )
    return options


def uses_feature_cache(model_args: ModelArguments) -> bool:
    """Whether the run trains the head on cached backbone features (frozen backbone, head only,
    feature cache on)."""
    return bool(
        model_args.freeze_backbone and not model_args.train_last_stage and model_args.feature_cache
    )


def initial_run_record(
    model_args: ModelArguments,
    data_args: DataArguments,
    loss_config: LongTailLossConfig,
    training_args: TrainingArguments,
) -> dict[str, Any]:
    """What the options say about the run, before any data is loaded: the recipe part of
    ``longtail_run.json`` (model, dataset construction, loss, seeds, sampler, classifier,
    frozen backbone) that :func:`hf_longtail.resume.plan_output_dir` compares with a previous
    run; the trainer completes it (:meth:`LongTailTrainer.run_record`)."""
    import hf_longtail

    run_info: dict[str, Any] = {
        "hf_longtail_version": hf_longtail.__version__,
        "model_name_or_path": model_args.model_name_or_path,
        "dataset": {
            "name": data_args.dataset_name,
            "config_name": data_args.dataset_config_name,
            "imbalance_factor": data_args.imbalance_factor,
            # --imbalance_factor none draws no subset: no profile is used (the seed still
            # seeds a --validation_split heldout / --train_val_split carve).
            "profile": None if data_args.imbalance_factor is None else data_args.imbalance_profile,
            "seed": data_args.imbalance_seed,
            "eval_split": data_args.eval_split,
        },
        "loss": loss_config.to_dict(),
        # The part of the training summary that is recipe (completed below).
        "training": {
            "seed": training_args.seed,
            "data_seed": training_args.data_seed,
            "sampler": data_args.sampler,
            # Run length: a finished run asked to train longer is refused, not retrained.
            "max_steps": training_args.max_steps,
            "num_train_epochs": training_args.num_train_epochs,
        },
    }
    validation = validation_recipe(data_args)
    if validation is not None:  # absent for the default (older run files compare equal)
        run_info["dataset"]["validation_options"] = validation
    if model_args.classifier != "linear":  # absent for the model's own head (older run files)
        run_info["classifier"] = {"type": model_args.classifier, "scale": model_args.cosine_scale}
    if model_args.lora_r is not None:  # recipe: adapters of another shape cannot be resumed
        run_info["lora"] = {
            "r": model_args.lora_r,
            "alpha": model_args.lora_alpha,
            "dropout": model_args.lora_dropout,
            "target_modules": model_args.lora_target_modules,
        }
    use_features = uses_feature_cache(model_args)
    if model_args.freeze_backbone:  # recipe: a frozen run must not resume a full fine-tune
        run_info["freeze_backbone"] = {
            "train_last_stage": model_args.train_last_stage,
            "feature_cache": use_features,
        }
    return run_info


def _check_data_and_run_options(
    data_args: DataArguments, run_args: RunArguments, training_args: TrainingArguments
) -> None:
    """Reject invalid options before the output dir or the data are touched (each message names
    the option and its valid values), and warn about combinations that give silently wrong
    results."""
    from hf_longtail.data.pixel_store import PIXEL_CACHE_MODES
    from hf_longtail.data.profiles import PROFILES, validate_imbalance_factor
    from hf_longtail.data.transforms import AUTO_AUGMENT, ON_BAD_IMAGE, TRANSFORM_PROTOCOLS
    from hf_longtail.trainer import (
        LOSS_STATE_MISSING_POLICIES,
        NONFINITE_POLICIES,
        SAMPLERS,
        check_run_length,
        normalize_lr_milestones,
    )

    choices = (
        ("sampler", data_args.sampler, SAMPLERS),
        ("on_bad_image", data_args.on_bad_image, ON_BAD_IMAGE),
        ("pixel_cache", data_args.pixel_cache, PIXEL_CACHE_MODES),
        ("nonfinite_loss", run_args.nonfinite_loss, NONFINITE_POLICIES),
        ("loss_state_missing", run_args.loss_state_missing, LOSS_STATE_MISSING_POLICIES),
        ("imbalance_profile", data_args.imbalance_profile, tuple(PROFILES)),
        ("train_transform", data_args.train_transform, TRANSFORM_PROTOCOLS),
        ("auto_augment", data_args.auto_augment, (None, *AUTO_AUGMENT)),
    )
    for name, value, valid in choices:
        if value not in valid:
            raise ValueError(f"--{name} {value!r} is not valid; use one of {list(valid)}.")
    if data_args.imbalance_factor is not None:  # None: use the source as it is
        validate_imbalance_factor(data_args.imbalance_factor)
    check_number("imbalance_seed", data_args.imbalance_seed, minimum=0, integer=True)
    check_number("mixup_alpha", data_args.mixup_alpha, minimum=0)
    check_number("cutmix_alpha", data_args.cutmix_alpha, minimum=0)
    check_number("image_size", data_args.image_size, minimum=1, integer=True, allow_none=True)
    check_number("preflight_sample", data_args.preflight_sample, minimum=-1, integer=True)
    check_number(
        "max_eval_samples", data_args.max_eval_samples, minimum=1, integer=True, allow_none=True
    )
    check_number("many_shot_threshold", data_args.many_shot_threshold, minimum=0, integer=True)
    check_number("few_shot_threshold", data_args.few_shot_threshold, minimum=0, integer=True)
    if data_args.few_shot_threshold > data_args.many_shot_threshold:
        raise ValueError(
            f"--few_shot_threshold {data_args.few_shot_threshold} is above "
            f"--many_shot_threshold {data_args.many_shot_threshold}; few-shot classes have fewer "
            "training images than many-shot ones."
        )
    data_args.posthoc_tau = parse_posthoc_tau(data_args.posthoc_tau)
    _check_validation_options(data_args, training_args)
    _check_trackers(training_args)
    check_number("lr_gamma", run_args.lr_gamma, above=0)
    check_number("nonfinite_skip_limit", run_args.nonfinite_skip_limit, minimum=1, integer=True)
    if run_args.early_stopping_patience is not None:
        check_number("early_stopping_patience", run_args.early_stopping_patience, minimum=1,
                     integer=True)  # fmt: skip
        eval_strategy = str(
            getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        )
        if not training_args.metric_for_best_model or eval_strategy == "no":
            raise ValueError(
                "--early_stopping_patience needs --metric_for_best_model (e.g. balanced_accuracy, "
                "with --load_best_model_at_end true) and an --eval_strategy (epoch or steps): it "
                "stops when that validation metric stops improving."
            )
    try:
        run_args.lr_milestones = normalize_lr_milestones(run_args.lr_milestones)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--{err}") from None
    check_run_length(training_args)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        check_number(name, getattr(training_args, name), minimum=1, integer=True)
    check_number(
        "gradient_accumulation_steps", training_args.gradient_accumulation_steps, minimum=1
    )
    check_number("learning_rate", training_args.learning_rate, minimum=0)
    check_number("weight_decay", training_args.weight_decay, minimum=0)
    check_number("warmup_steps", training_args.warmup_steps, minimum=0)
    check_number("dataloader_num_workers", training_args.dataloader_num_workers, minimum=0)
    if data_args.sampler == "class_balanced" and data_args.posthoc_tau not in (None, 0.0):
        warnings.warn(
            f"--sampler class_balanced with --posthoc_tau {data_args.posthoc_tau} rebalances "
            "twice: the balanced batches already remove the training prior that the post-hoc "
            "logit adjustment subtracts again. Use one of the two.",
            UserWarning,
            stacklevel=2,
        )


def _check_trackers(training_args: TrainingArguments) -> None:
    """``--report_to tensorboard`` without TensorBoard installed fails now, naming the extra
    (transformers would only fail once the data and the model are loaded)."""
    from transformers import integrations

    reporters = training_args.report_to or []
    if isinstance(reporters, str):
        reporters = [reporters]
    if "tensorboard" in reporters and not integrations.is_tensorboard_available():
        raise ValueError(
            "--report_to tensorboard needs TensorBoard: pip install 'hf-longtail[tensorboard]' "
            "(or pass --report_to none, or another installed tracker such as wandb or trackio)."
        )


#: The special values of --validation_split (any other value names a split).
VALIDATION_CHOICES = ("auto", "heldout", "none")


def parse_posthoc_tau(value: Any) -> float | str | None:
    """``--posthoc_tau`` as ``None``, ``"auto"`` or a finite float (a flag gives a string)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"--posthoc_tau must be a number (e.g. 1.0) or 'auto'; got {value!r}."
            ) from None
    check_number("posthoc_tau", value)
    return float(value)


def _check_validation_options(data_args: DataArguments, training_args: TrainingArguments) -> None:
    """The validation options, checked before any data is loaded (what depends on the dataset's
    splits is checked by :func:`choose_validation_split` right after loading)."""
    name = data_args.validation_split
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"--validation_split must be a split name or one of {list(VALIDATION_CHOICES)}; "
            f"got {name!r}."
        )
    if name == data_args.eval_split:
        raise ValueError(
            f"--validation_split {name!r} is the evaluation split (--eval_split): the split that "
            "chooses checkpoints and tau must not be the one the results are reported on. Use "
            "another split, 'heldout' or --train_val_split FRACTION."
        )
    check_number("validation_per_class", data_args.validation_per_class, minimum=1, integer=True)
    if data_args.train_val_split is not None:
        check_number("train_val_split", data_args.train_val_split, above=0)
        if not data_args.train_val_split < 1:
            raise ValueError(
                f"--train_val_split must be a fraction in (0, 1), e.g. 0.1; got "
                f"{data_args.train_val_split!r}."
            )
        if name not in ("auto", "validation"):
            raise ValueError(
                f"--train_val_split makes the validation split; --validation_split {name!r} "
                "names another. Drop one of the two."
            )
    if data_args.posthoc_tau == "auto" and name == "none":
        raise ValueError(
            "--posthoc_tau auto chooses tau on the validation split, and --validation_split is "
            "'none'; give a validation split (auto, heldout, a split name or --train_val_split) "
            "or a fixed --posthoc_tau."
        )


def validation_load_kwargs(data_args: DataArguments) -> dict[str, Any]:
    """The ``load_long_tailed`` keywords that build the validation split the options ask for
    (``validation_per_class`` for ``heldout``, ``train_val_split``), else ``{}``."""
    if data_args.validation_split == "heldout":
        return {"validation_per_class": data_args.validation_per_class}
    if data_args.train_val_split is not None:
        return {"train_val_split": data_args.train_val_split}
    return {}


def validation_recipe(data_args: DataArguments) -> dict[str, Any] | None:
    """The validation options as recipe (``dataset.validation_options`` of the run record);
    ``None`` for the default (``auto``, no carve), so older run records compare equal."""
    if data_args.validation_split == "auto" and data_args.train_val_split is None:
        return None
    recipe: dict[str, Any] = {"validation_split": data_args.validation_split}
    if data_args.validation_split == "heldout":
        recipe["validation_per_class"] = data_args.validation_per_class
    if data_args.train_val_split is not None:
        recipe["train_val_split"] = data_args.train_val_split
    return recipe


def choose_validation_split(
    splits: Sequence[str], data_args: DataArguments, training_args: TrainingArguments
) -> str | None:
    """The name of the validation split among the loaded ``splits`` (``None``: no validation).

    ``auto``/``heldout``/``--train_val_split`` take ``validation`` when present (the dataset's
    own, or the one ``load_long_tailed`` built) and other than ``--eval_split``. Raises
    ``ValueError`` (before the model is built) for a named split that does not exist, and for
    options that need a validation split when there is none: ``--posthoc_tau auto``,
    ``--load_best_model_at_end`` / ``--metric_for_best_model`` (they would choose on the test
    split).
    """
    name = data_args.validation_split
    if name == "none":
        chosen = None
    elif name in ("auto", "heldout"):
        chosen = "validation" if "validation" in splits else None
        if chosen == data_args.eval_split:
            chosen = None
    else:
        if name not in splits:
            raise ValueError(
                f"--validation_split {name!r} is not a split of the dataset (splits: "
                f"{sorted(splits)}); use one of them, 'heldout', --train_val_split FRACTION or "
                "'none'."
            )
        chosen = name
    if chosen is None:
        needs = []
        if data_args.posthoc_tau == "auto":
            needs.append("--posthoc_tau auto")
        if training_args.load_best_model_at_end or training_args.metric_for_best_model:
            needs.append(
                "--load_best_model_at_end / --metric_for_best_model / --early_stopping_patience"
            )
        if needs:
            raise ValueError(
                f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} a validation "
                "split, and this dataset has none "
                f"(splits: {sorted(splits)}; --validation_split {name!r}): choosing on the "
                f"evaluation split {data_args.eval_split!r} would report tuned-on-test numbers. "
                "Pass --validation_split heldout (balanced, from the source training images) or "
                "--train_val_split FRACTION."
            )
    return chosen


def selection_record(
    training_args: TrainingArguments,
    data_args: DataArguments,
    validation_split: str | None,
    run_args: RunArguments | None = None,
) -> dict[str, Any]:
    """Which split chose what (``selection`` of the run record, shown on the card): the
    validation split, the split of the per-epoch evaluation, the best-checkpoint metric and the
    post-hoc tau's split, early stopping; the evaluation split is predicted once, after
    training."""
    per_epoch = None
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no":
        per_epoch = validation_split or data_args.eval_split
    best = None
    if training_args.load_best_model_at_end:
        best = {"metric": training_args.metric_for_best_model or "loss", "split": validation_split}
    stopping = None
    if run_args is not None and run_args.early_stopping_patience is not None:
        stopping = {
            "patience": run_args.early_stopping_patience,
            "metric": training_args.metric_for_best_model,
            "split": validation_split,
        }
    return {
        "validation_split": validation_split,
        "per_epoch_evaluation": per_epoch,
        "best_checkpoint": best,
        "early_stopping": stopping,
        "posthoc_tau": validation_split if data_args.posthoc_tau == "auto" else None,
        "test_split": data_args.eval_split,
    }


def classifier_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """``create_model`` keyword arguments of ``--classifier``: ``{}`` for the model's own head;
    for ``cosine`` the ``ResNetCifarConfig`` fields ``normed_linear``/``logit_scale`` (saved in
    config.json, so the model reloads with its cosine head)."""
    if model_args.classifier == "cosine":
        return {"normed_linear": True, "logit_scale": model_args.cosine_scale}
    return {}


def check_classifier(model_args: ModelArguments, loss_config) -> None:
    """Reject a classifier the model cannot have, before any data or model is loaded.

    The cosine head is a field of the CIFAR ResNets' config, so a saved model reloads with it
    (``from_pretrained``, the Hub, ``pipeline``); swapping the head of another architecture
    would save weights that its own class cannot load, so it is refused.
    """
    from hf_longtail.models import is_model

    if model_args.classifier not in CLASSIFIERS:
        raise ValueError(
            f"--classifier {model_args.classifier!r} is not valid; use one of {list(CLASSIFIERS)}."
        )
    scale = model_args.cosine_scale
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise ValueError(f"--cosine_scale must be a positive finite number; got {scale!r}.")
    if model_args.classifier == "linear":
        return
    name = model_args.model_name_or_path
    if not (is_model(name) and name.endswith("_cifar")):
        raise ValueError(
            f"--classifier cosine is available for the CIFAR ResNets (resnet20_cifar ... "
            f"resnet110_cifar), whose config saves the cosine head; {name!r} would be saved with "
            "a head its own class cannot load. Use --classifier linear with this model."
        )
    if loss_config.base != "ldam" and scale == 1.0:
        logger.warning(
            "--classifier cosine with loss %r and cosine_scale 1: the logits stay in [-1, 1], "
            "so the softmax can hardly separate the classes; set --cosine_scale (e.g. 16-30). "
            "(Only the LDAM loss applies its own scale s.)",
            loss_config.base,
        )


def _check_frozen_options(
    model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments
) -> None:
    """Reject contradictory frozen-backbone / second-stage options before any work."""
    if model_args.train_last_stage and not model_args.freeze_backbone:
        raise ValueError(
            "--train_last_stage needs --freeze_backbone (it unfreezes the last stage)."
        )
    cached = model_args.freeze_backbone and model_args.feature_cache
    if cached and not model_args.train_last_stage:
        if data_args.mixup_alpha > 0 or data_args.cutmix_alpha > 0:
            raise ValueError(
                "--mixup_alpha/--cutmix_alpha mix images, but --freeze_backbone trains on cached "
                "features; pass --feature_cache false to mix images through the frozen backbone."
            )
    if run_args.stage is not None:
        from hf_longtail.decoupled import STAGES

        if run_args.stage not in STAGES:
            raise ValueError(f"--stage {run_args.stage!r} is not valid; use one of {list(STAGES)}.")
        if not run_args.from_run:
            raise ValueError("--stage needs --from_run DIR (a finished scripts/train.py run).")
        if model_args.lora_r is not None:
            raise ValueError("--lora_r trains a model; --stage re-balances a finished one.")
        if (Path(run_args.from_run) / "adapter_config.json").is_file():
            raise ValueError(
                f"--from_run {run_args.from_run} holds a LoRA adapter, not a full model; the "
                "second stage needs one saved with --lora_merge true."
            )
    elif run_args.from_run:
        raise ValueError("--from_run is only used with --stage crt|tau_norm|lws|posthoc_la.")
