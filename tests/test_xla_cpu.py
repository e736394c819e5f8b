"""XLA:CPU defaults: added once, never over a user's choice, reach XLA, and do not change results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segjax import xla_cpu

FLAG = xla_cpu.CPU_FLAGS[0].split("=")[0]
flags_added = pytest.mark.skipif(
    xla_cpu.jaxlib_minor() not in xla_cpu.MEASURED_JAXLIB, reason="flags are only added for measured jaxlib versions"
)

# One U-Net training step on fixed data; prints the loss, gradient norm, parameter sums and whether
# XLA hands a convolution to YNNPACK (its default in jaxlib 0.10-0.12; segjax's flags keep Eigen's).
PROBE = """
import json, functools
import jax, jax.numpy as jnp, numpy as np
from segjax import optim, state, steps
from segjax.configuration import default_config
from segjax.models import build_model
cfg = default_config(); cfg.model.depth = 2; cfg.model.base_features = 8
rng = np.random.default_rng(0)
batch = {"image": jnp.asarray(rng.random((4, 32, 32, 3), dtype=np.float32)),
         "label": jnp.asarray(rng.integers(0, 2, (4, 32, 32)).astype(np.int32)),
         "valid": jnp.ones((4, 32, 32), jnp.float32)}
model = build_model(cfg.model, 2)
st = state.create(model, optim.build(cfg.optim, 10), batch["image"][:1], 0)
step = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
st, out = step(st, batch)
print(json.dumps({"loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                  "params": [float(jnp.sum(p)) for p in jax.tree_util.tree_leaves(st.params)],
                  "conv_in_ynnpack": "__ynn_fusion" in hlo}))
"""


# The end of a decoder level at inference: convolution, batch norm, ReLU, then a product (the
# transposed convolution). Prints the ops XLA put inside YNNPACK fusions.
LEVEL_PROBE = """
import json, re
import jax, jax.numpy as jnp
import segjax
def level(x, w, s, v):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.maximum(y * s + 1.0, 0.0) @ v
args = (jnp.ones((2, 16, 16, 128)), jnp.ones((3, 3, 128, 128)), jnp.ones((128,)), jnp.ones((128, 256)))
hlo = jax.jit(level).lower(*args).compile().as_text()
called = set(re.findall(r"calls=(%[\\w.-]+)[^\\n]*__ynn_fusion", hlo))
ops = {op for block in hlo.split("\\n\\n") if block.lstrip().split(" ", 1)[0] in called
       for op in re.findall(r"= \\S+ ([\\w-]+)\\(", block)}
print(json.dumps(sorted(ops - {"parameter"})))
"""


def run_probe(probe: str = PROBE, xla_flags: str | None = None, **env) -> dict | list:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flags_added_once_and_never_over_the_users():
    env = {}
    assert xla_cpu.apply(env, version=(0, 10)) == list(xla_cpu.CPU_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(xla_cpu.CPU_FLAGS)
    assert xla_cpu.apply(env, version=(0, 10)) == []  # already there: unchanged
    assert env["XLA_FLAGS"] == " ".join(xla_cpu.CPU_FLAGS)

    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FLAG}=reduce"}
    assert xla_cpu.apply(env, version=(0, 11)) == []
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}=reduce"

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_cpu.apply(env, version=(0, 11))
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *xla_cpu.CPU_FLAGS]


def test_opt_out_and_unmeasured_jaxlib_add_nothing():
    env = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply(env, version=(0, 10)) == [] and "XLA_FLAGS" not in env
    env = {}
    assert xla_cpu.apply(env, version=(0, 99)) == [] and "XLA_FLAGS" not in env
    assert xla_cpu.apply(env, version=None) in ([], list(xla_cpu.CPU_FLAGS))  # the installed jaxlib


@flags_added
def test_importing_segjax_keeps_convolutions_off_ynnpack_and_results_match_the_default_backend():
    fast, plain = run_probe(), run_probe(**{xla_cpu.OPT_OUT: "0"})
    assert plain["conv_in_ynnpack"] and not fast["conv_in_ynnpack"]  # the flag reached XLA
    np.testing.assert_allclose(fast["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(fast["grad_norm"], plain["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(fast["params"], plain["params"], rtol=1e-4, atol=1e-4)


@flags_added
def test_products_go_to_ynnpack_alone_without_the_convolutions_around_them():
    """`individual_dot`: the product stays in YNNPACK; with `dot` the convolution, batch norm and
    ReLU before it join one YNNPACK fusion (slower at inference, benchmarks/RESULTS.md)."""
    assert run_probe(LEVEL_PROBE) == ["dot"]
    fused = run_probe(LEVEL_PROBE, xla_flags=f"{FLAG}=dot,reduce")  # the flag segjax set before session 23
    assert {"convolution", "dot", "maximum"} <= set(fused)
    assert "convolution" in run_probe(LEVEL_PROBE, **{xla_cpu.OPT_OUT: "0"})  # jaxlib's default
