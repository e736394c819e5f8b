"""The forms a convolution takes on each backend: `aligned_conv` is `nn.Conv`'s convolution
(`blocks.Conv`) and picks, per platform, a form that computes the same function faster there."""

from __future__ import annotations

import functools
import itertools

import jax.numpy as jnp
from jax import lax

from segjax.kernels import conv3x3

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


SMALL_IMAGE_PIXELS = 16  # CPU: convolutions of images (H x W) with at most this many pixels as `patches_conv`


def _small_image(lhs, rhs, window_strides, padding, dn, kwargs) -> bool:
    """A channels-last 2D or 3D convolution of a tiny image (H x W <= SMALL_IMAGE_PIXELS pixels;
    in 3D any depth) with no stride, dilation or groups and non-negative padding: what
    `patches_conv` computes."""
    nd = lhs.ndim - 2
    channels_last = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == (
        (0, nd + 1, *range(1, nd + 1)),
        (nd + 1, nd, *range(nd)),
        (0, nd + 1, *range(1, nd + 1)),
    )
    plain = isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding)
    undilated = all(d == 1 for d in (kwargs.get("rhs_dilation") or (1,)))
    return (
        nd in (2, 3)
        and channels_last
        and plain
        and undilated
        and set(window_strides) <= {1}
        and _ungrouped_undilated(kwargs)
        and lhs.shape[-3] * lhs.shape[-2] <= SMALL_IMAGE_PIXELS
    )


def patches_conv(lhs, rhs, padding, precision=None, preferred_element_type=None):
    """A stride-1 channels-last convolution (NHWC/HWIO or NDHWC/DHWIO) as one matrix product of
    the image's patches (each window's pixels side by side along channels, in the kernel's order)
    with the kernel: the same products.

    Why: XLA:CPU's convolution is very slow on images of a few pixels, the deepest levels of a
    U-Net on small inputs (benchmarks/RESULTS.md, session 20: a 3x3 convolution of 4 x 2^2 x 768
    -> 256, 22 ms; 2 x 2^2 x 1024 -> 1024, 144 ms; as patches 0.9 and 5.4 ms). With a few pixels
    the patches (kernel size x the input) cost nothing, and the kernel is used as it is stored (a
    depth-folded 3D form would copy it, and its gradient, in another order: session 21)."""
    nd = lhs.ndim - 2
    window, co = rhs.shape[:nd], rhs.shape[-1]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], window, (1,) * nd, padding)
    x = jnp.pad(lhs, ((0, 0), *(tuple(p) for p in padding), (0, 0)))
    out = [x.shape[1 + i] - window[i] + 1 for i in range(nd)]
    taps = itertools.product(*(range(k) for k in window))
    patches = jnp.concatenate(
        [x[(slice(None), *(slice(o, o + n) for o, n in zip(tap, out, strict=True)))] for tap in taps], axis=-1
    )
    return lax.dot_general(
        patches,
        rhs.reshape(-1, co),
        (((nd + 1,), (0,)), ((), ())),
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
      input for the weight gradient); 2D and 3D ones of images of at most 16 pixels (H x W) as
      `patches_conv` (a matrix product: XLA:CPU's convolution is 10-25x slower there); 3x3 and
      3x3x3 ones as `conv3x3.conv` where its rule says and its kernels are built (XLA:CPU's weight
      gradient at 16-64 channels runs on one core; the kernel's on all, 2-7x faster; with up to
      64 x 64 channels the forward pass and input gradient too, 1.1-1.8x; 3D on the volume, no
      folded copies); other 3D ones as `depth_folded_conv` (XLA:CPU's 3D convolution is ~10x slower).
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
    elif _small_image(lhs, rhs, window_strides, padding, dn, kwargs):
        forms["cpu"] = functools.partial(patches_conv, padding=padding, **_product_options(kwargs))
    elif conv3x3.applies(lhs, rhs, window_strides, padding, **kwargs) and conv3x3.available():
        forms["cpu"] = conv3x3.conv  # 2D, or 3D on the volume itself (no folded copies)
    elif _foldable(lhs, rhs, padding, dn, kwargs):
        folded = {k: v for k, v in kwargs.items() if k not in ("dimension_numbers", "lhs_dilation")}
        forms["cpu"] = functools.partial(depth_folded_conv, window_strides=window_strides, padding=padding, **folded)
    if not forms:
        return conv(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, default=conv, **forms)
