"""Joint image/label augmentation in numpy: one RNG, the same geometric op on both.

Works for images [H,W,C] and volumes [D,H,W,C] (labels [H,W] / [D,H,W]). Labels are only ever
flipped, rotated by multiples of 90 degrees or cropped, never interpolated.
"""

from __future__ import annotations

import ml_collections
import numpy as np


def augment(example: dict[str, np.ndarray], rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> dict:
    """Apply the ops switched on in `cfg` (data.augment) to `image` and `label` together."""
    image, label = example["image"], example["label"]
    spatial = label.ndim
    if cfg.flip:
        for axis in range(spatial):
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
    h, w = spatial - 2, spatial - 1  # rotate in the (H, W) plane
    if cfg.rot90 and label.shape[h] == label.shape[w]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k, axes=(h, w)), np.rot90(label, k, axes=(h, w))
    out = dict(example)
    out["image"] = np.ascontiguousarray(image)
    out["label"] = np.ascontiguousarray(label)
    return out
