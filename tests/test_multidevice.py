"""Runs tests/multidevice in a subprocess with 4 simulated CPU devices."""

import os
import pathlib
import subprocess
import sys


def test_multidevice_suite():
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-q",
            "-p",
            "no:cacheprovider",
            str(here / "multidevice"),
        ],
        env=env,
        capture_output=True,
        text=True,
        # About 4 minutes on an idle 2-core machine; generous, as a loaded one is far slower.
        timeout=1800,
        cwd=here.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    print(result.stdout)
    assert " passed" in result.stdout and " failed" not in result.stdout
