"""Label statistics: widths of drawn structures against shapes of known width, per-image rows
against numpy, and the ISBI README's claim that the protocol's validation membranes are the thinnest."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from segjax.data import label_stats
from segjax.errors import ConfigError, DataError
from tests.conftest import ROOT, SHARED_DATA, load_config
from tests.test_folder import folder_config


def square_frame(size: int, side: int, width: int) -> np.ndarray:
    """A closed axis-aligned square frame (no ends): area 4w(S - w), centre line 4(S - w) long."""
    mask = np.zeros((size, size), bool)
    lo = (size - side) // 2
    mask[lo : lo + side, lo : lo + side] = True
    mask[lo + width : lo + side - width, lo + width : lo + side - width] = False
    return mask


@pytest.mark.parametrize("width", [2, 5, 9])
def test_width_of_a_closed_frame_is_its_drawn_width(width):
    measured = label_stats.mean_width(square_frame(128, 100, width))
    # skeleton: a square of side 100 - w, 4 (100 - w) - 4 pixels; the result is w (1 + 1 / (99 - w))
    assert measured == pytest.approx(width, rel=0.03)


def test_a_diagonal_band_reads_sqrt2_wider_as_documented():
    rows, cols = np.mgrid[:160, :160]
    width = 6.0
    band = (np.abs(rows - cols) / np.sqrt(2) <= width / 2) & (rows > 20) & (rows < 140)
    # a diagonal step is one skeleton pixel but sqrt(2) of length: area / pixels = sqrt(2) x width
    assert label_stats.mean_width(band) == pytest.approx(np.sqrt(2) * width, rel=0.08)


def test_empty_and_non_2d_masks():
    assert np.isnan(label_stats.mean_width(np.zeros((8, 8), bool)))
    with pytest.raises(ValueError, match="2D mask"):
        label_stats.mean_width(np.zeros((4, 8, 8), bool))
    with pytest.raises(ConfigError, match="2D labels"):
        label_stats.per_image([{"label": np.zeros((4, 8, 8), np.int32)}], 1)


def test_rows_per_image_match_numpy():
    frame = square_frame(64, 40, 4).astype(np.int32)
    other = np.where(square_frame(64, 50, 7), 2, 0).astype(np.int32)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8)
    rows = label_stats.per_image([{"label": frame, "name": "a", "image": image}, {"label": other}], class_id=1)
    assert [r["name"] for r in rows] == ["a", "1"]
    assert rows[0]["fraction"] == pytest.approx(np.mean(frame == 1))
    assert rows[0]["width"] == pytest.approx(4, rel=0.03)
    assert rows[0]["image_mean"] == pytest.approx(image.astype(float).mean())
    assert rows[0]["image_std"] == pytest.approx(image.astype(float).std())
    assert rows[1]["fraction"] == 0.0 and np.isnan(rows[1]["width"]) and np.isnan(rows[1]["image_mean"])


def test_correlation_skips_missing_entries_like_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=12), rng.normal(size=12)
    a[3], b[7] = np.nan, np.nan
    keep = np.isfinite(a) & np.isfinite(b)
    assert label_stats.correlation(a, b) == pytest.approx(stats.pearsonr(a[keep], b[keep])[0])
    assert np.isnan(label_stats.correlation(a[2:5], b[2:5]))  # a[3] is missing: two pairs left


def test_split_rows_read_a_folder_dataset(tmp_path, tfds_dir):
    root = tmp_path / "frames"
    for d in ("images", "masks"):
        os.makedirs(root / d)
    widths = [3, 6, 4, 8]
    for i, w in enumerate(widths):
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(square_frame(64, 48, w).astype(np.uint8)).save(root / "masks" / f"{i:03d}.png")
    cfg = folder_config(root, tfds_dir, channels=1, num_classes=2, num_folds=2, fold=1)
    rows = label_stats.split_rows(cfg, "validation", class_id=1)
    assert [r["name"] for r in rows] == ["002", "003"]
    np.testing.assert_allclose([r["width"] for r in rows], widths[2:], rtol=0.04)
    with pytest.raises(ConfigError, match="--split=val: choose train, validation or test"):
        label_stats.split_rows(cfg, "val", class_id=1)
    with pytest.raises(DataError, match="has no test split; it has"):
        label_stats.split_rows(cfg, "test", class_id=1)
    # split-file rows 'test' are a test split, measured as the others (it was refused as absent)
    with open(root / "split.csv", "w", encoding="utf-8") as f:
        f.write("id,split\n000,train\n001,val\n002,test\n003,test\n")
    rows = label_stats.split_rows(
        folder_config(root, tfds_dir, channels=1, num_classes=2, split_file="split.csv"), "test", 1
    )
    assert [r["name"] for r in rows] == ["002", "003"]
    np.testing.assert_allclose([r["width"] for r in rows], widths[2:], rtol=0.04)


def write_frames(folder, widths):
    os.makedirs(folder, exist_ok=True)
    for i, w in enumerate(widths):
        Image.fromarray(square_frame(64, 48, w).astype(np.uint8)).save(os.path.join(folder, f"m{i}.png"))


def test_a_folder_of_masks_is_measured_file_by_file(tmp_path):
    write_frames(tmp_path, [5, 3])
    Image.fromarray(np.ones((64, 64), np.uint16)).save(tmp_path / "m0_instances.png")  # left out
    (tmp_path / "notes.txt").write_text("not a mask")
    rows = label_stats.folder_rows(str(tmp_path), class_id=1)
    assert [r["name"] for r in rows] == ["m0", "m1"]
    np.testing.assert_allclose([r["width"] for r in rows], [5, 3], rtol=0.04)
    with pytest.raises(DataError, match="no such folder"):
        label_stats.folder_rows(str(tmp_path / "absent"), 1)
    (tmp_path / "m2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"m2\.png: corrupt or truncated image"):
        label_stats.folder_rows(str(tmp_path), class_id=1)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"no \.png masks"):
        label_stats.folder_rows(str(tmp_path / "empty"), 1)


def test_command_line_on_a_mask_folder(tmp_path):
    write_frames(tmp_path, [4, 8, 6])
    cmd = [sys.executable, "-m", "segjax.data.label_stats", f"--masks={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mean = next(line for line in out.stdout.splitlines() if line.startswith("mean")).split()
    assert float(mean[2]) == pytest.approx(6, rel=0.04)  # the mean width of 4, 8 and 6 px frames
    both = subprocess.run([*cmd, "--config=configs/isbi.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "error: give either --config" in both.stderr


@pytest.mark.slow  # ~14 s: measures all 30 real ISBI labels
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "isbi2012_membrane")), reason="shared data absent")
def test_isbi_protocol_validation_membranes_are_drawn_thinner_than_training(tfds_dir):
    cfg = load_config("isbi").data
    cfg.tfds_dir, cfg.dir, cfg.cache = tfds_dir, os.path.join(SHARED_DATA, "isbi2012_membrane"), False
    train = [r["width"] for r in label_stats.split_rows(cfg, "train", 1)]
    val = [r["width"] for r in label_stats.split_rows(cfg, "validation", 1)]
    assert len(train) == 25 and len(val) == 5
    assert np.mean(val) < np.mean(train) - 0.3  # README: 6.29 vs 6.84 px
    assert min(val) < min(train)  # image 029's 5.25 px is the thinnest of all 30
