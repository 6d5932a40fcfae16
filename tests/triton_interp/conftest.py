"""Kernel-vs-reference tests of the Triton step on the CPU, through Triton's interpreter.

Triton decides at import whether kernels compile or interpret, so these tests run in their own
pytest process with TRITON_INTERPRET=1 set before anything imports Triton (``make test`` does:
the main run ignores this folder, see tests/conftest.py).
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.exit("tests/triton_interp needs TRITON_INTERPRET=1 in the environment of its own pytest run "
                "(make test runs it so): TRITON_INTERPRET=1 python -m pytest tests/triton_interp", returncode=4)
