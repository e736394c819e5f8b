"""Paired comparison of study variants: differences by seed, t intervals and p-values."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from segjax import compare


def _rows(variant, values, seeds=None):
    return [
        {"variant": variant, "seed": s, "val/miou": v} for s, v in zip(seeds or range(len(values)), values, strict=True)
    ]


def test_paired_difference_interval_and_p_match_hand_computed_values():
    rows = _rows("ref", [0.5, 0.6, 0.7]) + _rows("b", [0.6, 0.8, 1.0])  # differences 0.1, 0.2, 0.3
    (b,) = compare.paired(rows, ["val/miou"], "ref")
    assert b["variant"] == "b" and b["val/miou_n"] == 3
    assert b["val/miou"] == pytest.approx(0.2)
    # sd of the differences 0.1, so the standard error 0.1 / sqrt(3); t(0.975, df 2) = 4.303 (tables)
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert b["val/miou_low"] == pytest.approx(0.2 - half, abs=1e-4)
    assert b["val/miou_high"] == pytest.approx(0.2 + half, abs=1e-4)
    # t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3; with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2)
    t = 2 * math.sqrt(3)
    assert b["val/miou_p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert b["val/miou_p"] == pytest.approx(stats.ttest_rel([0.6, 0.8, 1.0], [0.5, 0.6, 0.7]).pvalue, rel=1e-9)


def test_pairs_are_the_seeds_both_finished():
    rows = _rows("ref", [0.5, 0.6, 0.7]) + _rows("c", [0.9, 0.65, 0.8], seeds=[1, 2, 5])  # seed 5: no reference
    (c,) = compare.paired(rows, ["val/miou"], "ref")
    assert c["val/miou_n"] == 2 and c["val/miou"] == pytest.approx(((0.9 - 0.6) + (0.65 - 0.7)) / 2)
    rows = _rows("ref", [0.5]) + _rows("d", [0.6])  # one pair: a difference, no interval
    (d,) = compare.paired(rows, ["val/miou"], "ref")
    assert d["val/miou"] == pytest.approx(0.1) and math.isnan(d["val/miou_p"]) and math.isnan(d["val/miou_low"])
    table = compare.markdown([d], ["val/miou"], "ref")
    assert table.splitlines()[0] == "| variant - ref | val/miou |" and "| d | +0.1000 (n=1) |" in table


def test_constant_differences_and_missing_keys():
    rows = _rows("ref", [0.5, 0.25, 0.75]) + _rows("e", [0.625, 0.375, 0.875])  # always +0.125 (exact in binary)
    (e,) = compare.paired(rows, ["val/miou", "val/pq"], "ref")
    assert e["val/miou_p"] == 0.0 and e["val/miou_low"] == 0.125 == e["val/miou_high"]
    assert e["val/pq_n"] == 0 and math.isnan(e["val/pq"])  # a key no run computed
    table = compare.markdown([e], ["val/miou", "val/pq"], "ref")
    assert "| e | +0.1250 [+0.1250, +0.1250] p=0 (Holm 0, n=3) | n/a |" in table
    with pytest.raises(KeyError, match=r"reference variant 'unet' has no finished run; the runs are of \['ref', 'e'\]"):
        compare.paired(rows, ["val/miou"], "unet")


def test_holm_adjustment_matches_hand_computed_values():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the 0.06 before it; NaN left out of m
    assert compare.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(compare.holm([0.01, 0.04, 0.03, math.nan])[3])
    assert compare.holm([0.5, 0.6]) == [1.0, 1.0]  # at most 1
    rows = _rows("ref", [0.5, 0.6, 0.7]) + _rows("b", [0.6, 0.8, 1.0]) + _rows("c", [0.5, 0.62, 0.69])
    b, c = compare.paired(rows, ["val/miou"], "ref")
    low, high = sorted((b["val/miou_p"], c["val/miou_p"]))
    assert sorted((b["val/miou_p_holm"], c["val/miou_p_holm"])) == pytest.approx([2 * low, max(2 * low, high)])
