"""K seeds in one vmapped step: each replica reproduces its own single-seed run."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax import intervals, matched_tables, predict, rescore, train
from segjax.data import sources
from segjax.errors import ConfigError
from tests.test_predict import write_images


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def logged(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


@pytest.mark.slow  # three trainings (~22 s in a fresh clone); CI runs it
def test_two_vmapped_seeds_equal_two_separate_runs(tiny_config, tmp_path):
    tiny_config.train.log_every = 1
    tiny_config.model.dropout = 0.1  # per-replica RNG streams matter
    tiny_config.eval.surface_metrics = True  # host-side scores per replica too
    singles = {}
    for seed in (3, 4):
        tiny_config.train.seed = seed
        singles[seed] = train.train_and_evaluate(tiny_config, str(tmp_path / f"single{seed}"))
    tiny_config.train.seed, tiny_config.train.num_seeds = 3, 2
    tiny_config.eval.interval_resamples = 200
    both = train.train_and_evaluate(tiny_config, str(tmp_path / "vmapped"))
    # the printed intervals over the images, each drawn with both replicas' rows (not 2N images),
    # kept beside metrics.json; `segjax.intervals` reads a K-seed run's seed_<s>/ tables the same way
    names, classes, counts, cfg = matched_tables.load([str(tmp_path / "vmapped")], intervals.DEFAULT_TABLE)
    assert counts["tp"].shape == (tiny_config.data.synthetic.num_val, 2, len(classes))
    with open(tmp_path / "vmapped" / "intervals.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["runs"] == [str(tmp_path / "vmapped")] and saved["images"] == len(names)
    expected = intervals.bootstrap(counts, cfg, classes, list(saved["intervals"]), resamples=200)
    assert saved["intervals"] == expected and "val/miou" in expected
    for seed in (3, 4):
        np.testing.assert_allclose(
            logged(tmp_path / "vmapped", f"seed{seed}/train/loss"),
            logged(tmp_path / f"single{seed}", "train/loss"),
            rtol=1e-4,
        )
        with open(tmp_path / "vmapped" / f"seed_{seed}" / "metrics.json", encoding="utf-8") as f:
            own = json.load(f)
        np.testing.assert_allclose(own["val/miou"], singles[seed]["val/miou"], rtol=1e-4)
        assert singles[seed]["val/mnsd"] > 0 and np.isfinite(singles[seed]["val/mhd95"])
        for key in ("val/mnsd", "val/mhd95"):
            np.testing.assert_allclose(own[key], singles[seed][key], rtol=1e-4, err_msg=key)
        # each replica's per-image table, as its single-seed run writes it (intervals, study tables)
        mine, single = (
            read_rows(d / "val_per_image.csv")
            for d in (tmp_path / "vmapped" / f"seed_{seed}", tmp_path / f"single{seed}")
        )
        assert len(mine) == tiny_config.data.synthetic.num_val
        assert [r["name"] for r in mine] == [r["name"] for r in single]
        for column in ("accuracy", "tp/background", "fn/background"):
            np.testing.assert_allclose(
                [float(r[column]) for r in mine], [float(r[column]) for r in single], rtol=1e-4, atol=1, err_msg=column
            )
    np.testing.assert_allclose(both["val/miou"], np.mean([singles[s]["val/miou"] for s in (3, 4)]), rtol=1e-4)
    assert both["val/miou_std"] >= 0
    np.testing.assert_allclose(both["val/mnsd"], np.mean([singles[s]["val/mnsd"] for s in (3, 4)]), rtol=1e-4)
    # resuming a finished K-seed run trains nothing and reproduces the numbers
    again = train.train_and_evaluate(tiny_config, str(tmp_path / "vmapped"))
    np.testing.assert_allclose(again["val/miou"], both["val/miou"], rtol=1e-6)
    rescore_and_predict_each_replica(tiny_config, tmp_path / "vmapped", tmp_path)


def rescore_and_predict_each_replica(config, workdir, tmp_path):
    """`--eval_only` and `segjax.predict` of a replicas run: its template was one replica's, so
    both stopped with 'saved from a different model'. Rescoring gives each replica's own training
    scores; predicting asks which replica, and its masks score that replica's accuracy."""
    rescored = rescore.evaluate_checkpoint(config, str(workdir), "latest")
    for seed in (3, 4):
        with open(workdir / f"seed_{seed}" / "metrics.json", encoding="utf-8") as f:
            own = json.load(f)
        with open(workdir / f"seed_{seed}" / "eval_latest.json", encoding="utf-8") as f:
            again = json.load(f)
        assert again["seed"] == seed and rescored[f"seed{seed}/val/miou"] == again["val/miou"]
        trained, rescored_rows = (
            read_rows(workdir / f"seed_{seed}" / n) for n in ("val_per_image.csv", "eval_latest_per_image.csv")
        )
        assert rescored_rows == trained  # the same checkpoint and eval settings: the same table
        for key in ("val/miou", "val/accuracy", "val/mnsd"):
            np.testing.assert_allclose(again[key], own[key], rtol=1e-6, err_msg=key)
    config.data.synthetic.num_test = 4  # the held-out split: each replica scored, its own file in seed_<s>/
    tested = rescore.evaluate_checkpoint(config, str(workdir), "latest", "test")
    mine = {}
    for seed in (3, 4):
        with open(workdir / f"seed_{seed}" / "eval_latest_test.json", encoding="utf-8") as f:
            mine[seed] = json.load(f)
        assert mine[seed]["split"] == "test" and mine[seed]["test/images"] == 4
        assert tested[f"seed{seed}/test/miou"] == mine[seed]["test/miou"]
        assert not [k for k in mine[seed] if k.startswith("val/")]
    np.testing.assert_allclose(tested["test/miou"], np.mean([mine[s]["test/miou"] for s in (3, 4)]), rtol=1e-6)
    config.data.synthetic.num_test = 0
    val = sources.open_splits(config.data)["validation"]
    examples = [val[i] for i in range(len(val))]
    images = write_images(tmp_path / "images", [e["image"] for e in examples])
    with pytest.raises(ConfigError, match=r"choose the one that predicts with --seed, one of \[3, 4\]"):
        predict.predict_folder(config, str(workdir), images, str(tmp_path / "masks"), "latest")
    paths = predict.predict_folder(config, str(workdir), images, str(tmp_path / "masks"), "latest", seed=4)
    correct = sum(int((np.asarray(Image.open(p)) == e["label"]).sum()) for p, e in zip(paths, examples, strict=True))
    accuracy = correct / sum(e["label"].size for e in examples)
    with open(workdir / "seed_4" / "eval_latest.json", encoding="utf-8") as f:
        # a pixel is 1/12288 of the split: 1e-6 is float32 rounding of the stored score, not a pixel
        np.testing.assert_allclose(accuracy, json.load(f)["val/accuracy"], rtol=1e-6)
