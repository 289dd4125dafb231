import os

import pytest

DEVICES = 4


def pytest_configure(config):
    if f"--xla_force_host_platform_device_count={DEVICES}" not in os.environ.get("XLA_FLAGS", ""):
        raise pytest.UsageError(
            "tests/multidevice needs XLA_FLAGS=--xla_force_host_platform_device_count=4 set "
            "before JAX starts; run it through tests/test_multidevice.py."
        )
