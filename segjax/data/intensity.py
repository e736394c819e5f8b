"""Intensity scaling shared by the NIfTI builder (per-volume normalisation) and the image-folder
builder (images deeper than 8 bits, e.g. 16-bit microscopy, scaled to 0..255 when prepared)."""

from __future__ import annotations

import numpy as np

from segjax.errors import ConfigError, DataError

NORMALIZATIONS = ("percentile", "zscore", "minmax")
RESCALES = ("none", "percentile", "minmax")  # data.folder.rescale


def normalize(volume: np.ndarray, mode: str, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Per-channel intensity normalisation of one [..., C] volume or image, over all its other
    axes: 'percentile' clips to the (low, high) percentiles, then scales to 0..1; 'zscore'
    subtracts the mean and divides by the std; 'minmax' scales min..max to 0..1."""
    out = np.empty(volume.shape, np.float32)
    for c in range(volume.shape[-1]):
        x = volume[..., c].astype(np.float64)
        if mode == "percentile":
            lo, hi = np.percentile(x, [low, high])
            x = (np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-8)
        elif mode == "zscore":
            x = (x - x.mean()) / max(x.std(), 1e-8)
        elif mode == "minmax":
            x = (x - x.min()) / max(x.max() - x.min(), 1e-8)
        else:
            raise ConfigError(f"intensity normalisation {mode!r}; choose one of {list(NORMALIZATIONS)}")
        out[..., c] = x
    return out


def to_uint8(image: np.ndarray, mode: str, low: float, high: float, where: str) -> np.ndarray:
    """An image deeper than 8 bits ([H,W] or [H,W,C], any numeric dtype) -> uint8 0..255, each
    channel scaled on its own (`mode` 'percentile': clip to the image's (low, high) percentiles
    first; 'minmax'); 'none' refuses, naming `where`, because a cast would wrap values around."""
    if mode == "none":
        raise DataError(
            f"{where}: {image.dtype} image; segjax stores 8-bit images: set data.folder.rescale='percentile' "
            "or 'minmax' to scale each image to 0..255, or convert the files"
        )
    if mode not in RESCALES:
        raise ConfigError(f"data.folder.rescale={mode!r}; choose one of {list(RESCALES)}")
    planes = image if image.ndim == 3 else image[..., None]
    scaled = np.rint(normalize(planes, mode, low, high) * 255.0).astype(np.uint8)
    return scaled if image.ndim == 3 else scaled[..., 0]
