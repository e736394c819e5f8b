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
from segjax.kernels import conv3x3
from segjax.models import batchnorm

NORMS = ("batch", "group", "none")
POOLS = ("max", "avg")
UPSAMPLES = ("transpose", "resize")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.{name}={value!r} is not valid; choose one of {list(choices)}")


CUDA_CHANNEL_MULTIPLE = 8  # cuDNN's tensor-core convolutions need channel counts divisible by 8


def channel_padded_conv(lhs, rhs, window_strides, padding, *, multiple=CUDA_CHANNEL_MULTIPLE, **kwargs):
    """`lax.conv_general_dilated` with the input and output channel counts zero-padded up to a
    multiple of `multiple` (input channels in both operands, output channels in the kernel, the
    extra outputs sliced off): the same result and gradients, in tensor-core-friendly shapes."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.pop("dimension_numbers", None))
    lhs_c, rhs_in, rhs_out, out_c = dn.lhs_spec[1], dn.rhs_spec[1], dn.rhs_spec[0], dn.out_spec[1]
    pad_in, pad_out = -lhs.shape[lhs_c] % multiple, -rhs.shape[rhs_out] % multiple

    def pad(x, axis_amounts):
        widths = [(0, 0)] * x.ndim
        for axis, amount in axis_amounts:
            widths[axis] = (0, amount)
        return jnp.pad(x, widths)

    lhs, rhs_padded = pad(lhs, [(lhs_c, pad_in)]), pad(rhs, [(rhs_in, pad_in), (rhs_out, pad_out)])
    y = lax.conv_general_dilated(lhs, rhs_padded, window_strides, padding, dimension_numbers=dn, **kwargs)
    return lax.slice_in_dim(y, 0, rhs.shape[rhs_out], axis=out_c)


_CHANNELS_LAST_3D = ((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))  # NDHWC, DHWIO, NDHWC


def depth_folded_conv(lhs, rhs, window_strides, padding, *, rhs_dilation=None, **kwargs):
    """A 3D convolution (NDHWC, DHWIO) computed as one 2D convolution: each of the kernel's depth
    taps becomes a block of input channels (the input, sliced at that tap's depth offsets, is
    concatenated along channels) and the output depth joins the batch. Same products, same result.

    Why: XLA:CPU has no fast 3D convolution; on 2 cores a 3x3x3 conv on 2 x 32^3 x 16 took 88 ms
    forward (240 ms with both gradients), the folded form 8 ms (34 ms) -- Eigen's 2D
    convolution. The copies (kernel depth x the input) are cheap next to that."""
    rd = tuple(rhs_dilation or (1, 1, 1))
    kd, sd = rhs.shape[0], window_strides[0]
    if isinstance(padding, str):
        dilated = [(k - 1) * r + 1 for k, r in zip(rhs.shape[:3], rd, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:4], dilated, window_strides, padding)
    (lo, hi), hw_padding = padding[0], tuple(padding[1:])
    x = jnp.pad(lhs, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    n, depth, h, w, c = x.shape
    out_depth = (depth - (kd - 1) * rd[0] - 1) // sd + 1
    taps = [lax.slice_in_dim(x, i * rd[0], i * rd[0] + sd * (out_depth - 1) + 1, sd, axis=1) for i in range(kd)]
    x2 = jnp.concatenate(taps, axis=-1).reshape(n * out_depth, h, w, kd * c)
    w2 = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(*rhs.shape[1:3], kd * c, rhs.shape[4])
    conv_2d = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides[1:],
        padding=hw_padding,
        rhs_dilation=rd[1:],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        **kwargs,
    )
    dn = lax.conv_dimension_numbers(x2.shape, w2.shape, ("NHWC", "HWIO", "NHWC"))
    if _small_image(x2, w2, window_strides[1:], hw_padding, dn, conv_2d.keywords):
        conv_2d = functools.partial(patches_conv, padding=hw_padding, **_product_options(kwargs))
    elif conv3x3.applies(x2, w2, **conv_2d.keywords) and conv3x3.available():
        conv_2d = conv3x3.conv  # the same convolution, segjax's CPU kernels
    y = conv_2d(x2, w2)
    return y.reshape(n, out_depth, *y.shape[1:])


def _foldable(lhs, rhs, padding, dn, kwargs) -> bool:
    """A plain channels-last 3D convolution `depth_folded_conv` computes (no groups, no input
    dilation, no negative padding)."""
    plain = isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding)
    return (
        lhs.ndim == 5
        and (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == _CHANNELS_LAST_3D
        and plain
        and _ungrouped_undilated(kwargs)
    )


def _ungrouped_undilated(kwargs) -> bool:
    """No feature or batch groups and no input dilation."""
    plain = all(kwargs.get(k, 1) == 1 for k in ("feature_group_count", "batch_group_count"))
    return plain and all(d == 1 for d in (kwargs.get("lhs_dilation") or (1,)))


def _pointwise(lhs, rhs, window_strides, padding, dn, kwargs) -> bool:
    """A 1x1(x1) channels-last convolution without stride, padding, dilation or groups: a matrix
    product over the channel axis."""
    nd = lhs.ndim
    channels_last = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == (
        (0, nd - 1, *range(1, nd - 1)),
        (nd - 1, nd - 2, *range(nd - 2)),
        (0, nd - 1, *range(1, nd - 1)),
    )
    unpadded = isinstance(padding, str) or all(lo == 0 and hi == 0 for lo, hi in padding)
    window = all(k == 1 for k in rhs.shape[:-2]) and set(window_strides) <= {1}
    return channels_last and _ungrouped_undilated(kwargs) and unpadded and window


def _product_options(kwargs) -> dict:
    """The convolution's keyword arguments a matrix product takes too."""
    return {k: kwargs[k] for k in ("precision", "preferred_element_type") if k in kwargs}


def pointwise_conv(lhs, rhs, precision=None, preferred_element_type=None):
    """A 1x1(x1) channels-last convolution as one `dot_general` over the channel axis: the same
    products. Why: XLA:CPU computes the convolution's weight gradient from a transposed copy of the
    input ([C, H, W, N], 12 ms of thread time for the U-Net head on 8 x 128^2 x 32), the product's
    from the input as it is (benchmarks/RESULTS.md, session 19: the U-Net step 1-3 % faster)."""
    return lax.dot_general(
        lhs,
        rhs.reshape(rhs.shape[-2:]),
        (((lhs.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


SMALL_IMAGE_PIXELS = 16  # CPU: 2D convolutions of images with at most this many pixels as `patches_conv`


def _small_image(lhs, rhs, window_strides, padding, dn, kwargs) -> bool:
    """A channels-last 2D convolution of a tiny image (<= SMALL_IMAGE_PIXELS pixels) with no
    stride, dilation or groups and non-negative padding: what `patches_conv` computes."""
    channels_last = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    plain = isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding)
    undilated = all(d == 1 for d in (kwargs.get("rhs_dilation") or (1,)))
    return (
        lhs.ndim == 4
        and channels_last
        and plain
        and undilated
        and set(window_strides) <= {1}
        and _ungrouped_undilated(kwargs)
        and lhs.shape[1] * lhs.shape[2] <= SMALL_IMAGE_PIXELS
    )


def patches_conv(lhs, rhs, padding, precision=None, preferred_element_type=None):
    """A stride-1 channels-last 2D convolution (NHWC, HWIO) as one matrix product of the image's
    patches (each window's pixels side by side along channels) with the kernel: the same products.

    Why: XLA:CPU's convolution is very slow on images of a few pixels, the deepest levels of a
    U-Net on small inputs (benchmarks/RESULTS.md, session 20: a 3x3 convolution of 4 x 2^2 x 768
    -> 256, 22 ms; 2 x 2^2 x 1024 -> 1024, 144 ms; as patches 0.9 and 5.4 ms). With a few pixels
    the patches (kernel size x the input) cost nothing."""
    kh, kw, ci, co = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    x = jnp.pad(lhs, ((0, 0), *(tuple(p) for p in padding), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate([x[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)], axis=-1)
    return lax.dot_general(
        patches,
        rhs.reshape(kh * kw * ci, co),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def aligned_conv(lhs, rhs, window_strides, padding, **kwargs):
    """`lax.conv_general_dilated` in the form each backend runs fastest (nn.Conv's
    `conv_general_dilated` hook, so parameters stay nn.Conv's; every form is the same function):

    - CUDA: `channel_padded_conv` when a channel count is not a multiple of 8. cuDNN runs a
      3-channel image's first convolution on a generic non-tensor-core kernel; on an H100 in bf16
      it was the slowest convolution per FLOP of the U-Net step (benchmarks/RESULTS.md).
    - CPU: 1x1(x1) convolutions as `pointwise_conv` (a matrix product: no transposed copy of the
      input for the weight gradient); 3D convolutions as `depth_folded_conv` (XLA:CPU's 3D
      convolution is ~10x slower); 2D ones of images of at most 16 pixels as `patches_conv` (a
      matrix product: XLA:CPU's convolution is 10-25x slower there); 2D 3x3 ones as
      `conv3x3.conv` when its kernel is built
      (XLA:CPU's weight gradient at 16-64 channels runs on one core; the kernel's on all, 2-7x
      faster; with up to 64 x 64 channels the forward pass and input gradient too, 1.1-1.8x).
    - otherwise the plain convolution (XLA:CPU would pay for padding zeros; GPUs run 3D natively).
    """
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kwargs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
    aligned = all(n % CUDA_CHANNEL_MULTIPLE == 0 for n in (lhs.shape[dn.lhs_spec[1]], rhs.shape[dn.rhs_spec[0]]))
    grouped = kwargs.get("feature_group_count", 1) != 1
    forms = {}
    if not (aligned or grouped):
        forms["cuda"] = functools.partial(channel_padded_conv, window_strides=window_strides, padding=padding, **kwargs)
    if _pointwise(lhs, rhs, window_strides, padding, dn, kwargs):
        forms["cpu"] = functools.partial(pointwise_conv, **_product_options(kwargs))
    elif _foldable(lhs, rhs, padding, dn, kwargs):
        folded = {k: v for k, v in kwargs.items() if k not in ("dimension_numbers", "lhs_dilation")}
        forms["cpu"] = functools.partial(depth_folded_conv, window_strides=window_strides, padding=padding, **folded)
    elif _small_image(lhs, rhs, window_strides, padding, dn, kwargs):
        forms["cpu"] = functools.partial(patches_conv, padding=padding, **_product_options(kwargs))
    elif conv3x3.applies(lhs, rhs, window_strides, padding, **kwargs) and conv3x3.available():
        forms["cpu"] = conv3x3.conv
    if not forms:
        return conv(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, default=conv, **forms)


Conv = functools.partial(nn.Conv, conv_general_dilated=aligned_conv)  # nn.Conv, same parameters
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
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32).astype(self.dtype)
        parts = [p.astype(self.dtype) for p in parts]
        d = len(self.kernel_size)
        spec = "N" + "DHW"[-d:] + "C", "DHW"[-d:] + "IO", "N" + "DHW"[-d:] + "C"
        conv = functools.partial(aligned_conv, window_strides=(1,) * d, padding="SAME", dimension_numbers=spec)
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
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2,) * d + (x.shape[-1], self.features), jnp.float32
        )
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
