"""Metric logs: JSON lines (for tools and notebooks) and TensorBoard events (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os

import jax
import numpy as np


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


@contextlib.contextmanager
def replaced(path: str, newline: str | None = None):
    """A text file opened for writing as `<path>.<pid>.partial` and renamed over `path` when the
    block ends: readers, and other processes replacing the same file, see the old file or the
    whole new one, never half of it. On an error the partial file is removed, `path` untouched."""
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "w", encoding="utf-8", newline=newline) as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    os.replace(partial, path)


def write_summary(path: str, results: dict) -> None:
    """A flat results dict as pretty JSON (metrics.json, eval_<which>.json); NaN becomes null."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: _plain(v) for k, v in results.items()}, f, indent=2, sort_keys=True)


def write_table(path: str, rows: list[dict]) -> None:
    """Rows with the same keys as CSV (per-image results); NaN is written as an empty cell."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
