"""A finished run is never retrained or overwritten, a run killed at the end finishes only what
is missing, and two launches never share a run directory (``scripts/train.py``,
``LongTailTrainer``, :mod:`hf_longtail.resume`).

Every run here is real: ``scripts/train.py`` trains the digits ResNet-20 for 4 steps with a
checkpoint every 2 (``TINY_RUN``), in-process where nothing is killed and in a subprocess that
SIGKILLs itself at a phase of the end of its run (``_kill_at_phase.py``) where something is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _reliability_helpers import (
    REPO_ROOT,
    TINY_RUN,
    TrainRun,
    run_files,
    run_train,
    subprocess_env,
)

from hf_longtail.resume import LOCK_FILE, RunDirInUseError, release_run_dir

KILLER = Path(__file__).with_name("_kill_at_phase.py")
#: What differs between two runs of the same command by nature: wall time and memory.
TIMING_KEYS = {
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "peak_rss_mb",
    "peak_gpu_mem_mb",
}
#: JSON files that carry timings (compared without TIMING_KEYS); every other file byte for byte.
TIMED_JSON = (
    "all_results.json",
    "trainer_state.json",
    "longtail_progress.json",
    "longtail_run.json",  # parsed, so a test can set its resume history apart
)

pytestmark = pytest.mark.slow


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def comparable(out: Path) -> dict[str, object]:
    """The run directory's content as it must match an uninterrupted run's: every file's bytes,
    the timed JSON files parsed without their timings; the lock file (which names the latest
    process) left out."""
    files = {}
    for name, data in run_files(out).items():
        if Path(name).name == LOCK_FILE:
            continue
        if Path(name).name in TIMED_JSON:
            files[name] = _without_timing(json.loads(data))
        else:
            files[name] = data
    return files


def _train_in_process(train, args):
    try:
        return train.main(args)
    finally:
        out = args[args.index("--output_dir") + 1]
        release_run_dir(out)  # an in-process run holds the lock for pytest's lifetime otherwise


def _run_killed_at(phase: str, args: list[str]) -> None:
    """``scripts/train.py args`` in a subprocess that SIGKILLs itself at ``phase``."""
    killed = subprocess.run(
        [sys.executable, str(KILLER), phase, *args],
        env=subprocess_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]


def _steps_trained(out: Path) -> list[int]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["step"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("finished")


@pytest.fixture(scope="module")
def uninterrupted(base):
    """``comparable`` of the uninterrupted run at ``base/run`` (the path the killed runs reuse:
    ``training_args.bin`` holds it), and the directory is then cleared for them."""
    out = base / "run"
    # In a subprocess, as the killed runs train (threads and allocator state of a process that
    # already trained in-process can change the last bits of the weights).
    code, log = run_train([*TINY_RUN, "--output_dir", str(out)], base / "uninterrupted.log")
    assert code == 0, log[-3000:]
    files = comparable(out)
    results = json.loads((out / "all_results.json").read_text())
    shutil.copytree(out, base / "reference")
    shutil.rmtree(out)
    return files, results


@pytest.fixture
def finished(train, base, uninterrupted, tmp_path):
    """A private copy of the finished run (at another path: for tests that compare it with
    itself only)."""
    out = tmp_path / "run"
    shutil.copytree(base / "reference", out)
    return out


def test_rerun_of_a_finished_run_trains_nothing_and_changes_no_file(train, finished, caplog):
    """Today's failure: the re-run trained step 5 of 4, replaced the model, results and card,
    and (save_total_limit 1) deleted the final checkpoint."""
    before = comparable(finished)
    expected = json.loads((finished / "all_results.json").read_text())
    for extra in ([], ["--resume_from_checkpoint", "true"], ["--save_total_limit", "1"]):
        with caplog.at_level(logging.WARNING, logger="hf_longtail.resume"):
            results = _train_in_process(train, [*TINY_RUN, "--output_dir", str(finished), *extra])
        assert "finished at step 4: nothing to train and no file is changed" in caplog.text
        assert results == expected
        assert comparable(finished) == before, extra
        assert _steps_trained(finished) == [1, 2, 3, 4]


def test_a_finished_run_asked_to_train_longer_is_refused_with_the_way_to_do_it(train, finished):
    before = comparable(finished)
    with pytest.raises(FileExistsError) as err:
        _train_in_process(train, [*TINY_RUN, "--output_dir", str(finished), "--max_steps", "6"])
    message = str(err.value)
    assert "holds a finished run (trained 4 steps)" in message
    assert "max_steps: 4 -> 6" in message
    hint = f"--resume_from_checkpoint {finished / 'checkpoint-4'}"
    assert hint in message and "--output_dir NEW_DIR" in message
    assert comparable(finished) == before
    # Following the advice trains steps 5 and 6 elsewhere; the finished run stays as it was.
    longer = finished.parent / "longer"
    args = [*TINY_RUN, "--output_dir", str(longer), "--max_steps", "6"]
    _train_in_process(train, [*args, "--resume_from_checkpoint", str(finished / "checkpoint-4")])
    assert _steps_trained(longer) == [1, 2, 3, 4, 5, 6]
    record = json.loads((longer / "longtail_run.json").read_text())
    assert record["resumes"][-1]["checkpoint"] == "checkpoint-4"
    assert record["finished"] == {"global_step": 6}
    assert comparable(finished) == before


def test_resuming_an_earlier_checkpoint_of_a_finished_run_is_refused(train, finished):
    before = comparable(finished)
    earlier = str(finished / "checkpoint-2")
    with pytest.raises(FileExistsError, match="is not the run's final checkpoint"):
        _train_in_process(
            train, [*TINY_RUN, "--output_dir", str(finished), "--resume_from_checkpoint", earlier]
        )
    assert comparable(finished) == before


def test_a_checkpoint_past_the_run_length_is_refused_before_anything_is_written(
    train, finished, tmp_path
):
    """Today's failure: resuming checkpoint-4 with --max_steps 2 trained nothing and wrote a card
    and record saying max_steps 2 with train_loss 0."""
    out = tmp_path / "shorter"
    args = [*TINY_RUN, "--output_dir", str(out), "--max_steps", "2"]
    with pytest.raises(ValueError) as err:
        _train_in_process(
            train, [*args, "--resume_from_checkpoint", str(finished / "checkpoint-4")]
        )
    message = str(err.value)
    assert "it is at step 4, past this run's length of 2 steps" in message
    assert "--max_steps 4 or more" in message
    assert not (out / "longtail_run.json").exists() and not (out / "README.md").exists()


def test_an_explicit_resume_says_what_it_resumed_from(train, finished, tmp_path, caplog):
    out = tmp_path / "from2"
    args = [*TINY_RUN, "--output_dir", str(out)]
    with caplog.at_level(logging.INFO, logger="hf_longtail.trainer"):
        _train_in_process(
            train, [*args, "--resume_from_checkpoint", str(finished / "checkpoint-2")]
        )
    assert f"Resuming from {finished / 'checkpoint-2'} at step 2 of 4." in caplog.text
    assert _steps_trained(out) == [1, 2, 3, 4]
    record = json.loads((out / "longtail_run.json").read_text())
    assert record["resumes"] == [{"checkpoint": "checkpoint-2", "changed": {}}]
    # The whole run's train_loss (steps 1-4), not the mean of steps 3-4 alone.
    reference = json.loads((finished / "all_results.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "phase", ["final_checkpoint", "final_save", "final_evaluation", "card", "after_card"]
)
def test_a_kill_at_the_end_of_a_run_then_the_same_command_ends_as_an_uninterrupted_run(
    train, base, uninterrupted, phase, tmp_path
):
    files, _ = uninterrupted
    out = base / "run"
    if out.exists():
        shutil.rmtree(out)
    args = [*TINY_RUN, "--output_dir", str(out)]
    _run_killed_at(phase, args)
    if phase != "after_card":
        assert comparable(out) != files  # the kill left the run unfinished
    _train_in_process(train, args)  # the same command again
    finished = comparable(out)
    if phase == "final_checkpoint":
        # The last checkpoint was incomplete: the run resumed from checkpoint-2, trained steps 3
        # and 4 again (to the same weights) and its record says so, truly.
        resumes = finished["longtail_run.json"].pop("resumes")
        assert resumes == [{"checkpoint": "checkpoint-2", "changed": {}}]
    assert finished == files
    assert _steps_trained(out) == [1, 2, 3, 4]  # no step past the end, none twice


def test_an_epoch_based_run_killed_at_the_end_keeps_its_train_loss(train, tmp_path):
    """Today's failure: the re-run of an epoch-based run rewrote train_loss as 0.0."""
    epochs = list(TINY_RUN)
    i = epochs.index("--max_steps")
    epochs[i : i + 2] = ["--max_steps", "-1", "--num_train_epochs", "1"]
    epochs[epochs.index("--save_strategy") + 1] = "epoch"
    reference = tmp_path / "reference"
    _train_in_process(train, [*epochs, "--output_dir", str(reference)])
    expected = json.loads((reference / "all_results.json").read_text())
    assert expected["train_loss"] > 0
    out = tmp_path / "killed"
    args = [*epochs, "--output_dir", str(out)]
    _run_killed_at("final_save", args)
    _train_in_process(train, args)
    results = json.loads((out / "all_results.json").read_text())
    assert _without_timing(results) == _without_timing(expected)
    before = comparable(out)
    _train_in_process(train, args)  # finished: nothing changes, train_loss included
    assert comparable(out) == before


def test_overwrite_deletes_only_what_the_library_wrote_and_names_what_it_kept(
    train, finished, caplog
):
    """Today's failure: --overwrite_output_dir deleted the whole directory, a user's notes and
    data folder included."""
    (finished / "notes.txt").write_text("my notes about this run\n")
    (finished / "data").mkdir()
    (finished / "data" / "labels.csv").write_text("a,b\n")
    with caplog.at_level(logging.WARNING, logger="hf_longtail.resume"):
        _train_in_process(
            train, [*TINY_RUN, "--output_dir", str(finished), "--overwrite_output_dir", "true"]
        )
    assert (finished / "notes.txt").read_text() == "my notes about this run\n"
    assert (finished / "data" / "labels.csv").read_text() == "a,b\n"
    assert "kept 2 entries" in caplog.text and "data, notes.txt" in caplog.text
    assert _steps_trained(finished) == [1, 2, 3, 4]
    record = json.loads((finished / "longtail_run.json").read_text())
    assert "resumes" not in record and record["finished"] == {"global_step": 4}


def test_a_hand_written_readme_is_not_taken_for_the_library_card(finished):
    from hf_longtail.resume import library_files

    ours, theirs = library_files(finished)
    assert finished / "README.md" in ours  # the card the run wrote (hf-longtail tag)
    (finished / "README.md").write_text("# My project\n\nSee notes.\n")
    ours, theirs = library_files(finished)
    assert finished / "README.md" in theirs
    assert {p.name for p in ours} >= {"checkpoint-2", "checkpoint-4", "model.safetensors"}


def test_a_second_launch_on_a_live_run_is_refused_naming_the_first(train, tmp_path):
    """Today's failure: the second process wrote into the first's checkpoints (or crashed on
    its half-written one). The first is killed the way a scheduler's hard kill does it; the
    kernel drops its lock and the directory can be used again at once."""
    out = tmp_path / "run"
    args = [*TINY_RUN, "--output_dir", str(out), "--max_steps", "100000", "--save_steps", "50"]
    first = TrainRun(args, tmp_path / "first.log")
    try:
        first.wait_for(lambda: (out / "checkpoint-50").is_dir(), timeout=240)
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.process.pid
        before = {p.name for p in out.iterdir()}
        with pytest.raises(RunDirInUseError) as err:
            _train_in_process(train, args)
        message = str(err.value)
        assert f"pid {first.process.pid}" in message and "train.py" in message
        assert "choose another --output_dir" in message
        assert {p.name for p in out.iterdir()} >= before
    finally:
        first.kill()
    assert first.process.returncode == -signal.SIGKILL
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from hf_longtail.resume import lock_run_dir; lock_run_dir({str(out)!r})",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr


def test_the_lock_survives_a_stale_lock_file_and_is_reentrant(tmp_path):
    from hf_longtail.resume import lock_run_dir

    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "gone", "started": "", "command": ""}')
    assert lock_run_dir(tmp_path) == tmp_path / LOCK_FILE  # a dead holder's file blocks nothing
    assert lock_run_dir(tmp_path) == tmp_path / LOCK_FILE  # re-entrant in one process
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    code = (
        "import sys; from hf_longtail.resume import lock_run_dir, RunDirInUseError\n"
        f"try: lock_run_dir({str(tmp_path)!r})\n"
        "except RunDirInUseError as e: print(e); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout
    assert release_run_dir(tmp_path)
    other = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert other.returncode == 0, other.stdout
