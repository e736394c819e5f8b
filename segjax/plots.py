"""Figures for notebooks and reports (matplotlib; imported only where plots are drawn)."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from segjax import study_tables, writers


def study_bars(rows: list[dict], key: str = "val/miou", title: str = ""):
    """One bar per variant: mean over seeds with a sample-std error bar, and every seed as a dot."""
    study_tables.require_keys(rows, (key,))
    summary = study_tables.summarize(rows, keys=(key,))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(summary), 3.2))
    names = [e["variant"] for e in summary]
    means = [e[key] for e in summary]
    stds = [0.0 if e[f"{key}_std"] != e[f"{key}_std"] else e[f"{key}_std"] for e in summary]
    ax.bar(names, means, yerr=stds, capsize=4, color="#8fb3d9", edgecolor="#2b5d8a")
    for i, name in enumerate(names):
        seeds = [r[key] for r in rows if r["variant"] == name and r.get(key) is not None]
        ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
    ax.set_ylabel(key)
    ax.set_title(title or f"{key}: mean ± std over seeds")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def training_curves(workdir: str, keys=("train/loss", "val/miou")):
    """The logged history of one run (metrics.jsonl), one panel per key, against the step. A key
    the log never holds is an error naming the logged ones (not an empty panel)."""
    path = os.path.join(workdir, writers.LOG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a run folder (or logged nothing yet)")
    history = writers.read_log(workdir)  # one row per step, also after a resume
    study_tables.require_keys(history, keys, path)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    fig.tight_layout()
    return fig


def comparison(rows: list[dict], key: str, reference: str, title: str = ""):
    """Each variant minus `reference`, paired by seed (`segjax.compare.paired`): the mean
    difference as a dot with its 95 % confidence interval, next to a line at 0 (no difference).
    A variant with one pair has no interval: its dot stands alone."""
    from segjax import compare

    study_tables.require_keys(rows, (key,))
    entries = compare.paired(rows, (key,), reference)
    fig, ax = plt.subplots(figsize=(5.5, 0.9 + 0.45 * len(entries)))
    for i, e in enumerate(entries):
        low, high = e[f"{key}_low"], e[f"{key}_high"]
        if low == low:  # not NaN: an interval
            ax.plot([low, high], [i, i], color="#2b5d8a", linewidth=2)
        ax.plot([e[key]], [i], "o", color="#2b5d8a")
    ax.axvline(0.0, color="0.5", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(entries)), [e["variant"] for e in entries])
    ax.invert_yaxis()  # the study's order, top to bottom
    ax.set_xlabel(f"{key} - {reference} (paired by seed, 95 % CI)")
    ax.set_title(title or f"{key}: each variant minus {reference}")
    fig.tight_layout()
    return fig


def confusion(path: str, title: str = ""):
    """A `*_confusion.csv` (`segjax.image_tables.write_per_image`) as a heatmap: each true class's row
    as fractions of its pixels (recall on the diagonal, where its misses go off it), the counts
    written in the cells. A row of a class absent from the truth stays empty."""
    from segjax import image_tables

    names, counts = image_tables.read_confusion(path)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(names), 1.2 + 0.7 * len(names)))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (t, p), n in np.ndenumerate(counts):
        ax.text(p, t, f"{shares[t, p]:.2f}\n{n}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title or "pixels of each true class (row fractions)")
    fig.tight_layout()
    return fig
