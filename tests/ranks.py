"""Multi-process tests on the CPU: a free port, and ``torch.distributed.run`` of a worker script."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, *scenarios: str, worker: Path = TESTS / "sharded_worker.py", **env_vars: str) -> str:
    """``worker`` on ``world`` processes (one thread each), given the scenario names; every scenario
    must report ``scenario NAME: ok`` and every rank exit 0. The environment is inherited
    (TRITON_INTERPRET included), plus ``env_vars``."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]), **env_vars)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(worker), *scenarios],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"ranks failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    for scenario in scenarios:
        assert f"scenario {scenario}: ok" in done.stdout, done.stdout
    return done.stdout
