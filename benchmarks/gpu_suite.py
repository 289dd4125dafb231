"""One run of a few minutes for an accelerator: jbn vs flax (vs PyTorch where installed) on the
batch-norm ops, the document's train step and the ResNet-18 step, in float32 and bfloat16.

    python benchmarks/gpu_suite.py [--small] [--reps 20]

Each section reuses its CPU benchmark's code: the ops of benchmarks/bn_ops.py (`jbn`,
`flax-fast` = flax's default one-pass variance, `flax-2pass`), the train step of the document's
network of benchmarks/throughput.py (`jbn.BatchNorm` vs `flax.linen.BatchNorm`, Adam, the state
donated) and train/resnet.py's ResNet-18 train and eval steps of benchmarks/resnet.py
(`jbn.linen.BatchNorm` vs `flax.linen.BatchNorm`, SGD). In bfloat16 the inputs (and the models'
`dtype`) are bfloat16; parameters and batch statistics stay float32. PyTorch rows (CUDA when
torch sees a GPU, else its CPU) use `torch.nn.functional.batch_norm` for the ops and the
document's network of benchmarks/throughput.py (channels_last; bfloat16 under autocast) for
the train step; there is no PyTorch ResNet row.

The variants of a section are interleaved (`bn_ops.time_interleaved`: each repetition runs
every variant once) and the table gives median milliseconds per call and the ratio to the
section's flax variant (below 1: faster than flax). `--small` shrinks every shape, for checking
the script on a CPU in a minute or two (on a loaded machine, longer).

Status (2026-12-06): checked with `--small --reps 2 --steps 1` on the 2-core AMD EPYC VM,
CPU only and without torch (so the PyTorch rows are unchecked; a failure there is reported in
one line and skips those rows only); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jbn  # noqa: E402
from benchmarks import bn_ops, throughput  # noqa: E402
from benchmarks import resnet as resnet_benchmark  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# (BN op shape, document's network (batch, H, W, C), ResNet (batch, image, width, blocks)).
FULL = ((256, 32, 32, 64), (256, 32, 32, 3), (128, 32, 64, 2))
SMALL = ((8, 8, 8, 16), (8, 16, 16, 3), (4, 8, 4, 1))


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_timed(torch, fn: Callable[[], Any]) -> Callable[[], None]:
    """`fn` followed by a device synchronization, so that timing it waits for the work."""

    def run() -> None:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run


def bn_op_variants(shape: Sequence[int], dtype: Any) -> dict[str, dict[str, Callable]]:
    """{mode: {variant: zero-argument callable}} for training fwd+bwd and eval fwd."""
    rng = np.random.default_rng(0)
    channels = shape[-1]
    x = jnp.asarray(rng.standard_normal(shape, np.float32) * 2 + 3, dtype)
    r = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    offset = jnp.asarray(rng.standard_normal(channels, np.float32))
    mean = jnp.asarray(rng.standard_normal(channels, np.float32))
    var = jnp.asarray(rng.uniform(0.5, 2, channels).astype(np.float32))
    built = bn_ops.build_variants(shape)
    modes = {
        "train fwd+bwd": {
            name: functools.partial(fn, x, scale, offset, r)
            for name, fn in built["train fwd+bwd"].items()
            if name != "composite"
        },
        "eval fwd": {
            name: functools.partial(fn, x, scale, offset, mean, var)
            for name, fn in built["eval fwd"].items()
            if name != "composite"
        },
    }
    torch = _torch()
    if torch is not None:
        modes_with_torch = _guarded(
            lambda: _torch_op_variants(torch, x, r, scale, offset, mean, var, dtype)
        )
        for mode, fn in modes_with_torch.items():
            modes[mode]["torch"] = fn
    return modes


def _guarded(build: Callable[[], dict]) -> dict:
    """`build()`, or {} with a note when it fails: a PyTorch setup this script could not check
    on a CPU-only machine must not cost the run's other rows."""
    try:
        return build()
    except Exception as error:  # reported, and the run goes on
        print(f"(PyTorch rows skipped: {type(error).__name__}: {error})", flush=True)
        return {}


def _torch_op_variants(torch, x, r, scale, offset, mean, var, dtype) -> dict[str, Callable]:
    """{'train fwd+bwd', 'eval fwd'}: torch.nn.functional.batch_norm on the same data."""
    device = _torch_device(torch)
    tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(device)
    # NHWC data as NCHW channels_last: the same memory layout as jax's.
    torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    as_nchw = lambda a: tensor(a).permute(0, 3, 1, 2).to(torch_dtype)
    tx, tr = as_nchw(x).requires_grad_(), as_nchw(r)
    tscale, toffset = tensor(scale).requires_grad_(), tensor(offset).requires_grad_()
    tmean, tvar = tensor(mean), tensor(var)
    functional = torch.nn.functional

    def train():
        tx.grad = tscale.grad = toffset.grad = None
        y = functional.batch_norm(
            tx, tmean.clone(), tvar.clone(), tscale, toffset, training=True, eps=bn_ops.EPSILON
        )
        (y * tr).sum().backward()

    def evaluate():
        with torch.no_grad():
            functional.batch_norm(
                tx, tmean, tvar, tscale, toffset, training=False, eps=bn_ops.EPSILON
            )

    return {
        "train fwd+bwd": _torch_timed(torch, train),
        "eval fwd": _torch_timed(torch, evaluate),
    }


def document_step_variants(shape: Sequence[int], dtype_name: str, steps: int) -> dict:
    """{variant: callable running `steps` train steps} of the document's network."""
    rng = np.random.default_rng(0)
    batch = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, 10, shape[0]).astype(np.int32)
    configs = {}
    for impl in ("jbn", "flax"):
        config = throughput.default_model_config().copy_and_resolve_references()
        config.batch_norm_impl = impl
        config.dtype = dtype_name
        configs[impl] = config
    variants = {
        name: functools.partial(throughput.jax_variant(config, batch, labels, donate=True), steps)
        for name, config in configs.items()
    }
    torch = _torch()
    if torch is not None:
        variants.update(
            _guarded(
                lambda: {
                    "torch": _torch_document_step(
                        torch, configs["jbn"], batch, labels, dtype_name, steps
                    )
                }
            )
        )
    return variants


def _torch_document_step(torch, config, batch, labels, dtype_name: str, steps: int) -> Callable:
    """`steps` PyTorch train steps of the document's network (channels_last)."""
    setup = throughput.torch_setup(config, batch, labels, torch.channels_last)
    device = _torch_device(torch)
    setup.net.to(device)  # moves the parameters in place: the optimizer keeps them
    setup = setup._replace(images=setup.images.to(device), targets=setup.targets.to(device))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")

    def run_torch():
        with autocast:
            throughput.torch_train_steps(setup, steps)

    return _torch_timed(torch, run_torch)


def resnet_step_variants(batch: int, image: int, width: int, blocks: int, dtype: Any) -> dict:
    """{mode: {variant: callable}} for the ResNet's train and eval steps."""
    images, labels = resnet_benchmark.random_batches(batch, image, 1)[0]
    pairs = {
        name: resnet_benchmark.step_functions(
            batch_norm, images, labels, width, dtype, blocks=blocks
        )
        for name, batch_norm in resnet_benchmark.BATCH_NORMS.items()
    }
    return {
        mode: {name: pair[index] for name, pair in pairs.items()}
        for index, mode in enumerate(("train step", "eval step"))
    }


def rows(
    section: str, dtype_name: str, modes: dict[str, dict[str, Callable]], reps: int, flax: str
) -> list[str]:
    """Table rows of one section: each mode's variants timed interleaved, vs `flax`."""
    lines = []
    for mode, fns in modes.items():
        times = bn_ops.time_interleaved(fns, reps)
        for name, seconds in times.items():
            lines.append(
                f"| {section} | {mode} | {dtype_name} | {name} | {seconds * 1e3:.3f} "
                f"| {seconds / times[flax]:.2f} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes, to test on a CPU")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    parser.add_argument("--steps", type=int, default=4, help="train steps per timed call")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        parser.error("--reps and --steps must be at least 1")
    op_shape, document_shape, (batch, image, width, blocks) = SMALL if args.small else FULL
    device = jax.devices()[0]
    torch = _torch()
    torch_text = "none" if torch is None else f"{torch.__version__} ({_torch_device(torch)})"
    command = " ".join(
        ["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC {device.platform} "
        f"{getattr(device, 'device_kind', '')} (host CPU {throughput.cpu_model()}) "
        f"jax={jax.__version__} jbn={jbn.__version__} torch={torch_text} `{command}`"
    )
    print(
        f"\nBN op {op_shape}, document's network batch {document_shape} ({args.steps} steps per "
        f"call), {resnet_benchmark.model_name(blocks)} width {width} batch {batch} "
        f"{image}x{image}; medians of {args.reps} interleaved calls\n"
    )
    print("| section | mode | dtype | variant | ms | vs flax |")
    print("|---|---|---|---|---|---|")
    for dtype_name, dtype in DTYPES.items():
        sections = (
            ("BN op", bn_op_variants(op_shape, dtype), "flax-fast"),
            (
                "document",
                {"train step": document_step_variants(document_shape, dtype_name, args.steps)},
                "flax",
            ),
            ("ResNet", resnet_step_variants(batch, image, width, blocks, dtype), "flax"),
        )
        for section, modes, flax in sections:
            for line in rows(section, dtype_name, modes, args.reps, flax):
                print(line, flush=True)


if __name__ == "__main__":
    main()
