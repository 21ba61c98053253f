#!/usr/bin/env python
"""Fine-tune an image classifier on long-tailed data with CCAR / CAR and the long-tail baselines.

Usage (transformers-examples style)::

    python scripts/train.py scripts/configs/digits_ccar_car.yaml
    python scripts/train.py scripts/configs/digits_ccar_car.yaml --num_train_epochs 5
    python scripts/train.py --dataset_name uoft-cs/cifar100 --label_column_name fine_label \\
        --model_name_or_path google/vit-base-patch16-224-in21k --imbalance_factor 100 \\
        --loss la --ccar --car_weight 0.5 --output_dir outputs/vit-c100lt
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py CONFIG.yaml

A YAML/JSON file given as the first argument sets the defaults; flags after it override them.
Unknown keys in the file are an error that names them.

After training the script evaluates on the evaluation split and writes into ``output_dir``:
the model (and image processor), ``all_results.json`` (``test_*`` metrics), ``longtail_run.json``
(dataset construction, loss recipe, hyper-parameters), ``per_class_accuracy.png`` and
``confusion_matrix.png``; with ``--push_to_hub`` it then publishes them with a model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: spinning OpenMP threads are catastrophic when the cores are shared
# (dataloader workers, other processes): a ResNet-32 step measured 4.9 s instead of 0.6 s on
# 2 loaded cores. Passive waiting costs little when the cores are free. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_longtail.losses import LongTailLossConfig

logger = logging.getLogger("hf_longtail.train")

RUN_FILE = "longtail_run.json"
RESULTS_FILE = "all_results.json"
MIN_FREE_BYTES = 200 * 1024**2


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
    imbalance_factor: float = field(
        default=100.0, metadata={"help": "n_max / n_min of the long-tailed training set (>= 1)."}
    )
    imbalance_profile: str = field(default="exp", metadata={"help": "'exp', 'step' or 'pareto'."})
    imbalance_seed: int = field(default=0, metadata={"help": "Seed of the per-class subsets."})
    eval_split: str = field(default="test", metadata={"help": "Split evaluated after training."})
    train_transform: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the model's image processor, else the CIFAR protocol), 'model', "
            "'cifar10' or 'cifar100' (CIFAR protocol with that dataset's mean/std)."
        },
    )
    auto_augment: str | None = field(
        default=None, metadata={"help": "'randaugment' or 'trivialaugment' on training images."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup alpha (0 disables)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0 disables)."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Side of the CIFAR-protocol images (default 32; e.g. 16 for digits)."},
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
        default=100, metadata={"help": "Many-shot: classes with more training images than this."}
    )
    few_shot_threshold: int = field(
        default=20, metadata={"help": "Few-shot: classes with fewer training images than this."}
    )
    posthoc_tau: float | None = field(
        default=None, metadata={"help": "Post-hoc logit adjustment tau at evaluation."}
    )


_LOSS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LongTailLossConfig)}


@dataclass
class LossArguments:
    """The loss recipe; each field maps onto hf_longtail.losses.LongTailLossConfig."""

    loss: str = field(default="ce", metadata={"help": "Base loss: ce, focal, cb, ldam, la, bs."})
    ccar: bool = field(default=False, metadata={"help": "Wrap the base loss in CCAR."})
    ccar_omega: float = field(
        default=_LOSS_DEFAULTS["ccar_omega"], metadata={"help": "CCAR phase threshold omega."}
    )
    ccar_variant: str = field(
        default=_LOSS_DEFAULTS["ccar_variant"], metadata={"help": "'paper' or 'e_minus_f'."}
    )
    ccar_detach_weight: bool = field(
        default=False, metadata={"help": "CCAR as a pure reweighting (no gradient via Omega)."}
    )
    ccar_p_t_from: str = field(
        default=_LOSS_DEFAULTS["ccar_p_t_from"],
        metadata={"help": "p_t from the base loss's 'adjusted' logits or the 'raw' logits."},
    )
    car_weight: float = field(default=0.0, metadata={"help": "CAR alpha (0 disables CAR)."})
    car_beta: float = field(
        default=_LOSS_DEFAULTS["car_beta"], metadata={"help": "CAR EMA beta in [0, 1)."}
    )
    car_r0: float = field(
        default=_LOSS_DEFAULTS["car_r0"], metadata={"help": "CAR frequency-weight offset r0."}
    )
    car_tau: float = field(
        default=_LOSS_DEFAULTS["car_tau"], metadata={"help": "CAR softmax temperature."}
    )
    car_margin: float = field(
        default=_LOSS_DEFAULTS["car_margin"],
        metadata={"help": "CAR gate margin gamma in sigmoid(gamma + f_i - f_y)."},
    )
    car_weights: str = field(
        default=_LOSS_DEFAULTS["car_weights"],
        metadata={
            "help": "CAR class weights: 'frequency' (N_j/N + r0)^-1/2 or 'count' (N_j + 10)^-1/2."
        },
    )
    car_ema: str = field(
        default=_LOSS_DEFAULTS["car_ema"],
        metadata={"help": "CAR EMA: 'global' (published) or 'per_class' (batch columns only)."},
    )
    car_solver: str = field(
        default=_LOSS_DEFAULTS["car_solver"],
        metadata={"help": "CAR top singular pair: 'auto', 'exact' or 'subspace'."},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing (ce/la/bs)."})
    focal_gamma: float = field(
        default=_LOSS_DEFAULTS["focal_gamma"], metadata={"help": "Focal loss gamma."}
    )
    cb_beta: float = field(
        default=_LOSS_DEFAULTS["cb_beta"], metadata={"help": "Class-balanced beta."}
    )
    cb_loss_type: str = field(
        default=_LOSS_DEFAULTS["cb_loss_type"],
        metadata={"help": "Class-balanced loss: softmax, sigmoid or focal."},
    )
    ldam_max_m: float = field(
        default=_LOSS_DEFAULTS["ldam_max_m"], metadata={"help": "LDAM largest margin."}
    )
    ldam_s: float = field(default=_LOSS_DEFAULTS["ldam_s"], metadata={"help": "LDAM scale."})
    la_tau: float = field(default=_LOSS_DEFAULTS["la_tau"], metadata={"help": "LA loss tau."})
    drw_epoch: float | None = field(
        default=None, metadata={"help": "Deferred re-weighting from this epoch (e.g. LDAM-DRW)."}
    )
    drw_beta: float = field(
        default=_LOSS_DEFAULTS["drw_beta"], metadata={"help": "DRW effective-number beta."}
    )


@dataclass
class RunArguments:
    """Run management beyond TrainingArguments."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a different run already in output_dir."}
    )
    lr_milestones: list[float] | None = field(
        default=None, metadata={"help": "Epochs of x lr_gamma step decay (LDAM recipe: 160 180)."}
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Step-decay factor."})
    nonfinite_loss: str = field(default="raise", metadata={"help": "'raise' or 'skip'."})
    save_on_signal: bool = field(
        default=True, metadata={"help": "Checkpoint on SIGTERM/SIGINT before exiting."}
    )


DATACLASSES = (ModelArguments, DataArguments, LossArguments, RunArguments, TrainingArguments)


# ---------------------------------------------------------------------------------- parsing
def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml|CONFIG.json] [--flag value ...]`` into the argument dataclasses.

    The file (optional, first) provides defaults; flags override them. Unknown keys in the file
    raise a ``ValueError`` naming them and the closest valid names.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(DATACLASSES)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config_path = Path(argv.pop(0))
        if not config_path.is_file():
            raise FileNotFoundError(f"Config file {config_path} does not exist.")
        text = config_path.read_text(encoding="utf-8")
        values = json.loads(text) if config_path.suffix == ".json" else yaml.safe_load(text)
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a mapping of option names to values.")
        known = {f.name for dc in DATACLASSES for f in dataclasses.fields(dc) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [
                f"{k!r} (did you mean {difflib.get_close_matches(k, known, n=1)[0]!r}?)"
                if difflib.get_close_matches(k, known, n=1)
                else repr(k)
                for k in unknown
            ]
            raise ValueError(
                f"Unknown key(s) in {config_path}: {', '.join(hints)}. Valid keys are the "
                "options of scripts/train.py --help."
            )
        parser.set_defaults(**values)
    if _multi_process_without_gpu() and parser.get_default("use_cpu") is not True:
        # accelerate's multi-process launch on a machine without a GPU only becomes a gloo group
        # when use_cpu is set; otherwise every process would train alone on the same output_dir.
        parser.set_defaults(use_cpu=True)
    if "--output_dir" not in argv and parser.get_default("output_dir") is None:
        parser.set_defaults(output_dir="outputs/run")
    return parser.parse_args_into_dataclasses(args=argv)


def _multi_process_without_gpu() -> bool:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def loss_config_from_args(loss_args: LossArguments):
    """Map the flat ``--loss*`` options onto a :class:`LongTailLossConfig`."""
    values = dataclasses.asdict(loss_args)
    values["base"] = values.pop("loss")
    return LongTailLossConfig.from_dict(values)


# ------------------------------------------------------------------------ output dir safety
def prepare_output_dir(training_args: TrainingArguments, run_args: RunArguments, run_info: dict):
    """Refuse to mix two runs in one directory; pick the checkpoint to resume from.

    - ``resume_from_checkpoint=True`` (or a path) resumes the last (or that) checkpoint.
    - An ``output_dir`` holding checkpoints or a finished run of a *different* recipe is refused
      unless ``--overwrite_output_dir`` (which deletes it); the *same* recipe with checkpoints
      resumes automatically, so a re-submitted job continues instead of starting over.
    - Unwritable directories and nearly full disks fail here, before any data is loaded.

    Returns the checkpoint path to resume from, or ``None``.
    """
    out = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {out} exists and is not a directory.")
    last = _last_complete_checkpoint(out) if out.is_dir() else None
    previous = _read_json(out / RUN_FILE)
    has_run = last is not None or (out / RESULTS_FILE).exists() or previous is not None
    if run_args.overwrite_output_dir and has_run and training_args.process_index == 0:
        logger.warning("--overwrite_output_dir: deleting the previous run in %s", out)
        shutil.rmtree(out)
        last, previous, has_run = None, None, False
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    if resume is True:
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {out} holds no checkpoint-* directory."
            )
        resume = last
    elif resume in (None, False, "", "false", "False"):
        resume = None
        if has_run:
            same = previous is not None and _same_recipe(previous, run_info)
            if same and last is not None:
                logger.info("Resuming the same run from %s", last)
                resume = last
            else:
                why = "a different run" if previous is not None and not same else "a previous run"
                raise FileExistsError(
                    f"output_dir {out} already holds {why}"
                    + (f" (last checkpoint {last})" if last else "")
                    + ". Pass --overwrite_output_dir to replace it, --resume_from_checkpoint "
                    "true to continue it, or choose another --output_dir."
                )
    elif not Path(resume).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume} is not a directory.")
    elif not (Path(resume) / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume} is incomplete (no trainer_state.json: the run was "
            "killed while writing it). Resume from an earlier checkpoint, or pass "
            "--resume_from_checkpoint true to take the last complete one."
        )

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(
            f"output_dir {out} cannot be created ({err.strerror or err}): a parent is a file, "
            "is read-only or does not allow it. Choose another --output_dir."
        ) from err
    probe = out / f".write_test_{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output_dir {out} is not writable: {err}") from err
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise OSError(
            f"Only {free / 1024**2:.0f} MiB free on the disk of {out}; checkpoints need more. "
            "Free some space or choose another --output_dir."
        )
    return resume


def _last_complete_checkpoint(out: Path) -> str | None:
    """The highest ``checkpoint-N`` in ``out`` holding ``trainer_state.json`` (the Trainer writes
    it last), skipping with a warning the ones a killed run left half-written."""
    found = []
    for child in out.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        logger.warning("Ignoring incomplete checkpoint %s (no trainer_state.json).", path)
    return None


def _same_recipe(previous: dict, current: dict) -> bool:
    keys = ("model_name_or_path", "dataset", "loss")
    return all(previous.get(k) == current.get(k) for k in keys)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the final ``test_*`` metrics."""
    model_args, data_args, loss_args, run_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    if training_args.disable_tqdm:
        # --disable_tqdm silences the Trainer's bars; also those of checkpoint writing and of
        # datasets' map/load, so logs stay one line per event.
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    # Everything cheap is validated before any data or model is loaded.
    loss_config = loss_config_from_args(loss_args)
    _check_options(data_args, run_args)

    import hf_longtail
    from hf_longtail.data import (
        MixupCollator,
        build_transforms,
        class_counts,
        collate_fn,
        detect_columns,
        load_long_tailed,
        with_transforms,
    )
    from hf_longtail.metrics import long_tail_metrics, make_compute_metrics
    from hf_longtail.models import create_image_processor, create_model
    from hf_longtail.trainer import LongTailTrainer

    run_info: dict[str, Any] = {
        "hf_longtail_version": hf_longtail.__version__,
        "model_name_or_path": model_args.model_name_or_path,
        "dataset": {
            "name": data_args.dataset_name,
            "config_name": data_args.dataset_config_name,
            "imbalance_factor": data_args.imbalance_factor,
            "profile": data_args.imbalance_profile,
            "seed": data_args.imbalance_seed,
            "eval_split": data_args.eval_split,
        },
        "loss": loss_config.to_dict(),
    }
    # Process 0 inspects (and with --overwrite_output_dir deletes) the directory first; the others
    # then see what it left, so every process takes the same decision, without a race.
    with training_args.main_process_first(local=False, desc="output_dir check"):
        resume = prepare_output_dir(training_args, run_args, run_info)

    dataset = load_long_tailed(
        data_args.dataset_name,
        imbalance_factor=data_args.imbalance_factor,
        profile=data_args.imbalance_profile,
        seed=data_args.imbalance_seed,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
        config_name=data_args.dataset_config_name,
        image_root=data_args.data_dir,
        split_dir=data_args.split_dir,
    )
    if data_args.eval_split not in dataset:
        raise KeyError(
            f"eval_split={data_args.eval_split!r} is not in the dataset (splits: "
            f"{sorted(dataset)}). Pass --eval_split with one of them."
        )
    train_ds, eval_ds = dataset["train"], dataset[data_args.eval_split]
    if data_args.max_eval_samples is not None:
        # A seeded random subset: evaluation splits are often sorted by class.
        n = min(data_args.max_eval_samples, len(eval_ds))
        eval_ds = eval_ds.shuffle(seed=0).select(range(n)).flatten_indices()
    image_col, label_col = detect_columns(
        train_ds, data_args.image_column_name, data_args.label_column_name
    )
    counts = class_counts(train_ds, label_column=label_col)
    class_names = list(train_ds.features[label_col].names)
    run_info["dataset"].update(
        {
            "class_counts": counts,
            "class_names": class_names,
            "image_column": image_col,
            "label_column": label_col,
            "train_size": len(train_ds),
            "eval_size": len(eval_ds),
        }
    )

    from hf_longtail.models import is_model

    hub_kwargs = {}
    if not is_model(model_args.model_name_or_path):
        hub_kwargs = {
            "cache_dir": model_args.cache_dir,
            "revision": model_args.model_revision,
            "token": model_args.token,
        }
    # Seeded before the model is built: a from-scratch model and a new head follow --seed too.
    from transformers import set_seed

    set_seed(training_args.seed)
    model = create_model(
        model_args.model_name_or_path,
        num_labels=len(class_names),
        id2label=class_names,
        pretrained=model_args.pretrained,
        **{k: v for k, v in hub_kwargs.items() if v is not None},
    )
    processor = create_image_processor(model_args.model_name_or_path, model)
    protocol = data_args.train_transform
    if protocol == "auto":
        protocol = "cifar" if processor is None else "model"
    if protocol == "model" and processor is None:
        raise ValueError(
            f"train_transform='model' but {model_args.model_name_or_path!r} has no image "
            "processor; use --train_transform cifar."
        )
    if protocol == "model":
        train_tf, eval_tf = build_transforms(processor, auto_augment=data_args.auto_augment)
    elif data_args.image_size is not None:
        from hf_longtail.data import transforms as T

        stats = {
            "cifar10": (T.CIFAR10_MEAN, T.CIFAR10_STD),
            "cifar": (T.CIFAR10_MEAN, T.CIFAR10_STD),
        }
        stats["cifar100"] = (T.CIFAR100_MEAN, T.CIFAR100_STD)
        if protocol not in stats:
            raise ValueError(
                f"train_transform={protocol!r}: use 'auto', 'model' or {sorted(stats)}."
            )
        mean, std = stats[protocol]
        train_tf, eval_tf = T.cifar_transforms(
            mean, std, size=data_args.image_size, auto_augment=data_args.auto_augment
        )
    else:
        train_tf, eval_tf = build_transforms(protocol, auto_augment=data_args.auto_augment)
    on_bad = data_args.on_bad_image
    train_ds = with_transforms(train_ds, train_tf, image_col, label_col, on_bad_image=on_bad)
    eval_ds = with_transforms(eval_ds, eval_tf, image_col, label_col, on_bad_image=on_bad)
    if data_args.mixup_alpha > 0 or data_args.cutmix_alpha > 0:
        collator = MixupCollator(
            num_classes=len(class_names),
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
        )
    else:
        collator = collate_fn

    # The transforms produce pixel_values/labels from the raw columns: keep them.
    training_args.remove_unused_columns = False
    # The Trainer's own push would contact the Hub at construction time and on every save;
    # this script pushes once at the end, after every file is safely on disk.
    push_requested = training_args.push_to_hub
    training_args.push_to_hub = False
    trainer = LongTailTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=make_compute_metrics(
            counts,
            many_threshold=data_args.many_shot_threshold,
            few_threshold=data_args.few_shot_threshold,
            class_names=class_names,
            logit_adjustment_tau=data_args.posthoc_tau,
        ),
        loss_config=loss_config,
        class_counts=counts,
        sampler=data_args.sampler,
        label_column=label_col,
        nonfinite_loss=run_args.nonfinite_loss,
        lr_milestones=run_args.lr_milestones,
        lr_gamma=run_args.lr_gamma,
        pixel_cache=data_args.pixel_cache,
        pixel_cache_dir=data_args.pixel_cache_dir,
    )
    if run_args.save_on_signal:
        from hf_longtail.trainer import install_signal_checkpointing

        install_signal_checkpointing(trainer)
    run_info["training"] = _training_summary(training_args, trainer)
    run_info["metric_thresholds"] = {
        "many": data_args.many_shot_threshold,
        "few": data_args.few_shot_threshold,
    }
    if training_args.should_save:
        _write_json(Path(training_args.output_dir) / RUN_FILE, run_info)

    train_result = trainer.train(resume_from_checkpoint=resume)
    if getattr(trainer, "stopped_by_signal", None):
        logger.warning("Stopped by %s after saving a checkpoint.", trainer.stopped_by_signal)
        sys.exit(128 + int(trainer.stopped_by_signal_number))
    trainer.save_model()
    trainer.save_state()
    train_metrics = dict(train_result.metrics)
    train_metrics["train_samples"] = len(train_ds)

    # Final evaluation with the full metric set (lists included) on every process.
    prediction = trainer.predict(eval_ds, metric_key_prefix="test")
    test_metrics = long_tail_metrics(
        prediction.predictions,
        prediction.label_ids,
        counts,
        many_threshold=data_args.many_shot_threshold,
        few_threshold=data_args.few_shot_threshold,
        class_names=class_names,
        logit_adjustment_tau=data_args.posthoc_tau,
    )
    results = {**train_metrics, **{f"test_{k}": v for k, v in test_metrics.items()}}
    results["test_loss"] = prediction.metrics.get("test_loss")
    results.update(_peak_memory())
    if training_args.should_save:
        out = Path(training_args.output_dir)
        _write_json(out / RESULTS_FILE, results)
        from hf_longtail.metrics import confusion_matrix

        predicted = prediction.predictions.argmax(-1)
        confusion = confusion_matrix(predicted, prediction.label_ids, len(class_names))
        _write_plots(out, test_metrics, confusion, counts, class_names, data_args)
        _print_summary(test_metrics, data_args)
    if push_requested and training_args.should_save:
        _push(training_args)
    return results


def _check_options(data_args: DataArguments, run_args: RunArguments) -> None:
    """Reject invalid choice options and imbalance factors before the output dir or the data
    are touched (each message names the option and its valid values)."""
    from hf_longtail.data.pixel_store import PIXEL_CACHE_MODES
    from hf_longtail.data.profiles import validate_imbalance_factor
    from hf_longtail.data.transforms import ON_BAD_IMAGE
    from hf_longtail.trainer import NONFINITE_POLICIES, SAMPLERS

    choices = (
        ("sampler", data_args.sampler, SAMPLERS),
        ("on_bad_image", data_args.on_bad_image, ON_BAD_IMAGE),
        ("pixel_cache", data_args.pixel_cache, PIXEL_CACHE_MODES),
        ("nonfinite_loss", run_args.nonfinite_loss, NONFINITE_POLICIES),
    )
    for name, value, valid in choices:
        if value not in valid:
            raise ValueError(f"--{name} {value!r} is not valid; use one of {list(valid)}.")
    if data_args.imbalance_factor is not None:  # None: use the source as it is
        validate_imbalance_factor(data_args.imbalance_factor)


def _peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    import resource

    import torch

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def _training_summary(training_args: TrainingArguments, trainer) -> dict:
    keys = (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "optim",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "seed",
        "bf16",
        "fp16",
    )
    summary = {k: _jsonable(getattr(training_args, k)) for k in keys}
    summary["world_size"] = training_args.world_size
    summary["total_train_batch_size"] = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    summary["sampler"] = trainer.sampler_name
    summary["lr_milestones"] = trainer.lr_milestones
    summary["pixel_cache"] = trainer.pixel_cache
    return summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a results file


def _write_plots(
    out: Path, metrics: dict, confusion, counts, class_names, data_args: DataArguments
) -> None:
    from hf_longtail.metrics.plots import plot_confusion_matrix, plot_per_class_accuracy

    plot_per_class_accuracy(
        metrics["per_class_accuracy"],
        counts,
        out / "per_class_accuracy.png",
        class_names=class_names,
        many_threshold=data_args.many_shot_threshold,
        few_threshold=data_args.few_shot_threshold,
    )
    plot_confusion_matrix(
        confusion, out / "confusion_matrix.png", class_names=class_names, train_class_counts=counts
    )


def _print_summary(metrics: dict, data_args: DataArguments) -> None:
    def pct(value) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    rows = [
        ("overall accuracy", metrics["accuracy"]),
        (f"many-shot (>{data_args.many_shot_threshold})", metrics["many_shot_accuracy"]),
        ("medium-shot", metrics["medium_shot_accuracy"]),
        (f"few-shot (<{data_args.few_shot_threshold})", metrics["few_shot_accuracy"]),
        ("worst-class", metrics["worst_class_accuracy"]),
        ("balanced accuracy", metrics["balanced_accuracy"]),
        ("macro F1", metrics["macro_f1"]),
        ("ECE (15 bins)", metrics.get("ece")),
    ]
    print("\nLong-tail test metrics (%)")
    for name, value in rows:
        print(f"  {name:<24}{pct(value)}")
    print(f"  {'worst class':<24}{metrics.get('worst_class_name', metrics.get('worst_class'))}")


def _push(training_args: TrainingArguments) -> None:
    from hf_longtail.hub import PushToHubError, push_long_tail_model

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        push_long_tail_model(
            training_args.output_dir,
            repo_id=repo_id,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
        )
    except PushToHubError as err:
        # Every local file is already written; the error says how to retry.
        print(f"\n{err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
