"""U-Net (Ronneberger et al. 2015) and, with every skip off, the plain encoder-decoder.

One module covers both: `skips='all'` feeds each encoder level's output to the matching decoder
level; `skips='none'` leaves the bottleneck as the only path from input to output (a
bridge/bottleneck network). A tuple of booleans switches skips per level (level 0 = full size).

Deep supervision (`deep_supervision=True`, nnU-Net's): a 1x1 head on every decoder level; in
training each coarse head's logits are resized (bilinear) to the image and scored like the main
output, weighted 1, 1/2, 1/4, ... from full resolution down (normalised to sum 1; nnU-Net's
weights, `loss.deep_supervision_weights` overrides them). Evaluation uses the full-resolution
head only, so the network's output and cost at inference are those without deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import blocks


def level_features(depth: int, base_features: int, features: Sequence[int] | None) -> tuple[int, ...]:
    """Channels per encoder level: explicit `features`, else `base_features` doubling per level."""
    if features:
        if len(features) != depth:
            raise ConfigError(f"model.features has {len(features)} entries but model.depth={depth}; give one per level")
        return tuple(int(f) for f in features)
    return tuple(base_features * 2**i for i in range(depth))


def skip_mask(skips: str | Sequence[bool], depth: int) -> tuple[bool, ...]:
    """'all' | 'none' | one bool per level (level 0 = full resolution) -> tuple of bools."""
    if isinstance(skips, str):
        if skips not in ("all", "none"):
            raise ConfigError(f"model.skips={skips!r} is not valid; use 'all', 'none' or one bool per level")
        return (skips == "all",) * depth
    skips = tuple(bool(s) for s in skips)
    if len(skips) != depth:
        raise ConfigError(f"model.skips has {len(skips)} entries but model.depth={depth}; give one per level")
    return skips


def check_spatial_shape(shape: Sequence[int], depth: int) -> None:
    """Every spatial size must halve `depth` times without remainder."""
    factor = 2**depth
    for size in shape:
        if size % factor:
            fit = -(-size // factor) * factor
            raise ConfigError(
                f"input size {tuple(shape)} does not fit model.depth={depth}: each spatial size must be "
                f"divisible by 2**depth={factor}; pad or crop {size} to {fit} (or lower the depth)"
            )


def check_input(image, depth: int, spatial_dims: int) -> None:
    """Rank must match `spatial_dims`; every spatial size must halve `depth` times."""
    if image.ndim != spatial_dims + 2:
        layout = "[batch, D, H, W, C]" if spatial_dims == 3 else "[batch, H, W, C]"
        raise ConfigError(
            f"model.spatial_dims={spatial_dims} expects {layout} input, got shape {image.shape}; "
            "set model.spatial_dims to match the data"
        )
    check_spatial_shape(image.shape[1:-1], depth)


class Encoder(nn.Module):
    """Conv blocks with 2x pooling between them; returns (bottleneck, per-level features)."""

    features: tuple[int, ...]
    bottleneck_features: int
    spatial_dims: int = 2
    pool: str = "max"
    norm: str = "batch"
    num_convs: int = 2
    kernel_size: int = 3
    dropout: float = 0.0
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None  # set by parallel.mode='pmap': cross-replica batch norm

    @nn.compact
    def __call__(self, x, train: bool):
        block = blocks.block_kwargs(self)
        levels = []
        for i, feats in enumerate(self.features):
            x = blocks.ConvBlock(feats, name=f"level{i}", **block)(x, train)
            levels.append(x)
            x = blocks.pool(x, self.pool, self.spatial_dims)
        x = blocks.ConvBlock(self.bottleneck_features, dropout=self.dropout, name="bottleneck", **block)(x, train)
        return x, levels


class Decoder(nn.Module):
    """Up-sample level by level; concatenate the encoder feature where `skips[level]` is on."""

    features: tuple[int, ...]
    skips: tuple[bool, ...]
    spatial_dims: int = 2
    upsample: str = "transpose"
    norm: str = "batch"
    num_convs: int = 2
    kernel_size: int = 3
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None  # set by parallel.mode='pmap': cross-replica batch norm

    @nn.compact
    def __call__(self, x, levels, train: bool, every_level: bool = False):
        """The full-resolution features; with `every_level`, each level's output, level 0 first."""
        block = blocks.block_kwargs(self)
        outputs = []
        for i in reversed(range(len(self.features))):
            x = blocks.Upsample(self.features[i], self.upsample, self.spatial_dims, self.dtype, name=f"up{i}")(x)
            if self.skips[i]:
                x = (x, levels[i].astype(x.dtype))  # concatenated along channels by the block
            x = blocks.ConvBlock(self.features[i], name=f"level{i}", **block)(x, train)
            outputs.insert(0, x)
        return outputs if every_level else x


class LevelNetwork(nn.Module):
    """The knobs U-Net and U-Net++ share (config.model's fields of the same names): levels of
    conv blocks, pooled on the way down and up-sampled on the way up, skips per level."""

    num_classes: int
    depth: int = 4
    base_features: int = 32
    features: tuple[int, ...] | None = None
    bottleneck_features: int | None = None
    skips: str | tuple[bool, ...] = "all"
    upsample: str = "transpose"
    pool: str = "max"
    norm: str = "batch"
    num_convs: int = 2
    kernel_size: int = 3
    dropout: float = 0.0
    spatial_dims: int = 2
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None  # set by parallel.mode='pmap': cross-replica batch norm
    freeze_encoder: bool = False  # encoder in inference mode (running BN statistics), no gradient into it

    def check_knobs(self) -> None:
        """A clear error for an unknown upsample/pool/norm name or a depth below 1."""
        blocks.check_choice("upsample", self.upsample, blocks.UPSAMPLES)
        blocks.check_choice("pool", self.pool, blocks.POOLS)
        blocks.check_choice("norm", self.norm, blocks.NORMS)
        if self.depth < 1:
            raise ConfigError(f"model.depth={self.depth} must be >= 1")


class UNet(LevelNetwork):
    """U-Net / encoder-decoder. `apply(vars, image, train) -> (logits float32, aux dict)`."""

    deep_supervision: bool = False  # a head on every decoder level, scored in training (module docstring)

    def setup(self):
        self.check_knobs()
        feats = level_features(self.depth, self.base_features, self.features)
        common = blocks.block_kwargs(self)
        self.encoder = Encoder(
            feats, self.bottleneck_features or 2 * feats[-1], pool=self.pool, dropout=self.dropout, **common
        )
        self.decoder = Decoder(feats, skip_mask(self.skips, self.depth), upsample=self.upsample, **common)
        self.head = blocks.Conv(self.num_classes, (1,) * self.spatial_dims, dtype=self.dtype)
        if self.deep_supervision and self.depth < 2:
            raise ConfigError("model.deep_supervision needs model.depth >= 2 (a head on each decoder level)")
        coarse = range(1, self.depth) if self.deep_supervision else ()
        self.coarse_heads = [blocks.Conv(self.num_classes, (1,) * self.spatial_dims, dtype=self.dtype) for _ in coarse]
        self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)  # only `classify` creates its params

    def __call__(self, image, train: bool = False):
        check_input(image, self.depth, self.spatial_dims)
        bottleneck, levels = self.encoder(image.astype(self.dtype), train and not self.freeze_encoder)
        if self.freeze_encoder:  # no backward pass through the encoder: its updates would be discarded
            bottleneck, levels = jax.lax.stop_gradient((bottleneck, levels))
        if not self.deep_supervision:
            logits = self.head(self.decoder(bottleneck, levels, train)).astype(jnp.float32)
            return logits, {"bottleneck": bottleneck}
        outputs = self.decoder(bottleneck, levels, train, every_level=True)
        logits = self.head(outputs[0]).astype(jnp.float32)
        if not (train or self.is_initializing()):
            return logits, {"bottleneck": bottleneck}
        heads = [logits]
        for head, x in zip(self.coarse_heads, outputs[1:], strict=True):
            coarse = head(x).astype(jnp.float32)
            heads.append(jax.image.resize(coarse, logits.shape, method="bilinear"))
        weights = [0.5**i for i in range(len(heads))]
        aux = {"bottleneck": bottleneck, "heads": heads, "head_weights": tuple(w / sum(weights) for w in weights)}
        return logits, aux

    def classify(self, image, train: bool = False):
        """Image-level logits [B, num_classes] (which classes are present): the encoder, global
        average pooling of the bottleneck, one dense layer. The pretraining task of the classic recipe."""
        check_input(image, self.depth, self.spatial_dims)
        bottleneck, _ = self.encoder(image.astype(self.dtype), train)
        pooled = jnp.mean(bottleneck, axis=tuple(range(1, 1 + self.spatial_dims)))
        return self.classifier(pooled).astype(jnp.float32)
