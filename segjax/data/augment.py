"""Joint image/label augmentation in numpy: one RNG, the same geometric op on both.

Labels are only ever flipped, rotated by multiples of 90 degrees or cropped, never interpolated.
"""

from __future__ import annotations

import ml_collections
import numpy as np


def augment(example: dict[str, np.ndarray], rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> dict:
    """Apply the ops switched on in `cfg` (data.augment) to `image` [H,W,C] and `label` [H,W]."""
    image, label = example["image"], example["label"]
    if cfg.flip:
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if rng.random() < 0.5:
            image, label = image[::-1], label[::-1]
    if cfg.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    out = dict(example)
    out["image"] = np.ascontiguousarray(image)
    out["label"] = np.ascontiguousarray(label)
    return out
