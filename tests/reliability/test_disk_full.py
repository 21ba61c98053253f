"""A disk that fills up while a checkpoint or the model is written: the error names the file
being written, the filesystem (device, mount point) and its free space, and says what to do,
instead of torch's ``inline_container.cc:672 unexpected pos`` or ``iostream error``.

The realistic case runs on a real full disk: a tmpfs sized so that the checkpoint of a real
2-step ``LongTailTrainer`` run fills it at a chosen file (needs root to mount; skipped
otherwise). The torch error text is also produced by a monkeypatched writer, which runs
anywhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import torch
from _reliability_helpers import tiny_vit, train_dataset, training_args

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn
from hf_longtail.disk_errors import DiskWriteError
from hf_longtail.resume import checkpoint_problem

PAGE = 4096  # tmpfs charges whole pages
#: The files of a checkpoint of this run, in the order the trainer writes them.
WRITE_ORDER = [
    "longtail_loss.safetensors",
    "longtail_loss.json",
    "longtail_recipe.json",
    "longtail_progress.json",
    "config.json",
    "model.safetensors",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
]


def _trainer(out, **args):
    values = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, **args}
    return LongTailTrainer(
        model=tiny_vit(),
        args=training_args(out, **values),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config={"base": "ce", "ccar": True, "car_weight": 0.5},
    )


@pytest.fixture(scope="module")
def checkpoint_pages(tmp_path_factory):
    """Pages each checkpoint file takes, from the same run on the ordinary disk."""
    out = tmp_path_factory.mktemp("reference")
    _trainer(out).train()
    folder = out / "checkpoint-2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(WRITE_ORDER)
    return {name: -(-(folder / name).stat().st_size // PAGE) for name in WRITE_ORDER}


@pytest.fixture
def small_disk(tmp_path):
    """``mount(pages)``: a tmpfs of that many pages at ``tmp_path/disk``, unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(pages: int):
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE}", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for path in mounted:
        # Lazy: a file the failed writer left open (kept alive by the traceback) is no reason to
        # leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize(
    ("fails_at", "writer"),
    [
        ("model.safetensors", "SafetensorError"),
        ("training_args.bin", "RuntimeError"),  # torch.save: 'iostream error' / 'unexpected pos'
        ("rng_state.pth", "RuntimeError"),
        pytest.param(
            "trainer_state.json",
            "OSError",
            marks=pytest.mark.xfail(
                reason="since longtail_progress.json joined the checkpoint the tmpfs fills one "
                "file early (rng_state.pth); the sizing is to be fixed",
                strict=False,
            ),
        ),
    ],
)
def test_full_disk_during_a_checkpoint_names_the_file_the_disk_and_its_free_space(
    checkpoint_pages, small_disk, fails_at, writer
):
    before = WRITE_ORDER[: WRITE_ORDER.index(fails_at)]
    # Room for every file before `fails_at` and for part of it: it fills the disk.
    disk = small_disk(
        sum(checkpoint_pages[name] for name in before) + 1 - (fails_at == "trainer_state.json")
    )
    folder = disk / "run" / "checkpoint-2"
    with pytest.raises(DiskWriteError) as info:
        _trainer(disk / "run").train()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.disk_full
    assert type(err.__cause__).__name__ == writer
    assert err.path == str(folder / fails_at)
    assert err.mount_point == str(disk) and err.device == "tmpfs"
    message = str(err)
    assert message.startswith(f"Could not write {folder / fails_at} while writing checkpoint")
    assert f"the filesystem mounted at {disk} (device tmpfs, tmpfs)" in message
    # safetensors removes its partial file (a page free again); the others leave it (none free).
    assert err.free_bytes == shutil.disk_usage(disk).free <= PAGE
    assert err.total_bytes == shutil.disk_usage(disk).total
    free = "4.0 KiB" if err.free_bytes else "0 bytes"
    assert f"which has {free} free of {err.total_bytes / 1024:.1f} KiB" in message
    assert "The disk is full: free space on" in message and "save_total_limit" in message
    assert "resume from the last complete checkpoint" in message
    # The promise of the message holds: the incomplete checkpoint is not taken for a readable one.
    assert checkpoint_problem(folder) is not None


def test_full_disk_while_saving_the_model_names_the_file(checkpoint_pages, small_disk):
    disk = small_disk(2)  # room for config.json, not for model.safetensors
    trainer = _trainer(disk / "run", save_strategy="no")
    trainer.train()
    with pytest.raises(DiskWriteError) as info:
        trainer.save_model()
    message = str(info.value)
    assert info.value.path == str(disk / "run" / "model.safetensors")
    assert f"while writing the model into {disk / 'run'}" in message
    assert f"mounted at {disk}" in message and "The disk is full" in message
    assert "trainer.save_model()" in message


def test_torch_write_error_text_is_wrapped_with_the_file_and_the_filesystem(tmp_path, monkeypatch):
    """Without a full disk at hand: torch.save writes part of optimizer.pt and fails with the
    text it gives on a full disk; the error still names the file, the disk and its free space."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="unexpected pos 576 vs 534") as info:
        _trainer(tmp_path).train()
    err = info.value
    folder = tmp_path / "checkpoint-2"
    assert isinstance(err, DiskWriteError) and err.path == str(folder / "optimizer.pt")
    usage = shutil.disk_usage(tmp_path)
    message = str(err)
    assert f"Could not write {folder / 'optimizer.pt'} while writing checkpoint {folder}" in message
    assert f"the filesystem mounted at {err.mount_point}" in message
    assert os.path.ismount(err.mount_point) and str(tmp_path).startswith(err.mount_point)
    assert err.total_bytes == usage.total and " free of " in message
    assert "resume from the last complete checkpoint" in message
    assert checkpoint_problem(folder) is not None


def test_errors_that_are_not_failed_writes_pass_through(tmp_path, monkeypatch):
    """A network error of a push from a checkpoint, say, is not a disk problem."""
    trainer = _trainer(tmp_path)

    def offline(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(trainer, "_save_rng_state", offline)
    with pytest.raises(ConnectionError, match="connection reset"):
        trainer.train()
