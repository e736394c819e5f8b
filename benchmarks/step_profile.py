"""Where segjax's U-Net training step spends its time: layer variants timed and one step profiled.

Everything runs in one process on the same random batch, segjax only (the PyTorch comparison is
`train_bench.py`). Each variant is compiled, warmed up and timed (median of `--steps` steps)
before the next one starts, and its line is printed at once, so a time limit loses only the
variants after it. Variants (`--variants`, comma-separated):

  default    segjax's layers: 2x max-pool as reshape + max, the 2x2 stride-2 up-convolution as one
             matmul + depth-to-space, on CUDA unaligned channel counts zero-padded to 8
             (`segjax.models.blocks`)
  textbook   the layers those replace: `nn.max_pool` and `nn.ConvTranspose` (same parameters,
             same function) -- the rewrites are defaults only where they are not slower
  plain_conv every convolution as plain `lax.conv_general_dilated` (no channel padding on CUDA:
             segjax before `conv_forms.aligned_conv`)
  stem_im2col convolutions with unaligned channels as 9 shifted slices + one matmul (2D, stride 1)
             (plain_conv and stem_im2col change only the CUDA program: on CPU they equal default)
  no_norm    norm='none' (convolutions with bias): not the same network; what batch norm costs
  materialized every convolution's input passed through a `lax.cond` (both branches the identity),
             which XLA cannot fuse through: XLA:CPU then transposes the stored activation for the
             weight gradient instead of recomputing norm + ReLU inside a strided transpose loop
             (the same function; an experiment for issue 8, not a default)
  bn_dot, bn_vjp, bn_rows
             batch norm's per-channel sums as matrix products / also in a hand-written backward /
             as a two-stage reduction (`norm_forms.py`; the same function, an experiment for issue 8)
  former_pool, former_head, former_bn, former_concat, former_all
             session 19's CPU forms undone (one, or all): max-pool as reshape + max, 1x1 heads as
             convolutions, flax's batch norm + ReLU (JAX's derivative), decoder concatenation
  xla_forward
             the 3x3 convolutions' forward passes and input gradients XLA's again (session 20's
             CPU forward kernel, `segjax.kernels.conv3x3.forward_applies`, switched off)
  batch=N    the default layers at batch N
  xla:K=V    the default layers compiled with the XLA option K=V (e.g. xla:xla_gpu_enable_triton_gemm=false)

`--alternate N` compiles every variant first, then times N rounds of one step per variant in turn
(the medians then compare variants under the same machine drift; the sequential default cannot
resolve 1-2 %).

`--trace DIR` records `--trace_steps` steps of the default variant with `jax.profiler` and prints
the device time per step by thread and its largest kernels (the Perfetto JSON stays in DIR).
MFU = 3 x forward FLOPs (convolutions + matmuls, `segjax.flops`) x steps/s / measured
bf16 peak.

  python benchmarks/step_profile.py --size 512 --batch 16 --dtype bfloat16 --peak --trace /tmp/out/trace
  python benchmarks/step_profile.py --size 64 --batch 2 --base 8 --depth 2 --variants default,textbook   # CPU smoke run
  python benchmarks/step_profile.py --dims 3 --size 32 --batch 2 --depth 3 --base 8 --variants default --trace /tmp/t3
      # the 3D U-Net (--arch vnet: V-Net; --arch unetpp: U-Net++ with deep supervision)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import json
import re
import shutil
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import norm_forms
import numpy as np
from jax import lax
from train_bench import measure_peak, parse_option, segjax_step

from segjax.configuration import default_config
from segjax.flops import count_flops
from segjax.kernels import conv3x3
from segjax.models import batchnorm, blocks, conv_forms


class TextbookUpConv(nn.Module):
    """`nn.ConvTranspose` 2x2 stride 2: the layer `blocks.TransposeConv2x` computes as a matmul."""

    features: int
    spatial_dims: int = 2
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        window = (2,) * self.spatial_dims
        return nn.ConvTranspose(self.features, window, strides=window, dtype=self.dtype)(x)


@contextlib.contextmanager
def textbook_layers():
    """Build models with `nn.max_pool` / `nn.ConvTranspose` in place of segjax's rewrites."""
    saved = blocks.max_pool2x, blocks.TransposeConv2x
    blocks.max_pool2x = lambda x, d: nn.max_pool(x, (2,) * d, strides=(2,) * d)
    blocks.TransposeConv2x = TextbookUpConv
    try:
        yield
    finally:
        blocks.max_pool2x, blocks.TransposeConv2x = saved


def plain_conv(lhs, rhs, window_strides, padding, multiple=None, **kwargs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def im2col_conv(lhs, rhs, window_strides, padding, multiple=8, **kwargs):
    """A stride-1 channels-last 2D convolution as shifted slices concatenated on channels (padded
    to `multiple`) times the reshaped kernel; anything else as `conv_forms.channel_padded_conv`."""
    if lhs.ndim != 4 or set(window_strides) != {1} or any(kwargs.get(k) for k in ("lhs_dilation", "rhs_dilation")):
        return channel_padded(lhs, rhs, window_strides, padding, multiple=multiple, **kwargs)
    (kh, kw), (h, w) = rhs.shape[:2], lhs.shape[1:3]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((h, w), (kh, kw), (1, 1), padding)
    x = jnp.pad(lhs, [(0, 0), *padding, (0, 0)])
    cols = [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    extra = -len(cols) * lhs.shape[-1] % multiple
    cols = jnp.concatenate(cols + [jnp.zeros((*lhs.shape[:3], extra), lhs.dtype)] * bool(extra), axis=-1)
    kernel = jnp.pad(rhs.reshape(-1, rhs.shape[-1]), [(0, extra), (0, 0)])
    return jnp.dot(cols, kernel, preferred_element_type=kwargs.get("preferred_element_type"))


channel_padded = conv_forms.channel_padded_conv


def opaque(x):
    """`x`, through a conditional XLA cannot fuse its producers into (a runtime predicate)."""
    flat = x.reshape(-1)
    return lax.cond(flat[0] == flat[0], lambda y: y, lambda y: y, x)


@contextlib.contextmanager
def materialized_inputs():
    """Build models whose convolutions read their input through `opaque`."""
    saved = blocks.Conv
    blocks.Conv = functools.partial(
        nn.Conv, conv_general_dilated=lambda lhs, *a, **k: conv_forms.aligned_conv(opaque(lhs), *a, **k)
    )
    try:
        yield
    finally:
        blocks.Conv = saved


@contextlib.contextmanager
def cuda_conv(replacement):
    """Build models whose CUDA branch of `conv_forms.aligned_conv` is `replacement`."""
    conv_forms.channel_padded_conv = replacement
    try:
        yield
    finally:
        conv_forms.channel_padded_conv = channel_padded


BN_FORMS = {f"bn_{form}": form for form in norm_forms.FORMS}


def reduce_max_pool(x, d):
    """Session 18's max-pool: reshape + `max` (its gradient splits ties, via compare, count, divide)."""
    blocks_ = [n for size in x.shape[1 : 1 + d] for n in (size // 2, 2)]
    return x.reshape(x.shape[0], *blocks_, x.shape[-1]).max(axis=tuple(range(2, 2 * d + 1, 2)))


def convolution_only(lhs, rhs, window_strides, padding, **kwargs):
    """`conv_forms.aligned_conv` without its 1x1 matrix-product form (session 18's heads)."""
    if all(k == 1 for k in rhs.shape[:-2]):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return conv_forms.aligned_conv(lhs, rhs, window_strides, padding, **kwargs)


class FlaxBatchNorm(batchnorm.BatchNorm):
    """flax's `nn.BatchNorm` then `nn.relu` (session 18's layers; JAX's derivative everywhere),
    with segjax's layer's attributes (single-program statistics only; timing, not checkpoints)."""

    @nn.compact
    def __call__(self, x):
        y = nn.BatchNorm(self.use_running_average, momentum=self.momentum, dtype=self.dtype, name="BatchNorm_0")(x)
        return nn.relu(y) if self.relu else y


class JoinedConv(nn.Module):
    """`blocks.ConcatConv` as session 18 computed it: concatenate, then one convolution."""

    features: int
    kernel_size: tuple
    use_bias: bool = True
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, parts):
        conv = blocks.Conv(self.features, self.kernel_size, use_bias=self.use_bias, dtype=self.dtype)
        return conv(jnp.concatenate(parts, axis=-1))


FORMER = {  # session 19's CPU rewrites, each undone alone: `--variants default,former_bn,...`
    "former_pool": {"max_pool2x": reduce_max_pool},
    "former_head": {"Conv": functools.partial(nn.Conv, conv_general_dilated=convolution_only)},
    "former_bn": {"BatchNorm": FlaxBatchNorm},
    "former_concat": {"ConcatConv": JoinedConv},
}
FORMER["former_all"] = {k: v for patch in FORMER.values() for k, v in patch.items()}


@contextlib.contextmanager
def xla_forward():
    """Build models whose 3x3 convolutions keep XLA's forward pass and input gradient."""
    saved = conv3x3.FORWARD_MIN_WIDTH
    conv3x3.FORWARD_MIN_WIDTH = 1 << 30
    try:
        yield
    finally:
        conv3x3.FORWARD_MIN_WIDTH = saved


@contextlib.contextmanager
def former(patch: dict):
    """Build models with `blocks` attributes replaced by `patch`."""
    saved = {name: getattr(blocks, name) for name in patch}
    for name, value in patch.items():
        setattr(blocks, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(blocks, name, value)


LAYER_VARIANTS = ("default", "textbook", "plain_conv", "stem_im2col", "materialized", "xla_forward")


def build(args, variant: str):
    """(jitted train step, state, batch, forward FLOPs per batch) for one variant."""
    cfg = default_config()
    cfg.model.depth, cfg.model.base_features, cfg.model.dtype = args.depth, args.base, args.dtype
    cfg.model.arch, cfg.model.spatial_dims = args.arch, args.dims
    if args.arch == "unetpp":
        cfg.model.deep_supervision = True
    if args.arch == "vnet":
        cfg.model.kernel_size = args.kernel
    batch_size, options = args.batch, None
    if variant == "no_norm":
        cfg.model.norm = "none"
    elif variant.startswith("batch="):
        batch_size = int(variant.split("=", 1)[1])
    elif variant.startswith("xla:"):
        options = dict(parse_option(o) for o in variant[4:].split(";"))
    elif variant not in (*LAYER_VARIANTS, *BN_FORMS, *FORMER):
        raise SystemExit(f"unknown variant {variant!r}")
    rng = np.random.default_rng(0)
    spatial = (args.size,) * args.dims
    image = rng.random((batch_size, *spatial, 3 if args.dims == 2 else 1), dtype=np.float32)
    label = rng.integers(0, args.classes, (batch_size, *spatial)).astype(np.int32)
    patches = {
        "textbook": textbook_layers,
        "plain_conv": functools.partial(cuda_conv, plain_conv),
        "stem_im2col": functools.partial(cuda_conv, im2col_conv),
        "materialized": materialized_inputs,
        "xla_forward": xla_forward,
        **{name: functools.partial(norm_forms.use, form) for name, form in BN_FORMS.items()},
        **{name: functools.partial(former, patch) for name, patch in FORMER.items()},
    }
    with patches.get(variant, contextlib.nullcontext)():
        train, forward, st, batch = segjax_step(cfg, args.classes, image, label)
        train = train.lower(st, batch).compile(compiler_options=options)
        return train, st, batch, count_flops(forward, st, batch["image"])


def time_steps(train, st, batch, n: int):
    """Median seconds per step over n steps (after 3 warm-up steps), and the final state."""
    times = []
    for i in range(n + 3):
        t = time.perf_counter()
        st, out = train(st, batch)
        jax.block_until_ready(out)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times), st


CATEGORIES = (  # kernel-name patterns, first match wins (cuDNN/CUTLASS, cuBLAS, XLA's own fusions)
    ("conv weight-gradient", r"wgrad"),
    ("conv input-gradient", r"dgrad"),
    ("convolution", r"conv|fprop|implicit_gemm|cudnn"),
    ("matmul", r"gemm|cublas|triton|matmul|dot"),
    ("reduction fusion", r"reduc"),
    ("transpose / copy", r"transpose|copy|concat"),
    ("other fusion", r"fusion|loop|input"),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def kernel_summary(trace_dir: str, steps_traced: int, top: int = 15) -> list[str]:
    """Device time per step from a `jax.profiler` Perfetto trace: per (device, thread) the total,
    the categories and the largest event names. Falls back to every thread when the trace has
    no device process (CPU)."""
    paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        return [f"no perfetto_trace.json.gz under {trace_dir}"]
    data = json.load(gzip.open(sorted(paths)[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["pid"], e["tid"]] = e["args"]["name"]
    devices = {p for p, name in procs.items() if name.startswith("/device:")} or set(procs)
    per_thread = collections.defaultdict(collections.Counter)
    per_op = collections.Counter()  # GPU kernels name their HLO instruction in args (when they do)
    arg_keys = set()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices:
            key = f"{procs[e['pid']]} | {threads.get((e['pid'], e['tid']), e['tid'])}"
            ms = e.get("dur", 0.0) / 1000 / steps_traced  # ms per step
            per_thread[key][e["name"]] += ms
            args = e.get("args", {})
            arg_keys.update(args)
            if "hlo_op" in args:
                per_op[args["hlo_op"]] += ms
    lines = []
    for key, counter in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        if total < 0.01:
            continue
        lines.append(f"[{key}] {total:.2f} ms/step in {sum(1 for _ in counter)} distinct events")
        by_cat = collections.Counter()
        for name, ms in counter.items():
            by_cat[category(name)] += ms
        lines.append("  by kind: " + ", ".join(f"{c} {ms:.2f} ({ms / total:.0%})" for c, ms in by_cat.most_common()))
        for name, ms in counter.most_common(top):
            lines.append(f"  {ms:8.3f} ms {ms / total:5.1%}  {name[:110]}")
    lines.append(f"event argument keys: {sorted(arg_keys)[:20]}")
    for op, ms in per_op.most_common(2 * top):
        lines.append(f"  {ms:8.3f} ms  hlo_op {op[:110]}")
    return lines


def alternate(args, variants: list[str]) -> None:
    """Every variant compiled and warmed up first, then `args.alternate` rounds of one step each,
    in turn: the machine's drift (several per cent over minutes on a shared VM) hits all alike,
    so differences of 1-2 % show. Prints each variant's median and its ratio to the first."""
    runs = {}
    for variant in variants:
        train, st, batch, _ = build(args, variant)
        runs[variant] = [train, time_steps(train, st, batch, 1)[1], batch, []]
    for _ in range(args.alternate):
        for run in runs.values():
            train, st, batch, times = run
            t = time.perf_counter()
            run[1], out = train(st, batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
    first = statistics.median(runs[variants[0]][3])
    for variant, (*_, times) in runs.items():
        ms = statistics.median(times) * 1000
        print(f"{variant:<44}{'':>10}{ms:>10.2f}{'':>17}{first * 1000 / ms:>10.2f}x  (alternating, {len(times)} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["unet", "unetpp", "vnet"], default="unet")
    parser.add_argument("--dims", type=int, default=2, help="3: 1-channel volumes of size^3 (as train_bench.py)")
    parser.add_argument("--kernel", type=int, default=3, help="V-Net kernel edge")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="default,textbook,no_norm")
    parser.add_argument("--peak", action="store_true", help="measure the bf16 matmul peak; print MFU")
    parser.add_argument("--trace", default="", help="profile the default variant into this folder")
    parser.add_argument("--trace_steps", type=int, default=5)
    parser.add_argument("--json", default="", help="append one JSON line per variant to this file")
    parser.add_argument("--alternate", type=int, default=0, help="N rounds of one step per variant, in turn")
    args = parser.parse_args()

    peak = measure_peak() if args.peak else float("nan")
    where = jax.devices()[0].device_kind
    shape = f"{args.arch} {args.size}^{args.dims}"
    print(f"{where}; jax {jax.__version__}; dtype {args.dtype}; {shape}; peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'variant':<44}{'compile s':>10}{'ms/step':>10}{'images/s':>10}{'MFU':>7}{'vs default':>11}")
    if args.alternate:
        return alternate(args, args.variants.split(","))
    reference = None
    for variant in args.variants.split(","):
        t = time.perf_counter()
        try:
            train, st, batch, flops = build(args, variant)
        except Exception as err:  # an XLA option this jaxlib does not know: report, go on
            print(f"{variant:<44} failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        compile_s = time.perf_counter() - t
        sec, st = time_steps(train, st, batch, args.steps)
        n = batch["image"].shape[0]
        per_image = sec / n
        reference = reference or per_image
        mfu = 3 * flops / sec / peak
        print(
            f"{variant:<44}{compile_s:>10.1f}{sec * 1000:>10.2f}{n / sec:>10.1f}{mfu:>7.1%}"
            f"{reference / per_image:>10.2f}x",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                row = {"variant": variant, "ms": sec * 1000, "images_s": n / sec, "mfu": mfu, "compile_s": compile_s}
                f.write(json.dumps({"args": vars(args), "device": where, "peak": peak, **row}) + "\n")
        if variant == "default" and args.trace:
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                for _ in range(args.trace_steps):
                    st, out = train(st, batch)
                jax.block_until_ready(out)
            print("\n".join(kernel_summary(args.trace, args.trace_steps)), flush=True)
            for path in glob.glob(f"{args.trace}/**/perfetto_trace.json.gz", recursive=True):
                shutil.copy(path, f"{args.trace}/perfetto_trace.json.gz")  # where a shallow copy-back finds it
        del train, st, batch


if __name__ == "__main__":
    main()
