"""Cold start: seconds to build a network's initial training state in a fresh process.

A research run pays XLA's compile time again in every new process (JAX's persistent compilation
cache is opt-in), and before session 26 building the initial state was most of a small run's
start: flax's eager `model.init` compiles every primitive and shape on its own, and a threefry
draw of a rank-4/5 kernel compiles up to 9x slower than the same draw as a matrix. Four forms, each
timed in its own fresh process (no compilation cache), alternating, median of `--repeats`:

  flax_eager     flax's `lecun_normal` on the kernel's shape, eager `model.init` (segjax before)
  flax_jit       the same as one jit-compiled program
  matrix_eager   `blocks.kernel_init` (the same numbers, drawn as a matrix), eager
  segjax         `state.create`: `blocks.kernel_init` and one program (segjax now)

All four give the same initial values bit for bit (tests/test_models.py, tests/test_train.py).

  python benchmarks/startup_bench.py [--configs default,unet3d,vnet3d,unetpp --repeats 3]

The last line reads `speedup (flax_eager / segjax): <config> <N>x ...`.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("flax_eager", "flax_jit", "matrix_eager", "segjax")


def child(mode: str, config_name: str) -> None:
    """Build the state of `config_name` in `mode` and print the seconds it took."""
    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from segjax import configuration, optim, state, train
    from segjax.models import blocks, build_model, conv_forms

    if mode.startswith("flax"):  # what nn.Conv draws by itself
        blocks.kernel_init = nn.initializers.lecun_normal()
        blocks.Conv = functools.partial(nn.Conv, conv_general_dilated=conv_forms.aligned_conv)
    config = configuration.from_file(os.path.join(ROOT, "configs", f"{config_name}.py"))
    model = build_model(config.model, config.data.num_classes)
    sample = jnp.zeros((1, *(32,) * config.model.spatial_dims, config.data.channels))
    tx = train.make_tx(config, model)
    start = time.perf_counter()
    if mode.endswith("eager"):  # state.create before session 26
        init_rng, _ = jax.random.split(jax.random.PRNGKey(0))
        variables = model.init({"params": init_rng}, sample, train=False)
        stats = variables.get("batch_stats", {})
        out = variables["params"], optim.init(tx, variables["params"], stats)
    else:
        out = state.create(model, tx, sample, 0)
    jax.block_until_ready(out)
    print(f"{time.perf_counter() - start:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default,unet3d,vnet3d,unetpp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import jax

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; jax {jax.__version__}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    configs = args.configs.split(",")
    times = {(c, m): [] for c in configs for m in MODES}
    for _ in range(args.repeats):
        for c in configs:
            for m in MODES:
                cmd = [sys.executable, __file__, "--child", m, c]
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                times[c, m].append(float(done.stdout.split()[-1]))
    print(f"seconds to the initial state, fresh process, median of {args.repeats}:")
    print(f"{'config':<10}" + "".join(f"{m:>14}" for m in MODES))
    for c in configs:
        print(f"{c:<10}" + "".join(f"{statistics.median(times[c, m]):>14.2f}" for m in MODES))
    ratios = [
        f"{c} {statistics.median(times[c, 'flax_eager']) / statistics.median(times[c, 'segjax']):.1f}x" for c in configs
    ]
    print("speedup (flax_eager / segjax): " + " ".join(ratios))


if __name__ == "__main__":
    main()
