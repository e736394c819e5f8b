"""The counts every score is made of, and the scores of counts: per class `tp`, `fp`, `fn`, `tn`
(from confusion matrices), boundary IoU's band counts and PQ's segment counts, per image or summed
over a split or several (and each image's surface distances, whose scores are means over images),
scored under a run's `eval` conventions. A run's evaluation, a per-image table, a
study's pooled row and a bootstrap resample (`segjax.intervals`) are all scored here, so one
number comes out the same wherever it is computed from the same counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import metrics
from segjax.errors import ConfigError
from segjax.metrics import panoptic
from segjax.metrics.panoptic import AT_50, AT_75, THRESHOLDS


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
# panoptic segment counts (`metrics.PanopticAccumulator.per_image`) of the classes PQ scores: every
# class after background, in order (`instances`); columns `pq_tp/<class>`, `pq_fp/<class>`,
# `pq_fn/<class>` and `pq_iou/<class>` (the matches' IoUs summed) where the run is an instance run
PQ_KINDS = ("pq_tp", "pq_fp", "pq_fn", "pq_iou")
# the matches of those segments with IoU > each of `THRESHOLDS` (0.50 ... 0.95): columns
# `ap_tp50/<class>` ... `ap_tp95/<class>`, the true positives of the DSB's matching scores (AP)
AP_KINDS = tuple(f"ap_tp{round(t * 100)}" for t in THRESHOLDS)
# each image's surface distances (`surface.per_image`, classes 1..K): columns `hd95/<class>`,
# `nsd/<class>`; the split's scores are their means over the images where they are defined
# (`surface.split_scores`), so these are never summed
SURFACE_KINDS = ("hd95", "nsd")


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


def count_scores(counts: dict[str, np.ndarray], eval_cfg: ml_collections.ConfigDict, class_names) -> dict[str, float]:
    """The scores `scores` derives from pixel counts (`val/<score>/<class>`, the class means,
    `val/accuracy`), from per-class `tp`, `fp`, `fn`, `tn`: [C] summed over a split or several (the
    folds of a cross-validation: each image counted once), or [N, C], one row per image, which
    `eval.average='per_image'` needs (the other averages sum them). With boundary bands (`binter`,
    `bunion`) also `val/biou/<class>` and `val/mbiou`: always of the bands summed over the images
    (Boundary IoU's convention, whatever `eval.average`); with segment counts (`PQ_KINDS`, [..., K]:
    `class_names[1 : 1 + K]`) `val/pq`, `val/sq`, `val/rq` and `val/pq/<class>`, of the segments
    summed over the images as the split's PQ is (`metrics.PanopticAccumulator`), and with their
    matches at each threshold (`AP_KINDS`) `val/ap50`, `val/ap75`, `val/ap50_95` and
    `val/ap50_95/<class>`, pooled or per image first as `eval.average` says; with each image's
    surface distances (`SURFACE_KINDS`, [N, K]) `val/hd95/<class>`, `val/nsd/<class>`, `val/mhd95`,
    `val/mnsd`, their means over the images (`surface.split_scores`)."""
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
    distances = {k: np.asarray(counts[k]) for k in SURFACE_KINDS if k in counts}  # means over images, never sums
    kinds = (*COUNT_KINDS, *BOUNDARY_KINDS, *PQ_KINDS, *AP_KINDS)
    counts = {k: np.asarray(counts[k]) for k in kinds if k in counts}
    lead = 1 if sets else 0
    if avg == "per_image" and counts["tp"].ndim != 2 + lead:
        raise ConfigError("eval.average='per_image' scores each image: it needs one row of counts per image")
    if any(v.ndim != 2 + lead for v in distances.values()):
        raise ConfigError("surface distances (hd95, nsd) are means over images: they need one row per image")
    if avg != "per_image":
        counts = {k: v.reshape(*v.shape[:lead], -1, v.shape[-1]).sum(axis=lead) for k, v in counts.items()}
    counts.update(distances)
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
        if "pq_tp" in c:
            out.update(_panoptic({k: c[k].reshape(-1, c[k].shape[-1]).sum(axis=0) for k in PQ_KINDS}, class_names))
        if "ap_tp50" in c:
            out.update(_matching(c, class_names))
        if "hd95" in c:
            out.update(_surface(c, class_names))
        return out

    return {k: np.asarray(v) for k, v in (jax.vmap(named) if sets else named)(counts).items()}


def _panoptic(c: dict, class_names) -> dict:
    """PQ, SQ, RQ per class and their means over the classes with a segment (as
    `metrics.PanopticAccumulator.result`), from segment counts summed over images (`PQ_KINDS`, [K])."""
    pq, sq, rq = panoptic.segment_scores(c["pq_tp"], c["pq_fp"], c["pq_fn"], c["pq_iou"], xp=jnp)
    out = {"val/pq": jnp.nanmean(pq), "val/sq": jnp.nanmean(sq), "val/rq": jnp.nanmean(rq)}
    out.update({f"val/pq/{name}": pq[i] for i, name in enumerate(class_names[1 : 1 + len(pq)])})
    return out


def _matching(c: dict, class_names) -> dict:
    """The DSB's matching scores TP_t / (TP_t + FP_t + FN_t) (as `metrics.PanopticAccumulator`:
    a match at IoU > 0.5 but not > t is both a false positive and a false negative at t), from the
    segment counts (`PQ_KINDS`) and matches (`AP_KINDS`): [K] summed over images, or [N, K] per
    image ('per_image': each class's mean over the images where it has a segment)."""
    tp_t = jnp.stack([c[k] for k in AP_KINDS], axis=-1)  # [(N,) K, T]
    tp, fp, fn = (c[k].reshape(-1, tp_t.shape[-2]) for k in ("pq_tp", "pq_fp", "pq_fn"))  # [N, K]
    ap = panoptic.matching_scores(tp, fp, fn, tp_t.reshape(-1, *tp_t.shape[-2:]), xp=jnp)  # [K, T]
    by_class = ap.mean(axis=-1)
    out = {"val/ap50": jnp.nanmean(ap[:, AT_50]), "val/ap75": jnp.nanmean(ap[:, AT_75])}
    out["val/ap50_95"] = jnp.nanmean(by_class)
    out.update({f"val/ap50_95/{name}": by_class[i] for i, name in enumerate(class_names[1 : 1 + len(by_class)])})
    return out


def _surface(c: dict, class_names) -> dict:
    """HD95 and NSD per class as `surface.split_scores` makes them from each image's [N, K] values:
    the mean over the images with a finite HD95 / a defined NSD (NaN where none), then the means
    over the classes that have one."""
    out = {}
    for kind, defined in (("hd95", jnp.isfinite), ("nsd", lambda v: ~jnp.isnan(v))):
        values = c[kind]
        ok = defined(values)
        n = ok.sum(axis=0)
        per_class = jnp.where(n > 0, jnp.where(ok, values, 0.0).sum(axis=0) / jnp.maximum(n, 1), jnp.nan)
        out[f"val/m{kind}"] = jnp.nanmean(per_class)
        out.update({f"val/{kind}/{name}": per_class[i] for i, name in enumerate(class_names[1 : 1 + values.shape[-1]])})
    return out
