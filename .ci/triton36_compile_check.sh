#!/usr/bin/env bash
# Triton 3.6 compile check: the GPU machines have triton 3.6, CI's venv the newest release. This
# compiles every Triton kernel variant the launchers can pick for sm_90 (tests/test_triton_compile.py)
# once more with triton==3.6.0, in its own venv, so an API that 3.6 lacks fails CI, not a GPU session.
#
# Outside the clone, in ${GALORE_TRITON36_HOME:-~/.cache/galore_kernels/triton36}:
#   venv/       torch 2.13.0 (CPU, from this machine's disk), triton 3.6.0, pytest, numpy
#   ok.sha256   inputs of the last successful check: unchanged inputs skip it ("cached")
# Exit 0 with "SKIPPED ..." only when the venv cannot be made (no network for the wheels).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECK_HOME="${GALORE_TRITON36_HOME:-${HOME:-/tmp}/.cache/galore_kernels/triton36}"
VENV="$CHECK_HOME/venv"
STAMP="$CHECK_HOME/ok.sha256"
PYTHON="${PYTHON:-python3}"
PACKAGES=("torch==2.13.0" "triton==3.6.0" "pytest>=8" "numpy")

skip() { echo "SKIPPED triton 3.6 compile check: $*"; exit 0; }
mkdir -p "$CHECK_HOME"
if command -v flock >/dev/null; then exec 9>"$CHECK_HOME/.lock"; flock 9; fi

want="python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') packages=${PACKAGES[*]}"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$want" ]; then
  echo "triton 3.6 compile check: installing ${PACKAGES[*]} into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 || skip "$PYTHON -m venv failed"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PACKAGES[@]}" >"$CHECK_HOME/pip.log" 2>&1; then
    tail -n 15 "$CHECK_HOME/pip.log" >&2
    if grep -Eqi 'NewConnectionError|Name or service not known|Temporary failure|Max retries|unreachable|No matching distribution' "$CHECK_HOME/pip.log"; then
      rm -rf "$VENV"; skip "the wheels could not be installed (no network?): $CHECK_HOME/pip.log"
    fi
    echo "triton 3.6 compile check: FAILED: pip install failed ($CHECK_HOME/pip.log)" >&2; exit 1
  fi
  echo "$want" >"$VENV/.installed"
fi

key="$(cd "$ROOT" && { echo "$want"; sha256sum .ci/triton36_compile_check.sh tests/test_triton_compile.py;
  find galore_kernels -name '*.py' | LC_ALL=C sort | xargs -d '\n' sha256sum; } | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$key" ]; then
  echo "triton 3.6 compile check: OK (cached)"; exit 0
fi
# The package is imported from the clone (its native op is not needed to compile Triton kernels).
(cd "$ROOT" && PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_triton_compile.py) || { echo "triton 3.6 compile check: FAILED" >&2; exit 1; }
echo "$key" >"$STAMP"
echo "triton 3.6 compile check: OK"
