"""Seeded 3D volumes for V-Net / 3D U-Net (pure numpy, single channel, like CT/MR intensity).

Classes (label ids):
  0 background  smooth intensity gradient plus noise.
  1 blob        ellipsoids of varying size, orientation and brightness (cells, lesions).
  2 tube        thick line segments of varying radius and brightness (vessels, neurites).
Blob and tube intensities overlap, so shape, not brightness, tells them apart; they may touch
and overlap (later objects occlude earlier ones). Each volume is a pure function of
(seed, split, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = ("background", "blob", "tube")
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class VolumeParams:
    size: int = 32  # cube edge in voxels
    noise: float = 0.08  # std of Gaussian voxel noise (intensity range 0..1)
    min_objects: int = 2
    max_objects: int = 5


def render_volume(seed: int, split: str, index: int, params: VolumeParams) -> dict[str, np.ndarray]:
    """`image` uint8 [S,S,S,1], `label` uint8 [S,S,S], `instances` uint16 [S,S,S], `present` int32 [C]."""
    rng = np.random.default_rng([seed, 100 + SPLIT_IDS[split], index])
    s = params.size
    zz, yy, xx = (np.mgrid[0:s, 0:s, 0:s].astype(np.float32) + 0.5) / s
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    image = 0.25 + rng.uniform(0.0, 0.15) + 0.15 * (direction[0] * zz + direction[1] * yy + direction[2] * xx)
    label = np.zeros((s, s, s), np.uint8)
    instances = np.zeros((s, s, s), np.uint16)
    grid = np.stack([zz, yy, xx], -1)
    next_id = 1
    for _ in range(rng.integers(params.min_objects, params.max_objects + 1)):
        if rng.random() < 0.5:  # blob: rotated ellipsoid
            centre = rng.uniform(0.2, 0.8, 3)
            radii = rng.uniform(0.08, 0.2, 3)
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            local = (grid - centre) @ q
            region = np.sum((local / radii) ** 2, -1) <= 1.0
            cls = 1
        else:  # tube: capsule around a segment
            a, b = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
            ab = b - a
            t = np.clip(((grid - a) @ ab) / (ab @ ab), 0.0, 1.0)
            dist = np.linalg.norm(grid - (a + t[..., None] * ab), axis=-1)
            region = dist <= rng.uniform(0.04, 0.08)
            cls = 2
        if region.any():
            image = np.where(region, rng.uniform(0.55, 0.9), image)
            label[region] = cls
            instances[region] = next_id
            next_id += 1
    noisy = image + rng.normal(0, params.noise, image.shape)
    ids = np.unique(instances[instances > 0])
    lut = np.zeros(next_id, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    return {
        "image": np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)[..., None],
        "label": label,
        "instances": lut[instances],
        "present": (np.bincount(label.ravel(), minlength=len(CLASS_NAMES)) > 0).astype(np.int32),
    }
