#!/usr/bin/env python
"""Fine-tune an image classifier on long-tailed data with CCAR / CAR and the long-tail baselines.

Usage (transformers-examples style)::

    python scripts/train.py scripts/configs/digits_ccar_car.yaml
    python scripts/train.py scripts/configs/digits_ccar_car.yaml --num_train_epochs 5
    python scripts/train.py --dataset_name uoft-cs/cifar100 --label_column_name fine_label \\
        --model_name_or_path google/vit-base-patch16-224-in21k --imbalance_factor 100 \\
        --loss la --ccar --car_weight 0.5 --output_dir outputs/vit-c100lt
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py CONFIG.yaml
    python scripts/train.py scripts/configs/digits_ccar_car.yaml --freeze_backbone true
    python scripts/train.py scripts/configs/decoupled_stage.yaml --stage crt \
        --from_run outputs/digits-ccar-car --output_dir outputs/digits-crt

A YAML/JSON file (anywhere among the arguments) sets the defaults; flags override it. Unknown
keys, values of the wrong type and out-of-range options are errors that name the option, raised
before any data is loaded and before anything in ``output_dir`` is touched.

Re-running the same command continues the run from its last readable checkpoint; a different
recipe in ``output_dir`` is refused (``--overwrite_output_dir`` replaces it, but only once every
option, the data and the model are validated; ``--resume_from_checkpoint`` wins over it).

After training the script evaluates on the evaluation split and writes into ``output_dir``:
the model (and image processor), ``all_results.json`` (``test_*`` metrics), ``longtail_run.json``
(dataset construction, loss recipe, hyper-parameters), ``per_class_accuracy.png`` and
``confusion_matrix.png`` and the model card ``README.md``; with ``--push_to_hub`` it then
publishes them. ``--freeze_backbone`` trains the classifier head on cached backbone features
(:mod:`hf_longtail.features`); ``--stage crt|tau_norm|lws --from_run DIR`` runs the decoupled
second stage (:mod:`hf_longtail.decoupled`) on a finished run instead of training.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

# Before torch loads OpenMP: spinning OpenMP threads are catastrophic when the cores are shared
# (dataloader workers, other processes): a ResNet-32 step measured 4.9 s instead of 0.6 s on
# 2 loaded cores. Passive waiting costs little when the cores are free. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import HfArgumentParser, TrainingArguments

from hf_longtail.arguments import check_number, read_config_file, split_config_file
from hf_longtail.losses import LongTailLossConfig
from hf_longtail.resume import (
    OutputDirPlan,
    check_output_dir_usable,
    plan_output_dir,
    replace_previous_run,
)

logger = logging.getLogger("hf_longtail.train")


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
            "and a missing file; this many random rows per split also get their image header "
            "opened (-1: all rows; 0: none). Bad rows follow --on_bad_image."
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
    stage: str | None = field(
        default=None,
        metadata={
            "help": "Decoupled second stage (Kang et al. 2020) on --from_run: 'crt' (re-train "
            "the head, class-balanced), 'tau_norm' (tau chosen on validation) or 'lws'."
        },
    )
    from_run: str | None = field(
        default=None, metadata={"help": "With --stage: the finished run directory to start from."}
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "With --stage tau_norm: split to choose tau on (default: 'validation', else a "
            "balanced hold-out of source training images unused by the long-tailed subset)."
        },
    )
    validation_per_class: int = field(
        default=20, metadata={"help": "Images per class of the held-out validation split."}
    )


# The loss recipe is hf_longtail.losses.LongTailLossConfig itself: its fields are the options
# (--loss is an alias of --base), validated by its __post_init__ while parsing.
DATACLASSES = (ModelArguments, DataArguments, LongTailLossConfig, RunArguments, TrainingArguments)


# ---------------------------------------------------------------------------------- parsing
def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml|CONFIG.json] [--flag value ...]`` into the argument dataclasses.

    The file (optional, anywhere among the arguments) provides defaults; flags override them.
    Its values are checked against the options' types (:func:`hf_longtail.arguments.
    read_config_file`): unknown keys and wrong types raise a ``ValueError`` naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(DATACLASSES)
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


def _multi_process_without_gpu() -> bool:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# ------------------------------------------------------------------------ output dir safety
def prepare_output_dir(
    training_args: TrainingArguments, run_args: RunArguments, run_info: dict
) -> OutputDirPlan:
    """Decide resume / fresh start / replacement (:func:`hf_longtail.resume.plan_output_dir`,
    nothing is deleted here) and make sure the directory can be written, before any data is
    loaded."""
    plan = plan_output_dir(
        training_args.output_dir,
        run_info,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite=run_args.overwrite_output_dir,
    )
    check_output_dir_usable(training_args.output_dir)
    return plan


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the final ``test_*`` metrics."""
    model_args, data_args, loss_config, run_args, training_args = parse_args(argv)
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
    from hf_longtail.trainer import apply_label_smoothing_factor

    # --label_smoothing_factor (TrainingArguments) is applied by the loss: record it there.
    loss_config = apply_label_smoothing_factor(loss_config, training_args.label_smoothing_factor)
    _check_options(data_args, run_args, training_args)
    _check_classifier(model_args, loss_config)
    _check_frozen_options(model_args, data_args, run_args)
    if run_args.stage is not None:
        return _second_stage(model_args, data_args, loss_config, run_args, training_args)

    import hf_longtail
    from hf_longtail.data import (
        MixupCollator,
        class_counts,
        collate_fn,
        detect_columns,
        load_long_tailed,
        preflight_splits,
        select_transforms,
        with_transforms,
    )
    from hf_longtail.metrics import make_compute_metrics
    from hf_longtail.models import (
        create_image_processor,
        create_model,
        record_eval_preprocessing,
    )
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
        # The part of the training summary that is recipe (completed below).
        "training": {
            "seed": training_args.seed,
            "data_seed": training_args.data_seed,
            "sampler": data_args.sampler,
        },
    }
    if model_args.classifier != "linear":  # absent for the model's own head (older run files)
        run_info["classifier"] = {"type": model_args.classifier, "scale": model_args.cosine_scale}
    use_features = model_args.freeze_backbone and not model_args.train_last_stage
    use_features = use_features and model_args.feature_cache
    if model_args.freeze_backbone:  # recipe: a frozen run must not resume a full fine-tune
        run_info["freeze_backbone"] = {
            "train_last_stage": model_args.train_last_stage,
            "feature_cache": use_features,
        }
    # Process 0 inspects (and creates) the directory first; the others then see what it left,
    # so every process takes the same decision. Nothing is deleted here.
    with training_args.main_process_first(local=False, desc="output_dir check"):
        plan = prepare_output_dir(training_args, run_args, run_info)

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
    # Missing images / files in either split stop the run now, not mid-training or at the
    # final evaluation (or are dropped with --on_bad_image skip).
    sample = None if data_args.preflight_sample < 0 else data_args.preflight_sample
    checked = preflight_splits(
        {"train": train_ds, data_args.eval_split: eval_ds},
        image_col,
        on_bad_image=data_args.on_bad_image,
        sample=sample,
        seed=data_args.imbalance_seed,
    )
    train_ds, eval_ds = checked["train"], checked[data_args.eval_split]
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
    plan.check_data(run_info)  # a resume must see the data its run was started with

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
        **classifier_kwargs(model_args),
    )
    processor = create_image_processor(model_args.model_name_or_path, model)
    protocol, train_tf, eval_tf = select_transforms(
        data_args.train_transform,
        processor,
        image_size=data_args.image_size,
        auto_augment=data_args.auto_augment,
    )
    run_info["preprocessing"] = {"train_transform": protocol, "image_size": data_args.image_size}
    # The saved model's preprocessing must be this run's evaluation preprocessing.
    processor = record_eval_preprocessing(model, processor, protocol, data_args.image_size)
    on_bad = data_args.on_bad_image
    if model_args.freeze_backbone:
        from hf_longtail.features import freeze_backbone

        trainable = freeze_backbone(model, train_last_stage=model_args.train_last_stage)
        run_info["trainable_parameters"] = sum(model.get_parameter(n).numel() for n in trainable)
    if use_features:
        from hf_longtail.features import cached_features

        model.to(training_args.device)
        cache = {
            "cache_dir": model_args.feature_cache_dir,
            "image_column": image_col,
            "label_column": label_col,
            "on_bad_image": on_bad,
            "batch_size": training_args.per_device_eval_batch_size,
        }
        train_ds = cached_features(model, train_ds, eval_tf, split="train", **cache)
        eval_ds = cached_features(model, eval_ds, eval_tf, split=data_args.eval_split, **cache)
        label_col = None  # the feature datasets' ClassLabel column `labels`, detected
    else:
        train_ds = with_transforms(train_ds, train_tf, image_col, label_col, on_bad_image=on_bad)
        eval_ds = with_transforms(eval_ds, eval_tf, image_col, label_col, on_bad_image=on_bad)
    if data_args.mixup_alpha > 0 or data_args.cutmix_alpha > 0:
        collator = MixupCollator(
            num_classes=len(class_names),
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
        )
    elif use_features:
        collator = None  # rows are {features, labels} tensors: the Trainer's default collator
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
        nonfinite_skip_limit=run_args.nonfinite_skip_limit,
        lr_milestones=run_args.lr_milestones,
        lr_gamma=run_args.lr_gamma,
        pixel_cache=data_args.pixel_cache,
        pixel_cache_dir=data_args.pixel_cache_dir,
    )
    if run_args.save_on_signal:
        from hf_longtail.trainer import install_signal_checkpointing

        install_signal_checkpointing(trainer)
    run_info["training"] = trainer.training_summary()
    run_info["metric_thresholds"] = {
        "many": data_args.many_shot_threshold,
        "few": data_args.few_shot_threshold,
    }
    # Everything is validated: only now may --overwrite_output_dir delete the previous run.
    if plan.replace_previous:
        with training_args.main_process_first(local=False, desc="replacing the previous run"):
            if training_args.process_index == 0:
                replace_previous_run(plan)
    trainer.save_run_record(plan.record(run_info))

    trainer.train(resume_from_checkpoint=plan.resume)
    if getattr(trainer, "stopped_by_signal", None):
        logger.warning("Stopped by %s after saving a checkpoint.", trainer.stopped_by_signal)
        sys.exit(128 + int(trainer.stopped_by_signal_number))
    trainer.save_model()
    trainer.save_state()
    # Final evaluation with the full metric set (lists included) on every process; the trainer
    # writes all_results.json, longtail_run.json, the plots and the long-tail card.
    results = trainer.evaluate_and_save(
        eval_ds, split_name=data_args.eval_split, logit_adjustment_tau=data_args.posthoc_tau
    )
    if training_args.should_save:
        _print_summary(results, run_info["metric_thresholds"])
    if push_requested:
        from hf_longtail.hub import PushToHubError

        try:
            trainer.push_to_hub()
        except PushToHubError as err:  # every local file is already written; it says how to retry
            print(f"\n{err}", file=sys.stderr)
            sys.exit(2)
    return results


def _check_options(
    data_args: DataArguments, run_args: RunArguments, training_args: TrainingArguments
) -> None:
    """Reject invalid options before the output dir or the data are touched (each message names
    the option and its valid values), and warn about combinations that give silently wrong
    results."""
    from hf_longtail.data.pixel_store import PIXEL_CACHE_MODES
    from hf_longtail.data.profiles import PROFILES, validate_imbalance_factor
    from hf_longtail.data.transforms import AUTO_AUGMENT, ON_BAD_IMAGE, TRANSFORM_PROTOCOLS
    from hf_longtail.trainer import (
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
    check_number("posthoc_tau", data_args.posthoc_tau, allow_none=True)
    check_number("lr_gamma", run_args.lr_gamma, above=0)
    check_number("nonfinite_skip_limit", run_args.nonfinite_skip_limit, minimum=1, integer=True)
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
    if data_args.sampler == "class_balanced" and data_args.posthoc_tau:
        warnings.warn(
            f"--sampler class_balanced with --posthoc_tau {data_args.posthoc_tau} rebalances "
            "twice: the balanced batches already remove the training prior that the post-hoc "
            "logit adjustment subtracts again. Use one of the two.",
            UserWarning,
            stacklevel=2,
        )


#: Values of --train_transform.


def classifier_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    """``create_model`` keyword arguments of ``--classifier``: ``{}`` for the model's own head;
    for ``cosine`` the ``ResNetCifarConfig`` fields ``normed_linear``/``logit_scale`` (saved in
    config.json, so the model reloads with its cosine head)."""
    if model_args.classifier == "cosine":
        return {"normed_linear": True, "logit_scale": model_args.cosine_scale}
    return {}


def _check_classifier(model_args: ModelArguments, loss_config) -> None:
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
    elif run_args.from_run:
        raise ValueError("--from_run is only used with --stage crt|tau_norm|lws.")


def _second_stage(model_args, data_args, loss_config, run_args, training_args) -> dict:
    """``--stage``: the decoupled second stage on ``--from_run``, written to ``--output_dir``."""
    from hf_longtail.decoupled import run_second_stage

    result = run_second_stage(
        run_args.from_run,
        run_args.stage,
        training_args.output_dir,
        training_args,
        loss_config=loss_config,
        validation_split_name=run_args.validation_split,
        validation_per_class=run_args.validation_per_class,
        feature_cache_dir=model_args.feature_cache_dir,
        data_dir=data_args.data_dir,
        split_dir=data_args.split_dir,
        progress=not training_args.disable_tqdm,
    )
    if "tau" in result.stage_info:
        print(f"\ntau = {result.stage_info['tau']:g} ({result.stage_info['tau_selected_on']})")
    from hf_longtail.run_directory import thresholds_of

    _print_summary(result.results, thresholds_of(result.run_info))
    return result.results


def _print_summary(results: dict, thresholds: dict) -> None:
    from hf_longtail.run_directory import format_summary

    print(
        format_summary({k[5:]: v for k, v in results.items() if k.startswith("test_")}, thresholds)
    )


if __name__ == "__main__":
    main()
