"""Figures for notebooks and reports (matplotlib; imported only where plots are drawn)."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from segjax import study, writers


def study_bars(rows: list[dict], key: str = "val/miou", title: str = ""):
    """One bar per variant: mean over seeds with a sample-std error bar, and every seed as a dot."""
    study.require_keys(rows, (key,))
    summary = study.summarize(rows, keys=(key,))
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
    study.require_keys(history, keys, path)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    fig.tight_layout()
    return fig
