"""A 3x3 convolution's forward pass, input gradient and weight gradient, timed per U-Net level shape.

Why: on XLA:CPU the weight gradient (a convolution whose batch is the input channels and whose
window is the whole image) is the slowest of the three at the full-resolution levels. This script
times each part, and the weight-gradient convolution alone (its operands already transposed into
the layout XLA gives it), so a run pinned to one core (`taskset -c 0`) next to one on every core
shows which parts use more than one thread.

  python benchmarks/conv_grads.py                  # every core of this machine
  taskset -c 0 python benchmarks/conv_grads.py     # one core
  python benchmarks/conv_grads.py --regrouped      # + two grouped forms of the weight gradient
  python benchmarks/conv_grads.py --kernel         # + segjax's CPU kernel (segjax.kernels.conv3x3)
  python benchmarks/conv_grads.py --forward        # XLA's forward pass vs segjax's forward kernel
  python benchmarks/conv_grads.py --small          # tiny images: XLA's convolution vs conv_forms.patches_conv
  python benchmarks/conv_grads.py --volume         # 3x3x3: depth-folded 2D convolution vs segjax's 3D kernels
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import segjax  # noqa: F401  (applies segjax's XLA:CPU options before JAX starts)
from segjax.kernels import conv3x3
from segjax.models import conv_forms

NHWC = ("NHWC", "HWIO", "NHWC")
SHAPES = ((8, 128, 32), (8, 64, 64), (8, 32, 128), (8, 16, 256), (4, 256, 16))  # batch, edge, channels
# --kernel: where its rule (conv3x3.applies) draws the line; 8 and 24 channels (8-wide tiles)
KERNEL_SHAPES = ((8, 32, 256), (2, 64, 256), (8, 8, 512), (64, 32, 8), (4, 256, 24), (8, 16, 16), (8, 16, 64))
FORWARD_SHAPES = (  # --forward: batch, edge, input channels, output channels
    (8, 128, 3, 32),
    (8, 128, 32, 32),
    (8, 64, 64, 64),
    (8, 64, 32, 64),
    (4, 256, 16, 16),
    (8, 128, 32, 16),
    (8, 32, 64, 64),
    (8, 32, 64, 128),
    (8, 32, 128, 128),
    (2, 64, 256, 256),
    (64, 32, 24, 8),  # 8 outputs (8-wide tiles): a 3D U-Net's level 0, 2 x 32^3 x 8, folded (24 = 3 x 8)
    (4, 256, 24, 24),  # 24 outputs (16 + 8): ISBI's level 0 with base_features=24
    (8, 16, 16, 16),  # 16 pixels wide (session 21's rule: up to 64 x 64 channels there)
    (8, 16, 64, 64),
)
VOLUME_SHAPES = (  # --volume: batch, edge (a cube), input channels, output channels (3D U-Net / V-Net levels)
    (2, 32, 1, 8),
    (2, 32, 8, 8),
    (2, 32, 16, 8),
    (2, 32, 16, 16),
    (2, 16, 16, 16),
    (2, 16, 32, 32),
)
SMALL_SHAPES = (  # --small: batch, edge, input channels, output channels (a U-Net's deepest levels)
    (4, 2, 768, 256),
    (2, 2, 1024, 1024),
    (8, 4, 384, 128),
    (4, 4, 512, 512),
    (16, 8, 192, 64),
    (8, 8, 512, 512),
)


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


def input_grad(x, w, g):
    return jax.vjp(lambda v: conv(v, w), x)[1](g)[0]


def weight_grad(x, w, g):
    return jax.vjp(lambda v: conv(x, v), w)[1](g)[0]


def weight_grad_conv_only(xt, gt):
    """The convolution XLA runs for `weight_grad`: batch = input channels, features = images."""
    return lax.conv_general_dilated(xt, gt, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def weight_grad_feature_groups(x, g):
    """The weight gradient with one group per image (feature_group_count = N): N x more output
    values for Eigen to spread over threads, summed over images afterwards."""
    n, h, w, ci = x.shape
    gt = jnp.transpose(g, (1, 2, 0, 3)).reshape(h, w, 1, n * g.shape[-1])
    out = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)), gt, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=n
    )
    return out.reshape(ci, 3, 3, n, -1).sum(3).transpose(1, 2, 0, 3)


def weight_grad_row_groups(x, g, parts: int = 2):
    """The weight gradient over `parts` bands of rows at once (batch_group_count = parts), summed."""
    h = x.shape[1] // parts
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xs = jnp.concatenate([jnp.transpose(xp[:, i * h : i * h + h + 2], (3, 1, 2, 0)) for i in range(parts)], 0)
    gs = jnp.concatenate([jnp.transpose(g[:, i * h : (i + 1) * h], (1, 2, 0, 3)) for i in range(parts)], -1)
    out = lax.conv_general_dilated(xs, gs, (1, 1), "VALID", dimension_numbers=NHWC, batch_group_count=parts)
    return out.reshape(x.shape[-1], 3, 3, parts, -1).sum(3).transpose(1, 2, 0, 3)


def median_ms(fn, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_table(repeats: int) -> None:
    """XLA's 3x3 convolution and segjax's forward kernel, one call each in turn (the machine's
    speed drifts over minutes), medians and GFLOP/s."""
    print("shape (N x H^2 x Ci -> Co)  XLA ms  kernel ms  XLA GFLOP/s  kernel GFLOP/s  speedup  (used)")
    for n, edge, ci, co in FORWARD_SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 2)
        x, w = jax.random.normal(keys[0], (n, edge, edge, ci)), jax.random.normal(keys[1], (3, 3, ci, co))
        forms = [jax.jit(conv), jax.jit(conv3x3.forward)]
        want = forms[0](x, w)
        assert jnp.allclose(forms[1](x, w), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
        xla_ms, kernel_ms = alternating_ms([(form, (x, w)) for form in forms], repeats)
        gflop = 2 * n * edge * edge * 9 * ci * co / 1e9
        used = "yes" if conv3x3.forward_applies(x.shape, w.shape) else "no"
        print(
            f"{n} x {edge}^2 x {ci} -> {co}".ljust(27)
            + f"{xla_ms:7.2f}  {kernel_ms:9.2f}  {gflop / xla_ms * 1e3:11.0f}  {gflop / kernel_ms * 1e3:14.0f}"
            + f"  {xla_ms / kernel_ms:6.2f}x  {used}",
            flush=True,
        )


def alternating_ms(calls, repeats: int) -> list[float]:
    """Median ms of each (jitted function, args), one call of each in turn per round."""
    times = [[] for _ in calls]
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for (fn, args), kept in zip(calls, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            kept.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def small_table(repeats: int) -> None:
    """XLA's 3x3 convolution of tiny images and `conv_forms.patches_conv`, forward and forward + both
    gradients, alternating."""

    def patches(x, w):
        return conv_forms.patches_conv(x, w, ((1, 1), (1, 1)))

    def with_grads(form):
        return jax.jit(jax.grad(lambda x, w, g: jnp.sum(form(x, w) * g), argnums=(0, 1)))

    print("shape (N x H^2 x Ci -> Co)  forward: XLA  patches  | + gradients: XLA  patches  (used)")
    for n, edge, ci, co in SMALL_SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x, w = jax.random.normal(keys[0], (n, edge, edge, ci)), jax.random.normal(keys[1], (3, 3, ci, co))
        g = jax.random.normal(keys[2], (n, edge, edge, co))
        want = jax.jit(conv)(x, w)
        assert jnp.allclose(jax.jit(patches)(x, w), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
        ms = alternating_ms(
            [
                (jax.jit(conv), (x, w)),
                (jax.jit(patches), (x, w)),
                (with_grads(conv), (x, w, g)),
                (with_grads(patches), (x, w, g)),
            ],
            repeats,
        )
        used = "yes" if edge * edge <= conv_forms.SMALL_IMAGE_PIXELS else "no"
        print(f"{n} x {edge}^2 x {ci} -> {co}".ljust(27) + "".join(f"{v:9.2f}" for v in ms) + f"  {used}", flush=True)


def volume_table(repeats: int) -> None:
    """3x3x3 convolutions, forward and forward + both gradients: the depth-folded 2D form (segjax's
    CPU form before session 21, with the 2D kernels where they apply) and `conv3x3.conv` on the
    volume, alternating."""

    def folded(x, w):
        return conv_forms.depth_folded_conv(x, w, (1, 1, 1), "SAME")

    def with_grads(form):
        return jax.jit(jax.grad(lambda x, w, g: jnp.sum(form(x, w) * g), argnums=(0, 1)))

    print("shape (N x D^3 x Ci -> Co)  forward: folded  kernel | + gradients: folded  kernel  speedup  (used)")
    for n, edge, ci, co in VOLUME_SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (n, edge, edge, edge, ci))
        w = jax.random.normal(keys[1], (3, 3, 3, ci, co))
        g = jax.random.normal(keys[2], (n, edge, edge, edge, co))
        want = jax.jit(folded)(x, w)
        assert jnp.allclose(jax.jit(conv3x3.conv)(x, w), want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
        ms = alternating_ms(
            [
                (jax.jit(folded), (x, w)),
                (jax.jit(conv3x3.conv), (x, w)),
                (with_grads(folded), (x, w, g)),
                (with_grads(conv3x3.conv), (x, w, g)),
            ],
            repeats,
        )
        used = "yes" if conv3x3.applies(x, w, (1, 1, 1), "SAME", conv3x3.DIMENSION_NUMBERS_3D) else "no"
        print(
            f"{n} x {edge}^3 x {ci} -> {co}".ljust(27)
            + "".join(f"{v:9.2f}" for v in ms)
            + f"  {ms[2] / ms[3]:6.2f}x  {used}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--regrouped", action="store_true", help="also time the two grouped weight gradients")
    parser.add_argument("--kernel", action="store_true", help="also time segjax's weight-gradient kernel")
    parser.add_argument("--forward", action="store_true", help="only: XLA's forward pass vs the forward kernel")
    parser.add_argument("--small", action="store_true", help="only: tiny images, XLA's convolution vs patches")
    parser.add_argument("--volume", action="store_true", help="only: 3x3x3, depth-folded form vs the 3D kernels")
    args = parser.parse_args()
    if (args.kernel or args.forward or args.volume) and not conv3x3.available():
        parser.error("segjax's kernel is not available here (no C++ compiler, or SEGJAX_CPU_KERNELS=0)")
    print(f"{len(os.sched_getaffinity(0))} usable cores, jax {jax.__version__}, median of {args.repeats}, ms")
    if args.forward:
        return forward_table(args.repeats)
    if args.small:
        return small_table(args.repeats)
    if args.volume:
        return volume_table(args.repeats)
    extra = "  feature groups  row groups" if args.regrouped else ""
    extra += "  segjax kernel  (used)" if args.kernel else ""
    print("shape (N x H^2 x C -> C)  forward  input grad  weight grad  dW conv alone" + extra)
    for n, edge, c in SHAPES + (KERNEL_SHAPES if args.kernel else ()):
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (n, edge, edge, c))
        w = jax.random.normal(keys[1], (3, 3, c, c))
        g = jax.random.normal(keys[2], (n, edge, edge, c))
        xt, gt = jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))
        alone = jnp.transpose(jax.jit(weight_grad_conv_only)(xt, gt), (1, 2, 0, 3))
        full = jax.jit(weight_grad)(x, w, g)  # the same numbers, or the timing compares different work
        assert jnp.allclose(alone, full, rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max())), "dW mismatch"
        row = [
            median_ms(conv, x, w, repeats=args.repeats),
            median_ms(input_grad, x, w, g, repeats=args.repeats),
            median_ms(weight_grad, x, w, g, repeats=args.repeats),
            median_ms(weight_grad_conv_only, xt, gt, repeats=args.repeats),
        ]
        for form in (weight_grad_feature_groups, weight_grad_row_groups) if args.regrouped else ():
            assert jnp.allclose(jax.jit(form)(x, g), full, rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max()))
            row.append(median_ms(form, x, g, repeats=args.repeats))
        used = ""
        if args.kernel:
            assert jnp.allclose(
                jax.jit(conv3x3.weight_grad)(x, g), full, rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max())
            )
            row.append(median_ms(conv3x3.weight_grad, x, g, repeats=args.repeats))
            used = "  yes" if conv3x3.applies(x, w, (1, 1), "SAME", NHWC) else "  no"
        print(f"{n} x {edge}^2 x {c:<4}             " + "  ".join(f"{v:9.1f}" for v in row) + used, flush=True)


if __name__ == "__main__":
    main()
