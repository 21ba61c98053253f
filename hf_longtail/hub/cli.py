"""Command line: ``python -m hf_longtail.hub {push,card} OUTPUT_DIR ...``.

``push`` uploads a finished run directory (model, processor, card, plots, results) to a model
repo, changing no local file; ``card`` (re)writes the long-tail model card ``README.md`` locally, optionally exporting
it with its plots (how ``model_cards/examples/`` is regenerated). Exit status: 0 on success,
1 when the push failed (local files intact; the message says how to retry), 2 for bad input
(missing files, invalid repo id, bad arguments).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_longtail.hub.card import CARD_OPTIONS, card_options, write_model_card
from hf_longtail.hub.push import DEFAULT_COMMIT_MESSAGE, PushToHubError, push_long_tail_model
from hf_longtail.hub.rundir import CARD_FILE, CONFUSION_PLOT, PER_CLASS_PLOT

EXIT_OK, EXIT_PUSH_FAILED, EXIT_BAD_INPUT = 0, 1, 2


# Each sub-command: its help and description, its --repo-id, and its own options; every one
# also reads OUTPUT_DIR and takes the card options (CARD_OPTIONS, defined once).
_SUBCOMMANDS: dict[str, dict[str, Any]] = {
    "push": {
        "help": "push a finished run output directory to a Hub model repo",
        "description": "Upload the model, processor, plots, all_results.json, "
        "longtail_run.json (never checkpoints or optimizer state) and the long-tail card, "
        "rendered for --repo-id into a temporary copy: OUTPUT_DIR/README.md is never rewritten.",
        "repo_id": {"required": True, "help": "target model repo, 'namespace/name'"},
        "options": {
            "--private": {"action": "store_true", "help": "create the repo as private"},
            "--token": {"default": None, "help": "Hub token (default: HF_TOKEN / saved login)"},
            "--revision": {"default": None, "help": "branch to push to (created if needed)"},
            "--commit-message": {"default": DEFAULT_COMMIT_MESSAGE},
            "--keep-card": {
                "action": "store_true",
                "help": "upload the existing README.md as it is instead of regenerating the card",
            },
        },
    },
    "card": {
        "help": "(re)write the long-tail model card README.md in OUTPUT_DIR",
        "description": "Render the long-tail model card from OUTPUT_DIR's files into "
        "OUTPUT_DIR/README.md; with --export-dir also copy it and its plots there.",
        "repo_id": {
            "default": None,
            "help": "model repo id shown in the usage snippet and metadata",
        },
        "options": {
            "--export-dir": {
                "default": None,
                "type": Path,
                "help": "also copy README.md and the plots it embeds into this directory",
            },
        },
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m hf_longtail.hub`` argument parser (sub-commands ``push`` and ``card``)."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_longtail.hub",
        description="Long-tail model cards and publishing to the Hugging Face Hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{push,card}")
    for name, spec in _SUBCOMMANDS.items():
        command = sub.add_parser(name, help=spec["help"], description=spec["description"])
        command.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir")
        command.add_argument("--repo-id", **spec["repo_id"])
        for flag, kwargs in spec["options"].items():
            command.add_argument(flag, **kwargs)
        for option in CARD_OPTIONS:
            command.add_argument(option.flag, default=option.default, help=option.help)
    return parser


def _export(output_dir: Path, export_dir: Path) -> list[Path]:
    export_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (CARD_FILE, PER_CLASS_PLOT, CONFUSION_PLOT):
        if (output_dir / name).is_file():
            copied.append(Path(shutil.copy2(output_dir / name, export_dir / name)))
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "card":
            path = write_model_card(args.output_dir, args.repo_id, **card_options(vars(args)))
            print(f"wrote {path}")
            if args.export_dir is not None:
                for copied in _export(path.parent, args.export_dir):
                    print(f"exported {copied}")
            return EXIT_OK
        commit = push_long_tail_model(
            args.output_dir,
            args.repo_id,
            token=args.token,
            private=True if args.private else None,
            commit_message=args.commit_message,
            revision=args.revision,
            keep_card=args.keep_card,
            **card_options(vars(args)),
        )
        print(f"pushed {args.output_dir} to {getattr(commit, 'commit_url', commit)}")
        return EXIT_OK
    except PushToHubError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PUSH_FAILED
    except (ValueError, OSError) as err:  # OutputDirError, invalid repo id, unreadable files
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
