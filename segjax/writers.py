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
from absl import logging

from segjax.errors import WorkdirError


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


PARTIAL = ".partial-"  # `whole`'s hidden files: `.partial-<pid>-<name>`


def leftovers(folder: str) -> list[str]:
    """The hidden partial files in `folder` (sorted names): writes by `whole` that a killed process
    never finished, or that a live one is finishing now."""
    return sorted(n for n in os.listdir(folder) if n.startswith(PARTIAL)) if os.path.isdir(folder) else []


@contextlib.contextmanager
def whole(path: str):
    """A path to write `path`'s new contents to, renamed over `path` when the block ends: readers,
    and other processes replacing the same file, see the old file or the whole new one, never half
    of it, and a process killed mid-write leaves only a hidden `.partial-<pid>-<name>` beside it
    (the name's extension kept: libraries that choose a format by it still do). On an error the
    partial file is removed and `path` is untouched."""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f"{PARTIAL}{os.getpid()}-{name}")
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    os.replace(partial, path)


@contextlib.contextmanager
def replaced(path: str, newline: str | None = None):
    """A text file opened for writing, replaced `whole`."""
    with whole(path) as partial, open(partial, "w", encoding="utf-8", newline=newline) as f:
        yield f


def write_summary(path: str, results: dict) -> None:
    """A flat results dict as pretty JSON (metrics.json, eval_<which>.json), keys sorted; NaN
    becomes null (`write_record`). Replaced whole (`replaced`): a crash mid-write leaves the
    previous file, not half of one."""
    write_record(path, results, sort_keys=True)


def write_record(path: str, record, sort_keys: bool = False) -> None:
    """A nested record (dicts, lists, numbers, numpy or jax arrays) as pretty JSON, replaced whole;
    NaN becomes null at any depth, so strict JSON readers take it."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (str, bool)):
            return value
        value = _plain(value)  # numbers and arrays as Python numbers and lists
        return plain(value) if isinstance(value, list) else value

    with replaced(path) as f:
        json.dump(plain(record), f, indent=2, sort_keys=sort_keys)


def read_json(path: str) -> dict:
    """A JSON file segjax wrote (config.json, dataset.json, metrics.json); one edited into
    invalid JSON is a WorkdirError naming it, not a traceback from the json module."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise WorkdirError(f"{path} is not valid JSON ({err}); restore it or move its folder away") from None


def write_table(path: str, rows: list[dict]) -> None:
    """Rows as CSV (per-image results): the columns of every row in first-seen order, a row
    without one of them (e.g. an image with no valid pixel, which has no surface distances) and
    NaN written as empty cells. Replaced whole, as `write_summary`."""
    columns = list(dict.fromkeys(key for row in rows for key in row.keys()))
    with replaced(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


LOG_FILE = "metrics.jsonl"
SUMMARY_FILE = "metrics.json"  # a run's (or baseline's) final scores, `write_summary`
INTERVALS_FILE = "intervals.json"  # the intervals printed under the results (`intervals.print_results`)
PER_IMAGE_FILE = "val_per_image.csv"  # the latest validation pass, one row per image (`image_tables.per_image_rows`)


def read_log(workdir: str) -> list[dict]:
    """A run's metrics.jsonl as one dict per logged step, in step order. A resumed run logs the
    steps after its last checkpoint again: the later row of a step wins (key by key, as train and
    validation rows of one step are separate lines), so a curve never runs back in steps. A line
    cut off by a crash mid-write is skipped with a warning naming it (the step was logged again)."""
    path = os.path.join(workdir, LOG_FILE)
    steps: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logging.warning("%s:%d is not a whole JSON row (cut off by a crash?); skipped", path, number)
                continue
            steps.setdefault(row["step"], {}).update(row)
    return [steps[s] for s in sorted(steps)]


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def append_jsonl(path: str, row: dict) -> None:
    """Append `row` as one JSON line to `path`; a last line cut off by a crash is ended first, so
    the new row stays whole."""
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")
        f.write(json.dumps(row) + "\n")


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = os.path.join(workdir, LOG_FILE)
            self._jsonl = open(path, "a", encoding="utf-8")  # positioned at the end: tell() is its size
            if self._jsonl.tell() and not _ends_with_newline(path):  # a row cut off by a crash: end it
                self._jsonl.write("\n")
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
