"""Shared test setup.

Tests under tests/multidevice/ need several simulated CPU devices, which XLA only creates when
XLA_FLAGS is set before JAX is imported; tests/test_multidevice.py runs them in a subprocess.
"""

collect_ignore = ["multidevice"]
