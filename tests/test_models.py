"""Networks: shapes, finite gradients, structure (skips really off), size rules, bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.errors import ConfigError
from segjax.models import ARCHS, blocks, build_model
from tests.conftest import assert_trees_equal, load_config


def model_cfg(**overrides):
    cfg = load_config("default").model
    cfg.depth = 2
    cfg.base_features = 4
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def init_apply(model, shape, train=False):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    variables = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)
    return variables, x


@pytest.mark.parametrize("shape", [(1, 1, 8, 3), (3, 3, 4, 8), (3, 3, 3, 4, 8), (2, 2, 2, 8, 4), (5, 5, 5, 16, 2)])
def test_kernel_init_is_flax_lecun_normal_bit_for_bit(shape):
    """`blocks.kernel_init` draws a kernel as a matrix (it compiles faster); its numbers must be
    flax's `lecun_normal` on the kernel's own shape, and so `blocks.Conv` nn.Conv's parameters."""
    key = jax.random.PRNGKey(3)
    want = nn.initializers.lecun_normal()(key, shape)
    np.testing.assert_array_equal(np.asarray(blocks.kernel_init(key, shape)), np.asarray(want))
    x = jnp.ones((1, *(6,) * (len(shape) - 2), shape[-2]))
    ours = blocks.Conv(shape[-1], shape[:-2]).init(key, x)
    theirs = nn.Conv(shape[-1], shape[:-2]).init(key, x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    assert_trees_equal(ours, theirs, rtol=0, atol=0)


KNOBS = [
    {},
    {"arch": "encoder_decoder"},
    {"skips": "10"},
    {"upsample": "resize"},
    {"pool": "avg"},
    {"norm": "group"},
    {"norm": "none"},
    {"dropout": 0.2},
    {"features": (3, 5), "bottleneck_features": 7},
    {"depth": 3, "skips": "none", "upsample": "resize"},
    {"dtype": "bfloat16"},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_shapes_and_finite_gradients(knobs):
    model = build_model(model_cfg(**knobs), num_classes=3)
    variables, x = init_apply(model, (2, 16, 24, 3))
    logits, aux = model.apply(variables, x, train=False)
    assert logits.shape == (2, 16, 24, 3)
    assert logits.dtype == jnp.float32
    assert isinstance(aux, dict)

    def loss(params):
        v = dict(variables, params=params)
        out, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
        return jnp.mean(out[0] ** 2)

    grads = jax.grad(loss)(variables["params"])
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)


def _decoder_outputs(arch: str, skips: str = "all"):
    """Decoder output for one fixed bottleneck with two different sets of skip features."""
    model = build_model(model_cfg(arch=arch, skips=skips), num_classes=2)
    variables, x = init_apply(model, (1, 16, 16, 3))
    bottleneck, levels = model.apply(variables, x, False, method=lambda m, x, t: m.encoder(x, t))
    noisy = [lv + jax.random.normal(jax.random.PRNGKey(i), lv.shape) for i, lv in enumerate(levels)]
    decode = lambda m, b, s: m.decoder(b, s, False)  # noqa: E731
    return (
        model.apply(variables, bottleneck, levels, method=decode),
        model.apply(variables, bottleneck, noisy, method=decode),
    )


def test_encoder_decoder_has_no_skip_path():
    a, b = _decoder_outputs("encoder_decoder")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unet_decoder_uses_skips():
    a, b = _decoder_outputs("unet")
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_per_level_skips_change_decoder_input_channels():
    """skips='10': level 0 concatenates its encoder feature (4 + 4 ch), level 1 does not (8 ch)."""
    model = build_model(model_cfg(skips="10"), num_classes=2)
    variables, _ = init_apply(model, (1, 8, 8, 3))
    dec = variables["params"]["decoder"]
    assert dec["level0"]["Conv_0"]["kernel"].shape[2] == 4 + 4
    assert dec["level1"]["Conv_0"]["kernel"].shape[2] == 8


def count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def param_shapes(model, shape) -> dict:
    """The parameters `model.init` would create for inputs of `shape`, as shapes (nothing is compiled)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))["params"]


def test_param_count_is_size_independent_and_tracks_bottleneck():
    model = build_model(model_cfg(norm="none"), num_classes=2)
    assert count(param_shapes(model, (1, 8, 8, 3))) == count(param_shapes(model, (1, 32, 48, 3)))
    # Bottleneck 16 -> 17 channels with norm='none' (convs have bias): the bottleneck block's
    # first conv 8->F (9*8*F + F), second F->F (9*F*F + F), and up1 transposes F->8 (4*F*8).
    base = count(param_shapes(build_model(model_cfg(norm="none", bottleneck_features=16), 2), (1, 8, 8, 3)))
    plus = count(param_shapes(build_model(model_cfg(norm="none", bottleneck_features=17), 2), (1, 8, 8, 3)))

    def terms(f):
        return 9 * 8 * f + f + 9 * f * f + f + 4 * f * 8

    assert plus - base == terms(17) - terms(16)


def test_unet_parameter_count_by_hand():
    """depth 1, base 2, no norm, 1 input ch, 2 classes: every conv counted by hand."""
    cfg = model_cfg(depth=1, base_features=2, norm="none", bottleneck_features=3)
    params = param_shapes(build_model(cfg, 2), (1, 4, 4, 1))
    enc = (9 * 1 * 2 + 2) + (9 * 2 * 2 + 2)  # level0: 1->2, 2->2
    bott = (9 * 2 * 3 + 3) + (9 * 3 * 3 + 3)  # 2->3, 3->3
    up = 4 * 3 * 2 + 2  # 2x2 transpose 3->2
    dec = (9 * 4 * 2 + 2) + (9 * 2 * 2 + 2)  # concat 2+2 -> 2, 2->2
    head = 2 * 2 + 2
    assert count(params) == enc + bott + up + dec + head


def test_size_not_divisible_by_depth_says_what_to_pad_to():
    model = build_model(model_cfg(depth=3), num_classes=2)
    with pytest.raises(ConfigError, match=r"divisible by 2\*\*depth=8; pad or crop 100 to 104"):
        param_shapes(model, (1, 100, 64, 3))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ConfigError, match="valid architectures") as err:
        build_model(model_cfg(arch="resnet"), 2)
    for name in ARCHS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("knobs", "pattern"),
    [
        ({"skips": "101"}, "3 entries but model.depth=2"),
        ({"skips": "some"}, "model.skips='some' is not valid"),
        ({"upsample": "pixelshuffle"}, "model.upsample='pixelshuffle'"),
        ({"pool": "min"}, "model.pool='min'"),
        ({"norm": "layer"}, "model.norm='layer'"),
        ({"features": (4, 8, 16)}, "model.features has 3 entries"),
        ({"arch": "encoder_decoder", "skips": "10"}, "has no skip connections"),
        ({"dtype": "float16"}, "model.dtype='float16'"),
    ],
)
def test_bad_model_config(knobs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        model = build_model(model_cfg(**knobs), 2)
        param_shapes(model, (1, 16, 16, 3))


def test_wrong_rank_input_is_explained():
    model = build_model(model_cfg(), 2)
    with pytest.raises(ConfigError, match=r"expects \[batch, H, W, C\]"):
        param_shapes(model, (16, 16, 3))


# --- the architecture family: U-Net++, V-Net, 3D ---------------------------------------------

FAMILY = [
    ("unet", 2, {}),
    ("unet", 3, {}),
    ("unet", 2, {"deep_supervision": True, "upsample": "resize"}),
    ("encoder_decoder", 3, {}),
    ("unetpp", 2, {"deep_supervision": True}),
    ("unetpp", 3, {"deep_supervision": True, "upsample": "resize", "pool": "avg"}),
    ("unetpp", 2, {"deep_supervision": False, "skips": "01", "norm": "group"}),
    ("vnet", 3, {}),
    ("vnet", 2, {"kernel_size": 5, "norm": "none"}),
    ("vnet", 3, {"skips": "none", "stage_convs": (1, 1, 2)}),
]


@pytest.mark.parametrize(("arch", "dims", "knobs"), FAMILY, ids=lambda v: str(v))
def test_family_shapes_and_finite_gradients(arch, dims, knobs):
    model = build_model(model_cfg(arch=arch, spatial_dims=dims, **knobs), num_classes=3)
    shape = (2, 8, 8, 8, 1) if dims == 3 else (2, 16, 12, 3)
    variables, x = init_apply(model, shape)
    logits, _ = model.apply(variables, x, train=False)
    assert logits.shape == (*shape[:-1], 3) and logits.dtype == jnp.float32

    def loss(params):
        (out, aux), _ = model.apply(dict(variables, params=params), x, train=True, mutable=["batch_stats"])
        heads = aux.get("heads", [out])
        return sum(jnp.mean(h**2) for h in heads)

    grads = jax.tree_util.tree_leaves(jax.grad(loss)(variables["params"]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in grads) > len(grads) // 2


def test_unet_deep_supervision_heads_are_resized_level_outputs_and_leave_the_output_alone():
    """A 1x1 head per decoder level, resized to the image; weights 1, 1/2, 1/4 normalised; the
    full-resolution output equals the plain U-Net's with the same parameters; no heads at eval."""
    cfg = model_cfg(depth=3, base_features=4, deep_supervision=True)
    model = build_model(cfg, 2)
    variables, x = init_apply(model, (2, 16, 24, 3))
    (logits, aux), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert len(aux["heads"]) == 3 and all(h.shape == logits.shape for h in aux["heads"])
    np.testing.assert_allclose(aux["head_weights"], (4 / 7, 2 / 7, 1 / 7), rtol=1e-12)

    def decode(m, x):
        bottleneck, levels = m.encoder(x, True)
        return m.decoder(bottleneck, levels, True, every_level=True)

    outs, _ = model.apply(variables, x, method=decode, mutable=["batch_stats"])
    assert [o.shape[1:3] for o in outs] == [(16, 24), (8, 12), (4, 6)]
    np.testing.assert_allclose(np.asarray(aux["heads"][0]), np.asarray(logits))
    for level in (1, 2):
        p = variables["params"][f"coarse_heads_{level - 1}"]
        coarse = np.einsum("bhwc,ck->bhwk", np.asarray(outs[level]), np.asarray(p["kernel"][0, 0])) + p["bias"]
        want = jax.image.resize(coarse, logits.shape, method="bilinear")
        np.testing.assert_allclose(np.asarray(aux["heads"][level]), np.asarray(want), rtol=1e-4, atol=1e-5)
    plain = build_model(model_cfg(depth=3, base_features=4), 2)
    params = {k: v for k, v in variables["params"].items() if not k.startswith("coarse_heads")}
    out, plain_aux = plain.apply(dict(variables, params=params), x, train=False)
    ds_out, ds_aux = model.apply(variables, x, train=False)
    np.testing.assert_allclose(np.asarray(ds_out), np.asarray(out), rtol=1e-6)
    assert "heads" not in ds_aux and "heads" not in plain_aux


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_unetpp_nested_grid_node_count(depth):
    """d(d+1)/2 decoder nodes X^{i,j>0} plus d+1 encoder nodes X^{i,0}, and d heads."""
    model = build_model(model_cfg(arch="unetpp", depth=depth, base_features=2, deep_supervision=True), 2)
    variables, x = init_apply(model, (1, 2**depth, 2**depth, 1))
    names = set(variables["params"])
    encoder = {n for n in names if n.startswith("X") and n.endswith("_0")}
    decoder = {n for n in names if n.startswith("X") and not n.endswith("_0")}
    assert len(encoder) == depth + 1
    assert len(decoder) == depth * (depth + 1) // 2
    _, aux = model.apply(variables, x)
    assert len(aux["heads"]) == depth


def test_unetpp_dense_skips_feed_every_earlier_node_of_the_level():
    """X^{0,2} at depth 2, base 4: input = X^{0,0} (4) + X^{0,1} (4) + up(X^{1,1}) (4) = 12 channels."""
    model = build_model(model_cfg(arch="unetpp", depth=2, base_features=4), 2)
    params = param_shapes(model, (1, 8, 8, 3))
    assert params["X0_2"]["Conv_0"]["kernel"].shape[2] == 12
    assert params["X1_1"]["Conv_0"]["kernel"].shape[2] == 8 + 8


def test_unetpp_pruned_inference_uses_a_smaller_network():
    from segjax.models import unetpp

    cfg = model_cfg(arch="unetpp", depth=3, base_features=4, deep_supervision=True)
    full = build_model(cfg, 2)
    variables, x = init_apply(full, (1, 16, 16, 3))
    cfg.inference_head = 1
    pruned = build_model(cfg, 2)
    logits, aux = pruned.apply(variables, x)
    _, full_aux = full.apply(variables, x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_aux["heads"][0]), rtol=1e-5, atol=1e-5)
    assert len(aux["heads"]) == 1
    n_full = count(variables["params"])
    n_pruned = unetpp.inference_param_count(variables["params"], 3, 1)
    assert n_pruned < n_full / 4  # levels 0..1 only
    assert unetpp.inference_param_count(variables["params"], 3, 3) == n_full

    def flops(model):
        cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(pruned) < flops(full) / 2


def test_family_param_count_is_size_independent_and_tracks_width():
    for arch, dims in (("unetpp", 2), ("vnet", 3), ("unet", 3)):
        small_shape = (1, 8, 8, 8, 1) if dims == 3 else (1, 8, 8, 3)
        large_shape = (1, 16, 8, 24, 1) if dims == 3 else (1, 32, 24, 3)
        model = build_model(model_cfg(arch=arch, spatial_dims=dims), 2)
        a = count(param_shapes(model, small_shape))
        assert a == count(param_shapes(model, large_shape))
        wider = build_model(model_cfg(arch=arch, spatial_dims=dims, base_features=8), 2)
        assert count(param_shapes(wider, small_shape)) > 2 * a


@pytest.mark.parametrize(
    ("knobs", "pattern"),
    [
        ({"arch": "vnet", "deep_supervision": True}, "deep_supervision=True does not apply to model.arch='vnet'"),
        ({"arch": "unet", "deep_supervision": True, "depth": 1}, "deep_supervision needs model.depth >= 2"),
        ({"arch": "vnet", "pool": "avg"}, "model.pool='avg' does not apply to model.arch='vnet'"),
        ({"arch": "unet", "spatial_dims": 4}, "spatial_dims=4 is not supported"),
        ({"arch": "unetpp", "inference_head": 3}, "inference_head=3 must be in 0..model.depth=2"),
        ({"arch": "unetpp", "inference_head": 1}, "needs model.deep_supervision=True"),
        ({"arch": "vnet", "stage_convs": (1, 2)}, "stage_convs needs depth\\+1=3 entries"),
        ({"arch": "unet", "depth": 0}, "model.depth=0 must be >= 1"),
        ({"arch": "unetpp", "depth": 0}, "model.depth=0 must be >= 1"),  # an IndexError before
        ({"arch": "vnet", "depth": 0}, "model.depth=0 must be >= 1"),
    ],
)
def test_unsupported_combinations(knobs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        model = build_model(model_cfg(**knobs), 2)
        param_shapes(model, (1, 8, 8, 3))


def test_volume_that_does_not_fit_depth_and_wrong_rank():
    model = build_model(model_cfg(arch="vnet", spatial_dims=3, depth=2), 2)
    with pytest.raises(ConfigError, match="pad or crop 10 to 12"):
        param_shapes(model, (1, 8, 10, 8, 1))
    with pytest.raises(ConfigError, match=r"spatial_dims=3 expects \[batch, D, H, W, C\]"):
        param_shapes(model, (1, 8, 8, 1))


@pytest.mark.parametrize(
    "arch,dims,ds",
    [
        ("unet", 2, False),
        ("unet", 2, True),
        ("unet", 3, False),
        ("encoder_decoder", 2, False),
        ("unetpp", 2, True),
        ("unetpp", 3, True),
        ("vnet", 2, False),
        ("vnet", 3, False),
    ],
)
def test_a_few_steps_lower_the_loss(arch, dims, ds):
    import functools

    from segjax import optim, state, steps

    cfg = load_config("default")
    cfg.model.arch, cfg.model.spatial_dims, cfg.model.depth, cfg.model.base_features = arch, dims, 2, 4
    cfg.model.deep_supervision = ds
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    model = build_model(cfg.model, 2)
    shape = (2, 8, 8, 8, 1) if dims == 3 else (2, 16, 16, 3)
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    batch = {"image": image, "label": (image[..., 0] > 0).astype(np.int32), "valid": np.ones(shape[:-1], np.float32)}
    st = state.create(model, optim.build(cfg.optim, 20), jnp.asarray(image[:1]), 0)
    step = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss))
    losses = []
    for _ in range(20):
        st, out = step(st, batch)
        # the full-resolution output's loss (U-Net's coarse heads cannot fit this per-pixel target)
        losses.append(float(out["loss_head1"] if ds and arch == "unet" else out["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
