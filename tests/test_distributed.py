"""JAX's distributed runtime as the entry points start it: two processes × 4 CPU devices on this machine
(gloo collectives), the global device count, and the refusal when the processes' configs differ."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from mtok_jax import config_utils, errors, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"

WORKER = """
import sys
import jax
from mtok_jax import config_utils, sharding
config = config_utils.load_config(sys.argv[1], sys.argv[5:])
sharding.initialize_distributed(config, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
mesh = sharding.make_mesh(config.mesh)
print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
      f"{jax.device_count()} global devices, mesh {dict(mesh.shape)}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(overrides_per_process):
    """Start one worker per entry of `overrides_per_process` → [(returncode, stdout, stderr)]."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    n = len(overrides_per_process)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(DEMO), address, str(n), str(i), *overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, overrides in enumerate(overrides_per_process)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append((p.returncode, stdout, stderr))
    return out


def test_two_processes_see_eight_devices():
    results = _launch([[], []])
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, stderr[-3000:]
        assert f"process {i}/2: 4 local, 8 global devices, mesh {{'data': 8, 'fsdp': 1}}" in stdout, stdout


def test_processes_with_different_configs_are_refused():
    results = _launch([[], ["train.lr=0.001"]])
    for code, _, stderr in results:
        assert code != 0
        assert "the 2 processes disagree on the config: process(es) 1 differ from process 0" in stderr, stderr[-3000:]


def test_explicit_start_needs_all_three_values(monkeypatch):
    for name in sharding.DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    config = config_utils.load_config(DEMO)
    with pytest.raises(errors.UserError, match="--coordinator_address needs --num_processes and --process_id"):
        sharding.initialize_distributed(config, "127.0.0.1:1234", num_processes=2)
    with pytest.raises(errors.UserError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        sharding.initialize_distributed(config, "127.0.0.1:1234", num_processes=2, process_id=2)
    sharding.initialize_distributed(config)  # nothing asks for it: a no-op
    assert sharding.config_digest(config) == sharding.config_digest(config_utils.load_config(DEMO))
    assert sharding.config_digest(config) != sharding.config_digest(config_utils.load_config(DEMO, ["train.lr=1e-3"]))
