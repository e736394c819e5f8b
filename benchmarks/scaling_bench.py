"""Data-parallel overhead on 1/2/4/8 fake CPU devices (jit and pmap modes), and K seeds in one vmapped step vs K runs.

Fake devices (`--xla_force_host_platform_device_count`) share the same CPU cores, so this checks
correctness and overhead, not real speed-up. The K-seed part times one compiled step of K
vmapped replicas against K separate single-replica steps (what K sequential runs would do), for a
small U-Net where per-step overhead dominates. Each device count runs in its own subprocess.

  python benchmarks/scaling_bench.py [--seeds 8 --steps 30]
  python benchmarks/scaling_bench.py --seeds_only    # on a GPU: the K-seed part alone
  python benchmarks/scaling_bench.py --seeds_only --sweep --batch 1 --size 16   # overhead vs compute

Last line: `vmap K=<K> throughput vs <K> sequential runs: <N>x`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(batch: int, size: int, norm_axis_name: str | None = None):
    import jax.numpy as jnp
    import numpy as np

    from segjax import optim, state, steps
    from segjax.configuration import default_config
    from segjax.models import build_model

    cfg = default_config()
    cfg.model.depth, cfg.model.base_features = 2, 8
    model = build_model(cfg.model, 4, norm_axis_name=norm_axis_name)
    rng = np.random.default_rng(0)
    batch_arrays = {
        "image": rng.random((batch, size, size, 3), dtype=np.float32),
        "label": rng.integers(0, 4, (batch, size, size)).astype(np.int32),
        "valid": np.ones((batch, size, size), np.float32),
    }
    tx = optim.build(cfg.optim, 1000)
    step = functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss, axis_name=norm_axis_name)
    return model, tx, step, batch_arrays, jnp.asarray(batch_arrays["image"][:1]), state


def time_steps(fn, st, batch, steps_count):
    import jax

    st, out = fn(st, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps_count):
        t = time.perf_counter()
        st, out = fn(st, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child(devices: int, steps_count: int, batch: int, size: int) -> None:
    import jax

    from segjax import parallel

    model, tx, step, arrays, sample, state = build(batch, size)
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    st = jax.device_put(state.create(model, tx, sample, 0), repl)
    fn = jax.jit(step, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=(repl, repl), donate_argnums=0)
    seconds = time_steps(fn, st, parallel.to_global(arrays, mesh), steps_count)
    # parallel.mode='pmap': the same step with pmean gradients and cross-replica batch norm
    model, tx, step, arrays, sample, state = build(batch, size, parallel.PMAP_AXIS)
    pst = parallel.replicate(state.create(model, tx, sample, 0))
    pfn = jax.pmap(step, axis_name=parallel.PMAP_AXIS, donate_argnums=0)
    pmap_seconds = time_steps(pfn, pst, parallel.split_for_devices(arrays), steps_count)
    print(json.dumps({"devices": jax.device_count(), "step_s": seconds, "pmap_step_s": pmap_seconds}))


def seeds_part(k: int, steps_count: int, batch: int, size: int) -> tuple[float, float]:
    import jax

    from segjax import seeds

    model, tx, step, arrays, sample, state = build(batch, size)
    single = time_steps(jax.jit(step, donate_argnums=0), state.create(model, tx, sample, 0), arrays, steps_count)
    stacked = seeds.create_states(model, tx, sample, list(range(k)))
    k_batch = {key: jax.numpy.stack([v] * k) for key, v in arrays.items()}
    vmapped = time_steps(jax.jit(jax.vmap(step), donate_argnums=0), stacked, k_batch, steps_count)
    return single, vmapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seeds_only", action="store_true", help="skip the fake-CPU-device part")
    parser.add_argument("--sweep", action="store_true", help="K seeds at several batch sizes first")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.size)
        return
    if not args.seeds_only:
        devices_part(args)
    import jax

    k = args.seeds
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; K = {k} seeds")
    if args.sweep:  # where per-step overhead dominates (tiny batches) vs where compute does
        print(f"{'batch x size':>14}{'one seed ms/step':>18}{'K vmapped ms/step':>19}{'vmap vs K runs':>16}")
        for batch, size in ((1, 16), (2, 16), (4, 32), (16, 32)):
            single, vmapped = seeds_part(k, args.steps, batch, size)
            ratio = k * single / vmapped
            print(f"{f'{batch} x {size}^2':>14}{single * 1000:>18.2f}{vmapped * 1000:>19.2f}{ratio:>15.2f}x")
    single, vmapped = seeds_part(k, args.steps, args.batch, args.size)
    print(f"one seed: {single * 1000:.2f} ms/step ({args.batch / single:.0f} images/s)")
    print(
        f"{k} seeds vmapped: {vmapped * 1000:.2f} ms/step ({k * args.batch / vmapped:.0f} images/s total, "
        f"{args.batch / vmapped:.0f} per seed)"
    )
    print(f"vmap K={k} throughput vs {k} sequential runs: {k * single / vmapped:.2f}x")


def devices_part(args) -> None:
    print(f"small U-Net (depth 2, base 8), global batch {args.batch} x {args.size}^2, median of {args.steps} steps")
    print(f"{'devices':>8}{'jit ms/step':>13}{'steps/s':>10}{'images/s/device':>18}{'pmap ms/step':>14}")
    for n in (1, 2, 4, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [
            sys.executable,
            __file__,
            f"--child={n}",
            f"--steps={args.steps}",
            f"--batch={args.batch}",
            f"--size={args.size}",
        ]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        s = row["step_s"]
        print(f"{n:>8}{s * 1000:>13.1f}{1 / s:>10.1f}{args.batch / s / n:>18.1f}{row['pmap_step_s'] * 1000:>14.1f}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
