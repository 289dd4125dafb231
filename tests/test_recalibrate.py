"""train.recalibrate: Precise BN for a trained run, end to end on configs/smoke.py data.

A short smoke run with decay 0.999 (its moving averages are far from its weights' statistics)
is recalibrated through the CLI's main; the recalibrated checkpoint is checked against the
float64 statistics of the first training batches, its other arrays against the run's, and the
run's own checkpoints against their state before (resume and export keep reading them).
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import reference
import train_testing
from train_testing import smoke_config

from train import checkpoints, data, export, metrics, recalibrate
from train import train as train_lib

pytestmark = pytest.mark.usefixtures("cache_dir")

OVERRIDES = {"model.features": (8, 8, 8, 8), "model.batch_norm.decay": 0.999, "num_train_steps": 32}
BATCHES = 3


@pytest.fixture(scope="module")
def recalibrated_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recalibrated_run")
    train_lib.train_and_evaluate(smoke_config(**OVERRIDES), str(workdir))
    before = {step: _checkpoint_digest(workdir, step) for step in _steps(workdir)}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = recalibrate.main(["--workdir", str(workdir), "--batches", str(BATCHES)])
    assert status == 0
    return workdir, before, stdout.getvalue()


def _steps(workdir) -> list[int]:
    return recalibrate.checkpoint_steps(str(workdir))


def _checkpoint_digest(workdir, step) -> str:
    return export.restore_run(str(workdir), step).state_sha256


def test_recalibrated_statistics_are_those_of_the_first_training_batches(recalibrated_run):
    workdir, _, _ = recalibrated_run
    run = export.restore_run(str(workdir))
    recalibrated = export.restore_run(str(workdir / "recalibrated"))
    # bn1's inputs: the first convolution's outputs on the first BATCHES training batches.
    batches = list(data.train_batches(run.dataset, run.config.batch_size, seed=0, epoch=0))
    conv_outputs = []
    for batch in batches[:BATCHES]:
        _, state = run.model.apply(
            run.variables,
            batch["image"],
            is_training=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, nn.Conv),
        )
        first_conv = min(state["intermediates"])  # conv1
        conv_outputs.append(reference.as64(state["intermediates"][first_conv]["__call__"][0]))
    per_batch = [reference.moments(x, (0, 1, 2), keepdims=False) for x in conv_outputs]
    counts = np.stack([c for _, _, c in per_batch])
    bn1 = recalibrated.variables["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        bn1["moving_mean"], reference.pooled(counts, [m for m, _, _ in per_batch]), rtol=1e-4
    )
    np.testing.assert_allclose(
        bn1["moving_variance"], reference.pooled(counts, [v for _, v, _ in per_batch]), rtol=1e-4
    )
    # Everything but batch_stats (the optimizer state too) as the run saved it.
    for name in ("params", "opt_state"):
        jax.tree.map(
            np.testing.assert_array_equal,
            getattr(recalibrated.train_state, name),
            getattr(run.train_state, name),
        )
    assert recalibrated.step == run.step


def test_the_report_and_the_run_left_as_it_was(recalibrated_run):
    workdir, before, stdout = recalibrated_run
    info = json.loads((workdir / "recalibrated" / "recalibration.json").read_text())
    assert info["batches"] == BATCHES and info["step"] == 32
    assert f"{info['moving_average_test_accuracy']:.4f} with the moving averages" in stdout
    assert f"{info['recalibrated_test_accuracy']:.4f} recalibrated" in stdout
    events = metrics.read_events(str(workdir / metrics.METRICS_FILE))
    run_accuracy = [e["test_accuracy"] for e in events if e["event"] == "eval"][-1]
    assert info["moving_average_test_accuracy"] == pytest.approx(run_accuracy, abs=1e-6)
    # The run's own checkpoints are untouched: resume and export read the training's state.
    assert {step: _checkpoint_digest(workdir, step) for step in _steps(workdir)} == before
    recalibrated = export.restore_run(str(workdir / "recalibrated"))
    assert recalibrated.state_sha256 == info["state_sha256"] != before[32]


def test_recalibrated_directory_exports_with_its_accuracy(recalibrated_run):
    workdir, _, _ = recalibrated_run
    info = json.loads((workdir / "recalibrated" / "recalibration.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main(["--workdir", str(workdir / "recalibrated")]) == 0
    exported = json.loads((workdir / "recalibrated" / "export" / "model.json").read_text())
    assert exported["test_accuracy"] == pytest.approx(info["recalibrated_test_accuracy"])


def test_recalibrating_again_replaces_the_recalibration(recalibrated_run, tmp_path):
    """An older step after a newer one (orbax saves no step below its newest)."""
    workdir = tmp_path / "run"
    shutil.copytree(recalibrated_run[0], workdir)
    (workdir / "recalibrated" / "export").mkdir(exist_ok=True)
    first = json.loads((workdir / "recalibrated" / "recalibration.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        status = recalibrate.main(
            ["--workdir", str(workdir), "--batches", str(BATCHES + 1), "--step", "16"]
        )
    assert status == 0
    again = json.loads((workdir / "recalibrated" / "recalibration.json").read_text())
    assert again["batches"] == BATCHES + 1 and again["state_sha256"] != first["state_sha256"]
    recalibrated = export.restore_run(str(workdir / "recalibrated"))
    assert recalibrated.step == 16 and recalibrated.state_sha256 == again["state_sha256"]
    checkpointer = checkpoints.Checkpointer(str(workdir / "recalibrated" / "checkpoints"))
    assert checkpointer.all_steps() == [16]
    checkpointer.close()
    assert not (workdir / "recalibrated" / "export").exists()  # of the earlier recalibration


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--batches", "0"], "--batches must be at least 1"),
        (["--step", "5"], "no checkpoint of step 5"),
    ],
)
def test_bad_arguments_are_one_error_line(recalibrated_run, capsys, arguments, fragment):
    workdir, _, _ = recalibrated_run
    assert recalibrate.main(["--workdir", str(workdir), *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_cli_without_a_run_is_one_error_line_and_help_exits_0(tmp_path, cache_dir):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "train.recalibrate", *args],
            cwd=train_testing.REPO,
            env=train_testing.fast_jax_env(cache_dir),
            capture_output=True,
            text=True,
            timeout=300,
        )

    completed = run("--workdir", str(tmp_path))
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no trained run in"), completed.stderr
    assert not (tmp_path / "recalibrated").exists()
    help_run = run("--help")
    assert help_run.returncode == 0 and "--batches" in help_run.stdout


def test_benchmark_table_recalibration_removes_the_decays_effect(tmp_path, cache_dir):
    """benchmarks/recalibration.py on synthetic data: the two decays train the same weights
    (training normalizes with batch statistics), so their recalibrated accuracies agree."""
    synthetic = {
        "dataset.name": "'synthetic'",
        "dataset.source": "'synthetic'",
        "dataset.synthetic_train_size": 512,
        "dataset.synthetic_test_size": 200,
        "dataset.synthetic_image_shape": "(16, 16, 3)",
        "model.features": "(8, 8, 8, 8)",
        "batch_size": 32,
        "eval_batch_size": 100,
    }
    results = tmp_path / "recalibration.md"
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/recalibration.py",
            "--epochs=2",
            "--batches=3",
            f"--out={tmp_path}",
            f"--results={results}",
            *(f"--set={field}={value}" for field, value in synthetic.items()),
        ],
        cwd=train_testing.REPO,
        env=train_testing.fast_jax_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = results.read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 0.")]
    table = {(row[0].strip(), row[1].strip()): [float(v) for v in row[3:]] for row in rows}
    assert sorted(table) == [("0.9", "1"), ("0.9", "2"), ("0.999", "1"), ("0.999", "2")]
    for epoch in ("1", "2"):
        assert table[("0.9", epoch)][1:] == table[("0.999", epoch)][1:]
