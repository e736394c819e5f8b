"""Panoptic quality (Kirillov et al., CVPR 2019), host-side numpy, accumulated over a split.

A segment is the set of pixels sharing (class, instance id); for stuff classes the instance id is
0 and each class forms one segment per image. A predicted and a true segment of the same class
match when their IoU > 0.5 (matches are then unique). Void pixels (`void` mask or `ignore_label`
in the truth) are left out: the IoU's union subtracts the prediction's void overlap, and an
unmatched prediction that is more than half void is ignored instead of counted as a false positive.
Per class: PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) = SQ x RQ. Means run over the classes
that have at least one segment in truth or prediction. Background (class 0) is not scored unless
`classes` says so (instance practice: nuclei, cells).

The same matching at stricter IoU thresholds t (0.50, 0.55, ..., 0.95: a match counts when its
IoU > t) gives the instance score of the 2018 Data Science Bowl, Cellpose and StarDist,
TP_t / (TP_t + FP_t + FN_t), which those papers call "average precision" (AP; not COCO's area under a
precision-recall curve): `ap` [C, T] per class and threshold, `ap50`, `ap75` and `ap50_95` (the
mean over the ten thresholds, the DSB score) averaged over the scored classes. Pooled over the
split's segments (StarDist's default), or with `average='per_image'` per image first (the DSB's and
Cellpose's: an image with no segment of a class in truth or prediction leaves that class out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)  # IoU thresholds of the matching scores (DSB 2018)
AT_50, AT_75 = (int(np.argmin(np.abs(THRESHOLDS - t))) for t in (0.5, 0.75))  # where AP50 and AP75 are


class PanopticAccumulator:
    """Feed images with `update`, read per-class and mean PQ/SQ/RQ and matching scores with `result`."""

    def __init__(self, num_classes: int, classes: Sequence[int] | None = None):
        self.num_classes = num_classes
        self.classes = tuple(range(1, num_classes)) if classes is None else tuple(classes)
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)
        self.iou_sum = np.zeros(num_classes, np.float64)
        self.images: list[np.ndarray] = []  # per image [C, 3 + T]: tp, fp, fn, matches with IoU > each threshold
        self.image_iou: list[np.ndarray] = []  # per image [C]: the IoUs of its matches summed

    def update(self, true_class, true_instance, pred_class, pred_instance, void=None) -> None:
        tc, ti = np.asarray(true_class).ravel(), np.asarray(true_instance).ravel()
        pc, pi = np.asarray(pred_class).ravel(), np.asarray(pred_instance).ravel()
        if not (tc.shape == ti.shape == pc.shape == pi.shape):
            raise ValueError("class and instance maps of truth and prediction must have one shape")
        void = np.zeros(tc.shape, bool) if void is None else np.asarray(void, bool).ravel()
        big = int(max(ti.max(initial=0), pi.max(initial=0))) + 1
        t_key = np.where(void, -1, tc.astype(np.int64) * big + ti)
        p_key = pc.astype(np.int64) * big + pi
        p_ids, p_area = np.unique(p_key, return_counts=True)
        t_ids, t_area = np.unique(t_key[~void], return_counts=True)
        p_void = dict(zip(*np.unique(p_key[void], return_counts=True), strict=True))
        pairs, inter = np.unique(np.stack([t_key[~void], p_key[~void]]), axis=1, return_counts=True)
        t_areas, p_areas = dict(zip(t_ids, t_area, strict=True)), dict(zip(p_ids, p_area, strict=True))
        matched_t, matched_p = set(), set()
        image = np.zeros((self.num_classes, 3 + len(THRESHOLDS)), np.int64)  # this image's tp, fp, fn, tp_t
        iou_sum = np.zeros(self.num_classes, np.float64)
        for (t, p), n in zip(pairs.T, inter, strict=True):
            if t // big != p // big:
                continue
            union = t_areas[t] + p_areas[p] - n - p_void.get(p, 0)
            iou = n / union
            if iou > 0.5:
                c = int(t // big)
                image[c, 0] += 1
                image[c, 3:] += iou > THRESHOLDS
                iou_sum[c] += iou
                matched_t.add(t)
                matched_p.add(p)
        for t in t_ids:
            if t not in matched_t:
                image[int(t // big), 2] += 1
        for p, area in zip(p_ids, p_area, strict=True):
            if p not in matched_p and p_void.get(p, 0) / area <= 0.5:
                image[int(p // big), 1] += 1
        self.tp += image[:, 0]
        self.fp += image[:, 1]
        self.fn += image[:, 2]
        self.iou_sum += iou_sum
        self.images.append(image)
        self.image_iou.append(iou_sum)

    def merge(self, other: PanopticAccumulator) -> None:
        """Add another accumulator's counts (e.g. one batch's) to this one."""
        if (other.num_classes, other.classes) != (self.num_classes, self.classes):
            raise ValueError("accumulators of different classes cannot be merged")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        self.images += other.images
        self.image_iou += other.image_iou

    def per_image(self) -> dict[str, np.ndarray]:
        """Each added image's segment counts of the scored classes (`classes`), in the order added:
        `tp`, `fp`, `fn` [N, K], `iou` [N, K] (its matches' IoUs summed) and `tp_t` [N, K, T] (its
        matches with IoU > each of `THRESHOLDS`), from which PQ, SQ, RQ and the matching scores of
        any set of images are computed (e.g. a bootstrap over images)."""
        k, n = list(self.classes), len(self.images)
        shape = (0, len(k), 3 + len(THRESHOLDS))
        counts = np.stack(self.images)[:, k] if n else np.zeros(shape, np.int64)
        iou = np.stack(self.image_iou)[:, k] if n else np.zeros((0, len(k)), np.float64)
        return {"tp": counts[..., 0], "fp": counts[..., 1], "fn": counts[..., 2], "iou": iou, "tp_t": counts[..., 3:]}

    def result(self, average: str = "dataset") -> dict[str, np.ndarray | float]:
        """`pq`, `sq`, `rq` [C] (NaN for unscored classes or classes without segments), their
        means `mpq`, `msq`, `mrq`, the `tp`/`fp`/`fn` segment counts, and the matching scores
        `ap` [C, T] (`THRESHOLDS`), `ap50`, `ap75`, `ap50_95` (class means) and `ap50_95_class` [C],
        pooled over the split (`average` 'dataset' or 'micro') or per image first ('per_image')."""
        scored = np.zeros(self.num_classes, bool)
        scored[list(self.classes)] = True
        pq, sq, rq = (np.where(scored, v, np.nan) for v in segment_scores(self.tp, self.fp, self.fn, self.iou_sum))
        scored &= ~np.isnan(pq)  # a class with a segment in truth or prediction
        mean = (lambda v: float(np.mean(v[scored]))) if scored.any() else (lambda v: float("nan"))
        out = {"pq": pq, "sq": sq, "rq": rq, "mpq": mean(pq), "msq": mean(sq), "mrq": mean(rq)}
        out.update(tp=self.tp.copy(), fp=self.fp.copy(), fn=self.fn.copy())
        shape = (1, self.num_classes, 3 + len(THRESHOLDS))
        counts = np.stack(self.images) if self.images else np.zeros(shape, np.int64)
        if average != "per_image":
            counts = counts.sum(axis=0, keepdims=True)
        ap = matching_scores(counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3:])
        ap = np.where(scored[:, None], ap, np.nan)  # [C, T]
        by_class = ap.mean(axis=1)
        out.update(ap=ap, ap50_95_class=by_class, ap50=mean(ap[:, AT_50]), ap75=mean(ap[:, AT_75]))
        out["ap50_95"] = mean(by_class)
        return out


def segment_scores(tp, fp, fn, iou, xp=np):
    """PQ, SQ and RQ per class from segment counts `tp`, `fp`, `fn` and the matches' IoUs summed
    (`iou`), each [..., C]: PQ = iou / (TP + FP/2 + FN/2), SQ = iou / TP (0 without a match),
    RQ = TP / (TP + FP/2 + FN/2); NaN where a class has no segment. `xp` is numpy or jax.numpy
    (the scores of a run's files, of its accumulator and of a bootstrap resample are one formula)."""
    den = tp + 0.5 * fp + 0.5 * fn
    scored = den > 0
    safe = xp.where(scored, den, 1.0)
    pq = xp.where(scored, iou / safe, xp.nan)
    sq = xp.where(scored, xp.where(tp > 0, iou / xp.maximum(tp, 1), 0.0), xp.nan)
    rq = xp.where(scored, tp / safe, xp.nan)
    return pq, sq, rq


def matching_scores(tp, fp, fn, tp_t, xp=np):
    """The DSB's matching score TP_t / (TP_t + FP_t + FN_t) per class and threshold, [C, T], from
    N images' (or one pooled set's) segment counts `tp`, `fp`, `fn` [N, C] and matches with IoU > each
    threshold `tp_t` [N, C, T]: a match at IoU > 0.5 but not > t is both a false positive and a
    false negative at t. Each class's score is its mean over the images where it has a segment
    (NaN where none has one)."""
    tp, fp, fn = tp[..., None], fp[..., None], fn[..., None]
    den = tp_t + fp + fn + 2 * (tp - tp_t)  # [N, C, T]; 0 only where a class has no segment
    present = (den > 0).sum(axis=0)
    total = xp.where(den > 0, tp_t / xp.maximum(den, 1), 0.0).sum(axis=0)
    return xp.where(present > 0, total / xp.maximum(present, 1), xp.nan)


def panoptic_quality(
    true_class, true_instance, pred_class, pred_instance, num_classes: int, void=None, classes=None
) -> dict:
    """PQ/SQ/RQ of one image or volume (see the module docstring); use PanopticAccumulator for a split."""
    acc = PanopticAccumulator(num_classes, classes)
    acc.update(true_class, true_instance, pred_class, pred_instance, void)
    return acc.result()
