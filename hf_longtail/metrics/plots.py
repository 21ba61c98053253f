"""PNG plots of long-tail evaluations (per-class accuracy vs frequency, confusion heat map).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``): no
display is needed and pyplot's global state/backend is left untouched. Text that comes from data
or options (class names, titles) is drawn as it is: mathtext is off for it (``parse_math=False``),
so ``$...$`` in a class name is neither rendered as math nor a parse error at save time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_longtail.class_counts import DEFAULT_THRESHOLDS
from hf_longtail.metrics.functions import _as_class_counts, _to_numpy, shot_groups

__all__ = ["plot_confusion_matrix", "plot_per_class_accuracy"]

_MAX_NAMED_TICKS = 30  # beyond this, class names are unreadable: show a few rank ticks instead
_MAX_HEATMAP_CELLS = 1000  # larger matrices are block-averaged: a figure has ~1400 pixels a side
_GROUP_COLORS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#C44E52"}


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Constrained layout makes room for legends placed outside the axes ("outside ..." locs).
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is None:  # the caller logs the figure itself (e.g. to a tracker)
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _class_ticks(ax: Any, axis: str, order: np.ndarray, class_names: Sequence[str] | None) -> None:
    k = order.size
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if k <= _MAX_NAMED_TICKS:
        labels = [str(class_names[i]) for i in order] if class_names else [str(i) for i in order]
        rotate = axis == "x" and max(len(t) for t in labels) > 3
        set_ticks(np.arange(k), labels, rotation=90 if rotate else 0, fontsize=7, parse_math=False)
    else:
        pos = np.unique(np.linspace(0, k - 1, 10).round().astype(int))
        set_ticks(pos, [str(p) for p in pos], fontsize=7)


def plot_per_class_accuracy(
    per_class_accuracy: Sequence[float | None],
    train_class_counts: Sequence[int] | np.ndarray,
    path: str | os.PathLike | None,
    class_names: Sequence[str] | None = None,
    many_threshold: float = DEFAULT_THRESHOLDS["many"],
    few_threshold: float = DEFAULT_THRESHOLDS["few"],
    title: str | None = None,
) -> Any:
    """Plot per-class accuracy against training frequency and save it as a PNG at ``path``.

    Classes are sorted by decreasing number of training images (head on the left). Bars give the
    per-class accuracy (left axis, 0..1; classes without evaluation samples, ``None``, are left
    empty); the line gives the training count on a log-scale right axis (symlog if a count is
    0). The many/medium/few-shot regions (same thresholds as
    :func:`~hf_longtail.metrics.long_tail_metrics`) are shaded, with each group's mean accuracy
    drawn as a dashed segment. Returns the path written (``path=None``: the matplotlib
    ``Figure`` itself, nothing written).
    """
    counts = _as_class_counts(train_class_counts)
    acc = np.array([np.nan if a is None else float(a) for a in per_class_accuracy], dtype=float)
    if acc.size != counts.size:
        raise ValueError(
            f"per_class_accuracy has {acc.size} entries but train_class_counts has {counts.size}."
        )
    if class_names is not None and len(class_names) != counts.size:
        raise ValueError(f"class_names has {len(class_names)} entries, expected {counts.size}.")
    k = counts.size
    order = np.argsort(-counts, kind="stable")
    acc_s, counts_s = acc[order], counts[order]
    rank = np.arange(k)

    width = min(max(6.0, 0.25 * k), 16.0)
    fig = _new_figure(width, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    groups = shot_groups(counts, many_threshold, few_threshold)
    group_of = np.empty(k, dtype=object)
    for g, ids in groups.items():
        group_of[np.isin(order, ids)] = g
    labels = {
        "many": f"many-shot (>{many_threshold:g})",
        "medium": f"medium-shot ({few_threshold:g}..{many_threshold:g})",
        "few": f"few-shot (<{few_threshold:g})",
    }
    for g in ("many", "medium", "few"):
        pos = np.flatnonzero(group_of == g)
        if pos.size == 0:
            continue
        lo, hi = pos.min() - 0.5, pos.max() + 0.5  # sorted by count, so each group is contiguous
        ax.axvspan(lo, hi, color=_GROUP_COLORS[g], alpha=0.12, label=labels[g], lw=0)
        vals = acc_s[pos][~np.isnan(acc_s[pos])]
        if vals.size:
            ax.hlines(vals.mean(), lo, hi, colors=_GROUP_COLORS[g], linestyles="--", lw=1.5)
    ax.bar(rank, np.nan_to_num(acc_s, nan=0.0), color="#55A868", width=0.8, label="accuracy")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_ylabel("per-class accuracy")
    ax.set_xlabel(
        "class (sorted by training frequency)" + (" rank" if k > _MAX_NAMED_TICKS else "")
    )
    _class_ticks(ax, "x", order, class_names)

    ax2 = ax.twinx()
    ax2.plot(
        rank,
        counts_s,
        color="black",
        marker="." if k <= 200 else None,
        lw=1.2,
        label="train images",
    )
    if np.any(counts_s == 0):
        ax2.set_yscale("symlog", linthresh=1.0)
    else:
        ax2.set_yscale("log")
    ax2.set_ylabel("training images (log scale)")

    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    fig.legend(
        handles[0] + handles2[0],
        handles[1] + handles2[1],
        loc="outside lower center",
        ncol=5 if width >= 9 else 3,
        fontsize=7,
        frameon=False,
    )
    ax.set_title(title or "Per-class accuracy vs training frequency", parse_math=False)
    return _save(fig, path)


def plot_confusion_matrix(
    confusion: Any,
    path: str | os.PathLike | None,
    class_names: Sequence[str] | None = None,
    normalize: str | None = "true",
    train_class_counts: Sequence[int] | np.ndarray | None = None,
    title: str | None = None,
) -> Any:
    """Save a heat map of a confusion matrix ``M[t, p]`` (rows true, columns predicted) as PNG.

    ``normalize="true"`` divides each row by its true-class count (the diagonal is then the
    per-class recall; the default), ``"pred"`` divides each column by its predicted count
    (diagonal = precision) and ``None`` shows raw counts. If ``train_class_counts`` is given,
    classes are ordered from head to tail (most training images first), so the long tail reads
    left to right / top to bottom. Class names label the axes up to 30 classes; beyond that a
    few rank/index ticks are shown, and above 1000 classes the matrix is averaged over square
    blocks for display. Cell values are printed for up to 12 classes. Returns the path written
    (``path=None``: the matplotlib ``Figure`` itself, nothing written).
    """
    m = _to_numpy(confusion, "confusion").astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`confusion` must be a square (K, K) matrix; got shape {m.shape}.")
    k = m.shape[0]
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} entries, expected {k}.")
    if normalize == "true":
        s = m.sum(axis=1, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
    elif normalize == "pred":
        s = m.sum(axis=0, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
    elif normalize is not None:
        raise ValueError(f"`normalize` must be 'true', 'pred' or None; got {normalize!r}.")
    if train_class_counts is not None:
        counts = _as_class_counts(train_class_counts)
        if counts.size != k:
            raise ValueError(f"train_class_counts has {counts.size} entries, expected {k}.")
        order = np.argsort(-counts, kind="stable")
    else:
        order = np.arange(k)
    m = m[np.ix_(order, order)]

    side = min(max(5.0, 0.3 * k), 14.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    if k > _MAX_HEATMAP_CELLS:
        # Mean over b x b blocks; the extent keeps the axes in class-rank units.
        b = -(-k // _MAX_HEATMAP_CELLS)
        pad = (-k) % b
        mp = np.pad(m, ((0, pad), (0, pad)))
        m = mp.reshape(mp.shape[0] // b, b, mp.shape[1] // b, b).mean(axis=(1, 3))
    vmax = 1.0 if normalize else max(float(m.max()), 1.0)
    im = ax.imshow(
        m,
        cmap="Blues",
        vmin=0.0,
        vmax=vmax,
        interpolation="nearest",
        aspect="equal",
        extent=(-0.5, k - 0.5, k - 0.5, -0.5),
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    if k <= 12:
        for t in range(k):
            for p in range(k):
                txt = f"{m[t, p]:.2f}" if normalize else f"{int(m[t, p])}"
                color = "white" if m[t, p] > 0.6 * vmax else "black"
                ax.text(p, t, txt, ha="center", va="center", fontsize=7, color=color)
    named = k <= _MAX_NAMED_TICKS
    _class_ticks(ax, "x", order, class_names)
    _class_ticks(ax, "y", order, class_names)
    suffix = (
        "" if named else (" (rank by frequency)" if train_class_counts is not None else " (id)")
    )
    ax.set_xlabel("predicted class" + suffix)
    ax.set_ylabel("true class" + suffix)
    norm_txt = {"true": "row-normalised (recall)", "pred": "column-normalised (precision)"}
    ax.set_title(
        title or f"Confusion matrix, {norm_txt.get(normalize or '', 'counts')}", parse_math=False
    )
    return _save(fig, path)
