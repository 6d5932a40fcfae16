#!/usr/bin/env bash
# CUDA compile check: builds the native extension (CMakeLists.txt, csrc/) with CUDA for one
# architecture (sm_90) against a CUDA build of torch, on a machine with nvcc but no GPU. It compiles
# refresh_cpu.cpp, refresh_cuda.cu and eigh_cuda.cu, links _C.so, and checks that the CUDA kernels got registered.
# Nothing is run: a compile or link error fails, anything else is the GPU tests' business.
#
# Outside the clone, in ${GALORE_CUDA_CHECK_HOME:-~/.cache/galore_kernels/cuda_check}:
#   venv/       torch (CUDA build, --no-deps) + the one nvidia wheel CMake needs; .installed records them
#   build/      the CMake build directory (reused; wiped when the source directory changes)
#   ok.sha256   inputs of the last successful check: unchanged inputs skip the build ("cached")
#   build.log   the last build's full output
#
# Exit 0 with "SKIPPED cuda compile check: <reason>" only when this machine lacks something no source
# change can fix (nvcc, cmake, a Python venv, the network for the wheels); a compile error always fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECK_HOME="${GALORE_CUDA_CHECK_HOME:-${HOME:-/tmp}/.cache/galore_kernels/cuda_check}"
VENV="$CHECK_HOME/venv"
BUILD="$CHECK_HOME/build"
LOG="$CHECK_HOME/build.log"
STAMP="$CHECK_HOME/ok.sha256"
NVCC="${GALORE_CUDA_CHECK_NVCC:-/usr/local/cuda/bin/nvcc}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.14.1  # a CUDA 13.0 build; pip takes it from this machine's disk (/opt/pypi-more)
ARCH=9.0              # TORCH_CUDA_ARCH_LIST: sm_90 (H100) only
# --no-deps: torch's own requirements (cuDNN, NCCL, cuBLAS, ... several GB) are not needed to
# configure, compile and link. CMake needs libnvrtc (TorchConfig.cmake links ${CUDA_NVRTC_LIB});
# cudart and the CUDA headers come from the toolkit next to nvcc. Versions: torch's METADATA
# (cuda-toolkit[...]==13.0.3 -> nvidia-cuda-nvrtc==13.0.88.*).
# If csrc/ starts including ATen/cuda/CUDAContext.h, that needs the cuSPARSE, cuBLAS and cuSOLVER
# headers: add nvidia-cusparse==12.6.3.3 nvidia-cublas==13.1.1.3 nvidia-cusolver==12.0.4.66 and
# put $SITE/nvidia/cu13/include on the include path (e.g. -DCMAKE_CUDA_FLAGS=-I...).
PACKAGES=("torch==$TORCH_VERSION" "nvidia-cuda-nvrtc==13.0.88")

start=$SECONDS
skip() { echo "SKIPPED cuda compile check: $*"; exit 0; }
fail() { echo "cuda compile check: FAILED: $*" >&2; exit 1; }

# ---- what this machine must have (environment, not source) ----
[ -x "$NVCC" ] || skip "no nvcc at $NVCC"
nvcc_version="$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')" ||
  skip "$NVCC --version failed"
[ -n "$nvcc_version" ] || skip "$NVCC --version printed no release"
[ "${nvcc_version%%.*}" = 13 ] || skip "nvcc $nvcc_version at $NVCC, but torch $TORCH_VERSION is a CUDA 13 build"
command -v cmake >/dev/null || skip "no cmake on PATH"
command -v "$PYTHON" >/dev/null || skip "no $PYTHON on PATH"
command -v nm >/dev/null || skip "no nm (binutils)"

mkdir -p "$CHECK_HOME"
# Two checks sharing this cache (two CI runs on one machine) take turns.
if command -v flock >/dev/null; then
  exec 9>"$CHECK_HOME/.lock"
  flock 9
fi

# ---- the venv: torch + nvrtc, installed once ----
want_installed="python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') packages=${PACKAGES[*]}"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$want_installed" ]; then
  echo "cuda compile check: installing ${PACKAGES[*]} (--no-deps) into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 || skip "$PYTHON -m venv failed (no venv/ensurepip module)"
  pip_log="$CHECK_HOME/pip.log"
  if ! "$VENV/bin/python" -m pip install -q --no-deps --disable-pip-version-check "${PACKAGES[@]}" \
    >"$pip_log" 2>&1; then
    tail -n 15 "$pip_log" >&2
    if grep -Eqi 'NewConnectionError|Name or service not known|Temporary failure in name resolution|Max retries exceeded|Network is unreachable|Connection (refused|reset)|Read timed out|ProxyError' "$pip_log"; then
      rm -rf "$VENV"
      skip "the wheels could not be downloaded (no network?): $pip_log"
    fi
    if grep -Eqi 'No matching distribution|Could not find a version' "$pip_log" &&
      ! "$VENV/bin/python" -c 'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20)' 2>/dev/null; then
      rm -rf "$VENV"
      skip "the wheels are neither on this machine's disk nor reachable on PyPI: $pip_log"
    fi
    fail "pip install ${PACKAGES[*]} failed: $pip_log"
  fi
  echo "$want_installed" >"$VENV/.installed"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" &&
  torch_version="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')" ||
  fail "the venv $VENV is broken: rm -rf $VENV and run again"
nvrtc="$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so.[0-9]* 2>/dev/null | head -n 1)"
[ -n "$nvrtc" ] || fail "no libnvrtc.so.* under $SITE/nvidia (the venv is incomplete: rm -rf $VENV)"

# ---- skip when nothing that goes into the build changed since the last successful check ----
key="$(
  cd "$ROOT"
  {
    echo "$want_installed torch=$torch_version"
    "$NVCC" --version
    cmake --version | head -n 1
    c++ --version 2>/dev/null | head -n 1 || true
    sha256sum .ci/cuda_compile_check.sh CMakeLists.txt  # paths relative to the clone: any clone hits
    find csrc -type f | LC_ALL=C sort | xargs -d '\n' sha256sum
  } | sha256sum | cut -d' ' -f1
)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$key" ]; then
  echo "cuda compile check: OK (sm_90, torch $torch_version, cached)"
  exit 0
fi

# ---- configure + build ----
# The build directory is reused (ninja recompiles only what changed), unless it belongs to another
# source directory (another clone): CMake refuses to switch, so start it afresh.
if [ -f "$BUILD/CMakeCache.txt" ] &&
  ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}\$" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
cuda_root="$(dirname "$(dirname "$NVCC")")"
export PATH="$cuda_root/bin:$PATH" TORCH_CUDA_ARCH_LIST="$ARCH"
# -Wl,--no-undefined: _C.so links against torch, c10 and cudart only; an undefined symbol in it would
# otherwise link fine here and fail only when a GPU machine loads it.
echo "cuda compile check: building $ROOT with CUDA (sm_90) into $BUILD (log: $LOG)"
{
  echo "\$ cmake configure ($(date -u +%FT%TZ))"
  cmake -S "$ROOT" -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$SITE/torch/share/cmake" \
    -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" \
    -DTORCH_CUDA_ARCH_LIST="$ARCH" \
    -DCUDA_nvrtc_LIBRARY="$nvrtc" \
    -DGALORE_KERNELS_WITH_CUDA=ON \
    -DCMAKE_SHARED_LINKER_FLAGS="-Wl,--no-undefined" &&
    echo "\$ cmake --build" &&
    cmake --build "$BUILD" --verbose --parallel "${MAX_JOBS:-$(nproc)}"
} >"$LOG" 2>&1 || {
  echo "---- last lines of $LOG ----" >&2
  # The build's output when it got that far, else CMake's.
  if grep -qx '\$ cmake --build' "$LOG"; then sed -n '/^\$ cmake --build$/,$p' "$LOG" | tail -n 40 >&2
  else tail -n 40 "$LOG" >&2; fi
  echo "----" >&2
  fail "the CUDA build of the native extension failed (see above; full log: $LOG)"
}

# ---- did it really build the CUDA part, for sm_90? ----
grep -q "galore_kernels: .*CUDA kernels: ON" "$LOG" ||
  fail "CMake did not enable the CUDA kernels (expected 'CUDA kernels: ON' in $LOG)"
grep -rqsF "arch=compute_90,code=sm_90" "$BUILD/build.ninja" "$BUILD/CMakeFiles" ||
  fail "no -gencode arch=compute_90,code=sm_90 in the build files under $BUILD"
for obj in refresh_cpu.cpp.o refresh_cuda.cu.o eigh_cuda.cu.o; do
  [ -n "$(find "$BUILD/CMakeFiles" -name "$obj" -print -quit)" ] || fail "$obj was not built (see $LOG)"
done
lib="$BUILD/_C.so"
[ -f "$lib" ] || fail "the build did not produce $lib"
syms="$(nm -C --defined-only "$lib")"
for key_sym in TORCH_LIBRARY_IMPL_static_init_galore_kernels_CPU_ TORCH_LIBRARY_IMPL_static_init_galore_kernels_CUDA_; do
  grep -q "$key_sym" <<<"$syms" || fail "$lib has no $key_sym* symbol: an op registration is missing"
done

echo "$key" >"$STAMP"
echo "cuda compile check: OK (sm_90, torch $torch_version, $((SECONDS - start)) s)"
