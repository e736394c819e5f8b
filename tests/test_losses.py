"""Losses against optax references and known properties; ignored pixels carry no gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import losses
from segjax.errors import ConfigError


def batch(seed=0, shape=(2, 6, 5), num_classes=4, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    logits = (3 * jax.random.normal(k1, (*shape, num_classes))).astype(dtype)
    labels = jax.random.randint(k2, shape, 0, num_classes)
    return logits, labels


def test_cross_entropy_equals_optax():
    logits, labels = batch()
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, jnp.ones(labels.shape)), ref, rtol=1e-6)


def test_cross_entropy_masked_mean_uses_valid_pixels_only():
    logits, labels = batch(1)
    valid = (jnp.arange(labels.size).reshape(labels.shape) % 3 == 0).astype(jnp.float32)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ref = per_pixel[valid > 0].mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, valid), ref, rtol=1e-6)


def test_class_weighted_cross_entropy_is_weighted_mean():
    logits, labels = batch(2)
    w = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    per_pixel = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    wy = w[np.asarray(labels)]
    ref = (wy * per_pixel).sum() / wy.sum()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, jnp.ones(labels.shape), w), ref, rtol=1e-5)


def test_label_smoothing_matches_optax_smooth_labels():
    logits, labels = batch(3)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 4), 0.1)
    ref = optax.softmax_cross_entropy(logits, targets).mean()
    got = losses.cross_entropy(logits, labels, jnp.ones(labels.shape), label_smoothing=0.1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_soft_dice_per_image_equals_optax_dice_loss():
    logits, labels = batch(4)
    ref = optax.losses.dice_loss(logits, jax.nn.one_hot(labels, 4), smooth=1.0).mean()
    got = losses.soft_dice(logits, labels, jnp.ones(labels.shape), smooth=1.0, per_image=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_soft_dice_of_perfect_prediction_is_near_zero():
    labels = jnp.array([[0, 1], [2, 1]])
    logits = 50.0 * jax.nn.one_hot(labels, 3)
    assert float(losses.soft_dice(logits, labels, jnp.ones(labels.shape), smooth=1e-6)) < 1e-5


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, labels = batch(5)
    valid = jnp.ones(labels.shape)
    np.testing.assert_allclose(
        losses.focal(logits, labels, valid, gamma=0.0), losses.cross_entropy(logits, labels, valid), rtol=1e-6
    )


def test_focal_down_weights_easy_pixels():
    logits, labels = batch(6)
    valid = jnp.ones(labels.shape)
    assert float(losses.focal(logits, labels, valid, gamma=2.0)) < float(losses.cross_entropy(logits, labels, valid))


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz"])
def test_ignored_pixels_get_no_gradient(name):
    logits, labels = batch(7)
    valid = jnp.ones(labels.shape).at[0, 0, 0].set(0.0)
    fn = {
        "ce": losses.cross_entropy,
        "dice": losses.soft_dice,
        "focal": losses.focal,
        "lovasz": losses.lovasz_softmax,
    }[name]
    grads = jax.grad(lambda lg: fn(lg, labels, valid))(logits)
    assert float(jnp.abs(grads[0, 0, 0]).max()) == 0.0
    assert float(jnp.abs(grads[1]).max()) > 0.0


def test_bfloat16_logits_on_large_input_match_float32():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    logits = 8 * jax.random.normal(k1, (1, 1024, 1024, 3))
    labels = jax.random.randint(k2, (1, 1024, 1024), 0, 3)
    valid = jnp.ones(labels.shape)
    for fn in (losses.cross_entropy, losses.soft_dice):
        lo = fn(logits.astype(jnp.bfloat16), labels, valid)
        hi = fn(logits.astype(jnp.bfloat16).astype(jnp.float32), labels, valid)
        assert lo.dtype == jnp.float32 and bool(jnp.isfinite(lo))
        np.testing.assert_allclose(lo, hi, rtol=1e-5)
    from segjax import metrics

    cm16 = metrics.confusion_matrix(labels, jnp.argmax(logits.astype(jnp.bfloat16), -1), 3)
    cm32 = metrics.confusion_matrix(labels, jnp.argmax(logits.astype(jnp.bfloat16).astype(jnp.float32), -1), 3)
    np.testing.assert_array_equal(np.asarray(cm16), np.asarray(cm32))
    assert int(cm16.sum()) == 1024 * 1024
    assert np.isfinite(float(metrics.summarize(cm16)["miou"]))


def loss_cfg(terms):
    from tests.conftest import load_config

    cfg = load_config("default").loss
    cfg.terms, cfg.dice_weight = terms, 0.5
    return cfg


def test_total_loss_is_weighted_sum():
    logits, labels = batch(8)
    valid = jnp.ones(labels.shape)
    total, terms = losses.total_loss(loss_cfg("ce+dice"), logits, labels, valid)
    ce = losses.cross_entropy(logits, labels, valid)
    dice = losses.soft_dice(logits, labels, valid)
    np.testing.assert_allclose(total, ce + 0.5 * dice, rtol=1e-6)
    assert set(terms) == {"ce", "dice"}


def test_deep_supervision_heads_are_weighted_by_config_else_network_else_equally():
    heads = [batch(s)[0] for s in (1, 2, 3)]
    labels = batch(1)[1]
    valid = jnp.ones(labels.shape)
    cfg = loss_cfg("ce+dice")
    one = [float(losses.cross_entropy(h, labels, valid) + 0.5 * losses.soft_dice(h, labels, valid)) for h in heads]
    network = (4 / 7, 2 / 7, 1 / 7)
    total, terms = losses.total_loss(cfg, heads[0], labels, valid, {"heads": heads, "head_weights": network})
    np.testing.assert_allclose(total, np.dot(network, one), rtol=1e-6)
    np.testing.assert_allclose([terms[f"head{j}"] for j in (1, 2, 3)], one, rtol=1e-6)
    np.testing.assert_allclose(
        losses.total_loss(cfg, heads[0], labels, valid, {"heads": heads})[0], np.mean(one), rtol=1e-6
    )
    cfg.deep_supervision_weights = (1.0, 0.0, 0.0)  # the config wins over the network's weights
    chosen, _ = losses.total_loss(cfg, heads[0], labels, valid, {"heads": heads, "head_weights": network})
    np.testing.assert_allclose(chosen, one[0], rtol=1e-6)


def test_lovasz_term_is_weighted_and_follows_dice_background():
    logits, labels = batch(15, num_classes=3)
    valid = jnp.ones(labels.shape)
    cfg = loss_cfg("lovasz")
    cfg.lovasz_weight, cfg.dice_background = 2.0, False
    total, terms = losses.total_loss(cfg, logits, labels, valid)
    expected = 2.0 * losses.lovasz_softmax(logits, labels, valid, include_background=False)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert set(terms) == {"lovasz"}
    assert not np.isclose(float(expected), 2.0 * float(losses.lovasz_softmax(logits, labels, valid)))


def test_unknown_loss_term():
    logits, labels = batch()
    with pytest.raises(ConfigError, match="unknown terms"):
        losses.total_loss(loss_cfg("ce+lovasz_hinge"), logits, labels, jnp.ones(labels.shape))


def test_tversky_with_equal_weights_is_dice_and_penalises_misses_more_with_beta():
    logits, labels = batch(9)
    valid = jnp.ones(labels.shape)
    np.testing.assert_allclose(
        losses.soft_dice(logits, labels, valid, alpha=0.5, beta=0.5), losses.soft_dice(logits, labels, valid)
    )
    # predict class 0 everywhere: all errors are misses (FN) of classes 1..3 -> beta matters more
    all_zero = 20.0 * jax.nn.one_hot(jnp.zeros_like(labels), 4)
    recall_heavy = losses.soft_dice(all_zero, labels, valid, alpha=0.2, beta=0.8)
    precision_heavy = losses.soft_dice(all_zero, labels, valid, alpha=0.8, beta=0.2)
    assert float(recall_heavy) > float(precision_heavy)


def test_dice_empty_policy():
    """Class 2 absent from targets and not predicted: 'one' counts it as solved, 'nan' drops it."""
    labels = jnp.array([[0, 1], [1, 0]])
    logits = 20.0 * jax.nn.one_hot(jnp.array([[0, 1], [0, 0]]), 3)
    valid = jnp.ones(labels.shape)
    probs = jax.nn.softmax(logits)
    onehot = jax.nn.one_hot(labels, 3)
    inter = (probs * onehot).sum((0, 1))
    index = (inter + 1.0) / (0.5 * (probs.sum((0, 1)) + onehot.sum((0, 1))) + 1.0)  # smooth = 1
    np.testing.assert_allclose(losses.soft_dice(logits, labels, valid, empty="one"), jnp.mean(1 - index), rtol=1e-5)
    np.testing.assert_allclose(losses.soft_dice(logits, labels, valid, empty="nan"), jnp.mean(1 - index[:2]), rtol=1e-5)


def lovasz_reference(probs: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> float:
    """Berman et al.'s `lovasz_softmax_flat` (classes='present'), in numpy: ignored pixels are
    dropped before sorting (segjax masks them instead, to keep static shapes)."""
    probs, labels = probs.reshape(-1, probs.shape[-1])[valid.ravel() > 0], labels.ravel()[valid.ravel() > 0]
    per_class = []
    for c in range(probs.shape[1]):
        fg = (labels == c).astype(np.float64)
        if fg.sum() == 0:
            continue
        errors = np.abs(fg - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        gt_sorted = fg[order]
        intersection = gt_sorted.sum() - gt_sorted.cumsum()
        union = gt_sorted.sum() + (1.0 - gt_sorted).cumsum()
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        per_class.append(float(errors[order] @ jaccard))
    return float(np.mean(per_class))


def test_lovasz_softmax_equals_the_reference_algorithm_with_ignored_pixels():
    logits, labels = batch(11, shape=(2, 9, 7), num_classes=3)
    valid = (jax.random.uniform(jax.random.PRNGKey(12), labels.shape) > 0.3).astype(jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    ref = lovasz_reference(probs, np.asarray(labels), np.asarray(valid))
    np.testing.assert_allclose(losses.lovasz_softmax(logits, labels, valid), ref, rtol=1e-5)


def test_lovasz_softmax_of_hard_predictions_is_one_minus_iou():
    """The Lovász extension agrees with the set function on 0/1 errors: 1 - IoU per class,
    averaged over the classes present in the labels (class 3 here is predicted, never labelled)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 8, 8))
    pred = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, 4, labels.shape), labels)
    logits = 100.0 * jax.nn.one_hot(pred, 4)  # softmax = the one-hot prediction in float32
    ious = [np.sum((pred == c) & (labels == c)) / np.sum((pred == c) | (labels == c)) for c in range(3)]
    value = losses.lovasz_softmax(logits, jnp.asarray(labels), jnp.ones(labels.shape))
    np.testing.assert_allclose(value, 1.0 - np.mean(ious), rtol=1e-6)
    no_background = losses.lovasz_softmax(logits, jnp.asarray(labels), jnp.ones(labels.shape), include_background=False)
    np.testing.assert_allclose(no_background, 1.0 - np.mean(ious[1:]), rtol=1e-6)


def test_lovasz_softmax_over_a_device_axis_is_the_global_batch_loss():
    logits, labels = batch(13, shape=(4, 6, 6), num_classes=3)
    valid = jnp.ones(labels.shape)
    full = losses.lovasz_softmax(logits, labels, valid)
    split = lambda x: x.reshape(2, 2, *x.shape[1:])  # noqa: E731  two "devices" of two images
    per_device = jax.vmap(lambda lg, lb, v: losses.lovasz_softmax(lg, lb, v, axis_name="d"), axis_name="d")(
        split(logits), split(labels), split(valid)
    )
    np.testing.assert_allclose(per_device, [full, full], rtol=1e-6)


def test_lovasz_softmax_gradient_matches_finite_differences_of_the_reference():
    logits, labels = batch(14, shape=(1, 5, 4), num_classes=3)
    valid = jnp.ones(labels.shape).at[0, 0, 0].set(0.0)
    grads = np.asarray(jax.grad(lambda lg: losses.lovasz_softmax(lg, labels, valid))(logits))
    x, lab, v = np.asarray(logits, np.float64), np.asarray(labels), np.asarray(valid)

    def ref(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return lovasz_reference(e / e.sum(-1, keepdims=True), lab, v)

    eps, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        numeric[idx] = (ref(x + step) - ref(x - step)) / (2 * eps)
    np.testing.assert_allclose(grads, numeric, atol=2e-4)
