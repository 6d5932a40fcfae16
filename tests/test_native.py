"""The native refresh ops through the dispatcher: opcheck, fake kernels, and parity with the reference."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

from galore_kernels import GaLoreAdamW, dispatch, native, top_subspace


def known_spectrum(batch, m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(batch, m, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(batch, n, k, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, -4, k, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


def test_native_library_is_built_and_serves_auto_on_cpu():
    assert native.load() is None, native.load()
    assert dispatch.refresh_backend("auto", torch.device("cpu")).name == "native"


def test_opcheck_orthonormalize():
    for Y in (torch.randn(2, 37, 6), torch.zeros(1, 9, 3)):
        opcheck(torch.ops.galore_kernels.orthonormalize.default, (Y,))


def test_opcheck_randomized_basis():
    G = known_spectrum(2, 41, 29)
    omega = torch.randn(2, 29, 12)
    opcheck(torch.ops.galore_kernels.randomized_basis.default, (G, omega, 5, 1))
    opcheck(torch.ops.galore_kernels.randomized_basis.default, (G.bfloat16(), omega, 5, 0))


def symmetric_batch(batch, n, dtype=torch.float64, seed=0):
    A = torch.randn(batch, n, n + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (A @ A.mT).to(dtype)


def test_opcheck_batched_eigh():
    for C in (symmetric_batch(3, 17), symmetric_batch(1, 5, torch.float32), torch.zeros(2, 4, 4, dtype=torch.float64)):
        opcheck(torch.ops.galore_kernels.batched_eigh.default, (C,))


def test_batched_eigh_on_cpu_is_torch_linalg_eigh_bitwise():
    """The CPU kernel is LAPACK through at::linalg_eigh: the native refresh stays bitwise the reference."""
    C = symmetric_batch(4, 33)
    values, vectors, info = native.batched_eigh_native(C)
    expected_values, expected_vectors = torch.linalg.eigh(C)
    assert torch.equal(values, expected_values) and torch.equal(vectors, expected_vectors)
    assert info.dtype == torch.int32 and info.tolist() == [0] * 4
    # The messages format numbers and dtypes: a _C.so with a second, static copy of the C++ runtime
    # crashed here (the GPU machines' compiler links it statically by default) or dropped the numbers.
    bad_inputs = {r"square matrices \(B, n, n\), got shape \[2, 3, 4\]$": torch.randn(2, 3, 4, dtype=torch.float64),
                  r"float32 or float64, got Half$": torch.randn(2, 3, 3, dtype=torch.float16)}
    for message, bad in bad_inputs.items():
        with pytest.raises(RuntimeError, match=message):
            native.batched_eigh_native(bad)


def test_fake_kernel_traces_under_torch_compile_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.galore_kernels.randomized_basis(torch.empty(3, 50, 40), torch.empty(3, 40, 20), 7, 2)
    assert out.shape == (3, 50, 7) and out.dtype == torch.float32


@pytest.mark.parametrize("side", ["left", "right"])
def test_top_subspace_native_matches_reference_for_the_same_seed(side):
    G = known_spectrum(3, 131, 77)[0]
    bases = {
        name: top_subspace(G, 16, side=side, generator=torch.Generator().manual_seed(4), refresh_backend=name)
        for name in ("native", "reference")
    }
    # Signs are canonical, so the bases themselves (not only their spans) agree.
    torch.testing.assert_close(bases["native"], bases["reference"], rtol=0, atol=1e-5)


def test_optimizer_trajectory_native_vs_reference():
    torch.manual_seed(0)
    start = torch.randn(48, 80)
    params = {name: nn.Parameter(start.clone()) for name in ("native", "reference")}
    opts = {name: GaLoreAdamW([{"params": [p], "rank": 6, "update_proj_gap": 4}], lr=1e-2, refresh_backend=name)
            for name, p in params.items()}
    for _ in range(10):
        g = torch.randn(48, 80)
        for name, p in params.items():
            p.grad = g.clone()
            opts[name].step()
    torch.testing.assert_close(params["native"], params["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("niter", [0, 1, 2])
def test_native_op_is_bitwise_the_reference_on_cpu(niter):
    """Same ATen ops in the same order: the CPU op and the reference agree bit for bit, also on
    the entries where the one-pass power-iteration basis or CholeskyQR2 break down and fall back."""
    from galore_kernels.reference import randomized_basis_reference

    from galore_kernels.reference.refresh import _PIVOT_TOL_FP32, LOCAL_ROWS, _cholesky_qr_pass

    G = known_spectrum(5, 96, 70)
    G[1] = 0.0  # zero gradient
    G[2] = torch.randn(96, 3) @ torch.randn(3, 70)  # rank 3 < k
    G[3, :, 40:] = G[3, :, :30]  # duplicated columns
    # steep spectrum: the sketch's condition number (~1e5) defeats the float32-Gram pass, the
    # float64 pass takes over
    gen = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn(96, 20, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(70, 20, generator=gen, dtype=torch.float64))[0]
    G[4] = ((U * torch.logspace(0, -6, 20, dtype=torch.float64)) @ V.T).float()
    omega = torch.randn(5, 70, 20, generator=torch.Generator().manual_seed(5))
    ok32 = _cholesky_qr_pass(G[4:] @ omega[4:], _PIVOT_TOL_FP32, LOCAL_ROWS, torch.float32)[1]
    assert not bool(ok32.any())
    P_native = torch.ops.galore_kernels.randomized_basis(G, omega, 8, niter)
    P_ref = randomized_basis_reference(G, omega, 8, niter)
    assert torch.equal(P_native, P_ref)
    assert torch.isfinite(P_native).all()
    eye = torch.eye(8, dtype=torch.float64)
    assert (P_native.double().mT @ P_native.double() - eye).abs().amax() < 1e-5
