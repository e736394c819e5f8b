"""Model FLOPs from a jaxpr: 2 per multiply-add of every convolution and matrix product.

Why not XLA's cost analysis: on a GPU the compiled module's convolutions are cuDNN custom calls it
does not count (a U-Net forward of 1.5 TFLOP read as 60 GFLOP), and on some jaxlibs the lowered
module's analysis is empty. The jaxpr is the same on every backend. Windows that overlap the
padding count in full (XLA's CPU analysis leaves those products out: ~1 % fewer for a U-Net at
512²). Elementwise work (norms, activations) is not counted: these are the FLOPs that model FLOP
utilisation divides by the matrix-unit peak. segjax's CPU convolution kernels (FFI custom calls,
`segjax.kernels.conv3x3`) count as the convolutions they compute.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import core

from segjax.kernels import conv3x3


def count_flops(fn, *args, **kwargs) -> float:
    """FLOPs of `fn(*args, **kwargs)`; arguments may be arrays or `jax.ShapeDtypeStruct`s.

    Loops count once per iteration where the trip count is static (`scan`); of a conditional's
    branches the cheapest counts (e.g. `conv_forms.aligned_conv` on CUDA is the same arithmetic plus
    zero channels); a `while` body counts once."""
    return _count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = np.prod(eqn.outvars[0].aval.shape)
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * out * np.prod(rhs) / rhs[spec[0]]  # per output: in-channels (per group) x window
        elif name == "ffi_call" and eqn.params.get("target_name") == conv3x3.FORWARD_TARGET:
            out, kernel = np.prod(eqn.outvars[0].aval.shape), eqn.invars[1].aval.shape
            total += 2.0 * out * np.prod(kernel[:-1])  # per output: window x in-channels
        elif name == "ffi_call" and eqn.params.get("target_name") == conv3x3.TARGET:
            x = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(x[:-1])  # per weight: every position
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            out = np.prod(eqn.outvars[0].aval.shape)
            total += 2.0 * out * np.prod([eqn.invars[0].aval.shape[i] for i in contract])
        branches = [_count(b.jaxpr) for b in eqn.params.get("branches", ())]
        total += min(branches) if branches else 0.0
        inner = sum(_count(_jaxpr(v)) for k, v in eqn.params.items() if k != "branches" and _jaxpr(v) is not None)
        total += inner * eqn.params.get("length", 1)
    return total


def _jaxpr(value):
    if isinstance(value, core.ClosedJaxpr):
        return value.jaxpr
    return value if isinstance(value, core.Jaxpr) else None
