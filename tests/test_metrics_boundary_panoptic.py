"""Boundary IoU, Hausdorff distance and panoptic quality against hand counts and scipy."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff

from segjax import metrics
from segjax.metrics import boundary


def square(size, top, left, side):
    m = np.zeros((size, size), int)
    m[top : top + side, left : left + side] = 1
    return m


def test_boundary_iou_square_vs_shifted_square_by_hand():
    """5x5 squares, one shifted right by 1, dilation 1: each band is the 16-pixel ring;
    the rings share 4 + 4 pixels on the top and bottom rows -> 8 / (16 + 16 - 8) = 1/3,
    while the mask IoU is 20 / 30 = 2/3: boundaries are judged much more harshly."""
    g = square(10, 2, 2, 5)[None]
    p = square(10, 2, 3, 5)[None]
    out = metrics.boundary_iou(g, p, 2, dilation=1)
    np.testing.assert_allclose(float(out["biou"][1]), 1 / 3, rtol=1e-6)
    mask_iou = metrics.summarize(metrics.confusion_matrix(g, p, 2))["iou"][1]
    np.testing.assert_allclose(float(mask_iou), 2 / 3, rtol=1e-6)


def test_boundary_iou_is_one_for_identical_masks_and_image_border_is_contour():
    g = square(8, 0, 0, 8)[None]  # the whole image: its band is the 2-pixel frame along the border
    inter, union = metrics.boundary_counts(g, g, 2, dilation=2)
    assert int(union[1]) == 64 - 16 and int(inter[1]) == int(union[1])
    assert float(metrics.boundary_iou(g, g, 2, dilation=2)["mbiou"]) == 1.0


def test_boundary_iou_3d_and_valid_mask():
    g = np.zeros((1, 6, 6, 6), int)
    g[0, 1:5, 1:5, 1:5] = 1
    out = metrics.boundary_iou(g, g, 2, dilation=1)
    assert float(out["biou"][1]) == 1.0
    valid = np.zeros_like(g, bool)
    _inter, union = metrics.boundary_counts(g, 1 - g, 2, 1, valid)
    assert int(union.sum()) == 0  # nothing valid, nothing counted


def surface_points(mask):
    return np.argwhere(boundary._surface(mask.astype(bool)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hausdorff_matches_point_set_references(seed):
    rng = np.random.default_rng(seed)
    a = np.zeros((20, 24), bool)
    b = np.zeros((20, 24), bool)
    a[rng.integers(0, 8) : rng.integers(10, 20), rng.integers(0, 8) : rng.integers(12, 24)] = True
    b[rng.integers(0, 8) : rng.integers(10, 20), rng.integers(0, 8) : rng.integers(12, 24)] = True
    pa, pb = surface_points(a), surface_points(b)
    hd100 = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
    np.testing.assert_allclose(metrics.hausdorff_distance(a, b, percentile=100), hd100, rtol=1e-6)
    d = cdist(pa, pb)
    hd95 = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    np.testing.assert_allclose(metrics.hausdorff_distance(a, b, percentile=95), hd95, rtol=1e-6)


def test_hausdorff_empty_cases_and_spacing():
    z = np.zeros((5, 5), bool)
    one = z.copy()
    one[2, 2] = True
    assert np.isnan(metrics.hausdorff_distance(z, z))
    assert metrics.hausdorff_distance(z, one) == np.inf
    other = z.copy()
    other[2, 4] = True
    assert metrics.hausdorff_distance(one, other, spacing=(1.0, 0.5)) == pytest.approx(1.0)


def panoptic_example():
    """6x6 truth: nucleus 1 (8 px), nucleus 2 (4 px, missed), a void block; predictions:
    one match (IoU 6/8), one false positive, one prediction lying wholly in the void (ignored)."""
    tc = np.zeros((6, 6), int)
    ti = np.zeros((6, 6), int)
    tc[0:2, 0:4], ti[0:2, 0:4] = 1, 1
    tc[4:6, 0:2], ti[4:6, 0:2] = 1, 2
    void = np.zeros((6, 6), bool)
    void[4:6, 4:6] = True
    pc = np.zeros((6, 6), int)
    pi = np.zeros((6, 6), int)
    pc[0:2, 0:3], pi[0:2, 0:3] = 1, 7
    pc[3, 0:4], pi[3, 0:4] = 1, 8
    pc[4:6, 4:6], pi[4:6, 4:6] = 1, 9
    return tc, ti, pc, pi, void


def test_panoptic_quality_by_hand():
    tc, ti, pc, pi, void = panoptic_example()
    out = metrics.panoptic_quality(tc, ti, pc, pi, num_classes=2, void=void)
    assert (int(out["tp"][1]), int(out["fp"][1]), int(out["fn"][1])) == (1, 1, 1)
    np.testing.assert_allclose(out["sq"][1], 0.75)
    np.testing.assert_allclose(out["rq"][1], 1 / (1 + 0.5 + 0.5))
    np.testing.assert_allclose(out["pq"][1], 0.75 / 2)
    np.testing.assert_allclose(out["mpq"], 0.375)
    assert np.isnan(out["pq"][0])  # background not scored by default


def test_panoptic_void_overlap_is_not_held_against_a_match():
    """A prediction covering nucleus 3 (4 px) plus 4 void pixels: IoU = 4 / (8 + 4 - 4 - 4) = 1."""
    tc = np.zeros((2, 4), int)
    ti = np.zeros((2, 4), int)
    tc[:, 0:2], ti[:, 0:2] = 1, 3
    void = np.zeros((2, 4), bool)
    void[:, 2:4] = True
    pc = np.ones((2, 4), int)
    pi = np.full((2, 4), 5)
    out = metrics.panoptic_quality(tc, ti, pc, pi, 2, void=void)
    np.testing.assert_allclose(out["pq"][1], 1.0)
    without_void = metrics.panoptic_quality(tc, ti, pc, pi, 2)  # void pixels now count as background
    np.testing.assert_allclose(without_void["pq"][1], 0.0)


def test_boundary_module_example_runs():
    failures, tried = doctest.testmod(boundary)
    assert tried > 0 and failures == 0


def test_panoptic_accumulators_merge_into_the_split_total():
    """Two images in two accumulators, merged: the by-hand example (TP 1, FP 1, FN 1, IoU 0.75)
    plus a perfect match (IoU 1) -> PQ = 1.75 / (2 + 0.5 + 0.5), as one accumulator fed both."""
    tc, ti, pc, pi, void = panoptic_example()
    second = np.zeros((6, 6), int)
    second[0:2, 0:2] = 1
    a, b, both = (metrics.PanopticAccumulator(2) for _ in range(3))
    a.update(tc, ti, pc, pi, void)
    b.update(second, second * 4, second, second * 9)
    both.update(tc, ti, pc, pi, void)
    both.update(second, second * 4, second, second * 9)
    a.merge(b)
    got, want = a.result(), both.result()
    assert (int(got["tp"][1]), int(got["fp"][1]), int(got["fn"][1])) == (2, 1, 1)
    np.testing.assert_allclose(got["pq"][1], 1.75 / 3)
    np.testing.assert_allclose(got["mpq"], want["mpq"])
    with pytest.raises(ValueError, match="different classes"):
        a.merge(metrics.PanopticAccumulator(3))


def test_matching_scores_by_hand():
    """One true 10x10 square, predicted 10x12: IoU 100/120 = 0.833 clears the thresholds 0.50-0.80
    (7 of 10), not 0.85-0.95, where it is a false positive and a false negative (0 / 2)."""
    truth = np.zeros((20, 20), int)
    truth[2:12, 2:12] = 1
    pred = np.zeros((20, 20), int)
    pred[2:12, 2:14] = 1
    res = metrics.panoptic_quality(truth, truth, pred, pred, num_classes=2)
    np.testing.assert_array_equal(res["ap"][1], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    assert (res["ap50"], res["ap75"], res["ap50_95"]) == (1.0, 1.0, pytest.approx(0.7))
    assert np.isnan(res["ap"][0]).all()  # background is not scored


def _hungarian_counts(truth: np.ndarray, pred: np.ndarray, t: float) -> tuple[int, int, int]:
    """(TP, FP, FN) at IoU > t from the IoU-maximising one-to-one assignment (scipy), the
    reference StarDist's `matching` uses."""
    from scipy.optimize import linear_sum_assignment

    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((len(t_ids), len(p_ids)))
    for i, a in enumerate(t_ids):
        for j, b in enumerate(p_ids):
            inter = np.sum((truth == a) & (pred == b))
            iou[i, j] = inter / np.sum((truth == a) | (pred == b))
    rows, cols = linear_sum_assignment(-iou)
    tp = int(np.sum(iou[rows, cols] > t))
    return tp, len(p_ids) - tp, len(t_ids) - tp


@pytest.mark.parametrize("average", ["dataset", "per_image"])
def test_matching_scores_equal_a_hungarian_reference(average):
    """Random boxes, predicted with jittered edges, some missed, one invented per image:
    TP/(TP+FP+FN) at each threshold equals scipy's optimal assignment's, pooled over the images or
    averaged per image (the DSB score: an image's mean over thresholds, then over images)."""
    rng = np.random.default_rng(0)
    accumulator = metrics.PanopticAccumulator(2)
    images = []
    for _ in range(6):
        truth, pred = np.zeros((64, 64), int), np.zeros((64, 64), int)
        k = 0
        for r in range(0, 64, 16):
            for c in range(0, 64, 16):
                if rng.random() < 0.3:
                    continue
                k += 1
                h, w = rng.integers(6, 14, 2)
                truth[r : r + h, c : c + w] = k
                if rng.random() < 0.85:  # found, with jittered edges
                    dr, dc, dh, dw = rng.integers(-2, 3, 4)
                    pred[max(r + dr, 0) : r + dr + h + dh, max(c + dc, 0) : c + dc + w + dw] = k
        pred[rng.integers(0, 60) :, 62:] = 99  # an invented object along the right edge
        images.append((truth, pred))
        accumulator.update(truth > 0, truth, pred > 0, pred)
    res = accumulator.result(average)
    for i, t in enumerate(metrics.panoptic.THRESHOLDS):
        counts = np.array([_hungarian_counts(truth, pred, t) for truth, pred in images])
        if average == "dataset":
            tp, fp, fn = counts.sum(axis=0)
            want = tp / (tp + fp + fn)
        else:
            want = np.mean(counts[:, 0] / counts.sum(axis=1))
        assert res["ap"][1, i] == pytest.approx(want, rel=1e-12), t
    assert 0.1 < res["ap50_95"] < res["ap50"] < 1  # a test of something: neither trivial end
    assert res["ap50_95"] == pytest.approx(np.mean(res["ap"][1]))


def test_the_formulas_of_counts_by_hand_in_numpy_and_jax():
    """PQ/SQ/RQ and the matching scores of given counts (the one formula the accumulator, a run's
    per-image table and a bootstrap resample use), numpy and jax.numpy alike."""
    import jax.numpy as jnp

    from segjax.metrics import panoptic

    # class 1: 2 matches (IoUs 0.9 + 0.6), 1 FP, 1 FN; class 2: only a FP; class 3: no segment
    tp, fp, fn, iou = (np.array(v) for v in ([2, 0, 0], [1, 1, 0], [1, 0, 0], [1.5, 0.0, 0.0]))
    for xp in (np, jnp):
        pq, sq, rq = (np.asarray(v) for v in panoptic.segment_scores(tp, fp, fn, iou, xp=xp))
        np.testing.assert_allclose(pq, [1.5 / 3, 0.0, np.nan])
        np.testing.assert_allclose(sq, [0.75, 0.0, np.nan])
        np.testing.assert_allclose(rq, [2 / 3, 0.0, np.nan])
    # two images of one class: (tp 2, fp 1, fn 1; matches over t0, t1: 2, 1) and (tp 0, fp 0, fn 0)
    tp_t = np.array([[[2, 1]], [[0, 0]]])
    counts = (np.array([[2], [0]]), np.array([[1], [0]]), np.array([[1], [0]]))
    for xp in (np, jnp):
        ap = np.asarray(panoptic.matching_scores(*counts, tp_t, xp=xp))
        # t0: 2 / (2 + 1 + 1); t1: 1 / (1 + 1 + 1 + 2): the image without a segment is left out
        np.testing.assert_allclose(ap, [[0.5, 0.2]])
