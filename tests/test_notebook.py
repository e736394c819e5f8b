"""experiments/analysis.ipynb runs top to bottom on a small study written here."""

from __future__ import annotations

import json
import os
import re

import matplotlib.pyplot as plt
import numpy as np

from tests.conftest import ROOT


def test_analysis_notebook_runs_on_a_fake_study(tmp_path, monkeypatch, capsys):
    for variant, values in {"unet": (0.8, 0.9), "no_skips": (0.6, 0.62)}.items():
        for seed, miou in enumerate(values):
            run = tmp_path / "runs" / "study_skips" / variant / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"step": 2, "val/miou": miou, "val/mbiou": miou / 2}))
            log = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5, "val/miou": miou}]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
            (run / "val_per_image.csv").write_text(  # mean Dice: a 0.7, b 0.95 (fg absent), c 0.5 / 0.435
                "index,name,pixels,accuracy,dice/bg,dice/fg,tp/bg,tp/fg,fp/bg,fp/fg,fn/bg,fn/fg,tn/bg,tn/fg\n"
                "0,a.png,16,0.9,0.9,0.5,8,5,2,1,1,2,5,8\n"  # confusion [[8, 1], [2, 5]]
                "1,b.png,16,1.0,0.95,,16,0,0,0,0,0,0,16\n"  # [[16, 0], [0, 0]]
                + (
                    "2,c.png,16,0.7,0.8,0.2,6,3,3,4,4,3,3,6\n"  # [[6, 4], [3, 3]]
                    if variant == "unet"
                    else "2,c.png,16,0.4375,0.4706,0.4,4,3,3,6,6,3,3,4\n"  # no_skips: [[4, 6], [3, 3]]
                )
            )
            (run / "config.json").write_text(json.dumps({"eval": {"average": "dataset", "empty": "nan"}}))
            (run / "val_confusion.csv").write_text("truth,bg,fg,edge\nbg,30,2,1\nfg,7,9,0\nedge,0,3,4\n")
            starts = [
                {"git": {"commit": "0123456789abcdef", "dirty": False}, "packages": {"jax": jax}}
                for jax in ("0.10.2", "0.11.2")
            ]
            (run / "environment.jsonl").write_text("".join(json.dumps(s) + "\n" for s in starts[: 1 + seed]))
    _isbi_runs(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    out = _run_notebook(capsys)
    assert "4 finished runs" in out
    assert "| unet | 2 | 0.8500 ± 0.0707 |" in out and "| no_skips | 2 | 0.6100 ± 0.0141 |" in out
    # no_skips - unet by seed: mIoU -0.2, -0.28 (mean -0.24, standard error 0.04), boundary IoU half that;
    # df 1: t(0.975) = 12.706, so -0.12 +- 0.2541; p = 1 - (2 / pi) atan(0.24 / 0.04) = 0.105
    assert "p=0.11 (Holm 0.11, n=2) | n/a | n/a | -0.1200 [-0.3741, +0.1341] p=0.11 (Holm 0.11, n=2) |" in out
    assert "| no_skips | -0.2400 [" in out
    expected = (("c.png", "0.435"), ("a.png", "0.700"), ("b.png", "0.950"))  # run_dir: no_skips' first seed
    hardest = [out.index(f"{name}  mean Dice {dice}") for name, dice in expected]
    assert hardest == sorted(hardest)  # the per-image table, hardest image first
    # no_skips' images summed: confusion [[28, 7], [5, 8]]: IoU 28/40 and 8/20, mean 0.55; accuracy 36/48
    assert "| val/miou | 0.5500 | [" in out and "| val/accuracy | 0.7500 | [" in out and "| 3 | 0 |" in out
    # on the same images: unet's summed confusion [[30, 5], [5, 8]] (each seed's), no_skips' [[28, 7], [5, 8]]:
    # mIoU (28/40 + 8/20) / 2 - 0.5972 = -0.0472, accuracy 36/48 - 38/48; only image c differs, so the
    # 30 % of resamples without it differ by 0: the interval's top is 0; of the 8 swaps of the images
    # between the variants, the 4 that swap c give exactly the opposite difference, the others the
    # same: half of them as far out as the observed, p = 2 x 1/2 = 1 (Holm over one variant: the same)
    assert "on the same 3 images:" in out and "| no_skips | -0.0472 [" in out and "-0.0417 [" in out
    ps = re.findall(r", \+0\.0000\] p=([\d.]+) \(Holm ([\d.]+)\)", out)
    assert ps == [("1", "1"), ("1", "1")]
    assert "most pixels mistaken: fg taken for bg (7 of 16)" in out  # the largest off-diagonal count
    assert "unet/seed_0: 1 start(s): commit 0123456789ab, jax 0.10.2" in out
    assert "unet/seed_1: 2 start(s): commit 0123456789ab, jax 0.10.2; commit 0123456789ab, jax 0.11.2" in out
    # the ISBI cell: the network's kept interval (accuracy's null bounds: the score alone), the
    # baseline without intervals.json; membrane Dice of the summed counts 24/29 vs 18/30, accuracy
    # 43/48 vs 36/48, and the network is better on every image: of the 8 swaps of the images
    # between the runs only the observed one is as far out, p = 2 x 1/8 (the floor of 3 images)
    assert "runs/isbi        membrane Dice 0.828 [0.700, 0.900]  accuracy 0.896\n" in out
    assert "runs/isbi_otsu   membrane Dice 0.600  accuracy 0.750\n" in out
    assert "on the same 3 images:" in out
    row = re.search(r"\| runs/isbi \| \+(\S+) \[\+(\S+), .*p=(\S+) .*\| \+(\S+) \[\+(\S+), .*p=(\S+) ", out)
    assert row, out
    assert row[1] == f"{24 / 29 - 0.6:.4f}" and row[4] == f"{(43 - 36) / 48:.4f}"
    assert float(row[2]) > 0 and float(row[5]) > 0 and row[3] == row[6] == "0.25"
    assert plt.get_fignums()  # the plots were drawn
    plt.close("all")

    # a run that kept its intervals (intervals.json): the notebook shows those, null as n/a
    kept = {"val/miou": {"estimate": 0.55, "low": 0.1234, "high": 0.9876, "undefined": 0}}
    kept["val/accuracy"] = {"estimate": 0.75, "low": None, "high": None, "undefined": 3}
    run = tmp_path / "runs" / "study_skips" / "no_skips" / "seed_0"
    (run / "intervals.json").write_text(json.dumps({"images": 3, "level": 0.9, "intervals": kept}))
    out = _run_notebook(capsys)
    assert "| key | score | 90% interval | images | undefined resamples |" in out
    assert "| val/miou | 0.5500 | [0.1234, 0.9876] | 3 | 0 |" in out
    assert "| val/accuracy | 0.7500 | [n/a, n/a] | 3 | 3 |" in out
    plt.close("all")


def _run_notebook(capsys) -> str:
    """Every code cell of the notebook, in order, in one namespace; what it printed."""
    with open(os.path.join(ROOT, "experiments", "analysis.ipynb"), encoding="utf-8") as f:
        notebook = json.load(f)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    return capsys.readouterr().out


def _isbi_runs(root) -> None:
    """A network's and a threshold's run on three ISBI-like images (truth rows x prediction columns,
    classes cell, membrane): network x [[10, 1], [1, 4]], y [[12, 0], [1, 3]], z [[9, 2], [0, 5]];
    threshold x [[8, 3], [2, 3]], y [[10, 2], [2, 2]], z [[9, 2], [1, 4]]."""
    confusions = {
        "isbi": ([[10, 1], [1, 4]], [[12, 0], [1, 3]], [[9, 2], [0, 5]]),
        "isbi_otsu": ([[8, 3], [2, 3]], [[10, 2], [2, 2]], [[9, 2], [1, 4]]),
    }
    for run, images in confusions.items():
        folder = root / run
        folder.mkdir(parents=True)
        head = "index,name,pixels,accuracy," + ",".join(
            f"{k}/{c}" for k in ("tp", "fp", "fn", "tn") for c in ("cell", "membrane")
        )
        lines, total = [head], np.zeros((2, 2), int)
        for i, cm in enumerate(map(np.array, images)):
            tp = np.diag(cm)
            fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
            tn = cm.sum() - tp - fp - fn
            cells = [*tp, *fp, *fn, *tn]
            lines.append(f"{i},{'xyz'[i]}.png,16,{tp.sum() / 16}," + ",".join(map(str, cells)))
            total += cm
        (folder / "val_per_image.csv").write_text("\n".join(lines) + "\n")
        (folder / "config.json").write_text(json.dumps({"eval": {"average": "dataset", "empty": "nan"}}))
        dice = 2 * total[1, 1] / (2 * total[1, 1] + total[0, 1] + total[1, 0])
        scores = {"val/dice/membrane": float(dice), "val/accuracy": float(np.trace(total) / 48)}
        (folder / "metrics.json").write_text(json.dumps(scores))
    kept = {"val/dice/membrane": {"estimate": 0.8276, "low": 0.7, "high": 0.9, "undefined": 0}}
    kept["val/accuracy"] = {"estimate": 0.8958, "low": None, "high": None, "undefined": 0}
    (root / "isbi" / "intervals.json").write_text(json.dumps({"images": 3, "level": 0.95, "intervals": kept}))
