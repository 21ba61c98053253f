"""Command line: ``python -m hf_longtail.hub {push,card} OUTPUT_DIR ...``.

``push`` uploads a finished run directory (model, processor, card, plots, results) to a model
repo; ``card`` (re)writes the long-tail model card ``README.md`` locally, optionally exporting
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

from hf_longtail.hub.card import CARD_OPTIONS, write_model_card
from hf_longtail.hub.push import DEFAULT_COMMIT_MESSAGE, PushToHubError, push_long_tail_model
from hf_longtail.hub.rundir import CARD_FILE, CONFUSION_PLOT, PER_CLASS_PLOT

EXIT_OK, EXIT_PUSH_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _card_options(parser: argparse.ArgumentParser) -> None:
    for option in CARD_OPTIONS:
        parser.add_argument(option.flag, default=option.default, help=option.help)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m hf_longtail.hub`` argument parser (sub-commands ``push`` and ``card``)."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_longtail.hub",
        description="Long-tail model cards and publishing to the Hugging Face Hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{push,card}")

    push = sub.add_parser(
        "push",
        help="push a finished run output directory to a Hub model repo",
        description="Write the long-tail card, then upload the model, processor, card, plots, "
        "all_results.json and longtail_run.json (never checkpoints or optimizer state).",
    )
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir")
    push.add_argument("--repo-id", required=True, help="target model repo, 'namespace/name'")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / saved login)")
    push.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    push.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    push.add_argument(
        "--keep-card",
        action="store_true",
        help="upload the existing README.md as it is instead of regenerating the card",
    )
    _card_options(push)

    card = sub.add_parser(
        "card",
        help="(re)write the long-tail model card README.md in OUTPUT_DIR",
        description="Render the long-tail model card from OUTPUT_DIR's files into "
        "OUTPUT_DIR/README.md; with --export-dir also copy it and its plots there.",
    )
    card.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir")
    card.add_argument(
        "--repo-id", default=None, help="model repo id shown in the usage snippet and metadata"
    )
    card.add_argument(
        "--export-dir",
        default=None,
        type=Path,
        help="also copy README.md and the plots it embeds into this directory",
    )
    _card_options(card)
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
            path = write_model_card(
                args.output_dir,
                args.repo_id,
                license=args.license,
                base_model=args.base_model,
                dataset_repo_id=args.dataset_repo_id,
            )
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
            license=args.license,
            base_model=args.base_model,
            dataset_repo_id=args.dataset_repo_id,
            keep_card=args.keep_card,
        )
        print(f"pushed {args.output_dir} to {getattr(commit, 'commit_url', commit)}")
        return EXIT_OK
    except PushToHubError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PUSH_FAILED
    except (ValueError, OSError) as err:  # OutputDirError, invalid repo id, unreadable files
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
