"""What was tried on ISBI 2012's protocol split (images 025-029), as one study: the README's proxy runs.

Every variant is configs/isbi.py shortened to the proxy the README's comparisons use (1000 steps,
one input thread, one core per process) with the overrides below; `default` is the recipe itself.
The README's table ("ISBI 2012 on 2 CPU cores") lists what each gave; rerunning a variant
reproduced its numbers bit for bit in sessions 15-16 (the proxy is deterministic for a seed);
the CPU layer forms and kernels since session 18 sum in other orders, so the last digits differ.

COMMAND (all variants, two processes on one core each share the study, ~25-35 min per run):
  for c in 0 1; do taskset -c $c python -m segjax.study --study=configs/studies/isbi_variants.py \\
      --workdir=runs/isbi_variants --seeds=1 --summary_keys=val/dice/membrane & done; wait
Some of them: --study=configs/studies/isbi_variants.py:ce_only,pool_avg
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import isbi_folds

from segjax.errors import ConfigError

VARIANTS = {
    "default": {},
    "upsample_resize": {"model.upsample": "resize"},  # bilinear + 3x3 conv instead of the 2x2 transposed conv
    "pool_avg": {"model.pool": "avg"},
    "group_norm": {"model.norm": "group"},  # no train/eval statistics mismatch
    "deep_supervision": {"model.deep_supervision": True},  # nnU-Net's heads on every decoder level
    "ce_only": {"loss.terms": "ce"},
    "dice_weight2": {"loss.dice_weight": 2.0},
    "label_smoothing": {"loss.label_smoothing": 0.1},
    "lr_1e-3": {"optim.lr": 1e-3},
    "lr_4e-3": {"optim.lr": 4e-3},
    "crop384_batch2": {"data.augment.crop": 384, "train.batch_size": 2},  # more context, ~ as many pixels per step
    # session 35: images 015-029 carry ~1.5x the pixel noise of 000-014 (the validation images among
    # them); noise on every training crop, or nnU-Net's occasional blur (0.8194, 0.8196: no change)
    "noise": {"data.augment.noise": 0.04},
    "blur": {"data.augment.blur_prob": 0.2},
}


def get_config(arg=None):
    del arg  # selects variants only
    return isbi_folds.get_config("proxy")  # one definition of the proxy; its fold is the protocol's


def get_variants(arg=None):
    if not arg:
        return dict(VARIANTS)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"isbi_variants.py: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}
