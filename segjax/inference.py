"""Inference beyond one forward pass: sliding windows with Gaussian blending, and test-time
augmentation by left-right mirroring ('hflip'), mirroring along every axis ('flip', nnU-Net) or
the eight 2D dihedral transforms ('d4'). Train and test with the same symmetries: 'flip' and 'd4'
undo any orientation the network learned (e.g. upright objects, or a label offset in the data).

Everything here is pure and shape-static, so it runs inside the jitted eval step. With both off
(`eval.window = 0`, `eval.tta = 'none'`) `predict` returns the network's logits unchanged;
otherwise it returns log-probabilities (the log of the averaged softmax), which every loss and
`argmax` downstream accepts as logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.errors import ConfigError

TTA_MODES = ("none", "hflip", "flip", "d4")


def check(eval_cfg: ml_collections.ConfigDict, spatial_dims: int, multiple: int) -> None:
    """Config errors before anything compiles."""
    if eval_cfg.tta not in TTA_MODES:
        raise ConfigError(f"eval.tta={eval_cfg.tta!r}; choose one of {list(TTA_MODES)}")
    if eval_cfg.tta == "d4" and spatial_dims != 2:
        raise ConfigError("eval.tta='d4' (rotations in the image plane) needs model.spatial_dims=2; use 'flip'")
    if eval_cfg.window < 0 or eval_cfg.window % multiple:
        raise ConfigError(f"eval.window={eval_cfg.window} must be 0 (whole image) or a multiple of {multiple}")
    if not 0.0 <= eval_cfg.window_overlap < 1.0:
        raise ConfigError(f"eval.window_overlap={eval_cfg.window_overlap} must lie in [0, 1)")


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` covering 0..size with at least `overlap` overlap;
    the last window ends exactly at `size` (windows never leave the image)."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    count = -(-(size - window) // step) + 1
    return [round(i * (size - window) / (count - 1)) for i in range(count)]


def gaussian_weights(window: int, spatial_dims: int, sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's importance map: a Gaussian with sigma = window/8 per axis, normalised to max 1 and
    floored at its smallest positive value, so window centres dominate and borders still count."""
    axis = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    g1 = np.exp(-0.5 * (axis / (window * sigma_scale)) ** 2)
    g = g1
    for _ in range(spatial_dims - 1):
        g = np.multiply.outer(g, g1)
    g = g / g.max()
    return np.maximum(g, g[g > 0].min()).astype(np.float32)


def sliding_window(
    logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, window: int, overlap: float, blend: str
) -> jax.Array:
    """Class probabilities [N, *spatial, C] from windows of `window`^d: all windows of the batch
    run as one batch, their softmax is blended with Gaussian (or constant) weights. Images smaller
    than a window along an axis use the whole axis there."""
    spatial = images.shape[1:-1]
    dims = len(spatial)
    sizes = tuple(min(window, s) for s in spatial)
    starts = [window_starts(s, w, overlap) for s, w in zip(spatial, sizes, strict=True)]
    corners = list(itertools.product(*starts))
    crops = [
        images[(slice(None), *(slice(c, c + w) for c, w in zip(corner, sizes, strict=True)))] for corner in corners
    ]
    probs = jax.nn.softmax(logits_fn(jnp.concatenate(crops, axis=0)).astype(jnp.float32), axis=-1)
    if blend == "gaussian":
        w = gaussian_weights(window, dims)[tuple(slice(0, s) for s in sizes)]
    elif blend == "constant":
        w = np.ones(sizes, np.float32)
    else:
        raise ConfigError(f"eval.window_blend={blend!r}; choose 'gaussian' or 'constant'")
    w = jnp.asarray(w)[None, ..., None]
    n = images.shape[0]
    total = jnp.zeros((*images.shape[:-1], probs.shape[-1]), jnp.float32)
    weight = jnp.zeros((1, *spatial, 1), jnp.float32)
    for i, corner in enumerate(corners):
        where = (slice(None), *(slice(c, c + s) for c, s in zip(corner, sizes, strict=True)))
        total = total.at[where].add(probs[i * n : (i + 1) * n] * w)
        weight = weight.at[where].add(w)
    return total / weight


def _transforms(mode: str, dims: int) -> list[tuple[int, tuple[int, ...]]]:
    """(quarter turns in the (H, W) plane, flipped spatial axes) of each TTA view; view 0 = identity."""
    if mode == "none":
        return [(0, ())]
    axes = tuple(range(1, dims + 1))
    if mode == "hflip":
        return [(0, ()), (0, (dims,))]
    if mode == "flip":
        return [(0, flips) for r in range(dims + 1) for flips in itertools.combinations(axes, r)]
    return [(k, flips) for k in range(4) for flips in ((), (dims,))]  # d4


def _forward_view(x: jax.Array, k: int, flips: tuple[int, ...]) -> jax.Array:
    x = jnp.flip(x, flips) if flips else x
    return jnp.rot90(x, k, axes=(x.ndim - 3, x.ndim - 2)) if k else x


def _inverse_view(y: jax.Array, k: int, flips: tuple[int, ...]) -> jax.Array:
    y = jnp.rot90(y, -k, axes=(y.ndim - 3, y.ndim - 2)) if k else y
    return jnp.flip(y, flips) if flips else y


def predict(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, eval_cfg) -> jax.Array:
    """Logits (plain) or log of the averaged probabilities (windows and/or TTA) for `images`."""
    if eval_cfg.tta == "none" and eval_cfg.window == 0:
        return logits_fn(images)
    dims = images.ndim - 2
    if eval_cfg.window > 0:

        def probs_fn(x):
            return sliding_window(logits_fn, x, eval_cfg.window, eval_cfg.window_overlap, eval_cfg.window_blend)
    else:

        def probs_fn(x):
            return jax.nn.softmax(logits_fn(x).astype(jnp.float32), axis=-1)

    views = _transforms(eval_cfg.tta, dims)
    total = None
    for k, flips in views:
        p = _inverse_view(probs_fn(_forward_view(images, k, flips)), k, flips)
        total = p if total is None else total + p
    return jnp.log(jnp.maximum(total / len(views), 1e-12))
