"""Batch norm, optionally followed by ReLU, with a hand-written backward pass on CPU.

`BatchNorm` is `flax.linen.BatchNorm` as segjax uses it (channels last, momentum, epsilon 1e-5,
float32 statistics with the fast variance E[x^2] - E[x]^2, float32 scale and bias, running
averages in `batch_stats`, statistics across `axis_name` under pmap): the same variables, so
checkpoints are interchangeable, and the same numbers to float32 rounding (tested against flax).

Why: differentiated by JAX, batch norm + ReLU becomes several passes over the activation, some
of them materialising x - mean. The backward needs only two: the per-channel sums of the masked
output gradient g and of g * x (sum g * (x - mean) = sum g * x - mean * sum g), then
dx = a * g - c * (x - mean) - a * mean(g) with per-channel a, c. On XLA:CPU that form runs
batch norm + ReLU's forward and backward 1.7x faster (8 x 128^2 x 32) and a U-Net training step
2-4 % faster (alternating runs, benchmarks/RESULTS.md, session 19); summing g * x rather than
g * (x - mean) saves another 5 % (session 20: XLA had written x - mean to memory for it). It
is the CPU form only (`lax.platform_dependent`): on GPUs, where flax's layer was measured at
memory speed, and with cross-replica statistics (`axis_name`) the layer is JAX's
derivative of the same maths.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

EPSILON = 1e-5  # flax's default


def _reduced(x):
    return tuple(range(x.ndim - 1))


def _stats(x32, axis_name=None):
    """flax's fast-variance statistics of a float32 array over all but the channel axis."""
    mean, mean2 = jnp.mean(x32, _reduced(x32)), jnp.mean(jnp.square(x32), _reduced(x32))
    if axis_name is not None:
        mean, mean2 = jnp.split(lax.pmean(jnp.concatenate([mean, mean2]), axis_name), 2)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def _normalize(x, mean, var, scale, bias, relu: bool, dtype):
    """flax's `_normalize` ((x - mean) * (rsqrt(var + eps) * scale) + bias), then the ReLU."""
    y = (x - mean) * (lax.rsqrt(var + EPSILON) * scale) + bias
    return (jnp.maximum(y, 0.0) if relu else y).astype(dtype)


def train_norm(x, scale, bias, relu: bool, dtype, axis_name=None):
    """(output, batch mean, batch variance) in training mode: JAX's derivative."""
    x32 = x.astype(jnp.float32)
    mean, var = _stats(x32, axis_name)
    return _normalize(x32, mean, var, scale, bias, relu, dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_train_norm(x, scale, bias, relu: bool, dtype):
    """`train_norm` (no cross-replica statistics) with the two-pass backward of the docstring."""
    return train_norm(x, scale, bias, relu, dtype)


def _fused_fwd(x, scale, bias, relu, dtype):
    out, mean, var = train_norm(x, scale, bias, relu, dtype)
    return (out, mean, var), (x, scale, bias, mean, var)


def _fused_bwd(relu, dtype, residuals, cotangents):
    x, scale, bias, mean, var = residuals
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    rstd = lax.rsqrt(var + EPSILON)
    a = scale * rstd
    centred = x.astype(jnp.float32) - mean
    g = dy.astype(jnp.float32)
    if relu:  # the ReLU's mask, from the same pre-activation the forward computed
        g = jnp.where(centred * a + bias > 0, g, 0.0)
    dbias = jnp.sum(g, _reduced(g))
    # sum(g * (x - mean)) as sum(g * x) - mean * sum(g): XLA:CPU wrote x - mean to memory in the
    # forward pass to feed that sum (5 % of a U-Net step); the same cancellation as the fast variance
    dscale = (jnp.sum(g * x.astype(jnp.float32), _reduced(g)) - mean * dbias) * rstd
    c = a * rstd * dscale / count
    # d(mean)/dx = 1/count, d(var)/dx = 2 (x - mean)/count: the statistics' own cotangents
    # (zero when only the running averages read them, as in segjax)
    dx = a * g - (c - 2 * dvar / count) * centred + (dmean - a * dbias) / count
    return dx.astype(x.dtype), dscale, dbias


fused_train_norm.defvjp(_fused_fwd, _fused_bwd)


def flax_variables(module: nn.Module, channels: int):
    """(running mean, running variance, scale, bias) as `nn.BatchNorm` creates them (names,
    collections, shapes, float32, initial values), inside `module`'s compact call."""
    ra_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = module.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return ra_mean, ra_var, scale, bias


class BatchNorm(nn.Module):
    """flax's `BatchNorm` (see the module docstring), then a ReLU when `relu`."""

    use_running_average: bool = False
    momentum: float = 0.9
    dtype: Any = jnp.float32
    axis_name: str | None = None
    relu: bool = False

    @nn.compact
    def __call__(self, x):
        ra_mean, ra_var, scale, bias = flax_variables(self, x.shape[-1])
        dtype = jnp.result_type(x.dtype, jnp.float32) if self.dtype is None else self.dtype
        if self.use_running_average:
            return _normalize(x.astype(jnp.float32), ra_mean.value, ra_var.value, scale, bias, self.relu, dtype)
        if self.is_initializing() or self.axis_name is None:
            relu = self.relu
            plain = lambda x, scale, bias: train_norm(x, scale, bias, relu, dtype)  # noqa: E731
            fused = lambda x, scale, bias: fused_train_norm(x, scale, bias, relu, dtype)  # noqa: E731
            y, mean, var = lax.platform_dependent(x, scale, bias, default=plain, cpu=fused)
        else:
            y, mean, var = train_norm(x, scale, bias, self.relu, dtype, self.axis_name)
        if not self.is_initializing():
            mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
