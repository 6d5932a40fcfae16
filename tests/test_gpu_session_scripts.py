"""The scripts a GPU session runs (benchmarks/gpu_check.sh, gpu_tests.sh, sweep_gemm.py) work before
a session spends its few minutes of device time on them: run here on the CPU, where they must take
their CPU paths (the sweep through Triton's interpreter on tiny shapes, the tests skipping)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ROOT / "benchmarks" / "gpu_tests.sh"


def run(cmd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_tests.sh", "fetch_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    result = run(["bash", "-n", str(ROOT / "benchmarks" / script)])
    assert result.returncode == 0, result.stderr


def test_sweep_dry_run_reports_winners_and_the_prefetch_ab():
    result = run([sys.executable, "benchmarks/sweep_gemm.py"], TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("fastest project:", "fastest back_apply:", "prefetch 1:", "prefetch 0:", ",0,2 "):
        assert line in result.stdout, (line, result.stdout)
    assert "failed" not in result.stdout, result.stdout


@pytest.fixture
def groups(tmp_path):
    """Three test files: one passes, one fails, one sleeps far past any timeout here."""
    files = {"test_pass.py": "def test_ok():\n    assert True\n",
             "test_fail.py": "def test_bad():\n    assert 1 == 2, 'expected failure'\n",
             "test_slow.py": "import time\n\ndef test_slow():\n    time.sleep(120)\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return {name: str(tmp_path / name) for name in files}


def test_gpu_tests_runs_groups_side_by_side_and_reports_the_worst(groups):
    result = run(["bash", str(GPU_TESTS), groups["test_pass.py"], groups["test_fail.py"]], PYTHON=sys.executable)
    assert result.returncode == 1, result.stdout
    assert "pytest group 1 of 2" in result.stdout and "pytest group 2 of 2" in result.stdout
    assert "1 passed" in result.stdout and "1 failed" in result.stdout and "expected failure" in result.stdout


def test_gpu_tests_keeps_partial_logs_when_the_stage_times_out(groups):
    """gpu_check.sh runs it under `timeout`: the groups are stopped, what they printed is kept, the
    status says timeout, and no pytest is left running."""
    marker = groups["test_slow.py"]
    result = run(["timeout", "-k", "5", "8", "bash", str(GPU_TESTS), groups["test_pass.py"], marker],
                 PYTHON=sys.executable)
    assert result.returncode == 124, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "stopped by a signal" in result.stdout
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not left, f"pytest processes left running: {left}"
