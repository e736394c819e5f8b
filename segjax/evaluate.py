"""Run the eval step over a whole split and name its scores: each image's counts kept (`scoring`), its
per-image table written (`image_tables`), host-side predictions (baselines, mask files) scored alike."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import image_tables, instances, metrics, parallel, scoring, surface
from segjax.data import pipeline


def convention(config: ml_collections.ConfigDict) -> str:
    """How a run's (or baseline's) scores were computed, in one line stored with them as
    `metrics_convention` and printed above their table: the averaging and empty-class rules and,
    where `data.resize` changed the images, the grid the scores are counted on."""
    text = metrics.convention(config.eval.average, config.eval.empty, config.eval.include_background)
    size = config.data.resize
    if size and config.model.spatial_dims == 2:
        text += f", on images resized to {size}x{size} (data.resize), not the files' own sizes"
    return text


def evaluate_split(
    config: ml_collections.ConfigDict,
    eval_fn: Callable,
    state,
    split,
    mesh,
    per_image_csv: str | Sequence[str] = "",
    **kwargs,
):
    """`evaluate` over a whole `split` (e.g. the validation source) with the run's eval batching:
    `eval.batch_size` split over processes, images padded to a multiple of 2**model.depth, the
    instance-target hook and scores of `config`. `kwargs` go to `evaluate` (num_seeds, put, stop).
    `per_image_csv`: also write each image's scores there (`image_tables.per_image_rows`; process 0); with
    replicas (`num_seeds` > 1), one path per replica, e.g. each seed's `seed_<s>/` folder."""
    paths = [per_image_csv] if isinstance(per_image_csv, str) else list(per_image_csv)
    table = any(paths)
    if table and len(paths) != kwargs.get("num_seeds", 1):
        raise ValueError(f"{len(paths)} per-image tables for {kwargs.get('num_seeds', 1)} replicas")
    targets, extra_scores = instances.hooks(config)
    host_batch = parallel.host_batch_size(config.eval.batch_size, "eval.batch_size")
    batches = pipeline.eval_batches(
        split,
        config.data,
        host_batch,
        jax.process_index(),
        jax.process_count(),
        2**config.model.depth,
        targets,
        with_names=table,
        agree=parallel.largest_over_hosts,
    )
    names = instances.class_names(config)
    surfaces = bool(config.eval.surface_metrics)  # semantic runs only (`surface.check_config`)
    hook, reduce = extra_scores, None
    spacing = surface.spacing_of(config)
    if surfaces:  # each batch's class maps -> its rows' surface scores, as the batch arrives

        def reduce(out: dict) -> dict:
            rows = surface.per_image([out], names, config.eval.nsd_tolerance, spacing)
            return {**{k: v for k, v in out.items() if k not in ("pred", "label", "valid")}, "surface": rows}

    elif config.instances.enabled:  # -> panoptic counts, as they arrive
        reduce = functools.partial(instances.reduce_outputs, config=config)

    if table or surfaces:
        order = pipeline.eval_order(len(split), host_batch, jax.process_count())
        replicas = iter(paths)  # `evaluate` calls the hook once per replica, in replica order

        def hook(outputs: list[dict]) -> dict:  # surface metrics, the per-image table, the config's own scores
            results = dict(extra_scores(outputs)) if extra_scores else {}
            extra = None
            if surfaces:
                extra = [row for out in outputs for row in out["surface"]]  # per output row
                results.update(surface.split_scores(extra, names))
            elif config.instances.enabled and table:  # each image's PQ and segment counts
                extra = instances.table_rows(outputs, config)
            if table:
                path = next(replicas)
                row_names = np.concatenate([o["gt_name"] for o in outputs])  # every host's (gathered)
                if jax.process_index() == 0:
                    image_tables.write_per_image(path, outputs, order, names, config.eval.empty, row_names, extra)
            return results

    return evaluate(eval_fn, state, batches, mesh, config.eval, names, extra_scores=hook, reduce_batch=reduce, **kwargs)


def score_maps(maps: Iterable[dict], config: ml_collections.ConfigDict, names, per_image_csv: str = "") -> dict:
    """Named scores of predictions made on the host (a classic baseline's, or mask files another
    tool wrote): `maps` yields one dict per image, `name`, `label` and `pred` (int class ids
    0..len(names)-1, one shape), `valid` (1 where the pixel counts) and, for volumes that carry
    one, `spacing` (voxel sizes, for surface distances in mm), scored as a network's
    evaluation scores its split: the same counts, conventions, boundary IoU and, with
    `eval.surface_metrics`, HD95 / surface Dice; `per_image_csv`: each image's scores there too.
    `val/...` keys, no `val/loss`."""
    num_classes, spacing = len(names), surface.spacing_of(config)
    outputs = []
    for m in maps:
        label, pred, valid = m["label"][None], m["pred"][None], m["valid"][None]
        out = {
            "confusion": np.asarray(metrics.per_image_confusion(label, pred, num_classes, valid)),
            "loss": float("nan"),
            "gt_name": np.array([m["name"]]),
        }
        if config.eval.boundary_dilation > 0:
            inter, union = metrics.boundary_counts(
                jnp.asarray(label), jnp.asarray(pred), num_classes, config.eval.boundary_dilation, valid, per_image=True
            )
            out["boundary_inter"], out["boundary_union"] = np.asarray(inter), np.asarray(union)
        if config.eval.surface_metrics:
            batch = {"pred": pred, "label": label, "valid": valid}
            if "spacing" in m:
                batch["gt_spacing"] = np.asarray(m["spacing"])[None]
            out["surface"] = surface.per_image([batch], names, config.eval.nsd_tolerance, spacing)
        outputs.append(out)
    results = scores(outputs, config.eval, names)
    del results["val/loss"]
    extra = None
    if config.eval.surface_metrics:
        extra = [row for out in outputs for row in out["surface"]]
        results.update(surface.split_scores(extra, names))
    if per_image_csv:
        row_names = [str(o["gt_name"][0]) for o in outputs]
        image_tables.write_per_image(
            per_image_csv, outputs, list(range(len(outputs))), names, config.eval.empty, row_names, extra
        )
    return results


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
    reduce_batch: Callable[[dict], dict] | None = None,
    stop: Callable[[], bool] | None = None,
):
    """Flat dict: `val/miou`, `val/mdice`, `val/accuracy`, `val/loss`, `val/<score>/<class>`,
    `val/mbiou`, `val/biou/<class>`, `val/pixels`, `val/images` (a list of such dicts, one per
    replica, when `num_seeds` > 1 and `eval_fn` returns replica-stacked outputs).

    `put` turns a host batch into the step's input (default: a global array sharded along `data`).
    Counts are summed in int64 over the split before any score is computed; the means follow
    `eval.average` ('dataset' by default), padding images (no valid pixel) are dropped.
    `val/loss` is the batches' losses weighted by their valid pixels: the CE and focal terms are
    then the split's pixel means at any `eval.batch_size` (Dice and Lovász terms are per batch).
    Host-only batch keys (`gt_*`) skip the device and join the step's outputs, every host's rows
    gathered (`parallel.gather_host_rows`), for `extra_scores(outputs) -> dict` (e.g. panoptic
    quality, surface metrics); `reduce_batch(output) -> output` shrinks each batch's outputs as
    they arrive (e.g. class maps to per-image scores), so a split's maps are never all held on
    the host. With replicas, both see one replica's outputs at a time.
    `stop()`, asked after each batch (on every process: a collective check such as
    `Preemption.reached`), abandons the pass: None, nothing scored (a SIGTERM during a long
    evaluation must not outlast the scheduler's grace period).
    """
    put = put or (lambda batch: parallel.to_global(batch, mesh, batch_sharding))

    def replica(o: dict, r: int) -> dict:  # host-only keys are the batch's, shared by every replica
        return o if num_seeds == 1 else {k: v if k.startswith(pipeline.HOST_ONLY) else v[r] for k, v in o.items()}

    per_replica: list[list[dict]] = [[] for _ in range(num_seeds)]

    def dispatch(batch: dict):
        host = {k: batch.pop(k) for k in list(batch) if k.startswith(pipeline.HOST_ONLY)}
        return eval_fn(state, put(batch)), host

    # each batch's outputs are read back and reduced while the device computes the next batch
    for on_device, host in pipeline.one_ahead(batches, dispatch):
        out = {**jax.device_get(on_device), **parallel.gather_host_rows(host)}
        for r, outputs in enumerate(per_replica):
            outputs.append(reduce_batch(replica(out, r)) if reduce_batch else replica(out, r))
        if stop is not None and stop():
            return None
    results = []
    for outputs in per_replica:
        results.append(scores(outputs, eval_cfg, class_names))
        if extra_scores:
            results[-1].update(extra_scores(outputs))
    return results[0] if num_seeds == 1 else results


def run_score_keys(config: ml_collections.ConfigDict) -> set[str]:
    """Every validation key a run of `config` reports: `score_keys` of its classes, and the
    instance (`instances.score_keys`) and surface scores (`surface.score_keys`) it computes."""
    names = instances.class_names(config)
    keys = score_keys(config.eval, names) | instances.score_keys(config)
    return keys | (surface.score_keys(names) if config.eval.surface_metrics else set())


def score_keys(eval_cfg: ml_collections.ConfigDict, class_names) -> set[str]:
    """The keys `scores` gives for these settings and classes (instance and surface scores come
    on top), computed by scoring an empty split: e.g. to check `train.best_metric` before training."""
    empty = {"confusion": np.zeros((1, len(class_names), len(class_names)), np.int64), "loss": 0.0}
    return set(scores([empty], eval_cfg, class_names))


def scores(outputs: list[dict], eval_cfg: ml_collections.ConfigDict, class_names) -> dict[str, float]:
    """Named scores from the eval-step outputs of a whole split (see `evaluate`)."""
    counts = scoring.image_counts(outputs, len(class_names))
    pixels = counts["tp"] + counts["fn"]  # [N, C]: each image's pixels of each true class
    scored = pixels.sum(axis=1) > 0  # padding images (no valid pixel) are dropped
    counts = {k: v[scored] for k, v in counts.items() if k in scoring.COUNT_KINDS or eval_cfg.boundary_dilation > 0}
    if eval_cfg.boundary_dilation > 0 and "binter" not in counts:  # outputs without bands: an empty split
        counts.update({k: np.zeros_like(counts["tp"]) for k in scoring.BOUNDARY_KINDS})
    # each batch's loss weighted by its valid pixels: a padded last batch counts for what it holds,
    # so a per-pixel loss (CE, focal) is the split's pixel mean at any eval.batch_size
    losses = [float(o["loss"]) for o in outputs]
    weights = [np.asarray(o["confusion"], np.int64).sum() for o in outputs]
    results = {"val/loss": float(np.average(losses, weights=weights)) if sum(weights) else float("nan")}
    results.update(scoring.count_scores(counts, eval_cfg, class_names))  # every score is made of counts
    # the counts every score above is made of (summed over the split, whatever eval.average), so any
    # other score, or one pooled over runs or folds, can be computed from a run's metrics.json
    for key, per_image in counts.items():
        for name, v in zip(class_names, per_image.sum(axis=0), strict=True):
            results[f"val/{key}/{name}"] = int(v)
    results["val/pixels"] = int(pixels[scored].sum())
    results["val/images"] = int(scored.sum())
    return results
