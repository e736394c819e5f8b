"""Networks, chosen by name from one explicit dict (`ARCHS`); `build_model` turns a config into a module."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from segjax.errors import ConfigError
from segjax.models.unet import UNet

# name -> (module class, fields the architecture fixes). No registry: add a line here.
ARCHS = {
    "unet": (UNet, {}),
    "encoder_decoder": (UNet, {"skips": "none"}),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_skips(value: str) -> str | tuple[bool, ...]:
    """'all' | 'none' | a 0/1 string per level, level 0 (full resolution) first, e.g. '1100'."""
    if value in ("all", "none"):
        return value
    if value and set(value) <= {"0", "1"}:
        return tuple(c == "1" for c in value)
    raise ConfigError(f"model.skips={value!r} is not valid; use 'all', 'none' or a 0/1 string per level like '1100'")


def build_model(cfg: ml_collections.ConfigDict, num_classes: int):
    """Instantiate `cfg.arch` with the knobs in `cfg` (see configs/default.py for each field)."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown model.arch={cfg.arch!r}; valid architectures: {sorted(ARCHS)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is not valid; choose one of {sorted(DTYPES)}")
    module, fixed = ARCHS[cfg.arch]
    kwargs = dict(
        num_classes=num_classes,
        depth=cfg.depth,
        base_features=cfg.base_features,
        features=tuple(cfg.features) if cfg.features else None,
        bottleneck_features=cfg.bottleneck_features,
        skips=parse_skips(cfg.skips),
        upsample=cfg.upsample,
        pool=cfg.pool,
        norm=cfg.norm,
        num_convs=cfg.num_convs,
        dropout=cfg.dropout,
        spatial_dims=cfg.spatial_dims,
        dtype=DTYPES[cfg.dtype],
    )
    for key, value in fixed.items():
        if key == "skips" and kwargs["skips"] not in ("all", "none"):
            raise ConfigError(f"model.arch={cfg.arch!r} has no skip connections; use arch='unet' to set model.skips")
        kwargs[key] = value
    return module(**kwargs)
