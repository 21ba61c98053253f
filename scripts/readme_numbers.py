#!/usr/bin/env python
"""Run the README's main job and its decoupled second stages, and write their numbers into
README.md, so that every number there is what a fresh install prints, with the versions it ran on.

    python scripts/readme_numbers.py                      # run (about 3 minutes on 2 cores)
    python scripts/readme_numbers.py --report benchmarks/results/main_job.json   # rewrite only

The main job (``scripts/train.py scripts/configs/digits_ccar_car.yaml``) and the three second
stages (``decoupled_stage.yaml --stage crt|lws|tau_norm``) each run in a fresh process into a new
directory under ``outputs/readme-<time>/`` (nothing earlier is touched). Their wall times, the
trainer's ``train_runtime``, the test metrics, the machine, its load and the package versions go
to ``benchmarks/results/main_job.json``; README.md's blocks between the ``main-job`` and
``decoupled-stages`` markers are rebuilt from that file, and the main job's card (with its
plots) is exported to ``model_cards/examples/digits_ccar_car/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_throughput import load_average, machine_info

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "main_job.json"
MAIN_CONFIG = "scripts/configs/digits_ccar_car.yaml"
STAGE_CONFIG = "scripts/configs/decoupled_stage.yaml"
CARD_EXAMPLE = REPO / "model_cards" / "examples" / "digits_ccar_car"
STAGES = (("crt", "cRT", "head re-trained, class-balanced sampling"),
          ("lws", "LWS", "per-class scales, class-balanced sampling"),
          ("tau_norm", "tau-norm", None))  # fmt: skip
MARKERS = {"main": ("<!-- main-job:start -->", "<!-- main-job:end -->"),
           "stages": ("<!-- decoupled-stages:start -->", "<!-- decoupled-stages:end -->")}  # fmt: skip


def _run(argv: list[str]) -> float:
    """Run ``python scripts/train.py ARGV`` in a fresh process; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "scripts/train.py", *argv], cwd=REPO, check=True)
    return time.perf_counter() - start


def _results(out: Path) -> dict[str, Any]:
    results = json.loads((out / "all_results.json").read_text())
    record = json.loads((out / "longtail_run.json").read_text())
    keep = {k: v for k, v in results.items() if not isinstance(v, list)}
    keep["stage"] = record.get("stage")
    return keep


def run_all() -> dict[str, Any]:
    """Run the main job and the stages; the payload written to :data:`RESULT`."""
    root = REPO / "outputs" / time.strftime("readme-%Y%m%d-%H%M%S")
    load_before = load_average()
    main_out = root / "digits-ccar-car"
    payload: dict[str, Any] = {
        "command": f"python scripts/train.py {MAIN_CONFIG}",
        "machine": machine_info(),
        "load_average_before": load_before,
    }
    payload["main"] = {"wall_s": _run([MAIN_CONFIG, "--output_dir", str(main_out)])}
    payload["main"].update(_results(main_out))
    payload["stages"] = {}
    for stage, _, _ in STAGES:
        out = root / f"digits-ccar-car-{stage}"
        wall = _run([STAGE_CONFIG, "--stage", stage, "--from_run", str(main_out),
                     "--output_dir", str(out)])  # fmt: skip
        payload["stages"][stage] = {"wall_s": wall, **_results(out)}
    payload["load_average_after"] = load_average()
    # The example card of model_cards/ is the card of this very run.
    subprocess.run([sys.executable, "-m", "hf_longtail.hub", "card", str(main_out), "--repo-id",
                    "hf-longtail/digits-lt-ccar-car", "--export-dir", str(CARD_EXAMPLE)],
                   cwd=REPO, check=True)  # fmt: skip
    return payload


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _versions(m: dict[str, Any]) -> str:
    return (
        f"torch {m['torch'].split('+')[0]}, transformers {m['transformers']}, timm {m['timm']}, "
        f"datasets {m['datasets']}, Python {m['python']}, hf-longtail {m['hf_longtail']}"
    )


def _load(payload: dict[str, Any]) -> str:
    load = max(payload["load_average_before"][0], payload["load_average_after"][0])
    cores = payload["machine"]["cpu_count"]
    if load < 0.5:
        return "the machine otherwise idle"
    return f"load average up to {load:.1f} on its {cores} cores, so the times are inflated"


def main_block(payload: dict[str, Any]) -> str:
    """The README sentence on the main job, from the payload."""
    m, r = payload["main"], payload["machine"]
    crt = payload["stages"]["crt"]
    return (
        f"On a {r['cpu_count']}-core machine ({_versions(r)}; {_load(payload)}) it trains for "
        f"{m['train_runtime']:.0f} s ({m['epoch']:.0f} epochs; {m['wall_s']:.0f} s wall time "
        f"including start-up, the one-time conversion of the weights and the evaluation) and "
        f"prints {_pct(m['test_accuracy'])}% overall, {_pct(m['test_few_shot_accuracy'])}% "
        f"few-shot and {_pct(m['test_worst_class_accuracy'])}% worst-class accuracy. Classifier "
        f"re-training (cRT) on its frozen features then reaches {_pct(crt['test_accuracy'])}% "
        f"overall and {_pct(crt['test_worst_class_accuracy'])}% worst-class in "
        f"{crt['wall_s']:.0f} s (see [Frozen backbone, feature cache, and the decoupled second "
        f"stage](#frozen-backbone-feature-cache-and-the-decoupled-second-stage))."
    )


def stages_block(payload: dict[str, Any]) -> str:
    """The README table of the second stages on the main job's run, from the payload."""
    cols = ("test_accuracy", "test_few_shot_accuracy", "test_worst_class_accuracy",
            "test_balanced_accuracy")  # fmt: skip
    rows = [
        "| Model | Overall | Few-shot | Worst-class | Balanced | Wall time | Note |",
        "|---|---|---|---|---|---|---|",
        "| main job (CE + CCAR + CAR fine-tuning) | "
        + " | ".join(_pct(payload["main"][c]) for c in cols)
        + f" | {payload['main']['wall_s']:.0f} s | |",
    ]
    for stage, label, note in STAGES:
        s = payload["stages"][stage]
        if note is None:
            tau = (s.get("stage") or {}).get("tau")
            note = f"tau = {tau:g} chosen on the hold-out" if tau is not None else ""
        cells = " | ".join(_pct(s[c]) for c in cols)
        rows.append(f"| + {label} | {cells} | {s['wall_s']:.0f} s | {note} |")
    return (
        "\n".join(rows)
        + f"\n\n{payload['machine']['cpu_count']} cores, {_versions(payload['machine'])}; "
        + f"{_load(payload)}."
    )


def update_readme(payload: dict[str, Any], result_path: Path) -> None:
    """Replace README.md's generated blocks (between the markers) with the payload's numbers."""
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    note = (f"<!-- generated by scripts/readme_numbers.py --report "
            f"{result_path.relative_to(REPO)}; do not edit by hand -->")  # fmt: skip
    for key, block in (("main", main_block(payload)), ("stages", stages_block(payload))):
        start, end = MARKERS[key]
        if start not in text or end not in text:
            raise SystemExit(f"README.md lacks the markers {start} / {end}.")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{note}\n{block}\n{end}{after}"
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=None,
                        help="rewrite README.md from this JSON without running")  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULT, help="where the run's JSON goes")
    args = parser.parse_args(argv)
    if args.report is not None:
        path = args.report.resolve()
        payload = json.loads(path.read_text())
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        payload = run_all()
        path = args.json.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    update_readme(payload, path)
    print(main_block(payload), stages_block(payload), sep="\n\n")
    return payload


if __name__ == "__main__":
    main()
