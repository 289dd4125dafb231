"""Helpers shared by the tests of train/: fast JAX settings and running the CLI.

Two settings keep training tests fast on a small CPU without changing what they test:

* Parameters are initialized from 'rbg' keys: the network's threefry initialization takes
  several seconds to compile on CPU, rbg about one, and no test depends on how the initial
  values were drawn (runs compared with each other use the same keys).
* JAX's persistent compilation cache: every run builds a new optax chain, which jit sees as a
  new static argument and retraces; the cache turns the recompilation of the identical program
  into a load, in the test process and in CLI subprocesses alike.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from configs import smoke

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py without a progress bar, with `overrides` ('a.b': value) applied."""
    config = smoke.get_config()
    config.progress_bar = False
    config.update_from_flattened_dict(overrides)
    return config


@contextlib.contextmanager
def fast_jax(cache_dir: pathlib.Path) -> Iterator[None]:
    """rbg initialization and a persistent compilation cache in `cache_dir`, in this process."""
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()  # set up once per process, maybe before this
    try:
        with jax.default_prng_impl("rbg"):
            yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        compilation_cache.reset_cache()


def fast_jax_env(cache_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess with the same settings as `fast_jax`."""
    return {
        **os.environ,
        "JAX_DEFAULT_PRNG_IMPL": "rbg",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **extra,
    }


def start_cli(*args: str, cache_dir: pathlib.Path, **extra_env: str) -> subprocess.Popen:
    """Starts `python -m train *args` in the repository root, capturing text output."""
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=fast_jax_env(cache_dir, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(
    *args: str, cache_dir: pathlib.Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    process = start_cli(*args, cache_dir=cache_dir)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from train import workdirs
    with workdirs.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(300)
    """
)


@contextlib.contextmanager
def workdir_held_elsewhere(workdir: pathlib.Path) -> Iterator[subprocess.Popen]:
    """`workdir` locked as a run locks it (train/workdirs.py), by a bare Python process, for the
    block; the process is then killed with SIGKILL (no handler, no cleanup)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def rewrite_in_the_format_before_issue_22(workdir: pathlib.Path) -> Iterator[dict]:
    """Rewrites a run's saved configs (config.json, each checkpoint's) as the app wrote them
    before model.batch_norm: jbn's arguments as `model` fields, renorm_rmax/renorm_dmax for the
    clipping bounds (rmin implied as 1 / renorm_rmax). Yields each old config before it is
    written, so that the caller may edit it."""
    saved = [workdir / "config.json"] + [
        path
        for path in sorted((workdir / "checkpoints").rglob("*"))
        if path.is_file()
        and path.read_bytes().startswith(b'{"')
        and b'"model"' in path.read_bytes()
    ]
    assert len(saved) >= 2, saved  # config.json and at least one checkpoint's
    for path in saved:
        old = json.loads(path.read_text())
        batch_norm = old["model"].pop("batch_norm")
        clipping = batch_norm.pop("renorm_clipping")
        old["model"].update(batch_norm, renorm_rmax=clipping["rmax"], renorm_dmax=clipping["dmax"])
        yield old
        path.write_text(json.dumps(old))
