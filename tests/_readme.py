"""The code blocks of README.md, as the tests that execute them read them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_text() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    """Every fenced block of ``language`` in README.md, in order."""
    return re.findall(rf"```{language}\n(.*?)```", readme_text(), re.DOTALL)


def python_block(containing: str) -> str:
    """The one ```python block of README.md that contains ``containing``."""
    found = [block for block in code_blocks("python") if containing in block]
    assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
    return found[0]


def shell_commands() -> list[list[str]]:
    """The commands of README.md's ```bash blocks: continuation lines joined, comments and
    ``&&`` chains split, each as an argv list."""
    commands = []
    for block in code_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                if part:
                    commands.append(shlex.split(part))
    return commands
