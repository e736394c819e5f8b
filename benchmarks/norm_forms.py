"""Batch norm with its per-channel sums as matrix products: an experiment for issue 8 (GPU).

On the H100 a third of segjax's bf16 step is bandwidth-bound passes, 5.3 ms of 23 in batch-norm
and loss reductions (`RESULTS.md`, session 6). XLA reduces an (N, H, W, C) tensor over N, H, W
as a column reduction with only C (32 at full resolution) columns. The same sums are matrix
products with a long contraction: sum(x) = 1^T X and sum(x^2) = diag(X^T X) (X the M x C
flattening; bf16 x bf16 products are exact in float32, so with float32 accumulation these are
flax's float32 sums in another order), which cuBLAS might run closer to the memory bandwidth.
Measured on the H100 (`RESULTS.md`, session 16): it does not; flax's layer is the fastest form
(2.0 TB/s over its least traffic) and no form moves the training step, so none is a default.

`BatchNorm(form=...)` is `flax.linen.BatchNorm` as segjax uses it (same parameters, statistics,
momentum, epsilon, fast variance, float32 statistics, output dtype; the class name keeps the
parameter tree `BatchNorm_0`), with the statistics computed as:

  dot   forward sums as the two products above; JAX differentiates them (the backward's scale
        and bias sums stay XLA reductions)
  vjp   the same forward, and a hand-written backward whose sums are products too:
        sum(dy) = 1^T dY, sum(dy * x) = diag(dY^T X); dx in one elementwise pass
  rows  flax's sums, with the reduction split in two: (N*H, W*C) summed over rows, then (W, C)

`use(form)` builds segjax's networks with it (`blocks.BatchNorm`).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.models import batchnorm, blocks

EPSILON = batchnorm.EPSILON  # flax's default, as segjax uses it
FORMS = ("dot", "vjp", "rows")


def _precision(x):
    """float32 products must not go through TF32 on a GPU; bf16 ones are exact anyway."""
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT


def product_sums(a, b):
    """(sum of a, sum of a * b) over the rows of two M x C matrices, float32, as the matrix
    products 1^T A and diag(A^T B)."""
    dot = functools.partial(jnp.dot, precision=_precision(a), preferred_element_type=jnp.float32)
    return dot(jnp.ones((a.shape[0],), a.dtype), a), jnp.diagonal(dot(a.T, b.astype(a.dtype)))


def channel_sums(x):
    """(sum of x, sum of x^2) over all but the last axis, float32, as two matrix products."""
    flat = x.reshape(-1, x.shape[-1])
    return product_sums(flat, flat)


def row_split_sums(x):
    """flax's float32 sums as a two-stage reduction: (N*H, W*C) over rows, then (W, C)."""
    c = x.shape[-1]
    x32 = x.astype(jnp.float32).reshape(-1, x.shape[-2] * c)
    s1, s2 = jnp.sum(x32, 0), jnp.sum(x32 * x32, 0)
    return s1.reshape(-1, c).sum(0), s2.reshape(-1, c).sum(0)


def _stats(x, form):
    m = x.size // x.shape[-1]
    s1, s2 = row_split_sums(x) if form == "rows" else channel_sums(x)
    mean = s1 / m
    return mean, jnp.maximum(0.0, s2 / m - mean * mean)


def _normalize(x, mean, var, scale, bias, dtype):
    """flax's `_normalize`: float32 arithmetic, cast to `dtype` at the end."""
    y = (x - mean) * (lax.rsqrt(var + EPSILON) * scale) + bias
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train_norm(x, scale, bias, dtype):
    return _train_norm_fwd(x, scale, bias, dtype)[0]


def _train_norm_fwd(x, scale, bias, dtype):
    mean, var = _stats(x, "dot")
    return (_normalize(x, mean, var, scale, bias, dtype), mean, var), (x, scale, mean, var)


def _train_norm_bwd(dtype, res, cotangents):
    x, scale, mean, var = res
    dy, dmean, dvar = cotangents
    m = x.size // x.shape[-1]
    rstd = lax.rsqrt(var + EPSILON)
    dbias, dy_x = product_sums(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]))
    dscale = (dy_x - mean * dbias) * rstd
    xhat = (x - mean) * rstd
    dx = rstd * scale * (dy - dbias / m - xhat * (dscale / m)) + dmean / m + dvar * 2 * (x - mean) / m
    return dx.astype(x.dtype), dscale, dbias


_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` (axis -1, epsilon 1e-5, float32 parameters and statistics) with its
    training-time sums in another form; inference reads the running statistics as flax does."""

    use_running_average: bool = False
    momentum: float = 0.9
    dtype: object = jnp.float32
    axis_name: str | None = None
    form: str = "dot"
    relu: bool = False  # a ReLU after it, as segjax's `Norm(relu=True)` asks of its batch norm

    @nn.compact
    def __call__(self, x):
        ra_mean, ra_var, scale, bias = batchnorm.flax_variables(self, x.shape[-1])
        dtype = jnp.result_type(x.dtype, jnp.float32) if self.dtype is None else self.dtype
        if self.use_running_average:
            y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, dtype)
            return nn.relu(y) if self.relu else y
        if self.axis_name is not None:
            raise NotImplementedError("the experiment covers single-program batch norm only")
        if self.form == "vjp":
            y, mean, var = _train_norm(x, scale, bias, dtype)
        else:
            mean, var = _stats(x, self.form)
            y = _normalize(x, mean, var, scale, bias, dtype)
        if not self.is_initializing():
            mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return nn.relu(y) if self.relu else y


@contextlib.contextmanager
def use(form: str):
    """Build segjax's networks with `BatchNorm(form=form)` in place of flax's."""
    saved = blocks.BatchNorm
    blocks.BatchNorm = functools.partial(BatchNorm, form=form)
    try:
        yield
    finally:
        blocks.BatchNorm = saved


def main() -> None:
    """One batch norm + ReLU, forward and backward, per form: ms and the traffic-bound rate."""
    import argparse
    import statistics
    import time

    import numpy as np

    parser = argparse.ArgumentParser(description="batch norm + ReLU forward+backward, per form")
    parser.add_argument("--shape", default="16,512,512,32")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)
    # The least traffic a fused forward+backward needs: read x (stats), read x + write y
    # (normalise), read dy + y (backward sums), read dy + x + write dx: 8 tensor passes.
    gbytes = 8 * x.size * dtype.itemsize / 1e9
    print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; {shape} {args.dtype}; 8 passes = {gbytes:.2f} GB")
    modules = {"flax": nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)}
    modules.update({form: BatchNorm(dtype=dtype, form=form) for form in FORMS})
    for name, module in modules.items():
        variables = module.init(jax.random.key(0), x)

        def loss(params, x, module=module, variables=variables):
            y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.vdot(jax.nn.relu(y).astype(jnp.float32), g.astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(variables["params"], x))
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            jax.block_until_ready(step(variables["params"], x))
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1000
        print(f"{name:<6} {ms:8.3f} ms  {gbytes / ms * 1000:7.0f} GB/s at 8 passes", flush=True)


if __name__ == "__main__":
    main()
