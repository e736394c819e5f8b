"""Which runs under a folder finished, which stopped where, what they scored and what made them.

    python -m segjax.runs runs/ [more folders] [--keys=val/miou,val/dice/membrane] [--csv=runs.csv]

Every folder holding a `config.json` is a run (training or a classic baseline; a study's runs are
found inside the study's folder). One row per run:
- its status: `finished`; `training: last saved step k of n (pid P since T)` while a process on
  this machine holds its lock (read from /proc/locks on Linux); `stopped at step k of n` otherwise
  (interrupted, or training on another host: see how long ago it last logged); `diverged`;
  `baseline`; `nothing saved`; any of these followed by `; being rescored (pid P since T, scoring
  best on the validation split)` while a process here rescores it (`--eval_only`);
- the final scores `--keys` from its metrics.json, each with its interval over the images where
  the run kept one (`intervals.json`: `eval.interval_resamples`), the dataset it read, the code of
  its last start (environment.jsonl) and the age of its last log line.
Only reads: nothing is locked, moved or written (except --csv).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from segjax import configuration, locks, provenance, workdirs, writers
from segjax.errors import ConfigError, WorkdirError, exit_on_user_error

DEFAULT_KEYS = ("val/miou", "val/mdice")


def find(roots: list[str]) -> list[str]:
    """The run folders under `roots` (each root itself may be one), sorted; a run's own subfolders
    (checkpoints, pretraining stage, replicas) are not searched."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            raise ConfigError(f"{root} is not a folder")
        for folder, subfolders, files in os.walk(root):
            if workdirs.CONFIG_FILE in files:
                found.append(folder)
                subfolders.clear()
            else:
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    return sorted(found)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def describe(run: str, keys=DEFAULT_KEYS, now: float | None = None) -> dict:
    """One run's row: `status`, `step`, `keys` from metrics.json (None where absent) and their
    `<key>_low`, `<key>_high` from the run's intervals.json (None where it has none), `dataset`,
    `code` (its last start's `provenance.code_summary`, jax version) and `last_log` (age)."""
    config = writers.read_json(os.path.join(run, workdirs.CONFIG_FILE))
    path, bounds = os.path.join(run, writers.SUMMARY_FILE), os.path.join(run, writers.INTERVALS_FILE)
    metrics = writers.read_json(path) if os.path.exists(path) else {}
    intervals = writers.read_json(bounds).get("intervals", {}) if os.path.exists(bounds) else {}
    steps = config.get("train", {}).get("steps")
    step = (workdirs.checkpoint_steps(run, "latest") or [None])[-1]
    if os.path.exists(os.path.join(run, workdirs.FAILED_FILE)):
        error = writers.read_json(os.path.join(run, workdirs.FAILED_FILE)).get("error", "")
        status = "diverged: " + str(error).split("; ")[0]
    elif "baseline" in metrics:
        status = f"baseline {metrics['baseline']}"
    elif metrics.get("step") is not None and metrics.get("step") == steps:
        status = "finished"
    elif holder := locks.holder(os.path.join(run, workdirs.LOCK_FILE)):
        saved = f"last saved step {step} of {steps}" if step is not None else f"nothing saved yet of {steps} steps"
        status = f"training: {saved} ({holder})"
    elif step is not None:
        status = f"stopped at step {step} of {steps}"
    else:
        status = "nothing saved"
    if rescoring := locks.holder(os.path.join(run, workdirs.RESCORE_LOCK_FILE)):
        status += f"; being rescored ({rescoring})"
    dataset = os.path.join(run, workdirs.DATASET_FILE)
    starts = provenance.starts(run)
    code = ""
    if starts:
        last = starts[-1]
        code = f"{provenance.code_summary(last.get('git'))}, jax {last.get('packages', {}).get('jax', '?')}"
    log = os.path.join(run, writers.LOG_FILE)
    now = time.time() if now is None else now
    return {
        "run": run,
        "status": status,
        "step": metrics.get("step") if step is None else step,
        **{k: metrics.get(k) for k in keys},
        **{f"{k}_{end}": intervals.get(k, {}).get(end) for k in keys for end in ("low", "high")},
        "dataset": writers.read_json(dataset).get("dataset", "") if os.path.exists(dataset) else "",
        "code": code,
        "last_log": _age(now - os.path.getmtime(log)) if os.path.exists(log) else "",
    }


def table(roots: list[str], keys=DEFAULT_KEYS) -> list[dict]:
    """`describe` of every run under `roots`, with `run` relative to its root."""
    rows = []
    for root in roots:
        for run in find([root]):
            try:
                row = describe(run, keys)
            except WorkdirError as err:  # a file edited into invalid JSON: named, the others still listed
                row = {"run": run, "status": f"unreadable: {err}"}
            row["run"] = os.path.relpath(run, os.path.dirname(os.path.abspath(root).rstrip(os.sep)))
            rows.append(row)
    return rows


def markdown(rows: list[dict], keys=DEFAULT_KEYS) -> str:
    """The rows as a markdown table; a score with an interval reads `0.8244 [0.8033, 0.8384]`."""
    columns = ["run", "status", "step", *keys, "dataset", "code", "last_log"]

    def cell(r: dict, c: str) -> str:
        v, low, high = r.get(c), r.get(f"{c}_low"), r.get(f"{c}_high")
        if v is None or not isinstance(v, float):
            return "" if v is None else str(v)
        return f"{v:.4f}" + ("" if low is None or high is None else f" [{low:.4f}, {high:.4f}]")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def csv_columns(keys=DEFAULT_KEYS) -> list[str]:
    """The CSV's columns: the table's, each score followed by its `_low` and `_high`."""
    scores = [c for k in keys for c in (k, f"{k}_low", f"{k}_high")]
    return ["run", "status", "step", *scores, "dataset", "code", "last_log"]


def define_flags() -> None:
    flags.DEFINE_list("keys", list(DEFAULT_KEYS), "metrics.json keys to show, e.g. val/dice/membrane.")
    flags.DEFINE_string("csv", "", "Also write the table as CSV to this file (replaced whole).")


def main(argv):
    with exit_on_user_error():
        roots = argv[1:]
        if not roots:
            raise ConfigError("give one or more folders: python -m segjax.runs runs/")
        keys = tuple(flags.FLAGS.keys)
        rows = table(roots, keys)
        print(
            markdown(rows, keys) if rows else f"no runs (folders with {workdirs.CONFIG_FILE}) under {', '.join(roots)}"
        )
        if flags.FLAGS.csv:
            writers.write_table(flags.FLAGS.csv, [{c: r.get(c) for c in csv_columns(keys)} for r in rows])


if __name__ == "__main__":
    define_flags()
    configuration.quiet_libraries()
    app.run(main)
