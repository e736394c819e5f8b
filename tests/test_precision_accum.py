"""Gradient accumulation and bfloat16 compute against the plain float32 step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax import optim, state, steps
from segjax.models import build_model
from tests.conftest import load_config


def setup(norm="none", dtype="float32", seed=0):
    cfg = load_config("default")
    cfg.model.depth, cfg.model.base_features, cfg.model.norm, cfg.model.dtype = 2, 8, norm, dtype
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    model = build_model(cfg.model, 3)
    rng = np.random.default_rng(seed)
    image = rng.random((8, 16, 16, 3)).astype(np.float32)
    label = (image.sum(-1) * 1.5).astype(np.int32).clip(0, 2)
    batch = {"image": image, "label": label, "valid": np.ones(label.shape, np.float32)}
    st = state.create(model, optim.build(cfg.optim, 10), jnp.asarray(image[:1]), 0)
    return cfg, model, st, batch


def run(cfg, model, st, batch, steps_count=3, accum=1):
    fn = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss, grad_accum_steps=accum))
    losses = []
    for _ in range(steps_count):
        st, out = fn(st, batch)
        losses.append(float(out["loss"]))
    return st, losses


def test_grad_accumulation_matches_the_full_batch_step():
    """Without BatchNorm, 4 micro-batches of 2 give the same update as one batch of 8 (the CE term
    is a per-pixel mean, so micro-batch means average to the batch mean; Dice is off here)."""
    cfg, model, st, batch = setup()
    cfg.loss.terms = "ce"
    full, full_losses = run(cfg, model, st, batch)
    accum, accum_losses = run(cfg, model, st, batch, accum=4)
    np.testing.assert_allclose(accum_losses, full_losses, rtol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(accum.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_trains_finite_and_close_to_float32():
    cfg, model, st, batch = setup(norm="batch")
    _, f32 = run(cfg, model, st, batch, steps_count=8)
    cfg16, model16, st16, _ = setup(norm="batch", dtype="bfloat16")
    trained, bf16 = run(cfg16, model16, st16, batch, steps_count=8)
    assert all(np.isfinite(bf16))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(trained.params))  # params stay f32
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    assert bf16[-1] < bf16[0]
