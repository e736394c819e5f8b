"""N-D building blocks shared by every network (2D or 3D by `spatial_dims`)."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from segjax.errors import ConfigError
from segjax.models import batchnorm, conv_forms

NORMS = ("batch", "group", "none")
POOLS = ("max", "avg")
UPSAMPLES = ("transpose", "resize")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.{name}={value!r} is not valid; choose one of {list(choices)}")


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """flax's `lecun_normal` (nn.Conv's default) for a [k..., in, out] kernel, drawn as the
    [prod(shape[:-1]), out] matrix and reshaped: the same fan-in and bit for bit the same numbers
    (threefry's counters are each element's row-major index; tested), but XLA:CPU compiles the
    rank-2 draw in 0.15-0.17 s where a 3x3x4x8 (3x3x3x4x8) kernel's takes 1.0 (1.5) s on 2 cores:
    most of a cold start's compile time, once per kernel shape."""
    matrix = nn.initializers.lecun_normal()(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
    return matrix.reshape(shape)


# nn.Conv with the same parameters and initial values (`kernel_init`), in the form each backend runs fastest
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_forms.aligned_conv, kernel_init=kernel_init)
BatchNorm = batchnorm.BatchNorm  # a module attribute so benchmarks can swap in another form of the same layer


class Norm(nn.Module):
    """Batch norm, group norm or identity, chosen by name; then a ReLU when `relu` (batch norm
    computes both in one layer with a hand-written backward: `segjax.models.batchnorm`)."""

    kind: str = "batch"
    groups: int = 8
    dtype: Any = jnp.float32
    axis_name: str | None = None  # batch norm over this pmap axis too (cross-replica statistics)
    relu: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "batch":
            return BatchNorm(
                use_running_average=not train, momentum=0.9, dtype=self.dtype, axis_name=self.axis_name, relu=self.relu
            )(x)
        if self.kind == "group":
            groups = self.groups
            while x.shape[-1] % groups:
                groups //= 2
            x = nn.GroupNorm(num_groups=groups, dtype=self.dtype)(x)
        return nn.relu(x) if self.relu else x


class ConcatConv(nn.Module):
    """`nn.Conv` (stride 1, "SAME"; the same parameters and initialisation) over the channel
    concatenation of `parts`. On CPU the concatenation is never built: the result is the sum of
    each part's convolution with its slice of the kernel (the same products). Why: XLA:CPU ran a
    U-Net decoder's first convolution (8 x 128^2 x (32 + 32) -> 32) with its gradients in 46 ms
    as two convolutions and 96 ms as one over the concatenation; ~1 % of a U-Net training step
    (benchmarks/RESULTS.md, session 19).
    """

    features: int
    kernel_size: tuple[int, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, parts):
        channels = [p.shape[-1] for p in parts]
        shape = (*self.kernel_size, sum(channels), self.features)
        kernel = self.param("kernel", kernel_init, shape, jnp.float32).astype(self.dtype)
        parts = [p.astype(self.dtype) for p in parts]
        d = len(self.kernel_size)
        spec = "N" + "DHW"[-d:] + "C", "DHW"[-d:] + "IO", "N" + "DHW"[-d:] + "C"
        conv = functools.partial(
            conv_forms.aligned_conv, window_strides=(1,) * d, padding="SAME", dimension_numbers=spec
        )
        ends = np.cumsum(channels)

        def joined(kernel, *parts):
            return conv(jnp.concatenate(parts, axis=-1), kernel)

        def summed(kernel, *parts):
            sums = [conv(p, kernel[..., end - c : end, :]) for p, c, end in zip(parts, channels, ends, strict=True)]
            return functools.reduce(jnp.add, sums)

        y = lax.platform_dependent(kernel, *parts, cpu=summed, default=joined)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class ConvBlock(nn.Module):
    """`num_convs` x (conv -> norm -> ReLU), then optional dropout."""

    features: int
    spatial_dims: int = 2
    num_convs: int = 2
    kernel_size: int = 3
    norm: str = "batch"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        """`x`: an array, or a sequence of arrays the first convolution reads as their channel
        concatenation (`ConcatConv`: the same layer and parameters)."""
        kernel = (self.kernel_size,) * self.spatial_dims
        bias = self.norm == "none"
        if isinstance(x, list | tuple) and len(x) == 1:
            x = x[0]
        for i in range(self.num_convs):
            if isinstance(x, list | tuple):
                x = ConcatConv(self.features, kernel, use_bias=bias, dtype=self.dtype, name=f"Conv_{i}")(x)
            else:
                x = Conv(self.features, kernel, use_bias=bias, dtype=self.dtype, name=f"Conv_{i}")(x)
            x = Norm(self.norm, dtype=self.dtype, axis_name=self.norm_axis_name, relu=True)(x, train)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


def block_kwargs(module) -> dict:
    """The ConvBlock knobs a network module carries under the same names."""
    return dict(
        spatial_dims=module.spatial_dims,
        num_convs=module.num_convs,
        kernel_size=module.kernel_size,
        norm=module.norm,
        dtype=module.dtype,
        norm_axis_name=module.norm_axis_name,
    )


def pool(x: jax.Array, kind: str, spatial_dims: int) -> jax.Array:
    """2x down-sampling in every spatial dimension."""
    window = (2,) * spatial_dims
    if kind == "max":
        return max_pool2x(x, spatial_dims)
    return nn.avg_pool(x, window, strides=window)


def max_pool2x(x: jax.Array, spatial_dims: int) -> jax.Array:
    """2x max-pooling as a chain of elementwise selects over the window's 2**d offsets.

    The window is exposed by a reshape; each offset's slice replaces the running maximum only
    where it is strictly larger, so ties go to the first element in row-major window order:
    the same values and the same input gradient as `nn.max_pool`, ties included (tested).
    Why: XLA:CPU lowers the reduce-window form's gradient to a variadic reduce-window plus a
    scatter (43 ms forward + backward on 8 x 128^2 x 32), and a reshape + `max` form to a
    compare, a count reduction and a division (11 ms); the select chain's gradient is one
    elementwise fusion (1 ms). A NaN anywhere in a window gives NaN, as `nn.max_pool`.
    """
    blocks = [n for size in x.shape[1 : 1 + spatial_dims] for n in (size // 2, 2)]
    windows = x.reshape(x.shape[0], *blocks, x.shape[-1])
    out = None
    for offsets in itertools.product((0, 1), repeat=spatial_dims):
        index = (slice(None), *(i for o in offsets for i in (slice(None), o)), slice(None))
        piece = windows[index]
        out = piece if out is None else jnp.where((piece > out) | jnp.isnan(piece), piece, out)  # NaN propagates
    return out


class TransposeConv2x(nn.Module):
    """The 2x2(x2) stride-2 transposed convolution, computed as one matmul plus depth-to-space.

    Mathematically identical to `nn.ConvTranspose(features, (2,)*d, strides=(2,)*d)` (same
    parameter shapes and initialisation; tested against it): each input pixel produces its own
    2x2(x2) output block, so the layer is a dense projection to 2**d * features channels
    rearranged in space. XLA CPU runs this form (and its gradient) much faster than a
    strided transposed convolution.
    """

    features: int
    spatial_dims: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.spatial_dims
        kernel = self.param("kernel", kernel_init, (2,) * d + (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kernel = jnp.flip(kernel, axis=tuple(range(d))).astype(self.dtype)  # lax.conv_transpose's orientation
        cin, n, sizes = x.shape[-1], x.shape[0], x.shape[1:-1]
        # [c, block..., o] so one 2-D matmul gives every output block's channels at once
        kernel = jnp.moveaxis(kernel, d, 0).reshape(cin, -1)
        y = x.astype(self.dtype).reshape(-1, cin) @ kernel
        y = y.reshape(n, *sizes, *(2,) * d, self.features)
        # depth-to-space: interleave each spatial axis with its block axis
        order = [0] + [a for i in range(d) for a in (1 + i, 1 + d + i)] + [1 + 2 * d]
        y = y.transpose(order).reshape(n, *(2 * s for s in sizes), self.features)
        return y + bias.astype(self.dtype)


class Upsample(nn.Module):
    """2x up-sampling to `features` channels: transposed conv, or resize + conv."""

    features: int
    kind: str = "transpose"
    spatial_dims: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "transpose":
            return TransposeConv2x(self.features, self.spatial_dims, self.dtype)(x)
        shape = (x.shape[0], *(d * 2 for d in x.shape[1:-1]), x.shape[-1])
        x = jax.image.resize(x, shape, method="bilinear")
        return Conv(self.features, (3,) * self.spatial_dims, dtype=self.dtype)(x)
