"""segjax.kernels.conv3x3: the CPU forward and weight-gradient kernels against numpy, and the
convolution that uses them against `lax.conv_general_dilated` in value and both gradients."""

from __future__ import annotations

import ctypes
import functools
import platform
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.configuration import default_config
from segjax.kernels import conv3x3
from segjax.models import build_model

pytestmark = pytest.mark.skipif(not conv3x3.available(), reason="needs the CPU backend and a C++ compiler")


@functools.cache
def avx2_targets() -> tuple[str, str]:
    """(forward, weight gradient) FFI names of the kernels built with `-mno-avx512f`: the register
    tiles of CPUs without AVX-512, so an AVX-512 machine tests them too (it runs the other ones)."""
    path = Path(tempfile.mkdtemp()) / "conv3x3-avx2.so"
    conv3x3._build(conv3x3._compiler(), path, ("-mno-avx512f",))
    library = ctypes.cdll.LoadLibrary(str(path))
    names = ("segjax_test_avx2_forward", "segjax_test_avx2_weight_grad")
    jax.ffi.register_ffi_target(names[0], jax.ffi.pycapsule(library.SegjaxConv3x3Forward), platform="cpu")
    jax.ffi.register_ffi_target(names[1], jax.ffi.pycapsule(library.SegjaxConv3x3WeightGrad), platform="cpu")
    return names


def on_tiles(kernel, tiles: str):
    """`conv3x3.forward` or `weight_grad` on the tiles `-march=native` picks ('native') or on the
    AVX2 ones (x86-64 only)."""
    if tiles == "native":
        return kernel
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 tiles are x86-64's")
    forward, weight_grad = avx2_targets()
    return functools.partial(kernel, target=forward if kernel is conv3x3.forward else weight_grad)


def numpy_weight_grad(x, dy):
    """dw[kh, kw, i, o] = sum over n, h, w of x_padded[n, h + kh, w + kw, i] * dy[n, h, w, o]."""
    _, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [[np.einsum("nhwi,nhwo->io", xp[:, kh : kh + h, kw : kw + w], dy) for kw in range(3)] for kh in range(3)]
    return np.asarray(taps)


def numpy_conv(x, k):
    """y[n, h, w, o] = sum over kh, kw, i of x_padded[n, h + kh, w + kw, i] * k[kh, kw, i, o]."""
    _, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(
        np.einsum("nhwi,io->nhwo", xp[:, kh : kh + h, kw : kw + w], k[kh, kw].astype(np.float64))
        for kh in range(3)
        for kw in range(3)
    )


def lax_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    ("n", "h", "w", "ci", "co"),
    [
        (2, 5, 7, 3, 16),  # a 3-channel image; narrower than the 3x3 window's reach on both sides
        (1, 1, 1, 1, 16),  # one pixel: only the centre tap sees it
        (3, 9, 33, 20, 32),  # 20 input channels: row blocks of 12 and 8
        (2, 6, 8, 30, 48),  # 48 outputs: tiles of 16 columns, 24 rows + 6
        (1, 4, 40, 7, 64),  # 64 outputs: two tiles of 32 columns, one block of 7 rows
        (1, 3, 5, 50, 128),  # several column tiles
        (2, 4, 9, 27, 8),  # 8 outputs: one 8-wide tile, row blocks of 24 and 3
        (1, 3, 6, 10, 24),  # 24 outputs: a tile of 16 columns and one of 8
        (1, 2, 7, 5, 40),  # 40 outputs: 16 + 16 + 8
    ],
)
@pytest.mark.parametrize("tiles", ["native", "avx2"])
def test_weight_grad_matches_numpy(n, h, w, ci, co, tiles):
    rng = np.random.default_rng(ci * co + w)
    x = rng.standard_normal((n, h, w, ci)).astype(np.float32)
    dy = rng.standard_normal((n, h, w, co)).astype(np.float32)
    got = np.asarray(jax.jit(on_tiles(conv3x3.weight_grad, tiles))(x, dy))
    np.testing.assert_allclose(got, numpy_weight_grad(x, dy), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("n", "h", "w", "ci", "co"),
    [
        (2, 5, 7, 3, 16),  # a 3-channel image, 5 interior pixels: one tile of 5 (16 outputs)
        (1, 1, 1, 1, 32),  # one pixel: only the centre tap sees it
        (1, 3, 2, 4, 16),  # two pixels: both are edge pixels
        (2, 4, 30, 20, 32),  # 28 interior pixels: tiles of 12, 12 and 4
        (1, 3, 17, 7, 48),  # 48 outputs: three tiles of 16 channels, 14 + 1 pixels
        (1, 2, 9, 160, 32),  # 480 taps in five blocks of k: edge pixels see only some of them
        (1, 2, 6, 30, 64),  # two tiles of 32 channels
        (2, 3, 20, 6, 8),  # 8 outputs: 8-wide tiles of 14 + 4 pixels
        (1, 4, 11, 9, 24),  # 24 outputs: a tile of 16 channels and one of 8
        (1, 2, 9, 160, 40),  # 16 + 16 + 8 outputs, with five blocks of k
    ],
)
@pytest.mark.parametrize("tiles", ["native", "avx2"])
def test_forward_matches_numpy(n, h, w, ci, co, tiles):
    rng = np.random.default_rng(ci * co + w)
    x = rng.standard_normal((n, h, w, ci)).astype(np.float32)
    k = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
    got = np.asarray(jax.jit(on_tiles(conv3x3.forward, tiles))(x, k))
    np.testing.assert_allclose(got, numpy_conv(x, k), rtol=1e-4, atol=1e-4)


def numpy_conv3d(x, k):
    """y[n, d, h, w, o] = sum over kd, kh, kw, i of x_padded[n, d + kd, h + kh, w + kw, i] * k[kd, kh, kw, i, o]."""
    _, d, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    taps = ((a, b, c) for a in range(3) for b in range(3) for c in range(3))
    return sum(
        np.einsum("ndhwi,io->ndhwo", xp[:, a : a + d, b : b + h, c : c + w], k[a, b, c].astype(np.float64))
        for a, b, c in taps
    )


def numpy_weight_grad3d(x, dy):
    """dw[kd, kh, kw, i, o] = sum over n, d, h, w of x_padded[n, d + kd, h + kh, w + kw, i] * dy[n, d, h, w, o]."""
    _, d, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    taps = [[[xp[:, a : a + d, b : b + h, c : c + w] for c in range(3)] for b in range(3)] for a in range(3)]
    return np.einsum("zyxndhwi,ndhwo->zyxio", np.asarray(taps), dy)


@pytest.mark.parametrize(
    ("n", "d", "h", "w", "ci", "co"),
    [
        (2, 3, 4, 5, 3, 16),  # every output row sees the depth padding on one side or the other
        (1, 1, 2, 3, 4, 8),  # one slice: only the centre depth tap sees the volume (8-wide tiles)
        (1, 4, 3, 20, 7, 24),  # 18 interior pixels: tiles of 14 and 4; 16 + 8 outputs
        (1, 2, 2, 6, 60, 32),  # 9 x 180 taps: blocks of k (the kernel rows of a tile > 40 KB)
    ],
)
def test_3d_kernels_match_numpy(n, d, h, w, ci, co):
    rng = np.random.default_rng(ci * co + w + d)
    x = rng.standard_normal((n, d, h, w, ci)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, ci, co)).astype(np.float32)
    dy = rng.standard_normal((n, d, h, w, co)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(conv3x3.forward)(x, k), numpy_conv3d(x, k), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(conv3x3.weight_grad)(x, dy), numpy_weight_grad3d(x, dy), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "forward_kernels"),
    [
        ((2, 5, 6, 17, 8), (3, 3, 3, 8, 16), 2),  # the forward pass and the input gradient by the kernel
        ((1, 4, 3, 16, 1), (3, 3, 3, 1, 8), 1),  # the input gradient (1 output) in the depth-folded form
        ((1, 3, 2, 16, 72), (3, 3, 3, 72, 64), 0),  # more than 64 x 64 channels: both depth-folded
    ],
)
def test_3d_conv_value_and_gradients_match_lax(x_shape, w_shape, forward_kernels):
    """`conv` on a volume against lax's 3D convolution; what the forward kernel does not compute is
    the depth-folded 2D convolution, never XLA's 3D one (10x slower on CPU)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(x_shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape).astype(np.float32))
    target = jnp.asarray(rng.standard_normal((*x_shape[:-1], w_shape[-1])).astype(np.float32))

    def lax_conv3d(x, w):
        return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=conv3x3.DIMENSION_NUMBERS_3D)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * target)

    grad = jax.jit(jax.grad(loss(conv3x3.conv), argnums=(0, 1)))
    hlo = grad.lower(x, w).as_text()
    assert hlo.count(conv3x3.FORWARD_TARGET) == forward_kernels and hlo.count(conv3x3.TARGET) == 1
    operands = re.findall(r"stablehlo\.convolution.*?: \((tensor<[^>]*>), tensor<[^>]*>\)", hlo)
    assert {lhs.count("x") for lhs in operands} <= {4}  # only 2D (rank-4) convolutions: "tensor<1x4x8x8xf32>"
    assert len(operands) == 2 - forward_kernels  # the depth-folded ones
    want = lax_conv3d(x, w)
    np.testing.assert_allclose(jax.jit(conv3x3.conv)(x, w), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    for g, r in zip(grad(x, w), jax.grad(loss(lax_conv3d), argnums=(0, 1))(x, w), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_forward_applies_where_it_is_faster():
    assert conv3x3.forward_applies((8, 128, 128, 3), (3, 3, 3, 32))
    assert conv3x3.forward_applies((8, 64, 64, 64), (3, 3, 64, 64))
    assert conv3x3.forward_applies((8, 32, 32, 64), (3, 3, 64, 64))
    assert conv3x3.forward_applies((8, 16, 16, 64), (3, 3, 64, 64))
    assert not conv3x3.forward_applies((8, 8, 8, 64), (3, 3, 64, 64))  # narrower than 16
    assert not conv3x3.forward_applies((8, 32, 32, 64), (3, 3, 64, 128))  # more than 64 x 64 channels
    assert not conv3x3.forward_applies((8, 64, 64, 128), (3, 3, 128, 64))  # more than 64 x 64 channels
    assert conv3x3.forward_applies((8, 64, 64, 32), (3, 3, 32, 24))  # a tile of 16 outputs and one of 8
    assert not conv3x3.forward_applies((8, 64, 64, 32), (3, 3, 32, 20))  # outputs not a multiple of 8


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "forward_kernels"),
    [
        ((2, 12, 34, 5), (3, 3, 5, 32), 1),  # the forward pass; the input gradient (5 outputs) is XLA's
        ((2, 5, 64, 16), (3, 3, 16, 32), 2),  # the forward pass and the input gradient
        ((1, 4, 32, 64), (3, 3, 64, 128), 0),  # more than 64 x 64 channels: XLA's both
        ((2, 4, 40, 24), (3, 3, 24, 8), 2),  # 8 outputs (8-wide tiles), the input gradient's 24 (16 + 8)
    ],
)
def test_conv_value_and_gradients_match_lax(x_shape, w_shape, forward_kernels):
    """`conv` against lax in value and both gradients, whichever kernels it uses (counted)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape).astype(np.float32))
    target = jnp.asarray(rng.standard_normal((*x_shape[:3], w_shape[3])).astype(np.float32))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * target)

    grad = jax.jit(jax.grad(loss(conv3x3.conv), argnums=(0, 1)))
    assert grad.lower(x, w).as_text().count(conv3x3.FORWARD_TARGET) == forward_kernels
    want = lax_conv(x, w)
    np.testing.assert_allclose(jax.jit(conv3x3.conv)(x, w), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    want = jax.grad(loss(lax_conv), argnums=(0, 1))(x, w)
    for g, r in zip(grad(x, w), want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


def test_weight_grad_repeats_bit_for_bit():
    """The threads take the rows' chunks in a varying order; the chunks' sums are added in chunk
    order, so every call gives the same bits (a resumed run repeats the original exactly)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 24, 40, 8)).astype(np.float32))
    dy = jnp.asarray(rng.standard_normal((4, 24, 40, 16)).astype(np.float32))
    grad = jax.jit(conv3x3.weight_grad)
    first = np.asarray(grad(x, dy))
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(grad(x, dy)), first)
    np.testing.assert_allclose(first, numpy_weight_grad(np.asarray(x), np.asarray(dy)), rtol=1e-4, atol=1e-4)


def test_vmapped_weight_grad_is_one_per_member():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 4, 6, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 2, 4, 6, 16)).astype(np.float32)
    got = np.asarray(jax.jit(jax.vmap(conv3x3.weight_grad))(x, dy))
    for k in range(3):
        np.testing.assert_allclose(got[k], numpy_weight_grad(x[k], dy[k]), rtol=1e-4, atol=1e-4)


def test_kernel_rejects_shapes_that_do_not_fit():
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    with pytest.raises(Exception, match="shapes do not fit"):
        jax.jit(conv3x3.weight_grad)(x, jnp.ones((1, 4, 5, 16), jnp.float32))  # dy not x's size
    with pytest.raises(Exception, match="shapes do not fit"):
        jax.jit(conv3x3.forward)(x, jnp.ones((3, 3, 4, 16), jnp.float32))  # kernel for 4 channels, x has 3


def test_applies_only_to_the_convolution_it_computes():
    x, w = jnp.ones((2, 64, 64, 8)), jnp.ones((3, 3, 8, 32))
    dn = ("NHWC", "HWIO", "NHWC")
    assert conv3x3.applies(x, w, (1, 1), "SAME", dn)
    assert conv3x3.applies(x, w, (1, 1), ((1, 1), (1, 1)), dn)
    assert not conv3x3.applies(x, w, (2, 2), "SAME", dn)  # strided
    assert not conv3x3.applies(x, w, (1, 1), "VALID", dn)
    assert not conv3x3.applies(x, jnp.ones((5, 5, 8, 32)), (1, 1), "SAME", dn)
    assert conv3x3.applies(x, jnp.ones((3, 3, 8, 24)), (1, 1), "SAME", dn)  # a tile of 16 outputs and one of 8
    assert not conv3x3.applies(x, jnp.ones((3, 3, 8, 12)), (1, 1), "SAME", dn)  # outputs not a multiple of 8
    assert not conv3x3.applies(x, w, (1, 1), "SAME", dn, rhs_dilation=(2, 2))
    assert not conv3x3.applies(x, jnp.ones((3, 3, 4, 32)), (1, 1), "SAME", dn, feature_group_count=2)
    assert not conv3x3.applies(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", dn)
    assert not conv3x3.applies(jnp.ones((2, 8, 8, 8)), w, (1, 1), "SAME", dn)  # narrower than 16 pixels
    assert conv3x3.applies(jnp.ones((2, 16, 16, 8)), w, (1, 1), "SAME", dn)  # 16-31 px: up to 64 x 64 channels
    assert not conv3x3.applies(jnp.ones((2, 16, 16, 128)), jnp.ones((3, 3, 128, 64)), (1, 1), "SAME", dn)
    assert conv3x3.applies(jnp.ones((2, 32, 32, 128)), jnp.ones((3, 3, 128, 64)), (1, 1), "SAME", dn)
    many = jnp.ones((3, 3, 256, 256))
    assert conv3x3.applies(jnp.ones((2, 64, 64, 256)), many, (1, 1), "SAME", dn)
    assert not conv3x3.applies(jnp.ones((2, 32, 32, 256)), many, (1, 1), "SAME", dn)  # XLA's faster there
    assert not conv3x3.applies(jnp.ones((2, 8, 64, 64)), w, (1, 1), "SAME", ("NCHW", "OIHW", "NCHW"))
    volume, w3 = jnp.ones((1, 4, 16, 16, 8)), jnp.ones((3, 3, 3, 8, 16))
    dn3 = conv3x3.DIMENSION_NUMBERS_3D
    assert conv3x3.applies(volume, w3, (1, 1, 1), "SAME", dn3)
    assert conv3x3.applies(volume, w3, (1, 1, 1), ((1, 1),) * 3, dn3)
    assert not conv3x3.applies(volume, w3, (2, 2, 2), "SAME", dn3)  # strided
    assert not conv3x3.applies(volume, jnp.ones((5, 5, 5, 8, 16)), (1, 1, 1), "SAME", dn3)
    assert not conv3x3.applies(volume, jnp.ones((1, 3, 3, 8, 16)), (1, 1, 1), "SAME", dn3)  # 1 x 3 x 3
    assert not conv3x3.applies(jnp.ones((1, 4, 8, 8, 8)), w3, (1, 1, 1), "SAME", dn3)  # narrower than 16
    assert not conv3x3.applies(volume, w3, (1, 1, 1), "SAME", ("NCDHW", "OIDHW", "NCDHW"))


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_gradients_equal_with_and_without_the_kernel(dims):
    """The U-Net's gradients with the kernels and with XLA's convolutions (3D: the depth-folded form)."""
    cfg = default_config()
    cfg.model.depth, cfg.model.base_features, cfg.model.spatial_dims = 2, 16 if dims == 2 else 8, dims
    model = build_model(cfg.model, 2)
    rng = np.random.default_rng(2)
    image = jnp.asarray(rng.random((2, 64, 64, 3) if dims == 2 else (1, 8, 32, 32, 1), dtype=np.float32))
    variables = model.init(jax.random.key(0), image, train=False)

    def loss(params):
        (logits, _), _ = model.apply(
            {**variables, "params": params},
            image,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1])

    with_kernel = jax.jit(jax.grad(loss)).lower(variables["params"])
    with conv3x3.switched_off():
        without = jax.jit(jax.grad(loss)).lower(variables["params"])
    assert conv3x3.TARGET in with_kernel.as_text() and conv3x3.TARGET not in without.as_text()
    assert conv3x3.FORWARD_TARGET in with_kernel.as_text() and conv3x3.FORWARD_TARGET not in without.as_text()
    got, want = with_kernel.compile()(variables["params"]), without.compile()(variables["params"])
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5)


def test_without_a_compiler_the_kernel_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGJAX_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    conv3x3._load.cache_clear()
    try:
        assert not conv3x3.available()
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        conv3x3._load.cache_clear()
    monkeypatch.setenv("SEGJAX_CPU_KERNELS", "0")
    assert not conv3x3.available()
