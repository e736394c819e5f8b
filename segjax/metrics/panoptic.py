"""Panoptic quality (Kirillov et al., CVPR 2019), host-side numpy, accumulated over a split.

A segment is the set of pixels sharing (class, instance id); for stuff classes the instance id is
0 and each class forms one segment per image. A predicted and a true segment of the same class
match when their IoU > 0.5 (matches are then unique). Void pixels (`void` mask or `ignore_label`
in the truth) are left out: the IoU's union subtracts the prediction's void overlap, and an
unmatched prediction that is more than half void is ignored instead of counted as a false positive.
Per class: PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) = SQ x RQ. Means run over the classes
that have at least one segment in truth or prediction. Background (class 0) is not scored unless
`classes` says so (instance practice: nuclei, cells).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PanopticAccumulator:
    """Feed images with `update`, read per-class and mean PQ/SQ/RQ with `result`."""

    def __init__(self, num_classes: int, classes: Sequence[int] | None = None):
        self.num_classes = num_classes
        self.classes = tuple(range(1, num_classes)) if classes is None else tuple(classes)
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)
        self.iou_sum = np.zeros(num_classes, np.float64)

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
        for (t, p), n in zip(pairs.T, inter, strict=True):
            if t // big != p // big:
                continue
            union = t_areas[t] + p_areas[p] - n - p_void.get(p, 0)
            iou = n / union
            if iou > 0.5:
                c = int(t // big)
                self.tp[c] += 1
                self.iou_sum[c] += iou
                matched_t.add(t)
                matched_p.add(p)
        for t in t_ids:
            if t not in matched_t:
                self.fn[int(t // big)] += 1
        for p, area in zip(p_ids, p_area, strict=True):
            if p not in matched_p and p_void.get(p, 0) / area <= 0.5:
                self.fp[int(p // big)] += 1

    def merge(self, other: PanopticAccumulator) -> None:
        """Add another accumulator's counts (e.g. one batch's) to this one."""
        if (other.num_classes, other.classes) != (self.num_classes, self.classes):
            raise ValueError("accumulators of different classes cannot be merged")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum

    def result(self) -> dict[str, np.ndarray | float]:
        """`pq`, `sq`, `rq` [C] (NaN for unscored classes or classes without segments), their
        means `mpq`, `msq`, `mrq`, and the `tp`/`fp`/`fn` segment counts."""
        den = self.tp + 0.5 * self.fp + 0.5 * self.fn
        scored = np.zeros(self.num_classes, bool)
        scored[list(self.classes)] = True
        scored &= den > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            pq = np.where(scored, self.iou_sum / den, np.nan)
            sq = np.where(scored & (self.tp > 0), self.iou_sum / self.tp, np.where(scored, 0.0, np.nan))
            rq = np.where(scored, self.tp / den, np.nan)
        mean = (lambda v: float(np.mean(v[scored]))) if scored.any() else (lambda v: float("nan"))
        out = {"pq": pq, "sq": sq, "rq": rq, "mpq": mean(pq), "msq": mean(sq), "mrq": mean(rq)}
        out.update(tp=self.tp.copy(), fp=self.fp.copy(), fn=self.fn.copy())
        return out


def panoptic_quality(
    true_class, true_instance, pred_class, pred_instance, num_classes: int, void=None, classes=None
) -> dict:
    """PQ/SQ/RQ of one image or volume (see the module docstring); use PanopticAccumulator for a split."""
    acc = PanopticAccumulator(num_classes, classes)
    acc.update(true_class, true_instance, pred_class, pred_instance, void)
    return acc.result()
