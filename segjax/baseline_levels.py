"""Multi-Otsu intensity levels: the multi-class classic baseline, and which class each level is.

`baseline.method='multiotsu'`: per image, scikit-image's multi-Otsu thresholds cut the smoothed
grayscale image into `baseline.levels` intensity levels (0: as many as `data.num_classes`), level 0
the darkest; level k is predicted as class `baseline.level_classes[k]`. So, unlike the one-threshold
methods (scored as foreground vs background on multi-class data), it predicts every class and its
mIoU is the networks' mean.

Left empty, `level_classes` is fitted on the training split, as a network is fitted to its labels:
of the C^L ways to give each of the L levels one of the C classes, the one with the highest mIoU on
the training images (per-class IoU from the level-by-class pixel counts summed over the split, the
ignore label left out, averaged over the classes the split holds); ties go to the first way in
lexicographic order. A majority vote per level would not do: on imbalanced data the background
wins every level (the synthetic scenes: every level is mostly background).
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np
from skimage import filters

from segjax.errors import ConfigError

MAX_LEVELS = 4  # scikit-image's search grows as bins^(levels - 1): 4 levels ~0.05 s per 512^2 image, 5 ~4.5 s
MAX_ASSIGNMENTS = 2**16  # level->class assignments searched when fitting (classes^levels)


def num_levels(config: ml_collections.ConfigDict) -> int:
    """The number of intensity levels per image (`baseline.levels`, 0: `data.num_classes`)."""
    return config.baseline.levels or config.data.num_classes


def check(config: ml_collections.ConfigDict) -> None:
    """ConfigError for level settings a multi-Otsu baseline cannot use."""
    b, num_classes = config.baseline, config.data.num_classes
    levels = num_levels(config)
    if not 2 <= levels <= MAX_LEVELS:
        raise ConfigError(
            f"baseline.method='multiotsu' with {levels} levels (baseline.levels={b.levels}, data.num_classes="
            f"{num_classes}); it takes 2..{MAX_LEVELS} levels (scikit-image's search is too slow above): set "
            "baseline.levels"
        )
    if b.invert or b.auto_polarity:
        raise ConfigError(
            "baseline.method='multiotsu' gives each intensity level its class (baseline.level_classes); "
            "leave baseline.invert and baseline.auto_polarity False"
        )
    given = tuple(b.level_classes)
    if given and (len(given) != levels or not all(0 <= int(c) < num_classes for c in given)):
        raise ConfigError(
            f"baseline.level_classes={given} must give one class id in 0..{num_classes - 1} to each of the "
            f"{levels} levels (darkest first), or be () to fit them on the training split"
        )
    if not given and num_classes**levels > MAX_ASSIGNMENTS:
        raise ConfigError(
            f"fitting baseline.level_classes searches {num_classes}^{levels} assignments (over "
            f"{MAX_ASSIGNMENTS}); give baseline.level_classes or fewer baseline.levels"
        )


def levels(smooth: np.ndarray, n: int) -> np.ndarray:
    """Level index (0 = darkest .. n-1) of every pixel of a [H, W] image by its n-level multi-Otsu
    thresholds; an image of fewer than n distinct values is all level 0 (no thresholds exist)."""
    if np.unique(smooth).size < n:
        return np.zeros(smooth.shape, np.int32)
    return np.digitize(smooth, filters.threshold_multiotsu(smooth, classes=n)).astype(np.int32)


def count(level_map: np.ndarray, label: np.ndarray, valid: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """[n, num_classes] pixel counts of (level, true class) over the valid (> 0) pixels of one image."""
    keep = valid > 0
    pairs = level_map[keep].astype(np.int64) * num_classes + label[keep]
    return np.bincount(pairs, minlength=n * num_classes).reshape(n, num_classes)


def best_assignment(counts: np.ndarray) -> tuple[tuple[int, ...], float]:
    """(class of each level, its mIoU) maximising the mIoU of the [levels, classes] counts."""
    n, num_classes = counts.shape
    present = counts.sum(0) > 0
    if not present.any():
        raise ConfigError("no labelled training pixels to fit baseline.level_classes on")
    ways = np.array(list(itertools.product(range(num_classes), repeat=n)), np.int64)  # [A, n]
    rows = np.arange(len(ways))
    tp = np.zeros((len(ways), num_classes))
    predicted = np.zeros((len(ways), num_classes))
    for level in range(n):  # each level's pixels go to the class the assignment gives it
        tp[rows, ways[:, level]] += counts[level, ways[:, level]]  # one (row, class) per row: no clash
        predicted[rows, ways[:, level]] += counts[level].sum()
    iou = tp / np.maximum(predicted + counts.sum(0) - tp, 1)
    miou = iou[:, present].mean(1)
    best = int(np.argmax(miou))  # the first of equals
    return tuple(int(c) for c in ways[best]), float(miou[best])
