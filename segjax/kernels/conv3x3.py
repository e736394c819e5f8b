"""CPU kernels for 3x3 (2D) and 3x3x3 (3D) convolutions: the forward pass, the input gradient and
the weight gradient.

On CPU the weight gradient of a 3x3 convolution at 16-64 channels is the slowest part of a
U-Net training step: XLA transposes both operands and runs one Eigen convolution whose 9 x Ci x
Co output one core computes almost alone (benchmarks/RESULTS.md, sessions 9-15). XLA's forward
pass reaches about two thirds of the cores' peak at 16-64 channels. `conv3x3.cc` (next to this
file) computes the weight gradient on every core without copies, and the forward pass as one
small matrix product per kernel row with no im2col copy; `conv` is `lax.conv_general_dilated`
(3x3, stride 1, zero padding 1, NHWC/HWIO, float32; or 3x3x3, NDHWC/DHWIO) that uses them: the
weight gradient always, the forward pass and the input gradient (the forward pass of the output
gradient with the kernel flipped and transposed) where they beat XLA's (`forward_applies`). Their register tiles
are sized for AVX-512 or, without it, AVX2 (`conv3x3.cc`; `-march=native` decides). A 3D
output row reads 3 x 3 input rows instead of 3, each a contiguous matrix product as in 2D: no
copies of the volume (`conv_forms.depth_folded_conv` makes three). The same function to float32
rounding (tests/test_kernels.py).

The kernels are compiled on first use with the machine's C++ compiler (`$CXX`, else g++ / c++ /
clang++) for this CPU and this jaxlib, into `$SEGJAX_KERNEL_DIR` (default
`~/.cache/segjax/kernels`), and reused from there. Without a compiler, or with
`SEGJAX_CPU_KERNELS=0`, `available()` is False and callers keep XLA's convolution: slower, the
same numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

SOURCE = Path(__file__).with_name("conv3x3.cc")
TARGET = "segjax_conv3x3_weight_grad"
FORWARD_TARGET = "segjax_conv3x3_forward"
OPT_OUT = "SEGJAX_CPU_KERNELS"
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
DIMENSION_NUMBERS_3D = ("NDHWC", "DHWIO", "NDHWC")
CHANNEL_MULTIPLE = 8  # output channels go in tiles of 32 or 16, the last 8 of other multiples of 8 in one 8 wide
# Where the kernel is faster than XLA's (benchmarks/RESULTS.md, sessions 18 and 21): each of its
# products runs along one image row, so narrow images leave it little to do per product; its
# per-thread sum (9 x Ci x Co floats) must also stay in cache. Images 64 pixels wide or more: any
# channels; 32-63: up to 128 x 128 channels; 16-31: up to 64 x 64 (1.0-3x XLA's there, 0.8x at
# 256 x 256).
MAX_CHANNEL_PRODUCT_BY_WIDTH = ((64, None), (32, 128 * 128), (16, 64 * 64))  # (from width, channel product)
# Where the forward kernel is faster than XLA's (benchmarks/RESULTS.md, session 20): 1.1-1.8x
# with up to 64 x 64 channels at 16-256 pixels wide; about equal at 64 x 128 and 128 x 128
# channels, slower at 256 x 256.
FORWARD_MIN_WIDTH = 16
FORWARD_MAX_CHANNEL_PRODUCT = 64 * 64


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None
    )


def _cpu_id() -> str:
    """What the binary's `-march=native` depends on: a cache shared between machines must not
    hand one CPU's instructions to another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _library_path(compiler: str) -> Path:
    key = "\n".join([SOURCE.read_text(), compiler, metadata.version("jaxlib"), _cpu_id()])
    cache = Path(os.environ.get("SEGJAX_KERNEL_DIR", Path.home() / ".cache" / "segjax" / "kernels"))
    return cache / f"conv3x3-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str, path: Path, flags: tuple[str, ...] = ()) -> None:
    """Compile into a temporary file, then rename: processes building at once never see half a file.
    `flags` go after `-march=native` (the tests build the AVX2 tiles with `-mno-avx512f`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        cmd = [compiler, "-O3", "-march=native", *flags, "-std=c++17", "-shared", "-fPIC"]
        cmd += ["-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, path)


_switched_off = [False]


@contextlib.contextmanager
def switched_off():
    """Programs traced inside keep XLA's weight gradients (benchmarks compare the two)."""
    _switched_off[0] = True
    try:
        yield
    finally:
        _switched_off[0] = False


def available() -> bool:
    """Whether programs traced now use the kernel: JAX computes on the CPU, the kernel is not
    switched off, and it is built and registered with XLA's CPU backend (built here if needed)."""
    on = jax.default_backend() == "cpu" and not _switched_off[0] and os.environ.get(OPT_OUT, "1") != "0"
    return on and _load()


@functools.cache
def _load() -> bool:
    compiler = _compiler()
    if compiler is None:
        logging.info("no C++ compiler found: 3x3 convolutions stay XLA's")
        return False
    path = _library_path(compiler)
    try:
        if not path.exists():
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        logging.warning("building %s failed, 3x3 convolutions stay XLA's: %s", SOURCE.name, detail)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.SegjaxConv3x3WeightGrad), platform="cpu")
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.SegjaxConv3x3Forward), platform="cpu")
    return True


def _dimension_numbers(ndim: int):
    return DIMENSION_NUMBERS if ndim == 4 else DIMENSION_NUMBERS_3D


def applies(lhs, rhs, window_strides, padding, dimension_numbers=None, **kwargs) -> bool:
    """Whether `conv` computes this `lax.conv_general_dilated` call (2D 3x3 or 3D 3x3x3)."""
    if lhs.ndim not in (4, 5):
        return False
    nd = lhs.ndim - 2
    if rhs.shape[:nd] != (3,) * nd or tuple(window_strides) != (1,) * nd:
        return False
    if isinstance(padding, str):
        same = padding == "SAME"
    else:
        same = [tuple(p) for p in padding] == [(1, 1)] * nd
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = all(kwargs.get(k) in (None, 1) for k in ("feature_group_count", "batch_group_count"))
    plain &= all(set(kwargs.get(k) or (1,)) == {1} for k in ("lhs_dilation", "rhs_dilation"))
    plain &= kwargs.get("preferred_element_type") in (None, jnp.float32)
    return (
        same
        and plain
        and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _dimension_numbers(lhs.ndim))
        and lhs.dtype == rhs.dtype == jnp.float32
        and rhs.shape[-1] % CHANNEL_MULTIPLE == 0
        and _channels_fit(lhs.shape[-2], rhs.shape[-2] * rhs.shape[-1])
    )


def _channels_fit(width: int, channel_product: int) -> bool:
    """Whether images `width` pixels wide with Ci x Co = `channel_product` are in the kernel's rule."""
    limit = next((limit for start, limit in MAX_CHANNEL_PRODUCT_BY_WIDTH if width >= start), 0)
    return limit is None or channel_product <= limit


def _lax_forward(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSION_NUMBERS)


def _xla_forward(x, w):
    """The convolution without the forward kernel: XLA's in 2D; in 3D the depth-folded 2D form
    (XLA:CPU's own 3D convolution is ~10x slower)."""
    if x.ndim == 4:
        return _lax_forward(x, w)
    from segjax.models import conv_forms  # imported here: conv_forms imports this module

    return conv_forms.depth_folded_conv(x, w, (1, 1, 1), "SAME")


def forward_applies(x_shape, k_shape) -> bool:
    """Whether `conv` computes the convolution of x [N, (D,) H, W, Ci] with k [(3,) 3, 3, Ci, Co]
    with the forward kernel (it needs Co a multiple of 8)."""
    width, ci, co = x_shape[-2], x_shape[-1], k_shape[-1]
    return co % CHANNEL_MULTIPLE == 0 and width >= FORWARD_MIN_WIDTH and ci * co <= FORWARD_MAX_CHANNEL_PRODUCT


def _forward(x, w):
    if forward_applies(x.shape, w.shape):
        return forward(x, w)
    return _xla_forward(x, w)


def forward(x, k, target: str = FORWARD_TARGET):
    """The kernel's convolution of x (NHWC or NDHWC) with k [(3,) 3, 3, Ci, Co] (`target`: the
    FFI name it is registered under; the tests register a second build)."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], k.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, k)


def weight_grad(x, dy, target: str = TARGET):
    """d(loss)/d(kernel) [(3,) 3, 3, Ci, Co] of `conv` from its input x and output gradient dy
    (NHWC or NDHWC)."""
    out = jax.ShapeDtypeStruct(((3,) * (x.ndim - 2) + (x.shape[-1], dy.shape[-1])), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, dy)


@jax.custom_vjp
def conv(x, w):
    """3x3 (2D: NHWC, HWIO) or 3x3x3 (3D: NDHWC, DHWIO) convolution, stride 1, zero padding 1, float32."""
    return _forward(x, w)


def _conv_fwd(x, w):
    return _forward(x, w), (x, w)


def _conv_bwd(residuals, dy):
    x, w = residuals
    spatial = tuple(range(x.ndim - 2))
    flipped = jnp.swapaxes(jnp.flip(w, spatial), -1, -2)
    if forward_applies(dy.shape, flipped.shape):
        # dx[n, h, w, i] = sum of dy[n, h - kh + 1, w - kw + 1, o] * w[kh, kw, i, o]: the forward
        # convolution of dy with the kernel flipped in space and its channels swapped
        input_grad = forward(dy, flipped)
    elif x.ndim == 4:
        # the convolution is linear in x: its transpose is the input gradient (no forward pass traced again)
        (input_grad,) = jax.linear_transpose(lambda x: _lax_forward(x, w), x)(dy)
    else:
        input_grad = _xla_forward(dy, flipped)  # the same flipped convolution in the depth-folded form
    return input_grad, weight_grad(x, dy)


conv.defvjp(_conv_fwd, _conv_bwd)
