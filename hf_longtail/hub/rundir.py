"""Read and validate a training run's output directory (written by ``LongTailTrainer``).

The directory holds the final model (``config.json`` + weights), optionally an image processor,
``all_results.json`` (``test_*`` metrics), ``longtail_run.json`` (dataset construction, loss
recipe, training arguments; schema in ``docs/design.md``) and the two plots. Everything here is
local file reading: no network, no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_longtail.class_counts import ClassCounts

# The file names are those the trainer writes, defined once in hf_longtail.run_directory (also
# importable from here, where the hub's readers always found them).
from hf_longtail.run_directory import (  # noqa: F401
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    CONFIG_FILE,
    CONFUSION_PLOT,
    DEFAULT_THRESHOLDS,
    PER_CLASS_PLOT,
    PROCESSOR_FILES,
    RESULTS_FILE,
    RUN_FILE,
    WEIGHT_FILES,
    thresholds_of,
)

_HOW_TO_PRODUCE = {
    CONFIG_FILE: (
        "the model was not saved there; run `python scripts/train.py CONFIG.yaml` (it saves the "
        "final model into its --output_dir) or call `trainer.save_model(OUTPUT_DIR)`"
    ),
    "weights": (
        f"no model weights (expected one of {', '.join(WEIGHT_FILES)}); run "
        "`python scripts/train.py CONFIG.yaml` or call `trainer.save_model(OUTPUT_DIR)`"
    ),
    RESULTS_FILE: (
        "the test metrics are missing; `scripts/train.py` writes them after the final evaluation "
        "on the test split (from Python: `trainer.save_model()` then `trainer.evaluate_and_save()`)"
    ),
    RUN_FILE: (
        "the long-tail run record is missing; `scripts/train.py` and "
        "`LongTailTrainer.evaluate_and_save()` write it (dataset construction, "
        "class counts, loss recipe, training arguments; schema in docs/design.md, "
        "'Run output directory')"
    ),
}


class OutputDirError(ValueError):
    """A run output directory is missing a file, or one of its JSON files breaks the schema."""


def validate_output_dir(output_dir: str | Path, *, require_run_info: bool = True) -> Path:
    """Check that ``output_dir`` is a finished run directory; return it as a resolved ``Path``.

    Required: the directory itself, ``config.json``, model weights (one of :data:`WEIGHT_FILES`),
    ``all_results.json`` and, when ``require_run_info``, ``longtail_run.json``. Every missing
    file is reported at once, each with how to produce it. Raises :class:`OutputDirError`.
    """
    path = Path(output_dir).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise OutputDirError(
            f"OUTPUT_DIR {str(path)!r} {what}: pass the --output_dir of a finished "
            "`scripts/train.py` run (it holds config.json, model.safetensors, all_results.json, "
            "longtail_run.json and the plots)."
        )
    problems = []
    if not (path / CONFIG_FILE).is_file():
        problems.append(f"- {CONFIG_FILE}: {_HOW_TO_PRODUCE[CONFIG_FILE]}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"- model weights: {_HOW_TO_PRODUCE['weights']}")
    required = [RESULTS_FILE, RUN_FILE] if require_run_info else [RESULTS_FILE]
    for name in required:
        if not (path / name).is_file():
            problems.append(f"- {name}: {_HOW_TO_PRODUCE[name]}")
    if problems:
        raise OutputDirError(
            f"OUTPUT_DIR {str(path)!r} is not a complete hf-longtail run directory:\n"
            + "\n".join(problems)
        )
    return path.resolve()


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise OutputDirError(
            f"{path} is not valid JSON ({err}); re-create it by re-running the training script."
        ) from err
    if not isinstance(data, dict):
        raise OutputDirError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _as_float(value: Any) -> float | None:
    """A finite float, or ``None`` for missing / null / NaN (e.g. an empty many-shot group)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


@dataclass
class RunDir:
    """Everything the card and the push need from one run output directory.

    ``metrics`` maps un-prefixed metric names (``accuracy``, ``many_shot_accuracy``, ...) to
    the finite float read from ``all_results.json`` (``None`` when the run reported null/NaN,
    e.g. a group with no class); ``metric_prefix`` is the prefix they had (``test_``, or
    ``eval_`` when the run has no test metrics).
    """

    path: Path
    config: dict[str, Any]
    results: dict[str, Any]
    run: dict[str, Any]
    metric_prefix: str
    metrics: dict[str, float | None]
    per_class_accuracy: list[float | None] | None
    class_counts: list[int]
    class_names: list[str]
    thresholds: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    @property
    def dataset(self) -> dict[str, Any]:
        """The ``dataset`` block of ``longtail_run.json`` (an empty dict when absent)."""
        block = self.run.get("dataset")
        return block if isinstance(block, dict) else {}

    @property
    def num_classes(self) -> int:
        """K, the number of classes (length of the recorded training class counts)."""
        return len(self.class_counts)

    def has_file(self, name: str) -> bool:
        """Whether ``name`` exists as a file at the top level of the run directory."""
        return (self.path / name).is_file()


def _metric_prefix(results: dict[str, Any], path: Path) -> str:
    for prefix in ("test_", "eval_"):
        if f"{prefix}accuracy" in results:
            return prefix
    keys = ", ".join(sorted(results)) or "none"
    raise OutputDirError(
        f"{path / RESULTS_FILE} has no `test_accuracy` (nor `eval_accuracy`); keys present: "
        f"{keys}. It must hold the final test metrics written by `scripts/train.py` "
        "(`test_accuracy`, `test_many_shot_accuracy`, ..., `test_per_class_accuracy`)."
    )


def _class_counts(dataset: dict[str, Any], path: Path) -> list[int]:
    where = f"{path / RUN_FILE}: dataset.class_counts"
    try:  # the one count rule of the package (ClassCounts), with the file in every message
        return ClassCounts.coerce(dataset.get("class_counts"), name=where).to_list()
    except (TypeError, ValueError) as err:
        raise OutputDirError(
            f"{err}; it must list the training images per class (label order)."
        ) from err


def _per_class(value: Any, k: int, where: str) -> list[Any] | None:
    """``value`` (``None`` or a list with one entry per class) or an :class:`OutputDirError`."""
    if value is not None and (not isinstance(value, list) or len(value) != k):
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise OutputDirError(
            f"{where} must have one value per class ({k}, the length of {RUN_FILE} "
            f"dataset.class_counts), got {got}."
        )
    return value


def _class_names(dataset: dict[str, Any], config: dict[str, Any], k: int, path: Path) -> list[str]:
    names = _per_class(dataset.get("class_names"), k, f"{path / RUN_FILE}: dataset.class_names")
    if names is not None:
        return [str(n) for n in names]
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == k:
        try:
            return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(k)]
        except TypeError:  # pragma: no cover - malformed id2label keys
            pass
    return [str(i) for i in range(k)]


def read_run_dir(output_dir: str | Path) -> RunDir:
    """Validate ``output_dir`` (see :func:`validate_output_dir`) and load it into a :class:`RunDir`.

    Checks the parts of the schema the card relies on: ``dataset.class_counts`` is a non-empty
    list of non-negative ints (K classes), ``dataset.class_names`` (if given) has K entries, and
    ``<prefix>per_class_accuracy`` (if given) has K entries. Raises :class:`OutputDirError`.
    """
    path = validate_output_dir(output_dir, require_run_info=True)
    config = _read_json_object(path / CONFIG_FILE)
    results = _read_json_object(path / RESULTS_FILE)
    run = _read_json_object(path / RUN_FILE)
    dataset = run.get("dataset")
    if not isinstance(dataset, dict):
        raise OutputDirError(
            f"{path / RUN_FILE} must have a `dataset` object (name, imbalance_factor, profile, "
            "seed, class_counts, ...), see docs/design.md 'Run output directory'."
        )
    counts = _class_counts(dataset, path)
    k = len(counts)
    names = _class_names(dataset, config, k, path)
    prefix = _metric_prefix(results, path)
    metrics = {
        key[len(prefix) :]: _as_float(value)
        for key, value in results.items()
        if key.startswith(prefix) and not isinstance(value, (list, dict, str))
    }
    per_class = _per_class(
        results.get(f"{prefix}per_class_accuracy"),
        k,
        f"{path / RESULTS_FILE}: {prefix}per_class_accuracy",
    )
    if per_class is not None:
        per_class = [_as_float(v) for v in per_class]
    try:  # the rule the trainer recorded them with (ShotThresholds)
        thresholds = thresholds_of(run)
    except (TypeError, ValueError) as err:
        raise OutputDirError(f"{path / RUN_FILE}: metric_thresholds: {err}") from err
    return RunDir(
        path=path,
        config=config,
        results=results,
        run=run,
        metric_prefix=prefix,
        metrics=metrics,
        per_class_accuracy=per_class,
        class_counts=counts,
        class_names=names,
        thresholds=thresholds,
    )
