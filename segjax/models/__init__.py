"""Networks, chosen by name from one explicit dict (`ARCHS`); `build_model` turns a config into a module."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from segjax.errors import ConfigError
from segjax.models.unet import UNet
from segjax.models.unetpp import UNetPlusPlus
from segjax.models.vnet import VNet

# name -> (module class, fields the architecture fixes). No registry: add a line here.
ARCHS = {
    "unet": (UNet, {}),
    "encoder_decoder": (UNet, {"skips": "none"}),
    "unetpp": (UNetPlusPlus, {}),
    "vnet": (VNet, {}),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# config.model fields that are not module fields
_NOT_MODULE_FIELDS = ("arch",)


def parse_skips(value: str) -> str | tuple[bool, ...]:
    """'all' | 'none' | a 0/1 string per level, level 0 (full resolution) first, e.g. '1100'."""
    if value in ("all", "none"):
        return value
    if value and set(value) <= {"0", "1"}:
        return tuple(c == "1" for c in value)
    raise ConfigError(f"model.skips={value!r} is not valid; use 'all', 'none' or a 0/1 string per level like '1100'")


def _convert(key: str, value):
    if key == "skips":
        return parse_skips(value)
    if key == "dtype":
        if value not in DTYPES:
            raise ConfigError(f"model.dtype={value!r} is not valid; choose one of {sorted(DTYPES)}")
        return DTYPES[value]
    if key in ("features", "stage_convs"):
        return tuple(int(v) for v in value) if value else None
    return value


def build_model(cfg: ml_collections.ConfigDict, num_classes: int, norm_axis_name: str | None = None):
    """Instantiate `cfg.arch` with the knobs in `cfg` (see configs/default.py for each field);
    `norm_axis_name` (pmap mode) makes batch norm average its statistics over that axis.

    A knob set away from its default that the chosen architecture does not have is an error
    (e.g. deep supervision on U-Net), so no setting is silently ignored.
    """
    from segjax.configuration import default_config

    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown model.arch={cfg.arch!r}; valid architectures: {sorted(ARCHS)}")
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"model.spatial_dims={cfg.spatial_dims} is not supported; use 2 (images) or 3 (volumes)")
    module, fixed = ARCHS[cfg.arch]
    fields = {f.name for f in dataclasses.fields(module)}
    defaults = default_config().model
    kwargs = {"num_classes": num_classes, "norm_axis_name": norm_axis_name}
    for key, value in cfg.items():
        if key in _NOT_MODULE_FIELDS:
            continue
        if key not in fields:
            if value != defaults.get(key):
                raise ConfigError(f"model.{key}={value!r} does not apply to model.arch={cfg.arch!r}; remove it")
            continue
        kwargs[key] = _convert(key, value)
    for key, value in fixed.items():
        if key == "skips" and kwargs["skips"] not in ("all", "none"):
            raise ConfigError(f"model.arch={cfg.arch!r} has no skip connections; use arch='unet' to set model.skips")
        kwargs[key] = value
    return module(**kwargs)
