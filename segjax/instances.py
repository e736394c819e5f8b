"""Instance and panoptic segmentation with a semantic network: the boundary-class method.

Training targets: the semantic classes plus one extra class, `instance_boundary`, for pixels of a
thing instance that lie within `instances.boundary_width` pixels of another instance (the
contour-class recipe of DCAN and the DSB 2018 winners, restricted to the borders between
instances: on the synthetic scenes a perfect prediction then scores PQ 0.884 instead of 0.858
with full contours, as thin objects keep an interior). The network is an ordinary C+1-class
segmenter; touching instances are separated by the predicted boundary band.

Post-processing (host, scipy/scikit-image): connected components of each thing class's predicted
interior are the instance seeds (components under `instances.min_size` pixels are dropped); the
boundary pixels join the nearest seed within `boundary_width + 1` pixels (`expand_labels`) and
take its class, others become background. Stuff classes (not in `instances.thing_classes`) form
one segment per class. Scored with panoptic quality (`segjax.metrics.PanopticAccumulator`) against
the dataset's instance maps: `val/pq`, `val/sq`, `val/rq` and `val/pq/<class>` per thing and
stuff class (background is not scored), and the matching scores of the DSB 2018 / Cellpose /
StarDist at IoU thresholds 0.50:0.05:0.95 (`val/ap50`, `val/ap75`, `val/ap50_95`,
`val/ap50_95/<class>`; per image first when `eval.average='per_image'`, as the DSB scored them).
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np
from scipy import ndimage
from skimage import segmentation

from segjax import metrics, scoring
from segjax.errors import ConfigError, DataError

BOUNDARY_NAME = "instance_boundary"


def check_config(config: ml_collections.ConfigDict) -> None:
    cfg = config.instances
    if not cfg.enabled:
        return
    if config.model.spatial_dims != 2:
        raise ConfigError("instances.enabled works on 2D images (model.spatial_dims=2)")
    if cfg.boundary_width < 1:
        raise ConfigError(f"instances.boundary_width={cfg.boundary_width} must be >= 1 pixel")
    bad = [c for c in thing_classes(config) if not 0 < c < config.data.num_classes]
    if bad:
        raise ConfigError(
            f"instances.thing_classes {bad} are not classes 1..{config.data.num_classes - 1} (0 is background)"
        )
    if config.data.ignore_label == config.data.num_classes:
        raise ConfigError("data.ignore_label equals the instance-boundary class id; use -1 or a larger value")
    if BOUNDARY_NAME in config.data.class_names:  # its scores would share the boundary class's keys
        raise ConfigError(f"data.class_names holds {BOUNDARY_NAME!r}, the name of the instance-boundary class")


def hooks(config: ml_collections.ConfigDict) -> tuple:
    """(label rewrite for `pipeline.train_dataset`/`eval_batches`, `extra_scores` for
    `evaluate.evaluate`), or (None, None) when instance segmentation is off."""
    if not config.instances.enabled:
        return None, None
    return functools.partial(training_targets, config=config), functools.partial(panoptic_scores, config=config)


def thing_classes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Classes whose pixels form instances; default: every class but background (0)."""
    given = tuple(config.instances.thing_classes)
    return given if given else tuple(range(1, config.data.num_classes))


def num_outputs(config: ml_collections.ConfigDict) -> int:
    """Channels of the network: the semantic classes, plus the boundary class when enabled."""
    return config.data.num_classes + int(config.instances.enabled)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = tuple(config.data.class_names)
    return (*names, BOUNDARY_NAME) if config.instances.enabled else names


def training_targets(example: dict, config: ml_collections.ConfigDict, where: str = "") -> dict:
    """An example's label with the boundary class, computed before augmentation (geometric ops
    then move it like any label); the instance map is dropped from the training stream."""
    if "instances" not in example:
        raise DataError(
            f"instances.enabled needs instance maps, but {config.data.name} {where} has none "
            "(folder datasets: an instances/ folder of uint16 PNGs; the synthetic scenes have them)"
        )
    return {"image": example["image"], "label": boundary_targets(example["label"], example["instances"], config)}


def boundary_targets(label: np.ndarray, instances: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
    """`label` [H,W] with the boundary class (C) on thing pixels within `boundary_width` pixels
    (city-block) of a pixel of *another instance*. Borders with background or stuff are left
    alone: the class change already marks them, and thin objects keep their interior."""
    things = np.isin(label, thing_classes(config)) & (instances > 0)
    ids = np.where(things, instances.astype(np.int64), 0)
    cross = ndimage.generate_binary_structure(2, 1)
    # neighbourhood max / min over thing pixels only (background 0 never wins the max; as
    # max + 1 it never wins the min): a pixel whose 4-neighbourhood holds another id is a border
    high = ndimage.grey_dilation(ids, footprint=cross, mode="nearest")
    low = ndimage.grey_erosion(np.where(things, ids, ids.max() + 1), footprint=cross, mode="nearest")
    border = things & ((high != ids) | (low != ids))
    if config.instances.boundary_width > 1:
        border = ndimage.binary_dilation(border, cross, iterations=config.instances.boundary_width - 1)
    out = label.astype(np.int32).copy()
    out[border & things] = config.data.num_classes
    return out


def to_instances(pred: np.ndarray, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Predicted C+1-class map [H,W] -> (semantic classes [H,W], instance ids [H,W]; 0 = none)."""
    boundary_class = config.data.num_classes
    seeds = np.zeros(pred.shape, np.int64)
    seed_class = [0]
    for c in thing_classes(config):
        components, n = ndimage.label(pred == c)
        if not n:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        keep = sizes >= max(config.instances.min_size, 1)
        keep[0] = False
        relabel = np.zeros(n + 1, np.int64)
        relabel[keep] = np.arange(len(seed_class), len(seed_class) + keep.sum())
        seeds = np.where(components > 0, relabel[components], seeds)
        seed_class += [c] * int(keep.sum())
    grown = segmentation.expand_labels(seeds, distance=config.instances.boundary_width + 1)
    instances = np.where((pred == boundary_class) | (seeds > 0), grown, 0)
    # thing and boundary pixels outside every kept instance become background; stuff stays
    semantic = np.where(np.isin(pred, thing_classes(config)) | (pred == boundary_class), 0, pred)
    semantic = np.where(instances > 0, np.asarray(seed_class)[instances], semantic)
    return semantic.astype(np.int32), instances.astype(np.int32)


def add_image(acc: metrics.PanopticAccumulator, config, label, true_ids, pred_class, pred_ids, void) -> None:
    """Add one image to `acc` under the thing / stuff convention: thing classes segment by instance
    id, stuff classes (and ids on stuff pixels) form one segment per class."""
    things = list(thing_classes(config))
    truth = np.where(np.isin(label, things), true_ids, 0)
    acc.update(label, truth, pred_class, np.where(np.isin(pred_class, things), pred_ids, 0), void=void)


def _accumulate(acc: metrics.PanopticAccumulator, out: dict, config: ml_collections.ConfigDict) -> None:
    """Add the images of one batch of eval outputs (`pred`, `gt_label`, `gt_instances`, `gt_valid`)."""
    images = zip(out["pred"], out["gt_label"], out["gt_instances"], out["gt_valid"], strict=True)
    for pred, label, inst, valid in images:
        if not valid.any():
            continue  # a padding copy
        rows, cols = np.nonzero(valid)  # crop the zero padding
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        p_sem, p_inst = to_instances(np.asarray(pred)[box], config)
        add_image(acc, config, label[box], inst[box], p_sem, p_inst, void=~valid[box])


def reduce_outputs(out: dict, config: ml_collections.ConfigDict) -> dict:
    """One batch's eval outputs with its maps replaced by their panoptic counts (`panoptic`, and
    `panoptic_images`: which rows it holds, padding copies left out), so a split's maps are never
    all held on the host."""
    acc = metrics.PanopticAccumulator(config.data.num_classes)
    _accumulate(acc, out, config)
    kept = {k: v for k, v in out.items() if (k != "pred" and not k.startswith("gt_")) or k == "gt_name"}
    return {**kept, "panoptic": acc, "panoptic_images": np.array([v.any() for v in out["gt_valid"]])}


def table_rows(outputs: list[dict], config: ml_collections.ConfigDict) -> list[dict | None]:
    """Per output row of `reduce_outputs`' batches (None for padding): the image's columns of the
    per-image table, per class PQ and DSB score (`pq/<class>`, `ap50_95/<class>`; NaN without a
    segment), its segment counts (`scoring.PQ_KINDS`: `pq_tp/<class>`, `pq_fp/<class>`,
    `pq_fn/<class>`, `pq_iou/<class>`) and matches at each IoU threshold (`scoring.AP_KINDS`:
    `ap_tp50/<class>` ... `ap_tp95/<class>`), from which PQ and the matching scores over any set of
    images are computed (a bootstrap, a pooled study row)."""
    names = config.data.class_names[1 : config.data.num_classes]
    rows: list[dict | None] = []
    for out in outputs:
        segments, k = out["panoptic"].per_image(), 0
        for scored in out["panoptic_images"]:
            if not scored:
                rows.append(None)
                continue
            row = {}
            tp, fp, fn, iou, tp_t = (segments[key][k : k + 1] for key in ("tp", "fp", "fn", "iou", "tp_t"))
            pq = metrics.panoptic.segment_scores(tp[0], fp[0], fn[0], iou[0])[0]
            ap = metrics.panoptic.matching_scores(tp, fp, fn, tp_t).mean(axis=-1)
            for i, name in enumerate(names):
                row[f"pq/{name}"], row[f"ap50_95/{name}"] = float(pq[i]), float(ap[i])
                row.update(
                    {f"pq_tp/{name}": int(tp[0, i]), f"pq_fp/{name}": int(fp[0, i]), f"pq_fn/{name}": int(fn[0, i])}
                )
                row[f"pq_iou/{name}"] = float(iou[0, i])
                row.update({f"{kind}/{name}": int(m) for kind, m in zip(scoring.AP_KINDS, tp_t[0, i], strict=True)})
            rows.append(row)
            k += 1
    return rows


def score_keys(config: ml_collections.ConfigDict) -> set[str]:
    """The keys `panoptic_scores` gives (none without `instances.enabled`): known before training,
    so `train.best_metric` and a study's `--summary_keys` are checked before anything runs."""
    if not config.instances.enabled:
        return set()
    names = config.data.class_names[1 : config.data.num_classes]
    keys = {"val/pq", "val/sq", "val/rq", "val/ap50", "val/ap75", "val/ap50_95"}
    kinds = ("pq", "ap50_95", *scoring.PQ_KINDS, *scoring.AP_KINDS)
    return keys | {f"val/{score}/{n}" for n in names for score in kinds}


def panoptic_scores(outputs: list[dict], config: ml_collections.ConfigDict) -> dict[str, float]:
    """PQ over a split from eval outputs: batches reduced by `reduce_outputs`, or holding `pred`
    (C+1 classes) and the host-side truth `gt_label` (semantic), `gt_instances` and `gt_valid`."""
    num_classes = config.data.num_classes
    acc = metrics.PanopticAccumulator(num_classes)
    for out in outputs:
        if "panoptic" in out:
            acc.merge(out["panoptic"])
        else:
            _accumulate(acc, out, config)
    res = acc.result(config.eval.average)
    out = {"val/pq": res["mpq"], "val/sq": res["msq"], "val/rq": res["mrq"]}
    # the segment counts PQ and AP are made of, summed over the split (pooled over runs by a study's summed row)
    shape = (num_classes, len(scoring.AP_KINDS))
    matches = np.sum(acc.images, axis=0)[:, 3:] if acc.images else np.zeros(shape, np.int64)  # [C, T]
    for c in range(1, num_classes):
        name = config.data.class_names[c]
        out.update({f"val/pq_tp/{name}": int(acc.tp[c]), f"val/pq_fp/{name}": int(acc.fp[c])})
        out.update({f"val/pq_fn/{name}": int(acc.fn[c]), f"val/pq_iou/{name}": float(acc.iou_sum[c])})
        out.update({f"val/{kind}/{name}": int(m) for kind, m in zip(scoring.AP_KINDS, matches[c], strict=True)})
    out.update({f"val/{k}": res[k] for k in ("ap50", "ap75", "ap50_95")})
    for c in range(1, num_classes):
        out[f"val/pq/{config.data.class_names[c]}"] = float(res["pq"][c])
        out[f"val/ap50_95/{config.data.class_names[c]}"] = float(res["ap50_95_class"][c])
    return out
