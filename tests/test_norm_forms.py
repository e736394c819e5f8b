"""benchmarks/norm_forms.py's batch norms (issue 8's GPU experiment) are flax's BatchNorm: the same
outputs, running statistics and gradients, so its timings compare the same layer."""

from __future__ import annotations

import importlib.util
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.configuration import default_config
from segjax.models import batchnorm, blocks, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("norm_forms", os.path.join(ROOT, "benchmarks", "norm_forms.py"))
norm_forms = sys.modules["norm_forms"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(norm_forms)

RNG = np.random.default_rng(0)
X = RNG.normal(2.0, 3.0, (4, 8, 8, 8)).astype(np.float32)  # a mean far from 0: fast variance tested
G = RNG.normal(size=X.shape).astype(np.float32)
PARAMS = {"scale": jnp.linspace(0.5, 2.0, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
STATS = {"mean": jnp.linspace(-0.2, 0.2, 8), "var": jnp.linspace(0.8, 1.2, 8)}


def outputs(module, x):
    """(loss, new running statistics) and d loss / d (params, x) of sum(sin(BN(x)) * G)."""

    def loss(params, x):
        y, new = module.apply({"params": params, "batch_stats": STATS}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * G), new

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(PARAMS, x)


@pytest.mark.parametrize("form", ["dot", "vjp", "rows"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_form_equals_flax_batch_norm(form, dtype, tol):
    x = jnp.asarray(X, dtype)
    reference = outputs(nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype), x)
    result = outputs(norm_forms.BatchNorm(dtype=dtype, form=form), x)
    for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True):
        assert got.dtype == want.dtype
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * np.abs(want).max())


def test_inference_reads_running_statistics_as_flax():
    x = jnp.asarray(X)
    variables = {"params": PARAMS, "batch_stats": STATS}
    want = nn.BatchNorm(use_running_average=True).apply(variables, x)
    got = norm_forms.BatchNorm(use_running_average=True).apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_use_swaps_the_networks_batch_norm_and_keeps_the_parameter_tree():
    cfg = default_config()
    cfg.model.depth, cfg.model.base_features = 2, 8
    x = jnp.asarray(X[:, :, :, :3])
    init = lambda: build_model(cfg.model, 2).init(jax.random.key(0), x, train=False)  # noqa: E731
    plain = init()
    with norm_forms.use("vjp"):
        swapped = init()
        y, _ = build_model(cfg.model, 2).apply(swapped, x, train=True, mutable=["batch_stats"])
    assert blocks.BatchNorm is batchnorm.BatchNorm  # restored
    assert jax.tree.structure(swapped) == jax.tree.structure(plain)
    want, _ = build_model(cfg.model, 2).apply(plain, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y[0], want[0], rtol=1e-4, atol=1e-4)  # (logits, {"bottleneck": ...})
