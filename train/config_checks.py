"""The checks of a training config, run before any data is loaded; errors name the field.

Each value is checked in one place: the batch norm arguments by jbn itself (through
`models.batch_norm_options`: `jbn.layer.layer_options` on the arguments the model passes),
the device layout by `devices.device_layout`, a batch size against the dataset by
`data.steps_per_epoch`, and everything else here.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections

from train import models

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


class _Devices(Protocol):
    """What the checks need of a `devices.DeviceLayout` (which imports this module)."""

    local_devices: tuple[Any, ...]
    num_processes: int

    @property
    def num_devices(self) -> int: ...


class ConfigError(Exception):
    """A config value that cannot work; the message names the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_config(config: ml_collections.ConfigDict, layout: _Devices) -> None:
    """Raises ConfigError for values that cannot work (before any data is loaded)."""
    devices = layout.num_devices
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        _require(size >= 1, f"{field} must be >= 1, got {size}")
        _require(
            size % devices == 0,
            f"{field}={size} is not divisible by the {devices} devices "
            f"({layout.num_processes} process(es) x {len(layout.local_devices)} local)",
        )
    _require(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}")
    _require(
        config.num_train_steps == -1 or config.num_train_steps >= 1,
        f"num_train_steps must be -1 (num_epochs) or >= 1, got {config.num_train_steps}",
    )
    _require(config.log_every_steps >= 1, "log_every_steps must be >= 1")
    _require(
        config.eval_every_steps >= 0,
        f"eval_every_steps must be >= 0 (0: at the end of each epoch), got "
        f"{config.eval_every_steps}",
    )
    _require(config.checkpoint_max_to_keep >= 1, "checkpoint_max_to_keep must be >= 1")
    _require(
        config.steps_per_dispatch >= 1,
        f"steps_per_dispatch must be >= 1, got {config.steps_per_dispatch}",
    )
    stop = config.stop_after_steps
    _require(stop is None or stop >= 1, f"stop_after_steps must be >= 1, got {stop}")
    _check_optimizer(config.optimizer)
    _check_model(config.model, per_device_batch=config.batch_size // devices)


def _check_optimizer(optimizer: ml_collections.ConfigDict) -> None:
    _require(
        optimizer.name in OPTIMIZERS,
        f"optimizer.name must be one of {OPTIMIZERS}, got {optimizer.name!r}",
    )
    _require(
        optimizer.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {SCHEDULES}, got {optimizer.schedule!r}",
    )
    _require(optimizer.learning_rate > 0, "optimizer.learning_rate must be > 0")
    _require(optimizer.warmup_epochs >= 0, "optimizer.warmup_epochs must be >= 0")
    _require(
        optimizer.weight_decay == 0 or optimizer.name == "adamw",
        "optimizer.weight_decay needs optimizer.name='adamw'",
    )


def _check_model(model: ml_collections.ConfigDict, per_device_batch: int) -> None:
    _require(model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {model.dtype!r}")
    _require(len(model.features) >= 1, "model.features must name at least one convolution")
    # jbn does not check the regularizers' weight: it only sees the functions built from it.
    _require(model.batch_norm_l2 >= 0, "model.batch_norm_l2 must be >= 0")
    try:
        models.batch_norm_options(model)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    # Only the app knows the per-device batch before tracing; jbn checks the batch it is given.
    ghost = model.batch_norm.virtual_batch_size
    _require(
        ghost is None or per_device_batch % ghost == 0,
        f"model.batch_norm.virtual_batch_size={ghost} must divide the per-device batch "
        f"{per_device_batch}",
    )
