"""segjax.score_masks: mask files of any tool scored with a segjax run's metrics and conventions."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from segjax import predict, rescore, score_masks
from segjax.data import sources
from segjax.errors import DataError, WorkdirError
from tests.conftest import ROOT
from tests.test_folder import folder_config, write_folder
from tests.test_predict import run  # noqa: F401  (the module's trained tiny run)


def test_masks_written_by_predict_score_what_evaluation_scores(run, tmp_path):  # noqa: F811
    """The network's own masks, as files: every score and count equals its `--eval_only` one."""
    config, workdir, examples = run
    config = config.copy_and_resolve_references()
    os.makedirs(tmp_path / "images")
    for i, e in enumerate(examples):  # synthetic scenes are named by their index in the split
        Image.fromarray(e["image"]).save(tmp_path / "images" / f"{i}.png")
    predict.predict_folder(config, workdir, str(tmp_path / "images"), str(tmp_path / "masks"), "latest")
    scored = score_masks.score(config, str(tmp_path / "masks"), str(tmp_path / "scores.json"))
    own = rescore.evaluate_checkpoint(config, workdir, "latest")
    keys = [k for k in own if k.startswith("val/") and k != "val/loss"]
    assert {"val/miou", "val/mbiou", "val/tp/tool", "val/tn/leaf"} <= set(keys)
    for key in keys:
        np.testing.assert_allclose(scored[key], own[key], rtol=1e-6, err_msg=key)
    with open(tmp_path / "scores.json", encoding="utf-8") as f:
        assert json.load(f)["masks"] == str(tmp_path / "masks")
    with open(tmp_path / "scores_per_image.csv", encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 1 + len(examples)
    # the split's confusion matrix beside it: scikit-learn's from the files, and the run's own
    truth = np.concatenate([e["label"].ravel() for e in examples])
    files = np.concatenate(
        [np.asarray(Image.open(tmp_path / "masks" / f"{i}.png")).ravel() for i in range(len(examples))]
    )
    reference = skm.confusion_matrix(truth, files, labels=range(config.data.num_classes))
    np.testing.assert_array_equal(confusion(tmp_path / "scores_confusion.csv"), reference)
    np.testing.assert_array_equal(confusion(os.path.join(workdir, "eval_latest_confusion.csv")), reference)


def confusion(path) -> np.ndarray:
    """A `*_confusion.csv` as a [C, C] array (rows: truth)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return np.array([[int(v) for k, v in row.items() if k != "truth"] for row in rows])


def test_hand_made_masks_and_every_bad_file(tiny_config, tmp_path, tfds_dir):
    root = write_folder(tmp_path / "data", [(16, 16)] * 4, num_classes=3)
    tiny_config.data = folder_config(root, tfds_dir, num_classes=3, num_folds=2, fold=1)
    val = sources.open_splits(tiny_config.data)["validation"]
    labels = {val[i]["name"]: val[i]["label"].astype(np.uint8) for i in range(len(val))}
    assert sorted(labels) == ["002", "003"]
    masks = tmp_path / "masks"
    os.makedirs(masks)
    Image.fromarray(labels["002"]).save(masks / "002.png")
    wrong = labels["003"].copy()
    was = int(wrong[0, 0])
    wrong[0, 0] = (was + 1) % 3  # one pixel of class `was` called the next class
    Image.fromarray(wrong).save(masks / "003.png")
    Image.fromarray(wrong).save(masks / "zzz.png")  # not a validation image's: warned, not scored
    out = str(tmp_path / "s.json")
    result = score_masks.score(tiny_config, str(masks), out)
    np.testing.assert_allclose(result["val/accuracy"], 1 - 1 / 512)
    assert result[f"val/fn/c{was}"] == 1 and result[f"val/fp/c{(was + 1) % 3}"] == 1
    assert sum(result[f"val/fp/c{c}"] for c in range(3)) == 1 and result["val/pixels"] == 512
    expected = skm.confusion_matrix(
        np.concatenate([labels["002"].ravel(), labels["003"].ravel()]),
        np.concatenate([labels["002"].ravel(), wrong.ravel()]),
        labels=range(3),
    )
    assert expected[was, (was + 1) % 3] == 1 and expected.sum() == 512
    np.testing.assert_array_equal(confusion(tmp_path / "s_confusion.csv"), expected)
    with pytest.raises(WorkdirError, match="exists; use another --out or --overwrite"):
        score_masks.score(tiny_config, str(masks), out)

    def refused(write, pattern):
        for name in ("003.png", "003.jpg"):
            if os.path.exists(masks / name):
                os.remove(masks / name)
        write()
        with pytest.raises(DataError, match=pattern):
            score_masks.score(tiny_config, str(masks), out, overwrite=True)

    refused(lambda: None, r"has no mask for 1 of the 2 validation images, e.g. \['003'\]")
    refused(lambda: Image.fromarray(wrong[:8]).save(masks / "003.png"), r"003.png: 8x16, but its label is 16x16")
    refused(lambda: Image.fromarray(np.full((16, 16), 7, np.uint8)).save(masks / "003.png"), r"holds \[7\], outside")
    refused(lambda: Image.fromarray(wrong).save(masks / "003.jpg"), r"003.jpg: a JPEG file; ids must be stored")
    refused(
        lambda: Image.fromarray(np.stack([wrong] * 3, -1)).save(masks / "003.png"),
        r"a mask of shape \(16, 16, 3\) for a label of shape \(16, 16\)",
    )


def test_command_line_refuses_an_existing_out_in_one_line(tmp_path):
    out = tmp_path / "s.json"
    out.write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "segjax.score_masks", "--config=configs/tiny.py", f"--masks={tmp_path}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "error: " in done.stderr and "exists; use another --out" in done.stderr
    assert "Traceback" not in done.stderr
