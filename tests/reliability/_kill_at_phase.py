"""``scripts/train.py`` that SIGKILLs itself at one phase of the end of its run (a test helper).

Usage: ``python _kill_at_phase.py PHASE TRAIN_ARGS...``. The phases, in the order a run reaches
them once its last optimizer step is done:

- ``final_checkpoint``: while the last checkpoint is written (its loss state and recipe are on
  disk, ``trainer_state.json`` is not: the checkpoint is incomplete);
- ``final_save``: after the final model's weights are written, before its loss and state;
- ``final_evaluation``: at the start of the test-split prediction;
- ``card``: with half of the model card written;
- ``after_card``: after every final file, before the process exits.

The kill is SIGKILL, which nothing can catch or clean up after: what a job scheduler's hard
kill, the OOM killer or a power cut leaves.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

PHASES = ("final_checkpoint", "final_save", "final_evaluation", "card", "after_card")


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(phase: str, max_steps: int) -> None:
    import transformers

    import hf_longtail.hub
    import hf_longtail.trainer as trainer_module

    if phase == "final_checkpoint":
        parent = transformers.Trainer._save_checkpoint

        def save_checkpoint(self, model, trial):
            if self.state.global_step >= max_steps:
                _die()  # LongTailTrainer wrote the loss state and recipe; the parent nothing
            return parent(self, model, trial)

        transformers.Trainer._save_checkpoint = save_checkpoint
    elif phase == "final_save":
        parent = transformers.Trainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            parent(self, output_dir, _internal_call)
            if not _internal_call:
                _die()

        transformers.Trainer.save_model = save_model
    elif phase == "final_evaluation":
        parent = trainer_module.LongTailTrainer.predict

        def predict(self, dataset, *args, metric_key_prefix="test", **kwargs):
            if metric_key_prefix == "test":
                _die()
            return parent(self, dataset, *args, metric_key_prefix=metric_key_prefix, **kwargs)

        trainer_module.LongTailTrainer.predict = predict
    elif phase == "card":
        build = hf_longtail.hub.build_model_card

        def write_model_card(output_dir, repo_id=None, **options):
            text = str(build(output_dir, repo_id, **options))
            path = Path(output_dir) / "README.md"
            with open(path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()

        hf_longtail.hub.write_model_card = write_model_card
    elif phase == "after_card":
        parent = trainer_module.write_evaluation

        def write_evaluation(*args, **kwargs):
            parent(*args, **kwargs)
            _die()

        trainer_module.write_evaluation = write_evaluation
    else:
        raise SystemExit(f"unknown phase {phase!r}; one of {PHASES}")


def main() -> None:
    phase = sys.argv.pop(1)
    args = sys.argv[1:]
    max_steps = int(args[args.index("--max_steps") + 1])
    _arm(phase, max_steps)
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
