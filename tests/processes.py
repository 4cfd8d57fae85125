"""Helpers for the tests that start several jaxal processes on 127.0.0.1 (fake CPU devices each)."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list, devices: int) -> subprocess.Popen:
    """`python *argv` from the repository root with `devices` fake CPU devices."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).parents[1])


def finish(processes, timeout=300) -> list[str]:
    """The outputs of `processes`, each of which must exit 0; none is left running."""
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs
