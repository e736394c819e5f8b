"""Run the eval step over a whole split, sum confusion matrices, and name the scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np

from segjax import instances, metrics, parallel
from segjax.data import pipeline
from segjax.errors import ConfigError


def evaluate_split(config: ml_collections.ConfigDict, eval_fn: Callable, state, split, mesh, **kwargs):
    """`evaluate` over a whole `split` (e.g. the validation source) with the run's eval batching:
    `eval.batch_size` split over processes, images padded to a multiple of 2**model.depth, the
    instance-target hook and scores of `config`. `kwargs` go to `evaluate` (num_seeds, put)."""
    targets, extra_scores = instances.hooks(config)
    batches = pipeline.eval_batches(
        split,
        config.data,
        parallel.host_batch_size(config.eval.batch_size, "eval.batch_size"),
        jax.process_index(),
        jax.process_count(),
        2**config.model.depth,
        targets,
    )
    names = instances.class_names(config)
    return evaluate(eval_fn, state, batches, mesh, config.eval, names, extra_scores=extra_scores, **kwargs)


def evaluate(
    eval_fn: Callable,
    state,
    batches: Iterable[dict],
    mesh,
    eval_cfg: ml_collections.ConfigDict,
    class_names,
    num_seeds: int = 1,
    batch_sharding=None,
    put: Callable | None = None,
    extra_scores: Callable[[list[dict]], dict] | None = None,
):
    """Flat dict: `val/miou`, `val/mdice`, `val/accuracy`, `val/loss`, `val/<score>/<class>`,
    `val/mbiou`, `val/biou/<class>`, `val/pixels`, `val/images` (a list of such dicts, one per
    replica, when `num_seeds` > 1 and `eval_fn` returns replica-stacked outputs).

    `put` turns a host batch into the step's input (default: a global array sharded along `data`).
    Counts are summed in int64 over the split before any score is computed; the means follow
    `eval.average` ('dataset' by default), padding images (no valid pixel) are dropped.
    Host-only batch keys (`gt_*`) skip the device and join the step's outputs, for
    `extra_scores(outputs) -> dict` (e.g. panoptic quality; single replica only).
    """
    put = put or (lambda batch: parallel.to_global(batch, mesh, batch_sharding))
    outputs = []
    for batch in batches:
        host = {k: batch.pop(k) for k in list(batch) if k.startswith(pipeline.HOST_ONLY)}
        outputs.append({**jax.device_get(eval_fn(state, put(batch))), **host})
    if num_seeds == 1:
        results = scores(outputs, eval_cfg, class_names)
        return {**results, **extra_scores(outputs)} if extra_scores else results
    return [scores([{k: v[r] for k, v in o.items()} for o in outputs], eval_cfg, class_names) for r in range(num_seeds)]


def scores(outputs: list[dict], eval_cfg: ml_collections.ConfigDict, class_names) -> dict[str, float]:
    """Named scores from the eval-step outputs of a whole split (see `evaluate`)."""
    num_classes = len(class_names)
    per_image, losses = [], []
    b_inter = np.zeros(num_classes, np.int64)
    b_union = np.zeros(num_classes, np.int64)
    for out in outputs:
        cms = np.asarray(out["confusion"], np.int64)
        per_image.append(cms[cms.sum(axis=(1, 2)) > 0])
        losses.append(float(out["loss"]))
        if "boundary_inter" in out:
            b_inter += np.asarray(out["boundary_inter"], np.int64)
            b_union += np.asarray(out["boundary_union"], np.int64)
    stack = np.concatenate(per_image) if per_image else np.zeros((0, num_classes, num_classes), np.int64)
    dataset = stack.sum(axis=0)
    avg, empty, bg = eval_cfg.average, eval_cfg.empty, eval_cfg.include_background
    if avg not in metrics.AVERAGES:
        raise ConfigError(f"eval.average={avg!r} is not valid; choose one of {list(metrics.AVERAGES)}")
    per_class = metrics.summarize(
        stack if avg == "per_image" else dataset, avg if avg != "micro" else "dataset", empty, bg
    )
    means = metrics.summarize(stack if avg == "per_image" else dataset, avg, empty, bg)
    results = {"val/loss": float(np.mean(losses)) if losses else float("nan")}
    for key in metrics.SCORES:
        for name, v in zip(class_names, np.asarray(per_class[key]), strict=True):
            results[f"val/{key}/{name}"] = float(v)
    for key, value in means.items():
        if np.ndim(value) == 0:
            results[f"val/{key}"] = float(value)
    if eval_cfg.boundary_dilation > 0:
        b = metrics.boundary_iou_from_counts(b_inter, b_union, empty, bg)
        results["val/mbiou"] = float(b["mbiou"])
        for name, v in zip(class_names, np.asarray(b["biou"]), strict=True):
            results[f"val/biou/{name}"] = float(v)
    results["val/pixels"] = int(dataset.sum())
    results["val/images"] = len(stack)
    return results
