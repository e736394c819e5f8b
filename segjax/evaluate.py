"""Run the eval step over a whole split, sum confusion matrices, and name the scores."""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import instances, metrics, parallel, surface, writers
from segjax.data import pipeline
from segjax.errors import ConfigError


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
    `per_image_csv`: also write each image's scores there (`per_image_rows`; process 0); with
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
    surfaces = bool(config.eval.surface_metrics)
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
            if table:
                path = next(replicas)
                row_names = np.concatenate([o["gt_name"] for o in outputs])  # every host's (gathered)
                if jax.process_index() == 0:
                    write_per_image(path, outputs, order, names, config.eval.empty, row_names, extra)
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
        write_per_image(per_image_csv, outputs, list(range(len(outputs))), names, config.eval.empty, row_names, extra)
    return results


def confusion_csv(per_image_csv: str) -> str:
    """Where the split's confusion matrix goes beside a per-image table: `val_per_image.csv` ->
    `val_confusion.csv`, `eval_best_per_image.csv` -> `eval_best_confusion.csv`."""
    stem = per_image_csv[: -len(".csv")] if per_image_csv.endswith(".csv") else per_image_csv
    stem = stem[: -len("_per_image")] if stem.endswith("_per_image") else stem
    return f"{stem}_confusion.csv"


def write_per_image(path: str, outputs: list[dict], order, names, empty: str, row_names, extra) -> None:
    """The per-image table (`per_image_rows`) at `path` and, beside it (`confusion_csv`), the
    split's confusion matrix: pixel counts, a row per true class (`truth`), a column per predicted
    class (which classes are taken for which: what per-class scores cannot show)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a replica's seed_<s>/
    writers.write_table(path, per_image_rows(outputs, order, names, empty, row_names, extra))
    confusion = np.concatenate([np.asarray(o["confusion"], np.int64) for o in outputs])
    matrix = confusion[[r for r, index in enumerate(order) if index is not None]].sum(axis=0)
    write_confusion(confusion_csv(path), matrix, names)


CONFUSION_CORNER = "truth"  # the confusion table's first header cell: its rows are true classes


def write_confusion(path: str, matrix: np.ndarray, names) -> None:
    """A [C, C] confusion matrix as CSV: header `truth,<class>...`, then a row per true class, its
    name first (cells by position: a class may be named `truth` too). Replaced whole."""
    with writers.replaced(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow([CONFUSION_CORNER, *names])
        writer.writerows([name, *(int(v) for v in row)] for name, row in zip(names, matrix, strict=True))


def read_confusion(path: str) -> tuple[list[str], np.ndarray]:
    """(class names, [C, C] int64 counts) of a `write_confusion` table; another CSV is a
    ValueError naming the file."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f)) or [[]]
    names = header[1:]
    if header[:1] != [CONFUSION_CORNER] or [r[:1] for r in rows] != [[n] for n in names]:
        raise ValueError(f"{path} is not a confusion table (a 'truth' column, a row and a column per class)")
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"{path}: every row of a confusion table has {len(header)} cells")
    return names, np.array([[int(v) for v in r[1:]] for r in rows], np.int64).reshape(len(names), len(names))


def pixel_counts(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class `tp`, `fp`, `fn`, `tn` of a [..., C, C] confusion matrix as int64 (exact at any
    split size; `metrics.counts` is float32 for jit)."""
    cm = np.asarray(confusion, np.int64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    fp, fn = cm.sum(axis=-2) - tp, cm.sum(axis=-1) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": cm.sum(axis=(-2, -1))[..., None] - tp - fp - fn}


COUNT_KINDS = ("tp", "fp", "fn", "tn")  # a per-image table's count columns: `<kind>/<class>`
# boundary-band intersection / union (`metrics.boundary_counts`): columns `binter/<class>`,
# `bunion/<class>` where the run scores boundary IoU; the eval step's outputs of the same
BOUNDARY_KINDS = {"binter": "boundary_inter", "bunion": "boundary_union"}


def image_counts(outputs: list[dict], num_classes: int) -> dict[str, np.ndarray]:
    """Every output row's counts (padding rows included, in output order): `tp`, `fp`, `fn`, `tn`
    [N, C] int64 from the per-image confusion matrices and, where every output carries boundary
    bands, `binter`, `bunion` [N, C]."""
    rows = [np.asarray(o["confusion"], np.int64) for o in outputs]
    confusion = np.concatenate(rows) if rows else np.zeros((0, num_classes, num_classes), np.int64)
    counts = pixel_counts(confusion)
    if outputs and all(key in o for o in outputs for key in BOUNDARY_KINDS.values()):
        for kind, key in BOUNDARY_KINDS.items():
            counts[kind] = np.concatenate([np.asarray(o[key], np.int64).reshape(-1, num_classes) for o in outputs])
            if len(counts[kind]) != len(confusion):  # summed bands (a step from before per-image ones)
                raise ValueError(f"{len(counts[kind])} rows of {key} for {len(confusion)} images: one per image")
    return counts


def read_per_image_counts(path: str) -> tuple[list[str], list[str], dict[str, np.ndarray], bool]:
    """(image names, class names, {tp, fp, fn, tn: [N, C] int64, and binter, bunion where the table
    has boundary bands}, named) of a per-image table (`per_image_rows`): the classes are its
    `tp/<class>` columns in order, an image without a `name` is named by its `index`, and `named`
    is False when every image's name is its index (a dataset that stores no file names, e.g. the
    synthetic one, names its images so). A table without counts (written before they were) is a
    ValueError naming the file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    classes = [c[len("tp/") :] for c in header if c.startswith("tp/")]
    columns = [f"{kind}/{name}" for kind in COUNT_KINDS for name in classes]
    if not rows or not classes or any(c not in header for c in columns):
        raise ValueError(f"{path} holds no per-image pixel counts (tp/<class>, ...; scored before they were?)")
    names = [r.get("name") or r["index"] for r in rows]
    kinds = [*COUNT_KINDS, *(k for k in BOUNDARY_KINDS if all(f"{k}/{c}" in header for c in classes))]
    counts = {k: np.array([[int(r[f"{k}/{c}"]) for c in classes] for r in rows], np.int64) for k in kinds}
    return names, classes, counts, any(n != r["index"] for n, r in zip(names, rows, strict=True))


def per_image_rows(
    outputs: list[dict], order: list[int | None], class_names, empty: str = "nan", row_names=None, extra=None
) -> list[dict]:
    """One row per evaluated image, in split order: `index` (position in the split), `name` (the
    stored file name, when `row_names` gives one per output row, e.g. the outputs' `gt_name`),
    `pixels` scored, pixel `accuracy` and per class `dice/<c>`, `iou/<c>`, `precision/<c>`,
    `recall/<c>` (empty classes follow `empty`) and the pixel counts `tp/<c>`, `fp/<c>`, `fn/<c>`,
    `tn/<c>` (nnU-Net's per-case summary); where the outputs carry boundary bands, `biou/<c>` and
    its counts `binter/<c>`, `bunion/<c>`; and the columns of `extra[row]` when given (e.g.
    `surface.per_image`'s). `order` maps each output row to its split index (None =
    padding; `pipeline.eval_order`)."""
    confusion = np.concatenate([np.asarray(o["confusion"], np.int64) for o in outputs])
    if len(confusion) != len(order):
        raise ValueError(f"{len(confusion)} evaluated rows but an order of {len(order)}")
    if row_names is not None and len(row_names) != len(order):
        raise ValueError(f"{len(row_names)} names for {len(order)} evaluated rows")
    keep = [r for r, index in enumerate(order) if index is not None]
    cms = confusion[keep]
    per_class = {k: np.asarray(v) for k, v in metrics.class_scores(cms, empty).items()}
    per_class.update({k: v[keep] for k, v in image_counts(outputs, len(class_names)).items()})
    kinds = [*COUNT_KINDS]
    if "binter" in per_class:
        inter, union = per_class["binter"], per_class["bunion"]
        per_class["biou"] = np.where(union > 0, inter / np.maximum(union, 1), metrics.EMPTY_POLICIES[empty])
        kinds += ["biou", *BOUNDARY_KINDS]
    pixels = cms.sum(axis=(1, 2))
    correct = np.trace(cms, axis1=1, axis2=2)
    rows = []
    for i, r in enumerate(keep):
        row = {"index": order[r]}
        if row_names is not None:
            row["name"] = str(row_names[r])
        row["pixels"] = int(pixels[i])
        row["accuracy"] = float(correct[i] / pixels[i]) if pixels[i] else float("nan")
        for key in ("dice", "iou", "precision", "recall"):
            for c, name in enumerate(class_names):
                row[f"{key}/{name}"] = float(per_class[key][i, c])
        for key in kinds:
            for c, name in enumerate(class_names):
                value = per_class[key][i, c]
                row[f"{key}/{name}"] = float(value) if key == "biou" else int(value)
        if extra is not None and extra[r]:
            row.update(extra[r])
        rows.append(row)
    return sorted(rows, key=lambda row: row["index"])


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
    counts = image_counts(outputs, len(class_names))
    pixels = counts["tp"] + counts["fn"]  # [N, C]: each image's pixels of each true class
    scored = pixels.sum(axis=1) > 0  # padding images (no valid pixel) are dropped
    counts = {k: v[scored] for k, v in counts.items() if k in COUNT_KINDS or eval_cfg.boundary_dilation > 0}
    if eval_cfg.boundary_dilation > 0 and "binter" not in counts:  # outputs without bands: an empty split
        counts.update({k: np.zeros_like(counts["tp"]) for k in BOUNDARY_KINDS})
    # each batch's loss weighted by its valid pixels: a padded last batch counts for what it holds,
    # so a per-pixel loss (CE, focal) is the split's pixel mean at any eval.batch_size
    losses = [float(o["loss"]) for o in outputs]
    weights = [np.asarray(o["confusion"], np.int64).sum() for o in outputs]
    results = {"val/loss": float(np.average(losses, weights=weights)) if sum(weights) else float("nan")}
    results.update(count_scores(counts, eval_cfg, class_names))  # every score is made of counts
    # the counts every score above is made of (summed over the split, whatever eval.average), so any
    # other score, or one pooled over runs or folds, can be computed from a run's metrics.json
    for key, per_image in counts.items():
        for name, v in zip(class_names, per_image.sum(axis=0), strict=True):
            results[f"val/{key}/{name}"] = int(v)
    results["val/pixels"] = int(pixels[scored].sum())
    results["val/images"] = int(scored.sum())
    return results


def count_scores(counts: dict[str, np.ndarray], eval_cfg: ml_collections.ConfigDict, class_names) -> dict[str, float]:
    """The scores `scores` derives from pixel counts (`val/<score>/<class>`, the class means,
    `val/accuracy`), from per-class `tp`, `fp`, `fn`, `tn`: [C] summed over a split or several (the
    folds of a cross-validation: each image counted once), or [N, C], one row per image, which
    `eval.average='per_image'` needs (the other averages sum them). With boundary bands (`binter`,
    `bunion`) also `val/biou/<class>` and `val/mbiou`: always of the bands summed over the images
    (Boundary IoU's convention, whatever `eval.average`)."""
    return {k: float(v) for k, v in count_score_arrays(counts, eval_cfg, class_names).items()}


def count_score_arrays(
    counts: dict[str, np.ndarray], eval_cfg: ml_collections.ConfigDict, class_names, sets: bool = False
) -> dict[str, np.ndarray]:
    """`count_scores` as float32 arrays. With `sets`, the counts carry a leading axis of R sets of
    images (e.g. bootstrap resamples, `segjax.intervals`): every score is then [R], computed in
    one vectorised pass."""
    avg, empty, bg = eval_cfg.average, eval_cfg.empty, eval_cfg.include_background
    if avg not in metrics.AVERAGES:
        raise ConfigError(f"eval.average={avg!r} is not valid; choose one of {list(metrics.AVERAGES)}")
    counts = {k: np.asarray(counts[k]) for k in (*COUNT_KINDS, *BOUNDARY_KINDS) if k in counts}
    lead = 1 if sets else 0
    if avg == "per_image" and counts["tp"].ndim != 2 + lead:
        raise ConfigError("eval.average='per_image' scores each image: it needs one row of counts per image")
    if avg != "per_image":
        counts = {k: v.reshape(*v.shape[:lead], -1, v.shape[-1]).sum(axis=lead) for k, v in counts.items()}
    # float32 on the host (float64 sums first): JAX without x64 would take int64 counts as int32
    counts = {k: np.asarray(v, np.float64).astype(np.float32) for k, v in counts.items()}

    def named(c: dict) -> dict:
        per_class = metrics.summarize_counts(c, "dataset" if avg == "micro" else avg, empty, bg)
        out = {f"val/{key}/{name}": per_class[key][i] for key in metrics.SCORES for i, name in enumerate(class_names)}
        means = metrics.summarize_counts(c, avg, empty, bg)  # the class means, accuracy
        out.update({f"val/{key}": v for key, v in means.items() if jnp.ndim(v) == 0})
        if "binter" in c:  # the bands summed over the images, whatever the average
            inter, union = (c[k].reshape(-1, c[k].shape[-1]).sum(axis=0) for k in BOUNDARY_KINDS)
            b = metrics.boundary_iou_from_counts(inter, union, empty, bg)
            out["val/mbiou"] = b["mbiou"]
            out.update({f"val/biou/{name}": b["biou"][i] for i, name in enumerate(class_names)})
        return out

    return {k: np.asarray(v) for k, v in (jax.vmap(named) if sets else named)(counts).items()}
