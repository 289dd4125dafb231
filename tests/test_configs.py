"""The config files and the command line: overrides, and clear errors for bad input."""

import importlib
import json

import jax
import optax
import pytest
import train_testing

from configs import default
from train import checkpoints, config_checks, devices, models
from train import train as train_lib

CONFIG_NAMES = ("default", "cifar10", "no_bn", "multi_device", "smoke")


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_valid_on_this_machine(name):
    config = load(name)
    config_checks.check_config(config, devices.device_layout(config))
    # Every config has the fields of the default one (they all derive from it).
    assert set(config.to_dict()) == set(default.get_config().to_dict())


def test_default_is_the_documents_experiment():
    config = default.get_config()
    assert (config.dataset.name, config.dataset.source) == ("fashion_mnist", "auto")
    assert (config.optimizer.name, config.optimizer.learning_rate) == ("adam", 1e-3)
    assert config.batch_size == 128
    assert (config.model.batch_norm.decay, config.model.batch_norm.epsilon) == (0.9, 1e-3)
    assert config.model.use_batch_norm and config.model.relu_on_logits
    assert tuple(config.model.features) == (64, 64, 32, 16)
    assert config.num_devices == 1


def test_variants_change_what_they_say():
    assert load("cifar10").dataset.name == "cifar10" and load("cifar10").dataset.augment
    assert not load("no_bn").model.use_batch_norm
    multi = load("multi_device")
    assert multi.num_devices == -1 and multi.model.sync_batch_stats
    smoke = load("smoke")
    assert smoke.dataset.name == "synthetic" and smoke.num_epochs <= 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "jax-compilation-cache"


def cli_error(cache_dir, *args):
    """Runs the CLI expecting a usage error: exit status 2, one message, no stack trace."""
    result = train_testing.run_cli(*args, cache_dir=cache_dir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error: ")
    return result.stderr


def test_unknown_override_key(cache_dir, tmp_path):
    message = cli_error(
        cache_dir, "--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.optimzer.lr=1"
    )
    assert "optimzer" in message


def test_override_of_the_wrong_type(cache_dir, tmp_path):
    message = cli_error(
        cache_dir, "--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.batch_size=big"
    )
    assert "batch_size" in message and "big" in message


def test_missing_config_file_and_workdir(cache_dir, tmp_path):
    assert "nope.py" in cli_error(cache_dir, "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert "--workdir" in cli_error(cache_dir, "--config=configs/smoke.py")
    assert "--config" in cli_error(cache_dir, f"--workdir={tmp_path}")


def test_batch_not_divisible_by_devices(cache_dir, tmp_path):
    message = cli_error(
        cache_dir,
        "--config=configs/multi_device.py",
        f"--workdir={tmp_path}",
        "--config.num_cpu_devices=4",
        "--config.batch_size=30",
    )
    assert "batch_size=30 is not divisible by the 4 devices" in message


def test_unknown_dataset(cache_dir, tmp_path):
    message = cli_error(
        cache_dir,
        "--config=configs/smoke.py",
        f"--workdir={tmp_path}",
        "--config.dataset.name=svhn",
    )
    assert "svhn" in message


def test_incompatible_checkpoint_from_the_command_line(cache_dir, tmp_path):
    """A checkpoint written by another config stops the run with the differing fields."""
    config = load("smoke")
    model = models.create_model(config.model, num_classes=10)
    with train_testing.fast_jax(cache_dir):
        state = train_lib.create_train_state(
            jax.random.key(0), model, config.dataset.synthetic_image_shape, optax.adam(1e-3)
        )
    checkpoints.Checkpointer(str(tmp_path / "checkpoints")).save(1, state, config)
    message = cli_error(
        cache_dir, "--config=configs/no_bn.py", f"--workdir={tmp_path}", "--config.num_epochs=1"
    )
    assert "different config" in message and "model.use_batch_norm" in message
    assert "dataset.name: checkpoint 'synthetic', now 'fashion_mnist'" in message


def test_config_override_reaches_the_run(cache_dir, tmp_path):
    """Overrides are used and saved with the run: log every 2 steps, stop after 4."""
    result = train_testing.run_cli(
        "--config=configs/smoke.py",
        f"--workdir={tmp_path}",
        "--config.progress_bar=False",
        "--config.log_every_steps=2",
        "--config.num_train_steps=4",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    assert "test_accuracy" in result.stdout  # the summary
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("train", 2), ("train", 4), ("eval", 4)]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["log_every_steps"], saved["num_train_steps"]) == (2, 4)
