"""Faults of hostile users and bad disks, each reproduced: the run loses nothing, hides nothing.

Corrupt checkpoints (flipped bytes, truncated or missing files, stray step directories),
divergence, torn records (empty summary.json, a half-written metrics.jsonl line), other data on
resume, a workdir that cannot be written or that another run holds, a workdir through a symlink,
broken config files, unknown config fields and a second SIGINT while saving.
Runs use configs/smoke.py (tiny synthetic data) with the fast JAX settings of train_testing.
"""

import errno
import gzip
import json
import math
import os
import pathlib
import shutil
import signal
import stat
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing
from train_testing import smoke_config

from configs import default, smoke
from train import __main__ as cli
from train import checkpoints, data, export, metrics, recalibrate, workdirs
from train import train as train_lib

# The train app's fast JAX settings (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("cache_dir")


def strict_json(text: str):
    """json.loads that refuses the non-JSON tokens NaN, Infinity and -Infinity."""

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: pathlib.Path, count: int = 3) -> None:
    """Flips one bit in each of `count` bytes spread over the file: bit rot orbax reads silently."""
    data = bytearray(path.read_bytes())
    for index in range(1, count + 1):
        data[index * len(data) // (count + 1)] ^= 0x40
    path.write_bytes(bytes(data))


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full smoke run (2 epochs of 16 steps)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train_lib.train_and_evaluate(smoke_config(), str(workdir))


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory):
    """A smoke run stopped at step 20: checkpoints at steps 16 (epoch end) and 20."""
    workdir = tmp_path_factory.mktemp("stopped")
    result = train_lib.train_and_evaluate(smoke_config(stop_after_steps=20), str(workdir))
    assert result.stopped_by == "stop_after_steps"
    assert checkpoint_steps(workdir) == [16, 20]
    return workdir


@pytest.fixture
def stopped_run(stopped_template, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_template, workdir)
    return workdir


@pytest.fixture
def finished_run(uninterrupted, tmp_path):
    workdir = tmp_path / "finished"
    shutil.copytree(uninterrupted[0], workdir)
    return workdir


# ----------------------------------------------------------------------------- corrupt checkpoints


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_intact_one(
    stopped_run, uninterrupted, capsys
):
    """Three flipped bytes in step 20's largest data file: reported, step 16 resumed instead.

    The run then ends bitwise equal to an uninterrupted one, and the intact step 16 was never
    rotated out in favour of the corrupt step 20.
    """
    corrupt = stopped_run / "checkpoints" / "20"
    flip_bytes(largest_file(corrupt))
    result = train_lib.train_and_evaluate(smoke_config(), str(stopped_run))
    output = capsys.readouterr().out
    assert f"{corrupt}" in output and "digest" in output, output
    assert "Resuming from" in output and str(stopped_run / "checkpoints" / "16") in output
    assert result.summary["resumed_from_step"] == 16
    assert result.summary["state_sha256"] == uninterrupted[1].summary["state_sha256"]
    assert checkpoint_steps(stopped_run) == [16, 32]
    # The corrupt checkpoint is kept aside for inspection, not deleted.
    assert (stopped_run / "checkpoints.corrupt" / "20").is_dir()


@pytest.mark.parametrize("damage", ["truncated", "missing_manifest", "empty_step_directory"])
def test_unreadable_checkpoints_are_reported_and_skipped(stopped_run, damage, capsys):
    """Each kind of unreadable newest checkpoint is reported by path; the next older is restored."""
    checkpoint_dir = stopped_run / "checkpoints"
    if damage == "truncated":
        bad = checkpoint_dir / "20"
        path = largest_file(bad)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "missing_manifest":
        bad = checkpoint_dir / "20"
        (bad / "state" / "manifest.ocdbt").unlink()
    else:  # a stray directory of a later step: step 20 is still the newest intact one
        bad = checkpoint_dir / "25"
        bad.mkdir()
    expected_step = 20 if damage == "empty_step_directory" else 16
    config = smoke_config()
    checkpointer = checkpoints.Checkpointer(str(checkpoint_dir))
    target = train_lib.create_train_state(
        jax.random.key(0),
        train_lib.models.create_model(config.model, num_classes=10),
        (16, 16, 3),
        train_lib.create_optimizer(config.optimizer, lambda step: 1e-3),
    )
    step, state = checkpointer.restore_latest(target, config, report=print)
    checkpointer.close()
    output = capsys.readouterr().out
    assert step == expected_step and int(state.step) == expected_step
    assert str(bad) in output, output
    assert not bad.exists()  # moved aside, so that a later save of that step is not skipped


def test_truncated_checkpoint_on_the_command_line_is_one_warning(stopped_run, cache_dir):
    """No traceback from orbax's abandoned reads: one warning naming the file, then the resume."""
    path = largest_file(stopped_run / "checkpoints" / "20")
    path.write_bytes(path.read_bytes()[:1000])
    result = train_testing.run_cli(
        "--config=configs/smoke.py",
        f"--workdir={stopped_run}",
        "--config.progress_bar=False",
        "--config.stop_after_steps=21",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    for echo in ("Traceback", "RuntimeError", "never retrieved"):
        assert echo not in result.stderr, result.stderr
    assert f"warning: cannot read checkpoint {stopped_run / 'checkpoints' / '20'}" in result.stdout
    assert "Resuming from" in result.stdout and checkpoint_steps(stopped_run) == [16, 21]


def test_no_intact_checkpoint_stops_with_recovery_advice(stopped_run):
    for step in (16, 20):
        flip_bytes(largest_file(stopped_run / "checkpoints" / str(step)))
    with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint") as error:
        train_lib.train_and_evaluate(smoke_config(), str(stopped_run))
    message = str(error.value)
    assert str(stopped_run / "checkpoints" / "16") in message
    assert str(stopped_run / "checkpoints" / "20") in message
    assert "mv " in message  # how to recover: move the checkpoints away and start over
    assert checkpoint_steps(stopped_run) == [16, 20]  # nothing deleted or moved


def test_restore_verifies_the_digest(stopped_run):
    """The public restore API (used outside the loop) raises CheckpointError for bit rot."""
    config = smoke_config()
    checkpointer = checkpoints.Checkpointer(str(stopped_run / "checkpoints"))
    target = train_lib.create_train_state(
        jax.random.key(0),
        train_lib.models.create_model(config.model, num_classes=10),
        (16, 16, 3),
        train_lib.create_optimizer(config.optimizer, lambda step: 1e-3),
    )
    intact = checkpointer.restore(20, target)
    flip_bytes(largest_file(stopped_run / "checkpoints" / "20"))
    with pytest.raises(checkpoints.CheckpointError, match="digest"):
        checkpointer.restore(20, target)
    assert int(intact.step) == 20
    checkpointer.close()


def test_older_checkpoints_are_deleted_only_after_the_new_one_reads_back_intact(
    tmp_path, monkeypatch
):
    """A save whose read-back does not match (bytes changed on the way to disk) keeps the older
    checkpoint, although max_to_keep=1 would otherwise delete it."""
    config = smoke_config()
    state = {"params": {"w": np.arange(4, dtype=np.float32)}, "step": np.int32(1)}
    checkpointer = checkpoints.Checkpointer(str(tmp_path), max_to_keep=1)
    checkpointer.save(1, state, config)
    real_digest = metrics.tree_sha256
    digests = []

    def digest_then_bit_rot(tree):  # the digest at save is right, the read-back differs
        digests.append(real_digest(tree))
        return digests[-1] if len(digests) == 1 else "0" * 64

    monkeypatch.setattr(metrics, "tree_sha256", digest_then_bit_rot)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="just written"):
        checkpointer.save(2, {**state, "step": np.int32(2)}, config)
    monkeypatch.undo()
    assert checkpointer.all_steps() == [1, 2]
    assert int(checkpointer.restore(1, state)["step"]) == 1
    checkpointer.close()


# ----------------------------------------------------------------------------- divergence


def test_huge_learning_rate_stops_naming_the_step_and_saves_nothing(tmp_path):
    """learning_rate=1e30 diverges at once: stopped at the first log, no NaN anywhere on disk."""
    config = smoke_config(**{"optimizer.learning_rate": 1e30})
    with pytest.raises(train_lib.DivergenceError, match=r"step 4\b") as error:
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert "optimizer.learning_rate" in str(error.value)
    assert not (tmp_path / "checkpoints").exists() or checkpoint_steps(tmp_path) == []
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert records[-1]["step"] == 4 and records[-1]["loss"] is None
    assert not (tmp_path / "summary.json").exists()


def poison_after(step: int):
    """A train_step whose state and loss become NaN once the state's step reaches `step`."""
    real_train_step = train_lib.train_step

    def poisoned(state, batch, axis_name=None):
        new_state, step_metrics = real_train_step(state, batch, axis_name)
        poison = jnp.where(new_state.step >= step, jnp.nan, 1.0)
        params = jax.tree.map(lambda p: p * poison, new_state.params)
        step_metrics = {**step_metrics, "loss": step_metrics["loss"] * poison}
        return new_state.replace(params=params), step_metrics

    return poisoned


@pytest.mark.parametrize(
    "stop_after,diverged_at",
    [(None, 24), (23, 23)],  # found by the loss at the log of step 24; by the state before a save
)
def test_divergence_keeps_the_last_finite_checkpoints(
    stopped_run, monkeypatch, stop_after, diverged_at
):
    monkeypatch.setattr(train_lib, "train_step", poison_after(22))
    config = smoke_config(stop_after_steps=stop_after)
    with pytest.raises(train_lib.DivergenceError, match=rf"step {diverged_at}\b"):
        train_lib.train_and_evaluate(config, str(stopped_run))
    assert checkpoint_steps(stopped_run) == [16, 20]
    for line in (stopped_run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_save_refuses_a_non_finite_state(tmp_path):
    state = {"params": {"w": np.array([1.0, np.inf], np.float32)}, "step": np.int32(3)}
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    with pytest.raises(ValueError, match=r"params/w"):
        checkpointer.save(3, state, smoke_config())
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_records_are_strict_json(tmp_path):
    metrics.write_summary({"test_loss": math.nan, "images": math.inf, "n": 3}, tmp_path / "s.json")
    assert strict_json((tmp_path / "s.json").read_text()) == {
        "test_loss": None,
        "images": None,
        "n": 3,
    }
    writer = metrics.MetricsWriter(str(tmp_path), keep_until_step=0)
    writer.write("train", 1, loss=math.nan, accuracy=0.5)
    writer.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = strict_json(line)
    assert record["loss"] is None and record["accuracy"] == 0.5


# ----------------------------------------------------------------------------- torn records


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Run files and exported files (all written through write_atomically), text and bytes."""
    previous = os.umask(umask)
    try:
        metrics.write_atomically("{}\n", str(tmp_path / "summary.json"))
        metrics.write_atomically(b"\0\1", str(tmp_path / "model.jaxexport"))
    finally:
        os.umask(previous)
    for name in ("summary.json", "model.jaxexport"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(os.listdir(tmp_path)) == ["model.jaxexport", "summary.json"]  # no temporaries


def test_empty_summary_json_does_not_break_a_rerun(finished_run, uninterrupted):
    (finished_run / "summary.json").write_text("")
    again = train_lib.train_and_evaluate(smoke_config(), str(finished_run))
    assert again.summary["state_sha256"] == uninterrupted[1].summary["state_sha256"]
    assert strict_json((finished_run / "summary.json").read_text()) == again.summary


def test_half_written_metrics_line_is_dropped_on_resume(stopped_run):
    path = stopped_run / "metrics.jsonl"
    intact = path.read_text()
    path.write_text(intact + '{"event": "train", "step": 2')  # a write cut short
    assert metrics.read_events(str(path)) == [json.loads(line) for line in intact.splitlines()]
    result = train_lib.train_and_evaluate(smoke_config(), str(stopped_run))
    assert result.summary["steps"] == 32
    events = [strict_json(line) for line in path.read_text().splitlines()]
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == list(range(4, 33, 4))


def test_metrics_rewrite_at_start_up_is_atomic(stopped_run, monkeypatch):
    """Killed while metrics.jsonl is rewritten at start-up: the old history is still there."""
    path = stopped_run / "metrics.jsonl"
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsWriter(str(stopped_run), keep_until_step=16)
    assert path.read_text() == before


# ----------------------------------------------------------------------------- data fingerprint


def write_idx(directory: pathlib.Path, seed: int) -> None:
    """Tiny Fashion-MNIST-layout IDX files (64 train, 20 test images) of random pixels."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, size in (("train", 64), ("t10k", 20)):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = (np.arange(size) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (directory / f"{prefix}-{kind}-ubyte.gz").write_bytes(
                gzip.compress(header + array.tobytes())
            )


def test_resume_with_other_data_is_refused(tmp_path):
    first, second = tmp_path / "data_a", tmp_path / "data_b"
    write_idx(first, seed=1)
    write_idx(second, seed=2)
    overrides = {
        "dataset.name": "fashion_mnist",
        "dataset.source": "local",
        "model.features": (8, 8, 8, 8),
        "num_epochs": 1,
    }
    workdir = str(tmp_path / "run")
    config = smoke_config(**overrides, **{"dataset.data_dir": str(first)}, stop_after_steps=1)
    train_lib.train_and_evaluate(config, workdir)
    with pytest.raises(checkpoints.CheckpointError, match="different data") as error:
        train_lib.train_and_evaluate(
            smoke_config(**overrides, **{"dataset.data_dir": str(second)}), workdir
        )
    assert "dataset.data_dir" in str(error.value)
    # The same data under another path is fine (data_dir may move).
    shutil.copytree(first, tmp_path / "data_copy")
    result = train_lib.train_and_evaluate(
        smoke_config(**overrides, **{"dataset.data_dir": str(tmp_path / "data_copy")}),
        workdir,
    )
    assert result.summary["resumed_from_step"] == 1
    assert result.summary["data_fingerprint"] == data.data_fingerprint(
        data.load_dataset(config.dataset)
    )


# ----------------------------------------------------------------------------- the command line


def test_workdir_that_is_a_file_is_one_error_line(tmp_path, cache_dir):
    workdir = tmp_path / "a_file"
    workdir.write_text("not a directory")
    result = train_testing.run_cli(
        "--config=configs/smoke.py", f"--workdir={workdir}", cache_dir=cache_dir
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir {workdir} is not a directory (it is a file)"
    ], result.stderr


@pytest.mark.parametrize(
    "errno_code,problem",
    [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")],
)
def test_workdir_on_a_read_only_or_full_disk_is_named(tmp_path, monkeypatch, errno_code, problem):
    def cannot_write(*args, **kwargs):
        raise OSError(errno_code, os.strerror(errno_code), str(tmp_path / ".write_test"))

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", cannot_write)
    with pytest.raises(cli.WorkdirError) as error:
        cli.check_workdir(str(tmp_path))
    assert str(tmp_path) in str(error.value) and problem in str(error.value)


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("--config.bogus=1", None),
        ("--config.optimizer.learning_rat=1", "optimizer.learning_rate"),
        ("--config.batchsize=64", "batch_size"),
    ],
)
def test_unknown_config_field_names_it_and_the_closest_ones(cache_dir, override, suggestion):
    result = train_testing.run_cli(
        "--config=configs/smoke.py", "--workdir=/nonexistent", override, cache_dir=cache_dir
    )
    field = override.removeprefix("--config.").split("=")[0]
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert line.startswith(f"error: {field!r} is not a config field"), line
    assert "closest" in line
    if suggestion:
        assert suggestion in line.split("closest")[1]


def test_second_sigint_while_saving_finishes_the_save(stopped_run, monkeypatch):
    """SIGINT twice while the checkpoint of step 32 is written: the first asks to stop, the
    second to abort. The save completes, then the run aborts saying so.
    """
    real_save = checkpoints.Checkpointer.save

    def save_under_signals(self, step, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_under_signals)
    with pytest.raises(KeyboardInterrupt) as error:
        train_lib.train_and_evaluate(smoke_config(), str(stopped_run))
    assert "finished writing the checkpoint of step 32" in str(error.value)
    assert checkpoint_steps(stopped_run)[-1] == 32


# ----------------------------------------------------------------------------- the workdir


def test_a_held_workdir_refuses_another_run_export_and_recalibration_until_its_holder_dies(
    tmp_path, cache_dir, capsys
):
    """A run's lock (here held by a bare process): a second run, an export and a recalibration
    are refused in one line naming the holder's pid, before anything is written; kill -9 frees
    it."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    with train_testing.workdir_held_elsewhere(workdir) as holder:
        second = train_testing.run_cli(
            "--config=configs/smoke.py", f"--workdir={workdir}", cache_dir=cache_dir
        )
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: --workdir {os.path.realpath(workdir)} is in use"), line
        assert f"(pid {holder.pid})" in line
        assert sorted(os.listdir(workdir)) == [workdirs.LOCK_FILE]

        for reader in (export, recalibrate):
            assert reader.main(["--workdir", str(workdir)]) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith("error: ") and f"(pid {holder.pid})" in line, line
    with workdirs.lock(str(workdir)):  # the kernel released the dead holder's lock
        with pytest.raises(workdirs.WorkdirBusy, match=f"pid {os.getpid()}"):
            with workdirs.lock(str(workdir), shared=True):
                pass


def test_a_workdir_through_a_symlink_and_dotdot_is_one_directory(tmp_path):
    """'link/../run' is where the kernel resolves it (beside the link's target), for the CLI's
    resolved --workdir and for every file the run writes, checkpoints included."""
    (tmp_path / "deep" / "target").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "target")
    given, kernels = f"{tmp_path}/link/../run", tmp_path / "deep" / "run"
    cli.parse_flags(["train", "--config=configs/smoke.py", f"--workdir={given}"])
    assert cli._WORKDIR.value == str(kernels)
    train_lib.train_and_evaluate(smoke_config(num_train_steps=1), given)
    assert {"checkpoints", "config.json", "metrics.jsonl", "summary.json"} <= set(
        os.listdir(kernels)
    )
    assert not (tmp_path / "run").exists()  # where abspath's textual '..' would put them


BROKEN_CONFIG_FILES = {
    "raises.py": ("def get_config():\n    raise RuntimeError('no such sweep')\n", "line 2: "),
    "syntax.py": ("def get_config(:\n", "line 1: syntax error"),
    "config.yaml": ("seed: 0\n", "is not a Python file"),
    "partial.py": (
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'seed': 1})\n",
        "lacks fields every run needs: batch_size",
    ),
    "no_return.py": ("def get_config():\n    pass\n", "returned NoneType"),
    "exits.py": ("import sys\n\n\ndef get_config():\n    sys.exit(0)\n", "sys.exit(0)"),
    "missing.py": (None, "does not exist"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIG_FILES))
def test_a_broken_config_file_is_one_error_line_naming_it(tmp_path, capsys, name):
    source, problem = BROKEN_CONFIG_FILES[name]
    path = tmp_path / name
    if source is not None:
        path.write_text(source)
    with pytest.raises(SystemExit) as exited:
        cli.parse_flags(["train", f"--config={path}", f"--workdir={tmp_path / 'run'}"])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: config file {path}") and problem in line, line


def leaf_fields(tree: dict, prefix: str = "") -> dict:
    """{'optimizer.learning_rate': 0.001, ...} of a config's to_dict()."""
    fields = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            fields.update(leaf_fields(value, f"{prefix}{name}."))
        else:
            fields[f"{prefix}{name}"] = value
    return fields


@pytest.mark.parametrize(
    "args,config_module",
    [(["--help"], "default"), (["-h", "--config", "configs/smoke.py"], "smoke")],
)
def test_help_lists_the_flags_and_every_config_field(args, config_module):
    result = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=train_testing.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("config", "workdir", "coordinator_address", "num_processes", "process_id"):
        assert f"  --{flag}: " in result.stdout
    assert "--config.optimizer.learning_rate=3e-3" in result.stdout
    module = {"default": default, "smoke": smoke}[config_module]
    for name, value in leaf_fields(module.get_config().to_dict()).items():
        assert f"\n  {name} = {value!r}\n" in result.stdout, name
    # With each field its comment (configs/default.py's where the file has none).
    assert "learning_rate = 0.001\n      the document's Adam learning rate\n" in result.stdout
