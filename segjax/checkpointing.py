"""Checkpoints with orbax (the only module that imports it).

Two managers under the workdir: `checkpoints/` keeps the latest `train.keep_checkpoints` steps (for
resume) and `best/` keeps the single best step by `train.best_metric` (default `val/miou`, highest;
`train.best_mode='min'` for e.g. `val/loss`). Each checkpoint holds the whole
TrainState (params, batch stats, optimizer state incl. schedule position, RNG, step) and the data
iterator's position as JSON. orbax writes to a temporary folder and renames it when complete, so a
crash mid-save leaves the previous checkpoint intact; unfinished folders are ignored on restore.
Nothing is unpickled: arrays are read by tensorstore, the iterator state is JSON.

Once a save has finished, its step folder gets `DIGEST_FILE` (each file's size and SHA-256), and a
restore checks the files against it first: a step damaged later (a run folder copied in part, a
full disk, flipped bytes) is a CheckpointError naming the file, not 200 lines of tensorstore
tracebacks or, for flipped bytes, silently wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from segjax import workdirs, writers
from segjax.errors import CheckpointError

DIGEST_FILE = "segjax_digest.json"  # in each sealed step folder: {relative path: [size, sha256]}
# tensorstore's status codes for a file that is missing, short or not what its index says
_UNREADABLE = re.compile(r"\b(OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION)\b")

BEST_MODES = ("max", "min")


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    # handlers named up front (not only through save/restore args), so a checkpoint's metadata
    # can be read before anything is restored
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _save_whole_arrays_in_one_process() -> None:
    """orbax saves a replicated array "replica-parallel" by default (except where JAX_PLATFORMS
    names a GPU): each replica writes a slice, so several hosts share the writing. With one
    process every byte is written by it anyway, and the slicing costs a compiled slice per array
    and device: default U-Net on 8 CPU devices, first save 5.29 s -> 0.23 s, later saves 0.570 ->
    0.219 s, the same files (benchmarks/checkpoint_bench.py). So a single-process job writes whole
    arrays from one replica. The handler keeps the default one's array metadata store (orbax has
    no public name for it): without it no `array_metadatas/` is written and a typed PRNG key
    array comes back as its raw uint32 data."""
    global _whole_arrays
    if jax.process_count() == 1 and not _whole_arrays:
        default = ocp.type_handlers.get_type_handler(jax.Array)
        store = getattr(default, "_array_metadata_store", None)
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store)

        def notice(record) -> bool:  # orbax warns of every override; this one is deliberate
            return not record.getMessage().startswith("Type handler registry type")

        absl_logging.get_absl_logger().addFilter(notice)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_logging.get_absl_logger().removeFilter(notice)
        _whole_arrays = True


_whole_arrays = False  # the handler is registered once per process


class Checkpointer:
    def __init__(self, workdir: str, keep: int, best_metric: str = "val/miou", best_mode: str = "max"):
        _save_whole_arrays_in_one_process()
        # cleanup_tmp_directories: a save interrupted by a crash leaves a *.orbax-checkpoint-tmp*
        # folder; it is never restored from and is removed when the next run opens the manager.
        common = dict(create=True, cleanup_tmp_directories=True)
        folders = {k: os.path.join(workdir, sub) for k, sub in workdirs.CHECKPOINT_FOLDERS.items()}
        self.latest = _manager(folders["latest"], ocp.CheckpointManagerOptions(max_to_keep=keep, **common))
        self.best_metric = best_metric
        # a best checkpoint saved under another metric (a run resumed with a new train.best_metric)
        # ranks last, so the first evaluation under the new metric replaces it
        worst = -math.inf if best_mode == "max" else math.inf
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m.get(best_metric, worst), best_mode=best_mode, **common
        )
        self.best = _manager(folders["best"], options)
        self._unsealed: list[tuple[ocp.CheckpointManager, int]] = []  # saved, digest not written yet

    @staticmethod
    def _args(state, data_state: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))

    def save(self, step: int, state, data_state: dict) -> None:
        if step not in self.latest.all_steps():
            self._one_writer_at_a_time(self.best)
            self._seal(self.latest)
            self.latest.save(step, args=self._args(state, data_state))
            self._unsealed.append((self.latest, step))

    def save_if_best(self, step: int, state, data_state: dict, metrics: dict) -> None:
        if step not in self.best.all_steps():
            self._one_writer_at_a_time(self.latest)
            self._seal(self.best)
            score = {self.best_metric: float(metrics[self.best_metric])}
            self.best.save(step, args=self._args(state, data_state), metrics=score)
            self._unsealed.append((self.best, step))

    def _seal(self, only: ocp.CheckpointManager | None = None) -> None:
        """Write `DIGEST_FILE` into each step folder saved and not sealed yet, once its save has
        finished: `only` that manager's steps (its next save waits for them anyway; the other
        manager's save may go on meanwhile), or all. Process 0 hashes; the step folders are on
        storage every process sees."""
        pending = []
        for manager, step in self._unsealed:
            if only is not None and manager is not only:
                pending.append((manager, step))
                continue
            manager.wait_until_finished()
            folder = _step_folder(manager, step)
            if jax.process_index() == 0 and os.path.isdir(folder):  # not removed by max_to_keep meanwhile
                digests = _file_digests(folder)  # before the digest's own partial file appears there
                with writers.replaced(os.path.join(folder, DIGEST_FILE)) as f:
                    json.dump(digests, f)
        self._unsealed = pending

    @staticmethod
    def _one_writer_at_a_time(other: ocp.CheckpointManager) -> None:
        """On several hosts, let `other`'s asynchronous save finish first: each save ends at a
        cross-process barrier, and two managers' saves in flight at once can reach their barriers
        in a different order on each host (seen with two processes: "Barrier ... is already
        ongoing", then a timeout). One host never waits."""
        if jax.process_count() > 1:
            other.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, state_template, step: int | None = None, best: bool = False):
        """(state, data_state) at `step` (default: latest). `state_template` gives structure,
        dtypes and shardings; a checkpoint of a different model raises CheckpointError."""
        manager = self.best if best else self.latest
        step = manager.latest_step() if step is None and not best else step
        if step is None and best:
            step = manager.best_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {manager.directory}")
        _verify(manager, step)
        saved = _param_shapes(_saved_state(manager, step))
        if saved is not None and saved != _paths(state_template.params):
            # refused from the metadata, before orbax reads an array: a restore that fails midway
            # leaves tensorstore reads calling into a closed event loop (~1000 lines of tracebacks)
            raise CheckpointError(mismatch_message(manager, step, state_template, None))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
            )
        except Exception as err:  # orbax wraps tensorstore's read errors in a bare Exception
            cause = _unreadable(err)
            if cause:  # a step saved before digests were written, damaged since
                raise CheckpointError(_damaged(manager, step, cause)) from err
            if isinstance(err, (ValueError, KeyError, TypeError)):
                raise CheckpointError(mismatch_message(manager, step, state_template, err)) from err
            raise
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _step_folder(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))  # orbax's default step names: the number


def _file_digests(folder: str) -> dict[str, list]:
    """{path relative to `folder`: [size, sha256 hex]} of every file under it but `DIGEST_FILE`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != DIGEST_FILE:
                with open(path, "rb") as f:
                    out[rel] = [os.path.getsize(path), hashlib.file_digest(f, "sha256").hexdigest()]
    return out


def fingerprint(workdir: str, which: str, step: int) -> str | None:
    """A name for the contents of a saved step of `workdir`'s `latest` or `best` checkpoints: the
    first 16 hex digits of the SHA-256 of its sealed file digests (`DIGEST_FILE`, keys sorted).
    A copy of the step has the same; other weights saved at the same step (a run replaced by
    `--overwrite` and trained again) another. Recorded with masks and rescorings, so they name
    the exact checkpoint that made them. None for a step without a digest (saved before digests
    were written, or killed before its digest)."""
    path = os.path.join(workdir, workdirs.CHECKPOINT_FOLDERS[which], str(step), DIGEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            digests = json.load(f)
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def _damaged(manager: ocp.CheckpointManager, step: int, what: str) -> str:
    others = [s for s in manager.all_steps() if s != step]
    folder = _step_folder(manager, step)
    advice = (
        f"copy it again, or move {folder} aside to use step {max(others)} (saved steps: {others})"
        if others
        else "copy it again (no other step is saved here)"
    )
    return (
        f"checkpoint step {step} in {manager.directory} is damaged ({what}); its files are not as saved (a run "
        f"folder copied in part, a full disk?) and nothing was changed: {advice}"
    )


def _verify(manager: ocp.CheckpointManager, step: int) -> None:
    """Check a sealed step's files against its `DIGEST_FILE` before orbax reads any (a step
    saved before digests were written, or killed before its digest, is not checked)."""
    folder = _step_folder(manager, step)
    path = os.path.join(folder, DIGEST_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            sealed = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(_damaged(manager, step, f"{DIGEST_FILE} unreadable: {err}")) from None
    for rel, (size, digest) in sealed.items():
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            raise CheckpointError(_damaged(manager, step, f"{rel} is missing"))
        if os.path.getsize(file) != size:
            raise CheckpointError(_damaged(manager, step, f"{rel} has {os.path.getsize(file)} bytes, not {size}"))
        with open(file, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                raise CheckpointError(_damaged(manager, step, f"{rel} has other contents (SHA-256)"))


def _unreadable(err: BaseException) -> str:
    """The first line of a tensorstore read error (or a metadata file's JSON error) in `err`'s
    chain of causes: what a damaged step raises; '' for anything else."""
    while err is not None:
        text = str(err).splitlines()[0] if str(err) else ""
        if _UNREADABLE.search(text) or isinstance(err, json.JSONDecodeError):
            return text
        err = err.__cause__ or err.__context__
    return ""


def _paths(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)  # noqa: E731
    return {name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def _saved_state(manager: ocp.CheckpointManager, step: int):
    """The saved state's metadata tree (shapes, dtypes; no array read), or None if unreadable."""
    try:
        saved = manager.item_metadata(step)["state"]
        return getattr(saved, "tree", saved)
    except Exception:
        return None


def _param_shapes(saved) -> dict[str, tuple] | None:
    """{parameter path: shape} of a saved state's metadata tree; None if there is none."""
    try:
        return None if saved is None else _paths(saved["params"])
    except Exception:
        return None


def mismatch_message(manager: ocp.CheckpointManager, step: int, template, err: Exception | None) -> str:
    """Name the parameters that differ between a checkpoint and the configured model."""
    saved = _saved_state(manager, step)
    saved_params = _param_shapes(saved)
    if saved_params is None:
        return f"checkpoint step {step} in {manager.directory} does not match the configured model: {err}"
    want = _paths(template.params)
    if want == saved_params:  # the same network: the optimizer state is what differs
        with contextlib.suppress(Exception):
            mine, theirs = set(_paths(template.opt_state)), set(_paths(saved["opt_state"]))
            if mine != theirs:
                return (
                    f"checkpoint step {step} in {manager.directory} holds another optimizer's state "
                    f"({len(theirs - mine)} entries not in this run's, {len(mine - theirs)} missing): the "
                    "optim.* settings that shape it (optim.name, optim.grad_clip, optim.ema_decay, "
                    "model.freeze_encoder) differ from the run that saved it; train in a new workdir, "
                    "or restore with the saved config"
                )
    missing = sorted(set(want) - set(saved_params))
    extra = sorted(set(saved_params) - set(want))
    shape = sorted(k for k in set(want) & set(saved_params) if tuple(want[k]) != tuple(saved_params[k]))
    parts = []
    if missing:
        parts.append(f"missing in checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"not in the model: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if shape:
        parts.append("shape differs: " + ", ".join(f"{k} {saved_params[k]} vs {want[k]}" for k in shape[:5]))
    detail = "; ".join(parts) or str(err)
    return f"checkpoint step {step} in {manager.directory} was saved from a different model ({detail})"
