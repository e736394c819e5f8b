"""Layer forms: each faster form of a layer (segjax/models/blocks.py, conv_forms.py) equals the
textbook layer it replaces, and is chosen on the platforms it was measured on."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.models import blocks, conv_forms

CONV_OPERANDS = r"stablehlo\.convolution.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)"


def lowered_text(module, x, platform: str, variables=None) -> str:
    """StableHLO of `module.apply` (jitted) on x as lowered for `platform` ("cpu", "cuda"),
    with the module's initial variables unless given."""
    variables = module.init(jax.random.PRNGKey(0), x) if variables is None else variables
    return jax.jit(module.apply).trace(variables, x).lower(lowering_platforms=(platform,)).as_text()


def conv_and_dot_counts(module, x, platform: str) -> tuple[int, int]:
    """How many convolutions and matrix products `module` lowers to on `platform`."""
    text = lowered_text(module, x, platform)
    return len(re.findall(r"stablehlo\.convolution", text)), len(re.findall(r"stablehlo\.dot_general", text))


@pytest.mark.parametrize("dims", [2, 3])
def test_transpose_conv_as_matmul_equals_the_textbook_layer(dims):
    shape = (2, 3, 4, 5, 6)[-(dims + 2) :]
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref = nn.ConvTranspose(7, (2,) * dims, strides=(2,) * dims)
    params = ref.init(jax.random.PRNGKey(1), x)
    params = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    ours = blocks.TransposeConv2x(7, dims)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_map(
        jnp.shape, params
    )
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    grad_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    grad_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grad_ours), jax.tree_util.tree_leaves(grad_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_the_textbook_layer(dims, ties):
    """Same values and input gradient as flax's reduce-window max-pool, also when a window holds
    its maximum twice or more (small integers after a ReLU: many all-zero windows), where the
    textbook gradient goes to the first maximum in row-major window order."""

    shape = (2, 8, 6, 4, 3)[-(dims + 2) :]
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    if ties:
        x = jax.nn.relu(jnp.round(x))
    window = (2,) * dims
    ref = lambda v: nn.max_pool(v, window, strides=window)  # noqa: E731
    ours = lambda v: blocks.pool(v, "max", dims)  # noqa: E731
    np.testing.assert_array_equal(ours(x), ref(x))
    weights = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    grad_ours = jax.grad(lambda v: jnp.sum(ours(v) * weights))(x)
    grad_ref = jax.grad(lambda v: jnp.sum(ref(v) * weights))(x)
    np.testing.assert_array_equal(grad_ours, grad_ref)
    assert int(jnp.sum(grad_ours != 0)) == weights.size  # one winner per window
    poisoned = x.reshape(-1).at[jnp.arange(1, x.size, 7)].set(jnp.nan).reshape(x.shape)  # not first in a window
    np.testing.assert_array_equal(np.isnan(ours(poisoned)), np.isnan(ref(poisoned)))
    assert bool(jnp.isnan(ours(poisoned)).any())
    if ties:  # the case that tells the forms apart: plenty of windows with a repeated maximum
        windows = np.asarray(x).reshape(shape[0], *(n for s in shape[1:-1] for n in (s // 2, 2)), shape[-1])
        axes = tuple(range(2, 2 * dims + 1, 2))
        repeated = (windows == windows.max(axis=axes, keepdims=True)).sum(axis=axes) > 1
        assert repeated.mean() > 0.2


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, strides",
    [
        ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1)),  # an RGB image's first convolution
        ((1, 8, 8, 8, 1), (3, 3, 3, 1, 2), (2, 2, 2)),  # a 1-channel volume, strided, 2 outputs
        ((2, 10, 10, 16), (1, 1, 16, 2), (1, 1)),  # a 1x1 head with 2 classes
    ],
)
def test_channel_padded_conv_equals_the_plain_convolution(lhs_shape, rhs_shape, strides):
    """Zero channels change neither the output nor the gradients (`conv_forms.aligned_conv`'s CUDA form)."""

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    spatial = "DHW"[-(len(lhs_shape) - 2) :]
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    plain = lambda a, b: lax.conv_general_dilated(a, b, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    padded = lambda a, b: conv_forms.channel_padded_conv(a, b, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    np.testing.assert_allclose(padded(lhs, rhs), plain(lhs, rhs), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, ref in zip(
        jax.grad(loss(padded), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_aligned_conv_pads_channels_only_when_lowered_for_cuda():
    """nn.Conv's parameters are unchanged; the CUDA program convolves 8 channels, the CPU one 3."""

    conv = blocks.Conv(4, (3, 3))
    x = jnp.ones((1, 8, 8, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 4), "bias": (4,)}}
    operands = lambda platform: re.findall(CONV_OPERANDS, lowered_text(conv, x, platform, variables))  # noqa: E731
    assert operands("cpu") == [("tensor<1x8x8x3xf32>", "tensor<3x3x3x4xf32>")]
    assert operands("cuda") == [("tensor<1x8x8x8xf32>", "tensor<3x3x8x8xf32>")]
    aligned = jnp.ones((1, 8, 8, 8))
    assert "case" not in lowered_text(blocks.Conv(16, (3, 3)), aligned, "cuda")  # nothing to pad: no switch


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, strides, padding, rhs_dilation",
    [
        ((2, 8, 8, 8, 3), (3, 3, 3, 3, 4), (1, 1, 1), "SAME", None),  # U-Net 3D block
        ((1, 9, 8, 7, 5), (5, 5, 5, 5, 6), (1, 1, 1), "SAME", None),  # V-Net's 5x5x5, odd sizes
        ((2, 8, 8, 8, 4), (2, 2, 2, 4, 8), (2, 2, 2), "VALID", None),  # V-Net's strided down-convolution
        ((1, 8, 8, 8, 2), (1, 1, 1, 2, 3), (1, 1, 1), "SAME", None),  # a 1x1x1 head
        ((1, 10, 9, 8, 2), (3, 3, 3, 2, 3), (2, 1, 1), ((2, 1), (1, 0), (0, 2)), (2, 1, 2)),  # uneven pads, dilation
    ],
)
def test_depth_folded_conv_equals_the_3d_convolution(lhs_shape, rhs_shape, strides, padding, rhs_dilation):
    """The 2D form of a 3D convolution (`conv_forms.aligned_conv`'s CPU form): same output and gradients."""

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    plain = lambda a, b: lax.conv_general_dilated(  # noqa: E731
        a, b, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dn
    )
    folded = lambda a, b: conv_forms.depth_folded_conv(a, b, strides, padding, rhs_dilation=rhs_dilation)  # noqa: E731
    ref = plain(lhs, rhs)
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(folded(lhs, rhs), ref, rtol=1e-5, atol=1e-5 * scale)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, want in zip(
        jax.grad(loss(folded), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        assert ours.shape == want.shape
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_3d_convolutions_lower_to_2d_ones_on_cpu_only():
    """nn.Conv 3D: the CPU program holds only 2D (rank-4) convolutions, the CUDA one a 3D one;
    grouped 3D convolutions (vmapped seeds) keep the plain form everywhere."""

    def convolution_ranks(conv, x, platform):
        operands = re.findall(CONV_OPERANDS, lowered_text(conv, x, platform))
        return {lhs.count("x") for lhs, _ in operands}  # "tensor<1x8x8x8x2xf32>": rank = count of 'x'

    x = jnp.ones((1, 8, 8, 8, 16))
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3)), x, "cpu") == {4}
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3)), x, "cuda") == {5}
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3), feature_group_count=2), x, "cpu") == {5}
    conv = blocks.Conv(16, (3, 3, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 16, 16), "bias": (16,)}}


@pytest.mark.parametrize("dims", [2, 3])
def test_pointwise_conv_equals_the_1x1_convolution_and_is_a_product_on_cpu_only(dims):
    """A 1x1(x1) nn.Conv (segjax's heads): on CPU one matrix product, the same output and
    gradients as flax's own convolution; CUDA keeps the convolution; a strided or padded 1x1
    convolution is no plain product and keeps it on CPU too."""

    x = jax.random.normal(jax.random.PRNGKey(0), (2, *(6, 5, 4)[:dims], 7))
    ours, ref = blocks.Conv(3, (1,) * dims), nn.Conv(3, (1,) * dims)
    variables = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_map(
        jnp.shape, variables
    )
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    loss = lambda m: lambda v, a: jnp.sum(jnp.sin(m.apply(v, a)))  # noqa: E731
    got, want = jax.grad(loss(ours), (0, 1))(variables, x), jax.grad(loss(ref), (0, 1))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    assert conv_and_dot_counts(ours, x, "cpu") == (0, 1)
    assert conv_and_dot_counts(ours, x, "cuda")[0] == 1
    assert conv_and_dot_counts(blocks.Conv(3, (1,) * dims, strides=2), x, "cpu")[0] == 1
    assert conv_and_dot_counts(blocks.Conv(3, (1,) * dims, padding=1), x, "cpu")[0] == 1


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, padding",
    [
        ((2, 2, 2, 5), (3, 3, 5, 4), "SAME"),  # a U-Net's 2 x 2 bottleneck
        ((1, 4, 4, 3), (3, 3, 3, 2), ((1, 1), (1, 1))),
        ((2, 3, 5, 2), (5, 5, 2, 3), "SAME"),  # V-Net's 5 x 5 window, wider than the image
        ((1, 4, 3, 2), (3, 3, 2, 2), ((0, 1), (2, 0))),  # uneven padding
        ((1, 3, 3, 2), (2, 2, 2, 3), "VALID"),
        ((2, 2, 2, 2, 5), (3, 3, 3, 5, 4), "SAME"),  # a 3D U-Net's 2^3 bottleneck
        ((1, 5, 2, 3, 2), (3, 3, 3, 2, 3), ((1, 1), (0, 1), (2, 0))),  # deeper than wide, uneven padding
        ((1, 3, 4, 4, 2), (2, 3, 1, 2, 2), "VALID"),
    ],
)
def test_patches_conv_equals_the_convolution(lhs_shape, rhs_shape, padding):
    """The patches form of a small image's (or volume's) convolution: same output and gradients as lax's."""

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    nd = len(lhs_shape) - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    plain = lambda a, b: lax.conv_general_dilated(a, b, (1,) * nd, padding, dimension_numbers=dn)  # noqa: E731
    patches = lambda a, b: conv_forms.patches_conv(a, b, padding)  # noqa: E731
    ref = plain(lhs, rhs)
    np.testing.assert_allclose(patches(lhs, rhs), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, want in zip(
        jax.grad(loss(patches), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_small_images_are_convolved_as_patches_on_cpu_only():
    """nn.Conv on images of at most 16 pixels (2D, or 3D of any depth): on CPU a matrix
    product and no convolution; CUDA keeps the convolution; an 8 x 8 image keeps it on CPU too."""
    for x in (jnp.ones((2, 4, 4, 8)), jnp.ones((1, 2, 2, 2, 8))):
        conv = blocks.Conv(16, (3,) * (x.ndim - 2))
        assert conv_and_dot_counts(conv, x, "cpu") == (0, 1)
        assert conv_and_dot_counts(conv, x, "cuda")[0] == 1
        variables = conv.init(jax.random.PRNGKey(0), x)
        y = jax.random.normal(jax.random.PRNGKey(1), x.shape)
        want = nn.Conv(16, (3,) * (x.ndim - 2)).apply(variables, y)
        np.testing.assert_allclose(conv.apply(variables, y), want, rtol=1e-5, atol=1e-5)
    assert conv_and_dot_counts(blocks.Conv(16, (3, 3)), jnp.ones((2, 8, 8, 8)), "cpu")[0] == 1


@pytest.mark.parametrize("dims, channels", [(2, (4, 3)), (2, (2, 5, 3)), (3, (3, 2))])
def test_concat_conv_equals_nn_conv_over_the_concatenation(dims, channels):
    """`blocks.ConcatConv` (the decoder's first convolution): nn.Conv's parameters and initial
    values, and the same output and gradients (parameters and every part) as nn.Conv applied to
    the concatenated parts; on CPU the concatenation is not built."""

    keys = jax.random.split(jax.random.PRNGKey(0), len(channels))
    parts = [jax.random.normal(k, (2, *(6, 5, 4)[:dims], c)) for k, c in zip(keys, channels, strict=True)]
    kernel = (3,) * dims
    ours, ref = blocks.ConcatConv(6, kernel, name="conv"), nn.Conv(6, kernel, name="conv")
    joined = lambda ps: jnp.concatenate(ps, axis=-1)  # noqa: E731
    variables = ref.init(jax.random.PRNGKey(1), joined(parts))
    mine = ours.init(jax.random.PRNGKey(1), parts)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(variables, parts), ref.apply(variables, joined(parts)), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.PRNGKey(2), ref.apply(variables, joined(parts)).shape)
    got = jax.grad(lambda v, ps: jnp.sum(ours.apply(v, ps) * weights), (0, 1))(variables, parts)
    want = jax.grad(lambda v, ps: jnp.sum(ref.apply(v, joined(ps)) * weights), (0, 1))(variables, parts)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    concatenations = lambda platform: lowered_text(ours, parts, platform, variables).count("stablehlo.concatenate")  # noqa: E731

    assert concatenations("cuda") == 1
    assert concatenations("cpu") == (len(parts) if dims == 3 else 0)  # 3D: each part's depth folding only
