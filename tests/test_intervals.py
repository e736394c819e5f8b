"""segjax.intervals: bootstrap confidence intervals over images, against scipy.stats.bootstrap."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats

from segjax import intervals, matched_tables, scoring
from segjax.errors import ConfigError
from tests.conftest import ROOT

CLASSES = ["background", "a", "b"]


def eval_cfg(average: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"average": average, "empty": "nan", "include_background": True})


def random_counts(seed: int, n: int = 30) -> dict[str, np.ndarray]:
    """Per-image counts of a 3-class prediction on n images of 1000 pixels, every class present."""
    rng = np.random.default_rng(seed)
    tp = rng.integers(20, 300, (n, 3))
    fp, fn = rng.integers(1, 80, (n, 3)), rng.integers(1, 80, (n, 3))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": 1000 - tp - fp - fn}


def dice(tp, fp, fn, axis=-1):
    return 2 * tp.sum(axis) / (2 * tp.sum(axis) + fp.sum(axis) + fn.sum(axis))


def close(ours: dict, reference, width_fraction: float = 0.05) -> None:
    """Two percentile intervals from independent resamples agree within a small part of their width."""
    low, high = reference.confidence_interval
    tolerance = width_fraction * (high - low)
    assert abs(ours["low"] - low) < tolerance and abs(ours["high"] - high) < tolerance, (ours, low, high)


def test_the_interval_of_summed_counts_is_scipy_s_percentile_bootstrap(monkeypatch):
    """eval.average='dataset': the Dice of class `a` over the drawn images' summed counts, as
    scipy's paired percentile bootstrap of the same statistic; the estimate is the Dice of all images."""
    c = random_counts(0)
    got = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000)["val/dice/a"]
    reference = stats.bootstrap(
        (c["tp"][:, 1], c["fp"][:, 1], c["fn"][:, 1]),
        dice,
        paired=True,
        vectorized=True,
        n_resamples=20_000,
        method="percentile",
        random_state=1,
    )
    np.testing.assert_allclose(got["estimate"], dice(c["tp"][:, 1], c["fp"][:, 1], c["fn"][:, 1]), rtol=1e-6)
    close(got, reference)
    assert got["undefined"] == 0
    monkeypatch.setattr(intervals, "CHUNK_VALUES", 30 * 3 * 1500)  # 1500 resamples at a time, the last chunk short
    chunked = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000)["val/dice/a"]
    close(chunked, reference)


def test_the_interval_of_per_image_scores_is_that_of_their_mean():
    """eval.average='per_image' (nnU-Net's mean over cases): the bootstrap of the mean of the
    images' Dice; the class mean `val/mdice` as the bootstrap of the mean over classes and images."""
    c = random_counts(1)
    got = intervals.bootstrap(c, eval_cfg("per_image"), CLASSES, ["val/dice/b", "val/mdice"], resamples=20_000)
    per_image = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])
    for key, values in (("val/dice/b", per_image[:, 2]), ("val/mdice", per_image.mean(1))):
        reference = stats.bootstrap(
            (values,), np.mean, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
        )
        np.testing.assert_allclose(got[key]["estimate"], values.mean(), rtol=1e-6)
        close(got[key], reference)


@pytest.mark.parametrize("average", ["dataset", "per_image"])
def test_the_interval_of_boundary_iou_is_that_of_its_summed_bands(average):
    """Boundary IoU (the bands summed over the drawn images, whatever eval.average): scipy's paired
    percentile bootstrap of sum(inter) / sum(union) over the images, class `a`; its estimate is
    the bands of all images."""
    c = random_counts(4)
    rng = np.random.default_rng(4)
    c["binter"] = rng.integers(10, 60, (30, 3))
    c["bunion"] = c["binter"] + rng.integers(5, 60, (30, 3))
    got = intervals.bootstrap(c, eval_cfg(average), CLASSES, ["val/biou/a", "val/mbiou"], resamples=20_000)

    def biou_a(inter, union, axis=-1):
        return inter.sum(axis) / union.sum(axis)

    def mbiou(*bands, axis=-1):  # the three classes' inter, then their union: the mean of their ratios
        return np.mean([biou_a(bands[k], bands[k + 3], axis) for k in range(3)], axis=0)

    a = (c["binter"][:, 1], c["bunion"][:, 1])
    every = (*c["binter"].T, *c["bunion"].T)
    for key, data, statistic in (("val/biou/a", a, biou_a), ("val/mbiou", every, mbiou)):
        reference = stats.bootstrap(
            data, statistic, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
        )
        np.testing.assert_allclose(got[key]["estimate"], statistic(*data), rtol=1e-6)
        close(got[key], reference)


def test_the_interval_of_panoptic_quality_is_that_of_its_summed_segments():
    """PQ (segments summed over the drawn images, as a split's PQ is): scipy's paired percentile
    bootstrap of sum(IoU) / (TP + FP/2 + FN/2) over the images for class `a`; the estimates of
    `val/pq` and `val/sq` are the means over classes a, b of all images' PQ and SQ."""
    c = random_counts(6)
    rng = np.random.default_rng(6)
    tp, fp, fn = (rng.integers(0, 8, (30, 2)) for _ in range(3))
    iou = tp * rng.uniform(0.55, 0.95, (30, 2))  # each match's IoU > 0.5
    c.update(pq_tp=tp, pq_fp=fp, pq_fn=fn, pq_iou=iou)
    got = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/pq/a", "val/pq", "val/sq"], resamples=20_000)

    def pq_a(i, t, p, n, axis=-1):
        return i.sum(axis) / (t.sum(axis) + 0.5 * p.sum(axis) + 0.5 * n.sum(axis))

    data = (iou[:, 0], tp[:, 0], fp[:, 0], fn[:, 0])
    reference = stats.bootstrap(
        data, pq_a, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
    )
    np.testing.assert_allclose(got["val/pq/a"]["estimate"], pq_a(*data), rtol=1e-6)
    close(got["val/pq/a"], reference)
    every = [pq_a(iou[:, k], tp[:, k], fp[:, k], fn[:, k]) for k in range(2)]
    np.testing.assert_allclose(got["val/pq"]["estimate"], np.mean(every), rtol=1e-6)
    sq = [iou[:, k].sum() / tp[:, k].sum() for k in range(2)]
    np.testing.assert_allclose(got["val/sq"]["estimate"], np.mean(sq), rtol=1e-6)


@pytest.mark.parametrize("average", ["dataset", "per_image"])
def test_the_interval_of_the_dsb_score_is_that_of_its_matches(average):
    """AP50:95 (the DSB's matching score: TP_t / (TP_t + FP_t + FN_t) averaged over the IoU
    thresholds 0.50 ... 0.95) from each image's segment counts and its matches above each threshold:
    pooled over the drawn images ('dataset'), or each image's score first and their mean over the
    images where the class has a segment ('per_image'); scipy's paired percentile bootstrap of either
    for class `a`, and the estimate of `val/ap50` is the mean over classes a, b at IoU 0.5."""
    c = random_counts(8)
    rng = np.random.default_rng(8)
    tp, fp, fn = rng.integers(0, 6, (30, 2)), rng.integers(0, 3, (30, 2)), rng.integers(0, 3, (30, 2))
    tp[:4, 0] = fp[:4, 0] = fn[:4, 0] = 0  # four images without a segment of class a
    thresholds = np.round(np.arange(0.5, 0.96, 0.05), 2)
    # each match's IoU > 0.5; the matches above each threshold, [N, K, T]
    ious = [[rng.uniform(0.5, 1.0, n) for n in row] for row in tp]
    matches = np.array([[[(i > t).sum() for t in thresholds] for i in row] for row in ious])
    c.update(pq_tp=tp, pq_fp=fp, pq_fn=fn, pq_iou=tp * 0.75)
    c.update({f"ap_tp{round(t * 100)}": matches[..., j] for j, t in enumerate(thresholds)})
    assert list(c)[-10:] == list(scoring.AP_KINDS)
    keys = ["val/ap50_95/a", "val/ap50"]
    got = intervals.bootstrap(c, eval_cfg(average), CLASSES, keys, resamples=20_000)

    def ratio(m, t, p, n):  # [..., T]: TP_t / (TP_t + FP_t + FN_t); a match not above t is both FP_t and FN_t
        return m / (t + p + n + (t - m))

    def pooled(t, p, n, *m, axis=-1):
        m = np.stack(m, axis=-1)
        return ratio(m.sum(axis - 1), t.sum(axis)[..., None], p.sum(axis)[..., None], n.sum(axis)[..., None]).mean(-1)

    def per_image(t, p, n, *m, axis=-1):
        with np.errstate(invalid="ignore"):
            scores = ratio(np.stack(m, axis=-1), t[..., None], p[..., None], n[..., None]).mean(-1)
        return np.nanmean(scores, axis=axis)

    statistic = pooled if average == "dataset" else per_image
    data = (tp[:, 0], fp[:, 0], fn[:, 0], *matches[:, 0].T)
    reference = stats.bootstrap(
        data, statistic, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
    )
    np.testing.assert_allclose(got["val/ap50_95/a"]["estimate"], statistic(*data), rtol=1e-6)
    close(got["val/ap50_95/a"], reference)
    at_50 = [statistic(tp[:, k], fp[:, k], fn[:, k], matches[:, k, 0]) for k in range(2)]
    np.testing.assert_allclose(got["val/ap50"]["estimate"], np.mean(at_50), rtol=1e-6)


def test_the_interval_of_surface_distances_is_that_of_their_mean_over_images():
    """HD95 and NSD are means over the images where they are defined (an infinite HD95: a class
    in only one of truth and prediction; a NaN: in neither), whatever eval.average: scipy's
    percentile bootstrap of the nan-aware mean for class `a`, and of the mean over classes for
    `val/mnsd`; a table of summed counts cannot hold them."""
    c = random_counts(7)
    rng = np.random.default_rng(7)
    hd95, nsd = rng.uniform(1, 9, (30, 2)), rng.uniform(0.3, 1, (30, 2))
    hd95[[2, 5], 0], nsd[[3, 8, 9], 1] = np.inf, np.nan
    c.update(hd95=hd95, nsd=nsd)
    got = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/hd95/a", "val/mnsd"], resamples=20_000)

    def finite_mean(v, axis=-1):
        return np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=axis)

    def mnsd(a, b, axis=-1):
        return (np.nanmean(a, axis=axis) + np.nanmean(b, axis=axis)) / 2

    for key, data, statistic in (("val/hd95/a", (hd95[:, 0],), finite_mean), ("val/mnsd", tuple(nsd.T), mnsd)):
        reference = stats.bootstrap(
            data, statistic, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
        )
        np.testing.assert_allclose(got[key]["estimate"], statistic(*data), rtol=1e-6)
        close(got[key], reference)
    summed = {k: v.sum(axis=0) for k, v in random_counts(7).items()}
    with pytest.raises(ConfigError, match=r"surface distances \(hd95, nsd\) are means over images"):
        scoring.count_scores({**summed, "hd95": hd95.mean(axis=0)}, eval_cfg("dataset"), CLASSES)


def test_seeds_of_the_same_images_are_drawn_together():
    """Counts [N, K, C] (K seeds scored on each image, `matched_tables.grouped`) resample images, each
    with all its seeds: under 'dataset' the bootstrap of the per-image counts summed over the seeds,
    under 'per_image' of the per-image mean over the seeds, as scipy's (a bootstrap over the
    N * K rows instead would be too narrow: seeds are not further images)."""
    a, b = random_counts(5), random_counts(6)
    b["tp"][:, 1] = a["tp"][:, 1] + 3  # the second seed: as hard on the same images
    stacked = {k: np.stack([a[k], b[k]], 1) for k in a}
    got = intervals.bootstrap(stacked, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000)["val/dice/a"]
    summed = [(a[k] + b[k])[:, 1] for k in ("tp", "fp", "fn")]
    reference = stats.bootstrap(
        summed, dice, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
    )
    np.testing.assert_allclose(got["estimate"], dice(*summed), rtol=1e-6)
    close(got, reference)
    rows = {k: np.concatenate([a[k], b[k]]) for k in a}  # the same 2N rows as 2N independent images
    flat = intervals.bootstrap(rows, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000)["val/dice/a"]
    assert flat["high"] - flat["low"] < 0.85 * (got["high"] - got["low"])
    got = intervals.bootstrap(stacked, eval_cfg("per_image"), CLASSES, ["val/dice/a"], resamples=20_000)["val/dice/a"]
    per_image = [2 * c["tp"][:, 1] / (2 * c["tp"][:, 1] + c["fp"][:, 1] + c["fn"][:, 1]) for c in (a, b)]
    values = (per_image[0] + per_image[1]) / 2
    reference = stats.bootstrap(
        (values,), np.mean, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
    )
    np.testing.assert_allclose(got["estimate"], values.mean(), rtol=1e-6)
    close(got, reference)
    names, grouped = matched_tables.grouped(["x", "y", "x", "y"], {"tp": np.arange(8).reshape(4, 2)})
    assert names == ["x", "y"] and grouped["tp"].tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    with pytest.raises(ConfigError, match=r"different numbers of runs \(e\.g\. 'y': 1, others 2\)"):
        matched_tables.grouped(["x", "y", "x"], {"tp": np.zeros((3, 2))})


def test_the_paired_difference_draws_the_same_images_for_both_runs():
    """`versus`: the interval of (this run's Dice - the other's) with images drawn together, as
    scipy's paired bootstrap of that difference; much narrower than the runs' own intervals when
    the runs agree on which images are hard. A run against itself differs by exactly 0."""
    a = random_counts(2)
    b = {k: v.copy() for k, v in a.items()}
    b["tp"][:, 1] += 5  # the other run finds 5 more pixels of `a` per image
    b["fn"][:, 1] -= 5
    cfg = eval_cfg("dataset")
    got = intervals.bootstrap(a, cfg, CLASSES, ["val/dice/a"], resamples=20_000, versus=b)["val/dice/a"]

    def difference(tp, fp, fn, tp2, fp2, fn2, axis=-1):
        return dice(tp, fp, fn, axis) - dice(tp2, fp2, fn2, axis)

    arrays = [x[:, 1] for x in (a["tp"], a["fp"], a["fn"], b["tp"], b["fp"], b["fn"])]
    reference = stats.bootstrap(
        arrays, difference, paired=True, vectorized=True, n_resamples=20_000, method="percentile", random_state=1
    )
    np.testing.assert_allclose(got["estimate"], difference(*arrays), rtol=1e-5)
    close(got, reference, 0.1)
    assert got["high"] < 0  # the other run is better on every resample
    alone = intervals.bootstrap(a, cfg, CLASSES, ["val/dice/a"], resamples=2000)["val/dice/a"]
    assert got["high"] - got["low"] < 0.2 * (alone["high"] - alone["low"])
    same = intervals.bootstrap(a, cfg, CLASSES, ["val/dice/a"], resamples=500, versus=a)["val/dice/a"]
    assert (same["estimate"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    assert got["p"] == pytest.approx(2 / 20_001)  # no resample on the other side of 0: the smallest p of 20000
    head, rule, row = intervals.markdown({"val/dice/a": got}, 30, 0.95, versus="b").splitlines()  # the CLI's table
    assert head == "| key | difference (this run - b) | 95% interval | p (two-sided) | images | undefined resamples |"
    assert rule.count("---") == 6 and row.endswith(f"| {got['p']:.2g} | 30 | 0 |")


def test_the_p_value_of_a_paired_difference_is_the_exact_permutation_probability():
    """On four images the paired permutation test has 2**4 equally likely swaps of the runs'
    counts image by image: enumerated by hand, twice the smaller share of swapped differences at
    or beyond the observed one is the p (exact: 16 swaps <= the resamples asked). On 30 images it
    is scipy's randomized permutation test within Monte Carlo error, and with seeds an image's
    rows are swapped together (as the images' counts summed over seeds)."""
    tp_a, tp_b = np.array([50, 80, 120, 60]), np.array([58, 85, 128, 55])  # b better on three images, worse on one
    fp, fn = np.array([10, 20, 5, 30]), np.array([40, 30, 20, 25])
    a = {"tp": np.stack([900 - tp_a, tp_a, tp_a], 1), "fp": np.stack([fn, fp, fp], 1), "fn": np.stack([fp, fn, fn], 1)}
    b = {"tp": np.stack([900 - tp_b, tp_b, tp_b], 1), "fp": a["fp"], "fn": a["fn"] + (tp_a - tp_b)[:, None]}
    for c in (a, b):
        c["tn"] = 1000 - c["tp"] - c["fp"] - c["fn"]
    observed = dice(b["tp"][:, 1], b["fp"][:, 1], b["fn"][:, 1]) - dice(a["tp"][:, 1], a["fp"][:, 1], a["fn"][:, 1])
    swapped = []
    for mask in range(16):
        s = np.array([(mask >> i) & 1 for i in range(4)], bool)
        x, y = (
            {k: np.where(s, second[k][:, 1], first[k][:, 1]) for k in ("tp", "fp", "fn")}
            for first, second in ((b, a), (a, b))
        )
        swapped.append(dice(x["tp"], x["fp"], x["fn"]) - dice(y["tp"], y["fp"], y["fn"]))
    swapped = np.array(swapped)
    exact = min(1.0, 2 * min(np.mean(swapped <= observed + 1e-12), np.mean(swapped >= observed - 1e-12)))
    assert 0.1 < exact < 1  # 6 of the 16 swaps as far out on either side: 0.375
    got = intervals.bootstrap(b, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000, versus=a)
    assert got["val/dice/a"]["p"] == pytest.approx(exact, abs=1e-9)

    def difference(x, y, axis=-1):  # [..., 3, N]: tp, fp, fn of each image
        return dice(x[..., 0, :], x[..., 1, :], x[..., 2, :], axis) - dice(
            y[..., 0, :], y[..., 1, :], y[..., 2, :], axis
        )

    mine, theirs = random_counts(3), random_counts(3)
    theirs["tp"][:, 1] += np.random.default_rng(0).integers(-5, 7, 30)  # slightly better, not everywhere
    arrays = [np.stack([c[k][:, 1] for k in ("tp", "fp", "fn")], 1) for c in (theirs, mine)]  # [N, 3]
    reference = stats.permutation_test(
        arrays, difference, permutation_type="samples", vectorized=True, n_resamples=20_000, random_state=1, axis=0
    )
    got = intervals.bootstrap(theirs, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=20_000, versus=mine)
    assert 0.05 < reference.pvalue < 0.5 and got["val/dice/a"]["p"] == pytest.approx(reference.pvalue, abs=0.015)
    # two seeds of each image ([N, 2, C]): its rows swapped together, as its counts summed over seeds
    seeds = [{k: np.stack([c[k], c[k][::-1]], 1) for k in c} for c in (theirs, mine)]
    summed = [{k: v.sum(axis=1) for k, v in c.items()} for c in seeds]
    p_seeds, p_summed = (
        intervals.bootstrap(x, eval_cfg("dataset"), CLASSES, ["val/dice/a"], resamples=4000, versus=y)["val/dice/a"][
            "p"
        ]
        for x, y in (seeds, summed)
    )
    assert p_seeds == pytest.approx(p_summed, abs=1e-9)  # the same random swaps of the same images


def test_one_image_an_absent_class_and_bad_arguments():
    """One image: every resample is that image, which says nothing about other images: no
    interval and no p (it was the score itself, and p its floor, before session 39). A class
    absent from some images is undefined (NaN) in resamples drawing only those, and counted."""
    c = {k: v[:1] for k, v in random_counts(3).items()}
    other = {k: v[1:2] for k, v in random_counts(3).items()}
    got = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/miou"], resamples=100, versus=other)["val/miou"]
    assert np.isnan([got["low"], got["high"], got["p"]]).all() and np.isfinite(got["estimate"])
    two = {k: v[:2] for k, v in random_counts(3).items()}
    got = intervals.bootstrap(two, eval_cfg("dataset"), CLASSES, ["val/miou"], resamples=100)["val/miou"]
    assert got["low"] < got["high"]
    c = random_counts(4, n=3)
    c["fn"][1:, 2] = c["tp"][1:, 2] = c["fp"][1:, 2] = 0  # class b only in image 0
    got = intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, ["val/dice/b"], resamples=3000)["val/dice/b"]
    assert 3000 * (2 / 3) ** 3 * 0.8 < got["undefined"] < 3000 * (2 / 3) ** 3 * 1.2  # drew images 1, 2 only
    for kwargs, message in (
        (dict(keys=["val/pq"]), r"\[.val/pq.\]: not a score of these per-image counts"),
        (dict(keys=["val/mbiou"]), r"\[.val/mbiou.\]: not a score of these per-image counts"),  # no bands
        (dict(keys=["val/miou"], level=95), r"--level=95: a confidence level in \(0, 1\)"),
        (dict(keys=["val/miou"], resamples=0), "--resamples=0: at least 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            intervals.bootstrap(c, eval_cfg("dataset"), CLASSES, **kwargs)


def test_cli_on_a_run_gives_its_own_scores_and_refuses_what_it_cannot_pair(tiny_config, tmp_path, capsys):
    """On a trained run the estimates are the run's metrics.json scores (and training printed
    their intervals under its results, `eval.interval_resamples`); against itself the difference
    is 0; a run scored on other images, an existing --out and a missing table are one-line errors."""
    from segjax import rescore, train

    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    tiny_config.eval.interval_resamples = 300
    tiny_config.train.best_metric = "val/dice/tool"  # the score the run is judged by: printed too
    run = tmp_path / "run"
    result = train.train_and_evaluate(tiny_config, str(run))
    printed = capsys.readouterr().out
    names, classes, counts, cfg = matched_tables.load([str(run)], intervals.DEFAULT_TABLE)
    printed_keys = ["val/miou", "val/accuracy", "val/mbiou", "val/dice/tool"]
    bounds = intervals.bootstrap(counts, cfg, classes, printed_keys, resamples=300)
    cells = [f"{k[4:]} [{bounds[k]['low']:.4f}, {bounds[k]['high']:.4f}]" for k in bounds]
    assert "95% intervals over the 12 validation images (300 bootstrap resamples; " in printed
    assert ", ".join(cells) in printed and bounds["val/miou"]["low"] <= result["val/miou"] <= bounds["val/miou"]["high"]
    saved = json.loads((run / "intervals.json").read_text())  # what was printed, kept beside metrics.json
    assert list(saved["intervals"]) == printed_keys and saved["split"] == "validation"
    assert all(saved["intervals"][k][end] == bounds[k][end] for k in bounds for end in ("low", "high"))
    rescore.evaluate_checkpoint(tiny_config, str(run), "latest")  # its own table: the same images' counts
    assert ", ".join(cells) in capsys.readouterr().out
    assert json.loads((run / "eval_latest_intervals.json").read_text())["intervals"] == saved["intervals"]
    tiny_config.eval.interval_resamples = 0  # a rescoring without intervals keeps the earlier one's file
    rescore.evaluate_checkpoint(tiny_config, str(run), "latest")
    assert not (run / "eval_latest_intervals.json").exists()
    assert json.loads((run / "eval_latest_intervals.1.json").read_text()) == {
        **saved,
        "table": "eval_latest_per_image.csv",
    }
    out = tmp_path / "ci.json"
    keys = printed_keys  # boundary IoU from the table's bands
    command = [sys.executable, "-m", "segjax.intervals", str(run), f"--keys={','.join(keys)}", "--resamples=300"]
    command.append("--average=dataset")  # the run's own
    done = subprocess.run([*command, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["images"] == tiny_config.data.synthetic.num_val and record["resamples"] == 300
    assert record == {k: v for k, v in saved.items() if k != "split"}  # the run's file is the CLI's record
    for key in keys:
        r = record["intervals"][key]
        assert r["estimate"] == pytest.approx(result[key], rel=1e-6) and r["low"] <= r["high"]
        assert f"| {key} | {r['estimate']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] |" in done.stdout
    assert len(names) == len(set(names)) == record["images"]
    same = intervals.bootstrap(counts, cfg, classes, ["val/miou"], resamples=50, versus=counts)["val/miou"]
    assert same["estimate"] == same["low"] == same["high"] == 0.0
    with open(run / intervals.DEFAULT_TABLE, newline="", encoding="utf-8") as f:  # the table's own IoU cells
        iou = np.array([[float(r[f"iou/{c}"] or "nan") for c in classes] for r in csv.DictReader(f)])
    cfg.average = "per_image"  # as --average=per_image: each image's IoU, then the means
    per_image = intervals.bootstrap(counts, cfg, classes, ["val/miou"], resamples=50)["val/miou"]
    assert per_image["estimate"] == pytest.approx(np.nanmean(np.nanmean(iou, axis=0)), rel=1e-5)
    other = shutil.copytree(run, tmp_path / "other")
    with open(other / intervals.DEFAULT_TABLE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[0]["name"] = "not_in_the_split"
    write_rows(other / intervals.DEFAULT_TABLE, rows)
    done = subprocess.run([*command, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "exists; choose another file" in done.stderr and "Traceback" not in done.stderr
    other_names, _, other_counts, _ = matched_tables.load([str(other)], intervals.DEFAULT_TABLE)
    with pytest.raises(ConfigError, match=r"were scored on other images \(e\.g\. \['0', 'not_in_the_split'\]\)"):
        matched_tables.paired_counts(names, other_names, other_counts, str(run), str(other))
    with pytest.raises(ConfigError, match=r"has no per-image table eval_best_per_image\.csv"):
        matched_tables.load([str(run)], "eval_best_per_image.csv")
    # the folds of a cross-validation: each run scored other images; together they are the split
    folds = [shutil.copytree(run, tmp_path / f"fold{k}") for k in range(2)]
    rows[0]["name"] = names[0]
    half = len(rows) // 2
    for fold, part in zip(folds, (rows[:half], rows[half:]), strict=True):
        write_rows(fold / intervals.DEFAULT_TABLE, part)
    fold_names, _, fold_counts, _ = matched_tables.load([str(f) for f in folds], intervals.DEFAULT_TABLE)
    assert fold_names == names and all((fold_counts[k] == counts[k]).all() for k in counts)
    # two seeds of the split (copies here): each image's two rows drawn together; the same scores
    seed_names, _, seeds, _ = matched_tables.load([str(run), str(folds[0]), str(folds[1])], intervals.DEFAULT_TABLE)
    assert seed_names == names and seeds["tp"].shape == (len(names), 2, len(classes))
    assert all((seeds[k] == np.stack([counts[k], counts[k]], 1)).all() for k in counts)
    both = intervals.bootstrap(seeds, cfg, classes, ["val/miou"], resamples=50)["val/miou"]
    assert both["estimate"] == pytest.approx(per_image["estimate"], rel=1e-6)
    # a K-seed run (`train.num_seeds`): one config.json and dataset.json, each replica's table in
    # seed_<s>/: its seeds, as above (images named by index: matched by the run's one dataset)
    vmapped = tmp_path / "vmapped"
    for s, part in ((10, rows[half:] + rows[:half]), (9, rows)):
        (vmapped / f"seed_{s}").mkdir(parents=True)
        write_rows(vmapped / f"seed_{s}" / intervals.DEFAULT_TABLE, part)
    for name in ("config.json", "dataset.json"):
        shutil.copy(run / name, vmapped / name)
    assert matched_tables.replica_tables(str(vmapped), intervals.DEFAULT_TABLE) == [
        str(vmapped / f"seed_{s}" / intervals.DEFAULT_TABLE) for s in (9, 10)
    ]
    replica_names, _, replicas, _ = matched_tables.load([str(vmapped)], intervals.DEFAULT_TABLE)
    assert replica_names == names and all((replicas[k] == seeds[k]).all() for k in counts)
    with pytest.raises(ConfigError, match=rf"images are in different numbers of runs \(e\.g\. '{names[half]}': 1, "):
        matched_tables.load([str(folds[0]), str(run)], intervals.DEFAULT_TABLE)  # fold 1's half missing
    (folds[1] / "dataset.json").unlink()  # images named by index only: the same images only in one dataset
    with pytest.raises(ConfigError, match="names its images by index only, and the runs did not all read one"):
        matched_tables.load([str(run), str(folds[1])], intervals.DEFAULT_TABLE)
    with pytest.raises(ConfigError, match="names its images by index only"):  # --versus: matched by name too
        matched_tables.load([str(run)], intervals.DEFAULT_TABLE, paired_with=[str(folds[1])])
    assert matched_tables.load([str(run)], intervals.DEFAULT_TABLE, paired_with=[str(folds[0])])[0] == names
    with pytest.raises(ConfigError, match="is given more than once"):
        matched_tables.load([str(run), str(tmp_path / "." / "run")], intervals.DEFAULT_TABLE)
    saved = json.loads((folds[1] / "config.json").read_text())
    saved["eval"]["average"] = "micro"
    (folds[1] / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"differ in their eval\.average/empty/include_background"):
        matched_tables.load([str(f) for f in folds], intervals.DEFAULT_TABLE)


def write_rows(path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_cli_groups_bound_each_group_s_images_alone(tmp_path):
    """--groups: the same paired bootstrap over each group's images alone (a dataset's imaging
    modalities: where a model wins and where it does not), as scipy's over those rows; the
    whole split's table stays; an image the groups file does not name is a one-line error."""
    names = [f"img{i:02d}" for i in range(30)]
    runs = {"mine": random_counts(2), "other": random_counts(3)}
    for run, c in runs.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.json").write_text(json.dumps({"eval": dict(eval_cfg("dataset"))}))
        rows = [{"index": i, "name": n} for i, n in enumerate(names)]
        for i, row in enumerate(rows):
            row.update({f"{k}/{cls}": int(c[k][i, j]) for k in scoring.COUNT_KINDS for j, cls in enumerate(CLASSES)})
        write_rows(tmp_path / run / intervals.DEFAULT_TABLE, rows)
    stratum = ["fluo"] * 12 + ["he"] * 17 + ["one"]
    write_rows(tmp_path / "index.csv", [{"id": n, "stratum": s} for n, s in zip(names, stratum, strict=True)])
    out = tmp_path / "ci.json"
    command = [sys.executable, "-m", "segjax.intervals", str(tmp_path / "mine"), f"--versus={tmp_path / 'other'}"]
    command += ["--keys=val/dice/a", f"--groups={tmp_path / 'index.csv'}", "--group_by=stratum", f"--out={out}"]
    done = subprocess.run([*command, "--resamples=20000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    assert record["group_by"] == "stratum" and record["images"] == 30
    alone = record["groups"]["one"]  # one image: no interval and no p (null, not NaN, in the file)
    assert alone["images"] == 1 and alone["intervals"]["val/dice/a"]["low"] is None
    assert alone["intervals"]["val/dice/a"]["p"] is None and isinstance(
        alone["intervals"]["val/dice/a"]["estimate"], float
    )
    for group, rows in (("fluo", slice(0, 12)), ("he", slice(12, 29))):
        got = record["groups"][group]
        assert got["images"] == rows.stop - rows.start and f"stratum = {group}:" in done.stdout
        a, b = ((c["tp"][rows, 1], c["fp"][rows, 1], c["fn"][rows, 1]) for c in runs.values())
        reference = stats.bootstrap(
            (*a, *b),
            lambda *x, axis=-1: dice(*x[:3], axis=axis) - dice(*x[3:], axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=20_000,
            method="percentile",
            random_state=1,
        )
        bounds = got["intervals"]["val/dice/a"]
        assert bounds["estimate"] == pytest.approx(dice(*a) - dice(*b), abs=1e-6)  # float32 scores
        close(bounds, reference)
        permuted = stats.permutation_test(
            [np.stack(x, 1) for x in (a, b)],
            lambda x, y, axis: dice(*np.moveaxis(x, -2, 0)) - dice(*np.moveaxis(y, -2, 0)),
            permutation_type="samples",
            vectorized=True,
            n_resamples=20_000,
            random_state=1,
            axis=0,
        )
        # 12 images: all 4096 swaps (exact, as scipy's); 17: 20000 random ones each
        assert bounds["p"] == pytest.approx(permuted.pvalue, abs=1e-9 if group == "fluo" else 0.02)
    # Holm over the two groups with a p (by hand: the smaller p doubled, the larger at least that)
    small, large = sorted(record["groups"][g]["intervals"]["val/dice/a"]["p"] for g in ("fluo", "he"))
    adjusted = sorted(record["groups"][g]["intervals"]["val/dice/a"]["p_holm"] for g in ("fluo", "he"))
    assert adjusted == pytest.approx([min(1, 2 * small), max(min(1, 2 * small), large)])
    assert "p_holm" not in alone["intervals"]["val/dice/a"] and "p_holm" not in record["intervals"]["val/dice/a"]
    # the two groups with a p; not on the whole split's table nor the one-image group's (no p)
    assert done.stdout.count("p (two-sided) (Holm over the groups) |") == 2
    assert record["intervals"]["val/dice/a"]["estimate"] == pytest.approx(
        dice(*(c[k][:, 1] for k in ("tp", "fp", "fn") for c in [runs["mine"]]))
        - dice(*(c[k][:, 1] for k in ("tp", "fp", "fn") for c in [runs["other"]])),
        abs=1e-6,
    )
    write_rows(tmp_path / "index.csv", [{"id": n, "stratum": "x"} for n in names[:-1]])
    with pytest.raises(ConfigError, match=r"has no 'id' row for the images \['img29'\] \(1 in all\)"):
        matched_tables.image_groups(names, str(tmp_path / "index.csv"), "stratum")
    with pytest.raises(ConfigError, match=r"has columns \['id', 'stratum'\]; no 'id' or 'modality'"):
        matched_tables.image_groups(names, str(tmp_path / "index.csv"), "modality")
    done = subprocess.run([*command[:-3], "--group_by=stratum"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--groups and --group_by go together" in done.stderr
