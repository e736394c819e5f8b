"""Ablations of the U-Net on the synthetic scenes, one axis per argument (segjax/study.py).

Each variant changes the listed config keys of configs/default.py; every variant trains with each
seed and the summary reports mean ± std over seeds.

COMMAND (one axis; 3 seeds each; about 3 min per run on 2 CPU cores):
  python -m segjax.study --study=configs/studies/unet_ablations.py:skips --workdir=runs/study_skips --seeds=3
  axes: skips | depth | width | bottleneck | upsample | pool | pretraining | pretraining_unetpp |
        optimizer | arch | classic | all (every variant above)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import default

from segjax.errors import ConfigError

AXES = {
    "skips": {
        "unet": {},
        "no_skips": {"model.skips": "none"},  # the plain encoder-decoder: bottleneck only
        "skip_full_res_only": {"model.skips": "100"},
        "skip_low_res_only": {"model.skips": "001"},
    },
    "depth": {f"depth{d}": {"model.depth": d} for d in (2, 3, 4)},
    "width": {f"base{b}": {"model.base_features": b} for b in (8, 16, 32)},
    "bottleneck": {f"bottleneck{b}": {"model.bottleneck_features": b} for b in (8, 32, 128)},
    "upsample": {"transpose": {"model.upsample": "transpose"}, "resize": {"model.upsample": "resize"}},
    "pool": {"max": {"model.pool": "max"}, "avg": {"model.pool": "avg"}},
    "pretraining": {  # the classic recipe (segjax/pretrain.py) next to end-to-end training
        "end_to_end": {},
        "pretrained_frozen": {"pretrain.steps": 400, "model.freeze_encoder": True},
        "pretrained_finetuned": {"pretrain.steps": 400},
    },
    "pretraining_unetpp": {  # the same recipe on U-Net++ (its encoder: the nodes X{i}_0)
        name: {"model.arch": "unetpp", "model.deep_supervision": True, "model.base_features": 12, **o}
        for name, o in (
            ("end_to_end", {}),
            ("pretrained_frozen", {"pretrain.steps": 400, "model.freeze_encoder": True}),
            ("pretrained_finetuned", {"pretrain.steps": 400}),
        )
    },
    "optimizer": {  # the default AdamW + cosine, with a weight average, and nnU-Net's SGD recipe
        "adamw_cosine": {},
        "adamw_cosine_ema": {"optim.ema_decay": 0.99},
        "sgd_nesterov_poly": {
            "optim.name": "sgd",
            "optim.lr": 0.01,
            "optim.momentum": 0.99,
            "optim.nesterov": True,
            "optim.schedule": "poly",
            "optim.weight_decay": 3e-5,
        },
    },
    "arch": {
        "encoder_decoder": {"model.arch": "encoder_decoder"},
        "unet": {"model.arch": "unet"},
        "unetpp": {"model.arch": "unetpp", "model.deep_supervision": True, "model.base_features": 12},
    },
    "classic": {  # where learning wins: the U-Net beside a classic method scored on every class
        "unet": {},
        # multi-Otsu levels per image, each level's class fitted on the training split (segjax/baseline_levels.py)
        "multiotsu": {"baseline.enabled": True, "baseline.method": "multiotsu"},
    },
}


def get_config(arg=None):
    del arg
    return default.get_config()


def get_variants(arg=None):
    axis = arg or "skips"
    if axis == "all":
        return {f"{a}/{name}".replace("/", "_"): o for a, variants in AXES.items() for name, o in variants.items()}
    if axis not in AXES:
        raise ConfigError(f"unknown axis {axis!r}; choose one of {sorted(AXES)} or 'all'")
    return AXES[axis]
