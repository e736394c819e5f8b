"""Multi-page files: refused where one image per file is read; split into pages by segjax.data.pages."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segjax.data import pages, png, sources
from segjax.errors import DataError, WorkdirError
from tests.conftest import ROOT
from tests.test_folder import folder_config


def _stack(path, arrays, **options):
    first, *rest = [Image.fromarray(a) for a in arrays]
    first.save(path, save_all=True, append_images=rest, **options)
    return str(path)


@pytest.fixture
def slices():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 10), np.uint8) for _ in range(3)]
    masks = [(img > 128).astype(np.uint8) for img in images]
    return images, masks


def test_a_stack_in_a_folder_is_refused_naming_the_file(tmp_path, tfds_dir, slices):
    """PIL reads a multi-page TIFF's first page only: a 3-slice stack and its 3 masks trained as
    one example, without a word."""
    images, masks = slices
    root = tmp_path / "data"
    for d in ("images", "masks"):
        os.makedirs(root / d)
    for i in range(3):  # single-page files beside the stack, so only the stack is wrong
        Image.fromarray(images[i]).save(root / "images" / f"one{i}.png")
        Image.fromarray(masks[i]).save(root / "masks" / f"one{i}.png")
    _stack(root / "images" / "volume.tif", images)
    _stack(root / "masks" / "volume.tif", masks)
    with pytest.raises(DataError, match=r"images/volume\.tif: a TIFF file of 3 pages; .*segjax\.data\.pages"):
        sources.open_splits(folder_config(root, tfds_dir, channels=1, num_classes=2, num_folds=2, fold=1))
    buffer = io.BytesIO()
    _stack(buffer, masks, format="PNG")  # an animated PNG mask: its frames are pages too
    with pytest.raises(DataError, match=r"mask\.png: a PNG file of 3 pages"):
        png.decode(buffer.getvalue(), "mask.png", ids=True)


def test_a_cameras_mpo_reads_as_its_main_picture():
    main, preview = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    buffer = io.BytesIO()
    _stack(buffer, [main, preview], format="MPO")
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2
    decoded = png.decode(buffer.getvalue(), "photo.jpg")
    assert np.abs(decoded.astype(int) - main).max() <= 2  # JPEG-coded: near, not equal


def test_pages_become_files_that_a_folder_reads_back_exactly(tmp_path, tfds_dir, slices):
    images, masks = slices
    image_stack = _stack(tmp_path / "train-volume.tif", images)
    mask_stack = _stack(tmp_path / "train-labels.tif", masks)
    root = tmp_path / "data"
    written = pages.split(image_stack, str(root / "images"))
    assert [os.path.basename(p) for p in written] == [f"train-volume_{k:03d}.png" for k in range(3)]
    pages.split(mask_stack, str(root / "masks"), name="train-volume")  # the pairs share names
    for k, path in enumerate(written):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[k])
    cfg = folder_config(root, tfds_dir, channels=1, num_classes=2, num_folds=3, fold=2)
    val = sources.open_splits(cfg)["validation"]
    np.testing.assert_array_equal(val[0]["image"][..., 0], images[2])
    np.testing.assert_array_equal(val[0]["label"], masks[2])
    with pytest.raises(WorkdirError, match="3 pages already exist"):
        pages.split(image_stack, str(root / "images"))
    sixteen = [np.full((4, 4), v, np.int32) for v in (0, 70000)]  # 32-bit: fits 16 bits or not
    with pytest.raises(DataError, match="page 1 has PIL mode 'I'"):
        pages.split(_stack(tmp_path / "deep.tif", sixteen), str(tmp_path / "deep"))
    fits = [np.full((4, 4), v, np.int32) for v in (0, 65535)]
    deep = pages.split(_stack(tmp_path / "fits.tif", fits), str(tmp_path / "fits"))
    assert np.asarray(Image.open(deep[1])).max() == 65535


def test_cli_writes_the_pages_and_a_missing_stack_is_one_line(tmp_path, slices):
    stack = _stack(tmp_path / "s.tif", slices[0])
    run = [sys.executable, "-m", "segjax.data.pages", f"--out={tmp_path / 'out'}"]
    done = subprocess.run([*run, f"--stack={stack}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "3 pages" in done.stdout, done.stderr
    missing = subprocess.run([*run, "--stack=nope.tif"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "error: nope.tif: not a readable image file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_an_isbi_style_label_stack_reads_with_mask_values(tmp_path, tfds_dir, slices):
    """ISBI's original train-labels.tif stores cells as 255 and membranes as 0: split into pages and
    read with mask_values=(255, 0), the membranes are class 1, as configs/isbi.py names them."""
    images, masks = slices
    stored = [np.where(m == 1, 0, 255).astype(np.uint8) for m in masks]  # membrane (1) stored as 0
    root = tmp_path / "isbi"
    pages.split(_stack(tmp_path / "train-volume.tif", images), str(root / "images"))
    pages.split(_stack(tmp_path / "train-labels.tif", stored), str(root / "masks"), name="train-volume")
    cfg = folder_config(root, tfds_dir, channels=1, num_classes=2, num_folds=3, fold=0, mask_values=(255, 0))
    np.testing.assert_array_equal(sources.open_splits(cfg)["validation"][0]["label"], masks[0])
