"""A run's folder: one trainer at a time (a file lock) and one config per run (config.json).

`train.train_and_evaluate` holds `lock` while it trains and calls `prepare` before it reads or
writes anything else in the folder; `segjax.study` relies on the lock to share a study between
processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
from absl import logging

from segjax import configuration, locks, parallel, writers
from segjax.errors import WorkdirError

LOCK_FILE = ".lock"  # in the workdir: held by the process training there
RESCORE_LOCK_FILE = ".rescore.lock"  # in the workdir: held by the process rescoring it (--eval_only)
CONFIG_FILE = "config.json"  # in the workdir: the run's config
DATASET_FILE = "dataset.json"  # in the workdir: the prepared dataset the run reads
CHECKPOINT_FOLDERS = {"latest": "checkpoints", "best": "best"}  # in the workdir: one per orbax manager
RESULT_FILES = (writers.LOG_FILE, writers.SUMMARY_FILE, writers.PER_IMAGE_FILE)  # what a run (or baseline) logs
FAILED_FILE = "failed.json"  # in the workdir: a study's record of a run that diverged (not retried)
PRETRAIN_FOLDER = "pretrain"  # in the workdir: the encoder's pretraining stage (its own checkpoints and logs)


def require_folder(path: str, flag: str = "--workdir") -> None:
    """A path that exists as a file cannot become a run's (or predict's output) folder: one line
    naming the flag, instead of a FileExistsError from deep inside. Nor can a URL: run folders are
    written through the local filesystem (locks, appended logs, renames), so `gs://b/run` became a
    local folder `./gs:/b/run` on each host while tensorboardX wrote to the bucket."""
    if "://" in path:
        raise WorkdirError(
            f"{flag}={path} is a URL; segjax writes run folders through the filesystem: mount the bucket "
            "(gcsfuse, hierarchical namespace) or use shared storage (NFS) and give that path"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{flag}={path} is a file, not a folder; give a folder path")


def lock(workdir: str):
    """Held by process 0 for as long as it trains in `workdir`: a second run started there (the
    same command twice, or two study processes) stops with BusyError before it reads or writes
    anything, instead of interleaving checkpoints and logs with the first."""
    require_folder(workdir)
    return locks.held(
        os.path.join(workdir, LOCK_FILE),
        wait=False,
        what=f"workdir {workdir}",
        hint="; wait for that run to finish or use another --workdir",
    )


def rescore_lock(workdir: str, what: str):
    """Held while `what` (e.g. 'scoring best on the validation split') rescores the run in
    `workdir`: a second rescoring waits for it, as both would number and write the same
    `eval_<which>.json` files. A separate lock from `lock`'s, so a run still training can be
    rescored (its `latest`), and a study holding `lock` can rescore its runs."""
    return locks.held(os.path.join(workdir, RESCORE_LOCK_FILE), what=f"rescoring of {workdir}", note=what)


def prepare(
    config,
    workdir: str,
    overwrite: bool,
    allow_config_changes: bool,
    held=None,
    resumable: bool = True,
    dataset: str | None = None,
) -> None:
    """Refuse to mix two different configs in one workdir unless told; never delete silently.
    `dataset` (`sources.dataset_id`) counts as part of the config: a folder whose files changed
    since the run started is refused like a changed key (`dataset.json` records it).
    `resumable=False` (runs that cannot resume, e.g. baselines) leaves --allow_config_changes
    out of the refusal's advice. A folder holding only the config of a start that saved nothing
    (`saved_nothing`) is not refused: its config is kept as `config.before-*.json` and replaced.

    On several hosts process 0 alone reads, decides (moves or refuses) and writes `config.json`
    (atomically); the others wait for it, so none reads a half-written file or creates folders
    in a workdir that is about to be moved aside. `held` (an ExitStack holding process 0's
    `lock`) takes the new folder's lock when --overwrite moved the old run aside."""
    require_folder(workdir)
    if jax.process_index() == 0:
        _prepare(config, workdir, overwrite, allow_config_changes, held, resumable, dataset)
    parallel.host_barrier(f"segjax: workdir {os.path.abspath(workdir)} prepared")


def saved_differences(workdir: str, config, dataset: str | None = None) -> list[str] | None:
    """`configuration.differences` between the run config saved in `<workdir>/config.json` and
    `config` (None: no run saved there) plus, when `dataset` is given and the run recorded one,
    the dataset when it differs (a run from before datasets were recorded counts as the same)."""
    saved = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(saved):
        return None
    diff = configuration.differences(writers.read_json(saved), config.to_dict())
    path = os.path.join(workdir, DATASET_FILE)
    if dataset is None or not os.path.exists(path):
        return diff
    old = writers.read_json(path)["dataset"]
    return diff if old == dataset else [*diff, f"dataset ({old} -> {dataset}: its files or preparation changed)"]


def checkpoint_steps(workdir: str, which: str) -> list[int]:
    """The saved steps in the `latest` or `best` checkpoint folder, sorted (orbax names each step's
    folder by its number; an interrupted save's temporary folder does not count)."""
    folder = os.path.join(workdir, CHECKPOINT_FOLDERS[which])
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


def has_checkpoint(workdir: str, which: str) -> bool:
    """Whether the `latest` or `best` checkpoint folder holds a saved step."""
    return bool(checkpoint_steps(workdir, which))


def saved_nothing(workdir: str) -> bool:
    """True when the folder holds no checkpoint step, nothing logged (`RESULT_FILES`), no
    pretraining stage and no record of a divergence: only the config of a start that stopped
    before its first log line, e.g. at a check of the data."""
    if any(has_checkpoint(workdir, which) for which in CHECKPOINT_FOLDERS):
        return False
    kept = (*RESULT_FILES, PRETRAIN_FOLDER, FAILED_FILE)
    return not any(os.path.exists(os.path.join(workdir, name)) for name in kept)


def _prepare(config, workdir: str, overwrite: bool, allow_config_changes: bool, held, resumable, dataset) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    diff = saved_differences(workdir, config, dataset)  # None: a new folder
    # a start that stopped before saving anything (a bad crop, NaN at step 0): nothing to lose or mix
    unused = bool(diff) and saved_nothing(workdir)
    if diff and overwrite and not unused:
        moved = f"{workdir.rstrip('/')}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(workdir, moved)  # its lock file (still held by us) moves with it
        logging.warning("--overwrite: moved the previous run to %s", moved)
        if held is not None:
            held.enter_context(lock(workdir))
    elif diff and not allow_config_changes and not unused:
        shown = configuration.listed(diff)
        resume = "--allow_config_changes to resume with the new values, " if resumable else ""
        raise WorkdirError(
            f"{workdir} holds a run with a different config (differs in: {shown}); use another --workdir, "
            f"{resume}or --overwrite to move the old run aside"
        )
    elif diff:
        backup = os.path.join(workdir, f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.json")
        shutil.copy(path, backup)
        what = "starting anew (it saved nothing)" if unused else "resuming"
        logging.warning("%s with changed config keys %s (old config kept in %s)", what, diff, backup)
    os.makedirs(workdir, exist_ok=True)
    with writers.replaced(path) as f:  # a reader sees the old file or the whole new one
        f.write(configuration.to_json(config))
    if dataset is not None:
        with writers.replaced(os.path.join(workdir, DATASET_FILE)) as f:
            json.dump({"dataset": dataset}, f)
