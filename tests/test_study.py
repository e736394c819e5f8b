"""Ablation studies: variants x seeds, resume by skipping finished runs, mean +- std tables."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats

from segjax import configuration, scoring, study, study_tables, workdirs
from segjax.errors import ConfigError, WorkdirError
from tests.conftest import ROOT, load_config


def tiny_study(tmp_path, variants: dict, tfds_dir: str = "") -> list[str]:
    """A study file of configs/tiny.py (train.seed 0, `data.tfds_dir`) with `variants`; returns
    the study command (without --workdir)."""
    path = tmp_path / "s.py"
    path.write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'configs')!r})\nimport tiny\n"
        "def get_config(arg=None):\n    c = tiny.get_config()\n    c.train.seed = 0\n"
        f"    c.data.tfds_dir = {tfds_dir!r}\n    return c\n"
        f"def get_variants(arg=None):\n    return {variants!r}\n"
    )
    return [sys.executable, "-m", "segjax.study", f"--study={path}"]


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {"variant": "a", "seed": 0, "val/miou": 0.5, "val/mdice": 0.6},
        {"variant": "a", "seed": 1, "val/miou": 0.7, "val/mdice": 0.8},
        {"variant": "a", "seed": 2, "val/miou": 0.9, "val/mdice": 0.7},
        {"variant": "b", "seed": 0, "val/miou": 0.4, "val/mdice": 0.5},
    ]
    summary = study_tables.summarize(rows, keys=("val/miou", "val/mdice"))
    assert [e["variant"] for e in summary] == ["a", "b"] and [e["n"] for e in summary] == [3, 1]
    assert summary[0]["val/miou"] == pytest.approx(0.7)
    assert summary[0]["val/miou_std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9 (hand computed)
    assert summary[0]["val/mdice_std"] == pytest.approx(np.std([0.6, 0.8, 0.7], ddof=1))
    assert summary[1]["val/miou"] == pytest.approx(0.4) and math.isnan(summary[1]["val/miou_std"])
    table = study_tables.markdown(summary, keys=("val/miou", "val/mdice"))
    assert "| a | 3 | 0.7000 ± 0.2000 |" in table and "| b | 1 | 0.4000 |" in table
    # a standard column no run computed is n/a; a key no run has (a typo) is an error naming the keys
    assert math.isnan(study_tables.summarize(rows, keys=("val/mbiou",))[0]["val/mbiou"])
    with pytest.raises(KeyError, match=r"\['val/mious'\] are in none of .*'val/mdice', 'val/miou'"):
        study_tables.summarize(rows, keys=("val/miou", "val/mious"))


def test_pooled_row_is_over_every_run_of_every_variant(tmp_path):
    rows = [{"variant": f"fold{k}", "seed": 0, "val/miou": v} for k, v in enumerate((0.80, 0.84, 0.83, 0.79))]
    summary = study_tables.summarize(rows, keys=("val/miou",), pooled=True)
    assert [e["variant"] for e in summary] == ["fold0", "fold1", "fold2", "fold3", study_tables.POOLED]
    assert summary[-1]["n"] == 4 and summary[-1]["val/miou"] == pytest.approx(0.815)  # (0.80+0.84+0.83+0.79)/4
    assert summary[-1]["val/miou_std"] == pytest.approx(np.std([0.80, 0.84, 0.83, 0.79], ddof=1))
    assert all(math.isnan(e["val/miou_std"]) for e in summary[:-1])  # one run per fold
    folds = ["fold0", "fold1", "fold2", "fold3"]
    assert [e["variant"] for e in study_tables.summarize(rows, keys=("val/miou",))] == folds
    table = study_tables.write_results(str(tmp_path), rows, pooled=True)
    assert table.splitlines()[-1].startswith(f"| {study_tables.POOLED} | 4 | 0.8150 ± ")
    with open(tmp_path / "summary.md", encoding="utf-8") as f:
        assert "over every run of every variant" in f.read()


@pytest.mark.parametrize("average,include_background", [("dataset", True), ("dataset", False), ("micro", True)])
def test_summed_counts_score_every_fold_s_pixels_once(average, include_background):
    """The summed-counts row of a cross-validation equals scikit-learn's scores of all folds'
    pixels put together (each fold's validation images once), not the mean of the folds' scores;
    the runs report their counts as metrics.json does (`val/tp/<class>`, ...)."""
    from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score

    names = ("background", "tool", "berry")
    rng = np.random.default_rng(3)
    truths, preds, rows = [], [], []
    for fold in range(4):
        truth = rng.integers(0, 3, 200 + 50 * fold)
        pred = np.where(rng.random(truth.size) < 0.3 + 0.1 * fold, rng.integers(0, 3, truth.size), truth)
        truths.append(truth), preds.append(pred)
        row = {"variant": f"fold{fold}", "seed": 0}
        for c, name in enumerate(names):
            t, p = truth == c, pred == c
            row.update({f"val/tp/{name}": int(np.sum(t & p)), f"val/fp/{name}": int(np.sum(~t & p))})
            row.update({f"val/fn/{name}": int(np.sum(t & ~p)), f"val/tn/{name}": int(np.sum(~t & ~p))})
        rows.append(row)
    truth, pred = np.concatenate(truths), np.concatenate(preds)
    eval_cfg = load_config("default").eval
    eval_cfg.average, eval_cfg.include_background = average, include_background
    summed = study_tables.summed_counts(rows, eval_cfg, names)
    labels = [0, 1, 2] if include_background else [1, 2]
    assert summed["val/accuracy"] == pytest.approx(accuracy_score(truth, pred), rel=1e-6)
    for key, score in (("iou", jaccard_score), ("dice", f1_score), ("precision", precision_score)):
        per_class = score(truth, pred, average=None, labels=[0, 1, 2])
        for c, name in enumerate(names):
            assert summed[f"val/{key}/{name}"] == pytest.approx(per_class[c], rel=1e-6)
        mean = score(truth, pred, average="micro" if average == "micro" else "macro", labels=labels)
        assert summed[f"val/m{key}"] == pytest.approx(mean, rel=1e-6)
    assert summed["val/recall/tool"] == pytest.approx(recall_score(truth, pred, average=None)[1], rel=1e-6)
    folds_mean = np.mean(
        [jaccard_score(t, p, average="macro", labels=labels) for t, p in zip(truths, preds, strict=True)]
    )
    assert abs(summed["val/miou"] - folds_mean) > 1e-4  # another number than the pooled row's mean
    test_rows = [{k.replace("val/", "test/"): v for k, v in r.items()} for r in rows]
    on_test = study_tables.summed_counts(test_rows, eval_cfg, names, split="test")
    assert on_test["test/miou"] == summed["val/miou"] and "val/miou" not in on_test
    with pytest.raises(KeyError, match="1 of 4 runs report no val/tp/background"):
        study_tables.summed_counts([*rows[:3], {"variant": "old", "seed": 0, "val/miou": 0.5}], eval_cfg, names)
    # instance runs: PQ of every fold's segments together (tool: 3 + 5 matches of IoU 2.4 + 4.1;
    # 1 + 2 false positives, 2 + 0 false negatives; berry: no segment in either fold)
    assert "val/pq" not in summed
    segments = [(3, 1, 2, 2.4), (5, 2, 0, 4.1), (0, 0, 0, 0.0), (0, 0, 0, 0.0)]
    for row, (tp, fp, fn, iou) in zip(rows, segments, strict=True):
        row.update({"val/pq_tp/tool": tp, "val/pq_fp/tool": fp, "val/pq_fn/tool": fn, "val/pq_iou/tool": iou})
        row.update({f"val/pq_{k}/berry": 0 for k in ("tp", "fp", "fn", "iou")})
    summed = study_tables.summed_counts(rows, eval_cfg, names)
    assert summed["val/pq/tool"] == pytest.approx(6.5 / (8 + 3 / 2 + 2 / 2), rel=1e-6)
    assert summed["val/pq"] == summed["val/pq/tool"] and np.isnan(summed["val/pq/berry"])
    assert summed["val/sq"] == pytest.approx(6.5 / 8, rel=1e-6) and summed["val/rq"] == pytest.approx(8 / 10.5)
    assert "val/ap50" not in summed  # no matches per threshold reported (runs scored before they were)
    # and the DSB score of both folds' matches: IoUs 0.62, 0.81, 0.97 (sum 2.4) and 0.7, 0.76, 0.84,
    # 0.88, 0.92 (4.1); at each threshold t, TP_t / (TP_t + FP_t + FN_t) with FP_t = 3 + (8 - TP_t),
    # FN_t = 2 + (8 - TP_t)
    thresholds = np.round(np.arange(0.5, 0.96, 0.05), 2)
    for row, ious in zip(rows, ([0.62, 0.81, 0.97], [0.7, 0.76, 0.84, 0.88, 0.92], [], []), strict=True):
        for t in thresholds:
            row.update(
                {
                    f"val/ap_tp{round(t * 100)}/tool": int(np.sum(np.array(ious) > t)),
                    f"val/ap_tp{round(t * 100)}/berry": 0,
                }
            )
    summed = study_tables.summed_counts(rows, eval_cfg, names)
    matches = np.array([np.sum(np.array([0.62, 0.81, 0.97, 0.7, 0.76, 0.84, 0.88, 0.92]) > t) for t in thresholds])
    assert matches[0] == 8 and matches[-1] == 1
    expected = matches / (matches + 3 + (8 - matches) + 2 + (8 - matches))
    assert summed["val/ap50"] == pytest.approx(8 / 13, rel=1e-6) and summed["val/ap75"] == pytest.approx(expected[5])
    assert summed["val/ap50_95/tool"] == pytest.approx(expected.mean(), rel=1e-6) == summed["val/ap50_95"]
    assert np.isnan(summed["val/ap50_95/berry"])


def test_summed_surface_distances_are_means_over_every_run_s_images(tmp_path):
    """HD95 and NSD of the summed-counts row (under any average) are the means over every image of
    every run's per-image table (defined values only), not the mean of the runs' means; runs
    without tables leave them out."""
    names = ("background", "organ")
    hd = {"f0": ["1.0", "3.0", "inf"], "f1": ["8.0"]}  # an infinite HD95 (organ predicted, absent) is left out
    rows, tables = [], []
    for variant, values in hd.items():
        row = {"variant": variant, "seed": 0, **{f"val/{k}/{n}": 5 for k in ("tp", "fp", "fn", "tn") for n in names}}
        rows.append(row)
        table = [{"index": i, "name": f"{variant}_{i}"} for i in range(len(values))]
        for r, value in zip(table, values, strict=True):
            r.update({f"{k}/{n}": 5 for k in ("tp", "fp", "fn", "tn") for n in names})
            r.update({"hd95/organ": value, "nsd/organ": "0.5" if value != "inf" else ""})
        path = tmp_path / variant / "val_per_image.csv"
        path.parent.mkdir()
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        tables.append(str(path))
    eval_cfg = load_config("default").eval
    summed = study_tables.summed_counts(rows, eval_cfg, names, per_image_tables=tables)
    assert summed["val/hd95/organ"] == pytest.approx(4.0) and summed["val/mhd95"] == pytest.approx(4.0)
    assert summed["val/mnsd"] == pytest.approx(0.5)  # the runs' means of HD95 would give (2 + 8) / 2 = 5
    assert "val/mhd95" not in study_tables.summed_counts(rows, eval_cfg, names, per_image_tables=[])


def test_cli_pooled_writes_the_summed_counts_row(tmp_path):
    """`--pooled` adds the summed-counts row under the mean-of-folds row (boundary IoU from the
    runs' summed bands; n/a where a run reports none); runs without counts get a note saying why
    there is no such row."""
    workdir = tmp_path / "w"
    names = ("background", "tool", "berry", "leaf")
    folds = {"f0": (5, 1, 2), "f1": (3, 3, 0)}  # tp, fp (= fn of another class), fn of class 'tool'
    bands = {"f0": (8, 10, 3, 6), "f1": (4, 6, 1, 4)}  # background's band inter, union; tool's
    for variant, (tp, fp, fn) in folds.items():
        counts = {f"val/{k}/{n}": 0 for k in ("tp", "fp", "fn", "tn", "binter", "bunion") for n in names}
        counts.update({"val/tp/tool": tp, "val/fp/tool": fp, "val/fn/tool": fn, "val/tn/tool": 10})
        counts.update({"val/tp/background": 10, "val/fp/background": fn, "val/fn/background": fp})
        counts["val/tn/background"] = tp
        keys = ("val/binter/background", "val/bunion/background", "val/binter/tool", "val/bunion/tool")
        counts.update(zip(keys, bands[variant], strict=True))
        metrics = {"val/miou": 0.5, "val/mdice": 0.5, "val/accuracy": 0.5, "val/mbiou": 0.5, **counts}
        os.makedirs(workdir / variant / "seed_0")
        (workdir / variant / "seed_0" / "metrics.json").write_text(json.dumps(metrics))
    command = [*tiny_study(tmp_path, {v: {} for v in folds}), f"--workdir={workdir}", "--collect_only", "--seeds=1"]
    done = subprocess.run([*command, "--pooled"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # summed: tool tp 8, fp 4, fn 2 -> IoU 8/14, Dice 16/22; background tp 20, fp 2, fn 4 -> 20/26, 40/46
    # berry and leaf are absent from both (empty='nan'): left out of the means; accuracy (8+20)/34;
    # boundary IoU: background 12/16, tool 4/10 (berry's and leaf's bands empty)
    miou, mdice = (8 / 14 + 20 / 26) / 2, (16 / 22 + 40 / 46) / 2
    row = f"| {study_tables.SUMMED} | 2 | {miou:.4f} | {mdice:.4f} | {28 / 34:.4f} | {(12 / 16 + 4 / 10) / 2:.4f} |"
    with open(workdir / "summary.md", encoding="utf-8") as f:
        text = f.read()
    assert row in text and row in done.stdout and text.index(study_tables.POOLED) < text.index(row)
    assert "every run's pixel counts together (each fold's images once), scored as one run" in text
    assert f"No interval for '{study_tables.SUMMED}': no per-image table {workdir / 'f0' / 'seed_0'}" in text
    metrics = json.loads((workdir / "f1" / "seed_0" / "metrics.json").read_text())
    no_bands = {k: v for k, v in metrics.items() if "/binter/" not in k and "/bunion/" not in k}
    (workdir / "f1" / "seed_0" / "metrics.json").write_text(json.dumps(no_bands))  # scored before bands were
    done = subprocess.run([*command, "--pooled"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert row.rsplit("|", 2)[0] + "| n/a |" in done.stdout
    for variant in folds:
        metrics = json.loads((workdir / variant / "seed_0" / "metrics.json").read_text())
        (workdir / variant / "seed_0" / "metrics.json").write_text(json.dumps({"val/miou": metrics["val/miou"]}))
    done = subprocess.run([*command, "--pooled"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No 'all (summed counts)' row: 2 of 2 runs report no val/tp/background" in done.stdout


def test_cli_pooled_per_image_scores_every_run_s_images_together(tmp_path):
    """With `eval.average='per_image'` (nnU-Net's mean over cases) the summed-counts row averages
    over the images of every run (read from their per-image tables), not over the runs' means,
    with each score's bootstrap interval over those images (`segjax.intervals`' on the same counts)."""
    from segjax import intervals

    workdir = tmp_path / "w"
    names = ("background", "tool", "berry", "leaf")
    images = {"f0": [(4, 1, 0, 5), (2, 0, 2, 6)], "f1": [(0, 0, 0, 9), (3, 3, 1, 1)]}  # tool tp, fp, fn; bg tp
    bands = {"f0": [(3, 4, 1, 2), (2, 4, 0, 1)], "f1": [(1, 1, 0, 0), (2, 5, 1, 3)]}  # bg inter, union; tool's
    for variant, rows in images.items():
        table = []
        for k, (tp, fp, fn, bg) in enumerate(rows):
            row = {"index": k, "name": f"{variant}_{k}"}
            row.update({f"{kind}/{n}": 0 for kind in (*scoring.COUNT_KINDS, "binter", "bunion") for n in names})
            row.update({"tp/tool": tp, "fp/tool": fp, "fn/tool": fn, "tn/tool": bg})
            row.update({"tp/background": bg, "fp/background": fn, "fn/background": fp, "tn/background": tp})
            keys = ("binter/background", "bunion/background", "binter/tool", "bunion/tool")
            row.update(zip(keys, bands[variant][k], strict=True))
            table.append(row)
        os.makedirs(workdir / variant / "seed_0")
        (workdir / variant / "seed_0" / "metrics.json").write_text(json.dumps({"val/miou": 0.5, "val/accuracy": 0.5}))
        with open(workdir / variant / "seed_0" / "val_per_image.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    variants = {v: {"eval.average": "per_image"} for v in images}
    command = [*tiny_study(tmp_path, variants), f"--workdir={workdir}", "--collect_only", "--seeds=1", "--pooled"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # tool IoU per image 4/5, 2/4, absent (left out), 3/7; background 5/6, 6/8, 9/9, 1/5
    tool, background = np.mean([4 / 5, 2 / 4, 3 / 7]), np.mean([5 / 6, 6 / 8, 1.0, 1 / 5])
    accuracy = np.mean([9 / 10, 8 / 10, 9 / 9, 4 / 8])
    dice = (np.mean([8 / 9, 4 / 6, 6 / 10]) + np.mean([10 / 11, 12 / 14, 1.0, 2 / 6])) / 2
    counts = {k: [] for k in (*scoring.COUNT_KINDS, "binter", "bunion")}
    for (tp, fp, fn, bg), (bi, bu, ti, tu) in zip(images["f0"] + images["f1"], bands["f0"] + bands["f1"], strict=True):
        for kind, values in zip(  # classes background, tool, berry, leaf
            counts,
            ([bg, tp, 0, 0], [fn, fp, 0, 0], [fp, fn, 0, 0], [tp, bg, 0, 0], [bi, ti, 0, 0], [bu, tu, 0, 0]),
            strict=True,
        ):
            counts[kind].append(values)
    cfg = ml_collections.ConfigDict({"average": "per_image", "empty": "nan", "include_background": True})
    keys = ["val/miou", "val/mdice", "val/accuracy", "val/mbiou"]
    bounds = intervals.bootstrap({k: np.array(v) for k, v in counts.items()}, cfg, names, keys)
    biou = (8 / 14 + 2 / 6) / 2  # the bands summed over the four images, whatever the average
    cells = [
        f"{m:.4f} [{bounds[k]['low']:.4f}, {bounds[k]['high']:.4f}]"
        for k, m in zip(keys, ((tool + background) / 2, dice, accuracy, biou), strict=True)
    ]
    row = f"| {study_tables.SUMMED} | 2 | " + " | ".join(cells) + " |"
    assert row in done.stdout and "95% percentile-bootstrap interval over its 4 images (10000 resamples;" in done.stdout
    os.remove(workdir / "f1" / "seed_0" / "val_per_image.csv")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No 'all (summed counts)' row: 1 runs have no per-image table" in done.stdout


def test_summary_columns_add_host_side_scores_runs_have_and_asked_keys(tmp_path):
    rows = [
        {"variant": "a", "seed": s, "val/miou": 0.5, "val/mnsd": 0.6 + 0.2 * s, "val/dice/membrane": 0.8}
        for s in (0, 1)
    ]
    # no val/pq, val/ap50_95, val/mhd95 in these runs
    assert study_tables.summary_keys(rows) == (*study_tables.SUMMARY_KEYS, "val/mnsd")
    instance_rows = [{**r, "val/pq": 0.5, "val/ap50_95": 0.3} for r in rows]  # an instance run's: PQ and the DSB's AP
    assert study_tables.summary_keys(instance_rows)[-3:] == ("val/pq", "val/ap50_95", "val/mnsd")
    table = study_tables.write_results(str(tmp_path), rows, ["val/dice/membrane"])
    head = table.splitlines()[0]
    assert head.endswith("| val/mnsd | val/dice/membrane |")
    assert f"| 0.7000 ± {np.std([0.6, 0.8], ddof=1):.4f} | 0.8000 ± 0.0000 |" in table
    with open(tmp_path / "summary.md", encoding="utf-8") as f:
        assert head in f.read()
    with pytest.raises(ConfigError, match=r"\['val/dice/nucleus'\] are in none of the runs' metrics.json"):
        study_tables.write_results(str(tmp_path), rows, ["val/dice/nucleus"])


def test_variant_overrides_are_checked():
    base = load_config("tiny")
    config = study.variant_config(base, {"model.skips": "none", "model.depth": 3}, "x")
    assert config.model.skips == "none" and config.model.depth == 3 and base.model.depth == 2
    with pytest.raises(ConfigError, match=r"variant 'bad': unknown config key model\.skip"):
        study.variant_config(base, {"model.skip": "none"}, "bad")
    with pytest.raises(ConfigError, match="has type str"):
        study.variant_config(base, {"model.depth": "three"}, "bad")


def test_study_runs_variants_and_seeds_then_skips_finished_runs(tfds_dir, tmp_path):
    base = load_config("tiny")
    base.data.tfds_dir = tfds_dir
    base.train.steps, base.train.log_every, base.train.checkpoint_every, base.eval.every = 2, 2, 2, 2
    variants = {"unet": {}, "no_skips": {"model.skips": "none"}}
    workdir = str(tmp_path / "study")
    rows = study.run_study(base, variants, [0, 1], workdir)
    assert [(r["variant"], r["seed"]) for r in rows] == [("unet", 0), ("unet", 1), ("no_skips", 0), ("no_skips", 1)]
    with open(os.path.join(workdir, "no_skips", "seed_1", "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["model"]["skips"] == "none" and saved["train"]["seed"] == 1
    assert rows[0]["val/miou"] != rows[1]["val/miou"]  # different seeds, different runs
    table = study_tables.write_results(workdir, rows)
    mean = np.mean([rows[0]["val/miou"], rows[1]["val/miou"]])
    assert f"| unet | 2 | {mean:.4f} ±" in table
    with open(os.path.join(workdir, "runs.csv"), newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 4
    stamp = os.path.getmtime(os.path.join(workdir, "unet", "seed_0", "metrics.json"))
    again = study.run_study(base, variants, [0, 1], workdir)  # finished runs are skipped
    assert os.path.getmtime(os.path.join(workdir, "unet", "seed_0", "metrics.json")) == stamp
    assert [r["val/miou"] for r in again] == [r["val/miou"] for r in rows]
    # the study file changed one variant: its finished runs would report the old config's numbers
    # under the variant's name, so the study refuses before training anything (a new variant too)
    changed = {"new": {"model.base_features": 4}, **variants, "no_skips": {"model.skips": "none", "optim.lr": 0.01}}
    with pytest.raises(WorkdirError, match=r"variant 'no_skips' now gives \(differs in: optim\.lr\)"):
        study.run_study(base, changed, [0, 1], workdir)
    assert not os.path.exists(os.path.join(workdir, "new"))
    assert os.path.getmtime(os.path.join(workdir, "unet", "seed_0", "metrics.json")) == stamp


def test_study_processes_share_the_work(tfds_dir, tmp_path):
    """The same study started twice: a run the other process is training (its workdir lock held)
    is skipped, not trained a second time in the same folder; a later pass trains it."""
    base = load_config("tiny")
    base.data.tfds_dir = tfds_dir
    base.train.steps, base.train.log_every, base.train.checkpoint_every, base.eval.every = 2, 2, 2, 2
    workdir = str(tmp_path / "study")
    with workdirs.lock(os.path.join(workdir, "unet", "seed_0")):  # the other process's run
        rows = study.run_study(base, {"unet": {}}, [0, 1], workdir)
    assert [(r["variant"], r["seed"]) for r in rows] == [("unet", 1)]
    assert not os.path.exists(os.path.join(workdir, "unet", "seed_0", "config.json"))
    rows = study.run_study(base, {"unet": {}}, [0, 1], workdir)
    assert [(r["variant"], r["seed"]) for r in rows] == [("unet", 0), ("unet", 1)]


def test_a_preempted_run_stops_the_study(tmp_path, monkeypatch):
    """SIGTERM during a study's run: that run saves its step and the study stops there. It used
    to start the next run, which trained until the scheduler killed the job without a checkpoint."""
    from segjax import train

    started = []

    def preempted(config, run_dir):
        started.append(os.path.relpath(run_dir, tmp_path))
        return {"step": 3, "preempted": True}

    monkeypatch.setattr(train, "train_and_evaluate", preempted)
    rows = study.run_study(load_config("tiny"), {"a": {}, "b": {"model.skips": "none"}}, [0, 1], str(tmp_path))
    assert started == [os.path.join("a", "seed_0")] and rows == []


@pytest.mark.slow  # a study through the CLI, run twice (~19 s warm); CI runs it
def test_a_run_that_diverges_is_recorded_and_the_study_goes_on(tfds_dir, tmp_path):
    """A variant whose loss turns NaN (lr 1e30) used to end the whole study with its error, and a
    rerun diverged again at the same step, so later runs never trained. Now the run records
    failed.json, the next run trains, summary.md lists it, and a rerun does not retry it."""
    command = [
        *tiny_study(tmp_path, {"diverges": {"optim.lr": 1e30}, "ok": {}}, tfds_dir),
        f"--workdir={tmp_path / 'w'}",
        "--seeds=1",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # was 2: "error: non-finite loss/gradient at step 2"
    failed = tmp_path / "w" / "diverges" / "seed_0" / "failed.json"
    error = json.loads(failed.read_text())["error"]
    assert error.startswith("non-finite loss/gradient at step ") and "loss=nan" in error
    assert (tmp_path / "w" / "ok" / "seed_0" / "metrics.json").exists()  # trained after the divergence
    summary = (tmp_path / "w" / "summary.md").read_text()
    assert "| ok | 1 |" in summary and "| diverges |" not in summary
    assert f"- `{os.path.join('diverges', 'seed_0')}`: {error.split('; ')[0]}" in summary
    assert "1 finished runs" in done.stdout and "1 diverged" in done.stdout
    stamp = failed.stat().st_mtime_ns
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "diverged earlier, skipping" in again.stderr, again.stderr[-3000:]
    assert failed.stat().st_mtime_ns == stamp
    assert not workdirs.saved_nothing(str(failed.parent))  # an edited variant's config is refused there


def test_summary_keys_no_variant_gives_are_refused_before_training(tmp_path):
    base = load_config("tiny")
    thing = base.data.class_names[1]
    variants = {"a": {}, "b": {"model.skips": "none"}}
    study.check_summary_keys(base, variants, [f"val/dice/{thing}", "val/mbiou", "train/loss", "flops"])
    with pytest.raises(ConfigError, match=rf"\['val/dice/{thing}x'\]: no variant's validation gives them"):
        study.check_summary_keys(base, variants, [f"val/dice/{thing}x"])
    # instance scores are named by the first evaluation: a variant with instances on lets val/ keys pass
    study.check_summary_keys(base, {**variants, "c": {"instances.enabled": True}}, ["val/pq"])
    command = [*tiny_study(tmp_path, {"a": {}}), f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run(
        [*command, "--summary_keys=val/dice/tol"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "no variant's validation gives them" in done.stderr, done.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w" / "a")  # nothing trained


def test_cli_compares_variants_paired_by_seed(tmp_path):
    """--compare_to=a writes comparison.md: b minus a, paired by seed (the hand-checked numbers of
    tests/test_compare.py); a reference that is not a variant is refused before anything runs."""
    workdir = tmp_path / "w"
    for variant, values in (("a", (0.5, 0.6, 0.7)), ("b", (0.6, 0.8, 1.0))):
        for seed, value in enumerate(values):
            os.makedirs(workdir / variant / f"seed_{seed}")
            (workdir / variant / f"seed_{seed}" / "metrics.json").write_text(json.dumps({"val/miou": value}))
            made = {"git": {"commit": ("a" if variant == "a" or seed == 0 else "b") * 40, "dirty": False}}
            made["packages"] = {"jax": "0.10.2"}
            (workdir / variant / f"seed_{seed}" / "environment.jsonl").write_text(json.dumps(made) + "\n")
    command = [*tiny_study(tmp_path, {"a": {}, "b": {"model.skips": "none"}}), f"--workdir={workdir}", "--collect_only"]
    done = subprocess.run([*command, "--compare_to=a"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(workdir / "comparison.md", encoding="utf-8") as f:
        text = f.read()
    row = "| b | +0.2000 [-0.0484, +0.4484] p=0.074 (Holm 0.074, n=3) |"  # one variant: Holm's p is p
    assert "| variant - a | val/miou |" in text and row in text and row in done.stdout
    # b's seeds 1 and 2 were made by another commit: the summary says so, counting the runs per code
    mixed = (
        "different code or software (commit aaaaaaaaaaaa, jax 0.10.2: 4 runs; commit bbbbbbbbbbbb, jax 0.10.2: 2 runs)"
    )
    assert mixed in done.stdout and mixed in (workdir / "summary.md").read_text(encoding="utf-8")
    assert f"No comparison on the same images: no per-image table {workdir / 'a' / 'seed_0'}" in text
    done = subprocess.run([*command, "--compare_to=c"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--compare_to='c' is not a variant of this study: ['a', 'b']" in done.stderr


def tool_runs(workdir, images: list[str]) -> dict:
    """Variants a, b (6 more tool pixels found on every image) and c (a copy of a), two seeds each,
    of per-image tables only (classes background, tool, berry, leaf); returns the tool's
    (tp, fp, fn) per (variant, seed) of a and b."""
    names, rng = ("background", "tool", "berry", "leaf"), np.random.default_rng(7)
    hard = rng.integers(0, 60, len(images))  # missed pixels both variants share: hard images
    tool = {}
    for variant, better in (("a", 0), ("b", 6)):
        for seed in (0, 1):
            tp = rng.integers(100, 200, len(images)) + better
            fp, fn = rng.integers(0, 30, len(images)), hard + rng.integers(0, 10, len(images))
            tool[variant, seed] = (tp, fp, fn)
            run = workdir / variant / f"seed_{seed}"
            os.makedirs(run)
            (run / "metrics.json").write_text(json.dumps({"val/miou": 0.5, "val/dice/tool": 0.5}))
            with open(run / "val_per_image.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["index", "name", *(f"{k}/{n}" for k in scoring.COUNT_KINDS for n in names)])
                for i, name in enumerate(images):
                    counts = {(k, n): 5 for k in scoring.COUNT_KINDS for n in names}
                    counts.update({("tp", "tool"): tp[i], ("fp", "tool"): fp[i], ("fn", "tool"): fn[i]})
                    writer.writerow([i, name, *(counts[k, n] for k in scoring.COUNT_KINDS for n in names)])
    shutil.copytree(workdir / "a", workdir / "c")  # a variant the same as the reference
    return tool


def dice_difference(*arrays, axis=-1):
    """Dice of (tp, fp, fn) summed over images, of the first three arrays minus the last three's."""

    def dice(tp, fp, fn):
        return 2 * tp.sum(axis) / (2 * tp.sum(axis) + fp.sum(axis) + fn.sum(axis))

    return dice(*arrays[:3]) - dice(*arrays[3:])


def paired_bootstrap(mine, reference):
    """scipy's paired percentile bootstrap of `dice_difference` over the images, 10000 resamples."""
    return stats.bootstrap(
        [*mine, *reference],
        dice_difference,
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        random_state=1,
    )


def test_cli_compares_variants_on_the_same_images(tmp_path):
    """With per-image tables, comparison.md also gives each variant minus the reference on the
    same images: the Dice of every seed's counts together, with the interval of scipy's paired
    percentile bootstrap over the images (each image's counts summed over its two seeds) - an
    interval even where one seed per variant gives none over seeds."""
    workdir, images = tmp_path / "w", [f"img{i:02d}" for i in range(40)]
    tool = tool_runs(workdir, images)
    command = [
        *tiny_study(tmp_path, {"a": {}, "b": {}, "c": {}}),
        f"--workdir={workdir}",
        "--collect_only",
        "--seeds=2",
    ]
    done = subprocess.run(
        [*command, "--compare_to=a", "--summary_keys=val/dice/tool"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = (workdir / "comparison.md").read_text(encoding="utf-8")
    summed = {v: [tool[v, 0][j] + tool[v, 1][j] for j in range(3)] for v in ("a", "b")}
    reference = paired_bootstrap(summed["b"], summed["a"])
    same_images = text.split("on the same 40 images")[1].splitlines()
    line = next(x for x in same_images if x.startswith("| b |"))
    estimate, low, high = (float(v) for v in re.findall(r"[+-]\d\.\d{4}", line.split(" | ")[-1]))
    assert estimate == pytest.approx(dice_difference(*summed["b"], *summed["a"]), abs=1e-4)
    width = reference.confidence_interval.high - reference.confidence_interval.low
    assert (
        abs(low - reference.confidence_interval.low) < 0.1 * width
        and abs(high - reference.confidence_interval.high) < 0.1 * width
    )
    assert low > 0  # b finds 6 more pixels of every image in each seed
    assert "Each variant minus 'a' on the same 40 images" in text and line in done.stdout
    # the p of scipy's paired permutation test (each image's counts, summed over its seeds, swapped
    # between the variants or not); Holm over the two variants (c's p is 1) doubles it
    p, p_holm = (float(v) for v in re.findall(r"p=([\d.e-]+) \(Holm ([\d.e-]+)\) \|$", line)[0])
    permuted = stats.permutation_test(
        [np.stack(summed[v], 1) for v in ("b", "a")],
        lambda x, y, axis: dice_difference(*np.moveaxis(x, -2, 0), *np.moveaxis(y, -2, 0)),
        permutation_type="samples",
        vectorized=True,
        n_resamples=10_000,
        random_state=1,
        axis=0,
    )
    assert p == pytest.approx(permuted.pvalue, abs=0.01)
    assert 0.005 < p < 0.2 and p_holm == pytest.approx(2 * p, rel=0.05)
    (c_line,) = [x for x in same_images if x.startswith("| c |")]
    assert c_line.endswith("| +0.0000 [+0.0000, +0.0000] p=1 (Holm 1) |")


def test_cli_compares_variants_group_by_group(tmp_path):
    """--groups=index.csv --group_by=stratum: comparison.md also compares each variant on each
    group's images alone (scipy's paired bootstrap over those images), p adjusted by Holm over
    every variant and group with a p, and gives each variant's score there (scipy's bootstrap);
    one image: no interval. Bad group flags are refused before
    anything runs; an image the file does not name leaves a note, the other tables stay."""
    workdir, images = tmp_path / "w", [f"img{i:02d}" for i in range(40)]
    tool = tool_runs(workdir, images)
    stratum = ["easy"] * 25 + ["hard"] * 14 + ["single"]
    index = tmp_path / "index.csv"
    index.write_text("id,stratum\n" + "".join(f"{n},{g}\n" for n, g in zip(images, stratum, strict=True)))
    command = [*tiny_study(tmp_path, {"a": {}, "b": {}, "c": {}}), f"--workdir={workdir}", "--collect_only"]
    command += ["--seeds=2", "--summary_keys=val/dice/tool", f"--groups={index}", "--group_by=stratum"]
    done = subprocess.run([*command, "--compare_to=a"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (workdir / "comparison.md").read_text(encoding="utf-8")
    assert "on the same 40 images" in text  # the whole split's table stays
    grouped, levels = text.split("The same on each stratum's images alone (index.csv;")[1].split(
        "Each variant's scores"
    )
    grouped, levels = grouped.splitlines(), levels.splitlines()
    assert grouped[2].startswith("| variant - a, stratum | val/miou |")

    def cell(label):
        (line,) = [x for x in grouped if x.startswith(f"| {label} |")]
        return line.split(" | ")[-1].rstrip(" |")

    p = {}
    for group, rows in (("easy", slice(0, 25)), ("hard", slice(25, 39))):
        summed = {v: [tool[v, 0][j][rows] + tool[v, 1][j][rows] for j in range(3)] for v in ("a", "b")}
        reference = paired_bootstrap(summed["b"], summed["a"])
        estimate, low, high = (
            float(v) for v in re.findall(r"[+-]\d\.\d{4}", cell(f"b, {group} ({rows.stop - rows.start} images)"))
        )
        assert estimate == pytest.approx(dice_difference(*summed["b"], *summed["a"]), abs=1e-4)
        ci = reference.confidence_interval
        assert abs(low - ci.low) < 0.1 * (ci.high - ci.low) and abs(high - ci.high) < 0.1 * (ci.high - ci.low)
        p[group] = [
            float(v)
            for v in re.findall(
                r"p=([\d.e-]+) \(Holm ([\d.e-]+)\)$", cell(f"b, {group} ({rows.stop - rows.start} images)")
            )[0]
        ]
        assert cell(f"c, {group} ({rows.stop - rows.start} images)") == "+0.0000 [+0.0000, +0.0000] p=1 (Holm 1)"
    # Holm over four tests (b and c on easy and hard; c's p are 1), by hand
    (p1, h1), (p2, h2) = sorted(p.values())
    assert h1 == pytest.approx(min(1, 4 * p1), rel=0.05) and h2 == pytest.approx(max(h1, min(1, 3 * p2)), rel=0.05)
    assert re.fullmatch(r"[+-]\d\.\d{4} \(no interval\)", cell("b, single (1 image)"))
    # each variant's own score per group: the tool's Dice of its seeds' counts summed over the
    # group's images, with scipy's percentile bootstrap over those images
    (line,) = [x for x in levels if x.startswith("| a, hard (14 images) |")]
    summed = [tool["a", 0][j][25:39] + tool["a", 1][j][25:39] for j in range(3)]

    def dice(tp, fp, fn, axis=-1):
        return 2 * tp.sum(axis) / (2 * tp.sum(axis) + fp.sum(axis) + fn.sum(axis))

    reference = stats.bootstrap(
        summed, dice, paired=True, vectorized=True, n_resamples=10_000, method="percentile", random_state=1
    )
    estimate, low, high = (float(v) for v in re.findall(r"\d\.\d{4}", line.split(" | ")[-1]))
    tp, fp, fn = (x.sum() for x in summed)
    assert estimate == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-4)
    ci = reference.confidence_interval
    assert abs(low - ci.low) < 0.1 * (ci.high - ci.low) and abs(high - ci.high) < 0.1 * (ci.high - ci.low)
    assert any(x.startswith("| c, single (1 image) |") and "(no interval)" in x for x in levels)
    # an image the file does not name: a note; the other tables stay
    index.write_text("id,stratum\n" + "".join(f"{n},x\n" for n in images[:-1]))
    done = subprocess.run([*command, "--compare_to=a"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = (workdir / "comparison.md").read_text(encoding="utf-8")
    assert done.returncode == 0 and "on the same 40 images" in text
    assert "No comparison by stratum: " in text and "no 'id' row for the images ['img39'] (1 in all)" in text
    for flags, message in (
        ([], "--groups compares variants group by group: give --compare_to=VARIANT too"),
        (["--compare_to=a", "--group_by=modality"], "no 'id' or 'modality'"),
        (["--compare_to=a", f"--groups={tmp_path / 'none.csv'}"], "none.csv does not exist"),
        (["--compare_to=a", "--group_by="], "--groups and --group_by go together"),
    ):
        done = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr[-500:])


def test_cli_vmapped_seeds_of_images_named_by_index_get_intervals_and_the_same_images_table(tmp_path):
    """A `--vmap_seeds` study keeps each variant's replicas' tables in <variant>/seed_<s>/ beside
    the run's one dataset.json; images named by their index alone (the synthetic default) match
    across variants through it. Before session 39 their summed row had no interval and the
    comparison no same-images table ('the runs did not all read one recorded dataset')."""
    workdir, names, n = tmp_path / "w", ("background", "tool", "berry", "leaf"), 6  # configs/tiny.py's
    tp = {("a", 0): [9, 7, 8, 6, 9, 5], ("a", 1): [8, 8, 7, 6, 9, 6], ("b", 0): [10, 9, 9, 8, 10, 7]}
    tp["b", 1] = [9, 9, 10, 8, 10, 8]
    fn = {k: [12 - t for t in v] for k, v in tp.items()}  # tool: 12 pixels per image; background: 20; no others
    for (variant, seed), hits in tp.items():
        run = workdir / variant / f"seed_{seed}"
        os.makedirs(run)
        rows = []
        for i in range(n):
            miss = fn[variant, seed][i]
            rows.append(
                {"tp": (20, hits[i], 0, 0), "fp": (miss, 0, 0, 0), "fn": (0, miss, 0, 0), "tn": (hits[i], 20, 0, 0)}
            )
        counts = {f"val/{k}/{c}": sum(r[k][j] for r in rows) for k in scoring.COUNT_KINDS for j, c in enumerate(names)}
        (run / "metrics.json").write_text(json.dumps({"val/miou": 0.5, "val/dice/tool": 0.5, **counts}))
        with open(run / "val_per_image.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "name", *(f"{k}/{c}" for k in scoring.COUNT_KINDS for c in names)])
            for i, row in enumerate(rows):  # no name: the image's index names it
                writer.writerow([i, "", *(row[k][j] for k in scoring.COUNT_KINDS for j in range(len(names)))])
    for variant in ("a", "b"):  # one run per variant read this dataset
        (workdir / variant / workdirs.DATASET_FILE).write_text(json.dumps({"dataset": "synthetic/tiny:1.0.0"}))
    command = [*tiny_study(tmp_path, {"a": {}, "b": {}}), f"--workdir={workdir}", "--collect_only", "--seeds=2"]
    command += ["--vmap_seeds", "--pooled", "--compare_to=a", "--summary_keys=val/dice/tool"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    def dice(*runs):  # the tool's Dice of these runs' counts summed over every image
        hits, misses = sum(sum(tp[r]) for r in runs), sum(sum(fn[r]) for r in runs)
        return 2 * hits / (2 * hits + misses)

    summed = re.search(
        rf"\| {re.escape(study_tables.SUMMED)} \| 4 \|.* \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|$", done.stdout, re.M
    )
    assert summed and float(summed[1]) == pytest.approx(dice(*tp), abs=1e-4)
    assert float(summed[2]) < float(summed[1]) < float(summed[3])
    assert f"interval over its {n} images (10000 resamples, each image drawn with its 4 runs' rows" in done.stdout
    text = (workdir / "comparison.md").read_text(encoding="utf-8")
    line = next(x for x in text.split(f"on the same {n} images")[1].splitlines() if x.startswith("| b |"))
    difference = dice(("b", 0), ("b", 1)) - dice(("a", 0), ("a", 1))
    assert float(re.findall(r"[+-]\d\.\d{4}", line.split(" | ")[-1])[0]) == pytest.approx(difference, abs=1e-4)
    (workdir / "b" / workdirs.DATASET_FILE).write_text(json.dumps({"dataset": "synthetic/other:1.0.0"}))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # index 0 of another dataset is not the same image
    assert "No comparison on the same images" in done.stdout and "names its images by index only" in done.stdout


def test_study_cli_collects_and_rejects_bad_study(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("def get_config(arg=None):\n    import ml_collections\n    return ml_collections.ConfigDict()\n")
    done = subprocess.run(
        [sys.executable, "-m", "segjax.study", f"--study={path}", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "has no get_variants" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "segjax.study", f"--study={path}", f"--workdir={tmp_path / 'w'}", "--seeds=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--seeds=0: give at least one seed" in done.stderr  # was an IndexError


@pytest.mark.slow  # a study through the CLI (~14 s warm); CI runs it
def test_study_key_overrides_set_the_base_of_every_variant(tmp_path, tfds_dir):
    """`--study.train.steps=2`: a smoke run of a whole study, every variant's run at 2 steps (the
    flag did not exist: the study file had to be edited); an unknown key is one line naming the
    nearest one, before anything is written."""
    command = tiny_study(tmp_path, {"a": {}, "b": {"model.pool": "avg"}}, tfds_dir)
    workdir = tmp_path / "w"
    done = subprocess.run(
        [*command, f"--workdir={workdir}", "--seeds=1", "--study.train.steps=2", "--study.eval.every=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in ("a", "b"):
        with open(workdir / variant / "seed_0" / "config.json", encoding="utf-8") as f:
            config = json.load(f)
        assert config["train"]["steps"] == 2 and config["model"]["pool"] == ("avg" if variant == "b" else "max")
        with open(workdir / variant / "seed_0" / "metrics.json", encoding="utf-8") as f:
            assert json.load(f)["step"] == 2
    typo = subprocess.run(
        [*command, f"--workdir={tmp_path / 'typo'}", "--study.train.stpes=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        typo.returncode == 2
        and "--study.train.stpes: unknown config key train.stpes; did you mean train.steps?" in typo.stderr
    )
    assert "Traceback" not in typo.stderr and not (tmp_path / "typo").exists()


def test_tables_hold_the_asked_seeds_and_collect_only_refuses_an_edited_study(tmp_path):
    """Runs of seeds 0, 1, 2 and 10 on disk (an earlier, larger --seeds): --seeds=2 averages
    seeds 0 and 1 only and says how many it left out; a run folder whose config.json differs from
    the study file is refused by --collect_only as by a training pass."""
    workdir = tmp_path / "w"
    miou = {0: 0.5, 1: 0.7, 2: 0.9, 10: 0.1}
    for seed, value in miou.items():
        os.makedirs(workdir / "a" / f"seed_{seed}")
        (workdir / "a" / f"seed_{seed}" / "metrics.json").write_text(json.dumps({"step": 2, "val/miou": value}))
    assert [r["seed"] for r in study.collect(str(workdir))] == [0, 1, 2, 10]  # numeric order
    assert [r["seed"] for r in study.collect(str(workdir), ["a"], [0, 1])] == [0, 1]
    assert study.other_seeds(str(workdir), ["a"], [0, 1]) == 2
    command = [*tiny_study(tmp_path, {"a": {}}), f"--workdir={workdir}", "--collect_only"]
    done = subprocess.run([*command, "--seeds=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 finished runs" in done.stdout and "2 of other seeds than 0..1 left out" in done.stdout
    assert f"| a | 2 | {0.6:.4f} ± {np.std([0.5, 0.7], ddof=1):.4f} |" in done.stdout
    with open(workdir / "runs.csv", newline="", encoding="utf-8") as f:
        assert [row["seed"] for row in csv.DictReader(f)] == ["0", "1"]
    edited = load_config("tiny")
    edited.train.seed, edited.optim.lr = 1, 0.5
    (workdir / "a" / "seed_1" / "config.json").write_text(json.dumps(edited.to_dict()))
    done = subprocess.run([*command, "--seeds=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "differs in: optim.lr" in done.stderr


def test_example_study_file_defines_valid_variants():
    base, variants = study.load_study(os.path.join(ROOT, "configs", "studies", "unet_ablations.py") + ":all")
    assert len(variants) >= 15
    for name, overrides in variants.items():
        study.variant_config(base, overrides, name)  # every override is a valid, well-typed key


def test_isbi_cross_validation_study_holds_out_each_fold_once():
    path = os.path.join(ROOT, "configs", "studies", "isbi_folds.py")
    base, variants = study.load_study(path + ":proxy")
    assert base.train.steps == 1000 and base.data.num_threads == 1
    configs = [study.variant_config(base, overrides, name) for name, overrides in variants.items()]
    assert [c.data.folder.fold for c in configs] == list(range(base.data.folder.num_folds))
    assert study.load_study(path)[0].train.steps == load_config("isbi").train.steps
    with pytest.raises(ValueError, match="unknown argument 'fast'"):
        study.load_study(path + ":fast")


def test_isbi_variants_study_changes_only_its_keys_of_the_protocol_proxy():
    path = os.path.join(ROOT, "configs", "studies", "isbi_variants.py")
    base, variants = study.load_study(path)
    folds_base, folds = study.load_study(os.path.join(ROOT, "configs", "studies", "isbi_folds.py") + ":proxy")
    protocol = study.variant_config(folds_base, folds[f"fold{folds_base.data.folder.fold}"], "protocol")
    flat = configuration.flatten
    assert flat(study.variant_config(base, variants["default"], "default").to_dict()) == flat(protocol.to_dict())
    reference = flat(base.to_dict())
    for name, overrides in variants.items():
        changed = flat(study.variant_config(base, overrides, name).to_dict())
        assert {k for k in reference if changed[k] != reference[k]} == set(overrides), name
    assert list(study.load_study(path + ":ce_only, pool_avg")[1]) == ["ce_only", "pool_avg"]
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['ce'\]"):
        study.load_study(path + ":ce,pool_avg")


def test_a_baseline_variant_is_scored_beside_the_networks_on_the_same_images(tmp_path, tfds_dir):
    """`baseline.enabled`: the variant is the classic method, scored (not trained) into each seed's
    folder exactly as `segjax.baselines` scores it, on validation and test; it joins the tables and
    the same-images comparison, is skipped once scored, and is refused with --vmap_seeds or beside
    networks of more than two classes (foreground-vs-background scores would not compare)."""
    from segjax import baselines
    from tests.test_folder import folder_config, write_folder

    root = write_folder(tmp_path / "data", [(32, 32)] * 8, num_classes=2)
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    (root / "split.csv").write_text("id,split\n" + "".join(f"{i:03d},{s}\n" for i, s in enumerate(splits)))
    base = load_config("tiny")
    base.data = folder_config(root, tfds_dir, num_classes=2, split_file="split.csv")
    base.eval.interval_resamples = 0
    variants = {"net": {}, "otsu": {"baseline.enabled": True, "baseline.auto_polarity": True}}
    workdir = str(tmp_path / "study")
    rows = study.run_study(base, variants, [0, 1], workdir)
    assert [(r["variant"], r["seed"]) for r in rows] == [("net", 0), ("net", 1), ("otsu", 0), ("otsu", 1)]
    alone = study.variant_config(base, variants["otsu"], "otsu")
    expected = baselines.run(alone, str(tmp_path / "alone"))  # the same method scored on its own
    for seed in (0, 1):
        run = os.path.join(workdir, "otsu", f"seed_{seed}")
        assert not os.path.exists(os.path.join(run, "checkpoints"))  # scored, not trained
        row = next(r for r in rows if r["variant"] == "otsu" and r["seed"] == seed)
        assert (
            row["val/miou"] == pytest.approx(expected["val/miou"]) and row["val/accuracy"] == expected["val/accuracy"]
        )
    table = os.path.join(workdir, "otsu", "seed_0", "val_per_image.csv")
    before = os.path.getmtime(table)
    study.run_study(base, variants, [0, 1], workdir)  # scored: skipped
    assert os.path.getmtime(table) == before
    # the comparison on the same images: the baseline's counts against the network's
    text = study_tables.write_comparison(workdir, rows, "otsu", (), "validation", (["c0", "c1"], base.eval))
    assert "on the same 2 images" in text and "| net |" in text.split("on the same 2 images")[1]
    # the test split: the baseline scored on it as `segjax.baselines --split=test` does
    todo = study.planned_runs(base, variants, [0, 1], workdir)
    assert study.score_test_split(todo) == 4
    tested = study.collect(workdir, list(variants), [0, 1], "test")
    expected = baselines.run(alone, str(tmp_path / "alone"), split="test")
    assert [r["variant"] for r in tested] == ["net", "net", "otsu", "otsu"]
    assert tested[2]["test/miou"] == pytest.approx(expected["test/miou"])
    assert study_tables.run_tables(workdir, tested[2:3], "test")[0].endswith(
        os.path.join("otsu", "seed_0", "test_per_image.csv")
    )
    assert study.score_test_split(todo) == 0  # once
    with pytest.raises(ConfigError, match=r"'otsu' is a classic baseline .*: it has no seeds to vmap"):
        study.planned_runs(base, variants, [0, 1], str(tmp_path / "v"), vmap_seeds=True)
    base.data.num_classes, base.data.class_names = 3, ("c0", "c1", "c2")
    with pytest.raises(ConfigError, match=r"\(otsu\), which scores foreground vs background; this study's data has 3"):
        study.planned_runs(base, variants, [0], str(tmp_path / "three"))


def test_a_multiotsu_baseline_variant_joins_a_study_of_more_than_two_classes(tiny_config, tmp_path):
    """`multiotsu` predicts every class, so beside a network on the 4-class scenes it is scored as
    the network is (every class's IoU, the same mean), equal to `segjax.baselines` on its own."""
    from segjax import baselines

    variants = {"net": {}, "levels": {"baseline.enabled": True, "baseline.method": "multiotsu"}}
    workdir = str(tmp_path / "study")
    rows = study.run_study(tiny_config, variants, [0], workdir)
    expected = baselines.run(study.variant_config(tiny_config, variants["levels"], "levels"), str(tmp_path / "alone"))
    row = rows[1]
    assert row["variant"] == "levels" and row["val/miou"] == pytest.approx(expected["val/miou"])
    names = tiny_config.data.class_names
    assert [row[f"val/iou/{n}"] for n in names] == pytest.approx([expected[f"val/iou/{n}"] for n in names])
    assert [n for n in names if f"val/iou/{n}" in rows[0]] == list(names)  # the network's classes: the same


def test_nuclei_methods_study_is_the_nuclei_config_without_skips_and_as_a_threshold():
    path = os.path.join(ROOT, "configs", "studies", "nuclei_methods.py")
    base, variants = study.load_study(path)
    flat = configuration.flatten
    reference = flat(load_config("nuclei").to_dict())
    changes = {"unet": {}, "no_skips": {"model.skips": "none"}}
    changes["otsu"] = {"baseline.enabled": True, "baseline.auto_polarity": True}  # method: otsu, the default
    for name, expected in changes.items():
        changed = flat(study.variant_config(base, variants[name], name).to_dict())
        assert {k: changed[k] for k in reference if changed[k] != reference[k]} == expected, name
    assert len(study.planned_runs(base, variants, [0], "/nonexistent/study")) == 3  # a binary task: allowed
    with pytest.raises(ValueError, match="takes no argument"):
        study.load_study(path + ":fast")


@pytest.mark.slow  # a study of 4 runs through the CLI (~22 s in a fresh clone); CI runs it
def test_study_scores_the_test_split_once_per_run_and_tabulates_it(tmp_path, tfds_dir):
    """--eval_split=test: every finished run's best checkpoint scored on the held-out split once
    (each equal to that run rescored on its own), tabulated as summary.md is (summary_test.md,
    runs_test.csv, comparison_test.md); a rerun scores nothing again."""
    from segjax import rescore

    command = tiny_study(tmp_path, {"a": {}, "b": {"model.pool": "avg"}}, tfds_dir)
    workdir = tmp_path / "w"
    args = [*command, f"--workdir={workdir}", "--seeds=2", "--study.train.steps=2", "--study.eval.every=2"]
    args += ["--study.data.synthetic.num_test=6", "--eval_split=test", "--compare_to=a", "--pooled"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = {}
    for variant in ("a", "b"):
        for seed in (0, 1):
            with open(workdir / variant / f"seed_{seed}" / "eval_best_test.json", encoding="utf-8") as f:
                scores[variant, seed] = json.load(f)
            assert scores[variant, seed]["split"] == "test" and scores[variant, seed]["test/images"] == 6
    with open(workdir / "summary_test.md", encoding="utf-8") as f:
        summary = f.read()
    assert "(test split;" in summary and "| variant | n | test/miou | test/mdice |" in summary
    for variant in ("a", "b"):
        values = [scores[variant, s]["test/miou"] for s in (0, 1)]
        assert f"| {variant} | 2 | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} |" in summary
    with open(workdir / "runs_test.csv", newline="", encoding="utf-8") as f:
        assert [(r["variant"], r["seed"]) for r in csv.DictReader(f)] == [
            ("a", "0"),
            ("a", "1"),
            ("b", "0"),
            ("b", "1"),
        ]
    with open(workdir / "comparison_test.md", encoding="utf-8") as f:
        assert "| variant - a | test/miou |" in f.read()
    # the summed-counts row: the IoUs of the four runs' confusion matrices added up
    from segjax import image_tables

    total = sum(
        image_tables.read_confusion(workdir / v / f"seed_{s}" / "eval_best_test_confusion.csv")[1] for v, s in scores
    )
    tp = np.diag(total)
    union = total.sum(0) + total.sum(1) - tp
    miou = np.mean(tp[union > 0] / union[union > 0])  # a class absent from truth and prediction is left out
    assert f"| {study_tables.SUMMED} | 4 | {miou:.4f} [" in summary
    assert "interval over its 6 images (10000 resamples, each image drawn with its 4 runs' rows;" in summary
    with open(workdir / "summary.md", encoding="utf-8") as f:
        assert "(validation split;" in f.read()  # the validation tables as before
    stamp = os.path.getmtime(workdir / "a" / "seed_1" / "eval_best_test.json")
    again = subprocess.run([*args, "--collect_only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "test split: 4 runs scored" in again.stdout
    assert os.path.getmtime(workdir / "a" / "seed_1" / "eval_best_test.json") == stamp  # not scored twice
    config = configuration.from_json(str(workdir / "a" / "seed_1" / "config.json"))
    own = rescore.evaluate_checkpoint(config, str(workdir / "a" / "seed_1"), "best", "test")
    assert own["test/miou"] == scores["a", 1]["test/miou"]
