"""ResNet v1.5 for 32x32 images, with flax's `examples/imagenet` interface for its batch norm.

The blocks receive the convolution, batch norm and activation as module factories and call the
batch norm as `self.norm()`, `self.norm(scale_init=zeros)` (the block's last norm, so every
residual branch starts as the identity) and `self.norm(name="norm_proj")` (the projection
shortcut), as the blocks of flax's `examples/imagenet/models.py` do. The model builds that
factory in one line,

    norm = partial(self.batch_norm, use_running_average=not train, momentum=0.9,
                   epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)

so `batch_norm=flax.linen.BatchNorm` (the default) and `batch_norm=jbn.linen.BatchNorm` differ
in that partial alone: same variable names and shapes, so the two load each other's variables.

Architecture (`ResNet18`): the CIFAR stem, not ImageNet's: one 3x3 stride-1 convolution with
`num_filters` filters, BN, ReLU and no max pool, so a 32x32 image keeps its resolution into the
first stage (ImageNet's 7x7/2 convolution and 3x3/2 pool would leave 8x8). Then four stages of
two basic blocks with `num_filters * (1, 2, 4, 8)` filters, the first block of stages 2-4 with
stride 2 (32 -> 16 -> 8 -> 4) and a 1x1 projection shortcut, then a global average pool and a
dense layer. Convolutions have no bias (BN's offset replaces it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BottleneckResNetBlock", "ResNet", "ResNet18", "ResNetBlock"]

ModuleFactory = Callable[..., nn.Module]


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions, each followed by batch norm, and a shortcut (basic block).

    `conv(features, kernel_size, strides, name=...)` and `norm(scale_init=..., name=...)` make
    the layers; the output has `filters` channels and the input's spatial size over `strides`.
    """

    filters: int
    conv: ModuleFactory
    norm: ModuleFactory
    act: Callable[[jax.Array], jax.Array]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.conv(self.filters, (3, 3))(y)
        # A zero scale makes the block start as its shortcut ("zero-init residual").
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if shortcut.shape != y.shape:
            shortcut = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(shortcut)
            shortcut = self.norm(name="norm_proj")(shortcut)
        return self.act(shortcut + y)


class BottleneckResNetBlock(nn.Module):
    """1x1 (`filters`), 3x3 (`filters`, `strides`), 1x1 (`4 * filters`) convolutions, each
    followed by batch norm, and a shortcut; arguments as `ResNetBlock`'s."""

    filters: int
    conv: ModuleFactory
    norm: ModuleFactory
    act: Callable[[jax.Array], jax.Array]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(4 * self.filters, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if shortcut.shape != y.shape:
            shortcut = self.conv(4 * self.filters, (1, 1), self.strides, name="conv_proj")(shortcut)
            shortcut = self.norm(name="norm_proj")(shortcut)
        return self.act(shortcut + y)


class ResNet(nn.Module):
    """ResNet v1.5 with the CIFAR stem (see the module docstring).

    Attributes:
      stage_sizes: blocks per stage; stage i has `num_filters * 2**i` filters and, for i > 0,
        stride 2 in its first block.
      block_cls: `ResNetBlock` or `BottleneckResNetBlock`.
      num_classes: size of the logits.
      num_filters: filters of the stem and the first stage (64 in ResNet-18).
      dtype: computation dtype of convolutions, batch norms and the dense layer (parameters
        are float32).
      batch_norm: the batch-norm class, called with flax.linen.BatchNorm's arguments:
        `flax.linen.BatchNorm` or its drop-in `jbn.linen.BatchNorm` (or a partial of either).
      axis_name: the mapped axis (pmap/shard_map) whose devices share batch statistics; None
        for one device or `jit` over a mesh.
      act: the activation.
      conv: the convolution class (called with `use_bias=False` and `dtype`).

    Call: `model.apply(variables, images, train=...)`, images `(batch, H, W, C)`; returns
    logits `(batch, num_classes)` in `dtype`. With `train=True` pass
    `mutable=["batch_stats"]`.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    batch_norm: ModuleFactory = nn.BatchNorm
    axis_name: Any = None
    act: Callable[[jax.Array], jax.Array] = nn.relu
    conv: ModuleFactory = nn.Conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            self.batch_norm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=self.axis_name,
        )
        x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        x = self.act(norm(name="bn_init")(x))
        for stage, blocks in enumerate(self.stage_sizes):
            for index in range(blocks):
                strides = (2, 2) if stage > 0 and index == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**stage, conv=conv, norm=norm, act=self.act, strides=strides
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
