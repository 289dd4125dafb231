"""Device layouts of a run: one device, or data parallelism by a sharded jit or by pmap.

`device_layout(config)` picks the layout `config.num_devices` and `config.parallelism` ask for.
Each layout is a small type behind one interface (`DeviceLayout`): `shard` lays a host batch out
for its devices, `replicate` copies state to them, `local_copy` takes one replica back, and
`compile` compiles the steps of `train/train.py` for them, with the XLA options of
`config.cpu_convolutions` (`train/xla_options.py`). `LocalStatistics` says how each layout
trains with per-device batch statistics (`model.sync_batch_stats=False`). The multi-process
setup those devices may come from is in `train/distributed.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import xla_options
from train.config_checks import ConfigError

# Name of the device axis (pmap's axis, the mesh's axis): pmap and shard_map average gradients
# and synchronize batch statistics over it.
AXIS_NAME = "batch"


class LocalStatistics(NamedTuple):
    """How a layout trains with per-device batch statistics (`model.sync_batch_stats=False`).

    per_device_step: the train step runs on each device's shard (shard_map) and averages the
      moving statistics every step, so the state stays one replicated copy.
    average_for_one_copy: each device keeps its own moving statistics; they are averaged
      whenever one copy is needed (evaluation, checkpoint), as in flax's examples/imagenet.
    """

    per_device_step: bool
    average_for_one_copy: bool


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """How batches and state are spread over devices; one subclass per layout.

    Attributes:
      local_devices: the devices of this process the run uses.
      num_processes: processes of the job (each with its `local_devices`).
      process_index: this process's index.
      compiler_options: (name, value) pairs for `jax.jit(compiler_options=)`
        (xla_options.compiler_options); pmap takes none.
    """

    # config.parallelism's value for this layout (None: one device).
    parallelism: ClassVar[str | None]
    # The axis name the model's batch norm reduces over: only pmap names one.
    model_axis_name: ClassVar[str | None] = None
    # With model.sync_batch_stats=False (one device: nothing to do).
    local_statistics: ClassVar[LocalStatistics] = LocalStatistics(False, False)

    local_devices: tuple[jax.Device, ...]
    num_processes: int
    process_index: int
    compiler_options: tuple[tuple[str, str], ...] = ()

    @property
    def parallel(self) -> bool:
        return self.parallelism is not None

    @property
    def num_devices(self) -> int:
        return len(self.local_devices) * self.num_processes

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    def statistics_rule(self, sync_batch_stats: bool) -> LocalStatistics:
        """How the train step treats batch statistics; synchronized ones need nothing more."""
        return LocalStatistics(False, False) if sync_batch_stats else self.local_statistics

    def shard(self, batch: Mapping[str, np.ndarray], stacked: bool = False) -> dict[str, Any]:
        """A global host batch (the same in every process) laid out for the compiled steps.

        With `stacked`, every array holds several batches along a leading axis (the input of
        `compile(..., stacked=True)`); each batch is split over the devices as a single one is.
        """
        raise NotImplementedError

    def replicate(self, tree: Any) -> Any:
        """A host pytree (the same in every process) copied to every device."""
        raise NotImplementedError

    def local_copy(self, tree: Any) -> Any:
        """One replica of a replicated pytree, on a device of this process (no host copy)."""
        raise NotImplementedError

    def unreplicate(self, tree: Any) -> Any:
        """One host copy (of the first local device's replica)."""
        return jax.device_get(self.local_copy(tree))

    def compile(
        self,
        step: Callable[..., Any],
        donate_state: bool,
        per_device: bool = False,
        stacked: bool = False,
    ) -> Callable[..., Any]:
        """Compiles a `step(state, batch, axis_name=)` function for this layout.

        `donate_state` donates the state's buffers; `per_device` (sharded jit only) runs `step`
        on each device's shard; with `stacked`, `batch` is a stack of batches
        (`shard(..., stacked=True)`), split over the devices along its second axis.
        """
        raise NotImplementedError

    def any_process(self, flag: bool) -> bool:
        """True if `flag` is True in any process (all processes must call this together)."""
        if self.num_processes == 1:
            return flag
        return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))

    def _process_slice(self, x: np.ndarray, axis: int) -> np.ndarray:
        """This process's contiguous share of a global batch whose examples run along `axis`."""
        per_process = x.shape[axis] // self.num_processes
        start = self.process_index * per_process
        return x[(slice(None),) * axis + (slice(start, start + per_process),)]


def _put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host arrays placed with `sharding`, from every process, for devices it cannot address too."""

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


@dataclasses.dataclass(frozen=True)
class OneDevice(DeviceLayout):
    """One device: `jit`, host batches and state used as they are."""

    parallelism: ClassVar[str | None] = None

    def shard(self, batch: Mapping[str, np.ndarray], stacked: bool = False) -> dict[str, Any]:
        return dict(batch)

    def replicate(self, tree: Any) -> Any:
        return tree

    def local_copy(self, tree: Any) -> Any:
        return tree

    def compile(
        self,
        step: Callable[..., Any],
        donate_state: bool,
        per_device: bool = False,
        stacked: bool = False,
    ) -> Callable[..., Any]:
        donate = (0,) if donate_state else ()
        return jax.jit(step, donate_argnums=donate, compiler_options=dict(self.compiler_options))


@dataclasses.dataclass(frozen=True)
class ShardedJit(DeviceLayout):
    """config.parallelism='sharding' (the default with several devices).

    One `jax.jit` over a `Mesh` of the devices of all `num_processes` processes (axis
    AXIS_NAME), the state replicated, the global batch sharded along its leading axis. Each
    process contributes its slice of every global batch (`jax.make_array_from_process_local_data`).
    XLA inserts the collectives: gradients, metrics and batch statistics are those of the global
    batch with `axis_name=None` in the model. Per-device batch statistics need explicit
    collectives, so that step runs under `jax.shard_map` (`compile(..., per_device=True)`) and
    averages the moving statistics every step.
    """

    parallelism: ClassVar[str | None] = "sharding"
    local_statistics: ClassVar[LocalStatistics] = LocalStatistics(
        per_device_step=True, average_for_one_copy=False
    )

    @functools.cached_property
    def mesh(self) -> Mesh:
        """Every device of every process, one axis AXIS_NAME.

        Auto axes: the step's in/out shardings are given and XLA's sharding propagation
        partitions everything in between (tests/multidevice checks jbn on Auto and Explicit
        meshes alike).
        """
        devices = jax.devices() if self.num_processes > 1 else self.local_devices
        return Mesh(np.asarray(devices), (AXIS_NAME,), axis_types=(AxisType.Auto,))

    def _batch_spec(self, stacked: bool) -> P:
        """The batch axis sharded: the leading one, or the second of a stack of batches."""
        return P(None, AXIS_NAME) if stacked else P(AXIS_NAME)

    def shard(self, batch: Mapping[str, np.ndarray], stacked: bool = False) -> dict[str, Any]:
        sharding = NamedSharding(self.mesh, self._batch_spec(stacked))
        batch_axis = 1 if stacked else 0
        return {
            name: jax.make_array_from_process_local_data(
                sharding, self._process_slice(np.asarray(x), batch_axis), np.shape(x)
            )
            for name, x in batch.items()
        }

    def replicate(self, tree: Any) -> Any:
        return _put(tree, NamedSharding(self.mesh, P()))

    def local_copy(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: x.addressable_data(0), tree)

    def compile(
        self,
        step: Callable[..., Any],
        donate_state: bool,
        per_device: bool = False,
        stacked: bool = False,
    ) -> Callable[..., Any]:
        """`jit` with the state replicated and the batch sharded, in and out.

        `step` sees the global batch with `axis_name=None`, or, with `per_device`, runs on each
        device's shard under shard_map with `axis_name=AXIS_NAME` (and must make its outputs
        equal on all devices).
        """
        if per_device:
            # check_vma=False: the step is written as for pmap (its gradients are local and it
            # pmeans them itself). With the check, JAX would already sum the gradient of the
            # replicated parameters over the devices, and the pmean would keep that sum.
            step = jax.shard_map(
                functools.partial(step, axis_name=AXIS_NAME),
                mesh=self.mesh,
                in_specs=(P(), self._batch_spec(stacked)),
                out_specs=P(),
                check_vma=False,
            )
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(
            step,
            in_shardings=(replicated, NamedSharding(self.mesh, self._batch_spec(stacked))),
            out_shardings=replicated,
            donate_argnums=(0,) if donate_state else (),
            compiler_options=dict(self.compiler_options),
        )


@dataclasses.dataclass(frozen=True)
class Pmap(DeviceLayout):
    """config.parallelism='pmap': `pmap` over `local_devices` of each process.

    Each process reshapes its slice of the global batch to (local devices, per-device batch,
    ...), and the model and steps reduce over the pmap axis AXIS_NAME explicitly. Replicated
    state carries a leading axis of one copy per local device, as flax.jax_utils.replicate's.
    """

    parallelism: ClassVar[str | None] = "pmap"
    model_axis_name: ClassVar[str | None] = AXIS_NAME
    local_statistics: ClassVar[LocalStatistics] = LocalStatistics(
        per_device_step=False, average_for_one_copy=True
    )

    def shard(self, batch: Mapping[str, np.ndarray], stacked: bool = False) -> dict[str, Any]:
        batch_axis = 1 if stacked else 0
        local_count = len(self.local_devices)

        def local_shards(x: np.ndarray) -> np.ndarray:
            x = self._process_slice(x, batch_axis)
            per_device = x.shape[batch_axis] // local_count
            x = x.reshape(
                (*x.shape[:batch_axis], local_count, per_device, *x.shape[batch_axis + 1 :])
            )
            return np.moveaxis(x, batch_axis, 0)  # pmap maps over the leading axis

        return {name: local_shards(np.asarray(x)) for name, x in batch.items()}

    def replicate(self, tree: Any) -> Any:
        local_count = len(self.local_devices)
        tree = jax.tree.map(lambda x: np.broadcast_to(x, (local_count, *np.shape(x))), tree)
        return _put(
            tree, NamedSharding(Mesh(np.asarray(self.local_devices), ("local",)), P("local"))
        )

    def local_copy(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: x[0], tree)

    def compile(
        self,
        step: Callable[..., Any],
        donate_state: bool,
        per_device: bool = False,
        stacked: bool = False,
    ) -> Callable[..., Any]:
        """`pmap` with `axis_name=AXIS_NAME`; every step already runs per device."""
        return jax.pmap(
            functools.partial(step, axis_name=AXIS_NAME),
            axis_name=AXIS_NAME,
            devices=self.local_devices if self.num_processes == 1 else None,
            donate_argnums=(0,) if donate_state else (),
        )


# config.parallelism -> the layout of a run with more than one device.
LAYOUTS: dict[str, type[DeviceLayout]] = {"sharding": ShardedJit, "pmap": Pmap}
PARALLELISMS = tuple(LAYOUTS)


def device_layout(config: ml_collections.ConfigDict) -> DeviceLayout:
    """The layout `config.num_devices` and `config.parallelism` ask for, checked."""
    available = jax.local_devices()
    requested = config.num_devices
    num_processes = jax.process_count()
    parallelism = config.get("parallelism", "sharding")
    if parallelism not in PARALLELISMS:
        raise ConfigError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    if requested == -1:
        count = len(available)
    elif requested >= 1:
        count = requested
    else:
        raise ConfigError(f"num_devices must be -1 (all local devices) or >= 1, got {requested}")
    if count > len(available):
        raise ConfigError(
            f"num_devices={requested} but this process has {len(available)} "
            f"{jax.default_backend()} device(s); on CPU, simulate more with "
            f"--config.num_cpu_devices={count}"
        )
    if num_processes > 1 and count != len(available):
        raise ConfigError(
            f"a multi-process job uses all local devices; set num_devices=-1 (got {requested})"
        )
    try:
        options = xla_options.compiler_options(config.cpu_convolutions, available[0].platform)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    layout = LAYOUTS[parallelism] if count > 1 or num_processes > 1 else OneDevice
    return layout(
        local_devices=tuple(available[:count]),
        num_processes=num_processes,
        process_index=jax.process_index(),
        compiler_options=tuple(options.items()),
    )


def mean_float_leaves(tree: Any, axis_name: str) -> Any:
    """Cross-device mean of the floating-point leaves (integer counters are equal anyway)."""
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )
