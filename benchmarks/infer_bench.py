"""Inference throughput: segjax's U-Net vs the same network in PyTorch, one process, alternating.

1. Forward pass (eval mode, no gradients) on a batch of images: images/s for segjax (jax.jit),
   PyTorch eager, eager + channels_last (and torch.compile with --compile).
2. Sliding-window inference on 512^2 images (windows of 256^2, overlap 0.5, Gaussian blending):
   segjax (`segjax.inference.predict`, all windows in one jitted forward) vs MONAI's
   `sliding_window_inference` (mode='gaussian', all windows in one batch) on the PyTorch twin.

The PyTorch network is the one in train_bench.py (same layers, parameter count checked).

  pip install -r requirements-bench.txt
  python benchmarks/infer_bench.py [--size 128 --batch 8 --depth 4 --base 32 --repeats 20 --compile]

Last line: `forward speedup vs torch eager: <N>x, vs channels_last: <M>x; sliding window vs MONAI: <K>x`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import inference, state
from segjax.configuration import default_config
from segjax.models import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_bench import torch_unet


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--window_images", type=int, default=2, help="512^2 images per sliding-window call")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    import torch
    from monai.inferers import sliding_window_inference

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    image = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    big = rng.random((args.window_images, 512, 512, 3), dtype=np.float32)

    cfg = default_config()
    cfg.model.depth, cfg.model.base_features = args.depth, args.base
    model = build_model(cfg.model, args.classes)
    variables = model.init(jax.random.key(0), jnp.asarray(image[:1]), train=False)
    net = torch_unet(torch, 2, args.depth, args.base, 3, args.classes).eval()
    n_jax, n_torch = state.param_count(variables["params"]), sum(p.numel() for p in net.parameters())
    print(f"params: segjax {n_jax:,}  torch {n_torch:,}")
    assert n_jax == n_torch, "the two networks differ"

    def logits_fn(x):
        return model.apply(variables, x, train=False)[0]

    forward = jax.jit(logits_fn)
    window_cfg = ml_collections.ConfigDict(
        {"window": 256, "window_overlap": 0.5, "window_blend": "gaussian", "tta": "none"}
    )
    windowed = jax.jit(lambda x: inference.predict(logits_fn, x, window_cfg))
    x_jax, big_jax = jnp.asarray(image), jnp.asarray(big)
    t = time.perf_counter()
    jax.block_until_ready(forward(x_jax))
    compile_fwd = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(windowed(big_jax))
    compile_win = time.perf_counter() - t

    x_t = torch.from_numpy(np.moveaxis(image, -1, 1).copy())
    big_t = torch.from_numpy(np.moveaxis(big, -1, 1).copy())
    net_cl = torch_unet(torch, 2, args.depth, args.base, 3, args.classes).eval().to(memory_format=torch.channels_last)
    x_cl = x_t.contiguous(memory_format=torch.channels_last)
    windows_per_image = len(inference.window_starts(512, 256, 0.5)) ** 2

    def torch_forward(module, x):
        def run():
            with torch.no_grad():
                module(x)

        return run

    def monai_window():
        with torch.no_grad():
            sliding_window_inference(
                big_t, (256, 256), windows_per_image * args.window_images, net, overlap=0.5, mode="gaussian"
            )

    forward_runs = {
        "segjax (jax.jit)": lambda: jax.block_until_ready(forward(x_jax)),
        "torch eager": torch_forward(net, x_t),
        "torch eager channels_last": torch_forward(net_cl, x_cl),
    }
    if args.compile:
        compiled = torch.compile(torch_unet(torch, 2, args.depth, args.base, 3, args.classes).eval())
        forward_runs["torch.compile"] = torch_forward(compiled, x_t)
    window_runs = {
        "segjax sliding window (jit)": lambda: jax.block_until_ready(windowed(big_jax)),
        "MONAI sliding_window_inference": monai_window,
    }
    for name, fn in {**forward_runs, **window_runs}.items():  # warm-up (torch.compile compiles here)
        t = time.perf_counter()
        fn()
        print(f"{name}: first call {time.perf_counter() - t:.1f} s")
    print(
        f"segjax compile: forward {compile_fwd:.1f} s, sliding window {compile_win:.1f} s; XLA threads: all "
        f"{threads} cores; torch threads: {torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}"
    )

    times = {k: [] for k in {**forward_runs, **window_runs}}
    for _ in range(args.repeats):  # alternate, so machine noise hits every runner alike
        for name, fn in {**forward_runs, **window_runs}.items():
            times[name].extend(timed(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nforward, batch {args.batch}x{args.size}^2x3 ({args.repeats} repeats, median)")
    print(f"{'':<32}{'ms':>8}{'images/s':>10}{'segjax speed-up':>17}")
    ours = med["segjax (jax.jit)"]
    for name in forward_runs:
        print(f"{name:<32}{med[name] * 1000:>8.0f}{args.batch / med[name]:>10.1f}{med[name] / ours:>16.2f}x")
    print(f"\nsliding window, {args.window_images} images of 512^2x3, {windows_per_image} windows of 256^2 each")
    ours_w = med["segjax sliding window (jit)"]
    for name in window_runs:
        print(f"{name:<32}{med[name] * 1000:>8.0f}{args.window_images / med[name]:>10.2f}{med[name] / ours_w:>16.2f}x")
    fmt = lambda k: f"{med[k] / ours:.2f}x" if k in med else "n/a"  # noqa: E731
    print(
        f"forward speedup vs torch eager: {fmt('torch eager')}, vs channels_last: {fmt('torch eager channels_last')}, "
        f"vs torch.compile: {fmt('torch.compile')}; "
        f"sliding window vs MONAI: {med['MONAI sliding_window_inference'] / ours_w:.2f}x"
    )


if __name__ == "__main__":
    main()
