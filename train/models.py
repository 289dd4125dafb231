"""The document's convolutional network, with jbn.BatchNorm after every convolution.

Architecture (the document's, kept faithfully):

    conv3x3(64)  -> BN -> ReLU -> maxpool 2x2/2
    conv3x3(64)  -> BN -> ReLU -> maxpool 2x2/2
    conv3x3(32)  -> BN -> ReLU -> maxpool 2x2/2
    conv3x3(16)  -> BN -> ReLU -> maxpool 2x2/2
    conv3x3(K)   -> BN -> ReLU -> avgpool 4x4/4 -> flatten -> K logits

All convolutions are SAME-padded with a bias; all pools are SAME-padded. K is the number of
classes of the data (10 for CIFAR-10 and Fashion-MNIST). For 32x32 inputs the four max pools give
a 2x2 map, for 28x28 inputs 28 -> 14 -> 7 -> 4 -> 2, so the final 4x4/4 SAME average pool always
sees a 2x2 map and yields one value per channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import jbn
from train import layers

# jbn.BatchNorm arguments that batch_norm_impl='flax' maps onto flax.linen.BatchNorm; the
# network itself sets axis_name and dtype.
_FLAX_SUPPORTED = ("decay", "epsilon", "center", "scale")
_SET_BY_THE_NETWORK = ("axis_name", "dtype")

# Filters of the first four convolutions; the fifth has one filter per class.
DOCUMENT_FEATURES: tuple[int, ...] = (64, 64, 32, 16)


class ConvNet(nn.Module):
    """The document's five-convolution network.

    Attributes:
      num_classes: filters of the last convolution, i.e. number of logits.
      features: filters of the convolutions before the last one (each followed by a max pool).
      batch_norm: the checked arguments of every `jbn.BatchNorm` (`batch_norm_options`:
        config.model.batch_norm), or None without batch norm. Their `axis_name` and `dtype`
        are the network's: the device layout's and the computation's, not the config's.
      axis_name: pmap axis over which batch statistics are synchronized (None: per device).
      relu_on_logits: the document applies BN + ReLU to the last convolution too, which makes
        every logit non-negative; False leaves the last layer linear (conv -> BN -> avg pool).
      dtype: computation dtype of the convolutions (parameters stay float32).
      batch_norm_impl: 'jbn' (jbn.BatchNorm) or 'flax' (flax.linen.BatchNorm with its default
        one-pass variance and the same decay, epsilon, center, scale and axis_name), the
        comparison network for benchmarks; 'flax' supports only those arguments.
      fast_layers: convolutions and max pools from `train/layers.py`, with the same values and
        gradients as flax's but derivatives that run faster on XLA:CPU; False: flax's own.
    """

    num_classes: int
    features: Sequence[int] = DOCUMENT_FEATURES
    batch_norm: jbn.layer.LayerOptions | None = None
    axis_name: str | None = None
    relu_on_logits: bool = True
    dtype: Any = jnp.float32
    batch_norm_impl: str = "jbn"
    fast_layers: bool = True

    def _batch_norm(self, name: str) -> nn.Module:
        options = dataclasses.replace(self.batch_norm, axis_name=self.axis_name, dtype=self.dtype)
        if self.batch_norm_impl == "jbn":
            arguments = {field: getattr(options, field) for field in jbn.layer.LAYER_ARGUMENTS}
            return jbn.BatchNorm(**arguments, name=name)
        if self.batch_norm_impl == "flax":
            defaults = jbn.layer.LayerOptions()
            unsupported = [
                field
                for field in jbn.layer.LAYER_ARGUMENTS
                if field not in (*_FLAX_SUPPORTED, *_SET_BY_THE_NETWORK)
                and getattr(self.batch_norm, field) != getattr(defaults, field)
            ]
            if unsupported:
                raise ValueError(f"batch_norm_impl='flax' does not support {unsupported}.")
            flax_names = jbn.linen.FLAX_ARGUMENTS
            return nn.BatchNorm(
                **{flax_names[field]: getattr(options, field) for field in _FLAX_SUPPORTED},
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=name,
            )
        raise ValueError(f"batch_norm_impl must be 'jbn' or 'flax', got {self.batch_norm_impl!r}.")

    @nn.compact
    def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
        """Maps images (N, H, W, C) to logits (N, num_classes).

        Training batches are never padded (the input pipeline drops the last partial batch) and
        evaluation uses the moving statistics, so batch norm needs no mask here.
        """
        x = images.astype(self.dtype)
        all_features = (*self.features, self.num_classes)
        conv = layers.conv_general_dilated if self.fast_layers else None  # None: lax's
        max_pool = layers.max_pool if self.fast_layers else nn.max_pool
        for index, num_filters in enumerate(all_features):
            is_last = index == len(all_features) - 1
            x = nn.Conv(
                num_filters,
                kernel_size=(3, 3),
                padding="SAME",
                use_bias=True,
                dtype=self.dtype,
                conv_general_dilated=conv,
                name=f"conv{index + 1}",
            )(x)
            if self.batch_norm is not None:
                norm = self._batch_norm(f"bn{index + 1}")
                if self.batch_norm_impl == "flax":
                    x = norm(x, use_running_average=not is_training)
                else:
                    x = norm(x, is_training=is_training)
            if not is_last or self.relu_on_logits:
                x = nn.relu(x)
            if not is_last:
                x = max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        # TF's SAME average pool divides by the number of real (unpadded) inputs in the window;
        # flax's default counts the padding, which would divide a 2x2 map by 16 instead of 4.
        x = nn.avg_pool(
            x, window_shape=(4, 4), strides=(4, 4), padding="SAME", count_include_pad=False
        )
        return x.reshape((x.shape[0], -1)).astype(jnp.float32)


def _l2_regularizer(weight: float) -> Callable[[jax.Array], jax.Array]:
    """`weight * sum(p**2)`: the loss jbn.BatchNorm sows for a regularized parameter."""
    return lambda p: weight * jnp.sum(jnp.square(p))


def batch_norm_options(model_config: ml_collections.ConfigDict) -> jbn.layer.LayerOptions:
    """jbn's checked batch-norm arguments from the `model` sub-config.

    `model.batch_norm` holds jbn's own arguments and passes through as it is, except that
    `renorm_clipping` without any bound is no argument (None); `model.batch_norm_l2` > 0 adds
    L2 `param_regularizers` on beta and gamma.

    Raises:
      ValueError, TypeError: jbn's own error, prefixed with the config group that holds the
        argument ('model.batch_norm: decay must be in [0, 1), got 1.0.').
    """
    arguments = model_config.batch_norm.to_dict()
    clipping = {
        key: bound for key, bound in arguments["renorm_clipping"].items() if bound is not None
    }
    arguments["renorm_clipping"] = clipping or None
    if model_config.batch_norm_l2 > 0:
        regularizer = _l2_regularizer(model_config.batch_norm_l2)
        arguments["param_regularizers"] = {"beta": regularizer, "gamma": regularizer}
    try:
        return jbn.layer.layer_options(**arguments)
    except (TypeError, ValueError) as error:
        raise type(error)(f"model.batch_norm: {error}") from None


def create_model(
    model_config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None = None
) -> ConvNet:
    """Builds the network described by the `model` sub-config.

    `axis_name` is the pmap axis; it reaches batch norm only when `model.sync_batch_stats`.
    """
    return ConvNet(
        num_classes=num_classes,
        features=tuple(model_config.features),
        batch_norm=batch_norm_options(model_config) if model_config.use_batch_norm else None,
        axis_name=axis_name if model_config.sync_batch_stats else None,
        relu_on_logits=model_config.relu_on_logits,
        dtype=jnp.dtype(model_config.dtype),
        batch_norm_impl=model_config.get("batch_norm_impl", "jbn"),
        fast_layers=model_config.get("fast_layers", True),
    )
