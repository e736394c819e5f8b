"""Learning-rate schedules, SGD with Nesterov momentum and the weight average (train.ema_decay),
each against its formula written out in numpy; the train step against optax's own update."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import optim, preflight, pretrain, state, steps
from segjax.errors import ConfigError
from segjax.models import build_model
from tests.conftest import assert_trees_equal, load_config


def _optim_config(**overrides):
    cfg = load_config("default").optim
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("name", ["cosine", "poly", "constant"])
def test_schedules_follow_their_formulas(name):
    lr, warmup, total, power = 0.2, 4, 20, 0.9
    sched = optim.schedule(_optim_config(lr=lr, warmup_steps=warmup, schedule=name, poly_power=power), total)
    for t in range(total + 1):
        if t < warmup:
            want = lr * t / warmup
        elif name == "cosine":
            want = lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))
        elif name == "poly":
            want = lr * (1 - (t - warmup) / (total - warmup)) ** power
        else:
            want = lr
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")


def test_bad_schedule_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"optim\.schedule=.step."):
        optim.schedule(_optim_config(schedule="step"), 10)
    with pytest.raises(ConfigError, match=r"optim\.poly_power=0"):
        optim.schedule(_optim_config(schedule="poly", poly_power=0), 10)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_the_pytorch_update_rule(nesterov):
    """torch.optim.SGD's documented rule: g += wd * p; b = m * b + g; d = g + m * b (Nesterov) or b;
    p -= lr * d."""
    lr, m, wd = 0.1, 0.9, 0.01
    cfg = _optim_config(
        name="sgd", lr=lr, momentum=m, weight_decay=wd, nesterov=nesterov, schedule="constant", warmup_steps=0
    )
    cfg.grad_clip = 0.0
    tx = optim.build(cfg, 10)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    opt_state = tx.init(params)
    p, buf = np.array([1.0, -2.0, 0.5]), np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.normal(size=3)
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
        g = g + wd * p
        buf = m * buf + g
        p = p - lr * (g + m * buf if nesterov else buf)
        np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5)


def _tiny_setup(ema_decay: float):
    cfg = load_config("tiny")
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    model = build_model(cfg.model, 2)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    batch = {"image": image, "label": (image[..., 0] > 0).astype(np.int32), "valid": np.ones((4, 16, 16), np.float32)}
    tx = optim.with_weight_average(optim.build(cfg.optim, 10), ema_decay)
    st = state.create(model, tx, jnp.asarray(image[:1]), 0)
    step = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss))
    return cfg, model, batch, st, step


def test_weight_average_follows_its_recurrence():
    decay = 0.3
    _, _, batch, st, step = _tiny_setup(decay)
    want = jax.tree_util.tree_map(np.asarray, st.params)
    want_stats = jax.tree_util.tree_map(np.asarray, st.batch_stats)
    assert_trees_equal(optim.averaged_params(st.opt_state), want)  # starts at the initial weights
    assert_trees_equal(optim.averaged_stats(st.opt_state), want_stats)  # and statistics
    for k in range(6):  # (1 + k) / (10 + k) is below 0.3 for k < 3: both branches of the min are used
        st, _ = step(st, batch)
        d = min(decay, (1 + k) / (10 + k))
        move = lambda a, x, d=d: d * a + (1 - d) * np.asarray(x)  # noqa: E731
        want = jax.tree_util.tree_map(move, want, st.params)
        want_stats = jax.tree_util.tree_map(move, want_stats, st.batch_stats)
    average, stats = optim.averaged_params(st.opt_state), optim.averaged_stats(st.opt_state)
    assert_trees_equal(average, want, rtol=1e-5, atol=1e-6)
    assert_trees_equal(stats, want_stats, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(average["head"]["kernel"]), np.asarray(st.params["head"]["kernel"]))
    level0 = lambda tree: np.asarray(tree["decoder"]["level0"]["Norm_0"]["BatchNorm_0"]["mean"])  # noqa: E731
    assert not np.allclose(level0(stats), level0(st.batch_stats))
    variables = st.eval_variables()  # evaluation: the averaged weights with the averaged statistics
    assert variables["params"] is average and variables["batch_stats"] is stats


def test_without_decay_no_average_is_kept():
    _, _, batch, st, step = _tiny_setup(0.0)
    st, _ = step(st, batch)
    assert optim.averaged_params(st.opt_state) is None
    assert st.eval_variables()["params"] is st.params


def test_evaluation_scores_the_weight_average():
    cfg, model, batch, st, _ = _tiny_setup(0.9)
    other = state.create(model, optim.build(cfg.optim, 10), jnp.asarray(batch["image"][:1]), 7)  # other weights
    shifted = jax.tree_util.tree_map(lambda x: 1.5 * x + 0.1, other.batch_stats)  # not st's statistics
    other = other.replace(batch_stats=shifted)
    inner, avg = st.opt_state
    st = st.replace(opt_state=(inner, avg._replace(average=other.params, stats=shifted)))
    evaluate = jax.jit(
        functools.partial(
            steps.eval_step, model=model, loss_cfg=cfg.loss, num_classes=2, boundary_dilation=0, eval_cfg=None
        )
    )
    got = evaluate(st, batch)
    ref_average = evaluate(other, batch)  # a state whose own weights are the average
    ref_raw = evaluate(st.replace(opt_state=inner, tx=optim.build(cfg.optim, 10)), batch)
    np.testing.assert_array_equal(np.asarray(got["confusion"]), np.asarray(ref_average["confusion"]))
    np.testing.assert_allclose(float(got["loss"]), float(ref_average["loss"]), rtol=1e-6)
    assert float(got["loss"]) != pytest.approx(float(ref_raw["loss"]), rel=1e-3)


def test_non_finite_step_leaves_params_statistics_and_optimizer_state_unchanged():
    cfg, model, batch, st, _ = _tiny_setup(0.9)
    step = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss), donate_argnums=0)
    st, _ = step(st, batch)  # donated, as in training
    before = jax.tree_util.tree_map(np.asarray, (st.params, st.batch_stats, st.opt_state))
    step_before, rng_before = int(st.step), np.asarray(st.rng)
    st, out = step(st, dict(batch, image=batch["image"] * np.nan))
    assert not bool(out["finite"])
    assert_trees_equal((st.params, st.batch_stats, st.opt_state), before, rtol=0, atol=0)
    assert int(st.step) == step_before + 1 and not np.array_equal(np.asarray(st.rng), rng_before)


def test_finite_step_is_the_optax_update_of_the_loss_gradient():
    """Reference: optax's own `update` / `apply_updates` of the step's loss gradient (the gradient
    itself is the losses' and models' tests' business)."""
    cfg, model, batch, st, step = _tiny_setup(0.0)
    dropout_rng = jax.random.split(st.rng)[1]  # as train_step splits it
    _, _, stats, grads = steps._loss_and_grads(st.params, st.batch_stats, batch, dropout_rng, model, cfg.loss)
    updates, opt_state = st.tx.update(grads, st.opt_state, st.params)
    want = (optax.apply_updates(st.params, updates), stats, opt_state)
    new, out = step(st, batch)
    assert bool(out["finite"])
    # Adam's first update is lr * g / (|g| + eps), +-3e-3 here: where g is nearly zero it amplifies
    # g's rounding (the jitted and the eager gradient sum in other orders), so the parameters
    # agree to 1e-6 absolute, a three-thousandth of an update
    assert_trees_equal((new.params, new.batch_stats, new.opt_state), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(new.params["head"]["kernel"]), np.asarray(st.params["head"]["kernel"]))


@pytest.mark.parametrize("finite", [True, False])
def test_select_and_branch_forms_of_the_guarded_update_agree(finite):
    """GPUs take the select (`update_by_select`), CPUs the branch: the same state either way (a
    finite step to float32 rounding: the two programs are fused apart, and jaxlib 0.12.1 rounds
    a few of their products 1 ulp apart; 0.10-0.11 agree bit for bit). A non-finite step keeps
    the old state exactly in both."""
    _, _, batch, st, step = _tiny_setup(0.9)
    st, _ = step(st, batch)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), st.params)
    update = functools.partial(state.TrainState.apply_gradients, grads=grads, batch_stats=st.batch_stats, rng=st.rng)
    pred = jnp.asarray(finite)
    by_select = jax.jit(functools.partial(steps.update_by_select, update=update))(st, pred)
    by_branch = jax.jit(functools.partial(steps.update_by_branch, update=update))(st, pred)
    if finite:  # and op by op outside jit: the same update up to float32 rounding
        assert_trees_equal(by_select, by_branch, rtol=1e-6, atol=1e-9)
        assert_trees_equal(by_branch, update(st), rtol=1e-6, atol=1e-9)
    else:
        assert_trees_equal(by_select, st, rtol=0, atol=0)
        assert_trees_equal(by_branch, st, rtol=0, atol=0)


def test_loading_a_pretrained_encoder_restarts_the_average():
    cfg, model, batch, st, step = _tiny_setup(0.9)
    st, _ = step(st, batch)
    other = state.create(model, optim.build(cfg.optim, 10), jnp.asarray(batch["image"][:1]), 7)
    scopes = pretrain.encoder_scopes(model)
    encoder = {
        "params": {k: other.params[k] for k in scopes},
        "batch_stats": {k: other.batch_stats[k] for k in scopes if k in other.batch_stats},
    }
    loaded = pretrain.load_encoder(st, encoder)
    average = optim.averaged_params(loaded.opt_state)
    assert_trees_equal(average, loaded.params, rtol=0, atol=0)
    assert_trees_equal({k: average[k] for k in scopes}, encoder["params"], rtol=0, atol=0)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_decay_outside_zero_one_is_a_config_error(tiny_config, decay):
    tiny_config.optim.ema_decay = decay
    with pytest.raises(ConfigError, match=r"optim\.ema_decay"):
        preflight.check(tiny_config)
