"""Sliding-window inference and test-time augmentation: coverage, blending, equivariance."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import inference
from segjax.configuration import default_config
from segjax.errors import ConfigError
from segjax.models import build_model


def eval_cfg(**kw):
    c = ml_collections.ConfigDict(default_config().eval.to_dict())
    c.update(kw)
    return c


@pytest.mark.parametrize("size,window,overlap", [(512, 256, 0.5), (100, 32, 0.25), (64, 64, 0.5), (30, 64, 0.5)])
def test_windows_cover_every_pixel_and_stay_inside(size, window, overlap):
    starts = inference.window_starts(size, window, overlap)
    w = min(window, size)
    covered = np.zeros(size, int)
    for s in starts:
        assert 0 <= s and s + w <= size
        covered[s : s + w] += 1
    assert covered.min() >= 1
    assert starts[0] == 0 and starts[-1] + w == size
    if len(starts) > 1:  # neighbours share at least the requested overlap
        assert min(b - a for a, b in itertools.pairwise(starts)) <= window * (1 - overlap)


def test_gaussian_importance_map():
    g = inference.gaussian_weights(64, 2)
    assert g.shape == (64, 64) and g.max() == pytest.approx(1.0) and g.min() > 0
    np.testing.assert_allclose(g, g[::-1, ::-1])  # symmetric
    np.testing.assert_allclose(g, g.T)
    assert g[32, 32] > g[32, 48] > g[32, 63]  # centre dominates


def pointwise_logits(x):
    """A per-pixel model (no spatial context): window cuts and mirrorings cannot change it."""
    w = jnp.asarray(np.linspace(-1, 1, x.shape[-1] * 3).reshape(x.shape[-1], 3), jnp.float32)
    return 4.0 * x @ w


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("dims", [2, 3])
def test_sliding_window_of_pointwise_model_equals_whole_image(blend, dims):
    shape = (2, 40, 24, 3) if dims == 2 else (1, 20, 12, 16, 3)
    x = jax.random.uniform(jax.random.key(0), shape)
    got = inference.sliding_window(pointwise_logits, x, 16, 0.5, blend)
    np.testing.assert_allclose(got, jax.nn.softmax(pointwise_logits(x)), atol=1e-6)


def test_one_window_over_the_whole_image_is_plain_inference():
    cfg = default_config()
    model = build_model(cfg.model, 4)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(2), x, train=False)

    def fn(images):
        return model.apply(variables, images, train=False)[0]

    got = inference.sliding_window(fn, x, 32, 0.5, "gaussian")
    np.testing.assert_allclose(got, jax.nn.softmax(fn(x)), atol=1e-5)
    # windows smaller than the image: still a distribution per pixel, and not the plain output
    tiled = inference.predict(fn, jnp.pad(x, ((0, 0), (0, 16), (0, 16), (0, 0))), eval_cfg(window=32))
    np.testing.assert_allclose(jnp.exp(tiled).sum(-1), 1.0, atol=1e-5)


def test_plain_predict_returns_the_logits_unchanged():
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3))
    np.testing.assert_array_equal(inference.predict(pointwise_logits, x, eval_cfg()), pointwise_logits(x))


def position_dependent_logits(x):
    """Not equivariant: the logits depend on where a pixel is (a running sum along W and H)."""
    return jnp.concatenate([jnp.cumsum(x[..., :1], axis=-2), jnp.cumsum(x[..., 1:2], axis=-3), x[..., 2:]], -1)


@pytest.mark.parametrize("mode,dims", [("hflip", 2), ("flip", 2), ("flip", 3), ("d4", 2)])
def test_tta_prediction_is_equivariant(mode, dims):
    """Averaging over a group of views makes any model equivariant to that group: mirroring the
    input mirrors the prediction exactly (this fails if a view is not undone)."""
    shape = (2, 8, 8, 3) if dims == 2 else (1, 6, 8, 8, 3)
    x = jax.random.uniform(jax.random.key(3), shape)
    cfg = eval_cfg(tta=mode)
    pred = inference.predict(position_dependent_logits, x, cfg)
    for axis in (dims,) if mode == "hflip" else range(1, dims + 1):
        mirrored = inference.predict(position_dependent_logits, jnp.flip(x, axis), cfg)
        np.testing.assert_allclose(mirrored, jnp.flip(pred, axis), atol=1e-5)
    if mode == "d4":
        rotated = inference.predict(position_dependent_logits, jnp.rot90(x, 1, axes=(1, 2)), cfg)
        np.testing.assert_allclose(rotated, jnp.rot90(pred, 1, axes=(1, 2)), atol=1e-5)
    plain = inference.predict(position_dependent_logits, x, eval_cfg())
    plain_mirrored = inference.predict(position_dependent_logits, jnp.flip(x, dims), eval_cfg())
    assert not np.allclose(jnp.flip(plain, dims), plain_mirrored)  # the model alone is not equivariant


def test_flip_tta_averages_the_mirrored_views():
    """By hand for 1 spatial flip pair in 2D: mean of softmax over the 4 mirrorings."""
    x = jax.random.uniform(jax.random.key(4), (1, 4, 6, 3))
    f = position_dependent_logits
    views = [
        jax.nn.softmax(f(x)),
        jnp.flip(jax.nn.softmax(f(jnp.flip(x, 1))), 1),
        jnp.flip(jax.nn.softmax(f(jnp.flip(x, 2))), 2),
        jnp.flip(jax.nn.softmax(f(jnp.flip(x, (1, 2)))), (1, 2)),
    ]
    got = jnp.exp(inference.predict(f, x, eval_cfg(tta="flip")))
    np.testing.assert_allclose(got, sum(views) / 4, atol=1e-6)


@pytest.mark.parametrize(
    "kw,dims,message",
    [
        ({"tta": "rot"}, 2, "eval.tta"),
        ({"tta": "d4"}, 3, "spatial_dims=2"),
        ({"window": 40}, 2, "multiple of 16"),
        ({"window_overlap": 1.0}, 2, "window_overlap"),
    ],
)
def test_bad_inference_config(kw, dims, message):
    with pytest.raises(ConfigError, match=message):
        inference.check(eval_cfg(**kw), dims, 16)
