"""Checkpoint saves of a replicated training state on several devices of one process.

orbax saves a replicated array "replica-parallel" by default (unless JAX_PLATFORMS names a GPU):
every replica writes a slice of it, which lets the hosts of a multi-host job share the writing. In
a single process every byte is written by that process anyway, and the slicing costs one compiled
slice per array shape and device. Two forms, each in its own fresh process (no compilation
cache), alternating, median of `--repeats`:

  orbax_default  orbax's ArrayHandler as it comes (segjax before session 27)
  segjax         `checkpointing.Checkpointer`: whole arrays from one replica in a one-process job

Each child times its first save (compiles included) and the median of the next `--saves`, then
restores the last checkpoint and checks it equals the saved state leaf for leaf.

  python benchmarks/checkpoint_bench.py [--config default --devices 8 --repeats 3 --saves 5]

The last line reads `speedup (orbax_default / segjax): first <N>x, later <N>x`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("orbax_default", "segjax")


def child(mode: str, config_name: str, saves: int) -> None:
    """Save the replicated initial state of `config_name` 1 + `saves` times; print the seconds."""
    import tempfile
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import checkpointing, configuration, parallel, state, train
    from segjax.models import build_model

    if mode == "orbax_default":
        checkpointing._save_whole_arrays_in_one_process = lambda: None
    config = configuration.from_file(os.path.join(ROOT, "configs", f"{config_name}.py"))
    model = build_model(config.model, config.data.num_classes)
    sample = jnp.zeros((1, *(32,) * config.model.spatial_dims, config.data.channels))
    st = state.create(model, train.make_tx(config, model), sample, 0)
    st = jax.device_put(st, parallel.replicated(parallel.make_mesh()))
    times = []
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpointing.Checkpointer(workdir, keep=1)
        for step in range(1 + saves):
            start = time.perf_counter()
            ckpt.save(step, st, {})
            ckpt.wait()
            times.append(time.perf_counter() - start)
        back, _ = ckpt.restore(st)
        ckpt.close()
    leaves = zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back), strict=True)
    if not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves):
        raise SystemExit("restored state differs from the saved one")
    print(f"{times[0]:.3f} {statistics.median(times[1:]):.3f} {len(jax.devices())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices of the one process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CONFIG", "SAVES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    import jax
    import orbax.checkpoint

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; jax {jax.__version__}, "
        f"orbax-checkpoint {orbax.checkpoint.__version__}; {args.config}, {args.devices} CPU devices"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(
        JAX_ENABLE_COMPILATION_CACHE="false",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
    )
    first, later = {m: [] for m in MODES}, {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m in MODES:
            cmd = [sys.executable, __file__, "--child", m, args.config, str(args.saves)]
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            f, lat, devices = done.stdout.split()[-3:]
            assert int(devices) == args.devices, done.stdout
            first[m].append(float(f))
            later[m].append(float(lat))
    print(f"seconds per save, fresh process, median of {args.repeats} (later: median of {args.saves} saves):")
    print(f"{'form':<15}{'first save':>12}{'later saves':>13}")
    for m in MODES:
        print(f"{m:<15}{statistics.median(first[m]):>12.2f}{statistics.median(later[m]):>13.3f}")
    ratio = [statistics.median(d["orbax_default"]) / statistics.median(d["segjax"]) for d in (first, later)]
    print(f"speedup (orbax_default / segjax): first {ratio[0]:.1f}x, later {ratio[1]:.1f}x")


if __name__ == "__main__":
    main()
