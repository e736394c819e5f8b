"""segjax's batch norm (+ ReLU) against flax's `nn.BatchNorm` followed by `nn.relu`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import batchnorm

SHAPES = [(4, 6, 5, 8), (2, 4, 3, 5, 6)]  # 2D and 3D, channels last


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.float32)  # a mean far from 0: centring matters
    c = shape[-1]
    params = {"scale": jnp.asarray(rng.normal(1.0, 0.3, c), jnp.float32), "bias": jnp.asarray(rng.normal(0, 0.5, c))}
    stats = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32), "var": jnp.asarray(rng.uniform(0.5, 2, c))}
    return x, {"params": params, "batch_stats": stats}, jnp.asarray(rng.normal(size=shape), jnp.float32)


def _flax(relu, **kw):
    def apply(variables, x, mutable):
        y = nn.BatchNorm(momentum=0.9, **kw).apply(variables, x, mutable=mutable)
        if mutable:
            y, updates = y
            return (nn.relu(y) if relu else y), updates
        return nn.relu(y) if relu else y

    return apply


def test_variables_are_flaxs():
    """Same variable tree, shapes, dtypes and initial values: checkpoints are interchangeable."""
    x = jnp.ones((2, 4, 4, 5))
    ours = batchnorm.BatchNorm(relu=True).init(jax.random.key(0), x)
    want = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_training_matches_flax_in_value_statistics_and_gradients(shape, relu):
    """On CPU (the hand-written backward): output, running-average updates and the gradients of
    x, scale and bias equal flax's layer (+ ReLU) differentiated by JAX."""
    x, variables, weights = _data(shape)
    ours = batchnorm.BatchNorm(relu=relu)
    ref = _flax(relu, use_running_average=False)
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, updates_ref = ref(variables, x, ["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if relu:
        assert 0.2 < float(jnp.mean(y == 0)) < 0.8  # the ReLU's mask is exercised
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply({**variables, "params": p}, x, ["batch_stats"])[0]) * weights)

    got = jax.grad(loss(lambda v, x, m: ours.apply(v, x, mutable=m)), (0, 1))(variables["params"], x)
    want = jax.grad(loss(ref), (0, 1))(variables["params"], x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_the_cpu_program_uses_the_hand_written_backward_and_other_platforms_do_not():
    """The fused layer's custom VJP is lowered for CPU only: its gradient program reduces over the
    activation 4 times (2 statistics forward, 2 sums backward), JAX's derivative more often."""
    x, variables, _ = _data(SHAPES[0])
    layer = batchnorm.BatchNorm(relu=True)

    def grad_x(v, x):
        return jax.grad(lambda x: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0]))(x)

    def reductions(platform):
        return (
            jax.jit(grad_x)
            .trace(variables, x)
            .lower(lowering_platforms=(platform,))
            .as_text()
            .count("stablehlo.reduce")
        )

    assert reductions("cpu") == 4
    assert reductions("cuda") > 4


def test_statistics_cotangents_are_differentiated_too():
    """The custom VJP also carries gradients that flow through the returned batch mean and
    variance (segjax only stops them at the running averages): equal to JAX's derivative."""
    x, variables, weights = _data(SHAPES[0], seed=1)
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    rng = np.random.default_rng(2)
    cotangents = (weights, jnp.asarray(rng.normal(size=x.shape[-1])), jnp.asarray(rng.normal(size=x.shape[-1])))
    for relu in (True, False):
        _, fused = jax.vjp(lambda *a, relu=relu: batchnorm.fused_train_norm(*a, relu, jnp.float32), x, scale, bias)
        _, plain = jax.vjp(lambda *a, relu=relu: batchnorm.train_norm(*a, relu, jnp.float32), x, scale, bias)
        for a, b in zip(fused(cotangents), plain(cotangents), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_inference_and_bfloat16_match_flax():
    """Running statistics at inference; a bfloat16 layer computes in float32 and returns bfloat16."""
    x, variables, _ = _data(SHAPES[0])
    got = batchnorm.BatchNorm(use_running_average=True, relu=True).apply(variables, x)
    np.testing.assert_allclose(got, _flax(True, use_running_average=True)(variables, x, False), rtol=1e-6, atol=1e-6)
    xb = x.astype(jnp.bfloat16)
    got, _ = batchnorm.BatchNorm(dtype=jnp.bfloat16, relu=True).apply(variables, xb, mutable=["batch_stats"])
    want, _ = _flax(True, use_running_average=False, dtype=jnp.bfloat16)(variables, xb, ["batch_stats"])
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
