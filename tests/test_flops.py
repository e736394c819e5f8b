"""Model FLOPs from the jaxpr, against products counted by hand and XLA's CPU cost analysis."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.flops import count_flops
from segjax.kernels import conv3x3
from segjax.models import blocks, build_model
from tests.conftest import load_config


def test_matrix_product_and_dense_layer():
    a, b = jnp.ones((4, 5)), jnp.ones((5, 7))
    assert count_flops(jnp.dot, a, b) == 2 * 4 * 5 * 7
    batched = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
    assert count_flops(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), *batched) == 2 * 3 * 4 * 5 * 6
    dense = nn.Dense(7)
    variables = dense.init(jax.random.PRNGKey(0), a)
    assert count_flops(dense.apply, variables, a) == 2 * 4 * 5 * 7  # the bias add is not a product


@pytest.mark.parametrize(
    "x_shape, kernel_shape, strides, groups, out_shape",
    [
        ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), 1, (2, 8, 8, 4)),
        ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), 1, (2, 4, 4, 4)),
        ((1, 6, 6, 4), (3, 3, 2, 6), (1, 1), 2, (1, 6, 6, 6)),  # grouped: 2 input channels per output
        ((1, 4, 4, 4, 1), (2, 2, 2, 1, 8), (2, 2, 2), 1, (1, 2, 2, 2, 8)),
    ],
)
def test_convolutions_count_window_times_input_channels_per_output(x_shape, kernel_shape, strides, groups, out_shape):
    spatial = "DHW"[-(len(x_shape) - 2) :]
    dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

    def conv(x, k):
        return lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=dn, feature_group_count=groups)

    x, k = jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
    assert jax.eval_shape(conv, x, k).shape == out_shape
    per_output = 1
    for n in kernel_shape[:-1]:
        per_output *= n
    expected = 2
    for n in out_shape:
        expected *= n
    assert count_flops(conv, x, k) == expected * per_output


def test_loops_conditionals_and_nested_jit():
    w = jnp.ones((6, 6))
    step = jax.jit(lambda h: jnp.tanh(h @ w))
    h = jnp.ones((2, 6))
    one = 2 * 2 * 6 * 6
    assert count_flops(step, h) == one
    assert count_flops(lambda h: lax.scan(lambda c, _: (step(c), None), h, None, length=5)[0], h) == 5 * one
    cheap_or_dear = lambda p, h: lax.cond(p, lambda: step(step(h)), lambda: step(h))  # noqa: E731
    assert count_flops(cheap_or_dear, True, h) == one


def test_aligned_conv_counts_the_real_channels():
    """On CPU the jaxpr holds both platform branches; the zero-padded CUDA one must not count."""
    conv = blocks.Conv(4, (3, 3), use_bias=False)
    x = jnp.ones((1, 8, 8, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert count_flops(conv.apply, variables, x) == 2 * 8 * 8 * 4 * 3 * 3 * 3


def test_unet_forward_matches_xla_cost_analysis_up_to_padding():
    """XLA's CPU analysis skips products with the zero padding at image borders and adds the
    elementwise work; the two nearly cancel for a U-Net."""
    cfg = load_config("default").model
    cfg.depth, cfg.base_features = 2, 8
    model = build_model(cfg, 2)
    x = jnp.ones((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    with conv3x3.switched_off():  # XLA's analysis counts its own convolutions, not segjax's CPU kernels
        cost = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(variables, x).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = count_flops(forward, variables, x)
    assert xla * 0.99 < ours < xla * 1.04  # measured 1.015 (XLA also counts the elementwise work)


@pytest.mark.skipif(not conv3x3.available(), reason="needs the CPU backend and a C++ compiler")
@pytest.mark.parametrize("dims", [2, 3])
def test_cpu_kernels_count_as_the_convolutions_they_compute(dims):
    """segjax's CPU kernels are FFI calls, not convolutions in the jaxpr: the count must be the same
    with them as with XLA's convolutions (and the kernel calls' own formulas the textbook ones)."""
    x, w = jnp.ones((2, *(4, 8, 32)[3 - dims :], 5)), jnp.ones((*(3,) * dims, 5, 16))
    window = 3**dims
    assert count_flops(conv3x3.forward, x, w) == 2 * np.prod(x.shape[:-1]) * 16 * window * 5
    dy = jnp.ones((*x.shape[:-1], 16))
    assert count_flops(conv3x3.weight_grad, x, dy) == 2 * window * 5 * 16 * np.prod(x.shape[:-1])
    cfg = load_config("default").model
    cfg.depth, cfg.base_features, cfg.spatial_dims = 2, 16, dims
    model = build_model(cfg, 2)
    image = jnp.ones((1, 64, 64, 3) if dims == 2 else (1, 8, 32, 32, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, train=False))
    with conv3x3.switched_off():
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
        assert conv3x3.FORWARD_TARGET not in str(jax.make_jaxpr(forward)(variables, image))
        without = count_flops(forward, variables, image)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    assert conv3x3.FORWARD_TARGET in str(jax.make_jaxpr(forward)(variables, image))
    assert count_flops(forward, variables, image) == without > 0
