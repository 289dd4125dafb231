import os
import pathlib
import sys

import pytest

# The float64 reference and the shared setup live in tests/ (reference.py, jbn_testing.py).
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

DEVICES = 4


def pytest_configure(config):
    if f"--xla_force_host_platform_device_count={DEVICES}" not in os.environ.get("XLA_FLAGS", ""):
        raise pytest.UsageError(
            "tests/multidevice needs XLA_FLAGS=--xla_force_host_platform_device_count=4 set "
            "before JAX starts; run it through tests/test_multidevice.py."
        )
