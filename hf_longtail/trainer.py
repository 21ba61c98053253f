"""``LongTailTrainer``: a ``transformers.Trainer`` that trains with the long-tail losses.

It composes the independent parts of the package:

- the loss (:func:`hf_longtail.losses.build_loss`: base loss, optional CCAR reweighting and the
  CAR spectral regularizer) replaces the model's own loss in :meth:`LongTailTrainer.compute_loss`;
- the training-set class counts come from the long-tailed dataset
  (:func:`hf_longtail.data.class_counts`) unless given;
- an optional class-aware sampler (:mod:`hf_longtail.data.samplers`) replaces the random one.

A plain ``Trainer`` user switches by changing one class name::

    trainer = LongTailTrainer(model=model, args=args, train_dataset=ds["train"],
                              eval_dataset=ds["test"], loss_config=LongTailLossConfig(ccar=True,
                              car_weight=0.5))

Contract of the training step (what is identical to the parent class and what is not):

- The loss is the batch mean of the per-sample loss plus the CAR term, computed in float32 with
  autocast disabled (the logits are upcast), whatever ``bf16``/``fp16`` says.
- Gradient accumulation: the loss is a per-micro-batch mean and the parent divides it by the
  number of accumulation steps, so ``k`` equal micro-batches of size ``b`` give the same gradient
  as one batch of ``k * b`` for every per-sample loss (CE, focal, CB, LDAM, LA, BS, with or without
  CCAR). The trainer sets ``model_accepts_loss_kwargs = False`` (its loss never receives
  ``num_items_in_batch``): every supported transformers release then divides by the
  accumulation steps, also for models whose ``forward`` takes ``**kwargs`` (ViT), where
  releases without ``loss_is_scaled_for_ga`` (5.16 and older) would otherwise assume the model
  had normalised the loss and give ``k`` times the gradient. Two parts are per micro-batch
  instead: the CAR regularizer treats each micro-batch as one CAR batch (its EMA advances once
  per micro-batch), which keeps its memory at one micro-batch; and DRW's
  ``weight_reduction="weighted_mean"`` (the LDAM-DRW default) renormalises the class weights
  within each micro-batch, as it does within each process under DDP (``weight_reduction="mean"``
  is exact).
- Non-finite training steps (``nonfinite_loss``): NaN/inf logits are detected before the loss
  runs (so the CAR EMA never absorbs them), on all processes at once under DDP (the CAR
  all-reduces need every process to run the loss or none), a non-finite loss after it names the
  loss part(s);
  ``"raise"`` raises :class:`NonFiniteLossError` with the step number, ``"skip"`` gives every
  parameter an exact zero gradient for that batch and counts it.
- Data randomness: the training sampler is wrapped in
  :class:`~hf_longtail.data.BatchSeededSampler`, which re-seeds the host RNGs before each batch
  from ``(seed, epoch, batch index)``; with ``dataloader_num_workers=0`` a run resumed mid-epoch
  then reproduces the uninterrupted run exactly (order, augmentation, loss state).
- Input pipeline (``pixel_cache``): a dataset prepared with
  :func:`~hf_longtail.data.with_transforms` whose transform the batched fast path supports is
  decoded (and resized) once into a uint8 pixel store and augmented batch-wise with a per-batch
  generator seeded from ``(seed, epoch, batch index)`` (:mod:`hf_longtail.data.pixel_store`):
  batches are then identical whatever ``dataloader_num_workers`` and on a mid-epoch resume;
  the class counts, label checks and samplers keep reading the original ``datasets.Dataset``.
- ``compute_loss`` also runs on evaluation batches: there the loss module is in eval mode, so
  the CAR EMA and the DRW schedule never advance outside training steps.
- The loss (config, class counts and names, and its state: CAR EMA confusion matrix, singular
  vectors, step; the DRW epoch) is written into every checkpoint and into the saved model by
  :meth:`~hf_longtail.losses.LongTailLoss.save_pretrained` (``longtail_loss.json`` +
  ``longtail_loss.safetensors``, before ``trainer_state.json``), so
  ``LongTailLoss.from_pretrained(checkpoint or output_dir)`` rebuilds it exactly; its state is
  restored by ``resume_from_checkpoint`` on every process (checkpoints of older releases, with
  ``longtail_loss_state.pt``, still resume).
- ``TrainingArguments.label_smoothing_factor`` becomes the loss's ``label_smoothing`` (bases
  ``ce``, ``la``, ``bs``); it is refused for a base that cannot smooth or when the loss config
  sets a different value. ``compute_loss_func`` is refused: the loss is ``loss_config``.
- Resuming (:meth:`LongTailTrainer.train`): ``resume_from_checkpoint=True`` takes the last
  *readable* checkpoint (:mod:`hf_longtail.resume`), and a checkpoint written with another loss,
  other class counts, sampler or seed (its ``longtail_recipe.json``) is refused before loading.
- Never written: a checkpoint or model whose weights are not finite, and the ``hub_token``
  (``training_args.bin`` is saved with ``hub_token=None``).
- Warned: a class-balanced sampler with a loss that corrects for the prior again, and a loss
  that grows by ``divergence_factor`` without NaN. With :func:`install_signal_checkpointing`,
  DataLoader workers ignore SIGTERM / SIGINT so the main process can checkpoint.
- Cached backbone features: a batch with a ``features`` entry and no ``pixel_values`` (a split
  from :func:`hf_longtail.features.cached_features`) goes through the model's classifier head
  only (:func:`hf_longtail.features.find_classifier`), so a frozen-backbone head trains in
  seconds with every loss, sampler and metric, and ``save_model`` still writes the full model.
  Single process only (the head bypasses the DDP wrapper).
- Logged with the Trainer's own ``log`` (so every ``report_to`` integration gets them), averaged
  over the logging window and across processes: ``base_loss``, ``ccar_weight_mean``,
  ``ccar_weight_head``, ``ccar_weight_tail``, ``car_sigma``, ``car_loss``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_longtail.class_counts import ClassCounts, ShotThresholds
from hf_longtail.disk_errors import naming_write_failures
from hf_longtail.losses import LongTailLossConfig, build_loss
from hf_longtail.losses.total_loss import LOSS_CONFIG_NAME, LOSS_WEIGHTS_NAME
from hf_longtail.resume import (
    CHECKPOINT_RECIPE_FILE,
    PROGRESS_FILE,
    ResumeMismatchError,
    _safetensors_problem,
    checkpoint_problem,
    checkpoint_step,
    last_readable_checkpoint,
    lock_run_dir,
    read_progress,
    recipe_changes,
    release_run_dir,
)
from hf_longtail.run_directory import (
    RUN_FILE,
    jsonable,
    peak_memory,
    write_evaluation,
    write_json,
)

logger = logging.getLogger(__name__)

#: The loss-state file of checkpoints written before ``LongTailLoss.save_pretrained`` (read only).
LEGACY_LOSS_STATE_NAME = "longtail_loss_state.pt"
NONFINITE_POLICIES = ("raise", "skip")
#: What a resume does with a checkpoint whose loss state (CAR's EMA) is missing or unreadable.
LOSS_STATE_MISSING_POLICIES = ("refuse", "fresh")
SAMPLERS = ("random", "class_balanced", "sqrt", "progressive")
#: A loss whose recent training losses all exceed this multiple of its first ones has diverged.
DIVERGENCE_FACTOR = 100.0
_DIVERGENCE_REFERENCE_STEPS = 3
# The files a checkpoint or a saved model writes, in order (to name the one a failed write was
# writing; see _written_files).
_LOSS_FILES = (
    LOSS_WEIGHTS_NAME + ".tmp",
    LOSS_WEIGHTS_NAME,
    LOSS_CONFIG_NAME + ".tmp",
    LOSS_CONFIG_NAME,
)
_FULL_MODEL_FILES = ("config.json", "model.safetensors")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json")
_TRAINING_STATE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "trainer_state.json",
)
_DIVERGENCE_WINDOW = 5


class NonFiniteLossError(FloatingPointError):
    """Raised when a training step produces a non-finite loss (``nonfinite_loss="raise"``)."""


class _EpochCallback(TrainerCallback):
    """Drives epoch-based loss schedules (DRW) from the Trainer's own epoch counter.

    The loss sees the fractional epoch ``state.epoch`` at the start of every optimizer step (a
    pure function of the global step), so a fractional ``drw_epoch`` switches at the right step
    and a run resumed mid-epoch sees exactly the epochs of the uninterrupted run.
    """

    def __init__(self, trainer: LongTailTrainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume ``state.epoch`` is restored from trainer_state.json before this fires.
        self._trainer.loss_fn.set_epoch(float(state.epoch or 0.0))
        # The parent has just zeroed its running loss sum; a resumed run continues the sum of
        # its checkpoint, so train_loss is the whole run's, summed in the uninterrupted order.
        progress = self._trainer._resumed_progress
        if progress is not None:
            self._trainer._total_loss_scalar = float(progress["train_loss_sum"])

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._trainer.loss_fn.set_epoch(float(state.epoch or 0.0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._trainer.loss_fn.set_epoch(float(state.epoch or 0.0))

    def on_epoch_end(self, args, state, control, **kwargs):
        # A countdown a person can read ("epoch 5/30"), beside the logs' fractional epochs.
        if state.is_world_process_zero:
            logger.info(
                "epoch %d/%d done (step %d/%d)",
                round(state.epoch or 0),
                math.ceil(state.num_train_epochs or 0),
                state.global_step,
                state.max_steps,
            )


class LongTailTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the configured long-tail loss.

    Args:
        model, args, **kwargs: as for :class:`transformers.Trainer`.
        loss_config: a :class:`~hf_longtail.losses.LongTailLossConfig` (or its ``dict``) naming
            the base loss and the CCAR / CAR settings. ``None`` means plain cross-entropy.
        class_counts: training-set images per class (length = number of labels). ``None`` takes
            them from ``train_dataset`` via :func:`hf_longtail.data.class_counts`.
        sampler: ``"random"`` (the parent's), ``"class_balanced"``, ``"sqrt"`` or
            ``"progressive"``: a class-aware order drawn identically on every process from
            ``(args.seed, epoch)``; ``accelerate`` then hands each process a disjoint share.
        label_column: the label column of ``train_dataset`` (for the class counts and the
            sampler); detected from the ``ClassLabel`` feature when ``None``.
        nonfinite_loss: ``"raise"`` stops at the first non-finite training loss, naming the step
            and the loss part; ``"skip"`` zeroes that step's gradient contribution and counts it
            in ``skipped_nonfinite_steps``.
        nonfinite_skip_limit: with ``"skip"``, stop with :class:`NonFiniteLossError` once this
            many consecutive training batches were skipped, or once more than half of the
            batches were skipped after ``2 * nonfinite_skip_limit`` of them (a run that skips most
            of its steps learns nothing while looking alive).
        divergence_factor: warn (once, naming the step) when the last 5 training losses all
            exceed this multiple of the smallest of the first 3 (a run diverging without
            producing NaN); ``diverged_at_step`` records the step. ``None`` disables the check.
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_gamma`` after a
            linear warm-up of ``args.warmup_steps`` (the LDAM-DRW CIFAR recipe: warm-up 5 epochs,
            milestones 160 and 180, gamma 0.01 in its code, i.e. lr x0.01 then x0.0001). Epochs
            are counted in real optimizer steps per epoch, also when ``max_steps`` is set.
            ``None`` keeps ``args.lr_scheduler_type``.
        lr_gamma: the factor applied at each milestone.

    ``args.label_smoothing_factor`` is applied by the loss (see
    :func:`apply_label_smoothing_factor`); ``compute_loss_func`` is not accepted (a
    ``ValueError`` says what to do instead).
        pixel_cache: ``"auto"`` (default), ``"on"`` or ``"off"``: the decode-once fast path of
            :func:`hf_longtail.data.pixel_dataset` for the train/eval/test datasets (``"auto"``:
            when the transform is supported and the store fits ``pixel_cache_max_bytes``;
            ``"on"``: an error names why it cannot be used). On the fast path the DataLoader
            runs in the main process (0 workers) unless the augmentation resizes every image
            (random-resized crops), where ``dataloader_num_workers`` applies.
        pixel_cache_dir: where pixel stores are kept (default: ``default_cache_dir()`` for
            datasets backed by Arrow files, memory for in-memory datasets).
        pixel_cache_max_bytes: the size limit of ``"auto"``.
        shot_thresholds: ``{"many": 100, "few": 20}`` by default: the shot groups of this run
            (:mod:`hf_longtail.class_counts`), for the loss's head/tail statistics (head =
            many-shot), the final metrics, the plots and the card (:meth:`evaluate_and_save`).
        loss_state_missing: what a resume does with a checkpoint that holds no readable loss
            state (``longtail_loss.safetensors``) while the loss has state to restore (CAR's
            EMA confusion estimate and singular vectors): ``"refuse"`` (default) raises
            ``FileNotFoundError`` naming the checkpoint, the file and this option before any
            weight is loaded; ``"fresh"`` resumes with a freshly initialised loss state (a
            warning says so). A loss without such state (plain CE, CCAR alone, LA, ...) resumes
            either way without a message.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        loss_config: LongTailLossConfig | dict | None = None,
        class_counts: Sequence[int] | None = None,
        sampler: str = "random",
        label_column: str | None = None,
        nonfinite_loss: str = "raise",
        lr_milestones: Sequence[float] | None = None,
        lr_gamma: float = 0.1,
        nonfinite_skip_limit: int = 10,
        divergence_factor: float | None = DIVERGENCE_FACTOR,
        pixel_cache: str = "auto",
        pixel_cache_dir: str | os.PathLike | None = None,
        pixel_cache_max_bytes: int | None = None,
        shot_thresholds: Mapping[str, float] | None = None,
        loss_state_missing: str = "refuse",
        **kwargs: Any,
    ) -> None:
        if loss_state_missing not in LOSS_STATE_MISSING_POLICIES:
            raise ValueError(
                f"loss_state_missing={loss_state_missing!r} is not valid; use one of "
                f"{LOSS_STATE_MISSING_POLICIES}."
            )
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_loss={nonfinite_loss!r} is not valid; use one of {NONFINITE_POLICIES}."
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not valid; use one of {SAMPLERS}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "LongTailTrainer computes its loss from loss_config (base loss, CCAR, CAR), so "
                "compute_loss_func would be silently ignored. Express the loss as a "
                "LongTailLossConfig (a custom base loss can be added with "
                "hf_longtail.losses.register_base_loss), override compute_loss in a subclass, or "
                "use transformers.Trainer for a loss of your own."
            )
        if isinstance(nonfinite_skip_limit, bool) or not isinstance(nonfinite_skip_limit, int):
            raise TypeError(
                f"nonfinite_skip_limit must be an int >= 1; got {nonfinite_skip_limit!r}"
            )
        if nonfinite_skip_limit < 1:
            raise ValueError(f"nonfinite_skip_limit must be >= 1; got {nonfinite_skip_limit}")
        if divergence_factor is not None and not (
            isinstance(divergence_factor, (int, float)) and divergence_factor > 1
        ):
            raise ValueError(f"divergence_factor must be > 1 or None; got {divergence_factor!r}")
        from hf_longtail.data.pixel_store import DEFAULT_MAX_BYTES, PIXEL_CACHE_MODES

        if pixel_cache not in PIXEL_CACHE_MODES:
            raise ValueError(
                f"pixel_cache={pixel_cache!r} is not valid; use one of {PIXEL_CACHE_MODES}."
            )
        self.pixel_cache = pixel_cache
        self.shot_thresholds = ShotThresholds.coerce(shot_thresholds).to_dict()
        self.pixel_cache_dir = pixel_cache_dir
        self.pixel_cache_max_bytes = pixel_cache_max_bytes or DEFAULT_MAX_BYTES
        self._pixel_datasets: dict[int, tuple[Any, Any]] = {}
        if isinstance(loss_config, dict):
            loss_config = LongTailLossConfig.from_dict(loss_config)
        loss_config = loss_config if loss_config is not None else LongTailLossConfig()
        smoothing = getattr(args, "label_smoothing_factor", 0.0) if args is not None else 0.0
        self.loss_config = apply_label_smoothing_factor(loss_config, smoothing)
        self.sampler_name = sampler
        self.label_column = label_column
        self.nonfinite_loss = nonfinite_loss
        self.loss_state_missing = loss_state_missing
        self.nonfinite_skip_limit = nonfinite_skip_limit
        self.divergence_factor = divergence_factor
        self.diverged_at_step: int | None = None
        self.lr_milestones = normalize_lr_milestones(lr_milestones)
        self.lr_gamma = float(lr_gamma)
        self.skipped_nonfinite_steps = 0
        self._consecutive_skips = 0
        self._train_batches = 0
        self._first_losses: list[float] = []
        self._recent_losses: deque[float] = deque(maxlen=_DIVERGENCE_WINDOW)
        self._worker_ignored_signals: tuple[int, ...] = ()
        check_run_length(args)
        _warn_double_rebalancing(sampler, self.loss_config)
        self._stat_sums: dict[str, float] = {}
        self._stat_steps = 0
        self._resumed_progress: dict[str, Any] | None = None
        self._train_started: float | None = None
        self._holds_lock = False
        # (checkpoint, its step, this run's planned steps), set by check_resume.
        self._resume_plan: tuple[str, int, int] | None = None

        train_dataset = kwargs.get("train_dataset")
        self.uses_cached_features = _uses_features(train_dataset, kwargs.get("eval_dataset"))
        if self.uses_cached_features:
            if args is not None and args.world_size > 1:
                raise ValueError(
                    "Training on cached features runs the classifier head outside the "
                    "distributed wrapper; run it in a single process (it takes seconds)."
                )
            if args is not None and args.remove_unused_columns:
                # The Trainer would drop the `features` column: the model's forward has no such
                # argument (the head is called directly).
                args.remove_unused_columns = False
        if class_counts is None:
            if train_dataset is None:
                raise ValueError(
                    "LongTailTrainer needs the training class counts: pass class_counts=[...] or a "
                    "train_dataset with a ClassLabel column."
                )
            from hf_longtail.data import class_counts as dataset_class_counts

            class_counts = dataset_class_counts(train_dataset, label_column=label_column)
        elif train_dataset is not None:
            _check_label_range(train_dataset, label_column, len(class_counts))
        self.class_counts = ClassCounts.coerce(class_counts).to_list()  # the one count rule
        _check_num_labels(model, len(self.class_counts))
        # Built before super().__init__ so a bad config fails before any device work starts.
        self.loss_fn = build_loss(
            self.loss_config,
            self.class_counts,
            class_names=_class_names(model, train_dataset, label_column, len(self.class_counts)),
            many_threshold=self.shot_thresholds["many"],
        )

        super().__init__(model=model, args=args, **kwargs)
        self.loss_fn.to(self.args.device)
        # compute_loss returns a per-micro-batch mean: the parent must divide it by the
        # accumulation steps, which makes equal micro-batches sum to the large-batch mean.
        # Releases with loss_is_scaled_for_ga (5.20.2 has it) read it; older ones decide from
        # model_accepts_loss_kwargs, which is True for a forward(**kwargs) such as ViT's and
        # would skip the division. Our loss never sees num_items_in_batch, so it is False.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        # The smoothing is in the loss (apply_label_smoothing_factor); never a second time.
        self.label_smoother = None
        self.add_callback(_EpochCallback(self))
        from hf_longtail.diagnostics import DiagnosticsCallback

        self.add_callback(DiagnosticsCallback(self))  # confusion-matrix images in the trackers

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run ``model`` without its labels and apply the long-tail loss to its logits.

        Returns the float32 scalar ``base (+CCAR) + CAR`` for the batch, a per-batch mean
        (``num_items_in_batch`` is not used: see the module docstring on accumulation).
        """
        if "labels" not in inputs:
            raise KeyError(
                "LongTailTrainer.compute_loss needs a 'labels' entry in the batch; check the "
                "data collator / transform output keys (expected 'pixel_values' and 'labels')."
            )
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if "features" in model_inputs and "pixel_values" not in model_inputs:
            outputs = self._classify_features(model, model_inputs["features"])
        else:
            outputs = model(**model_inputs)
        logits = _logits_of(outputs)

        training = model.training
        # Non-finite logits are caught before the loss sees them: the CAR EMA would otherwise
        # absorb the NaN (poisoning every later step) and the loss's own check would raise
        # without the step number.
        if training:
            local, total = self._count_nonfinite_logits(logits)
            if total:
                details = {"nonfinite_logits": total, "on_this_process": local}
                loss = self._nonfinite_step(model, ["logits"], details)
                return (loss, outputs) if return_outputs else loss
        self.loss_fn.train(training)
        device_type = logits.device.type
        # The loss always runs in float32: autocast would otherwise re-lower the matmuls of
        # the CAR power iteration and the log-softmax of the base loss.
        with torch.autocast(device_type=device_type, enabled=False):
            loss = self.loss_fn(logits.float(), labels)

        if training:
            loss = self._check_finite(loss, model)
        return (loss, outputs) if return_outputs else loss

    def _classify_features(self, model: nn.Module, features: torch.Tensor) -> Any:
        """Logits of cached backbone features: the model's classifier head alone."""
        from transformers.modeling_outputs import ImageClassifierOutput

        from hf_longtail.features import find_classifier

        _, head = find_classifier(self.accelerator.unwrap_model(model))
        weight = next(head.parameters(), None)
        if weight is not None:
            features = features.to(device=weight.device, dtype=weight.dtype)
        return ImageClassifierOutput(logits=head(features))

    def _count_nonfinite_logits(self, logits: torch.Tensor) -> tuple[int, int]:
        """``(here, all processes)``: non-finite logits of this micro-batch, and their sum over
        processes under ``torch.distributed``, so that every process takes the same branch: CAR
        all-reduces inside the loss, and a process that skipped the loss while another ran it
        would mismatch their collectives. One reduction (plus one tiny all-reduce under DDP)."""
        detached = logits.detach()
        local = 0
        if not bool(torch.isfinite(detached.float().sum())):
            local = int((~torch.isfinite(detached)).sum())  # 0: a finite sum that overflowed
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([local], device=logits.device, dtype=torch.int64)
            torch.distributed.all_reduce(flag)
            return local, int(flag.item())
        return local, local

    def _check_finite(self, loss: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        value = float(loss.detach())  # one host sync per micro-batch, as the finiteness test
        self._train_batches += 1
        if math.isfinite(value):
            self._consecutive_skips = 0
            self._accumulate_stats()
            self._watch_divergence(value)
            return loss
        parts = {k: float(v) for k, v in self.loss_fn.last_stats.items()}
        bad = [k for k, v in parts.items() if not math.isfinite(v)] or ["total"]
        return self._nonfinite_step(model if model is not None else self.model, bad, parts)

    def _nonfinite_step(self, model: nn.Module, bad: list[str], parts: dict) -> torch.Tensor:
        """Apply ``nonfinite_loss`` to a training step whose ``bad`` parts are not finite."""
        step = self.state.global_step + 1
        epoch = float(self.state.epoch or 0.0)
        if self.nonfinite_loss == "raise":
            raise NonFiniteLossError(
                f"Non-finite loss at training step {step} (epoch {epoch:.3f}); non-finite "
                f"part(s): {', '.join(bad)}; details: {parts}. Lower the learning rate, enable "
                "gradient clipping (max_grad_norm), check the batch for NaN/inf pixels, or pass "
                "nonfinite_loss='skip'."
            )
        self.skipped_nonfinite_steps += 1
        self._consecutive_skips += 1
        if "logits" in bad:  # the loss did not run, so _check_finite did not count this batch
            self._train_batches += 1
        logger.warning("Skipping non-finite loss at step %d (parts: %s)", step, ", ".join(bad))
        limit = self.nonfinite_skip_limit
        mostly = (
            self._train_batches >= 2 * limit
            and self.skipped_nonfinite_steps * 2 > self._train_batches
        )
        if self._consecutive_skips >= limit or mostly:
            raise NonFiniteLossError(
                f"nonfinite_loss='skip' skipped {self.skipped_nonfinite_steps} of "
                f"{self._train_batches} training batches ({self._consecutive_skips} in a row, "
                f"last at step {step}, part(s): {', '.join(bad)}): the run is not learning. "
                f"Stopped before saving anything more (nonfinite_skip_limit={limit}); the last "
                "checkpoint is untouched. Lower the learning rate, enable gradient clipping "
                "(max_grad_norm), or check the data for NaN/inf pixels."
            )
        # A zero built from the parameters, not from the non-finite loss: every parameter gets
        # an exact zero gradient (0 * NaN would be NaN), so this batch contributes nothing and
        # under DDP every gradient hook still fires.
        params = [p for p in model.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.args.device))

    def _watch_divergence(self, value: float) -> None:
        """Warn once when the last few losses all exceed ``divergence_factor`` times the mean of
        the run's first ones: a loss growing by orders of magnitude without NaN is a diverged
        run whose results would otherwise look merely bad."""
        if self.divergence_factor is None or self.diverged_at_step is not None:
            return
        if len(self._first_losses) < _DIVERGENCE_REFERENCE_STEPS:
            self._first_losses.append(value)
            return
        self._recent_losses.append(value)
        # The smallest of the first few losses: a run can diverge within its first steps, and
        # later losses of a healthy run only fall below it.
        reference = min(self._first_losses)
        bound = self.divergence_factor * max(reference, 1e-8)
        if len(self._recent_losses) == _DIVERGENCE_WINDOW and min(self._recent_losses) > bound:
            self.diverged_at_step = self.state.global_step + 1
            message = (
                f"Training diverged at step {self.diverged_at_step}: the last "
                f"{_DIVERGENCE_WINDOW} losses ({', '.join(f'{v:.4g}' for v in self._recent_losses)}) "
                f"are all above {self.divergence_factor:g} x the smallest of the run's first losses "
                f"({reference:.4g}). The model is being destroyed without NaN; lower the "
                "learning rate, add warm-up or gradient clipping (max_grad_norm)."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _accumulate_stats(self) -> None:
        for key, value in self.loss_fn.last_stats.items():
            self._stat_sums[key] = self._stat_sums.get(key, 0.0) + float(value)
        self._stat_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss parts (mean over the window's steps on all processes) to training logs.

        Every process takes part in the reduction whenever ``loss`` is logged, even one whose
        whole window was skipped as non-finite (it contributes no step), so a skip on one rank
        can never leave the others waiting in a collective. ``skipped_nonfinite_steps`` is the
        largest count of any process (a step with non-finite logits is skipped on all of them).
        """
        if "train_loss" in logs and "train_runtime" in logs:
            logs["train_loss"] = self._whole_run_train_loss(logs["train_loss"])
        if "loss" in logs:
            keys = sorted(self._stat_sums)
            distributed = self.args.world_size > 1 and torch.distributed.is_initialized()
            if distributed:
                gathered: list[Any] = [None] * self.args.world_size
                torch.distributed.all_gather_object(gathered, keys)
                keys = sorted(set().union(*gathered))
            local = torch.tensor(
                [self._stat_sums.get(k, 0.0) for k in keys] + [float(self._stat_steps)],
                device=self.args.device,
            )
            skipped_t = torch.tensor([self.skipped_nonfinite_steps], device=self.args.device)
            if distributed:
                torch.distributed.all_reduce(local)
                torch.distributed.all_reduce(skipped_t, op=torch.distributed.ReduceOp.MAX)
            *sums, steps = local.tolist()
            skipped = int(skipped_t.item())
            if steps > 0:
                for key, value in zip(keys, sums):
                    logs[key] = round(value / steps, 6)
            if skipped:
                logs["skipped_nonfinite_steps"] = skipped
            self._stat_sums.clear()
            self._stat_steps = 0
        self._log_for_trackers(logs, start_time)

    def _log_for_trackers(self, logs: dict[str, Any], start_time: float | None) -> None:
        """``Trainer.log`` with what the trackers cannot take made trackable
        (:func:`hf_longtail.diagnostics.tracker_logs`: the per-class accuracy list as one scalar
        per class, ``None`` left out); ``trainer_state.json``'s log history keeps the record as
        computed (the list, the ``None``), and ``logs`` gains what ``Trainer.log`` adds (epoch)."""
        from hf_longtail.diagnostics import tracker_logs

        tracked, held = tracker_logs(logs, self.loss_fn.class_names)
        if not held:
            super().log(logs, start_time)
            return
        expanded = set(tracked) - set(logs)
        given = set(tracked)
        super().log(tracked, start_time)
        for key in set(tracked) - given:  # e.g. epoch, added by Trainer.log
            logs[key] = tracked[key]
        if self.state.log_history:
            entry = self.state.log_history[-1]
            for key in expanded:
                entry.pop(key, None)
            entry.update(held)

    # ----------------------------------------------------------- checkpoints
    def checkpoint_recipe(self) -> dict[str, Any]:
        """What a checkpoint of this trainer may only be resumed with: the loss recipe, the
        training class counts (hence the number of labels), the sampler and the seeds."""
        return {
            "loss": self.loss_config.to_dict(),
            "class_counts": list(self.class_counts),
            "num_labels": len(self.class_counts),
            "sampler": self.sampler_name,
            "seed": self.args.seed,
            "data_seed": self.args.data_seed,
        }

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The parent's checkpoint, with the loss state and recipe written first; a write that
        fails (a full disk) raises :class:`~hf_longtail.disk_errors.DiskWriteError` naming the
        file, its filesystem and free space, instead of torch's ``unexpected pos``."""
        # Weights that are no longer finite are never written: with save_total_limit the older,
        # good checkpoints would then be rotated away.
        self._check_weights_finite("checkpoint")
        progress = self._progress()  # collective under DDP: every process takes part
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # trainer_state.json, the completion marker, is written last: a failed checkpoint is
        # never taken for a readable one, and a resume skips it.
        fix = (
            f"Then resume from the last complete checkpoint (resume_from_checkpoint=True; "
            f"scripts/train.py: re-run the same command): {folder} is incomplete and is skipped."
        )
        files = self._written_files(checkpoint=True)
        with naming_write_failures(folder, f"checkpoint {folder}", files, fix):
            # The loss state and the recipe go in first: the parent writes trainer_state.json
            # and then deletes older checkpoints, so a run killed at any moment never leaves a
            # "complete" checkpoint without its CAR state.
            if self.args.should_save:
                self.loss_fn.save_pretrained(folder)
                recipe = os.path.join(folder, CHECKPOINT_RECIPE_FILE)
                with open(recipe, "w", encoding="utf-8") as f:
                    json.dump(self.checkpoint_recipe(), f, indent=2, sort_keys=True)
                write_json(os.path.join(folder, PROGRESS_FILE), progress)
            super()._save_checkpoint(model, trial)

    def _progress(self) -> dict[str, Any]:
        """The run's training progress at this step (:data:`hf_longtail.resume.PROGRESS_FILE`):
        the sum of the per-step training losses so far, as the Trainer sums them for
        ``train_loss`` (the logged windows plus the window not logged yet, averaged over the
        processes), and the training time so far, both including the run's earlier sittings."""
        from transformers.trainer_pt_utils import nested_gather

        pending = getattr(self, "_tr_loss", None)
        window = 0.0
        if isinstance(pending, torch.Tensor):
            window = nested_gather(pending.detach(), self.args.parallel_mode).mean().item()
        prior = self._resumed_progress or {}
        return {
            "global_step": int(self.state.global_step),
            # The running sum already holds the resumed checkpoint's (_EpochCallback).
            "train_loss_sum": getattr(self, "_total_loss_scalar", 0.0) + window,
            "train_runtime": float(prior.get("train_runtime", 0.0))
            + (time.time() - self._train_started if self._train_started else 0.0),
        }

    def _whole_run_train_loss(self, this_call: float) -> float:
        """``train_loss`` over the whole run: the parent averages the steps of this ``train()``
        call only, which after a resume is not the run's loss (and 0.0 after a resume that
        trains nothing). Needs the resumed checkpoint's progress record; without one (older
        checkpoints) the parent's value stays."""
        if self._resumed_progress is None or self.state.global_step <= 0:
            return this_call
        return getattr(self, "_total_loss_scalar", 0.0) / self.state.global_step

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The parent's ``save_model`` plus the loss (``LongTailLoss.save_pretrained``) and, for
        a LoRA model, its base config. Refused (on every process) when a weight is not finite; a
        write that fails (a full disk) raises :class:`~hf_longtail.disk_errors.DiskWriteError`
        naming the file, its filesystem and free space."""
        if _internal_call:  # a checkpoint: _save_checkpoint names its failures
            super().save_model(output_dir, _internal_call=True)
            return
        self._check_weights_finite("model")
        folder = output_dir if output_dir is not None else self.args.output_dir
        fix = (
            "Then save it again (trainer.save_model(); scripts/train.py: re-run the same "
            "command, which continues from the last complete checkpoint)."
        )
        files = self._written_files(checkpoint=False)
        with naming_write_failures(folder, f"the model into {folder}", files, fix):
            super().save_model(output_dir, _internal_call=False)
            # Checkpoints got the loss in _save_checkpoint (before trainer_state.json); a saved
            # model gets it here, so LongTailLoss.from_pretrained(output_dir) rebuilds it.
            if self.args.should_save:
                self.loss_fn.save_pretrained(folder)
                from hf_longtail.models.lora import is_lora_model, save_base_config

                model = self.accelerator.unwrap_model(self.model)
                if is_lora_model(model):  # the adapter files alone do not say what it is
                    save_base_config(model, folder)

    def _written_files(self, *, checkpoint: bool) -> tuple[str, ...]:
        """The files a checkpoint (or a saved model) of this trainer writes, in order: the loss
        state and recipe first (checkpoints), the model (``save_pretrained``, or the LoRA
        adapter with its base config), the processor, ``training_args.bin``, then the
        optimizer, scheduler and RNG state and ``trainer_state.json`` (checkpoints) or the
        loss (a saved model)."""
        from hf_longtail.models.lora import is_lora_model

        lora = self.model is not None and is_lora_model(self.accelerator.unwrap_model(self.model))
        model = (
            *(_ADAPTER_FILES if lora else _FULL_MODEL_FILES),
            "preprocessor_config.json",
            "training_args.bin",
        )
        if checkpoint:
            return (
                *_LOSS_FILES,
                CHECKPOINT_RECIPE_FILE,
                PROGRESS_FILE,
                *model,
                *_TRAINING_STATE_FILES,
            )
        return (*model, *_LOSS_FILES)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # The parent pickles the whole TrainingArguments into training_args.bin (output dir and
        # every checkpoint), hub_token included, and Trainer.push_to_hub uploads that folder.
        # The token is blanked for the write only; a push still uses it.
        token = getattr(self.args, "hub_token", None)
        if token is None:
            return super()._save(output_dir, state_dict)
        self.args.hub_token = None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    # ------------------------------------------------------------- run directory
    def training_summary(self) -> dict[str, Any]:
        """The ``training`` block of the run record: the hyper-parameters that shape the run
        (learning rate, length, batch sizes, optimizer, schedule, seeds, precision), the world
        size, the total batch size, the sampler, the step milestones and the pixel-cache mode."""
        args = self.args
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
            "data_seed",
            "bf16",
            "fp16",
        )
        summary = {k: jsonable(getattr(args, k)) for k in keys}
        summary["world_size"] = args.world_size
        summary["total_train_batch_size"] = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        summary["sampler"] = self.sampler_name
        summary["lr_milestones"] = self.lr_milestones
        summary["pixel_cache"] = self.pixel_cache
        return summary

    def run_record(self, run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run record ``longtail_run.json`` (schema in ``docs/design.md``) of this trainer.

        Built from what the trainer holds: the model's ``_name_or_path``, the training data
        (the long-tail construction recorded by :func:`hf_longtail.data.load_long_tailed` /
        ``make_long_tailed``, the class counts and names, the sizes), the loss recipe, the
        :meth:`training_summary` and the shot-group thresholds. ``run_info`` (what only the
        caller knows, e.g. the dataset id it loaded, the preprocessing protocol, a resume
        history) is laid over it, block by block (its ``dataset`` keys replace those derived).
        """
        import hf_longtail
        from hf_longtail.data import longtail_record

        train = self.train_dataset
        provenance = (longtail_record(train) if hasattr(train, "info") else None) or {}
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        dataset: dict[str, Any] = {
            "name": provenance.get("source"),
            "imbalance_factor": provenance.get("imbalance_factor"),
            "profile": provenance.get("profile"),
            "seed": provenance.get("seed"),
            "eval_split": "test",
            "class_counts": list(self.class_counts),
            "class_names": self.loss_fn.class_names
            or [str(c) for c in range(len(self.class_counts))],
            "label_column": self.label_column or provenance.get("label_column"),
            "train_size": len(train) if train is not None else sum(self.class_counts),
        }
        if self.eval_dataset is not None and hasattr(self.eval_dataset, "__len__"):
            dataset["eval_size"] = len(self.eval_dataset)
        record: dict[str, Any] = {
            "hf_longtail_version": hf_longtail.__version__,
            "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
            or None,
            "dataset": dataset,
            "loss": self.loss_config.to_dict(),
            "training": self.training_summary(),
            "metric_thresholds": dict(self.shot_thresholds),
        }
        for key, value in (run_info or {}).items():
            if isinstance(value, Mapping) and isinstance(record.get(key), dict):
                record[key] = {**record[key], **value}
            else:
                record[key] = value
        return record

    def save_run_record(self, run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write :meth:`run_record` (``run_info`` laid over it) as ``longtail_run.json`` into
        ``args.output_dir`` (atomically, on the saving process) and keep ``run_info`` for the
        record :meth:`evaluate_and_save` writes. Returns the record."""
        self.run_info = dict(run_info or {})
        record = self.run_record(self.run_info)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json(os.path.join(self.args.output_dir, RUN_FILE), record)
        return record

    def apply_posthoc_adjustment(
        self,
        tau: float | str,
        validation_dataset: Any = None,
        *,
        validation_split: str | None = None,
        taus: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Fold post-hoc logit adjustment ``logits - tau * log(prior)`` into the model's
        classifier bias (:func:`hf_longtail.features.fold_logit_adjustment`), so the saved model
        predicts what is reported; call it after training, before :meth:`save_model` and
        :meth:`evaluate_and_save` (which then evaluates the adjusted model as it is).

        ``tau="auto"`` chooses tau on ``validation_dataset`` (predicted once) from ``taus``
        (default :data:`hf_longtail.metrics.POSTHOC_TAUS`, 0 to 2 by 0.25) by balanced accuracy
        (:func:`hf_longtail.metrics.select_logit_adjustment_tau`); the test split is never
        used. Returns the record kept as ``posthoc`` in the run record: ``tau``, ``selected_on``
        (the validation split, or ``None`` for a given tau), ``criterion``, ``grid`` (tau ->
        validation balanced accuracy) and ``folded_into``.
        """
        from hf_longtail.features import fold_logit_adjustment
        from hf_longtail.metrics import POSTHOC_TAUS, select_logit_adjustment_tau

        record: dict[str, Any] = {"selected_on": None}
        if tau == "auto":
            if validation_dataset is None:
                raise ValueError(
                    "posthoc tau 'auto' is chosen on a validation split: pass "
                    "validation_dataset (never the test split), or a fixed tau."
                )
            grid = tuple(taus) if taus is not None else POSTHOC_TAUS
            prediction = self.predict(validation_dataset, metric_key_prefix="validation")
            logits = _first_array(prediction.predictions)
            tau, scores = select_logit_adjustment_tau(
                logits, prediction.label_ids, self.class_counts, grid
            )
            record.update(
                {
                    "selected_on": validation_split or "validation",
                    "criterion": "validation balanced accuracy (ties: smaller tau)",
                    "grid": {f"{t:g}": v for t, v in scores.items()},
                }
            )
        model = self.accelerator.unwrap_model(self.model)
        fold_logit_adjustment(model, self.class_counts, float(tau))
        record.update({"tau": float(tau), "folded_into": "classifier bias"})
        self.run_info = {**(getattr(self, "run_info", {}) or {}), "posthoc": record}
        return record

    def evaluate_and_save(
        self,
        test_dataset: Any = None,
        *,
        split_name: str | None = None,
        many_threshold: int | None = None,
        few_threshold: int | None = None,
        logit_adjustment_tau: float | None = None,
    ) -> dict[str, Any]:
        """Evaluate the final model and write the run directory; return ``all_results.json``.

        Predicts ``test_dataset`` (default: ``eval_dataset``), computes every long-tail metric
        (:func:`hf_longtail.metrics.long_tail_metrics`, shot groups ``many_threshold`` /
        ``few_threshold``, default the trainer's ``shot_thresholds``; optional post-hoc logit
        adjustment) and writes, into ``args.output_dir`` on the saving process,
        ``all_results.json`` (the last ``train()``'s metrics, ``test_*`` metrics, peak memory),
        ``longtail_run.json`` (:meth:`run_record`), the two plots and the long-tail model card
        ``README.md`` (:mod:`hf_longtail.run_directory`). Call :meth:`save_model` first so the
        card finds the model. Runs the prediction on every process (it is collective).
        """
        from hf_longtail.metrics import long_tail_metrics

        dataset = test_dataset if test_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(
                "evaluate_and_save needs a test_dataset (or the trainer's eval_dataset)."
            )
        run_info = dict(getattr(self, "run_info", {}) or {})
        thresholds = {**self.shot_thresholds, **(run_info.get("metric_thresholds") or {})}
        if many_threshold is not None:
            thresholds["many"] = many_threshold
        if few_threshold is not None:
            thresholds["few"] = few_threshold
        run_info["metric_thresholds"] = thresholds
        if split_name is not None:
            run_info["dataset"] = {**(run_info.get("dataset") or {}), "eval_split": split_name}
        record = self.run_record(run_info)
        record["dataset"]["eval_size"] = len(dataset)
        prediction = self.predict(dataset, metric_key_prefix="test")
        test_metrics = long_tail_metrics(
            prediction.predictions,
            prediction.label_ids,
            self.class_counts,
            many_threshold=thresholds["many"],
            few_threshold=thresholds["few"],
            class_names=record["dataset"]["class_names"],
            logit_adjustment_tau=logit_adjustment_tau,
        )
        results = {**getattr(self, "train_metrics", {})}
        results.update({f"test_{k}": v for k, v in test_metrics.items()})
        results["test_loss"] = prediction.metrics.get("test_loss")
        results.update(peak_memory())
        self._report_test_metrics(results, test_metrics, prediction, record)
        if self.args.should_save:
            write_evaluation(
                self.args.output_dir,
                results=results,
                run_record=record,
                test_metrics=test_metrics,
                predictions=np.asarray(prediction.predictions).argmax(-1),
                labels=prediction.label_ids,
                finished_step=self.state.global_step if self.state.global_step > 0 else None,
            )
        if self._holds_lock:  # every final file is written: another run may use the directory
            release_run_dir(self.args.output_dir)
            self._holds_lock = False
        return results

    def _report_test_metrics(self, results, test_metrics, prediction, record) -> None:
        """Send the final test metrics (scalars, per-class scalars) and the test confusion matrix
        image to the trackers of ``args.report_to`` (``Trainer.predict`` logs nothing)."""
        from hf_longtail.diagnostics import evaluation_figures, log_figures, reporting_callbacks
        from hf_longtail.metrics import confusion_matrix

        self.log({k: v for k, v in results.items() if k.startswith("test_")})
        if not self.is_world_process_zero() or not reporting_callbacks(
            self.callback_handler.callbacks
        ):
            return
        names = record["dataset"]["class_names"]
        predicted = np.asarray(_first_array(prediction.predictions)).argmax(-1)
        figures = evaluation_figures(
            "test",
            confusion_matrix(predicted, prediction.label_ids, len(names)),
            self.class_counts,
            class_names=names,
            per_class_accuracy=test_metrics.get("per_class_accuracy"),
            thresholds=record.get("metric_thresholds"),
        )
        log_figures(self.callback_handler.callbacks, self.args, self.state, figures)

    def create_model_card(self, **kwargs: Any) -> None:
        """Write the long-tail model card ``README.md`` into ``args.output_dir`` (the Trainer's
        generic card is replaced): ``model-index`` with every long-tail metric, the dataset's
        construction, the loss recipe and the plots, read from the run directory
        (:func:`hf_longtail.hub.write_model_card`). Options: ``license``, ``finetuned_from``
        (the base model), ``dataset`` (a dataset repo id), ``model_name`` (the repo id); other
        keywords of the Trainer's method are accepted and ignored. Raises
        :class:`hf_longtail.hub.OutputDirError` naming what is missing when the run was not
        saved and evaluated (:meth:`save_model`, :meth:`evaluate_and_save`).
        """
        if not self.is_world_process_zero():
            return
        from hf_longtail.hub import write_model_card

        options = _card_options(kwargs)
        write_model_card(self.args.output_dir, kwargs.get("model_name"), **options)

    def push_to_hub(
        self,
        commit_message: str | None = None,
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Publish the run directory with its long-tail card; returns the ``CommitInfo``.

        Saves the model (:meth:`save_model`), then pushes with
        :func:`hf_longtail.hub.push_long_tail_model` to ``args.hub_model_id`` (else the output
        directory's name): model, image processor, loss, ``all_results.json``,
        ``longtail_run.json``, plots and the long-tail card (never checkpoints, optimizer state
        or ``training_args.bin``). The card is uploaded from a temporary copy: the run's
        ``README.md`` (perhaps edited by hand) is left as it is. ``kwargs`` are the card
        options of :meth:`create_model_card`.
        A failure of the Hub part raises :class:`hf_longtail.hub.PushToHubError` naming the
        cause and the retry command; a run that was not evaluated
        (:meth:`evaluate_and_save`) raises :class:`hf_longtail.hub.OutputDirError` before any
        network call. ``blocking`` is accepted for compatibility (the upload always blocks).
        """
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        from hf_longtail.hub import push_long_tail_model

        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        extra = {"commit_message": commit_message} if commit_message else {}
        return push_long_tail_model(
            self.args.output_dir,
            repo_id,
            token=token if token is not None else self.args.hub_token,
            private=self.args.hub_private_repo,
            revision=revision if revision is not None else self.args.hub_revision,
            **_card_options(kwargs),
            **extra,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """The parent's ``train`` (see :meth:`_train_safely`); its metrics, with
        ``train_samples`` (and ``train_diverged_at_step`` when the loss diverged), are kept as
        ``train_metrics`` for :meth:`evaluate_and_save`."""
        result = self._train_safely(resume_from_checkpoint, trial, **kwargs)
        self.train_metrics = dict(result.metrics)
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            self.train_metrics["train_samples"] = len(self.train_dataset)
        if self.diverged_at_step is not None:
            self.train_metrics["train_diverged_at_step"] = self.diverged_at_step
        return result

    def _check_weights_finite(self, what: str) -> None:
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        if model is None:
            return
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLossError(
                f"Not saving the {what} at step {self.state.global_step}: {len(bad)} parameter "
                f"tensor(s) are not finite (first: {bad[0]}). Earlier checkpoints are kept; "
                "resume from the last one with a lower learning rate or gradient clipping."
            )

    def planned_max_steps(self) -> int:
        """The optimizer steps this trainer's ``train()`` will run to: ``max_steps``, or
        ``num_train_epochs`` times the update steps per epoch of the training dataloader (the
        parent's own computation)."""
        values = self.set_initial_training_values(self.args, self.get_train_dataloader())
        return int(values[-1])

    def check_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """Resolve and check a checkpoint to resume from, before anything is loaded or written.

        ``True`` is the last *readable* checkpoint of ``output_dir``
        (:func:`hf_longtail.resume.last_readable_checkpoint`); a path that cannot be read is
        refused naming the file; a checkpoint of another recipe (loss, class counts, sampler,
        seeds) is a :class:`~hf_longtail.resume.ResumeMismatchError`; a checkpoint past this
        run's length (:meth:`planned_max_steps`) is refused, since resuming it would train
        nothing and describe a model of N steps as one of fewer. Returns the checkpoint path
        (``None`` for a fresh start) and logs what is resumed, at which step of how many.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_readable_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no readable "
                    "checkpoint-* directory."
                )
        if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
            return None
        folder = str(resume_from_checkpoint)
        # Unreadable, another recipe, or a CAR state it cannot restore: refused first.
        self.check_resume_checkpoint(folder)
        step, _ = checkpoint_step(folder)
        planned = self.planned_max_steps()
        if step > planned:
            raise ValueError(
                f"Cannot resume from {folder}: it is at step {step}, past this run's length of "
                f"{planned} steps ({_run_length_description(self.args, self.train_dataset)}), "
                f"so nothing would be trained and the model would be described as {planned} "
                f"steps' training. Pass --max_steps {step} or more (or more epochs) to continue "
                "it, or resume from a checkpoint at or before the run's end."
            )
        if self._resume_plan is not None and self._resume_plan[0] == folder:
            return folder  # checked and reported already (scripts/train.py checks first)
        self._resume_plan = (folder, step, planned)
        if step == planned:
            logger.info(
                "Resuming from %s: step %d of %d, training is complete; nothing is trained, the "
                "final model is the checkpoint's.",
                folder,
                step,
                planned,
            )
        else:
            logger.info("Resuming from %s at step %d of %d.", folder, step, planned)
        return folder

    def _train_safely(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """The parent's ``train`` with safe resuming, a lock, and a refusal of a run that
        trained nothing.

        - The run directory is locked for this process (:func:`hf_longtail.resume.lock_run_dir`:
          a second process training into it is refused naming this one).
        - The checkpoint is resolved and checked by :meth:`check_resume`.
        - A checkpoint at the run's last step (training complete; the run stopped while writing
          its final files) trains no step: its weights, loss state and trainer state are loaded
          and ``train_loss`` is the run's (:meth:`_finish_from_checkpoint`); the parent would
          train one step past the end, or report a ``train_loss`` of 0.
        - A resumed run reports the whole run's ``train_loss`` (from the checkpoint's progress
          record), not only that of the steps after the resume.
        - A run that made no optimizer step raises ``RuntimeError`` (its model is untrained).
        """
        if self.args.should_save and not self._holds_lock:
            # Held until evaluate_and_save has written the final files (or the process ends);
            # a script that locked the directory itself keeps its own lock.
            self._holds_lock = lock_run_dir(self.args.output_dir, reentrant=False) is not None
        resume_from_checkpoint = self.check_resume(resume_from_checkpoint)
        self._resumed_progress = (
            read_progress(resume_from_checkpoint) if resume_from_checkpoint else None
        )
        self._train_started = time.time()
        if resume_from_checkpoint is not None:
            _, step, planned = self._resume_plan  # what check_resume found
            if step >= planned:
                return self._finish_from_checkpoint(resume_from_checkpoint)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self.state.global_step == 0:
            raise RuntimeError(
                "The run made no optimizer step: the model is untrained. "
                f"{_run_length_description(self.args, self.train_dataset)}. Raise "
                "num_train_epochs / max_steps, or use a smaller batch."
            )
        return type(result)(result.global_step, result.metrics["train_loss"], result.metrics)

    def _finish_from_checkpoint(self, folder: str):
        """End a run whose training is complete in ``folder`` without training: load its
        weights and loss state (and the best checkpoint under ``load_best_model_at_end``),
        restore its trainer state, and return the run's metrics (``train_loss`` over the whole
        run and its training time, from the checkpoint's progress record)."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(folder)
        self.state = TrainerState.load_from_json(os.path.join(folder, "trainer_state.json"))
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best is not None and os.path.isdir(best):
            self._load_best_model()
        progress = self._resumed_progress
        steps = max(self.state.global_step, 1)
        metrics: dict[str, Any] = {"total_flos": self.state.total_flos}
        if progress is not None:
            runtime = max(float(progress.get("train_runtime", 0.0)), 1e-9)
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            metrics["train_runtime"] = round(runtime, 4)
            metrics["train_samples_per_second"] = round(
                steps * batch * self.args.world_size / runtime, 3
            )
            metrics["train_steps_per_second"] = round(steps / runtime, 3)
            self._total_loss_scalar = float(progress["train_loss_sum"])
            metrics["train_loss"] = self._total_loss_scalar / steps
        else:
            logger.warning(
                "%s has no %s (written by an older version): train_loss is the last logged "
                "window's loss.",
                folder,
                PROGRESS_FILE,
            )
            losses = [h["loss"] for h in self.state.log_history if "loss" in h]
            metrics["train_loss"] = float(losses[-1]) if losses else float("nan")
        self.log(metrics)  # as the parent's end of training: log history, trackers (adds epoch)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def check_resume_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Refuse, before anything is loaded or written, a checkpoint this trainer cannot resume.

        Raises ``FileNotFoundError`` when ``checkpoint`` is unreadable
        (:func:`hf_longtail.resume.checkpoint_problem`) or, with ``loss_state_missing="refuse"``,
        when the loss has state to restore (CAR) and the checkpoint holds no readable
        ``longtail_loss.safetensors``; :class:`~hf_longtail.resume.ResumeMismatchError` when it
        was written with another recipe. :meth:`train` calls it; ``scripts/train.py`` calls it
        before it records the resume in ``longtail_run.json``. Returns ``None`` when the
        checkpoint can be resumed (with ``"fresh"``, a missing loss state is only warned about).
        """
        folder = str(checkpoint)
        problem = checkpoint_problem(folder)
        if problem:
            raise FileNotFoundError(
                f"Cannot resume from {folder}: {problem}. Resume from an earlier checkpoint "
                "(resume_from_checkpoint=True takes the last readable one)."
            )
        self._check_checkpoint_recipe(folder)
        problem = loss_state_problem(folder)
        state = restorable_loss_state(self.loss_fn)
        if problem is None or not state or self.loss_state_missing == "fresh":
            return  # "fresh": load_loss_state warns when the weights are loaded
        raise FileNotFoundError(_missing_loss_state_message(folder, problem, state))

    def _check_checkpoint_recipe(self, folder: str) -> None:
        path = os.path.join(folder, CHECKPOINT_RECIPE_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            logger.warning("%s has no readable %s: its recipe is not checked.", folder, path)
            return
        fields = tuple(self.checkpoint_recipe())
        changes = recipe_changes(saved, self.checkpoint_recipe(), fields)
        if changes:
            raise ResumeMismatchError(
                f"Cannot resume {folder}: it was written with another recipe. Changed: "
                + "; ".join(changes)
                + ". Resume with the original settings, or train from scratch in another "
                "output_dir."
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        reload_renamed_weights(target, resume_from_checkpoint)
        load_loss_state(self.loss_fn, resume_from_checkpoint, missing=self.loss_state_missing)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        # load_best_model_at_end reads the raw file non-strictly too (see reload_renamed_weights).
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            model = self.accelerator.unwrap_model(self.model)
            reload_renamed_weights(model, self.state.best_model_checkpoint)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # The real optimizer steps per epoch (index 1): the milestone scheduler needs it, and
        # num_training_steps / num_train_epochs is wrong whenever max_steps is set.
        self._update_steps_per_epoch = int(values[1])
        return values

    # ----------------------------------------------------------- dataloaders
    def get_train_dataloader(self):
        return self._shield_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._shield_workers(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._shield_workers(super().get_test_dataloader(test_dataset))

    def _shield_workers(self, dataloader):
        """DataLoader workers ignore the checkpointing signals (see
        :func:`install_signal_checkpointing`): a scheduler signals the whole process group, and
        a worker killed first would make the main process fail before it can checkpoint."""
        signals = self._worker_ignored_signals
        # accelerate's DataLoaderShard delegates to the DataLoader it wraps, which starts the
        # workers (skip_first_batches, on resume, copies the setting from there).
        loader = getattr(dataloader, "base_dataloader", dataloader)
        if signals and getattr(loader, "num_workers", 0) > 0:
            inner = loader.worker_init_fn
            if not isinstance(inner, _IgnoreSignalsInWorker):
                loader.worker_init_fn = _IgnoreSignalsInWorker(signals, inner)
        return dataloader

    # ------------------------------------------------------------ input pipeline
    def _pixel_dataset(self, dataset: Any) -> Any:
        """The pixel-cache dataset standing in for ``dataset`` (built once per dataset and
        trainer, process 0 first so that it writes a disk store the others then read), or
        ``None`` for the streaming path."""
        if self.pixel_cache == "off" or dataset is None:
            return None
        cached = self._pixel_datasets.get(id(dataset))
        if cached is not None and cached[0] is dataset:
            return cached[1]
        from hf_longtail.data.pixel_store import pixel_dataset

        with self.args.main_process_first(desc="pixel cache"):
            fast = pixel_dataset(
                dataset,
                self.pixel_cache,
                cache_dir=self.pixel_cache_dir,
                max_bytes=self.pixel_cache_max_bytes,
            )
        self._pixel_datasets[id(dataset)] = (dataset, fast)
        return fast

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, **kwargs):
        """The parent's DataLoader, or on the pixel-cache fast path one over the
        :class:`~hf_longtail.data.PixelStoreDataset` (sampler built from the original dataset,
        its indices tagged with per-batch seeds; workers only when the augmentation pays)."""
        fast = self._pixel_dataset(dataset)
        if fast is None:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, **kwargs)
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_pt_utils import BatchRebalanceSampler
        from transformers.trainer_utils import seed_worker

        from hf_longtail.data.samplers import BatchSeededSampler

        sampler = sampler_fn(dataset) if sampler_fn is not None else None
        if isinstance(sampler, (torch.utils.data.BatchSampler, BatchRebalanceSampler)):
            # A batch sampler (train_sampling_strategy="batch_rebalance"): keep streaming.
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, **kwargs)
        if isinstance(sampler, BatchSeededSampler):
            sampler.tag_batches = True
        workers = self.args.dataloader_num_workers if fast.transform.plan.per_sample_resize else 0
        params: dict[str, Any] = {
            "batch_size": batch_size,
            "sampler": sampler,
            "collate_fn": self.data_collator,
            "num_workers": workers,
            "pin_memory": self.args.dataloader_pin_memory,
            "drop_last": self.args.dataloader_drop_last,
        }
        if workers > 0:
            params.update(
                persistent_workers=self.args.dataloader_persistent_workers,
                prefetch_factor=self.args.dataloader_prefetch_factor,
                multiprocessing_context=self.args.dataloader_multiprocessing_context,
            )
            if kwargs.get("is_training"):
                params["worker_init_fn"] = partial(
                    seed_worker, num_workers=workers, rank=self.args.process_index
                )
        return self.accelerator.prepare(DataLoader(fast, **params))

    # -------------------------------------------------------------- sampling
    def _planned_epochs(self, dataset) -> float:
        """Epochs the run will make: ``num_train_epochs``, or what ``max_steps`` amounts to.

        The progressive sampler interpolates over this horizon, so with ``max_steps`` it must
        not use ``num_train_epochs`` (whose default of 3 would then be unrelated to the run).
        """
        if self.args.max_steps is None or self.args.max_steps <= 0:
            return float(self.args.num_train_epochs)
        per_step = (
            self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * max(self.args.world_size, 1)
        )
        steps_per_epoch = max(math.ceil(len(dataset) / per_step), 1)
        return float(math.ceil(self.args.max_steps / steps_per_epoch))

    def _get_train_sampler(self, train_dataset=None):
        """The training sampler wrapped in a :class:`~hf_longtail.data.BatchSeededSampler`.

        The wrapper re-seeds the host RNGs (Python, NumPy, torch CPU) before each batch from
        ``(data_seed or seed, epoch, batch index)``, so data augmentation is a function of the
        batch position and a run resumed mid-epoch (``dataloader_num_workers=0``) sees exactly
        the batches of the uninterrupted run. ``"random"`` order is then drawn from that seeded
        state, identically on every process.
        """
        from hf_longtail.data.samplers import BatchSeededSampler, build_class_aware_sampler

        if self.sampler_name == "random":
            sampler = super()._get_train_sampler(train_dataset)
        else:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            # One global order on every process (num_replicas=1); accelerate's dataloader
            # preparation then gives each process a disjoint share of its batches.
            sampler = build_class_aware_sampler(
                dataset,
                strategy=self.sampler_name,
                label_column=self.label_column,
                seed=self.args.seed,
                num_epochs=self._planned_epochs(dataset),
                num_replicas=1,
                rank=0,
                class_counts=self.class_counts,  # checked against the rows, not recounted
            )
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if (
            sampler is None
            or isinstance(sampler, torch.utils.data.BatchSampler)
            or strategy == "batch_rebalance"  # a batch sampler: batches are not index runs
        ):
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._data_rng_seeded = True
        return BatchSeededSampler(sampler, batch_size=self._train_batch_size, seed=seed)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # With the seeded sampler the host RNGs are re-derived before every batch; the parent
        # would restore the checkpoint's copy *after* the resumed loader has prefetched its
        # first batches, desynchronising them. Device RNGs (CUDA dropout) are restored as usual.
        if not getattr(self, "_data_rng_seeded", False):
            return super()._load_rng_state(checkpoint)
        import random

        import numpy as np

        host = (random.getstate(), np.random.get_state(), torch.get_rng_state())  # noqa: NPY002
        super()._load_rng_state(checkpoint)
        random.setstate(host[0])
        np.random.set_state(host[1])  # noqa: NPY002 -- the legacy global RNG is what is restored
        torch.set_rng_state(host[2])

    # ------------------------------------------------------------- scheduler
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Milestone (step) decay by epoch when ``lr_milestones`` is set, else the parent's."""
        if self.lr_milestones is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            steps_per_epoch = getattr(self, "_update_steps_per_epoch", None)
            if not steps_per_epoch:  # called outside train(): fall back on the arguments
                steps_per_epoch = num_training_steps / max(float(self.args.num_train_epochs), 1e-12)
            warmup = self.args.get_warmup_steps(num_training_steps)
            milestones = [round(m * steps_per_epoch) for m in self.lr_milestones]
            gamma = self.lr_gamma

            def factor(step: int) -> float:
                if warmup > 0 and step < warmup:
                    return (step + 1) / warmup
                return gamma ** sum(step >= m for m in milestones)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler


def restorable_loss_state(loss_fn: nn.Module) -> list[str]:
    """The entries of ``loss_fn.state_dict()`` a resume must restore from the checkpoint: its
    buffers (CAR's EMA columns, scale, singular vectors, step count). The ``_extra_state``
    entries (the epoch) are left out: the trainer sets the epoch again at every step, so a
    loss with only those (plain CE, CCAR alone, LA, DRW, ...) loses nothing on a fresh start."""
    return [key for key in loss_fn.state_dict() if not key.endswith("_extra_state")]


def loss_state_problem(folder: str | os.PathLike) -> str | None:
    """Why the loss state of the checkpoint ``folder`` cannot be read, or ``None`` if it can:
    neither ``longtail_loss.safetensors`` nor the older ``longtail_loss_state.pt`` exists, or
    the safetensors file is truncated (only its header is read)."""
    weights = os.path.join(folder, LOSS_WEIGHTS_NAME)
    if os.path.isfile(weights):
        return _safetensors_problem(Path(weights))
    if os.path.isfile(os.path.join(folder, LEGACY_LOSS_STATE_NAME)):
        return None
    return f"it has no {LOSS_WEIGHTS_NAME} (nor the older {LEGACY_LOSS_STATE_NAME})"


def _missing_loss_state_message(folder: str, problem: str, state: Sequence[str]) -> str:
    return (
        f"Cannot resume from {folder}: {problem}, so the loss state ({', '.join(state)}: CAR's "
        "running confusion estimate) cannot be restored, and resuming would silently restart it "
        "from zero. Resume from a checkpoint that holds it, or accept a fresh loss state with "
        'LongTailTrainer(..., loss_state_missing="fresh") (scripts/train.py: '
        "--loss_state_missing fresh)."
    )


def load_loss_state(
    loss_fn: nn.Module, folder: str | os.PathLike, *, missing: str = "refuse"
) -> bool:
    """Restore the loss state of a checkpoint into ``loss_fn``; ``False`` if it has none.

    Reads ``longtail_loss.safetensors`` (:meth:`LongTailLoss.save_pretrained`), else the
    ``longtail_loss_state.pt`` of older checkpoints. Always onto the CPU: ``load_state_dict``
    copies into the module's buffers wherever they live (and an indexed CPU device such as
    ``cpu:0``, ``args.device`` in a multi-process CPU run, is no valid ``map_location``).
    A checkpoint with neither file (written by a plain ``Trainer``) returns ``False`` silently
    when the loss has no state to restore (:func:`restorable_loss_state`); otherwise
    ``missing="refuse"`` raises ``FileNotFoundError`` naming the folder, the file and the
    option, and ``missing="fresh"`` keeps the fresh state with a warning.
    """
    if missing not in LOSS_STATE_MISSING_POLICIES:
        raise ValueError(
            f"missing={missing!r} is not valid; use one of {LOSS_STATE_MISSING_POLICIES}."
        )
    weights = os.path.join(folder, LOSS_WEIGHTS_NAME)
    legacy = os.path.join(folder, LEGACY_LOSS_STATE_NAME)
    state_keys = restorable_loss_state(loss_fn)
    problem = loss_state_problem(folder)
    if problem is not None:
        if not state_keys:
            return False
        if missing == "refuse":
            raise FileNotFoundError(_missing_loss_state_message(str(folder), problem, state_keys))
        logger.warning(
            "%s: %s; the loss state (%s) starts fresh as asked (loss_state_missing='fresh'): the "
            "resumed run will not match an uninterrupted one.",
            folder,
            problem,
            ", ".join(state_keys),
        )
        return False
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        state: dict[str, Any] = load_file(weights, device="cpu")
    else:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    loss_fn.load_state_dict(state)
    return True


def _card_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The long-tail card options in ``kwargs`` (:data:`hf_longtail.hub.card.CARD_OPTIONS`, also
    under the Trainer's names ``finetuned_from`` / ``dataset``)."""
    from hf_longtail.hub.card import card_options

    return card_options(kwargs)


def _class_names(
    model: nn.Module | None, dataset: Any, label_column: str | None, num_classes: int
) -> list[str] | None:
    """The class names of the training labels (their ``ClassLabel``, else the model's
    ``id2label``), kept with the saved loss; ``None`` when neither names ``num_classes``."""
    features = getattr(dataset, "features", None)
    if features is not None:
        from hf_longtail.data import detect_label_column

        try:
            names = list(
                getattr(features[detect_label_column(features, label_column)], "names", ())
            )
        except (KeyError, ValueError):
            names = []
        if len(names) == num_classes:
            return names
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(num_classes)]
    return names if len(id2label) == num_classes and None not in names else None


def reload_renamed_weights(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Reload a checkpoint whose weight names differ from the model's; ``True`` if it did.

    ``transformers`` v5 ``save_pretrained`` writes some models (ViT among them) under their
    legacy parameter names, while ``Trainer`` resumes with a non-strict ``load_state_dict`` of
    the raw file, which silently skips every renamed weight (huggingface/transformers#43701,
    #48805). When the checkpoint's names are not all names of the model, the weights are read
    again with ``from_pretrained`` (which applies the renaming) and copied in strictly.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            saved = set(f.keys())
    elif os.path.isfile(index):
        import json

        with open(index, encoding="utf-8") as f:
            saved = set(json.load(f)["weight_map"])
    else:
        return False
    if saved <= set(model.state_dict()):
        return False  # the parent's load matched every saved weight
    fresh = type(model).from_pretrained(folder, config=model.config)
    model.load_state_dict(fresh.state_dict(), strict=True)
    del fresh
    return True


def apply_label_smoothing_factor(
    config: LongTailLossConfig, label_smoothing_factor: float | None
) -> LongTailLossConfig:
    """``config`` with ``TrainingArguments.label_smoothing_factor`` moved into the loss.

    ``0``/``None`` returns ``config`` unchanged. Otherwise the result has
    ``label_smoothing = label_smoothing_factor``; a ``ValueError`` names the conflict when the
    base loss cannot smooth (only ``ce``, ``la`` and ``bs`` can) or when ``config`` already sets
    a different ``label_smoothing``. Used by :class:`LongTailTrainer` and ``scripts/train.py``
    (so the run record states the smoothing actually trained with).
    """
    factor = float(label_smoothing_factor or 0.0)
    if factor == 0.0 or config.label_smoothing == factor:
        return config
    if not config.supports_label_smoothing:
        raise ValueError(
            f"label_smoothing_factor={factor} (TrainingArguments) cannot be applied: base loss "
            f"{config.base!r} has no label smoothing (only ce, la and bs do). Set "
            "label_smoothing_factor=0, or choose one of those bases."
        )
    if config.label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing_factor={factor} (TrainingArguments) disagrees with the loss "
            f"config's label_smoothing={config.label_smoothing}; set only one of them."
        )
    return dataclasses.replace(config, label_smoothing=factor)


def _uses_features(*datasets: Any) -> bool:
    from hf_longtail.features import is_feature_dataset

    return any(d is not None and is_feature_dataset(d) for d in datasets)


def _first_array(predictions: Any) -> Any:
    """The logits of ``Trainer.predict`` output (models with extra outputs give a tuple)."""
    while isinstance(predictions, tuple):
        predictions = predictions[0]
    return predictions


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if logits is None:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else None
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "The model output has no 'logits'; LongTailTrainer needs an image classifier that "
            "returns logits (e.g. AutoModelForImageClassification)."
        )
    return logits


def _check_label_range(dataset: Any, label_column: str | None, num_classes: int) -> None:
    """Labels of a ``datasets.Dataset`` must lie in ``[0, num_classes)``: read from Arrow (no
    decoding) before training, instead of failing at the first batch that holds a bad one."""
    import sys

    datasets_module = sys.modules.get("datasets")
    if datasets_module is None or not isinstance(dataset, datasets_module.Dataset):
        return
    from hf_longtail.data.columns import detect_label_column, label_array

    try:
        column = detect_label_column(dataset.features, label_column)
    except ValueError:
        return  # no recognisable label column: the loss still checks every batch
    values = label_array(dataset, column)
    if values.dtype == object or values.size == 0:
        return
    bad = ((values < 0) | (values >= num_classes)).nonzero()[0]
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"train_dataset column {column!r} has label {int(values[row])} at row {row} "
            f"({bad.size} row(s) outside 0..{num_classes - 1}), but class_counts has "
            f"{num_classes} entries. Pass one count per class of the dataset (or leave "
            "class_counts=None to count them), or drop those rows."
        )


def normalize_lr_milestones(value: Any) -> list[float] | None:
    """``lr_milestones`` as a list of epochs (``None`` for none); a single number (as YAML gives
    ``lr_milestones: 160``) is one milestone. Each must be a finite number >= 0, in increasing
    order; otherwise ``TypeError`` / ``ValueError`` naming the option."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"lr_milestones must be a list of epochs (numbers); got {value!r}")
    values = list(value)
    for m in values:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise ValueError(f"lr_milestones must hold finite epochs >= 0; got {m!r} in {values}")
    if values != sorted(values):
        raise ValueError(f"lr_milestones must be in increasing order; got {values}")
    return [float(m) for m in values] or None


def check_run_length(args: Any) -> None:
    """Refuse at construction a run that cannot make an optimizer step (``num_train_epochs <= 0``
    without ``max_steps``): it would save an untrained model as if it were trained."""
    if args is None:
        return
    max_steps = getattr(args, "max_steps", -1) or -1
    epochs = getattr(args, "num_train_epochs", 1)
    if max_steps <= 0 and not epochs > 0:
        raise ValueError(
            f"num_train_epochs={epochs} and max_steps={getattr(args, 'max_steps', None)}: the run "
            "would make no optimizer step. Set num_train_epochs > 0 or max_steps > 0."
        )


def _run_length_description(args: Any, dataset: Any) -> str:
    try:
        size = len(dataset)
    except TypeError:
        size = "?"
    return (
        f"num_train_epochs={args.num_train_epochs}, max_steps={args.max_steps}, {size} training "
        f"examples, per_device_train_batch_size={args.per_device_train_batch_size} x "
        f"gradient_accumulation_steps={args.gradient_accumulation_steps} x world size "
        f"{args.world_size}, dataloader_drop_last={args.dataloader_drop_last}"
    )


#: Base losses that already correct for the training label prior (logit adjustment, balanced
#: softmax, class-balanced reweighting); DRW reweights by class from ``drw_epoch`` on.
_PRIOR_CORRECTING_BASES = {"la": "logit-adjusted", "bs": "balanced-softmax", "cb": "class-balanced"}


def _warn_double_rebalancing(sampler: str, config: LongTailLossConfig) -> None:
    """A class-balanced sampler makes the batches' label prior uniform; a loss that also
    corrects for the (long-tailed) training prior then corrects twice, over-favouring the tail
    classes. Warned, not refused: a few recipes do this on purpose."""
    if sampler != "class_balanced":
        return
    reasons = []
    if config.base in _PRIOR_CORRECTING_BASES:
        reasons.append(f"the {_PRIOR_CORRECTING_BASES[config.base]} loss (base={config.base!r})")
    if config.drw_epoch is not None:
        reasons.append(f"deferred re-weighting (drw_epoch={config.drw_epoch})")
    if reasons:
        message = (
            "sampler='class_balanced' together with "
            + " and ".join(reasons)
            + " rebalances twice: the sampler already makes every class equally frequent in "
            "the batches, and the loss corrects for the long-tailed prior again, over-favouring "
            "the tail. Use sampler='random' with this loss, or a plain base loss (ce/focal/ldam) "
            "with the class-balanced sampler."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


class _IgnoreSignalsInWorker:
    """``worker_init_fn`` of a DataLoader worker: ignore ``signals``, then call the original.

    Picklable (for the spawn / forkserver start methods). The worker still exits when its main
    process tells it to, or when the main process dies (PyTorch's worker watchdog).
    """

    def __init__(self, signals: Sequence[int], inner: Any = None) -> None:
        self.signals = tuple(int(s) for s in signals)
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        import signal

        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _check_num_labels(model: nn.Module | None, num_classes: int) -> None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and num_labels != num_classes:
        raise ValueError(
            f"The model has {num_labels} output labels but the training data has {num_classes} "
            "classes. Build the model with num_labels equal to the dataset's class count "
            "(hf_longtail.models.create_model does this and re-initialises the head)."
        )


class SignalCheckpointCallback(TrainerCallback):
    """Checkpoint and stop cleanly at the end of the current step on SIGTERM / SIGINT.

    The first signal only sets a flag (a handler must not do I/O mid-step); at the next step end
    the Trainer saves a full checkpoint (model, optimizer, scheduler, RNG, loss state, sampler
    position via ``global_step``) and stops. A second SIGINT more than a second after the first
    falls back to the previous handler, so an impatient Ctrl-C still kills the run; a repeated
    SIGTERM, or any repeat within a second (a launcher forwarding the signal its process group
    already got), is ignored. DataLoader workers ignore the signals (a scheduler signals the
    whole process group; a worker dying first would crash the main process before it can
    checkpoint). Under ``torch.distributed`` the flag is max-reduced
    every step so all ranks stop at the same step even if only one received the signal.
    """

    def __init__(self, trainer: LongTailTrainer, signals: Sequence[int] | None = None) -> None:
        import signal

        self._trainer = trainer
        self._signal = signal
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals if signals is not None else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import time

        now = time.monotonic()
        if self.received is not None:
            # One stop request often arrives twice: a scheduler signals the whole process group
            # and a launcher (torchrun) forwards the same signal to its workers. A repeated
            # SIGTERM (schedulers escalate with SIGKILL, not with a second SIGTERM) and a
            # repeat within a second are that duplicate; a later second SIGINT is an impatient
            # Ctrl-C and falls back to the previous handler.
            if signum == self._signal.SIGTERM or now - self._received_at < 1.0:
                logger.warning(
                    "Signal %d again: still checkpointing at the end of this step.", signum
                )
                return
            previous = self._previous.get(signum)
            self.restore()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received = signum
        self._received_at = now
        logger.warning("Received signal %d: checkpointing at the end of this step.", signum)

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            self._signal.signal(sig, handler)

    def _agreed_signal(self, args) -> int:
        flag = torch.tensor([self.received or 0], device=args.device)
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args)
        if signum:
            control.should_save = True
            control.should_training_stop = True
            self._trainer.stopped_by_signal = self._signal.Signals(signum).name
            self._trainer.stopped_by_signal_number = signum
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


def install_signal_checkpointing(
    trainer: LongTailTrainer, signals: Sequence[int] | None = None
) -> SignalCheckpointCallback:
    """Make ``trainer`` save a checkpoint and stop on SIGTERM/SIGINT (see the callback)."""
    callback = SignalCheckpointCallback(trainer, signals)
    # DataLoader workers started from now on ignore these signals (see _shield_workers).
    trainer._worker_ignored_signals = tuple(callback._previous)
    trainer.stopped_by_signal = None
    trainer.stopped_by_signal_number = 0
    trainer.add_callback(callback)
    return callback
