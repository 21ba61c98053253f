"""CI is reproducible: ``.ci/run`` installs every package at its version in ``constraints.txt``
(unless ``CI_LATEST=1``, the documented way to test the newest releases), the pins cover the
whole dependency tree of the dev install, and the README's test command is what CI runs.

``.ci/run`` itself is executed, with ``python3`` / ``python`` / ``ruff`` replaced by stubs that
record their arguments, so the test sees the commands CI would run in seconds, without
installing anything."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from _readme import REPO, shell_commands

CONSTRAINTS = REPO / "constraints.txt"

_STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && echo 'true' > "$3/bin/activate"
fi
"""


def _ci_commands(tmp_path: Path, **env: str) -> list[list[str]]:
    """The python / ruff commands ``bash .ci/run`` runs, in order (stubs: nothing is run)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("python3", "python", "ruff"):
        (stubs / name).write_text(_STUB)
        (stubs / name).chmod(0o755)
    log = tmp_path / "commands.log"
    run_env = {
        "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "CI_VENV": str(tmp_path / "venv"),
        **env,
    }
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")], env=run_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def _pins() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s+;]+)", line.strip())
        assert match, f"constraints.txt:{number}: {line!r} is not NAME==VERSION (no local tag)"
        name = _normalized(match[1])
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = match[2]
    return pins


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_ci_installs_from_the_constraints_and_runs_the_readme_test_command(tmp_path):
    commands = _ci_commands(tmp_path)
    installs = [c for c in commands if c[:4] == ["python", "-m", "pip", "install"]]
    assert installs == [
        ["python", "-m", "pip", "install", "-q", "--upgrade", "pip", "-c", "constraints.txt"],
        ["python", "-m", "pip", "install", "-q", "-e", ".[dev]", "-c", "constraints.txt"],
    ]
    assert ["ruff", "check", "."] in commands and ["ruff", "format", "--check", "."] in commands
    assert commands[-1] == ["python", "-m", "pytest", "-q"]
    # The README's test command installs and tests exactly as CI does.
    readme = shell_commands()
    test_command = next(
        readme[i : i + 4]
        for i in range(len(readme) - 3)
        if readme[i] == ["python3", "-m", "venv", ".venv"] and "pytest" in readme[i + 3]
    )
    assert test_command[2] == ["pip", "install", "-e", ".[dev]", "-c", "constraints.txt"]
    assert test_command[3] == ["python", "-m", "pytest", "-q"]


def test_ci_latest_installs_the_newest_releases(tmp_path):
    commands = _ci_commands(tmp_path, CI_LATEST="1")
    installs = [c for c in commands if c[:4] == ["python", "-m", "pip", "install"]]
    assert installs == [
        ["python", "-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["python", "-m", "pip", "install", "-q", "-e", ".[dev]"],
    ]
    # What moved, to regenerate constraints.txt from.
    assert ["python", "-m", "pip", "freeze", "--all", "--exclude-editable"] in commands
    assert commands[-1] == ["python", "-m", "pytest", "-q"]


def _requirements_of_the_dev_install() -> set[str]:
    """Every distribution ``pip install -e ".[dev]"`` brings on this platform: the project's
    requirements (pyproject.toml) and, recursively, theirs (installed metadata)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), "") for r in project["dependencies"]]
    todo += [(Requirement(r), "") for r in project["optional-dependencies"]["dev"]]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _normalized(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: reported by the caller as unpinned
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            extras = sorted(req.extras) or [""]
            todo += [(sub_req, e) for e in extras]
    return seen


def test_constraints_pin_every_package_of_the_dev_install():
    pins = _pins()
    assert "hf-longtail" not in pins  # the project is installed from the checkout
    unpinned = sorted(_requirements_of_the_dev_install() - set(pins))
    assert not unpinned, (
        f"constraints.txt does not pin {unpinned}: regenerate it with "
        "`python -m pip freeze --all --exclude-editable` in an environment where the suite passes."
    )
    assert {"torch", "transformers", "timm", "datasets", "peft", "pip"} <= set(pins)


@pytest.mark.skipif(
    not os.environ.get("CI") or os.environ.get("CI_LATEST") == "1",
    reason="CI installs from constraints.txt; a developer's environment may differ",
)
def test_ci_environment_has_the_pinned_versions():
    pins = _pins()
    moved = {}
    for name in _requirements_of_the_dev_install():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if pins.get(name) != version:
            moved[name] = (pins.get(name), version)
    assert not moved, f"installed versions differ from constraints.txt (pin, installed): {moved}"
