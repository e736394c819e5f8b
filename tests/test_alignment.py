"""Image/label sub-pixel alignment: the offset is measured correctly, the image shift removes it,
labels are never resampled, and the ISBI config's shift is what its training labels say."""

from __future__ import annotations

import os

import numpy as np
import pytest

from segjax.data import alignment, sources
from segjax.errors import ConfigError
from tests.conftest import SHARED_DATA, load_config
from tests.test_folder import folder_config, write_folder


def dark_lines(offset: tuple[float, float], n: int = 24, size: int = 64, seed: int = 0):
    """Images with dark lines (Gaussian profile) at random sub-pixel positions; labels 3 px wide
    drawn `offset` = (rows, cols) pixels above / left of each line's centre."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float64)
    pairs = []
    for k in range(n):
        axis = k % 2  # horizontal lines (rows), then vertical lines (cols)
        centres = rng.uniform(6, size - 6, 3)
        coord = grid[:, None] if axis == 0 else grid[None, :]
        dist = np.min([np.abs(coord - c) for c in centres], axis=0)
        image = 200 - 150 * np.exp(-0.5 * (dist / 1.2) ** 2) * np.ones((size, size))
        label_dist = np.min([np.abs(coord - (c - offset[axis])) for c in centres], axis=0)
        label = (label_dist <= 1.5) * np.ones((size, size), np.int32)
        pairs.append((image.astype(np.uint8)[..., None], label.astype(np.int32)))
    return pairs


@pytest.mark.parametrize("offset", [(0.4, -0.3), (-0.6, 0.2), (0.0, 0.0)])
def test_measured_offset_matches_the_drawn_one_and_the_shift_removes_it(offset):
    pairs = dark_lines(offset)
    rows, cols = alignment.label_offset(pairs, class_id=1)
    assert abs(rows - offset[0]) < 0.12 and abs(cols - offset[1]) < 0.12, (rows, cols)
    moved = [(alignment.shift_image(image, (-rows, -cols)), label) for image, label in pairs]
    rows2, cols2 = alignment.label_offset(moved, class_id=1)
    assert abs(rows2) < 0.1 and abs(cols2) < 0.1, (rows2, cols2)


def test_shift_image_is_a_translation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(alignment.shift_image(image, (0.0, 0.0)), image)
    down = alignment.shift_image(image, (1.0, 0.0))  # whole pixels: exact, edge row repeated
    assert down.dtype == np.uint8 and down.shape == image.shape
    np.testing.assert_array_equal(down[1:], image[:-1])
    np.testing.assert_array_equal(down[0], image[0])
    left = alignment.shift_image(image.astype(np.float32), (0.0, -2.0))
    np.testing.assert_allclose(left[:, :-2], image[:, 2:].astype(np.float32), atol=1e-3)


def test_bad_shift_is_a_config_error():
    with pytest.raises(ConfigError, match="two numbers"):
        alignment.shift_image(np.zeros((4, 4, 1), np.uint8), (1.0,))
    with pytest.raises(ConfigError, match="2D images"):
        alignment.shift_image(np.zeros((4, 4, 4, 1), np.uint8), (1.0, 0.0))


def test_a_class_that_never_occurs_is_an_error():
    with pytest.raises(ValueError, match="class 3"):
        alignment.label_offset(dark_lines((0.0, 0.0), n=2), class_id=3)


def test_the_data_source_moves_images_and_leaves_labels(tmp_path, tfds_dir):
    root = write_folder(tmp_path / "f", [(16, 16)] * 3, channels=1)
    plain = sources.open_splits(folder_config(root, tfds_dir, channels=1))["train"][0]
    cfg = folder_config(root, tfds_dir, channels=1)
    cfg.image_shift = (1.0, 0.0)
    moved = sources.open_splits(cfg)["train"][0]
    np.testing.assert_array_equal(moved["label"], plain["label"])
    np.testing.assert_array_equal(moved["image"][1:], plain["image"][:-1])


@pytest.mark.slow  # ~40 s: 150 spline shifts of 512^2 images
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "isbi2012_membrane")), reason="shared data absent")
def test_isbi_shift_is_the_training_labels_offset(tfds_dir):
    cfg = load_config("isbi").data
    cfg.tfds_dir, cfg.dir, cfg.cache = tfds_dir, os.path.join(SHARED_DATA, "isbi2012_membrane"), False
    configured = cfg.image_shift
    cfg.image_shift = (0.0, 0.0)
    train = sources.open_splits(cfg)["train"]
    rows, cols = alignment.label_offset(((e["image"], e["label"]) for e in (train[i] for i in range(len(train)))), 1)
    assert rows > 0.5 and cols > 0.1  # labels above and left of the dark membranes
    np.testing.assert_allclose(configured, (-rows, -cols), atol=0.03)
    cfg.image_shift = configured
    train = sources.open_splits(cfg)["train"]
    rows, cols = alignment.label_offset(((e["image"], e["label"]) for e in (train[i] for i in range(len(train)))), 1)
    assert abs(rows) < 0.05 and abs(cols) < 0.05, (rows, cols)
