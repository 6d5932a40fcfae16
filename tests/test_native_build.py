"""The native extension (csrc/, CMakeLists.txt, built by setup.py into galore_kernels/_C.so).

Checks the build itself and the ops against galore_kernels.reference.refresh, called directly: no
loader, no dispatch. CPU only. Installing with GALORE_KERNELS_BUILD_NATIVE=0 (and running the tests
with it set) skips this file; otherwise a missing library is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import Tensor

import galore_kernels
from galore_kernels import native_build_check
from galore_kernels.reference.refresh import (
    orthonormalize_reference,
    randomized_basis_reference,
)

LIBRARY = Path(galore_kernels.__file__).resolve().with_name("_C.so")
SCHEMAS = {
    "orthonormalize": "galore_kernels::orthonormalize(Tensor Y) -> Tensor",
    "randomized_basis": "galore_kernels::randomized_basis(Tensor G, Tensor omega, int rank, int niter) -> Tensor",
}

if os.environ.get("GALORE_KERNELS_BUILD_NATIVE", "").strip() == "0":
    pytest.skip("GALORE_KERNELS_BUILD_NATIVE=0: the native extension is not built", allow_module_level=True)


def _missing_message() -> str:
    return (
        f"{LIBRARY} does not exist: the native extension was not built. See why with "
        "`.venv/bin/pip install -v --no-build-isolation -e .` or in build/galore_native_build.log; "
        "GALORE_KERNELS_BUILD_NATIVE=1 makes a failed build an install error."
    )


@pytest.fixture(scope="module")
def ops():
    if not LIBRARY.exists():
        pytest.fail(_missing_message())
    # Once per process (galore_kernels.native may have loaded it already): dlopen-ing a second copy
    # of the file, e.g. after a rebuild replaced it, would register the namespace twice and abort.
    if str(LIBRARY) not in torch.ops.loaded_libraries:
        torch.ops.load_library(str(LIBRARY))
    return torch.ops.galore_kernels


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormality_error(Q: Tensor) -> float:  # (B, m, k) -> max |Q^T Q - I|, in float64
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return (Q.mT @ Q - eye).abs().amax().item()


def _projector_distance(A: Tensor, B: Tensor) -> float:  # max over the batch of ||A A^T - B B^T||_F
    A, B = A.double(), B.double()
    return torch.linalg.matrix_norm(A @ A.mT - B @ B.mT).amax().item()


def _known_spectrum(batch: int, m: int, n: int, s: Tensor, seed: int) -> Tensor:
    """(batch, m, n) float64 G = U diag(s) V^T with random orthonormal U, V."""
    g = _gen(seed)
    p = s.numel()
    U = torch.linalg.qr(torch.randn(batch, m, p, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(batch, n, p, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.mT


# ----------------------------------------------------------------------------------- the build
def test_library_built_loads_and_has_the_ops(ops):
    assert LIBRARY.exists(), _missing_message()
    # A plain torch library: no Python bindings, so it does not depend on libtorch_python.
    assert b"libtorch_python" not in LIBRARY.read_bytes(), f"{LIBRARY} links libtorch_python"
    for name, schema in SCHEMAS.items():
        assert hasattr(ops, name), f"torch.ops.galore_kernels.{name} is not registered by {LIBRARY}"
        assert str(getattr(ops, name).default._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"galore_kernels::{name}", "CPU")


def test_library_uses_the_shared_cpp_runtime(ops):
    """A _C.so with a static copy of libstdc++ (a compiler that links it statically by default, as on
    the GPU machines' image) crashed formatting a number into an error message: CMakeLists.txt links
    the libstdc++.so torch uses, and setup.py refuses a library that defines runtime symbols itself."""
    runtime = native_build_check.mapped_libstdcxx()
    if runtime is None or shutil.which("nm") is None:
        pytest.skip("no libstdc++ mapped in this process, or no binutils nm: nothing to compare with")
    own = native_build_check.own_cxx_runtime_symbols(str(LIBRARY), runtime)
    assert not own, f"{LIBRARY} defines {len(own)} symbols of {runtime} itself (a static copy), e.g. {own[:3]}"
    with pytest.raises(RuntimeError, match=r"k = omega.size\(-1\) = 4\), got rank 9$"):
        ops.randomized_basis(torch.randn(1, 8, 6), torch.randn(1, 6, 4), 9, 1)


def test_runtime_check_finds_a_static_copy(tmp_path):
    """native_build_check against a library that does carry a copy: a shared library linked with
    -static-libstdc++ from a search path that holds only libstdc++.a (what the GPU image's compiler
    does by default)."""
    gxx, runtime = shutil.which("g++"), native_build_check.mapped_libstdcxx()
    if gxx is None or runtime is None or shutil.which("nm") is None:
        pytest.skip("needs g++, binutils nm and a mapped libstdc++")
    archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], stdout=subprocess.PIPE, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("this g++ has no libstdc++.a")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libstdc++.a").symlink_to(archive)
    source = tmp_path / "x.cpp"
    source.write_text('#include <sstream>\n#include <string>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n')
    for name, flags in (("static", ["-static-libstdc++", f"-L{tmp_path / 'lib'}"]), ("shared", [])):
        subprocess.run([gxx, "-shared", "-fPIC", "-o", str(tmp_path / f"{name}.so"), str(source), *flags], check=True)
    assert native_build_check.own_cxx_runtime_symbols(str(tmp_path / "static.so"), runtime)
    assert not native_build_check.own_cxx_runtime_symbols(str(tmp_path / "shared.so"), runtime)


# ------------------------------------------------------------------------------ orthonormalize
def test_orthonormalize_matches_reference(ops):
    Y = torch.randn(3, 97, 17, generator=_gen(0))
    Q_native, Q_ref = ops.orthonormalize(Y), orthonormalize_reference(Y)
    assert Q_native.shape == (3, 97, 17) and Q_native.dtype == torch.float32
    assert _orthonormality_error(Q_native) < 1e-6
    assert _orthonormality_error(Q_ref) < 1e-6
    assert _projector_distance(Q_native, Q_ref) < 1e-5
    # Same algorithm, same ATen ops: the bases agree entry for entry, not only as subspaces.
    torch.testing.assert_close(Q_native, Q_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_orthonormalize_accepts_float_dtypes(ops, dtype):
    Y = torch.randn(2, 40, 9, generator=_gen(1)).to(dtype)
    Q = ops.orthonormalize(Y)
    assert Q.dtype == torch.float32 and Q.shape == Y.shape
    assert _orthonormality_error(Q) < 1e-6
    assert _projector_distance(Q, orthonormalize_reference(Y)) < 1e-5


def _hard_batch() -> Tensor:
    """(5, 97, 17) float64: well-conditioned, zero, duplicated columns, rank 5, condition 1e12."""
    g = _gen(2)
    m, k = 97, 17
    Y = torch.randn(5, m, k, generator=g, dtype=torch.float64)
    Y[1] = 0.0
    Y[2, :, 9] = Y[2, :, 3]
    Y[2, :, 16] = Y[2, :, 3]
    Y[3] = torch.randn(m, 5, generator=g, dtype=torch.float64) @ torch.randn(5, k, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    Y[4] = (U * torch.logspace(0, -12, k, dtype=torch.float64)) @ V.mT
    return Y


def test_orthonormalize_degenerate_inputs_give_orthonormal_finite_bases(ops):
    Y = _hard_batch()
    for inp in (Y, Y.float()):
        Q = ops.orthonormalize(inp)
        assert torch.isfinite(Q).all()
        for b in range(Y.shape[0]):
            assert _orthonormality_error(Q[b : b + 1]) < 1e-6, f"batch entry {b} is not orthonormal"
        # Every basis contains its Y's column space: (I - Q Q^T) Y is small against ||Y||.
        Qd, Yd = Q.double(), inp.double()
        resid = torch.linalg.matrix_norm(Yd - Qd @ (Qd.mT @ Yd))
        assert (resid <= 1e-5 * torch.linalg.matrix_norm(Yd) + 1e-30).all(), resid
        # Full-rank entries (0 and the ill-conditioned 4) have a unique span: the reference's.
        Q_ref = orthonormalize_reference(inp)
        assert _projector_distance(Q[[0, 4]], Q_ref[[0, 4]]) < 1e-5


# ---------------------------------------------------------------------------- randomized_basis
@pytest.mark.parametrize("rank", [8, 16])
def test_randomized_basis_matches_reference(ops, rank):
    B, m, n, p, niter = 2, 131, 77, 8, 2
    s = torch.logspace(0, -4, min(m, n), dtype=torch.float64)
    G = _known_spectrum(B, m, n, s, seed=3 + rank).float()
    omega = torch.randn(B, n, rank + p, generator=_gen(4 + rank))
    P_native = ops.randomized_basis(G, omega, rank, niter)
    P_ref = randomized_basis_reference(G, omega, rank, niter)
    assert P_native.shape == (B, m, rank) and P_native.dtype == torch.float32
    assert _orthonormality_error(P_native) < 1e-5
    assert _projector_distance(P_native, P_ref) < 1e-5
    # And it is a good top-rank subspace: captured energy against the exact top-rank spectrum.
    energy = torch.linalg.matrix_norm(P_native.double().mT @ G.double()) ** 2 / (s[:rank] ** 2).sum()
    assert (energy > 0.99).all(), energy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_randomized_basis_accepts_half_precision_G(ops, dtype):
    B, m, n, rank, k = 2, 131, 77, 8, 16
    s = torch.logspace(0, -4, min(m, n), dtype=torch.float64)
    G = _known_spectrum(B, m, n, s, seed=7).to(dtype)
    omega = torch.randn(B, n, k, generator=_gen(8))
    P_native = ops.randomized_basis(G, omega, rank, 1)
    assert P_native.shape == (B, m, rank) and P_native.dtype == torch.float32
    assert _projector_distance(P_native, randomized_basis_reference(G, omega, rank, 1)) < 1e-5


def test_randomized_basis_wide_and_no_power_iterations(ops):
    G = torch.randn(3, 45, 120, generator=_gen(9))
    omega = torch.randn(3, 120, 12, generator=_gen(10))
    for niter in (0, 1):
        P_native = ops.randomized_basis(G, omega, 12, niter)  # rank == k is allowed
        assert _projector_distance(P_native, randomized_basis_reference(G, omega, 12, niter)) < 1e-5


# --------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_readable_errors(ops):
    G = torch.randn(2, 30, 20, generator=_gen(11))
    omega = torch.randn(2, 20, 6, generator=_gen(12))
    cases = [
        ((G[0], omega, 4, 1), r"G must be 3-D \(B, m, n\), got a 2-D tensor"),
        ((G, omega[0], 4, 1), r"omega must be 3-D \(B, n, k\)"),
        ((G, omega, 7, 1), r"need 1 <= rank <= k \(k = omega.size\(-1\) = 6\), got rank 7"),
        ((G, omega, 0, 1), r"need 1 <= rank <= k"),
        ((G, torch.randn(2, 20, 25), 4, 1), r"need k <= min\(m, n\)"),
        ((G, omega[:1], 4, 1), r"batch sizes differ"),
        ((G, torch.randn(2, 21, 6), 4, 1), r"omega must be \(B, n, k\) with n = 20"),
        ((G, omega.to(torch.int32), 4, 1), r"omega must be a floating-point tensor"),
        ((G.to(torch.int64), omega, 4, 1), r"G must be a floating-point tensor"),
        ((G, omega, 4, -1), r"niter must be >= 0"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=r"galore_kernels::randomized_basis: " + message):
            ops.randomized_basis(*args)
    for Y, message in [
        (torch.randn(30, 6), r"Y must be 3-D \(B, m, k\)"),
        (torch.randn(2, 6, 30), r"Y \(B, m, k\) needs 1 <= k <= m"),
        (torch.randn(2, 30, 6).to(torch.complex64), r"Y must be a real floating-point tensor"),
    ]:
        with pytest.raises(RuntimeError, match=r"galore_kernels::orthonormalize: " + message):
            ops.orthonormalize(Y)
