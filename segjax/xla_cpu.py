"""XLA:CPU options segjax sets before JAX starts its CPU backend, because they make it faster.

jaxlib 0.10-0.12 hand convolutions, matrix products and reductions to YNNPACK by default. For
convolution *weight gradients* (a convolution whose window is the whole image) YNNPACK is about
2x slower than XLA's own Eigen convolution on this project's CPU, and those dominate a U-Net
training step. `--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce` keeps YNNPACK for
products (each on its own) and reductions and gives convolutions back to Eigen: U-Net training
steps run 1.4-1.8x faster (benchmarks/RESULTS.md), with results equal to the default backend's
to float32 rounding (tests/test_xla_cpu.py). `individual_dot` rather than `dot` (the flag until
session 23): a `dot` fusion also pulls the convolutions, batch norms and ReLUs around a product
into one YNNPACK graph (a decoder level ending in its transposed convolution), which in
inference runs 3-12 % slower than Eigen's convolutions plus a lone YNNPACK product; training
steps are the same (session 23, jaxlib 0.10.2; session 24: the same on 0.11.2 and 0.12.1, whose
XLA accepts the value too). GPU and TPU backends ignore CPU options.

The flag is experimental in XLA, so it is only added for jaxlib versions it was measured on
(`MEASURED_JAXLIB`); an unknown flag would make XLA abort at start-up. A value the user already
put in `XLA_FLAGS` wins, and `SEGJAX_XLA_CPU_DEFAULTS=0` turns the defaults off. Flags only
take effect when set before JAX's first computation, so `segjax/__init__.py` applies them on
import.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce",)
MEASURED_JAXLIB = ((0, 10), (0, 11), (0, 12))  # (major, minor) versions the flags were measured on
OPT_OUT = "SEGJAX_XLA_CPU_DEFAULTS"


def jaxlib_minor() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, without importing JAX (which may start a backend)."""
    from importlib import metadata

    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def apply(environ: MutableMapping[str, str] = os.environ, version: tuple[int, int] | None = None) -> list[str]:
    """Append the CPU flags missing from `environ['XLA_FLAGS']`; returns what was added."""
    version = jaxlib_minor() if version is None else version
    if environ.get(OPT_OUT, "1") == "0" or version not in MEASURED_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in CPU_FLAGS if flag.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
