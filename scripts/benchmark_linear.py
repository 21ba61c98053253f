"""The ``linear`` preset of ``scripts/benchmark.py`` in one process: frozen features, many heads.

A linear head on frozen EfficientNet-Lite0 features trains in seconds, so starting one
``scripts/train.py`` process per (method, seed) would spend most of the preset importing torch and
transformers and re-reading the feature cache. Here every run is still the library's own path -
``create_model`` + ``freeze_backbone``, features from :func:`hf_longtail.features.cached_features`,
``LongTailTrainer`` with the method's ``LongTailLossConfig``, ``make_compute_metrics``, the
decoupled second stages of :mod:`hf_longtail.decoupled` - but the model, the features and the
imports are loaded once.

Features: the backbone runs once over a pool of source training rows (the validation hold-out
and the nested long-tailed subsets) and once over the test split (library feature-cache entries,
reused by later sittings); every imbalance factor's training split and validation hold-out,
built by the library, is a slice of the pool (rows matched by their encoded image).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("hf_longtail.benchmark")

IMAGE_COLUMN, LABEL_COLUMN = "img", "label"


@dataclass
class FeatureSplits:
    """Frozen-backbone features of one imbalance factor's train / validation / test splits."""

    train: Any
    validation: Any
    test: Any
    class_counts: list[int]
    class_names: list[str]
    validation_source: str


@functools.cache
def _in_memory_class():
    from datasets import Dataset

    class InMemoryFeatures(Dataset):
        """A cached-feature ``datasets.Dataset`` whose rows are served from two tensors.

        Fetching a batch from the Arrow-backed feature dataset (torch format) costs about 10 ms
        per 256 rows on one core, twice the head's whole training step; here a batch is two
        tensor gathers. It *is* the same ``Dataset`` otherwise (same Arrow table, columns,
        features), so ``LongTailTrainer`` and its class-aware samplers treat it as the cached
        feature split it is.
        """

        def _tensors(self):
            return self.__dict__["_x"], self.__dict__["_y"]

        def __getitems__(self, keys):
            import torch

            x, y = self._tensors()
            index = torch.as_tensor(keys, dtype=torch.long)
            xs, ys = x[index], y[index]
            return [{"features": xs[i], "labels": ys[i]} for i in range(len(index))]

        def __getitem__(self, key):
            x, y = self._tensors()
            if isinstance(key, str) and key in ("features", "labels"):
                return x if key == "features" else y
            if isinstance(key, (int, slice)):
                return {"features": x[key], "labels": y[key]}
            return super().__getitem__(key)

    return InMemoryFeatures


def in_memory_features(dataset: Any) -> Any:
    """``dataset`` (cached features) as an in-memory ``InMemoryFeatures`` sharing its table."""
    import copy

    import torch

    out = copy.copy(dataset.with_format("torch"))
    columns = out[:]  # ds[name] is a lazy column in datasets >= 4
    out.__class__ = _in_memory_class()
    out.__dict__["_x"] = torch.as_tensor(columns["features"])
    out.__dict__["_y"] = torch.as_tensor(columns["labels"])
    return out


def load_backbone(model_name: str, image_size: int, num_labels: int, class_names: list[str]):
    """``(model, processor, eval_transform)`` exactly as ``scripts/train.py`` builds them."""
    from hf_longtail.data import select_transforms
    from hf_longtail.models import create_image_processor, create_model, record_eval_preprocessing

    model = create_model(model_name, num_labels=num_labels, id2label=class_names)
    processor = create_image_processor(model_name, model)
    protocol, _, eval_tf = select_transforms("model", processor, image_size=image_size)
    processor = record_eval_preprocessing(model, processor, protocol, image_size)
    return model, processor, eval_tf


def source_splits(data: str | Path, seed: int = 0):
    """``(train, test)`` of the source dataset, before any long-tailed subsampling."""
    from hf_longtail.data import load_long_tailed

    dd = load_long_tailed(str(data), imbalance_factor=None, seed=seed)
    return dd["train"], dd["test"]


def _image_keys(dataset: Any) -> list[bytes]:
    """SHA-1 of every row's encoded image (no decoding): identifies rows across subsets."""
    import hashlib

    from datasets import Image as ImageFeature

    raw = dataset.with_format(None).select_columns([IMAGE_COLUMN])
    raw = raw.cast_column(IMAGE_COLUMN, ImageFeature(decode=False))
    keys = []
    for start in range(0, len(raw), 4096):
        for item in raw[start : start + 4096][IMAGE_COLUMN]:
            data = item.get("bytes") or str(item.get("path")).encode()
            keys.append(hashlib.sha1(data).digest())
    return keys


def rows_in_source(subset: Any, source_keys: dict[bytes, int]) -> np.ndarray:
    """Row index in the source split of every row of ``subset`` (matched by encoded image).

    Raises:
        ValueError: a row of ``subset`` is not in the source split.
    """
    rows = []
    for i, key in enumerate(_image_keys(subset)):
        if key not in source_keys:
            raise ValueError(f"row {i} of the subset is not an image of the source training split")
        rows.append(source_keys[key])
    return np.asarray(rows, dtype=np.int64)


def protocol_splits(data: str | Path, imbalance_factor: float, per_class: int, seed: int = 0):
    """``(long-tailed train, validation, description)`` as the library builds them.

    With the library's ``load_long_tailed(validation_per_class=N)`` (a balanced hold-out of N
    images per class taken from the source training images *before* subsampling): that. Older
    trees: the long-tailed subset and :func:`hf_longtail.decoupled.validation_split`'s hold-out of
    images the subsampling dropped (the capped head class then has none).
    """
    import inspect

    from hf_longtail.data import class_counts, load_long_tailed

    if "validation_per_class" in inspect.signature(load_long_tailed).parameters:
        dd = load_long_tailed(
            str(data), imbalance_factor=imbalance_factor, seed=seed, validation_per_class=per_class
        )
        return dd["train"], dd["validation"], f"heldout: {per_class} per class, before subsampling"
    from hf_longtail.decoupled import validation_split

    lt = load_long_tailed(str(data), imbalance_factor=imbalance_factor, seed=seed)["train"]
    record = {
        "dataset": {
            "name": str(data),
            "imbalance_factor": imbalance_factor,
            "profile": "exp",
            "seed": seed,
            "image_column": IMAGE_COLUMN,
            "label_column": LABEL_COLUMN,
            "class_counts": class_counts(lt, LABEL_COLUMN),
        }
    }
    splits = validation_split(record, per_class=per_class)
    return lt, splits.validation, splits.validation_source


def pool_rows(labels: np.ndarray, imbalance_factors, per_class: int, seed: int = 0) -> np.ndarray:
    """Source training rows the preset is expected to use: the balanced hold-out of ``per_class``
    images per class and, from the rest, each factor's long-tailed subset, drawn with the seeded
    keys of :mod:`hf_longtail.data.subsampling` (the subsets of one seed are nested, so this is
    about the IF-10 subset plus the hold-out). Only sizes the one backbone pass; the splits
    themselves always come from the library (:func:`protocol_splits`), and a row missing here
    is featurised separately."""
    from hf_longtail.data import long_tailed_indices
    from hf_longtail.data.profiles import long_tailed_counts
    from hf_longtail.data.subsampling import _ranks_within_class

    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1
    order, rank = _ranks_within_class(labels, k, seed)
    held, rest = np.sort(order[rank < per_class]), np.sort(order[rank >= per_class])
    available = np.bincount(labels[rest], minlength=k)
    rows = [held]
    for factor in imbalance_factors:
        wanted = np.minimum(available, long_tailed_counts(int(available.max()), k, factor, "exp"))
        rows.append(rest[long_tailed_indices(labels[rest], wanted, seed)])
    return np.unique(np.concatenate(rows))


def feature_splits(
    model, eval_tf, data, imbalance_factors, validation_per_class: int, seed: int = 0, **cache
) -> dict[float, FeatureSplits]:
    """:class:`FeatureSplits` per imbalance factor. The backbone runs once over the pool of
    source training rows (:func:`pool_rows`) and once over the test split (library feature-cache
    entries, reused by every later sitting); each factor's train / validation split, built by
    the library (:func:`protocol_splits`), is a slice of the pool (rows matched by their encoded
    image), plus a second cache entry for any row outside the pool."""
    from datasets import concatenate_datasets

    from hf_longtail.data import class_counts, label_array
    from hf_longtail.features import cached_features

    source, test = source_splits(data, seed)
    pool = pool_rows(
        label_array(source, LABEL_COLUMN), imbalance_factors, validation_per_class, seed
    )
    protocol = {f: protocol_splits(data, f, validation_per_class, seed) for f in imbalance_factors}
    keys = {key: i for i, key in enumerate(_image_keys(source))}
    needed = {
        f: (rows_in_source(lt, keys), rows_in_source(val, keys))
        for f, (lt, val, _) in protocol.items()
    }
    every = np.unique(np.concatenate([np.concatenate(v) for v in needed.values()]))
    extra = np.setdiff1d(every, pool)
    feats = cached_features(
        model, source.select(pool.tolist()), eval_tf, split="train-pool", **cache
    )
    rows = pool
    if extra.size:
        more = cached_features(
            model, source.select(extra.tolist()), eval_tf, split="train-extra", **cache
        )
        feats, rows = concatenate_datasets([feats, more]), np.concatenate([pool, extra])
    position = {int(r): i for i, r in enumerate(rows)}
    test_feats = cached_features(model, test, eval_tf, split="test", **cache)
    out = {}
    for factor in imbalance_factors:
        lt, _, description = protocol[factor]
        train_rows, val_rows = needed[factor]
        if np.intersect1d(train_rows, val_rows).size:
            raise ValueError(f"IF {factor:g}: validation rows overlap the training rows")
        counts = class_counts(lt, LABEL_COLUMN)
        train = in_memory_features(feats.select([position[int(r)] for r in train_rows]))
        if np.bincount(train["labels"].numpy(), minlength=len(counts)).tolist() != counts:
            raise ValueError(f"IF {factor:g}: sliced features do not match the subset's counts")
        names = list(lt.features[LABEL_COLUMN].names)
        out[factor] = FeatureSplits(
            train,
            in_memory_features(feats.select([position[int(r)] for r in val_rows])),
            in_memory_features(test_feats),
            counts,
            names,
            description,
        )
    return out


# ---------------------------------------------------------------------------- one run
#: Post-hoc logit-adjustment strengths searched on validation (train.py --posthoc_tau auto's grid).
POSTHOC_TAUS = tuple(0.25 * i for i in range(9))


def select_posthoc_tau(
    logits: np.ndarray, labels: np.ndarray, counts, taus=POSTHOC_TAUS
) -> tuple[float, dict[float, float]]:
    """``(tau, {tau: validation balanced accuracy})`` of ``logits - tau log prior`` over
    ``taus``; ties go to the smaller tau."""
    from hf_longtail.metrics import logit_adjust, long_tail_metrics

    scores = {}
    for t in taus:
        adjusted = logit_adjust(logits, counts, float(t))
        scores[float(t)] = long_tail_metrics(adjusted, labels, counts)["balanced_accuracy"]
    best = max(scores, key=lambda t: (scores[t], -t))
    return best, scores


def new_head(model, kind: str, seed: int) -> None:
    """Give ``model`` a freshly initialised head (``linear`` or LDAM's ``cosine``), seeded."""
    from torch import nn
    from transformers import set_seed

    from hf_longtail.features import find_classifier, set_classifier
    from hf_longtail.models import NormedLinear

    _, old = find_classifier(model)
    d, k = old.in_features, old.out_features
    set_seed(seed)
    set_classifier(model, nn.Linear(d, k) if kind == "linear" else NormedLinear(d, k))


def training_args(recipe: dict, seed: int, output_dir: str | Path, **changes):
    """``TrainingArguments`` of one head fit: the recipe, no checkpoints, no logs on disk."""
    from transformers import TrainingArguments

    values = {
        "output_dir": str(output_dir),
        "seed": seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        **recipe,
        **changes,
    }
    return TrainingArguments(**values)


def fit_head(model, splits: FeatureSplits, loss: dict, args, sampler: str = "random") -> float:
    """Train the current head on ``splits.train`` with ``loss`` through ``LongTailTrainer``;
    returns the training runtime in seconds."""
    from hf_longtail.trainer import LongTailTrainer

    trainer = LongTailTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        loss_config=dict(loss),
        class_counts=splits.class_counts,
        sampler=sampler,
    )
    return float(trainer.train().metrics["train_runtime"])


def logits_of(model, splits: FeatureSplits) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"validation"|"test": (logits, labels)}`` of the current head."""
    from hf_longtail.decoupled import head_logits

    return {
        name: (head_logits(model, feats), feats["labels"].numpy())
        for name, feats in (("validation", splits.validation), ("test", splits.test))
    }


def scalar_metrics(logits, labels, splits: FeatureSplits, thresholds: dict, tau=None) -> dict:
    """:func:`hf_longtail.metrics.long_tail_metrics` without the per-class lists."""
    from hf_longtail.metrics import long_tail_metrics

    metrics = long_tail_metrics(
        logits,
        labels,
        splits.class_counts,
        many_threshold=thresholds["many"],
        few_threshold=thresholds["few"],
        class_names=splits.class_names,
        logit_adjustment_tau=tau,
    )
    metrics["per_class_accuracy"] = [
        None if v is None else round(float(v), 6) for v in metrics["per_class_accuracy"]
    ]
    return metrics


# ---------------------------------------------------------------------------- methods
def _spec(label, loss=None, kind="train", base="ce", head="linear", tuned=None):
    return {
        "label": label,
        "loss": loss or {},
        "kind": kind,
        "base": base,
        "head": head,
        "tuned": tuned,
    }


#: The published CAR / CCAR settings (config defaults): alpha 0.5, frequency weights with r0 0.2,
#: global EMA; CCAR paper variant with omega 0.75.
PUBLISHED_CAR = {"car_weight": 0.5, "car_weights": "frequency", "car_ema": "global"}
PUBLISHED_CCAR = {"ccar": True, "ccar_variant": "paper", "ccar_omega": 0.75}

#: Every method of the ``linear`` preset. ``kind``: ``train`` (a head trained with ``loss``),
#: ``posthoc_la`` / ``tau_norm`` / ``crt`` / ``lws`` (applied to the CE head of the same seed),
#: ``tuned`` (``loss`` plus the CCAR / CAR settings chosen on validation by the sweep).
#: ``base``: the method it is compared with, paired per seed.
LINEAR_METHODS: dict[str, dict] = {
    "ce": _spec("CE", {"base": "ce"}, base=None),
    "focal": _spec("Focal (gamma 1)", {"base": "focal", "focal_gamma": 1.0}),
    "cb": _spec("Class-balanced CE", {"base": "cb"}),
    "ldam_drw": _spec("LDAM-DRW", {"base": "ldam", "drw": 0.8}, head="cosine"),
    "la": _spec("LA", {"base": "la"}, base="ce"),
    "bs": _spec("Balanced softmax", {"base": "bs"}),
    "ce_ccar": _spec("CE + CCAR", {"base": "ce", **PUBLISHED_CCAR}),
    "ce_ccar_emf": _spec(
        "CE + CCAR (e_minus_f)", {"base": "ce", **PUBLISHED_CCAR, "ccar_variant": "e_minus_f"}
    ),
    "ce_ccar_notebook": _spec(
        "CE + CCAR (notebook)", {"base": "ce", **PUBLISHED_CCAR, "ccar_variant": "notebook"}
    ),
    "ce_car": _spec("CE + CAR", {"base": "ce", **PUBLISHED_CAR}),
    "ce_car_count": _spec(
        "CE + CAR (count weights)", {"base": "ce", **PUBLISHED_CAR, "car_weights": "count"}
    ),
    "ce_car_per_class": _spec(
        "CE + CAR (per-class EMA)", {"base": "ce", **PUBLISHED_CAR, "car_ema": "per_class"}
    ),
    "ce_ccar_car": _spec("CE + CCAR + CAR", {"base": "ce", **PUBLISHED_CCAR, **PUBLISHED_CAR}),
    "focal_ccar_car": _spec(
        "Focal + CCAR + CAR",
        {"base": "focal", "focal_gamma": 1.0, **PUBLISHED_CCAR, **PUBLISHED_CAR},
    ),
    "cb_ccar_car": _spec("CB + CCAR + CAR", {"base": "cb", **PUBLISHED_CCAR, **PUBLISHED_CAR}),
    "ldam_drw_ccar_car": _spec(
        "LDAM-DRW + CCAR + CAR",
        {"base": "ldam", "drw": 0.8, **PUBLISHED_CCAR, **PUBLISHED_CAR},
        head="cosine",
        base="ldam_drw",
    ),
    "la_ccar": _spec("LA + CCAR", {"base": "la", **PUBLISHED_CCAR}, base="la"),
    "la_car": _spec("LA + CAR", {"base": "la", **PUBLISHED_CAR}, base="la"),
    "la_ccar_car": _spec(
        "LA + CCAR + CAR", {"base": "la", **PUBLISHED_CCAR, **PUBLISHED_CAR}, base="la"
    ),
    "bs_ccar_car": _spec(
        "BS + CCAR + CAR", {"base": "bs", **PUBLISHED_CCAR, **PUBLISHED_CAR}, base="bs"
    ),
    "ce_posthoc_la": _spec("CE + post-hoc LA (tau on val)", kind="posthoc_la"),
    "ce_tau_norm": _spec("CE then tau-norm (tau on val)", kind="tau_norm"),
    "ce_crt": _spec("CE then cRT", kind="crt"),
    "ce_lws": _spec("CE then LWS", kind="lws"),
    "ce_ccar_tuned": _spec(
        "CE + CCAR (tuned on val)", {"base": "ce"}, kind="tuned", tuned=("ccar",)
    ),
    "ce_car_tuned": _spec("CE + CAR (tuned on val)", {"base": "ce"}, kind="tuned", tuned=("car",)),
    "ce_ccar_car_tuned": _spec(
        "CE + CCAR + CAR (tuned on val)", {"base": "ce"}, kind="tuned", tuned=("ccar", "car")
    ),
    "la_ccar_car_tuned": _spec(
        "LA + CCAR + CAR (tuned on val)",
        {"base": "la"},
        kind="tuned",
        tuned=("ccar", "car"),
        base="la",
    ),
}
LINEAR_HEADLINE = (
    "ce",
    "la",
    "ce_ccar_car",
    "la_ccar_car",
    "ce_ccar_car_tuned",
    "la_ccar_car_tuned",
)

#: The sweep, per imbalance factor, on validation: CAR on CE (alpha x weight form x EMA) and CCAR
#: on CE (variant x omega). The combined tuned methods take the best of each.
CAR_ALPHAS = (0.5, 1.0, 2.0, 5.0, 10.0)
CCAR_OMEGAS = (0.5, 0.75, 0.9)


def sweep_configs() -> dict[str, tuple[str, dict]]:
    """``{sweep id: (family, loss settings)}`` of the sweep (family ``car`` or ``ccar``)."""
    out: dict[str, tuple[str, dict]] = {}
    for alpha in CAR_ALPHAS:
        for weights in ("frequency", "count"):
            for ema in ("global", "per_class"):
                key = f"car_a{alpha:g}_{weights}_{ema}"
                out[key] = ("car", {"car_weight": alpha, "car_weights": weights, "car_ema": ema})
    for variant in ("paper", "e_minus_f", "notebook"):
        for omega in CCAR_OMEGAS:
            key = f"ccar_{variant}_w{omega:g}"
            out[key] = ("ccar", {"ccar": True, "ccar_variant": variant, "ccar_omega": omega})
    return out


def choose(sweep_runs: dict[str, dict]) -> dict[str, dict]:
    """Best setting per family by validation balanced accuracy (ties: the published setting,
    then the first in grid order). ``sweep_runs``: ``{sweep id: run record}``."""
    configs = sweep_configs()
    published = {"car": PUBLISHED_CAR, "ccar": PUBLISHED_CCAR}
    chosen = {}
    for family in ("car", "ccar"):
        keys = [k for k in configs if configs[k][0] == family and k in sweep_runs]
        if not keys:
            continue
        order = {k: i for i, k in enumerate(keys)}

        def rank(k, family=family, order=order):
            score = sweep_runs[k]["validation"]["balanced_accuracy"]
            is_pub = all(configs[k][1].get(f) == v for f, v in published[family].items())
            return (score, is_pub, -order[k])

        best = max(keys, key=rank)
        chosen[family] = {
            "sweep_id": best,
            "settings": configs[best][1],
            "validation_balanced_accuracy": sweep_runs[best]["validation"]["balanced_accuracy"],
            "candidates": len(keys),
        }
    return chosen


def loss_of(spec: dict, epochs: float, chosen: dict | None = None) -> dict:
    """The ``LongTailLossConfig`` fields of a method (``drw`` fraction -> ``drw_epoch``)."""
    loss = dict(spec["loss"])
    fraction = loss.pop("drw", None)
    if fraction is not None:
        loss["drw_epoch"] = math.floor(fraction * epochs)
    for family in spec.get("tuned") or ():
        if chosen is None or family not in chosen:
            raise KeyError(f"no tuned {family} setting yet: the sweep must run first")
        loss.update(chosen[family]["settings"])
    return loss


# ---------------------------------------------------------------------------- the preset
class LinearRunner:
    """Runs (method or sweep id, seed) jobs of one imbalance factor in this process."""

    def __init__(
        self,
        model,
        splits: FeatureSplits,
        recipe: dict,
        stage_recipe: dict,
        thresholds: dict,
        work_dir: Path,
    ) -> None:
        self.model, self.splits = model, splits
        self.recipe, self.stage_recipe = recipe, stage_recipe
        self.thresholds, self.work_dir = thresholds, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def _train(self, loss: dict, seed: int, head: str = "linear") -> dict:
        new_head(self.model, head, seed)
        args = training_args(self.recipe, seed, self.work_dir / "trainer")
        runtime = fit_head(self.model, self.splits, loss, args)
        return {"train_runtime_s": runtime, "epochs": self.recipe["num_train_epochs"]}

    def _ce_head(self, seed: int) -> None:
        """Load (or train and keep) the CE head of ``seed``: the second stages' starting point."""
        import torch

        from hf_longtail.features import find_classifier

        path = self.work_dir / "heads" / f"ce_seed{seed}.pt"
        if not path.is_file():
            self._train({"base": "ce"}, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(find_classifier(self.model)[1].state_dict(), path)
        new_head(self.model, "linear", seed)
        find_classifier(self.model)[1].load_state_dict(torch.load(path))

    def run(self, spec: dict, seed: int, chosen: dict | None = None) -> dict:
        """Train / apply one method with ``seed``; the record of the run (metrics on validation
        and test, settings, tau, timing)."""
        import torch

        from hf_longtail.decoupled import (
            learn_weight_scaling,
            retrain_classifier,
            select_tau,
            tau_normalize,
        )
        from hf_longtail.features import find_classifier

        kind, record, tau = spec["kind"], {}, None
        epochs = self.recipe["num_train_epochs"]
        if kind in ("train", "tuned"):
            loss = loss_of(spec, epochs, chosen)
            record.update(self._train(loss, seed, spec.get("head", "linear")))
            record["loss"] = loss
            if kind == "train" and loss == {"base": "ce"}:
                path = self.work_dir / "heads" / f"ce_seed{seed}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(find_classifier(self.model)[1].state_dict(), path)
        else:
            self._ce_head(seed)
            record["loss"] = {"base": "ce"}
            if kind == "posthoc_la":
                logits, labels = logits_of(self.model, self.splits)["validation"]
                tau, scores = select_posthoc_tau(logits, labels, self.splits.class_counts)
                record["tau_scores"] = scores
            elif kind == "tau_norm":
                tau_value, scores = select_tau(self.model, self.splits.validation)
                tau_normalize(self.model, tau_value)
                record.update(tau=tau_value, tau_scores=scores)
            else:
                args = training_args(self.stage_recipe, seed, self.work_dir / "trainer")
                fit = retrain_classifier if kind == "crt" else learn_weight_scaling
                out = fit(self.model, self.splits.train, args, self.splits.class_counts)
                metrics = out[0] if isinstance(out, tuple) else out
                record.update(
                    train_runtime_s=float(metrics["train_runtime"]),
                    epochs=self.stage_recipe["num_train_epochs"],
                    stage_sampler="class_balanced",
                )
        preds = logits_of(self.model, self.splits)
        if tau is not None:
            record["tau"] = tau
        for split, (logits, labels) in preds.items():
            record[split] = scalar_metrics(logits, labels, self.splits, self.thresholds, tau)
        return record


def linear_features(config: dict, data: Path, model_name: str, cache_dir=None):
    """Load the backbone once and every :class:`FeatureSplits` of the preset."""
    import torch

    from hf_longtail.features import freeze_backbone

    names = [str(i) for i in range(10)]
    model, _, eval_tf = load_backbone(model_name, config["image_size"], 10, names)
    freeze_backbone(model)
    with torch.no_grad():
        splits = feature_splits(
            model,
            eval_tf,
            data,
            config["imbalance_factors"],
            config["validation_per_class"],
            config.get("imbalance_seed", 0),
            cache_dir=cache_dir,
            batch_size=128,
        )
    return model, splits


if __name__ == "__main__":  # warm the feature cache: python scripts/benchmark_linear.py DATA
    import sys

    import torch

    from hf_longtail.data import label_array
    from hf_longtail.features import cached_features

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    names = [str(i) for i in range(10)]
    model, _, tf = load_backbone("efficientnet_lite0_in1k", 128, 10, names)
    train, test = source_splits(sys.argv[1])
    pool = pool_rows(label_array(train, LABEL_COLUMN), (100, 50, 10), 100)
    print("pool rows", len(pool), flush=True)
    cached_features(model, train.select(pool.tolist()), tf, split="train-pool", batch_size=128)
    cached_features(model, test, tf, split="test", batch_size=128)
