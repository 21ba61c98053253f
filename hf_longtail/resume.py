"""Run directories that never lose work: readable checkpoints, recipes, resume-or-refuse.

A run directory holds the checkpoints of one training run (``checkpoint-N/``), its record
``longtail_run.json`` (what was trained: model, dataset construction, loss, seed; schema in
``docs/design.md``) and, once finished, its results. Three rules keep it safe:

- A checkpoint counts only when it can be read (:func:`checkpoint_problem`): its
  ``trainer_state.json`` (which ``transformers.Trainer`` writes last) parses and holds a step, and
  its weights file has a readable header. A kill or a full disk during a write leaves one that is
  skipped with a warning naming the file (:func:`last_readable_checkpoint`).
- A run is continued only with the recipe it was started with (:func:`run_recipe`,
  :func:`recipe_changes`); otherwise it is refused before anything is loaded, naming every field
  that changed. A re-run of the same command continues from the last readable checkpoint.
- Nothing is deleted while deciding (:func:`plan_output_dir`): ``overwrite`` only marks the
  previous run for deletion, done by :func:`replace_previous_run` once everything has been
  validated (data, model, trainer), right before training starts; resuming wins over
  overwriting.

Everything here is local file handling (no torch, no transformers) so it can run before any
heavy import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_longtail.run_directory import (
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    CONFIG_FILE,
    CONFUSION_PLOT,
    PER_CLASS_PLOT,
    PROCESSOR_FILES,
    RESULTS_FILE,
    RUN_FILE,
    WEIGHT_FILES,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_RECIPE_FILE",
    "LIBRARY_FILES",
    "LOCK_FILE",
    "MIN_FREE_BYTES",
    "PROGRESS_FILE",
    "RECIPE_FIELDS",
    "RESULTS_FILE",
    "RUN_FILE",
    "OutputDirPlan",
    "ResumeMismatchError",
    "RunDirInUseError",
    "check_output_dir_usable",
    "checkpoint_problem",
    "checkpoint_step",
    "finished_step",
    "last_readable_checkpoint",
    "library_files",
    "lock_run_dir",
    "plan_output_dir",
    "read_progress",
    "recipe_changes",
    "release_run_dir",
    "replace_previous_run",
    "run_recipe",
]

#: Written by ``LongTailTrainer`` into every checkpoint (loss, class counts, sampler, seeds).
CHECKPOINT_RECIPE_FILE = "longtail_recipe.json"
#: Written by ``LongTailTrainer`` into every checkpoint, before ``trainer_state.json``: the
#: running sum of the logged training loss and the training time up to that step, so a resumed
#: run reports the whole run's ``train_loss`` (the Trainer averages only the steps of one call).
PROGRESS_FILE = "longtail_progress.json"
#: The advisory lock of a run directory (:func:`lock_run_dir`); it holds the holder's pid, host
#: and command so a second launch can name the first.
LOCK_FILE = ".longtail.lock"
TRAINER_STATE_FILE = "trainer_state.json"
MIN_FREE_BYTES = 200 * 1024**2

#: Dotted fields of a run record that define *what* is trained; a resume must keep them all.
#: (Run length, learning rate, batch size, logging may change on resume; they are recorded.)
RECIPE_FIELDS = (
    "model_name_or_path",
    "classifier",  # a replaced head (e.g. cosine); absent for the model's own
    "freeze_backbone",  # frozen-backbone training; absent for full fine-tuning
    "lora",  # LoRA adapters (rank, alpha, dropout, targets); absent for full fine-tuning
    "dataset.name",
    "dataset.config_name",
    "dataset.imbalance_factor",
    "dataset.profile",
    "dataset.seed",
    "dataset.eval_split",
    "dataset.validation_options",  # absent for the default validation (auto)
    "loss",
    "training.seed",
    "training.data_seed",
    "training.sampler",
)
#: Fields known only after the data are loaded (a local dataset may change under its name).
DATA_FIELDS = ("dataset.class_counts", "dataset.class_names")

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class ResumeMismatchError(ValueError):
    """A run would be resumed with a recipe other than the one it was started with."""


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory's lock (:func:`lock_run_dir`)."""


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from, or ``None`` if it can.

    Readable means: ``trainer_state.json`` exists, parses as JSON and holds ``global_step``
    (``transformers.Trainer`` writes it last, so a kill or a full disk during the write leaves it
    missing, empty or truncated), and ``model.safetensors``, when present, has a readable header.
    Only headers are read: the check costs a few small reads per checkpoint.
    """
    folder = Path(folder)
    state = folder / TRAINER_STATE_FILE
    if not state.is_file():
        return f"{state} is missing (the run stopped while writing this checkpoint)"
    try:
        text = state.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        what = "is empty" if state.stat().st_size == 0 else f"cannot be read ({err})"
        return f"{state} {what} (a full disk or a kill while it was written?)"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
        return f"{state} holds no global_step"
    weights = folder / "model.safetensors"
    if weights.exists():
        problem = _safetensors_problem(weights)
        if problem:
            return problem
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header;
    the data must then be as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length <= 0 or 8 + length > size:
                return f"{path} is truncated ({size} bytes)"
            header = json.loads(f.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path} cannot be read ({err})"
    if ends and 8 + length + max(ends) > size:
        return f"{path} is truncated ({size} bytes, the header describes more)"
    return None


def last_readable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest ``checkpoint-N`` of ``output_dir`` that :func:`checkpoint_problem` accepts.

    Each newer checkpoint that cannot be read is skipped with a warning naming the file and the
    problem. ``None`` when the directory holds no readable checkpoint (or does not exist).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for child in out.iterdir():
        match = _CHECKPOINT_RE.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Ignoring checkpoint %s: %s.", path, problem)
    return None


def checkpoint_step(folder: str | os.PathLike) -> tuple[int, int | None]:
    """``(global_step, max_steps)`` of a readable checkpoint, from its ``trainer_state.json``
    (``max_steps`` is the run length the run that wrote it had planned; ``None`` if absent)."""
    data = json.loads((Path(folder) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    planned = data.get("max_steps")
    return int(data["global_step"]), int(planned) if isinstance(planned, int) else None


def read_progress(folder: str | os.PathLike) -> dict[str, float] | None:
    """The training progress a checkpoint recorded (:data:`PROGRESS_FILE`): ``global_step``,
    ``train_loss_sum`` (the sum of the per-step training loss up to that step, as the Trainer
    accumulates it) and ``train_runtime`` (seconds of training up to it). ``None`` for a
    checkpoint written before it existed, or unreadable."""
    try:
        data = json.loads((Path(folder) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("train_loss_sum"), (int, float)):
        return None
    return data


def finished_step(record: dict | None) -> int | None:
    """The step at which the run of ``record`` finished (its ``finished`` block, written after
    every final file: model, results, plots, card), or ``None`` for a run that is not finished."""
    finished = (record or {}).get("finished")
    if isinstance(finished, dict) and isinstance(finished.get("global_step"), int):
        return finished["global_step"]
    return None


# ------------------------------------------------------------------------------ the lock
_HELD_LOCKS: dict[str, int] = {}


def lock_run_dir(output_dir: str | os.PathLike, *, reentrant: bool = True) -> Path | None:
    """Take the advisory lock of the run directory ``output_dir`` for this process.

    An exclusive ``flock`` on :data:`LOCK_FILE` (created if needed): the kernel drops it when the
    process ends, however it ends (SIGKILL, a crash, the end of the job), so a stale lock file
    never blocks a later run. The holder writes its pid, host, start time and command into the
    file. Re-entrant within a process (the script locks before planning, the trainer again in
    ``train``). Raises :class:`RunDirInUseError` naming the holder when another live process has
    it. Where ``fcntl`` does not exist (Windows) nothing is locked, with a warning. Returns the
    lock file's path; with ``reentrant=False``, ``None`` when this process already held it
    (so a caller knows whether the lock is its own to release)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    key = os.path.realpath(out)
    if key in _HELD_LOCKS:
        return path if reentrant else None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux / macOS
        logger.warning("No fcntl here: %s is not locked against a second launch.", out)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        try:
            holder = os.read(fd, 65536).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        raise RunDirInUseError(
            f"output_dir {out} is in use by another run ({_describe_holder(holder)}; lock "
            f"{path}). Two runs in one directory would write into the same checkpoints. Wait for "
            "it to end (or stop it), or choose another --output_dir. The lock is the kernel's: it "
            "is released as soon as that process ends, however it ends."
        ) from err
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
    _HELD_LOCKS[key] = fd
    return path


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (
            f"pid {info['pid']} on {info['host']}, started {info['started']}, command: "
            f"{info['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def release_run_dir(output_dir: str | os.PathLike) -> bool:
    """Release this process's lock of ``output_dir`` (:func:`lock_run_dir`); ``False`` if it held
    none. Only for long-lived processes (a notebook) that are done with a run directory: the
    lock is otherwise held until the process ends."""
    fd = _HELD_LOCKS.pop(os.path.realpath(Path(output_dir)), None)
    if fd is None:
        return False
    os.close(fd)  # closing the only descriptor releases the flock
    return True


# ---------------------------------------------------------------------------------- recipe
def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def _normalised(value: Any) -> Any:
    # Compare what would be written: tuples become lists, enums strings, 10 == 10.0.
    return json.loads(json.dumps(value, sort_keys=True, default=_jsonable))


def _get(record: dict, dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def run_recipe(run_info: dict, fields: tuple[str, ...] = RECIPE_FIELDS) -> dict[str, Any]:
    """The ``fields`` of a run record (dotted paths), JSON-normalised: what a resume must keep.

    Extracted the same way from the record on disk and from the record being built, so a record
    that gains fields later (class counts, training summary) still compares equal.
    """
    recipe = {name: _normalised(_get(run_info, name)) for name in fields}
    if recipe.get("dataset.imbalance_factor", 0) is None and "dataset.profile" in recipe:
        # No subset is drawn without an imbalance factor, so the profile means nothing (older
        # records hold the option's default there, newer ones None): never a recipe change.
        recipe["dataset.profile"] = None
    return recipe


def recipe_changes(
    previous: dict, current: dict, fields: tuple[str, ...] = RECIPE_FIELDS
) -> list[str]:
    """``"field: old -> new"`` for every recipe field that differs (loss fields one by one)."""
    old, new = run_recipe(previous, fields), run_recipe(current, fields)
    changes = []
    for name in fields:
        a, b = old[name], new[name]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    changes.append(f"{name}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        else:
            changes.append(f"{name}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------ output dir
@dataclass
class OutputDirPlan:
    """What :func:`plan_output_dir` decided; nothing has been changed on disk yet.

    Attributes:
        output_dir: the run directory.
        resume: the checkpoint to resume from, or ``None`` for a fresh start.
        replace_previous: the directory holds a previous run that ``overwrite`` replaces; call
            :func:`replace_previous_run` once everything is validated, right before training.
        previous: the previous run record of the resumed checkpoint's directory, if any.
        finished: the directory holds this very run, finished (its record's ``finished`` block):
            there is nothing to do; the caller reads the results and changes no file.
        finish_only: ``resume`` is the run's final checkpoint (training complete, the run
            stopped while writing its final files): resuming trains no step, it only writes
            what is missing, so the record gains no ``resumes`` entry.
    """

    output_dir: Path
    resume: str | None
    replace_previous: bool
    previous: dict | None
    finished: bool = False
    finish_only: bool = False
    kept: list[str] = field(default_factory=list)

    def record(self, run_info: dict) -> dict:
        """The run record to write: ``run_info`` for a fresh run; for a resume, ``run_info``
        plus ``resumes``, the list of (checkpoint, non-recipe training settings that changed
        ``[before, after]``), so that the record stays true for the whole run."""
        if self.resume is None or self.previous is None or self.finish_only:
            return run_info
        before = _normalised(self.previous.get("training") or {})
        after = _normalised(run_info.get("training") or {})
        changed = {
            key: [before.get(key), after.get(key)]
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        }
        entry = {"checkpoint": Path(self.resume).name, "changed": changed}
        return {**run_info, "resumes": [*self.previous.get("resumes", []), entry]}

    def check_data(self, run_info: dict) -> None:
        """Refuse a resume whose freshly loaded data (class counts, names) differ from the
        previous run's: a local dataset can change under the same name."""
        if self.resume is not None and self.previous is not None:
            _refuse_changes(self.previous, run_info, self.resume, DATA_FIELDS)


def _refuse_changes(previous: dict, current: dict, checkpoint: str, fields) -> None:
    changes = recipe_changes(previous, current, fields)
    if changes:
        raise ResumeMismatchError(
            f"Cannot resume {checkpoint}: the run was started with another recipe. Changed: "
            + "; ".join(changes)
            + ". Resume with the original options, or start a new run in another --output_dir "
            "(or replace this one with --overwrite_output_dir and no --resume_from_checkpoint)."
        )


def plan_output_dir(
    output_dir: str | os.PathLike,
    run_info: dict,
    *,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
) -> OutputDirPlan:
    """Decide how a run uses ``output_dir``, before any data or model is loaded; delete nothing.

    - ``resume_from_checkpoint`` true (``True``, ``"true"``, ``"last"``): the last readable
      checkpoint (an error if there is none); a path: that checkpoint (an error naming the file
      if it cannot be read). Resuming wins over ``overwrite`` (which is then ignored, with a
      warning).
    - Otherwise, if the directory holds a previous run (checkpoints, results or a record): the
      same recipe with a readable checkpoint resumes from it (re-running a command continues
      it), and without one (stopped before its first complete checkpoint, no results) starts
      again; with ``overwrite`` the previous run is marked for replacement; anything else is a
      ``FileExistsError`` naming the changed fields and the three ways out.
    - A resume whose recipe differs from the record of the checkpoint's run directory
      (:data:`RECIPE_FIELDS`) is a :class:`ResumeMismatchError` naming every changed field.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {out} exists and is not a directory.")
    resume = resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "yes", "1"):
        resume = True
    if resume in (None, False, "") or (isinstance(resume, str) and resume.lower() in _FALSE):
        resume = None
    previous = _read_record(out / RUN_FILE)
    last = last_readable_checkpoint(out)
    done = finished_step(previous)
    if done is not None and resume is not None and not _outside(resume, out):
        # A finished run is never retrained in place, whatever asks for it.
        return _finished_plan(out, previous, run_info, done, resume)
    if done is not None and resume is None and not overwrite:
        return _finished_plan(out, previous, run_info, done, None)
    has_run = last is not None or previous is not None or (out / RESULTS_FILE).exists()
    has_run = has_run or any(_CHECKPOINT_RE.fullmatch(p.name) for p in _children(out))

    if resume is True:
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=true but {out} holds no readable checkpoint-* "
                "directory (see the warnings above for any that were skipped)."
            )
        resume = last
    elif resume is not None:
        problem = (
            checkpoint_problem(resume) if Path(resume).is_dir() else f"{resume} is not a directory"
        )
        if problem:
            raise FileNotFoundError(
                f"resume_from_checkpoint={resume} cannot be resumed from: {problem}. Resume "
                "from an earlier checkpoint, or pass --resume_from_checkpoint true to take the "
                "last readable one."
            )
        resume = str(resume)
        if Path(resume).resolve().parent != out.resolve():
            previous = _read_record(Path(resume).parent / RUN_FILE)
    elif has_run:
        same = previous is not None and not recipe_changes(previous, run_info)
        if overwrite:
            logger.warning(
                "--overwrite_output_dir: the previous run in %s will be deleted once every "
                "option, the data and the model are validated, right before training.",
                out,
            )
            return OutputDirPlan(out, None, True, None)
        if same and last is not None:
            logger.info("Resuming the same run from %s", last)
            resume = last
        elif same and not (out / RESULTS_FILE).exists():
            # Stopped before its first checkpoint was complete: nothing finished to keep, and
            # the fresh start rewrites any half-written checkpoint of the same step.
            logger.warning(
                "%s holds the same run without a readable checkpoint: starting it again.", out
            )
        else:
            changed = recipe_changes(previous, run_info) if previous is not None else []
            why = "a different run (" + "; ".join(changed) + ")" if changed else "a previous run"
            raise FileExistsError(
                f"output_dir {out} already holds {why}"
                + (f" (last readable checkpoint {last})" if last else "")
                + ". Pass --overwrite_output_dir to replace it, --resume_from_checkpoint "
                "true to continue it, or choose another --output_dir."
            )
    finish_only = False
    if resume is not None:
        if overwrite:
            logger.warning(
                "Both --overwrite_output_dir and a checkpoint to resume: resuming %s; nothing is "
                "deleted.",
                resume,
            )
        if previous is not None:
            _refuse_changes(previous, run_info, resume, RECIPE_FIELDS)
        step, planned = checkpoint_step(resume)
        finish_only = (
            planned is not None
            and step >= planned
            and previous is not None
            and not _length_changes(previous, run_info)
        )
        if finish_only:
            logger.info(
                "%s is the final checkpoint (step %d of %d): training is complete; writing the "
                "final files the run did not write.",
                resume,
                step,
                planned,
            )
    plan = OutputDirPlan(out, resume, False, previous if resume is not None else None)
    plan.finish_only = finish_only
    return plan


def _outside(checkpoint: str | bool, out: Path) -> bool:
    return checkpoint is not True and Path(checkpoint).resolve().parent != out.resolve()


#: The run-length settings of the ``training`` block: a finished run asked to train longer (or
#: shorter) is refused instead of being retrained in place.
LENGTH_FIELDS = ("max_steps", "num_train_epochs")


def _length_changes(previous: dict, run_info: dict) -> list[str]:
    before = previous.get("training") or {}
    after = run_info.get("training") or {}
    if not all(key in after for key in LENGTH_FIELDS):
        return []  # the caller did not say (a record built by hand): nothing to compare
    by_steps = (after.get("max_steps") or -1) > 0 or (before.get("max_steps") or -1) > 0
    keys = ("max_steps",) if by_steps else ("num_train_epochs",)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in keys
        if _normalised(before.get(key)) != _normalised(after.get(key))
    ]


def _finished_plan(
    out: Path, previous: dict, run_info: dict, done: int, resume: str | bool | None
) -> OutputDirPlan:
    """The plan for a directory that holds a finished run: nothing to do when the command is
    that run's; refused, naming what differs and the ways out, otherwise (an explicit resume
    of another recipe with :class:`ResumeMismatchError`, as for any resume)."""
    final = out / f"checkpoint-{done}"
    if resume is not None:
        _refuse_changes(previous, run_info, str(final if resume is True else resume), RECIPE_FIELDS)
    changes = recipe_changes(previous, run_info) + _length_changes(previous, run_info)
    if isinstance(resume, str) and Path(resume).resolve() != final.resolve():
        changes.append(
            f"resume_from_checkpoint {resume} is not the run's final checkpoint ({final.name})"
        )
    if changes:
        start_from = final if final.is_dir() else last_readable_checkpoint(out)
        longer = (
            f" To train it further, start a new run from its checkpoint: --output_dir NEW_DIR "
            f"--resume_from_checkpoint {start_from} (same recipe)."
            if start_from
            else ""
        )
        what = (
            f"already holds a different run (finished, trained {done} steps): "
            if recipe_changes(previous, run_info)
            else f"holds a finished run (trained {done} steps), and this command differs from it: "
        )
        raise FileExistsError(
            f"output_dir {out} {what}{'; '.join(changes)}. A finished run is never retrained or "
            f"overwritten in place.{longer} Or choose another --output_dir, or pass "
            "--overwrite_output_dir (without --resume_from_checkpoint) to replace it."
        )
    logger.warning(
        "%s holds this run, finished at step %d: nothing to train and no file is changed. To "
        "start another run, choose another --output_dir (or --overwrite_output_dir to replace "
        "this one).",
        out,
        done,
    )
    return OutputDirPlan(out, None, False, previous, finished=True)


_FALSE = ("false", "no", "0", "none")


def _children(out: Path) -> list[Path]:
    return list(out.iterdir()) if out.is_dir() else []


def check_output_dir_usable(output_dir: str | os.PathLike, min_free: int = MIN_FREE_BYTES) -> None:
    """Create ``output_dir`` and fail now (naming the fix) if it cannot be written or its disk
    has less than ``min_free`` bytes free: a run must not find out at its first checkpoint."""
    out = Path(output_dir)
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
    if free < min_free:
        raise OSError(
            f"Only {free / 1024**2:.0f} MiB free on the disk of {out}; checkpoints need more. "
            "Free some space or choose another --output_dir."
        )


#: Top-level files a run of the library (or the ``transformers.Trainer`` under it) writes into
#: its output directory. Anything else there is the user's and survives ``--overwrite_output_dir``.
LIBRARY_FILES = frozenset(
    {
        RUN_FILE,
        RESULTS_FILE,
        CARD_FILE,
        CONFIG_FILE,
        PER_CLASS_PLOT,
        CONFUSION_PLOT,
        *WEIGHT_FILES,
        ADAPTER_CONFIG_FILE,
        *PROCESSOR_FILES,
        "adapter_model.bin",
        "train_results.json",
        "eval_results.json",
        "test_results.json",
        TRAINER_STATE_FILE,
        "training_args.bin",
        "longtail_loss.json",
        "longtail_loss.safetensors",
        "longtail_loss_state.pt",
        CHECKPOINT_RECIPE_FILE,
        PROGRESS_FILE,
        LOCK_FILE,
    }
)
_LIBRARY_PATTERNS = (
    _CHECKPOINT_RE,
    re.compile(r"model-\d{5}-of-\d{5}\.safetensors"),  # sharded weights
    re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin"),
    re.compile(r"\.write_test_\d+"),  # the start-up probe of a killed run
)


def _written_by_library(path: Path) -> bool:
    name = path.name
    if name.endswith(".tmp") and name[:-4] in LIBRARY_FILES:  # an interrupted atomic write
        return True
    if any(pattern.fullmatch(name) for pattern in _LIBRARY_PATTERNS):
        return True
    if name == CARD_FILE:
        return path.is_file() and _is_library_card(path)
    if name == "runs":  # the Trainer's default logging_dir: TensorBoard event files only
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        return bool(files) and all(f.name.startswith("events.out.tfevents.") for f in files)
    return name in LIBRARY_FILES


def _is_library_card(path: Path) -> bool:
    """A model card this library wrote: its YAML front matter lists the ``hf-longtail`` tag."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    front = text[3 : text.find("\n---", 3)] if "\n---" in text[3:] else ""
    return re.search(r"^\s*-\s*['\"]?hf-longtail['\"]?\s*$", front, re.MULTILINE) is not None


def library_files(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Split the top-level entries of ``output_dir`` into ``(written by a run of the library,
    everything else)``. The first are the run's files (:data:`LIBRARY_FILES`, ``checkpoint-N/``,
    sharded weights, an interrupted atomic write, the Trainer's TensorBoard ``runs/``, a model
    card carrying the ``hf-longtail`` tag); the rest (a user's notes, a data folder, a
    hand-written README) are never deleted."""
    ours, theirs = [], []
    for child in sorted(_children(Path(output_dir))):
        (ours if _written_by_library(child) else theirs).append(child)
    return ours, theirs


def replace_previous_run(plan: OutputDirPlan) -> list[str]:
    """Delete the files of the previous run that ``plan`` marked for replacement (call it on one
    process, after everything is validated and right before training); a no-op otherwise.

    Only what a run of the library wrote is deleted (:func:`library_files`); every other entry
    is kept, named in a warning, and returned (also kept in ``plan.kept``). The lock file of
    the current run stays."""
    if not plan.replace_previous:
        return []
    ours, theirs = library_files(plan.output_dir)
    logger.warning(
        "--overwrite_output_dir: deleting the previous run in %s (%d entries it wrote)",
        plan.output_dir,
        len(ours),
    )
    for path in ours:
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    plan.kept = [p.name for p in theirs]
    if plan.kept:
        logger.warning(
            "--overwrite_output_dir kept %d entries of %s that no run of hf-longtail wrote: %s",
            len(plan.kept),
            plan.output_dir,
            ", ".join(plan.kept),
        )
    plan.replace_previous = False
    return plan.kept
