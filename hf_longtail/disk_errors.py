"""Failed writes of checkpoints and saved models, turned into errors a user can act on.

A full disk during ``torch.save`` surfaces as ``[enforce fail at inline_container.cc:672] .
unexpected pos 576 vs 534`` (no file, no disk, no hint), and during a safetensors write as
``Error while serializing: I/O error: No space left on device (os error 28)``.
:func:`naming_write_failures` wraps such a write and raises :class:`DiskWriteError` naming the
file being written, the filesystem it is on (device, mount point, type), its free space, and
the fix. No torch import: the errors are recognised by their type and text.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["DiskWriteError", "filesystem_of", "naming_write_failures"]

# What torch.save says when fewer bytes reached the file than it wrote (the disk or a quota is
# full, or the device failed): its zip writer (caffe2 PyTorchStreamWriter) or the C++ stream.
_TORCH_WRITE_FAILURE = (
    "inline_container",
    "PytorchStreamWriter",
    "file write failed",
    "iostream error",
)
_SAFETENSORS_IO = ("I/O error", "os error", "No space left")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# The OSErrors of a write that the filesystem refused (a network error of a push from a
# checkpoint, say, is not one: it passes through as it is).
_WRITE_ERRNOS = (*_FULL_ERRNOS, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)
_FULL_TEXT = ("No space left", "os error 28", "os error 122", "Disk quota")
# A file whose writer started at most this long before the write began still counts as being
# written by it: file timestamps come from the kernel's coarse clock (a few ms behind).
_CLOCK_SLACK_NS = 1_000_000_000


class DiskWriteError(OSError):
    """Writing a checkpoint or a saved model failed (typically: its disk is full).

    Attributes: ``path`` (the file being written, or the folder when the writer removed its
    partial file and the file cannot be told), ``mount_point``, ``device``, ``free_bytes`` and
    ``total_bytes`` of its filesystem (``None`` where they could not be read). The original
    error is the ``__cause__``; ``errno`` is ``ENOSPC`` when the disk is full.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        mount_point: str | None,
        device: str | None,
        free_bytes: int | None,
        total_bytes: int | None,
        disk_full: bool,
    ) -> None:
        super().__init__(errno.ENOSPC if disk_full else errno.EIO, message)
        self.message = message
        self.path = path
        self.mount_point = mount_point
        self.device = device
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes
        self.disk_full = disk_full

    def __str__(self) -> str:
        return self.message


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes spaces, tabs, newlines and backslashes in paths as octal escapes.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def filesystem_of(path: str | os.PathLike) -> dict[str, str | int | None]:
    """The filesystem holding ``path`` (or its nearest existing parent): ``mount_point``,
    ``device`` and ``type`` (from ``/proc/mounts`` where there is one, else ``None``),
    ``free_bytes`` and ``total_bytes`` (``shutil.disk_usage``; ``None`` if unreadable)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    mount = existing
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    device = fstype = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and _unescape_mount_field(fields[1]) == mount:
                device, fstype = fields[0], fields[2]  # the last entry wins (stacked mounts)
    try:
        usage = shutil.disk_usage(existing)
        free, total = usage.free, usage.total
    except OSError:
        free = total = None
    return {
        "mount_point": mount,
        "device": device,
        "type": fstype,
        "free_bytes": free,
        "total_bytes": total,
    }


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, DiskWriteError):
        return False
    if isinstance(err, OSError):
        return err.errno in _WRITE_ERRNOS and not isinstance(err, (ConnectionError, TimeoutError))
    text = str(err)
    if isinstance(err, RuntimeError):
        return any(sign in text for sign in _TORCH_WRITE_FAILURE)
    return type(err).__name__ == "SafetensorError" and any(s in text for s in _SAFETENSORS_IO)


def _is_disk_full(err: BaseException, free: int | None) -> bool:
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    if any(sign in str(err) for sign in _FULL_TEXT):
        return True
    return free is not None and free < 1024**2


def _file_being_written(
    folder: str, expected: Sequence[str], started_ns: int, err: BaseException
) -> str | None:
    """The file the failed write was writing, from what the failure left in ``folder``.

    An ``OSError`` may carry it. safetensors writes atomically and removes its partial file:
    then it is the first expected ``.safetensors`` file that is missing. torch and ``json``
    leave a partial file behind: the newest one written since the write began (ties broken by
    the expected write order). ``None`` when nothing tells.
    """
    if isinstance(err, OSError) and err.filename:
        return os.fsdecode(err.filename)
    if type(err).__name__ == "SafetensorError":
        for name in expected:
            if name.endswith(".safetensors") and not os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return None
    order = {name: i for i, name in enumerate(expected)}
    touched = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                if mtime >= started_ns - _CLOCK_SLACK_NS:
                    touched.append((mtime, order.get(entry.name, -1), entry.path))
    return max(touched)[2] if touched else None


def write_failure(
    err: BaseException, folder: str, what: str, expected: Sequence[str], started_ns: int, fix: str
) -> DiskWriteError:
    """The :class:`DiskWriteError` for ``err``, raised while writing ``what`` into ``folder``
    (see :func:`naming_write_failures`)."""
    path = _file_being_written(folder, expected, started_ns, err) or folder
    fs = filesystem_of(path)
    free, total = fs["free_bytes"], fs["total_bytes"]
    full = _is_disk_full(err, free if isinstance(free, int) else None)
    where = f"the filesystem mounted at {fs['mount_point']}"
    if fs["device"]:
        where += f" (device {fs['device']}, {fs['type']})"
    cause = f"{type(err).__name__}: {err}".strip()
    if full:
        advice = (
            f"The disk is full: free space on {fs['mount_point']} (for example delete "
            "checkpoints of finished runs or lower save_total_limit), or write to an output_dir "
            f"on a disk with more room. {fix}"
        )
    else:
        advice = (
            f"Check that {fs['mount_point']} is writable (read-only mount, quota, network "
            f"filesystem), then try again. {fix}"
        )
    message = (
        f"Could not write {path} while writing {what}: {cause}\n"
        f"{path} is on {where}, which has {_size(free)} free of {_size(total)}.\n{advice}"
    )
    return DiskWriteError(
        message,
        path=path,
        mount_point=fs["mount_point"],  # type: ignore[arg-type]
        device=fs["device"],  # type: ignore[arg-type]
        free_bytes=free if isinstance(free, int) else None,
        total_bytes=total if isinstance(total, int) else None,
        disk_full=full,
    )


@contextlib.contextmanager
def naming_write_failures(
    folder: str | os.PathLike, what: str, expected: Sequence[str] = (), fix: str = ""
) -> Iterator[None]:
    """Turn a failed write inside the block into :class:`DiskWriteError`.

    ``folder`` is where the block writes, ``what`` says what it writes (``"checkpoint
    .../checkpoint-4"``), ``expected`` lists the file names it writes in order (to tell which one
    failed) and ``fix`` is appended to the message (how to carry on afterwards). Caught: every
    ``OSError``, torch's zip-writer ``RuntimeError`` and safetensors' I/O ``SafetensorError``;
    anything else (and an inner :class:`DiskWriteError`) passes through unchanged.
    """
    started_ns = time.time_ns()
    try:
        yield
    except Exception as err:
        if not _is_write_failure(err):
            raise
        raise write_failure(err, os.fspath(folder), what, expected, started_ns, fix) from err
