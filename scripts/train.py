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
(:mod:`hf_longtail.features`); ``--stage crt|tau_norm|lws|posthoc_la --from_run DIR`` runs the decoupled
second stage (:mod:`hf_longtail.decoupled`) on a finished run instead of training.
"""

from __future__ import annotations

import logging
import os
import sys

# Before torch loads OpenMP: spinning OpenMP threads are catastrophic when the cores are shared
# (dataloader workers, other processes): a ResNet-32 step measured 4.9 s instead of 0.6 s on
# 2 loaded cores. Passive waiting costs little when the cores are free. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import HfArgumentParser, TrainingArguments  # noqa: F401  (tests use the parser)

from hf_longtail.arguments import (
    DATACLASSES,  # noqa: F401
    DataArguments,  # noqa: F401
    ModelArguments,  # noqa: F401
    RunArguments,
    check_options,
    choose_validation_split,
    classifier_kwargs,
    initial_run_record,
    lora_options,
    parse_args,
    quiet_libraries,
    selection_record,
    uses_feature_cache,
    validation_load_kwargs,
)
from hf_longtail.resume import (
    OutputDirPlan,
    check_output_dir_usable,
    lock_run_dir,
    plan_output_dir,
    replace_previous_run,
)

logger = logging.getLogger("hf_longtail.train")


# ------------------------------------------------------------------------ output dir safety
def prepare_output_dir(
    training_args: TrainingArguments, run_args: RunArguments, run_info: dict
) -> OutputDirPlan:
    """Lock the directory against a second launch (process 0, held until the process ends),
    decide resume / fresh start / replacement / nothing to do (:func:`hf_longtail.resume.
    plan_output_dir`, nothing is deleted here) and make sure the directory can be written,
    before any data is loaded."""
    out = training_args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"output_dir {out} exists and is not a directory.")
    check_output_dir_usable(out)
    if training_args.process_index == 0:
        lock_run_dir(out)
    return plan_output_dir(
        out,
        run_info,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite=run_args.overwrite_output_dir,
    )


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the final ``test_*`` metrics."""
    model_args, data_args, loss_config, run_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    quiet_libraries(training_args)
    if training_args.disable_tqdm:
        # --disable_tqdm silences the Trainer's bars; also those of checkpoint writing and of
        # datasets' map/load, so logs stay one line per event.
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    # Everything cheap is validated before any data or model is loaded.
    loss_config = check_options(model_args, data_args, loss_config, run_args, training_args)
    if run_args.stage is not None:
        return _second_stage(model_args, data_args, loss_config, run_args, training_args)

    from hf_longtail.data import (
        MixupCollator,
        class_counts,
        collate_fn,
        construction_facts,
        detect_columns,
        load_long_tailed,
        preflight_splits,
        select_transforms,
        validation_record,
        with_transforms,
    )
    from hf_longtail.metrics import make_compute_metrics
    from hf_longtail.models import (
        create_image_processor,
        create_model,
        pretrained_source,
        record_eval_preprocessing,
    )
    from hf_longtail.trainer import LongTailTrainer

    run_info = initial_run_record(model_args, data_args, loss_config, training_args)
    use_features = uses_feature_cache(model_args)
    # Process 0 inspects (and creates) the directory first; the others then see what it left,
    # so every process takes the same decision. Nothing is deleted here.
    with training_args.main_process_first(local=False, desc="output_dir check"):
        plan = prepare_output_dir(training_args, run_args, run_info)
    if plan.finished:  # this very run, finished: change nothing, show what it measured
        return _finished_results(training_args.output_dir, plan.previous)

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
        **validation_load_kwargs(data_args),
    )
    if data_args.eval_split not in dataset:
        raise KeyError(
            f"eval_split={data_args.eval_split!r} is not in the dataset (splits: "
            f"{sorted(dataset)}). Pass --eval_split with one of them."
        )
    val_name = choose_validation_split(list(dataset), data_args, training_args)
    splits = {"train": dataset["train"], data_args.eval_split: dataset[data_args.eval_split]}
    if val_name is not None:
        splits[val_name] = dataset[val_name]
    facts = construction_facts(dataset, data_args.eval_split)
    if data_args.max_eval_samples is not None:
        # A seeded random subset: evaluation splits are often sorted by class. Not flattened:
        # the indices mapping keeps each row's source row for the bad-image messages.
        for name in [n for n in splits if n != "train"]:
            n = min(data_args.max_eval_samples, len(splits[name]))
            if n < len(splits[name]) and name == data_args.eval_split:
                facts["eval_split_origin"]["max_eval_samples"] = n
            splits[name] = splits[name].shuffle(seed=0).select(range(n))
    image_col, label_col = detect_columns(
        splits["train"], data_args.image_column_name, data_args.label_column_name
    )
    # Missing images / files in any split stop the run now, not mid-training or at the
    # final evaluation (or are dropped with --on_bad_image skip). The evaluation splits are
    # decoded in full (a truncated file has an intact header): they are read to the end by
    # the evaluation anyway, and the final one comes after the whole training.
    sample = None if data_args.preflight_sample < 0 else data_args.preflight_sample
    before = {name: len(ds) for name, ds in splits.items()}
    splits = preflight_splits(
        splits,
        image_col,
        on_bad_image=data_args.on_bad_image,
        sample=sample,
        seed=data_args.imbalance_seed,
        decode=[] if sample == 0 else [n for n in splits if n != "train"],
    )
    dropped = {n: before[n] - len(ds) for n, ds in splits.items() if len(ds) != before[n]}
    train_ds, eval_ds = splits["train"], splits[data_args.eval_split]
    val_ds = splits[val_name] if val_name is not None else None
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
            "validation": validation_record(dataset, val_name, val_ds),
            **facts,
        }
    )
    if dropped:  # --on_bad_image skip: what the counts and sizes above leave out
        run_info["dataset"]["unreadable_dropped"] = dropped
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
    run_info["base_model"] = pretrained_source(model_args.model_name_or_path, model_args.pretrained)
    lora = lora_options(model_args)
    if lora is not None:  # after the processor: it is read from the plain model
        from hf_longtail.models.lora import apply_lora, trainable_parameters

        model = apply_lora(model, lora, base_model_name_or_path=run_info["base_model"])
        run_info["trainable_parameters"] = trainable_parameters(model)
        run_info["lora_saved_as"] = "merged" if model_args.lora_merge else "adapter"
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
        if val_ds is not None:
            val_ds = cached_features(model, val_ds, eval_tf, split=val_name, **cache)
        label_col = None  # the feature datasets' ClassLabel column `labels`, detected
    else:
        train_ds = with_transforms(train_ds, train_tf, image_col, label_col, on_bad_image=on_bad)
        eval_ds = with_transforms(eval_ds, eval_tf, image_col, label_col, on_bad_image=on_bad)
        if val_ds is not None:
            val_ds = with_transforms(val_ds, eval_tf, image_col, label_col, on_bad_image=on_bad)
    if val_ds is None and training_args.eval_strategy != "no":
        logger.warning(
            "No validation split: the per-epoch evaluation reports the evaluation split %r, for "
            "monitoring only (nothing is chosen on it). --validation_split heldout or "
            "--train_val_split FRACTION give one.",
            data_args.eval_split,
        )
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
        # Per-epoch evaluation, the best checkpoint and early stopping see the validation split;
        # the evaluation (test) split is predicted once, by evaluate_and_save below.
        eval_dataset=val_ds if val_ds is not None else eval_ds,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=make_compute_metrics(
            counts,
            many_threshold=data_args.many_shot_threshold,
            few_threshold=data_args.few_shot_threshold,
            class_names=class_names,
            # A fixed tau shows in the per-epoch metrics; 'auto' is chosen after training.
            logit_adjustment_tau=None if data_args.posthoc_tau == "auto" else data_args.posthoc_tau,
        ),
        loss_config=loss_config,
        class_counts=counts,
        sampler=data_args.sampler,
        label_column=label_col,
        nonfinite_loss=run_args.nonfinite_loss,
        loss_state_missing=run_args.loss_state_missing,
        nonfinite_skip_limit=run_args.nonfinite_skip_limit,
        lr_milestones=run_args.lr_milestones,
        lr_gamma=run_args.lr_gamma,
        pixel_cache=data_args.pixel_cache,
        pixel_cache_dir=data_args.pixel_cache_dir,
        shot_thresholds={
            "many": data_args.many_shot_threshold,
            "few": data_args.few_shot_threshold,
        },
    )
    if run_args.save_on_signal:
        from hf_longtail.trainer import install_signal_checkpointing

        install_signal_checkpointing(trainer)
    run_info["training"] = trainer.training_summary()
    run_info["selection"] = selection_record(training_args, data_args, val_name, run_args)
    if run_args.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(run_args.early_stopping_patience))
    # A checkpoint past the run's length, unreadable, of another recipe or without the loss
    # state it needs is refused here, before the run record is rewritten.
    trainer.check_resume(plan.resume)
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
    if model_args.lora_merge:
        from hf_longtail.models.lora import merge_trainer_model

        merge_trainer_model(trainer)
    if data_args.posthoc_tau is not None:
        # Folded into the classifier bias before saving: the saved model predicts what is
        # reported, and the test split below is evaluated (once) with the adjustment inside.
        posthoc = trainer.apply_posthoc_adjustment(
            data_args.posthoc_tau, val_ds, validation_split=val_name
        )
        logger.info(
            "Post-hoc logit adjustment tau = %g (%s), folded into the classifier bias.",
            posthoc["tau"],
            f"chosen on {posthoc['selected_on']}" if posthoc["selected_on"] else "given",
        )
    trainer.save_model()
    trainer.save_state()
    # Final evaluation with the full metric set (lists included) on every process; the trainer
    # writes all_results.json, longtail_run.json, the plots and the long-tail card.
    results = trainer.evaluate_and_save(eval_ds, split_name=data_args.eval_split)
    if training_args.should_save:
        _print_summary(results, trainer.shot_thresholds)
    if push_requested:
        from hf_longtail.hub import PushToHubError

        try:
            trainer.push_to_hub()
        except PushToHubError as err:  # every local file is already written; it says how to retry
            print(f"\n{err}", file=sys.stderr)
            end_training(trainer)
            sys.exit(2)
    end_training(trainer)
    return results


def _finished_results(output_dir: str, record: dict | None) -> dict:
    """The ``all_results.json`` of a finished run, printed as the run printed it; no file is
    written or changed."""
    import json

    from hf_longtail.run_directory import RESULTS_FILE, thresholds_of

    path = os.path.join(output_dir, RESULTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
        print(f"\n{output_dir} holds a finished run, but {path} cannot be read.", file=sys.stderr)
    if any(k.startswith("test_") for k in results):
        _print_summary(results, thresholds_of(record))
    return results


def end_training(trainer) -> None:
    """``Trainer.end()`` (transformers >= 5.x that has it): finish the trackers (flush their
    event files) and destroy the process group, once everything collective is done."""
    end = getattr(trainer, "end", None)
    if callable(end):
        end()


def _second_stage(model_args, data_args, loss_config, run_args, training_args) -> dict:
    """``--stage``: the decoupled second stage on ``--from_run``, written to ``--output_dir``."""
    from hf_longtail.decoupled import run_second_stage

    result = run_second_stage(
        run_args.from_run,
        run_args.stage,
        training_args.output_dir,
        training_args,
        loss_config=loss_config,
        validation_split_name=data_args.validation_split,
        validation_per_class=data_args.validation_per_class,
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
