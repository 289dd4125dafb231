"""The XLA options the train and eval steps are compiled with (`config.cpu_convolutions`).

XLA:CPU (jax 0.10.2 to 0.12.0.1, at least) runs a convolution in one of two libraries: YNNPACK,
as a "ynn fusion" (its default), or Eigen's spatial convolution. At the document's layer shapes
YNNPACK's convolutions are the slower ones, its kernel gradients most of all (3.9x Eigen's time
for the 64-to-64 layer on an Intel Xeon; `python benchmarks/profile_step.py convolutions`),
while its reductions, which compute batch norm's statistics, are faster than XLA's own loops.
XLA's option `xla_cpu_experimental_ynn_fusion_type` lists the kinds of operations it hands to
YNNPACK; `cpu_convolutions='eigen'` compiles with XLA's default list less the convolutions.
Both compute the same convolutions (to float32 round-off: the summation order differs).

The options go to `jax.jit(..., compiler_options=...)`, so they hold for the steps compiled with
them and nothing else in the process (unlike `XLA_FLAGS`). `jax.pmap` takes no compiler options:
the pmap layout compiles with XLA's defaults.
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

# config.cpu_convolutions: the library that runs convolutions on CPU.
CPU_CONVOLUTIONS = ("eigen", "ynnpack")

YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default list (checked for jax 0.10.2 and 0.12.0.1: the same compiled program as
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution) without
# LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def compiler_options(cpu_convolutions: str, platform: str) -> dict[str, str]:
    """The `compiler_options` for steps compiled for devices of `platform` ('cpu', 'gpu', ...).

    Empty (XLA's defaults) off CPU, for 'ynnpack', and where this jaxlib's XLA does not accept
    the option (with a warning: the steps then run, slower, with YNNPACK's convolutions).

    Raises:
      ValueError: `cpu_convolutions` is not one of CPU_CONVOLUTIONS.
    """
    if cpu_convolutions not in CPU_CONVOLUTIONS:
        raise ValueError(
            f"cpu_convolutions must be one of {CPU_CONVOLUTIONS}, got {cpu_convolutions!r}"
        )
    if platform != "cpu" or cpu_convolutions == "ynnpack":
        return {}
    options = {YNN_FUSION_TYPES: YNN_WITHOUT_CONVOLUTIONS}
    return options if _cpu_accepts(tuple(options.items())) else {}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether XLA:CPU compiles with these options (an option or value it does not know fails)."""
    scalar = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(scalar).compile()
    except jax.errors.JaxRuntimeError as error:
        warnings.warn(
            f"this XLA does not accept the compiler options {dict(options)} "
            f"({str(error).splitlines()[0]}); the steps keep XLA's default convolutions "
            "(YNNPACK), which are slower on CPU",
            stacklevel=3,
        )
        return False
    return True
