"""Rescore a saved run (`--eval_only=best|latest`): restore a checkpoint, evaluate, no training."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from segjax import (
    checkpointing,
    configuration,
    evaluate,
    instances,
    intervals,
    parallel,
    preflight,
    provenance,
    report,
    scored_splits,
    seeds,
    state,
    steps,
    surface,
    train,
    workdirs,
    writers,
)
from segjax.data import pipeline, sources
from segjax.errors import ConfigError, WorkdirError
from segjax.models import build_model


def require_run(config: ml_collections.ConfigDict, workdir: str, which: str, dataset: str | None = None) -> list[str]:
    """Check, before any data is read or prepared, that `workdir` holds a `best` or `latest`
    checkpoint of this network; returns the config keys set apart from the run's own
    (`check_run_config`, `dataset` as there)."""
    if which not in ("best", "latest"):
        raise ConfigError(f"checkpoint {which!r}: choose 'best' or 'latest'")
    workdirs.require_folder(workdir)
    latest = workdirs.CHECKPOINT_FOLDERS["latest"]
    if not os.path.isdir(os.path.join(workdir, latest)):
        raise WorkdirError(f"{workdir} holds no run (no {latest}/ folder) to load")
    if not workdirs.has_checkpoint(workdir, which):
        folder = os.path.join(workdir, workdirs.CHECKPOINT_FOLDERS[which])
        raise WorkdirError(f"{workdir} has no {which} checkpoint yet (nothing saved in {folder})")
    return check_run_config(config, workdir, dataset)


def load_run(config: ml_collections.ConfigDict, workdir: str, which: str, image: np.ndarray):
    """(model, the run's `best` or `latest` state replicated over the mesh, mesh) of the run in
    `workdir`, checked by `require_run` first; `image` is one input image [..., C]: its shape,
    padded to a multiple of 2**model.depth as evaluation pads it, builds the state template (a
    size that does not fit the depth must not be refused here: the run evaluated it). A run of
    `train.num_seeds` = K > 1 replicas gives every replica's state, stacked along a leading axis."""
    model = build_model(config.model, instances.num_outputs(config))
    mesh = parallel.make_mesh()
    padded = pipeline.padded_size(image.shape[:-1], 2**config.model.depth)
    sample = jax.ShapeDtypeStruct((1, *padded, image.shape[-1]), jnp.float32)
    # shapes, dtypes and shardings only: nothing is initialised or compiled just to be overwritten
    tx, repl = train.make_tx(config, model), parallel.replicated(mesh)
    shapes = jax.eval_shape(lambda x: state.create(model, tx, x, config.train.seed), sample)
    lead = (config.train.num_seeds,) if config.train.num_seeds > 1 else ()
    template = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(lead + s.shape, s.dtype, sharding=repl), shapes)
    ckpt = checkpointing.Checkpointer(
        workdir, config.train.keep_checkpoints, config.train.best_metric, config.train.best_mode
    )
    try:
        restored, _ = ckpt.restore(template, best=which == "best")
    finally:
        ckpt.close()
    return model, restored, mesh


# model.* keys that only change how a trained network is run at evaluation, not which network it is
EVAL_TIME_MODEL_KEYS = ("model.inference_head", "model.dtype", "model.dropout")


def check_run_config(config: ml_collections.ConfigDict, workdir: str, dataset: str | None = None) -> list[str]:
    """The keys in which `config` differs from the run's own `config.json` (none if it has none),
    and the dataset when `dataset` (`sources.dataset_id`) is not the one the run recorded.
    A different network (any other model.* key, e.g. model.pool, which leaves every parameter's
    shape alone) is refused: the checkpoint would load and score as another network. Other
    differences (eval.*, data.*, the dataset's files) are what rescoring is for; those outside
    eval.* are logged."""
    diff = workdirs.saved_differences(workdir, config, dataset) or []
    model = [k for k in diff if k.startswith("model.") and k not in EVAL_TIME_MODEL_KEYS]
    if model:
        raise ConfigError(
            f"{workdir} was trained with other model settings ({configuration.listed(model)}); its checkpoint "
            f"is scored as the network it was trained as: drop these overrides (eval.* and "
            f"{', '.join(EVAL_TIME_MODEL_KEYS)} may differ)"
        )
    other = [k for k in diff if not k.startswith("eval.")]
    if other:
        logging.warning("scoring %s with settings that differ from its training run: %s", workdir, ", ".join(other))
    return diff


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, which: str = "best", split: str = "validation"
) -> dict:
    """Score a saved run's `best` or `latest` checkpoint on the validation split, or on the held-out
    `test` split (`scored_splits.SPLIT_NAMING`; training never evaluates it), with the eval settings of `config`
    (e.g. sliding windows or TTA the run did not use), without training. Writes
    `eval_<which>.json` (test: `eval_<which>_test.json`, keys `test/...`), and each image's scores
    to `eval_<which>[_test]_per_image.csv` (and the printed intervals to `..._intervals.json`), next
    to the run's metrics.json (never overwrites metrics.json); an earlier rescoring's files are kept under a number
    (`keep_earlier_results`). Two rescorings of one run take turns (`workdirs.rescore_lock`)."""
    preflight.check(config)
    differences = require_run(config, workdir, which, sources.dataset_id(config.data))
    with contextlib.ExitStack() as held:
        if jax.process_index() == 0:  # after require_run: a lock file must not make a folder
            held.enter_context(workdirs.rescore_lock(workdir, f"scoring {which} on the {split} split"))
        return _evaluate_checkpoint(config, workdir, which, split, differences)


def _evaluate_checkpoint(config, workdir: str, which: str, split: str, differences: list[str]) -> dict:
    prefix, suffix = scored_splits.split_naming(split)
    source = sources.open_splits(config.data, with_instances=config.instances.enabled, splits=(split,))[split]
    model, restored, mesh = load_run(config, workdir, which, source[0]["image"])
    eval_step = steps.make_eval_step(config, model)
    num_seeds = config.train.num_seeds
    if num_seeds > 1:  # every replica scored on the same batches, as training evaluates them
        eval_step = jax.vmap(eval_step, in_axes=(0, None))
    repl = parallel.replicated(mesh)
    eval_fn = jax.jit(eval_step, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=repl)
    name = f"{which}{suffix}"
    replica_seeds = seeds.replica_seeds(config.train.seed, num_seeds) if num_seeds > 1 else []
    # each image's scores: beside eval_<name>.json, or each replica's in its seed_<s>/ (as training)
    folders = [os.path.join(workdir, f"seed_{s}") for s in replica_seeds] or [workdir]
    table = [os.path.join(folder, f"eval_{name}_per_image.csv") for folder in folders]
    if jax.process_index() == 0:
        for folder in dict.fromkeys([workdir, *folders]):
            keep_earlier_results(folder, name)
    step = int(np.max(restored.step))
    checkpoint_id = checkpointing.fingerprint(workdir, which, step)
    provenance.record(workdir, f"eval_only={which}", split=split, step=step, checkpoint_id=checkpoint_id)
    results = evaluate.evaluate_split(config, eval_fn, restored, source, mesh, per_image_csv=table, num_seeds=num_seeds)
    per_seed = [scored_splits.split_keys(r, prefix) for r in results] if replica_seeds else []
    if per_seed:  # the means and <key>_std over replicas; each replica's own file in seed_<s>/, as training
        results = seeds.mean_and_spread(per_seed)
        results.update(
            {f"seed{s}/{prefix}/miou": r[f"{prefix}/miou"] for s, r in zip(replica_seeds, per_seed, strict=True)}
        )
    else:
        results = scored_splits.split_keys(results, prefix)
    results["split"] = split
    results["step"] = step
    results["checkpoint"] = which
    results["checkpoint_id"] = checkpoint_id
    results["config_differences"] = differences  # e.g. ['eval.tta'], or the dataset when its files changed
    results["eval_settings"] = {k: config.eval[k] for k in ("window", "window_overlap", "window_blend", "tta")}
    if config.eval.surface_metrics:  # HD95 and the NSD tolerance are in this unit
        results["eval_settings"]["distance_unit"] = surface.unit(config)
    results["metrics_convention"] = evaluate.convention(config)
    if jax.process_index() == 0:
        writers.write_summary(os.path.join(workdir, f"eval_{name}.json"), results)
        shared = ("split", "step", "checkpoint", "checkpoint_id", "config_differences", "eval_settings")
        for s, r in zip(replica_seeds, per_seed, strict=True):
            os.makedirs(os.path.join(workdir, f"seed_{s}"), exist_ok=True)
            mine = {**r, **{k: results[k] for k in shared}}
            mine["seed"], mine["metrics_convention"] = s, results["metrics_convention"]
            writers.write_summary(os.path.join(workdir, f"seed_{s}", f"eval_{name}.json"), mine)
        settings, rules = results["eval_settings"], results["metrics_convention"]
        print(f"\n{which} checkpoint (step {results['step']}) on the {split} split, eval {settings} ({rules}):")
        unit = surface.unit(config)
        print(report.results_table(results, instances.class_names(config), prefix=prefix, distance_unit=unit))
        intervals.print_results(table, config, split, os.path.join(workdir, f"eval_{name}_intervals.json"))
    return results


def keep_earlier_results(workdir: str, which: str) -> list[str]:
    """Rename an earlier rescoring's `eval_<which>.json`, `eval_<which>_per_image.csv`,
    `eval_<which>_confusion.csv` and `eval_<which>_intervals.json` to `eval_<which>.<k>.json`,
    `eval_<which>_per_image.<k>.csv`, ..., k the first number free for all, so rescoring with other
    eval settings never overwrites a result. Returns the new paths."""
    names = [
        f"eval_{which}.json",
        *(f"eval_{which}_{kind}" for kind in ("per_image.csv", "confusion.csv", "intervals.json")),
    ]
    present = [n for n in names if os.path.exists(os.path.join(workdir, n))]
    if not present:
        return []

    def numbered(name: str, k: int) -> str:
        stem, ext = os.path.splitext(name)
        return os.path.join(workdir, f"{stem}.{k}{ext}")

    k = 1
    while any(os.path.exists(numbered(n, k)) for n in names):
        k += 1
    moved = []
    for name in present:
        moved.append(numbered(name, k))
        os.replace(os.path.join(workdir, name), moved[-1])
    logging.info("kept the earlier %s as %s", " and ".join(present), ", ".join(moved))
    return moved
