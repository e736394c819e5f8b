"""The classic recipe: encoder pretrained on image-level labels, then a frozen or fine-tuned encoder."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import f1_score, hamming_loss

from segjax import optim, parallel, pretrain, state, train
from segjax.data import sources
from segjax.errors import CheckpointError, ConfigError, NonFiniteLossError
from segjax.models import build_model


def test_image_labels_are_the_classes_present_among_valid_pixels():
    label = np.zeros((3, 4, 4), np.int32)
    label[0, 0, 0] = 2  # example 0: classes 0 and 2
    label[1] = 1  # example 1: class 1 only ...
    label[1, 3, 3] = 3  # ... and a class-3 pixel that is ignored (valid 0)
    label[2, :2] = 3  # example 2: classes 0 and 3
    valid = np.ones(label.shape, np.float32)
    valid[1, 3, 3] = 0
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]], np.float32)
    np.testing.assert_array_equal(pretrain.image_labels(jnp.asarray(label), jnp.asarray(valid), 4), expected)


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 5)) < 0.4
    pred = rng.random((40, 5)) < 0.5
    truth[:, 4] = pred[:, 4] = False  # a class never present nor predicted: F1 undefined
    counts = np.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0), (~pred & ~truth).sum(0)])
    got = pretrain.scores(counts, ("a", "b", "c", "d", "e"))
    ref = f1_score(truth, pred, average=None, zero_division=np.nan)
    for name, value in zip("abcd", ref[:4], strict=True):
        assert got[f"pretrain/val/f1/{name}"] == pytest.approx(value)
    assert np.isnan(got["pretrain/val/f1/e"])
    assert got["pretrain/val/mf1"] == pytest.approx(np.mean(ref[:4]))
    assert got["pretrain/val/accuracy"] == pytest.approx(1 - hamming_loss(truth, pred))


ARCH_OVERRIDES = {  # small 2D versions of every architecture the recipe supports
    "unet": {},
    "encoder_decoder": {},
    "unetpp": {"model.deep_supervision": True},
    "vnet": {"model.kernel_size": 3, "model.spatial_dims": 2},
}


def _set(config, overrides):
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _model_and_state(config, seed=0):
    model = build_model(config.model, config.data.num_classes)
    tx = optim.build(config.optim, 10)
    return model, tx, state.create(model, tx, jnp.zeros((1, 32, 32, 3)), seed)


def _leaves_equal(a, b) -> bool:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("unet", {"encoder"}),
        ("encoder_decoder", {"encoder"}),
        ("unetpp", {"X0_0", "X1_0", "X2_0"}),  # column 0 of the nested grid
        ("vnet", {"enc0", "enc1", "enc2", "down1", "down2", "Norm_0", "Norm_1", "PReLU_0", "PReLU_1"}),
    ],
)
def test_encoder_scopes_are_what_classify_uses(tiny_config, arch, expected):
    tiny_config.model.arch = arch
    model, _, st = _model_and_state(_set(tiny_config, ARCH_OVERRIDES[arch]))
    scopes = set(pretrain.encoder_scopes(model))
    assert scopes == expected
    assert scopes < set(st.params)  # every encoder scope is part of the segmentation network
    variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), method="classify")
    assert set(variables["params"]) == scopes | {"classifier"}
    assert model.apply(variables, jnp.zeros((2, 32, 32, 3)), method="classify").shape == (2, 4)


def test_eval_counts_skip_padding_examples(tiny_config):
    model, tx, _ = _model_and_state(tiny_config)
    st = state.create(model, tx, jnp.zeros((1, 32, 32, 3)), 0, method="classify")
    label = np.random.default_rng(1).integers(0, 4, (3, 32, 32)).astype(np.int32)
    valid = np.ones(label.shape, np.float32)
    valid[2] = 0  # a padding copy
    batch = {"image": jnp.ones((3, 32, 32, 3)), "label": jnp.asarray(label), "valid": jnp.asarray(valid)}
    counts = np.asarray(pretrain.eval_step(st, batch, model=model))
    assert counts.shape == (4, 4)
    np.testing.assert_array_equal(counts.sum(axis=0), [2, 2, 2, 2])  # 2 real examples per class
    np.testing.assert_array_equal(counts[0] + counts[2], [2, 2, 2, 2])  # every class present in both


@pytest.mark.parametrize("arch", ["unet", "unetpp", "vnet"])
def test_frozen_encoder_gets_no_gradient_no_update_and_keeps_its_statistics(tiny_config, arch):
    tiny_config.model.arch = arch
    tiny_config.model.freeze_encoder = True
    model, _, st = _model_and_state(_set(tiny_config, ARCH_OVERRIDES[arch]))
    scopes = set(pretrain.encoder_scopes(model))
    image = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def loss(params):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": st.batch_stats}, image, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), updates["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(st.params)
    for name, grad in grads.items():
        largest = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad))
        assert (largest == 0) == (name in scopes), name  # no gradient into the encoder, some everywhere else
    # the encoder runs on its running statistics (inference mode): a training pass leaves them alone
    for name in stats:
        assert _leaves_equal(stats[name], st.batch_stats[name]) == (name in scopes), name
    # the optimizer leaves the encoder alone even where weight decay would move it
    tx = pretrain.frozen_encoder_tx(optax.adamw(1e-2, weight_decay=0.5), scopes)
    ones = jax.tree_util.tree_map(jnp.ones_like, st.params)
    updates, _ = tx.update(ones, tx.init(st.params), st.params)
    for name, update in updates.items():
        largest = max(float(jnp.abs(u).max()) for u in jax.tree_util.tree_leaves(update))
        assert (largest == 0) == (name in scopes), name


@pytest.mark.parametrize("arch", ["unet", "unetpp", "vnet"])
def test_load_encoder_replaces_only_the_encoder_and_checks_shapes(tiny_config, arch):
    tiny_config.model.arch = arch
    model, _, st = _model_and_state(_set(tiny_config, ARCH_OVERRIDES[arch]), seed=0)
    _, _, other = _model_and_state(tiny_config, seed=1)
    scopes = pretrain.encoder_scopes(model)
    encoder = {
        "params": {k: other.params[k] for k in scopes},
        "batch_stats": {k: other.batch_stats[k] for k in scopes if k in other.batch_stats},
    }
    loaded = pretrain.load_encoder(st, encoder)
    for name in st.params:
        source = other if name in scopes else st
        assert _leaves_equal(loaded.params[name], source.params[name]), name
    for name in st.batch_stats:
        source = other if name in scopes else st
        assert _leaves_equal(loaded.batch_stats[name], source.batch_stats[name]), name
    tiny_config.model.base_features = 8
    _, _, wider = _model_and_state(tiny_config)
    with pytest.raises(CheckpointError, match="pretrained encoder"):
        pretrain.load_encoder(st, {"params": {k: wider.params[k] for k in scopes}, "batch_stats": {}})


def test_non_finite_pretraining_loss_names_its_step(tiny_config, tmp_path, monkeypatch):
    """The loss of every step is checked (at the next log or checkpoint), not only the logged
    step's: a NaN at step 3 of a 4-step logging window is reported as step 3, and the checkpoint
    due at step 3 is not written."""
    original = pretrain.train_step

    def nan_at_step_3(st, batch, model):
        new, out = original(st, batch, model=model)
        return new, {"loss": jnp.where(st.step == 2, jnp.nan, out["loss"])}  # st.step counts from 0

    monkeypatch.setattr(pretrain, "train_step", nan_at_step_3)
    tiny_config.pretrain.steps = 8
    tiny_config.train.log_every = 4
    tiny_config.train.checkpoint_every = 3
    with pytest.raises(NonFiniteLossError, match=r"pretraining loss is nan at step 3; lower pretrain\.lr"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run" / "pretrain" / "checkpoints") == []


@pytest.mark.parametrize("arch", ["unet", pytest.param("vnet", marks=pytest.mark.slow)])  # vnet: ~11 s warm; CI
def test_classic_recipe_keeps_the_pretrained_encoder_and_trains_the_decoder(tiny_config, tmp_path, arch):
    tiny_config.model.arch = arch
    _set(tiny_config, ARCH_OVERRIDES[arch])
    tiny_config.pretrain.steps = 24
    tiny_config.pretrain.lr = 1e-2
    tiny_config.train.log_every = 4
    tiny_config.model.freeze_encoder = True
    workdir = str(tmp_path / "recipe")
    result = train.train_and_evaluate(tiny_config, workdir)
    with open(os.path.join(workdir, "pretrain", "metrics.jsonl"), encoding="utf-8") as f:
        losses = [r["pretrain/train/loss"] for r in map(json.loads, f) if "pretrain/train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the classifier learned
    with open(os.path.join(workdir, "pretrain", "metrics.json"), encoding="utf-8") as f:
        assert 0 <= json.load(f)["pretrain/val/accuracy"] <= 1
    # the finished pretraining run is reused, not retrained: it returns the same encoder
    model = build_model(tiny_config.model, 4)
    mesh = parallel.make_mesh()
    encoder = pretrain.run(
        tiny_config, os.path.join(workdir, "pretrain"), model, sources.open_splits(tiny_config.data), mesh
    )
    with open(os.path.join(workdir, "pretrain", "metrics.jsonl"), encoding="utf-8") as f:
        assert sum("pretrain/train/loss" in r for r in map(json.loads, f)) == 6
    scopes = pretrain.encoder_scopes(model)
    assert sorted(encoder["params"]) == sorted(scopes)
    # after segmentation training the encoder (weights and BN statistics) is still the pretrained one
    tx = train.make_tx(tiny_config, model)
    template = state.create(model, tx, jnp.zeros((1, 32, 32, 3)), 0)
    ckpt = train.checkpointing.Checkpointer(workdir, 2)
    final, _ = ckpt.restore(template)
    ckpt.close()
    assert int(final.step) == tiny_config.train.steps
    for key, tree in (("params", final.params), ("batch_stats", final.batch_stats)):
        for name in scopes:
            if name in tree:
                assert _leaves_equal(tree[name], encoder[key][name]), (key, name)
    # ... and every decoder and head parameter has moved away from its initial value
    for name in set(final.params) - set(scopes):
        moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), final.params[name], template.params[name])
        assert all(jax.tree_util.tree_leaves(moved)), name
    assert 0 <= result["val/miou"] <= 1


def test_pretraining_with_dropout_draws_dropout_keys(tiny_config):
    tiny_config.model.dropout = 0.5
    model, _, _ = _model_and_state(tiny_config)
    st = state.create(model, optim.build(tiny_config.optim, 10), jnp.zeros((1, 32, 32, 3)), 0, method="classify")
    label = np.random.default_rng(1).integers(0, 4, (2, 32, 32)).astype(np.int32)
    batch = {"image": jnp.ones((2, 32, 32, 3)), "label": jnp.asarray(label), "valid": jnp.ones((2, 32, 32))}
    step = jax.jit(lambda s, b: pretrain.train_step(s, b, model=model))
    first, out = step(st, batch)
    _, again = step(st.replace(rng=first.rng), batch)  # same parameters and statistics, the next key
    assert np.isfinite(float(out["loss"]))
    assert float(again["loss"]) != float(out["loss"])  # a new dropout mask each step


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.freeze_encoder": True}, "randomly initialised encoder"),
        ({"pretrain.steps": 5, "train.num_seeds": 2}, "num_seeds=1"),
        ({"pretrain.steps": -1}, "must be >= 0"),
    ],
)
def test_recipe_config_errors(tiny_config, tmp_path, overrides, message):
    for key, value in overrides.items():
        section, field = key.split(".")
        tiny_config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))


class _SignalBefore:
    """A Preemption whose SIGTERM arrives before training step `n` (its n-th `reached` call)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def reached(self):
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.slow  # three pretraining runs (~15 s warm, more in a fresh clone); CI runs it
def test_a_preempted_pretraining_stage_saves_its_step_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """SIGTERM during the encoder's pretraining: the stage saves the step it reached and the run
    stops (it used to train on to the next checkpoint, or die without one); rerunning resumes
    the stage and gives the encoder of an uninterrupted run, bit for bit."""
    tiny_config.pretrain.steps, tiny_config.train.log_every, tiny_config.train.checkpoint_every = 8, 2, 100
    model, mesh = build_model(tiny_config.model, 4), parallel.make_mesh()
    splits = sources.open_splits(tiny_config.data)
    straight = pretrain.run(tiny_config, str(tmp_path / "straight"), model, splits, mesh)
    stage = str(tmp_path / "stopped")
    assert pretrain.run(tiny_config, stage, model, splits, mesh, _SignalBefore(3)) is None
    assert os.listdir(os.path.join(stage, "checkpoints")) == ["3"]
    resumed = pretrain.run(tiny_config, stage, model, splits, mesh)
    assert _leaves_equal(resumed, straight)
    # a SIGTERM during the finished stage's evaluation (ask 9: after the 8 steps, at its first
    # batch) abandons it: the last step is saved, no metrics.json; rerunning evaluates it
    evaluating = str(tmp_path / "evaluating")
    assert pretrain.run(tiny_config, evaluating, model, splits, mesh, _SignalBefore(9)) is None
    assert os.listdir(os.path.join(evaluating, "checkpoints")) == ["8"]
    assert not os.path.exists(os.path.join(evaluating, "metrics.json"))
    assert _leaves_equal(pretrain.run(tiny_config, evaluating, model, splits, mesh), straight)
    with open(os.path.join(evaluating, "metrics.json"), encoding="utf-8") as f:
        with open(os.path.join(tmp_path / "straight", "metrics.json"), encoding="utf-8") as g:
            assert json.load(f) == json.load(g)
    # through the training entry point: stopped in the first stage, then resumed and finished
    monkeypatch.setattr(train.preemption, "Preemption", lambda: _SignalBefore(5))
    run = str(tmp_path / "run")
    assert train.train_and_evaluate(tiny_config, run) == {"step": 0, "preempted": True}
    assert os.listdir(os.path.join(run, "pretrain", "checkpoints")) == ["5"]
    assert not os.listdir(os.path.join(run, "checkpoints"))  # the segmentation stage never started
    monkeypatch.undo()
    assert train.train_and_evaluate(tiny_config, run)["step"] == tiny_config.train.steps
