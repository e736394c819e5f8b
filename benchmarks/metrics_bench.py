"""Confusion-matrix metrics: segjax (jit) vs scikit-learn vs torchmetrics, same CPU, same data.

All three compute the same numbers from one batch of label maps: per-class IoU, Dice (F1),
precision, recall and pixel accuracy. Each is timed as the median of `--repeats` calls after a
warm-up (segjax's compile is excluded and reported separately). Threads: XLA and torch both use
all cores of the machine (2 here); scikit-learn is single-threaded numpy.

  python benchmarks/metrics_bench.py [--images 16 --size 512 --classes 21 --repeats 7]

The last line reads `speedup vs sklearn: <N>x, vs torchmetrics: <M>x` (`n/a` without torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import sklearn
from sklearn import metrics as skm

from segjax import metrics


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    c = args.classes
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, (args.images, args.size, args.size)).astype(np.int32)
    preds = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, c, labels.shape), labels).astype(np.int32)
    print(f"batch {labels.shape}, {c} classes; {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"jax {jax.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}")

    @jax.jit
    def segjax_scores(t, p):
        out = metrics.summarize(metrics.confusion_matrix(t, p, c))
        return {k: out[k] for k in ("iou", "dice", "precision", "recall", "accuracy")}

    t_dev, p_dev = jnp.asarray(labels), jnp.asarray(preds)
    start = time.perf_counter()
    ours_out = jax.block_until_ready(segjax_scores(t_dev, p_dev))
    compile_s = time.perf_counter() - start
    ours = median_time(lambda: jax.block_until_ready(segjax_scores(t_dev, p_dev)), args.repeats)
    eager = median_time(lambda: jax.block_until_ready(metrics.confusion_matrix(labels, preds, c)), 3)

    flat_t, flat_p, names = labels.ravel(), preds.ravel(), list(range(c))

    def sklearn_scores():
        return (
            skm.jaccard_score(flat_t, flat_p, labels=names, average=None),
            skm.f1_score(flat_t, flat_p, labels=names, average=None),
            skm.precision_score(flat_t, flat_p, labels=names, average=None, zero_division=0),
            skm.recall_score(flat_t, flat_p, labels=names, average=None, zero_division=0),
            skm.accuracy_score(flat_t, flat_p),
        )

    sk_repeats = max(1, min(args.repeats, 3))
    sk = median_time(sklearn_scores, sk_repeats)
    sk_cm = median_time(lambda: skm.confusion_matrix(flat_t, flat_p, labels=names), sk_repeats)
    np.testing.assert_allclose(np.asarray(ours_out["iou"]), sklearn_scores()[0], rtol=1e-5)

    rows = [
        ("segjax jit (confusion + 5 scores)", ours),
        ("segjax eager confusion_matrix (with input checks)", eager),
        ("scikit-learn (jaccard, f1, precision, recall, accuracy)", sk),
        ("scikit-learn confusion_matrix only", sk_cm),
    ]
    tm_ratio = "n/a"
    try:
        import torch
        import torchmetrics
        from torchmetrics.functional import classification as tmf
    except ImportError:
        torch = None
    if torch is not None:
        tt, tp = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(preds.astype(np.int64))

        def torchmetrics_scores():
            kw = dict(num_classes=c, average="none")
            return (
                tmf.multiclass_jaccard_index(tp, tt, **kw),
                tmf.multiclass_f1_score(tp, tt, **kw),
                tmf.multiclass_precision(tp, tt, **kw),
                tmf.multiclass_recall(tp, tt, **kw),
                tmf.multiclass_accuracy(tp, tt, num_classes=c, average="micro"),
            )

        torchmetrics_scores()
        tm = median_time(torchmetrics_scores, args.repeats)
        np.testing.assert_allclose(np.asarray(ours_out["iou"]), torchmetrics_scores()[0].numpy(), rtol=1e-5)
        rows.append(
            (
                f"torchmetrics {torchmetrics.__version__} (torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads)",
                tm,
            )
        )
        tm_ratio = f"{tm / ours:.1f}x"
    print(f"segjax compile (once): {compile_s * 1000:.0f} ms")
    for name, seconds in rows:
        print(f"{name:<75} {seconds * 1000:9.1f} ms   {ours and seconds / ours:7.1f}x segjax time")
    print(f"speedup vs sklearn: {sk / ours:.1f}x, vs torchmetrics: {tm_ratio}")


if __name__ == "__main__":
    main()
