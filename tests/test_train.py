"""The training loop: learning, records, resume equality, interruption, checkpoints, evaluation.

Runs use configs/smoke.py (tiny synthetic data), with the fast JAX settings of train_testing.
"""

import functools
import json
import os
import pathlib
import shutil
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testing
from train_testing import smoke_config

from configs import default
from train import __main__ as cli
from train import checkpoints, config_checks, data, devices, metrics, models, preemption
from train import train as train_lib

# The train app's fast JAX settings (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("cache_dir")


def assert_trees_equal(a, b):
    """Bitwise equality of two pytrees of arrays (same structure)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def learned_state(state):
    return {"params": state.params, "batch_stats": state.batch_stats, "opt": state.opt_state}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full smoke run (2 epochs of 16 steps), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train_lib.train_and_evaluate(smoke_config(), str(workdir))


def test_smoke_training_learns_and_writes_records(uninterrupted):
    workdir, result = uninterrupted
    assert result.stopped_by is None
    summary = result.summary
    assert summary["steps"] == 32 and summary["epochs"] == 2.0
    assert summary["test_examples"] == 200
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert summary["train_images_per_s"] > 0

    events = metrics.read_events(str(workdir / "metrics.jsonl"))
    train_events = [e for e in events if e["event"] == "train"]
    eval_events = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in eval_events] == [16, 32]
    assert [e["step"] for e in train_events] == list(range(4, 33, 4))
    assert train_events[-1]["loss"] < 0.7 * train_events[0]["loss"]  # the loss falls
    assert eval_events[-1]["test_accuracy"] == summary["test_accuracy"]

    assert json.loads((workdir / "summary.json").read_text()) == summary
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    event_files = list(workdir.glob("events.out.tfevents.*"))
    assert event_files and event_files[0].stat().st_size > 0
    saved_config = json.loads((workdir / "config.json").read_text())
    assert saved_config["dataset"]["name"] == "synthetic"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [16, 32]


def test_resume_after_stops_equals_uninterrupted_run(uninterrupted, tmp_path):
    """Stop mid-epoch 1 (step 5) and mid-epoch 2 (step 21); resuming twice ends bitwise equal."""
    _, reference = uninterrupted
    first = train_lib.train_and_evaluate(smoke_config(stop_after_steps=5), str(tmp_path))
    assert first.stopped_by == "stop_after_steps" and first.summary is None
    assert int(first.state.step) == 5
    assert checkpoints.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 5

    second = train_lib.train_and_evaluate(smoke_config(stop_after_steps=21), str(tmp_path))
    assert second.stopped_by == "stop_after_steps" and int(second.state.step) == 21

    final = train_lib.train_and_evaluate(smoke_config(stop_after_steps=21), str(tmp_path))
    assert final.stopped_by is None
    assert final.summary["resumed_from_step"] == 21
    assert_trees_equal(learned_state(final.state), learned_state(reference.state))
    assert final.summary["state_sha256"] == reference.summary["state_sha256"]
    assert final.summary["test_accuracy"] == reference.summary["test_accuracy"]

    # Records of all three segments read as one run: every step once, in order.
    events = metrics.read_events(str(tmp_path / "metrics.jsonl"))
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 32


def test_steps_per_dispatch_changes_nothing_but_the_calls(tmp_path):
    """One step per call, or 4 (a lax.scan; singles around the logs every 5 steps): bitwise
    the same run, and the same logged means."""
    runs = {}
    for steps_per_dispatch in (1, 4):
        workdir = tmp_path / str(steps_per_dispatch)
        config = smoke_config(steps_per_dispatch=steps_per_dispatch, log_every_steps=5)
        result = train_lib.train_and_evaluate(config, str(workdir))
        logged = [
            (e["step"], e["loss"], e["accuracy"])
            for e in metrics.read_events(str(workdir / "metrics.jsonl"))
            if e["event"] == "train"
        ]
        runs[steps_per_dispatch] = result, logged
    (single, single_logged), (stacked, stacked_logged) = runs[1], runs[4]
    assert_trees_equal(learned_state(stacked.state), learned_state(single.state))
    assert stacked_logged == single_logged
    assert [step for step, _, _ in stacked_logged] == [5, 10, 15, 16, 20, 25, 30, 32]
    assert stacked.summary["train_images_per_s"] > 0


@pytest.mark.parametrize("steps_per_dispatch", [1, 4])
def test_flax_layers_inside_scan_warn(steps_per_dispatch, tmp_path):
    config = smoke_config(steps_per_dispatch=steps_per_dispatch, **{"model.fast_layers": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lib.setup(config, str(tmp_path))
    slow_scan = [w for w in caught if "model.fast_layers=False" in str(w.message)]
    assert len(slow_scan) == (steps_per_dispatch > 1)


def test_eval_every_steps_adds_evaluations_without_changing_training(uninterrupted, tmp_path):
    """Evaluating mid-epoch (every 6 steps of 16-step epochs) leaves training bitwise equal."""
    _, reference = uninterrupted
    result = train_lib.train_and_evaluate(smoke_config(eval_every_steps=6), str(tmp_path))
    assert result.summary["state_sha256"] == reference.summary["state_sha256"]
    events = metrics.read_events(str(tmp_path / "metrics.jsonl"))
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [6, 12, 16, 18, 24, 30, 32]
    seconds = [e["train_seconds"] for e in evals]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert evals[-1]["test_accuracy"] == reference.summary["test_accuracy"]


def test_finished_run_rerun_only_evaluates(uninterrupted, tmp_path):
    workdir, reference = uninterrupted
    again = train_lib.train_and_evaluate(smoke_config(), str(workdir))
    assert again.summary["resumed_from_step"] == 32 and again.summary["steps"] == 32
    assert again.summary["state_sha256"] == reference.summary["state_sha256"]
    assert again.summary["test_loss"] == pytest.approx(reference.summary["test_loss"], rel=1e-6)
    # The timing is the run's that trained, not this evaluation-only relaunch's.
    for key in ("wall_time_s", "train_images_per_s"):
        assert again.summary[key] == reference.summary[key]
    assert json.loads((workdir / "summary.json").read_text()) == again.summary


def test_sigint_saves_and_rerun_resumes_to_the_same_result(tmp_path, cache_dir):
    """A real SIGINT mid-run: clean exit 130 with a checkpoint; the same command then resumes.

    The smoke config with 4x the training data (2 epochs of 64 steps) leaves a window of seconds
    for the signal; the rerun must end bitwise equal to an uninterrupted in-process run.
    """
    workdir = tmp_path / "run"
    overrides = {"dataset.synthetic_train_size": 2048, "log_every_steps": 1}
    command = ["--config=configs/smoke.py", f"--workdir={workdir}", "--config.progress_bar=False"]
    command += [f"--config.{name}={value}" for name, value in overrides.items()]
    interrupted = train_testing.start_cli(*command, cache_dir=cache_dir)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and interrupted.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)
    stdout, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 128 + signal.SIGINT, stderr
    assert "Stopped by SIGINT" in stdout and "Traceback" not in stderr
    stopped_at = checkpoints.Checkpointer(str(workdir / "checkpoints")).latest_step()
    assert 3 <= stopped_at < 128

    resumed = train_testing.run_cli(*command, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 128

    reference = train_lib.train_and_evaluate(smoke_config(**overrides), str(tmp_path / "ref"))
    assert summary["state_sha256"] == reference.summary["state_sha256"]


def test_stop_requests_turn_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequests() as requests:
        assert requests.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.signal_name == "SIGTERM"  # and the process is still alive
        with pytest.raises(KeyboardInterrupt):  # a second signal aborts
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_doubled_sigterm_is_one_request():
    """Two SIGTERMs at once (sent to a launcher and its child, or to the process group) ask to
    stop once; a SIGTERM later than `DUPLICATE_S` after them aborts."""
    with preemption.StopRequests() as requests:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # (uncaught, it would end the pytest session)
            pytest.fail("the second SIGTERM of a pair aborted")
        assert requests.signal_name == "SIGTERM"  # and the process is still alive
        time.sleep(0.1)  # longer than StopRequests.DUPLICATE_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_an_abort_by_sigterm_exits_143(tmp_path, monkeypatch, capsys):
    def train_until_aborted(config, workdir):
        with preemption.StopRequests():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # longer than StopRequests.DUPLICATE_S
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the second signal aborts before this ends

    monkeypatch.setattr(train_lib, "train_and_evaluate", train_until_aborted)
    cli.parse_flags(["train", "--config=configs/smoke.py", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 128 + signal.SIGTERM
    assert "Aborted" in capsys.readouterr().err


@pytest.fixture(scope="module")
def stopped_run_template(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stopped")
    result = train_lib.train_and_evaluate(smoke_config(stop_after_steps=2), str(workdir))
    assert result.stopped_by == "stop_after_steps"
    return workdir


@pytest.fixture
def stopped_run(stopped_run_template, tmp_path):
    """A fresh copy of a workdir with a checkpoint at step 2 of the smoke config."""
    workdir = tmp_path / "run"
    shutil.copytree(stopped_run_template, workdir)
    return workdir


@pytest.mark.parametrize(
    "override,field",
    [
        ({"model.features": (8, 8, 8, 8)}, "model.features"),
        ({"model.use_batch_norm": False}, "model.use_batch_norm"),
        ({"optimizer.learning_rate": 0.01}, "optimizer.learning_rate"),
    ],
)
def test_incompatible_checkpoint_is_refused(stopped_run, override, field):
    with pytest.raises(checkpoints.CheckpointError, match="different config") as error:
        train_lib.train_and_evaluate(smoke_config(**override), str(stopped_run))
    assert field in str(error.value)


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_a_run_saved_before_the_batch_norm_group_resumes(stopped_run, decay):
    """Checkpoints and config.json of the old config format are read in today's names."""
    for old in train_testing.rewrite_in_the_format_before_issue_22(stopped_run):
        assert "decay" in old["model"] and "batch_norm" not in old["model"]
        old["model"]["decay"] = decay
    if decay == 0.9:  # the smoke config's: the same run
        result = train_lib.train_and_evaluate(smoke_config(), str(stopped_run))
        assert result.summary["resumed_from_step"] == 2
    else:  # the old field's difference is named in today's terms
        named = r"model\.batch_norm\.decay: checkpoint 0\.5"
        with pytest.raises(checkpoints.CheckpointError, match=named):
            train_lib.train_and_evaluate(smoke_config(), str(stopped_run))


def test_upgraded_renorm_bounds_act_as_before():
    """The old renorm_rmax clipped r to [1 / rmax, rmax], and no bound acted without renorm."""
    old_model = {"renorm": True, "renorm_rmax": 4.0, "renorm_dmax": 2.0, "decay": 0.9}
    upgraded = checkpoints.upgrade_config({"model": old_model})["model"]["batch_norm"]
    assert upgraded["renorm_clipping"] == {"rmax": 4.0, "rmin": 0.25, "dmax": 2.0}
    assert upgraded["renorm"] and upgraded["decay"] == 0.9
    old_model["renorm"] = False
    upgraded = checkpoints.upgrade_config({"model": old_model})["model"]["batch_norm"]
    assert upgraded["renorm_clipping"] == {"rmax": None, "rmin": None, "dmax": None}


def test_run_control_fields_may_change_on_resume(stopped_run):
    config = smoke_config(eval_batch_size=40, log_every_steps=5, num_epochs=1)
    result = train_lib.train_and_evaluate(config, str(stopped_run))
    assert result.summary["resumed_from_step"] == 2 and result.summary["steps"] == 16


def test_checkpoint_with_other_shapes_is_refused(tmp_path):
    """Same config but arrays of other shapes (e.g. files copied in): named, never reused."""
    config = smoke_config()
    model = models.create_model(config.model, num_classes=10)
    tx = optax.adam(1e-3)
    small = train_lib.create_train_state(jax.random.key(0), model, (16, 16, 3), tx)
    wide = train_lib.create_train_state(
        jax.random.key(0), model.clone(features=(64, 64, 32, 32)), (16, 16, 3), tx
    )
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    checkpointer.save(1, small, config)
    with pytest.raises(checkpoints.CheckpointError, match="does not fit the model") as error:
        checkpointer.restore(1, wide)
    assert "params/conv4/kernel: checkpoint float32[3, 3, 32, 16], model float32[3, 3, 32, 32]" in (
        str(error.value)
    )
    restored = checkpointer.restore(1, small)
    assert_trees_equal(learned_state(restored), learned_state(small))


def test_corrupt_checkpoint_is_refused(stopped_run):
    for path in (stopped_run / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(checkpoints.CheckpointError, match="cannot read"):
        train_lib.train_and_evaluate(smoke_config(), str(stopped_run))


def test_sown_regularization_is_added_to_the_loss():
    """loss = cross-entropy + batch_norm_l2 * sum(beta**2) over every BN layer."""
    config = smoke_config(**{"model.batch_norm_l2": 0.5})
    model = models.create_model(config.model, num_classes=10)
    state = train_lib.create_train_state(jax.random.key(0), model, (16, 16, 3), optax.sgd(0.1))
    # Non-zero betas, so that the penalty is not zero.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, 0.3) if path[-1].key == "beta" else p, state.params
    )
    state = state.replace(params=params)
    batch = {
        "image": np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32),
    }
    _, step_metrics = jax.jit(train_lib.train_step)(state, batch)

    def cross_entropy_only(variables, images):
        logits, _ = model.apply(variables, images, is_training=True, mutable=["batch_stats"])
        return train_lib.cross_entropy(logits, batch["label"]).mean()

    variables = {"params": params, "batch_stats": state.batch_stats}
    cross_entropy = float(jax.jit(cross_entropy_only)(variables, batch["image"]))
    channels = sum(config.model.features) + 10
    penalty = 0.5 * channels * 0.3**2
    assert float(step_metrics["loss"]) - cross_entropy == pytest.approx(penalty, rel=1e-4)


def test_evaluation_counts_every_test_example_once(uninterrupted):
    """Padding is masked: any eval batch size gives the loss and accuracy of a direct pass."""
    _, result = uninterrupted
    config = smoke_config()
    dataset = data.load_dataset(config.dataset)
    layout = devices.device_layout(config)
    state = result.state
    eval_fn = jax.jit(train_lib.eval_step)
    (everything,) = data.eval_batches(dataset, 200)  # one unpadded batch
    assert everything["mask"].all()
    logits = jax.jit(functools.partial(state.apply_fn, is_training=False))(
        {"params": state.params, "batch_stats": state.batch_stats}, everything["image"]
    )
    expected_loss = float(train_lib.cross_entropy(logits, everything["label"]).mean())
    expected_accuracy = float(np.mean(np.argmax(logits, -1) == everything["label"]))
    for eval_batch_size in (64, 200, 7):  # 200 % 64 and 200 % 7 leave padded batches
        config.eval_batch_size = eval_batch_size
        measured = train_lib.evaluate(eval_fn, state, dataset, config, layout)
        assert measured["test_examples"] == 200
        assert measured["test_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
        assert measured["test_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_learning_rate_schedules():
    config = default.get_config().optimizer
    constant = train_lib.create_learning_rate_schedule(config, 10, 100)
    assert float(constant(0)) == float(constant(99)) == pytest.approx(1e-3)

    config.schedule, config.warmup_epochs = "warmup", 2.0
    warmup = train_lib.create_learning_rate_schedule(config, 10, 100)
    assert [float(warmup(s)) for s in (0, 10, 20, 50)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])

    config.schedule = "cosine"
    cosine = train_lib.create_learning_rate_schedule(config, 10, 100)
    # Peak at the end of warmup, half way down at the middle of the decay, zero at the end.
    assert [float(cosine(s)) for s in (20, 60, 100)] == pytest.approx([1e-3, 5e-4, 0], abs=1e-9)


def clipping(**bounds: float) -> dict[str, float]:
    """Overrides of model.batch_norm.renorm_clipping's bounds."""
    return {f"model.batch_norm.renorm_clipping.{key}": bound for key, bound in bounds.items()}


def fake_layout(num_devices: int) -> devices.DeviceLayout:
    device = jax.devices()[0]  # only counted
    return devices.ShardedJit((device,) * num_devices, 1, 0)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"batch_size": 30}, "batch_size=30 is not divisible by the 4 devices"),
        ({"eval_batch_size": 66}, "eval_batch_size=66 is not divisible by the 4 devices"),
        ({"model.batch_norm.virtual_batch_size": 5}, "virtual_batch_size=5 must divide"),
        ({"optimizer.name": "lamb"}, "optimizer.name must be one of"),
        ({"optimizer.weight_decay": 0.1}, "weight_decay needs optimizer.name='adamw'"),
        ({"model.batch_norm.decay": 1.0}, r"model.batch_norm: decay must be in \[0, 1\)"),
        ({"model.batch_norm.epsilon": 0.0}, "model.batch_norm: epsilon must be positive"),
        (
            {"model.batch_norm.renorm": True, **clipping(rmax=0.5, rmin=2.0)},
            r"model.batch_norm: renorm_clipping\['rmin'\] \(2.0\)",
        ),
        (
            {"model.batch_norm.renorm": True, **clipping(rmax=0.0, rmin=float("inf"))},
            r"model.batch_norm: renorm_clipping\['rmin'\] \(inf\)",
        ),
        ({"num_epochs": 0}, "num_epochs must be >= 1"),
        ({"eval_every_steps": -1}, "eval_every_steps must be >= 0"),
        ({"steps_per_dispatch": 0}, "steps_per_dispatch must be >= 1"),
    ],
)
def test_bad_config_values_are_named(override, message):
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.check_config(smoke_config(**override), fake_layout(4))


def test_more_devices_than_present_is_a_config_error():
    with pytest.raises(config_checks.ConfigError, match="num_cpu_devices"):
        devices.device_layout(smoke_config(num_devices=len(jax.local_devices()) + 1))


FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
def test_real_fashion_mnist_learns(tmp_path):
    """The document's network and config on the real data: 200 steps of batch 128."""
    assert FASHION_MNIST.is_dir(), "install the Debian package dataset-fashion-mnist"
    config = default.get_config()
    config.progress_bar = False
    config.dataset.source, config.dataset.data_dir = "local", str(FASHION_MNIST)
    config.num_train_steps = 200
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    summary = result.summary
    assert summary["steps"] == 200 and summary["test_examples"] == 10_000
    assert summary["num_params"] == 62_292  # the document's net on 28x28x1
    assert summary["test_accuracy"] > 0.75, summary  # chance is 0.1
