"""V-Net (Milletari et al. 2016), 3D by default, 2D allowed.

Residual stages of 1-3 convolutions (5x5x5 by default) with PReLU; down-sampling by 2x2x2
stride-2 convolutions, up-sampling by 2x2x2 stride-2 transposed convolutions; each decoder stage
concatenates the matching encoder stage (skips) and adds its up-sampled input as the residual.
Channels: `base_features` doubling per level, levels 0..depth (level `depth` is the bottom stage).
`classify` (the classic recipe's pretraining task) is the encoder stages alone, global average
pooling of the bottom stage and one dense layer; `freeze_encoder` runs them in inference mode
without gradients.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import blocks
from segjax.models.unet import check_input, level_features, skip_mask


class ResidualStage(nn.Module):
    """`num_convs` x (conv -> norm -> PReLU) plus the input (1x1-projected if channels differ)."""

    features: int
    num_convs: int
    kernel_size: int = 5
    spatial_dims: int = 3
    norm: str = "batch"
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None  # set by parallel.mode='pmap': cross-replica batch norm

    @nn.compact
    def __call__(self, x, residual, train: bool):
        kernel = (self.kernel_size,) * self.spatial_dims
        y = x
        for i in range(self.num_convs):
            y = blocks.Conv(self.features, kernel, dtype=self.dtype)(y)
            y = blocks.Norm(self.norm, dtype=self.dtype, axis_name=self.norm_axis_name)(y, train)
            if i < self.num_convs - 1:
                y = nn.PReLU(param_dtype=jnp.float32)(y)
        if residual.shape[-1] != self.features:
            residual = blocks.Conv(self.features, (1,) * self.spatial_dims, dtype=self.dtype, name="project")(residual)
        return nn.PReLU(param_dtype=jnp.float32)(y + residual)


class VNet(nn.Module):
    """`apply(vars, volume, train) -> (logits float32, aux)`."""

    num_classes: int
    depth: int = 4
    base_features: int = 16
    features: tuple[int, ...] | None = None
    stage_convs: tuple[int, ...] | None = None  # convs per level 0..depth; default (1, 2, 3, 3, ...)
    skips: str | tuple[bool, ...] = "all"
    kernel_size: int = 5
    norm: str = "batch"
    dropout: float = 0.0
    spatial_dims: int = 3
    dtype: Any = jnp.float32
    norm_axis_name: str | None = None  # set by parallel.mode='pmap': cross-replica batch norm
    freeze_encoder: bool = False  # encoder stages in inference mode (running BN statistics), no gradient into them

    def classify(self, image, train: bool = False):
        """Image-level logits [B, num_classes]: the encoder stages, global average pooling of the
        bottom stage, one dense layer named `classifier`. The pretraining task of the classic recipe."""
        return self(image, train, classify=True)

    @nn.compact
    def __call__(self, image, train: bool = False, classify: bool = False):
        blocks.check_choice("norm", self.norm, blocks.NORMS)
        if self.depth < 1:  # as U-Net's: at least one down and one up stage
            raise ConfigError(f"model.depth={self.depth} must be >= 1")
        check_input(image, self.depth, self.spatial_dims)
        feats = level_features(self.depth + 1, self.base_features, self.features)
        convs = self.stage_convs or tuple(min(i + 1, 3) for i in range(self.depth + 1))
        if len(convs) != self.depth + 1:
            raise ConfigError(f"model.stage_convs needs depth+1={self.depth + 1} entries (one per level), got {convs}")
        skips = skip_mask(self.skips, self.depth)
        stage = dict(
            kernel_size=self.kernel_size,
            spatial_dims=self.spatial_dims,
            norm=self.norm,
            dtype=self.dtype,
            norm_axis_name=self.norm_axis_name,
        )
        two = (2,) * self.spatial_dims
        frozen = self.freeze_encoder and not classify
        encoder_train = train and not frozen
        x = image.astype(self.dtype)
        encoded = []
        for i in range(self.depth + 1):
            if i:
                x = blocks.Conv(feats[i], two, strides=two, dtype=self.dtype, name=f"down{i}")(x)
                x = nn.PReLU(param_dtype=jnp.float32)(
                    blocks.Norm(self.norm, dtype=self.dtype, axis_name=self.norm_axis_name)(x, encoder_train)
                )
            x = ResidualStage(feats[i], convs[i], name=f"enc{i}", **stage)(x, x, encoder_train)
            if frozen:  # no backward pass into the encoder
                x = jax.lax.stop_gradient(x)
            encoded.append(x)
        if classify:
            pooled = jnp.mean(x, axis=tuple(range(1, 1 + self.spatial_dims)))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled).astype(jnp.float32)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in reversed(range(self.depth)):
            up = blocks.TransposeConv2x(feats[i], self.spatial_dims, self.dtype, name=f"up{i}")(x)
            up = nn.PReLU(param_dtype=jnp.float32)(
                blocks.Norm(self.norm, dtype=self.dtype, axis_name=self.norm_axis_name)(up, train)
            )
            cat = jnp.concatenate([up, encoded[i]], axis=-1) if skips[i] else up
            x = ResidualStage(feats[i], convs[i], name=f"dec{i}", **stage)(cat, up, train)
        logits = blocks.Conv(self.num_classes, (1,) * self.spatial_dims, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32), {}
