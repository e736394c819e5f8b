"""Seconds to prepare an image folder as a TFDS dataset (decode, validate, encode as PNG, write
array_record), at the PNG zlib level segjax uses (`png.COMPRESS_LEVEL`) and at PIL's default 6,
alternating in one process, median of `--repeats`, each into a fresh folder. Most of the time is
the PNG encoding; the decoded pixels are the same at every level (checked here).

  python benchmarks/prepare_bench.py [--configs nuclei,isbi --repeats 3]

The last line reads `speedup (level 6 / level 1): <config> <N>x ...`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from segjax import configuration  # noqa: E402
from segjax.data import png, sources  # noqa: E402


def prepare_seconds(name: str, level: int, scratch: str) -> tuple[float, int, list]:
    """(seconds, bytes written, the first training example's arrays) for one fresh preparation."""
    config = configuration.from_file(os.path.join(ROOT, "configs", f"{name}.py")).data
    config.tfds_dir = tempfile.mkdtemp(dir=scratch)
    png.COMPRESS_LEVEL = level
    start = time.perf_counter()
    sources.prepare(config)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(config.tfds_dir) for f in files)
    first = sources.open_splits(config)["train"][0]
    shutil.rmtree(config.tfds_dir)
    return seconds, size, [first["image"], first["label"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="nuclei,isbi")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    levels, speedups = (png.COMPRESS_LEVEL, 6), []
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; levels {levels}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.configs.split(","):
            times = {level: [] for level in levels}
            for _ in range(args.repeats):
                arrays = {}
                for level in levels:
                    seconds, size, arrays[level] = prepare_seconds(name, level, scratch)
                    times[level].append(seconds)
                    print(f"{name} level {level}: {seconds:.2f} s, {size / 1e6:.1f} MB")
                for a, b in zip(arrays[levels[0]], arrays[levels[1]], strict=True):
                    np.testing.assert_array_equal(a, b)  # the same pixels at both levels
            medians = {level: statistics.median(t) for level, t in times.items()}
            speedups.append(f"{name} {medians[6] / medians[levels[0]]:.2f}x")
            print(f"{name}: median {medians[levels[0]]:.2f} s at level {levels[0]}, {medians[6]:.2f} s at level 6")
    print("speedup (level 6 / level 1): " + " ".join(speedups))


if __name__ == "__main__":
    main()
