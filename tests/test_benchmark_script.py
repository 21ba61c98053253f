"""scripts/benchmark.py: command lines, statistics and README generation from JSON, the in-process
linear runner, and resuming a really interrupted preset."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_longtail.metrics.seed_stats import paired_difference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    from _helpers_train import load_script

    return load_script("benchmark")


@pytest.fixture(scope="module")
def train():
    from _helpers_train import load_train_script

    return load_train_script()


@pytest.mark.parametrize("preset", ["scratch", "paper", "finetune"])
def test_every_method_builds_a_valid_train_command(bench, train, preset, tmp_path, monkeypatch):
    choices = {
        "100": {
            "ccar": {"settings": {"ccar": True, "ccar_omega": 0.5}},
            "car": {"settings": {"car_weight": 5.0, "car_weights": "count"}},
        }
    }
    (tmp_path / "choices.json").write_text(json.dumps({"choices": choices}))
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    spec = dict(bench.PRESETS[preset], choices_from="choices")
    for method in spec["methods"]:
        flags = bench.METHODS[method]["flags"]
        argv = bench.run_flags(
            spec, method, 1, 100, tmp_path / "d", tmp_path / method, 10, tmp_path
        )
        model_args, data_args, config, run_args, training_args = train.parse_args(
            [*argv, "--use_cpu", "true"]
        )
        assert training_args.seed == 1
        if "stage" in flags:  # the second stage starts from the CE run of the same seed
            assert run_args.stage == flags["stage"]
            assert Path(run_args.from_run) == tmp_path / bench.run_key("ce", 100, 1)
            continue
        assert training_args.num_train_epochs == 10 and data_args.imbalance_factor == 100
        assert config.base == flags["loss"]
        if method.endswith("_tuned"):  # the linear preset's choice, not the published setting
            assert config.ccar and config.ccar_omega == 0.5
            assert config.car_weight == 5.0 and config.car_weights == "count"
        else:
            assert config.ccar == flags.get("ccar", False)
            assert config.car_weight == flags.get("car_weight", 0.0)
        assert data_args.many_shot_threshold == 1500 and data_args.few_shot_threshold == 200
        if method == "ldam_drw":  # DRW at the same fraction of the schedule as 160/200
            assert config.drw_epoch == 8 and model_args.classifier == "cosine"


def test_finetune_plan_pairs_stages_with_every_ce_seed_and_orders_by_seed(bench):
    """The finetune plan: the issue's seeds (3 for the headline methods, 1 for the rest), a
    second stage on every CE seed, each stage after its CE run, headline seed 0 first."""
    import argparse

    preset = bench.PRESETS["finetune"]
    args = argparse.Namespace(methods=None, imbalance_factor=None, seeds=None)
    plan = bench.plan_train_py(preset, args)
    seeds = {}
    for method, seed, _ in plan:
        seeds.setdefault(method, []).append(seed)
    for method in ("ce", "la", "ce_ccar_car", "la_ccar_car", "ce_crt", "ce_posthoc_la_stage"):
        assert sorted(seeds[method]) == [0, 1, 2], method
    for method in ("bs", "ce_ccar", "ce_car", "ce_ccar_car_tuned", "la_ccar_car_tuned"):
        assert seeds[method] == [0], method
    assert "ce_posthoc_la" not in seeds  # the stage gives the row without training CE again
    position = {(m, s): i for i, (m, s, _) in enumerate(plan)}
    for seed in (0, 1, 2):
        for stage in ("ce_crt", "ce_posthoc_la_stage"):
            assert position[("ce", seed)] < position[(stage, seed)]
    assert [m for m, s, _ in plan[:4]] == ["ce", "la", "ce_ccar_car", "la_ccar_car"]
    assert {s for _, s, _ in plan[:6]} == {0}
    assert max(position[(m, 2)] for m in ("ce", "la", "ce_ccar_car", "la_ccar_car")) < min(
        position[(m, 0)] for m in ("bs", "ce_ccar", "ce_car")
    )


def _payload(runs, methods, preset="linear"):
    return {
        "name": "unit",
        "preset": preset,
        "dataset": "cifar10",
        "model": "m",
        "imbalance_factors": [100],
        "epochs": 2,
        "methods": methods,
        "environment": {"processor": "x86_64", "cpu_count": 2, "torch": "x", "torch_threads": 1},
        "runs": runs,
    }


def test_statistics_statement_and_readme_from_json(bench, tmp_path):
    accuracies = {
        "ce": [0.30, 0.34, 0.38],
        "la": [0.50, 0.46, 0.48],
        "ce_ccar_car": [0.31, 0.33, 0.37],
    }
    worst = {"ce": [0.0, 0.02, 0.01], "la": [0.30, 0.33, 0.31], "ce_ccar_car": [0.0, 0.03, 0.0]}
    runs = [
        {
            "method": m,
            "seed": s,
            "imbalance_factor": 100,
            "epochs": 2,
            "train_runtime_s": 10.0 if m == "ce" else 12.0,
            "peak_rss_mb": 100.0 + s,
            "test": {"accuracy": a, "worst_class_accuracy": worst[m][s], "ece": 0.1},
        }
        for m, values in accuracies.items()
        for s, a in enumerate(values)
    ]
    methods = {
        "ce": {"label": "CE", "base": None},
        "la": {"label": "LA", "base": "ce"},
        "ce_ccar_car": {"label": "CE + CCAR + CAR", "base": "ce"},
    }
    payload = _payload(runs, methods)
    rows = {row["method"]: row for row in bench.summarize(payload, 100)}
    assert rows["la"]["accuracy"] == (
        pytest.approx(statistics.mean(accuracies["la"])),
        pytest.approx(statistics.stdev(accuracies["la"])),
    )
    expected = paired_difference(dict(enumerate(worst["la"])), dict(enumerate(worst["ce"])))
    assert rows["la"]["paired"]["worst_class_accuracy"] == expected.to_dict()
    assert rows["la"]["time_ratio"] == pytest.approx(1.2)
    assert rows["ce"]["peak_rss_mb"] == 102.0
    verdicts = bench.tail_verdicts(list(rows.values()))
    assert verdicts["helps"] == ["la"] and verdicts["no clear effect"] == ["ce_ccar_car"]

    path = tmp_path / "unit.json"
    path.write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    start, end = bench.readme_markers("linear")
    other = bench.readme_markers("finetune")
    readme.write_text(
        f"intro\n{start}\nSTALE-TABLE\n{end}\nmiddle\n{other[0]}\nkeep\n{other[1]}\nout\n"
    )
    table = bench.write_report(path, update_readme=True, readme=readme)
    assert "| LA | 3 | 48.0 ± 2.0 |" in table and "| CE | 3 | 34.0 ± 4.0 |" in table
    assert (
        "**Help the tail** (paired 95% interval of worst-class or few-shot): LA (worst-class +30.3)."
        in table
    )
    assert "CE + CCAR + CAR >= CE + 3 points overall (CE + CCAR + CAR): -0.3" in table
    # the linear preset's goals are over 5 seeds: 3 are shown but not judged
    assert "**not judged yet (3 of 5 seeds)**" in table and "**not met**" not in table
    finetune_rows = bench.summarize(_payload(runs, methods, preset="finetune"), 100)
    judged = bench.goal_lines(finetune_rows, bench.seeds_needed({"preset": "finetune"}))
    assert judged[0].endswith("over 3 seeds: **not met**.")
    text = readme.read_text()
    assert "STALE-TABLE" not in text and "48.0 ± 2.0" in text
    assert text.startswith("intro\n") and "middle\n" in text and "keep" in text
    assert text.endswith("out\n")
    assert path.with_suffix(".png").stat().st_size > 0
    assert path.with_suffix(".md").read_text().startswith("# unit")
    with pytest.raises(SystemExit, match="lacks the"):
        bench.write_report(path, update_readme=True, readme=tmp_path / "unit.md")


def test_legacy_results_file_still_reports(bench, tmp_path):
    """The committed ResNet-32 file (old schema: ``metrics``, one ``imbalance_factor``)."""
    source = REPO / "benchmarks/results/cifar10lt_if100_cpu.json"
    path = tmp_path / "legacy.json"
    path.write_text(source.read_text())
    table = bench.write_report(path)
    ce = [
        r["metrics"]["accuracy"]
        for r in json.loads(source.read_text())["runs"]
        if r["method"] == "ce"
    ]
    assert f"| CE | 3 | {100 * statistics.mean(ce):.1f} ± {100 * statistics.stdev(ce):.1f}" in table
    assert "| 70.4 |" in table  # the published number, labelled as such


# ------------------------------------------------------------------ the linear runner
class _Probe(torch.nn.Module):
    """A backbone-free stand-in: ``classifier`` is what the runner replaces and trains."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(d, k)


def _features(n_per_class, d, seed, shift=2.5):
    from datasets import ClassLabel, Dataset, Features, List, Value

    rng = np.random.default_rng(seed)
    k = len(n_per_class)
    means = rng.normal(size=(k, d)) * shift
    labels = np.concatenate([[c] * n for c, n in enumerate(n_per_class)])
    x = means[labels] + rng.normal(size=(len(labels), d))
    feats = Features(
        {"features": List(Value("float32"), length=d), "labels": ClassLabel(num_classes=k)}
    )
    return Dataset.from_dict({"features": x.astype("float32"), "labels": labels}, features=feats)


@pytest.fixture
def linear_setup(tmp_path, one_thread):
    from _helpers_train import load_script

    bl = load_script("benchmark_linear")
    counts = [80, 30, 12, 5]
    splits = bl.FeatureSplits(
        bl.in_memory_features(_features(counts, 6, 0)),
        bl.in_memory_features(_features([20] * 4, 6, 1)),
        bl.in_memory_features(_features([25] * 4, 6, 2)),
        counts,
        ["a", "b", "c", "d"],
        "synthetic",
    )
    recipe = {
        "num_train_epochs": 3,
        "per_device_train_batch_size": 32,
        "learning_rate": 0.05,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
    }
    runner = bl.LinearRunner(
        _Probe(6, 4), splits, recipe, recipe, {"many": 50, "few": 10}, tmp_path / "w"
    )
    return bl, runner, splits


def test_linear_runner_methods_and_validation_choices(linear_setup):
    bl, runner, splits = linear_setup
    ce = runner.run(bl.LINEAR_METHODS["ce"], 0)
    assert ce["test"]["num_samples"] == 100 and ce["validation"]["num_samples"] == 80
    assert ce["epochs"] == 3 and ce["train_runtime_s"] > 0
    assert (runner.work_dir / "heads" / "ce_seed0.pt").is_file()  # second stages start here
    again = runner.run(bl.LINEAR_METHODS["ce"], 0)
    assert again["test"]["accuracy"] == ce["test"]["accuracy"]  # seeded

    # Post-hoc LA: tau is the validation optimum of the CE head, never chosen on test.
    posthoc = runner.run(bl.LINEAR_METHODS["ce_posthoc_la"], 0)
    best = max(posthoc["tau_scores"].values())
    assert posthoc["tau_scores"][posthoc["tau"]] == best
    assert posthoc["tau"] == min(t for t, v in posthoc["tau_scores"].items() if v == best)
    from hf_longtail.decoupled import head_logits
    from hf_longtail.metrics import logit_adjust, long_tail_metrics

    runner._ce_head(0)
    val_logits = head_logits(runner.model, splits.validation)
    labels = splits.validation["labels"].numpy()
    for tau in (0.0, 1.0, 2.0):
        adjusted = logit_adjust(val_logits, splits.class_counts, tau)
        assert posthoc["tau_scores"][tau] == pytest.approx(
            long_tail_metrics(adjusted, labels, splits.class_counts)["balanced_accuracy"]
        )
    for name in ("ce_tau_norm", "ce_crt", "ce_lws", "ldam_drw"):
        record = runner.run(bl.LINEAR_METHODS[name], 0)
        assert 0.0 <= record["test"]["accuracy"] <= 1.0, name
    with pytest.raises(KeyError, match="the sweep must run first"):
        runner.run(bl.LINEAR_METHODS["ce_ccar_car_tuned"], 0)


def test_sweep_choice_is_the_validation_best(linear_setup):
    bl, runner, _ = linear_setup
    configs = bl.sweep_configs()
    assert len([k for k in configs if configs[k][0] == "car"]) == 20
    assert max(s["car_weight"] for f, s in configs.values() if f == "car") == 10.0
    picks = [
        "car_a0.5_frequency_global",
        "car_a10_count_per_class",
        "ccar_paper_w0.75",
        "ccar_notebook_w0.9",
    ]
    runs = {}
    for key in picks:
        family, settings = configs[key]
        runs[key] = runner.run({**bl.LINEAR_METHODS["ce"], "loss": {"base": "ce", **settings}}, 0)
    chosen = bl.choose(runs)
    for family in ("car", "ccar"):
        keys = [k for k in picks if configs[k][0] == family]
        best = max(runs[k]["validation"]["balanced_accuracy"] for k in keys)
        assert chosen[family]["validation_balanced_accuracy"] == best
        assert chosen[family]["settings"] == configs[chosen[family]["sweep_id"]][1]
    tuned = runner.run(bl.LINEAR_METHODS["ce_ccar_car_tuned"], 0, chosen)
    for family in ("car", "ccar"):
        for field, value in chosen[family]["settings"].items():
            assert tuned["loss"][field] == value


def _tiny_preset(cifar10_dir, tmp_path, results, seeds=("0",)):
    """A benchmark sitting of two 2-step scratch runs (CE, LA) writing under ``tmp_path``."""
    code = (
        "import sys, runpy; from pathlib import Path; sys.argv = sys.argv[1:];"
        f"sys.path.insert(0, {str(REPO / 'scripts')!r}); import benchmark;"
        f"benchmark.RESULTS_DIR = Path({str(results)!r}); benchmark.main(sys.argv[1:])"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        "benchmark.py",
        "--preset",
        "scratch",
        "--methods",
        "ce",
        "la",
        "--seeds",
        *seeds,
        "--data",
        str(cifar10_dir),
        "--name",
        "tiny",
        "--work_dir",
        str(tmp_path / "work"),
        "--set",
        "max_steps=2",
        "per_device_train_batch_size=16",
        "max_eval_samples=64",
        "dataloader_num_workers=0",
        "save_strategy=no",
        "preflight_sample=8",
    ]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------ a real interruption
@pytest.mark.slow
def test_interrupted_preset_resumes_without_rerunning_finished_runs(cifar10_dir, tmp_path):
    """Kill the benchmark (and its train.py) right after the first run's record is written;
    the second sitting skips that run, does the other, and leaves the first record untouched."""
    results = tmp_path / "results"
    cmd, env = _tiny_preset(cifar10_dir, tmp_path, results)
    runs = results / "tiny_runs"
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (runs.is_dir() and any(runs.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the first run did not finish in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the harness and its train.py child, as a scheduler
    proc.wait(timeout=60)
    first_out = proc.stdout.read()
    finished = sorted(runs.glob("*.json"))
    assert [p.name for p in finished] == ["ce_if100_seed0.json"], first_out
    before = finished[0].read_bytes()
    stamp = finished[0].stat().st_mtime_ns
    assert "[1/2] ce seed 0 IF 100" in first_out

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 runs to do, 1 already done" in second.stdout
    assert "[2/2] la seed 0 IF 100" in second.stdout and "ce seed 0" not in second.stdout
    assert finished[0].read_bytes() == before and finished[0].stat().st_mtime_ns == stamp
    payload = json.loads((results / "tiny.json").read_text())
    assert sorted(r["method"] for r in payload["runs"]) == ["ce", "la"]
    assert all(r["test"]["num_samples"] == 64 for r in payload["runs"])


@pytest.mark.slow
def test_two_sittings_side_by_side_run_each_run_once(cifar10_dir, tmp_path):
    """Two sittings of one preset started together (one per core) share the work: every run
    is trained by exactly one of them, and both end with the complete results file."""
    results = tmp_path / "results"
    cmd, env = _tiny_preset(cifar10_dir, tmp_path, results, seeds=("0", "1"))
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = [
        line.split("] ", 1)[1].split(" (elapsed")[0]
        for out in outs
        for line in out.splitlines()
        if "(elapsed" in line
    ]
    expected = [f"{m} seed {s} IF 100" for m in ("ce", "la") for s in (0, 1)]
    assert sorted(started) == sorted(expected), outs
    runs = sorted(p.name for p in (results / "tiny_runs").glob("*.json"))
    assert runs == sorted(f"{m}_if100_seed{s}.json" for m in ("ce", "la") for s in (0, 1))
    payload = json.loads((results / "tiny.json").read_text())
    assert len(payload["runs"]) == 4


def test_a_resumed_run_is_timed_over_the_epochs_it_trained(bench, tmp_path):
    """``resume_step`` reads the step of the checkpoint train.py resumes from (a real
    LongTailTrainer run saving every 2 steps; a corrupt newer checkpoint is skipped, as
    train.py skips it), and the s/epoch column divides a resumed run's runtime by the epochs
    it trained, not by all of them."""
    from _helpers_train import tiny_vit, train_dataset, training_args

    from hf_longtail import LongTailTrainer
    from hf_longtail.data import collate_fn

    out = tmp_path / "run"
    assert bench.resume_step(out) == 0
    LongTailTrainer(
        model=tiny_vit(),
        args=training_args(out, max_steps=5, save_strategy="steps", save_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate_fn,
        loss_config={"base": "ce"},
    ).train()
    assert bench.resume_step(out) == 5
    (out / "checkpoint-5" / "model.safetensors").write_bytes(b"truncated")
    assert bench.resume_step(out) == 4

    fresh = {"method": "ce", "seed": 0, "epochs": 6, "train_runtime_s": 600.0}
    resumed = fresh | {"seed": 1, "train_runtime_s": 100.0}
    resumed |= {"resumed_from_step": 950, "max_steps": 1140}
    assert bench.epochs_timed(resumed) == pytest.approx(1.0)
    assert bench.epochs_timed(fresh) == 6
    payload = {"methods": {"ce": {"label": "CE"}}, "runs": [fresh, resumed]}
    (row,) = bench.summarize(payload, 100)
    assert row["epoch_time_s"] == pytest.approx(100.0)  # not (100 + 100 / 6) / 2


def test_a_claimed_run_is_refused_until_its_process_dies(bench, tmp_path):
    """``claim_run`` is the lock several sittings share: while another process holds a run it
    is refused (and ``is_claimed`` says so); SIGKILL that process, as a scheduler ends a job,
    and the run is free again without anyone removing the lock file."""
    lock = tmp_path / "work" / ".ce_if100_seed0.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert bench.is_claimed(lock)
        with bench.claim_run(lock) as mine:
            assert mine is False
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lock.is_file() and not bench.is_claimed(lock)
    with bench.claim_run(lock) as mine:
        assert mine is True
        assert bench.is_claimed(lock)  # held by anyone, this process included


def test_linear_pool_holds_the_library_splits(cifar10_dir):
    """The one backbone pass covers exactly what the library builds: every IF's long-tailed
    training rows and the balanced hold-out (disjoint), so no row needs a second pass."""
    from _helpers_train import load_script

    from hf_longtail.data import label_array

    bl = load_script("benchmark_linear")
    source, _ = bl.source_splits(cifar10_dir)
    pool = bl.pool_rows(label_array(source, "label"), (100, 50, 10), 100)
    keys = {key: i for i, key in enumerate(bl._image_keys(source))}
    previous = None
    for factor in (100, 50, 10):
        lt, val, description = bl.protocol_splits(cifar10_dir, factor, 100)
        train_rows, val_rows = bl.rows_in_source(lt, keys), bl.rows_in_source(val, keys)
        assert "heldout" in description and len(val_rows) == 1000
        assert np.bincount(label_array(val, "label")).tolist() == [100] * 10
        assert np.intersect1d(train_rows, val_rows).size == 0
        assert np.setdiff1d(np.concatenate([train_rows, val_rows]), pool).size == 0
        if previous is not None:  # nested subsets: a smaller IF keeps every row of a larger
            assert np.setdiff1d(previous, train_rows).size == 0
        previous = train_rows
    assert len(pool) == len(previous) + 1000


def test_step_cost_goal_line_reads_the_interleaved_measurement(bench, tmp_path):
    """bench_step_cost.py's JSON (a real, tiny measurement) becomes the finetune report's step
    cost lines, and the 3% goal is judged on its CCAR + CAR / CE ratio."""
    from _helpers_train import load_script

    step_cost = load_script("bench_step_cost")
    previous = torch.get_num_threads()
    try:
        medians = step_cost.main(
            ["--threads", "1", "--rounds", "2", "--batch", "8", "--json", str(tmp_path / "s.json")]
        )
    finally:
        torch.set_num_threads(previous)
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["median_ms"] == pytest.approx(medians)
    ratio = medians["ce_ccar_car"] / medians["ce"]
    assert record["ratio_to_ce"]["ce_ccar_car"] == pytest.approx(ratio)
    (tmp_path / "step_cost_finetune.json").write_text(json.dumps(record))
    lines = bench.step_cost_lines({"preset": "finetune"}, results_dir=tmp_path)
    goal = [line for line in lines if line.startswith("- Goal, ce_ccar_car step")]
    verdict = "met" if ratio <= 1.03 else "not met"
    assert goal == [f"- Goal, ce_ccar_car step within 3% of CE's: {ratio:.3f}x: **{verdict}**."]
    assert bench.step_cost_lines({"preset": "linear"}, results_dir=tmp_path) == []


def test_validation_curve_from_trainer_state_reaches_the_report(bench, tmp_path):
    """The per-epoch validation curve is read from the log history the Trainer writes (the
    training-loss entries in between are skipped) and averaged per epoch over seeds."""
    run_dir = tmp_path / "ce_if100_seed0"
    run_dir.mkdir()
    history = [
        {"epoch": 1.0, "loss": 2.1, "step": 10},
        {"epoch": 1.0, "eval_balanced_accuracy": 0.40, "eval_loss": 1.9, "step": 10},
        {"epoch": 2.0, "loss": 1.5, "step": 20},
        {"epoch": 2.0, "eval_balanced_accuracy": 0.50, "eval_loss": 1.4, "step": 20},
    ]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    curve = bench.validation_curve(run_dir)
    assert curve == [
        {"epoch": 1.0, "balanced_accuracy": 0.40, "loss": 1.9},
        {"epoch": 2.0, "balanced_accuracy": 0.50, "loss": 1.4},
    ]
    assert bench.validation_curve(tmp_path / "missing") is None
    other = [dict(p, balanced_accuracy=p["balanced_accuracy"] + 0.1) for p in curve]
    payload = {
        "runs": [
            {"method": "ce", "seed": 0, "imbalance_factor": 100, "validation_curve": curve},
            {"method": "ce", "seed": 1, "imbalance_factor": 100, "validation_curve": other},
        ]
    }
    assert bench.curve_lines(payload, 100, {"ce": "CE"}) == ["- CE: 45.0 (ep 1) -> 55.0 (ep 2)"]


def test_work_dir_of_another_recipe_is_neither_resumed_nor_deleted(bench, tmp_path):
    """A run directory is resumed only by the command that started it; one left by a changed
    recipe (or without the command record) stops the preset, and its files stay as they were."""
    out = tmp_path / "ce_if100_seed0"
    cmd = ["python", "train.py", "--learning_rate", "0.03", "--image_size", "96"]
    bench.check_work_dir(out, cmd)
    assert json.loads((out / bench.COMMAND_FILE).read_text()) == cmd[1:]
    (out / "all_results.json").write_text('{"test_accuracy": 0.5}')
    bench.check_work_dir(out, ["/other/venv/python", *cmd[1:]])  # same run, new interpreter
    changed = ["python", "train.py", "--learning_rate", "0.05", "--image_size", "96"]
    with pytest.raises(SystemExit, match=r"different command \(differing arguments: 0\.03 0\.05"):
        bench.check_work_dir(out, changed)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "all_results.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no benchmark_command\.json"):
        bench.check_work_dir(legacy, cmd)
    assert (out / "all_results.json").read_text() == '{"test_accuracy": 0.5}'
    assert sorted(p.name for p in legacy.iterdir()) == ["all_results.json"]
