"""Push a finished run output directory to the Hugging Face Hub, safely.

Everything is saved locally first (the trainer's job); the push only reads those files. The
card it publishes is rendered into a temporary copy that is uploaded as ``README.md``: the run
directory's own ``README.md`` (perhaps edited by hand) is never rewritten, and nothing there is
deleted or moved. Any failure of the network part becomes a :class:`PushToHubError` whose
message says what failed and the exact CLI command that retries the push.
"""

from __future__ import annotations

import fnmatch
import logging
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_longtail.hub.card import CARD_OPTIONS, build_model_card
from hf_longtail.hub.rundir import CARD_FILE, validate_output_dir

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, HfApi

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload long-tailed image classifier (hf-longtail)"

# What a published model repo needs, top-level files only: model weights and configs, the
# processor, the card and its plots, the run's results. Sub-directories (checkpoint-*/, runs/)
# and training state (optimizer.pt, scheduler.pt, rng_state*.pth, pickled training_args.bin)
# never match, so they are never uploaded.
PUSH_PATTERNS = ("*.json", "*.safetensors", "pytorch_model*.bin", "*.png", CARD_FILE)
# Top-level JSON that is trainer-internal state rather than part of the published model.
PUSH_EXCLUDED = ("trainer_state.json",)


class PushToHubError(RuntimeError):
    """A push to the Hub failed; local files are untouched and the message says how to retry.

    Attributes: ``retry_command`` (the CLI line that retries, without any token) and the
    original exception as ``__cause__``.
    """

    def __init__(self, message: str, retry_command: str) -> None:
        super().__init__(message)
        self.retry_command = retry_command


def files_to_push(output_dir: str | Path) -> list[str]:
    """The relative paths :func:`push_long_tail_model` uploads from ``output_dir``, sorted.

    Top-level regular files matching :data:`PUSH_PATTERNS` (``*.json``, ``*.safetensors``,
    ``pytorch_model*.bin``, ``*.png``, ``README.md``) minus :data:`PUSH_EXCLUDED`; never a
    sub-directory (``checkpoint-*``, ``runs``), never optimizer/scheduler/RNG state or the
    pickled ``training_args.bin``, never hidden files.
    """
    root = Path(output_dir)
    selected = []
    for path in root.iterdir():
        name = path.name
        if not path.is_file() or path.is_symlink() or name.startswith("."):
            continue
        if name in PUSH_EXCLUDED:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in PUSH_PATTERNS):
            selected.append(name)
    return sorted(selected)


def retry_command(output_dir: str | Path, repo_id: str, **options: Any) -> str:
    """The shell command that pushes ``output_dir`` again with the same options (no token):
    ``options`` are the keyword options of :func:`push_long_tail_model` (``private``,
    ``revision``, ``keep_card`` and the :data:`~hf_longtail.hub.card.CARD_OPTIONS` ``license``,
    ``dataset_repo_id``, ``base_model``); the others (``token``, ``api``, ...) are not part of
    the command."""
    parts = ["python", "-m", "hf_longtail.hub", "push", str(output_dir), "--repo-id", repo_id]
    if options.get("private"):
        parts.append("--private")
    if options.get("revision"):
        parts += ["--revision", options["revision"]]
    for option in CARD_OPTIONS:
        if options.get(option.name) not in (None, option.default):
            parts += [option.flag, options[option.name]]
    if options.get("keep_card"):
        parts.append("--keep-card")
    return shlex.join(parts)


def _describe_failure(err: BaseException, token_known: bool) -> str:
    """What went wrong (likely cause for the Hub's typical errors, then the raw error), a few lines."""
    from huggingface_hub import errors as hf_errors

    detail = f"{type(err).__name__}: {err}".strip()
    offline = getattr(hf_errors, "OfflineModeIsEnabled", ())
    not_found = getattr(hf_errors, "RepositoryNotFoundError", ())
    http_error = getattr(hf_errors, "HfHubHTTPError", ())
    validation = getattr(hf_errors, "HFValidationError", ())
    if offline and isinstance(err, offline):
        hint = "the Hub is unreachable because offline mode is on (unset HF_HUB_OFFLINE)"
    elif validation and isinstance(err, validation):
        hint = "the repository id is not valid"
    elif not_found and isinstance(err, not_found):
        hint = "the repository was not found or you may not write to it (check the repo id)"
    elif http_error and isinstance(err, http_error):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            hint = "the Hub refused the token (authentication / permission error)"
        else:
            hint = f"the Hub answered with an HTTP error{f' {status}' if status else ''}"
    elif isinstance(err, OSError):
        hint = "a network or file error interrupted the upload"
    else:
        hint = "the upload failed"
    lines = [f"{hint}.", f"Cause: {detail}"]
    if not token_known:
        lines.append(
            "No Hugging Face token was found: pass --token, set HF_TOKEN or run `hf auth login`."
        )
    return "\n".join(lines)


def _token_known(token: str | None, api: Any) -> bool:
    if token or getattr(api, "token", None):
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # pragma: no cover - token lookup must never break error reporting
        return False


def _warn_if_local_card_is_kept_back(path: Path, card_text: str, card: dict[str, Any]) -> None:
    """Say so when the run's ``README.md`` is not the card hf-longtail renders from its files
    (edited by hand, or stale): it stays as it is, and the regenerated card is uploaded."""
    local = path / CARD_FILE
    if not local.is_file():
        return
    try:
        text = local.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None and text in (card_text, str(build_model_card(path, None, **card))):
        return
    logger.warning(
        "%s is not the card hf-longtail generates for this run (edited by hand?): it is left "
        "unchanged and not uploaded; the generated card is. Pass --keep-card (keep_card=True) "
        "to upload yours instead.",
        local,
    )


def push_long_tail_model(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    keep_card: bool = False,
    api: HfApi | None = None,
    **card: Any,
) -> CommitInfo:
    """Push a finished run directory to the model repo ``repo_id``; return the ``CommitInfo``.

    Steps: validate ``output_dir`` (:class:`~hf_longtail.hub.rundir.OutputDirError` before any
    network call) and ``repo_id``; render the long-tail card for ``repo_id`` into a temporary
    file (with ``keep_card``, the run's own ``README.md`` is uploaded instead, if there is
    one); ``create_repo(exist_ok=True)``; create ``revision`` as a branch if given; then one
    ``create_commit`` adding :func:`files_to_push` (model, processor, plots,
    ``all_results.json``, ``longtail_run.json``; no checkpoints or optimizer state) and the
    card as ``README.md``. ``api`` defaults to ``HfApi(token=token)``; pass one to inject a
    client. ``card``: the :data:`~hf_longtail.hub.card.CARD_OPTIONS` (``license`` (default
    apache-2.0), ``base_model``, ``dataset_repo_id``), for the card and the retry command.

    Local files are only ever read: the run's ``README.md`` is never rewritten (a warning says
    when it differs from the uploaded card). Any error of the Hub part (offline mode, no or bad
    token, wrong repo id, HTTP or network error mid-upload) is raised as
    :class:`PushToHubError` naming the cause and the retry command; the original exception is
    its ``__cause__``.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import validate_repo_id

    unknown = sorted(set(card) - {option.name for option in CARD_OPTIONS})
    if unknown:
        raise TypeError(
            f"push_long_tail_model got unknown option(s) {unknown}; the card options are "
            f"{[option.name for option in CARD_OPTIONS]}."
        )
    path = validate_output_dir(output_dir, require_run_info=not keep_card)
    retry = retry_command(
        path, repo_id, private=private, revision=revision, keep_card=keep_card, **card
    )
    untouched = f"This push wrote, changed or deleted no file in {path}."
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise PushToHubError(
            f"Cannot push {path} to {repo_id!r}: {err} Use 'namespace/name', e.g. "
            f"'your-username/{path.name}'. Nothing was uploaded. {untouched}\n"
            f"Retry with: {retry.replace(shlex.quote(repo_id), 'NAMESPACE/NAME', 1)}",
            retry,
        ) from err
    local_card = path / CARD_FILE
    own_card = keep_card and local_card.is_file()
    # Built before any network call: an incomplete run directory fails here.
    card_text = None if own_card else str(build_model_card(path, repo_id, **card))
    if card_text is not None:
        _warn_if_local_card_is_kept_back(path, card_text, card)
    files = [name for name in files_to_push(path) if name != CARD_FILE]

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    stage = "creating the repository"
    # The card to publish is a temporary copy, so a failure at any stage leaves the run
    # directory exactly as it was (a hand-edited README.md included).
    with tempfile.TemporaryDirectory(prefix="hf_longtail_card_") as tmp:
        if card_text is None:
            card_file = local_card
        else:
            card_file = Path(tmp) / CARD_FILE
            card_file.write_text(card_text, encoding="utf-8", newline="")
        try:
            repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            target = getattr(repo_url, "repo_id", None) or repo_id
            if revision and revision != "main" and not revision.startswith("refs/pr/"):
                stage = f"creating the branch {revision!r}"
                api.create_branch(target, branch=revision, token=token, exist_ok=True)
            stage = f"uploading {len(files) + 1} files"
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name))
                for name in files
            ]
            operations.append(
                CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card_file))
            )
            return api.create_commit(
                repo_id=target,
                operations=operations,
                commit_message=commit_message,
                token=token,
                revision=revision,
            )
        # Deliberately broad: whatever the transport raises (huggingface_hub errors,
        # httpx/requests errors, OSError, xet upload errors), the user must get the retry path,
        # with the cause.
        except Exception as err:
            reason = _describe_failure(err, _token_known(token, api))
            raise PushToHubError(
                f"Push of {path} to https://huggingface.co/{repo_id} failed while {stage}: "
                f"{reason}\n{untouched}\n"
                f"Retry with: {retry}\n"
                "(add --token TOKEN, or log in with `hf auth login`, if the failure was "
                "authentication)",
                retry,
            ) from err
