"""Networks: shapes, finite gradients, structure (skips really off), size rules, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.errors import ConfigError
from segjax.models import ARCHS, build_model
from tests.conftest import load_config


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


@pytest.mark.parametrize("dims", [2, 3])
def test_transpose_conv_as_matmul_equals_the_textbook_layer(dims):
    import flax.linen as nn

    from segjax.models import blocks

    shape = (2, 3, 4, 5, 6)[-(dims + 2) :]
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref = nn.ConvTranspose(7, (2,) * dims, strides=(2,) * dims)
    params = ref.init(jax.random.PRNGKey(1), x)
    params = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    ours = blocks.TransposeConv2x(7, dims)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_map(
        jnp.shape, params
    )
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    grad_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    grad_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grad_ours), jax.tree_util.tree_leaves(grad_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_the_textbook_layer(dims, ties):
    """Same values and input gradient as flax's reduce-window max-pool, also when a window holds
    its maximum twice or more (small integers after a ReLU: many all-zero windows), where the
    textbook gradient goes to the first maximum in row-major window order."""
    import flax.linen as nn

    from segjax.models import blocks

    shape = (2, 8, 6, 4, 3)[-(dims + 2) :]
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    if ties:
        x = jax.nn.relu(jnp.round(x))
    window = (2,) * dims
    ref = lambda v: nn.max_pool(v, window, strides=window)  # noqa: E731
    ours = lambda v: blocks.pool(v, "max", dims)  # noqa: E731
    np.testing.assert_array_equal(ours(x), ref(x))
    weights = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    grad_ours = jax.grad(lambda v: jnp.sum(ours(v) * weights))(x)
    grad_ref = jax.grad(lambda v: jnp.sum(ref(v) * weights))(x)
    np.testing.assert_array_equal(grad_ours, grad_ref)
    assert int(jnp.sum(grad_ours != 0)) == weights.size  # one winner per window
    poisoned = x.reshape(-1).at[jnp.arange(1, x.size, 7)].set(jnp.nan).reshape(x.shape)  # not first in a window
    np.testing.assert_array_equal(np.isnan(ours(poisoned)), np.isnan(ref(poisoned)))
    assert bool(jnp.isnan(ours(poisoned)).any())
    if ties:  # the case that tells the forms apart: plenty of windows with a repeated maximum
        windows = np.asarray(x).reshape(shape[0], *(n for s in shape[1:-1] for n in (s // 2, 2)), shape[-1])
        axes = tuple(range(2, 2 * dims + 1, 2))
        repeated = (windows == windows.max(axis=axes, keepdims=True)).sum(axis=axes) > 1
        assert repeated.mean() > 0.2


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, strides",
    [
        ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1)),  # an RGB image's first convolution
        ((1, 8, 8, 8, 1), (3, 3, 3, 1, 2), (2, 2, 2)),  # a 1-channel volume, strided, 2 outputs
        ((2, 10, 10, 16), (1, 1, 16, 2), (1, 1)),  # a 1x1 head with 2 classes
    ],
)
def test_channel_padded_conv_equals_the_plain_convolution(lhs_shape, rhs_shape, strides):
    """Zero channels change neither the output nor the gradients (`conv_forms.aligned_conv`'s CUDA form)."""
    from jax import lax

    from segjax.models import conv_forms

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    spatial = "DHW"[-(len(lhs_shape) - 2) :]
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    plain = lambda a, b: lax.conv_general_dilated(a, b, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    padded = lambda a, b: conv_forms.channel_padded_conv(a, b, strides, "SAME", dimension_numbers=dn)  # noqa: E731
    np.testing.assert_allclose(padded(lhs, rhs), plain(lhs, rhs), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, ref in zip(
        jax.grad(loss(padded), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_aligned_conv_pads_channels_only_when_lowered_for_cuda():
    """nn.Conv's parameters are unchanged; the CUDA program convolves 8 channels, the CPU one 3."""
    import re

    from segjax.models import blocks

    conv = blocks.Conv(4, (3, 3))
    x = jnp.ones((1, 8, 8, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 4), "bias": (4,)}}
    apply = jax.jit(conv.apply)

    def convolution_operands(platform):
        text = apply.trace(variables, x).lower(lowering_platforms=(platform,)).as_text()
        return re.findall(r"stablehlo\.convolution.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)

    assert convolution_operands("cpu") == [("tensor<1x8x8x3xf32>", "tensor<3x3x3x4xf32>")]
    assert convolution_operands("cuda") == [("tensor<1x8x8x8xf32>", "tensor<3x3x8x8xf32>")]
    conv, aligned = blocks.Conv(16, (3, 3)), jnp.ones((1, 8, 8, 8))
    lowered = jax.jit(conv.apply).trace(conv.init(jax.random.PRNGKey(0), aligned), aligned)
    assert "case" not in lowered.lower(lowering_platforms=("cuda",)).as_text()  # nothing to pad: no switch


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, strides, padding, rhs_dilation",
    [
        ((2, 8, 8, 8, 3), (3, 3, 3, 3, 4), (1, 1, 1), "SAME", None),  # U-Net 3D block
        ((1, 9, 8, 7, 5), (5, 5, 5, 5, 6), (1, 1, 1), "SAME", None),  # V-Net's 5x5x5, odd sizes
        ((2, 8, 8, 8, 4), (2, 2, 2, 4, 8), (2, 2, 2), "VALID", None),  # V-Net's strided down-convolution
        ((1, 8, 8, 8, 2), (1, 1, 1, 2, 3), (1, 1, 1), "SAME", None),  # a 1x1x1 head
        ((1, 10, 9, 8, 2), (3, 3, 3, 2, 3), (2, 1, 1), ((2, 1), (1, 0), (0, 2)), (2, 1, 2)),  # uneven pads, dilation
    ],
)
def test_depth_folded_conv_equals_the_3d_convolution(lhs_shape, rhs_shape, strides, padding, rhs_dilation):
    """The 2D form of a 3D convolution (`conv_forms.aligned_conv`'s CPU form): same output and gradients."""
    from jax import lax

    from segjax.models import conv_forms

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    plain = lambda a, b: lax.conv_general_dilated(  # noqa: E731
        a, b, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dn
    )
    folded = lambda a, b: conv_forms.depth_folded_conv(a, b, strides, padding, rhs_dilation=rhs_dilation)  # noqa: E731
    ref = plain(lhs, rhs)
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(folded(lhs, rhs), ref, rtol=1e-5, atol=1e-5 * scale)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, want in zip(
        jax.grad(loss(folded), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        assert ours.shape == want.shape
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_3d_convolutions_lower_to_2d_ones_on_cpu_only():
    """nn.Conv 3D: the CPU program holds only 2D (rank-4) convolutions, the CUDA one a 3D one;
    grouped 3D convolutions (vmapped seeds) keep the plain form everywhere."""
    import re

    from segjax.models import blocks

    def convolution_ranks(conv, x, platform):
        lowered = jax.jit(conv.apply).trace(conv.init(jax.random.PRNGKey(0), x), x)
        text = lowered.lower(lowering_platforms=(platform,)).as_text()
        operands = re.findall(r"stablehlo\.convolution.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
        return {lhs.count("x") for lhs, _ in operands}  # "tensor<1x8x8x8x2xf32>": rank = count of 'x'

    x = jnp.ones((1, 8, 8, 8, 16))
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3)), x, "cpu") == {4}
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3)), x, "cuda") == {5}
    assert convolution_ranks(blocks.Conv(16, (3, 3, 3), feature_group_count=2), x, "cpu") == {5}
    conv = blocks.Conv(16, (3, 3, 3))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 16, 16), "bias": (16,)}}


@pytest.mark.parametrize("dims", [2, 3])
def test_pointwise_conv_equals_the_1x1_convolution_and_is_a_product_on_cpu_only(dims):
    """A 1x1(x1) nn.Conv (segjax's heads): on CPU one matrix product, the same output and
    gradients as flax's own convolution; CUDA keeps the convolution; a strided or padded 1x1
    convolution is no plain product and keeps it on CPU too."""
    import re

    import flax.linen as nn

    from segjax.models import blocks

    x = jax.random.normal(jax.random.PRNGKey(0), (2, *(6, 5, 4)[:dims], 7))
    ours, ref = blocks.Conv(3, (1,) * dims), nn.Conv(3, (1,) * dims)
    variables = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_map(
        jnp.shape, variables
    )
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
    loss = lambda m: lambda v, a: jnp.sum(jnp.sin(m.apply(v, a)))  # noqa: E731
    got, want = jax.grad(loss(ours), (0, 1))(variables, x), jax.grad(loss(ref), (0, 1))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def ops(conv, platform):
        lowered = jax.jit(conv.apply).trace(conv.init(jax.random.PRNGKey(0), x), x)
        text = lowered.lower(lowering_platforms=(platform,)).as_text()
        return len(re.findall(r"stablehlo\.convolution", text)), len(re.findall(r"stablehlo\.dot_general", text))

    assert ops(ours, "cpu") == (0, 1)
    assert ops(ours, "cuda")[0] == 1
    assert ops(blocks.Conv(3, (1,) * dims, strides=2), "cpu")[0] == 1
    assert ops(blocks.Conv(3, (1,) * dims, padding=1), "cpu")[0] == 1


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, padding",
    [
        ((2, 2, 2, 5), (3, 3, 5, 4), "SAME"),  # a U-Net's 2 x 2 bottleneck
        ((1, 4, 4, 3), (3, 3, 3, 2), ((1, 1), (1, 1))),
        ((2, 3, 5, 2), (5, 5, 2, 3), "SAME"),  # V-Net's 5 x 5 window, wider than the image
        ((1, 4, 3, 2), (3, 3, 2, 2), ((0, 1), (2, 0))),  # uneven padding
        ((1, 3, 3, 2), (2, 2, 2, 3), "VALID"),
        ((2, 2, 2, 2, 5), (3, 3, 3, 5, 4), "SAME"),  # a 3D U-Net's 2^3 bottleneck
        ((1, 5, 2, 3, 2), (3, 3, 3, 2, 3), ((1, 1), (0, 1), (2, 0))),  # deeper than wide, uneven padding
        ((1, 3, 4, 4, 2), (2, 3, 1, 2, 2), "VALID"),
    ],
)
def test_patches_conv_equals_the_convolution(lhs_shape, rhs_shape, padding):
    """The patches form of a small image's (or volume's) convolution: same output and gradients as lax's."""
    from jax import lax

    from segjax.models import conv_forms

    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (lhs_shape, rhs_shape))
    nd = len(lhs_shape) - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    plain = lambda a, b: lax.conv_general_dilated(a, b, (1,) * nd, padding, dimension_numbers=dn)  # noqa: E731
    patches = lambda a, b: conv_forms.patches_conv(a, b, padding)  # noqa: E731
    ref = plain(lhs, rhs)
    np.testing.assert_allclose(patches(lhs, rhs), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for ours, want in zip(
        jax.grad(loss(patches), (0, 1))(lhs, rhs), jax.grad(loss(plain), (0, 1))(lhs, rhs), strict=True
    ):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_small_images_are_convolved_as_patches_on_cpu_only():
    """nn.Conv on images of at most 16 pixels (2D, or 3D of any depth): on CPU a matrix
    product and no convolution; CUDA keeps the convolution; an 8 x 8 image keeps it on CPU too."""
    import re

    import flax.linen as nn

    from segjax.models import blocks

    def counts(conv, x, platform):
        lowered = jax.jit(conv.apply).trace(conv.init(jax.random.PRNGKey(0), x), x)
        text = lowered.lower(lowering_platforms=(platform,)).as_text()
        return len(re.findall(r"stablehlo\.convolution", text)), len(re.findall(r"stablehlo\.dot_general", text))

    for x in (jnp.ones((2, 4, 4, 8)), jnp.ones((1, 2, 2, 2, 8))):
        conv = blocks.Conv(16, (3,) * (x.ndim - 2))
        assert counts(conv, x, "cpu") == (0, 1)
        assert counts(conv, x, "cuda")[0] == 1
        variables = conv.init(jax.random.PRNGKey(0), x)
        y = jax.random.normal(jax.random.PRNGKey(1), x.shape)
        want = nn.Conv(16, (3,) * (x.ndim - 2)).apply(variables, y)
        np.testing.assert_allclose(conv.apply(variables, y), want, rtol=1e-5, atol=1e-5)
    assert counts(blocks.Conv(16, (3, 3)), jnp.ones((2, 8, 8, 8)), "cpu")[0] == 1


@pytest.mark.parametrize("dims, channels", [(2, (4, 3)), (2, (2, 5, 3)), (3, (3, 2))])
def test_concat_conv_equals_nn_conv_over_the_concatenation(dims, channels):
    """`blocks.ConcatConv` (the decoder's first convolution): nn.Conv's parameters and initial
    values, and the same output and gradients (parameters and every part) as nn.Conv applied to
    the concatenated parts; on CPU the concatenation is not built."""
    import flax.linen as nn

    from segjax.models import blocks

    keys = jax.random.split(jax.random.PRNGKey(0), len(channels))
    parts = [jax.random.normal(k, (2, *(6, 5, 4)[:dims], c)) for k, c in zip(keys, channels, strict=True)]
    kernel = (3,) * dims
    ours, ref = blocks.ConcatConv(6, kernel, name="conv"), nn.Conv(6, kernel, name="conv")
    joined = lambda ps: jnp.concatenate(ps, axis=-1)  # noqa: E731
    variables = ref.init(jax.random.PRNGKey(1), joined(parts))
    mine = ours.init(jax.random.PRNGKey(1), parts)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(variables, parts), ref.apply(variables, joined(parts)), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.PRNGKey(2), ref.apply(variables, joined(parts)).shape)
    got = jax.grad(lambda v, ps: jnp.sum(ours.apply(v, ps) * weights), (0, 1))(variables, parts)
    want = jax.grad(lambda v, ps: jnp.sum(ref.apply(v, joined(ps)) * weights), (0, 1))(variables, parts)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    def concatenations(platform):
        lowered = jax.jit(ours.apply).trace(variables, parts).lower(lowering_platforms=(platform,))
        return lowered.as_text().count("stablehlo.concatenate")

    assert concatenations("cuda") == 1
    assert concatenations("cpu") == (len(parts) if dims == 3 else 0)  # 3D: each part's depth folding only
