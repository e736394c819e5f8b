"""Input pipeline vs training step: images/s each can deliver/consume, and the data-wait fraction.

For a config: (1) images/s the grain training pipeline (decode cache, augmentation, batching,
prefetch threads) delivers with nothing else running; (2) images/s the jitted train step consumes
on a fixed batch; (3) a short real training run's `train/data_wait_fraction` (time the loop waited
in `next()` / wall time: an upper bound on device idle time).

  python benchmarks/input_bench.py --config=configs/default.py [--config=configs/isbi.py ...]
      [--set data.augment.image_order=3 ...]   (dotted config overrides, applied to every config)

Last line: `<config>: pipeline/step ratio <N>x, data wait <W>%` for each config.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segjax import configuration, optim, parallel, state, steps, study, train  # noqa: E402
from segjax.data import pipeline, sources  # noqa: E402
from segjax.models import build_model  # noqa: E402


def load(path: str, overrides: dict):
    return study.variant_config(configuration.from_file(os.path.join(ROOT, path)), overrides, "--set")


def parse_override(text: str) -> tuple[str, object]:
    """'data.augment.image_order=3' -> ('data.augment.image_order', 3); values are Python literals
    (a bare word is a string)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def measure(path: str, overrides: dict, batches: int, train_steps: int) -> str:
    config = load(path, overrides)
    splits = sources.open_splits(config.data)
    ds = pipeline.train_dataset(splits["train"], config.data, config.train.batch_size, config.train.seed)
    it = pipeline.train_iterator(ds, config.data)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    pipe = batches * config.train.batch_size / (time.perf_counter() - start)

    model = build_model(config.model, config.data.num_classes)
    st = state.create(model, optim.build(config.optim, 100), jnp.asarray(batch["image"][:1]), 0)
    fn = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=config.loss), donate_argnums=0)
    device_batch = parallel.to_global(batch, parallel.make_mesh())
    st, out = fn(st, device_batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(max(5, train_steps // 4)):
        t = time.perf_counter()
        st, out = fn(st, device_batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    consume = config.train.batch_size / statistics.median(times)

    with tempfile.TemporaryDirectory() as workdir:
        config.train.steps, config.train.log_every = train_steps, train_steps // 2
        config.eval.every = config.train.checkpoint_every = 10**6
        train.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if "train/data_wait_fraction" in line]
    wait = rows[-1]["train/data_wait_fraction"]  # the second window: compilation excluded
    print(f"{path}: pipeline {pipe:.1f} images/s, train step consumes {consume:.1f} images/s")
    label = path + "".join(f" {k}={v}" for k, v in overrides.items())
    return f"{label}: pipeline/step ratio {pipe / consume:.1f}x, data wait {100 * wait:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--train_steps", type=int, default=60)
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(args.set)
    print(f"{os.cpu_count()} cpus, jax {jax.__version__}, overrides {overrides or 'none'}")
    paths = args.config or ["configs/default.py"]
    lines = [measure(path, overrides, args.batches, args.train_steps) for path in paths]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
