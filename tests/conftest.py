"""Shared test setup.

Tests under tests/multidevice/ need several simulated CPU devices, which XLA only creates when
XLA_FLAGS is set before JAX is imported; tests/test_multidevice.py runs them in a subprocess.
"""

import pytest
import train_testing

collect_ignore = ["multidevice"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The train app's fast JAX settings for a test module, with a compilation cache shared by
    the test session (`pytestmark = pytest.mark.usefixtures("cache_dir")` turns them on)."""
    path = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    with train_testing.fast_jax(path):
        yield path
