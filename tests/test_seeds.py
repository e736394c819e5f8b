"""K seeds in one vmapped step: each replica reproduces its own single-seed run."""

from __future__ import annotations

import json
import os

import numpy as np

from segjax import train


def logged(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_two_vmapped_seeds_equal_two_separate_runs(tiny_config, tmp_path):
    tiny_config.train.log_every = 1
    tiny_config.model.dropout = 0.1  # per-replica RNG streams matter
    tiny_config.eval.surface_metrics = True  # host-side scores per replica too
    singles = {}
    for seed in (3, 4):
        tiny_config.train.seed = seed
        singles[seed] = train.train_and_evaluate(tiny_config, str(tmp_path / f"single{seed}"))
    tiny_config.train.seed, tiny_config.train.num_seeds = 3, 2
    both = train.train_and_evaluate(tiny_config, str(tmp_path / "vmapped"))
    for seed in (3, 4):
        np.testing.assert_allclose(
            logged(tmp_path / "vmapped", f"seed{seed}/train/loss"),
            logged(tmp_path / f"single{seed}", "train/loss"),
            rtol=1e-4,
        )
        with open(tmp_path / "vmapped" / f"seed_{seed}" / "metrics.json", encoding="utf-8") as f:
            own = json.load(f)
        np.testing.assert_allclose(own["val/miou"], singles[seed]["val/miou"], rtol=1e-4)
        assert singles[seed]["val/mnsd"] > 0 and np.isfinite(singles[seed]["val/mhd95"])
        for key in ("val/mnsd", "val/mhd95"):
            np.testing.assert_allclose(own[key], singles[seed][key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(both["val/miou"], np.mean([singles[s]["val/miou"] for s in (3, 4)]), rtol=1e-4)
    assert both["val/miou_std"] >= 0
    np.testing.assert_allclose(both["val/mnsd"], np.mean([singles[s]["val/mnsd"] for s in (3, 4)]), rtol=1e-4)
    # resuming a finished K-seed run trains nothing and reproduces the numbers
    again = train.train_and_evaluate(tiny_config, str(tmp_path / "vmapped"))
    np.testing.assert_allclose(again["val/miou"], both["val/miou"], rtol=1e-6)
