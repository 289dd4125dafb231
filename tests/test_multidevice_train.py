"""Data parallelism (sharding and pmap) over 4 simulated CPU devices, and two processes.

The 4-device checks run in a subprocess (this file run as a script) whose XLA_FLAGS ask for 4
host devices before JAX starts; it prints its measurements as JSON, asserted on here.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
import train_testing

from configs import smoke
from train import data, models
from train import train as train_lib
from train.devices import PARALLELISMS, OneDevice, Pmap, ShardedJit

NUM_DEVICES = 4


def _max_abs_difference(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _within_round_off(a, b) -> bool:
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _replica_mean(tree):
    """The mean over the leading (device) axis of a pmap-replicated pytree."""
    return jax.tree.map(lambda x: np.mean(np.asarray(x, np.float64), axis=0), tree)


def measure_on_four_devices() -> dict:
    """Runs in the subprocess: three steps per layout against one device, then the loop."""
    assert jax.local_device_count() == NUM_DEVICES, jax.local_devices()
    config = smoke.get_config()
    config.progress_bar = False
    config.batch_size = 128  # 4 devices x 32
    # SGD: Adam divides each update by the gradient's own scale, which turns the round-off
    # noise of a zero gradient (conv biases before batch norm, whose true gradient is 0) into
    # steps of size ~lr; SGD keeps round-off at round-off.
    config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
    dataset = data.load_dataset(config.dataset)
    batches = list(itertools.islice(data.train_batches(dataset, 128, seed=0, epoch=0), 3))
    devices = tuple(jax.local_devices())
    one = OneDevice(devices[:1], 1, 0)
    pmap = Pmap(devices, 1, 0)
    sharding = ShardedJit(devices, 1, 0)

    def three_steps(layout, sync_batch_stats):
        config.model.sync_batch_stats = sync_batch_stats
        model = models.create_model(
            config.model, dataset.num_classes, axis_name=layout.model_axis_name
        )
        schedule = train_lib.create_learning_rate_schedule(config.optimizer, 4, 8)
        tx = train_lib.create_optimizer(config.optimizer, schedule)
        state = train_lib.create_train_state(jax.random.key(0), model, (16, 16, 3), tx)
        state = layout.replicate(state)
        per_device = layout.statistics_rule(sync_batch_stats).per_device_step
        step = layout.compile(
            train_lib.train_step_averaging_statistics if per_device else train_lib.train_step,
            donate_state=False,
            per_device=per_device,
        )
        for batch in batches:
            state, _ = step(state, layout.shard(batch))
        if layout.parallelism == "pmap":  # every replica's state, to check that they agree
            replicas = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(NUM_DEVICES)]
            agree = all(_max_abs_difference(replicas[0].params, r.params) == 0 for r in replicas)
            batch_stats = _replica_mean(state.batch_stats)
        else:  # one global array per leaf: replicated by construction
            agree = layout.parallelism is None or all(
                leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state)
            )
            batch_stats = state.batch_stats
        params = layout.unreplicate(state).params
        return {"params": params, "batch_stats": jax.device_get(batch_stats)}, agree

    reference, _ = three_steps(one, sync_batch_stats=True)
    results = {}
    for name, layout in (("pmap", pmap), ("sharding", sharding)):
        synced, synced_agree = three_steps(layout, sync_batch_stats=True)
        unsynced, _ = three_steps(layout, sync_batch_stats=False)
        results[name] = {
            "synced_params_close": _within_round_off(reference["params"], synced["params"]),
            "synced_stats_close": _within_round_off(
                reference["batch_stats"], synced["batch_stats"]
            ),
            "synced_max_difference": _max_abs_difference(reference, synced),
            "synced_replicas_agree": synced_agree,
            "unsynced_params_close": _within_round_off(reference["params"], unsynced["params"]),
            "unsynced_stats_close": _within_round_off(
                reference["batch_stats"], unsynced["batch_stats"]
            ),
            "unsynced": unsynced,
        }
    # Per-device statistics: both layouts compute the same thing (the moving averages averaged
    # over the devices: at every step under sharding, at the end under pmap).
    unsynced_pmap, unsynced_sharding = (results[k].pop("unsynced") for k in ("pmap", "sharding"))
    results["unsynced_layouts_close"] = _within_round_off(unsynced_pmap, unsynced_sharding)

    # The whole loop on 4 devices (sharding, the default; 4 steps per call): 2 epochs of 4
    # steps, then the same stopped after step 3 and resumed, then without synchronized
    # statistics, then with one step per call, also under pmap. Then a run that
    # moves between layouts at every checkpoint: 1 device, sharding, pmap, 1 device.
    config.num_devices, config.model.sync_batch_stats = -1, True
    with tempfile.TemporaryDirectory() as workdir:
        full = train_lib.train_and_evaluate(config, os.path.join(workdir, "full"))
        config.stop_after_steps = 3
        resumed_dir = os.path.join(workdir, "resumed")
        stopped = train_lib.train_and_evaluate(config, resumed_dir)
        resumed = train_lib.train_and_evaluate(config, resumed_dir)
        config.stop_after_steps = None
        config.model.sync_batch_stats = False
        unsynced_run = train_lib.train_and_evaluate(config, os.path.join(workdir, "unsynced"))
        config.model.sync_batch_stats = True

        # One step per call instead of 4 (scanned over stacked batches): the same run, under
        # sharding and under pmap.
        config.steps_per_dispatch = 1
        single_calls = train_lib.train_and_evaluate(config, os.path.join(workdir, "single"))
        config.parallelism = "pmap"
        pmap_single_calls = train_lib.train_and_evaluate(config, os.path.join(workdir, "p1"))
        config.steps_per_dispatch = 4
        pmap_run = train_lib.train_and_evaluate(config, os.path.join(workdir, "pmap"))
        config.parallelism = "sharding"

        config.num_devices = 1
        one_device = train_lib.train_and_evaluate(config, os.path.join(workdir, "one"))
        travel_dir = os.path.join(workdir, "travel")
        legs = [(1, "sharding", 2), (-1, "sharding", 4), (-1, "pmap", 6), (1, "pmap", None)]
        travelled = []
        for num_devices, parallelism, stop in legs:
            config.num_devices, config.parallelism, config.stop_after_steps = (
                num_devices,
                parallelism,
                stop,
            )
            leg = train_lib.train_and_evaluate(config, travel_dir)
            travelled.append((int(leg.state.step), leg.summary and leg.summary["devices"]))
    results.update(
        loop_devices=full.summary["devices"],
        loop_steps=full.summary["steps"],
        loop_test_examples=full.summary["test_examples"],
        loop_test_accuracy=full.summary["test_accuracy"],
        loop_stopped_at=int(stopped.state.step),
        loop_resumed_from=resumed.summary["resumed_from_step"],
        loop_resume_equal=resumed.summary["state_sha256"] == full.summary["state_sha256"],
        single_calls_equal=single_calls.summary["state_sha256"] == full.summary["state_sha256"],
        pmap_single_calls_equal=(
            pmap_single_calls.summary["state_sha256"] == pmap_run.summary["state_sha256"]
        ),
        unsynced_loop_test_loss=unsynced_run.summary["test_loss"],
        travel_steps=travelled,
        travel_resumed_from=leg.summary["resumed_from_step"],
        travel_close_to_one_device=_within_round_off(
            {"params": one_device.state.params, "stats": one_device.state.batch_stats},
            {"params": leg.state.params, "stats": leg.state.batch_stats},
        ),
        travel_max_difference=_max_abs_difference(one_device.state.params, leg.state.params),
        travel_test_loss_difference=abs(one_device.summary["test_loss"] - leg.summary["test_loss"]),
    )
    return results


def test_sharding_and_pmap_on_four_devices(tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    env = train_testing.fast_jax_env(
        cache_dir,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}",
        PYTHONPATH=str(train_testing.REPO),
    )
    result = subprocess.run(
        [sys.executable, __file__],
        cwd=train_testing.REPO,
        env=env,
        capture_output=True,
        text=True,
        # Several minutes idle; generous, as a loaded machine is many times slower.
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])

    for layout in ("pmap", "sharding"):
        # Synchronized BN: 4 x 32 is one device with 128, to float32 round-off.
        assert measured[layout]["synced_params_close"], measured
        assert measured[layout]["synced_stats_close"], measured
        assert measured[layout]["synced_replicas_agree"]
        # Per-device statistics are a different computation: the check can tell them apart.
        assert not measured[layout]["unsynced_params_close"]
        assert not measured[layout]["unsynced_stats_close"]
    assert measured["unsynced_layouts_close"]

    assert measured["loop_devices"] == NUM_DEVICES and measured["loop_steps"] == 8
    assert measured["loop_test_examples"] == 200  # the padded last eval batch is masked
    assert measured["loop_test_accuracy"] > 0.25  # chance is 0.1
    assert (measured["loop_stopped_at"], measured["loop_resumed_from"]) == (3, 3)
    assert measured["loop_resume_equal"]
    assert measured["single_calls_equal"] and measured["pmap_single_calls_equal"]
    assert np.isfinite(measured["unsynced_loop_test_loss"])

    # 1 device -> sharding on 4 -> pmap on 4 -> 1 device, one checkpoint each: the same run.
    assert measured["travel_steps"] == [[2, None], [4, None], [6, None], [8, 1]]
    assert measured["travel_resumed_from"] == 6
    assert measured["travel_close_to_one_device"], measured
    assert measured["travel_test_loss_difference"] < 1e-3


@pytest.mark.parametrize("parallelism", PARALLELISMS)
def test_two_processes_on_loopback_agree(parallelism, tmp_path, tmp_path_factory):
    """jax.distributed over loopback (Gloo collectives on CPU): both processes end equal."""
    cache_dir = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.multihost_demo",
            f"--workdir={tmp_path}",
            "--config.num_train_steps=4",
            f"--config.parallelism={parallelism}",
        ],
        cwd=train_testing.REPO,
        env=train_testing.fast_jax_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = re.findall(r"^process (\d)/2: step 4, state_sha256 (\w+)$", result.stdout, re.M)
    assert sorted(index for index, _ in reports) == ["0", "1"]
    assert reports[0][1] == reports[1][1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["processes"], summary["devices"], summary["steps"]) == (2, 2, 4)
    assert summary["state_sha256"] == reports[0][1]


def test_two_processes_refuse_a_held_workdir_together(tmp_path, tmp_path_factory):
    """Process 0 cannot lock the workdir: both processes exit 2 at once, neither waits for the
    other in a collective."""
    cache_dir = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    with train_testing.workdir_held_elsewhere(tmp_path) as holder:
        result = subprocess.run(
            [sys.executable, "-m", "train.multihost_demo", f"--workdir={tmp_path}"],
            cwd=train_testing.REPO,
            env=train_testing.fast_jax_env(cache_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "exit statuses [2, 2]" in result.stdout, result.stdout + result.stderr
    assert f"in use by another training run (pid {holder.pid})" in result.stdout
    assert "process 0 of this job could not lock it" in result.stdout


if __name__ == "__main__":
    print(json.dumps(measure_on_four_devices()))
