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
from segjax.errors import CheckpointError, ConfigError
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


def _model_and_state(config, seed=0):
    model = build_model(config.model, config.data.num_classes)
    tx = optim.build(config.optim, 10)
    return model, tx, state.create(model, tx, jnp.zeros((1, 32, 32, 3)), seed)


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


def test_frozen_encoder_gets_no_gradient_and_no_update(tiny_config):
    tiny_config.model.freeze_encoder = True
    model, _, st = _model_and_state(tiny_config)
    image = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def loss(params):
        (logits, _), _ = model.apply(
            {"params": params, "batch_stats": st.batch_stats}, image, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2)

    grads = jax.grad(loss)(st.params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads["encoder"]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads["decoder"]))
    # the optimizer leaves the encoder alone even where weight decay would move it
    tx = pretrain.frozen_encoder_tx(optax.adamw(1e-2, weight_decay=0.5))
    ones = jax.tree_util.tree_map(jnp.ones_like, st.params)
    updates, _ = tx.update(ones, tx.init(st.params), st.params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates["encoder"]))
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(updates["head"]))


def test_load_encoder_replaces_only_the_encoder_and_checks_shapes(tiny_config):
    _, _, st = _model_and_state(tiny_config, seed=0)
    _, _, other = _model_and_state(tiny_config, seed=1)
    loaded = pretrain.load_encoder(st, {"params": other.params["encoder"], "batch_stats": other.batch_stats["encoder"]})
    same = jax.tree_util.tree_map(np.array_equal, loaded.params["encoder"], other.params["encoder"])
    assert all(jax.tree_util.tree_leaves(same))
    kept = jax.tree_util.tree_map(np.array_equal, loaded.params["decoder"], st.params["decoder"])
    assert all(jax.tree_util.tree_leaves(kept))
    tiny_config.model.base_features = 8
    _, _, wider = _model_and_state(tiny_config)
    with pytest.raises(CheckpointError, match="pretrained encoder"):
        pretrain.load_encoder(st, {"params": wider.params["encoder"], "batch_stats": wider.batch_stats["encoder"]})


def test_classic_recipe_keeps_the_pretrained_encoder_and_trains_the_decoder(tiny_config, tmp_path):
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
    # after segmentation training the encoder (weights and BN statistics) is still the pretrained one
    tx = pretrain.frozen_encoder_tx(optim.build(tiny_config.optim, tiny_config.train.steps))
    template = state.create(model, tx, jnp.zeros((1, 32, 32, 3)), 0)
    ckpt = train.checkpointing.Checkpointer(workdir, 2)
    final, _ = ckpt.restore(template)
    ckpt.close()
    assert int(final.step) == tiny_config.train.steps
    for key, tree in (("params", final.params), ("batch_stats", final.batch_stats)):
        same = jax.tree_util.tree_map(np.array_equal, tree["encoder"], encoder[key])
        assert all(jax.tree_util.tree_leaves(same)), key
    moved = jax.tree_util.tree_map(
        lambda a, b: not np.array_equal(a, b), final.params["decoder"], template.params["decoder"]
    )
    assert all(jax.tree_util.tree_leaves(moved))
    assert 0 <= result["val/miou"] <= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.freeze_encoder": True}, "randomly initialised encoder"),
        ({"pretrain.steps": 5, "model.arch": "unetpp"}, "pretrain.steps > 0 needs model.arch"),
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
