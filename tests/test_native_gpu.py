"""The native refresh op on a GPU (skipped without one): captured energy at the issue's shapes,
the same subspace as the PyTorch reference for a seed, batches, breakdown inputs, 16-bit input.

Run by benchmarks/gpu_check.sh. The CPU op is tested in CI (tests/test_native.py,
tests/test_subspace.py). GALORE_NATIVE_TEST_DEVICE=cpu runs this file on the CPU at smaller shapes
(a dry run of the test code itself).
"""
import os

import pytest
import torch

from galore_kernels import top_subspace
from helpers import as_columns, captured_energy, orthonormality_error, projector_distance

DEVICE = torch.device(os.environ.get("GALORE_NATIVE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = DEVICE.type == "cuda"
# The shapes on a GPU; a dry run on the CPU keeps them small.
ENERGY_SHAPES = ([(2048, 2048, 128), (4096, 4096, 512), (1024, 2736, 256)] if GPU
                 else [(256, 256, 16), (200, 420, 32)])
ENERGY_BAR = 0.99


def device_spectrum(m: int, n: int, s: torch.Tensor, seed: int, batch=None) -> torch.Tensor:
    """float64 G = U diag(s) V^T built on the device (a 4096x4096 QR on the host takes seconds)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    lead = () if batch is None else (batch,)
    k = len(s)
    U = torch.linalg.qr(torch.randn(*lead, m, k, generator=gen, device=DEVICE, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*lead, n, k, generator=gen, device=DEVICE, dtype=torch.float64))[0]
    return (U * s.to(DEVICE)) @ V.mT


def basis(G, r, side, seed, backend="native"):
    gen = torch.Generator(device=G.device).manual_seed(seed)
    return top_subspace(G, r, side=side, generator=gen, refresh_backend=backend)


def check_orthonormal(P, side):
    cols = as_columns(P, side)
    assert torch.isfinite(cols).all() and orthonormality_error(cols.cpu()) < 1e-4
    return cols


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("m, n, r", ENERGY_SHAPES)
def test_energy_on_log_spectrum(m, n, r, side):
    s = torch.logspace(0, -4, min(m, n), dtype=torch.float64)
    G = device_spectrum(m, n, s, seed=m + r).float()
    cols = check_orthonormal(basis(G, r, side, seed=1), side)
    energy = float(captured_energy(cols, G, side)) / float((s[:r] ** 2).sum())
    assert ENERGY_BAR <= energy <= 1 + 1e-5, energy


def eigh_errors(C: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> tuple[float, float, float]:
    """(eigenvalue error, loss of orthonormality, residual ||C V - V diag(lam)||), each relative to the
    largest eigenvalue and measured in float64, of one solution of the symmetric batch C."""
    expected = torch.linalg.eigh(C.double())[0]
    scale = expected.abs().amax(-1, keepdim=True)
    V = vectors.double()
    eye = torch.eye(C.shape[-1], device=C.device, dtype=torch.float64)
    value_error = float(((values.double() - expected).abs() / scale).max())
    orthonormality = float((V.mT @ V - eye).abs().max())
    residual = (C.double() @ V - V * values.double().unsqueeze(-2)).norm(dim=(-2, -1)) / scale.squeeze(-1)
    return value_error, orthonormality, float(residual.max())


# float64: 1e-10 of the largest eigenvalue. float32: within CONTROL_FACTOR of what torch.linalg.eigh
# itself achieves at float32 on the same matrices (its syevd is the control), or 1e-5, whichever is larger.
EIGH_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CONTROL_FACTOR = 4.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, n", [(1, 40), (6, 33), (5, 384), (2, 768)])
@pytest.mark.parametrize("solver", ["auto", "batched", "torch"])
def test_batched_eigh_matches_linalg_eigh(batch, n, dtype, solver, monkeypatch):
    """The refresh's small eigenproblems (GALORE_KERNELS_EIGH: cuSOLVER's batched solver or
    torch.linalg.eigh) on Grams as the refresh makes them (a graded spectrum over many orders of
    magnitude): eigenvalues, orthonormality and residual as good as torch.linalg.eigh's at the same
    precision; with "torch", torch.linalg.eigh's own result."""
    from galore_kernels.native import batched_eigh_native

    monkeypatch.setenv("GALORE_KERNELS_EIGH", solver)
    gen = torch.Generator(device=DEVICE).manual_seed(n + batch)
    Y = torch.randn(batch, 2 * n, n, generator=gen, device=DEVICE, dtype=torch.float64)
    Y = Y * torch.logspace(0, -3, n, device=DEVICE, dtype=torch.float64)  # graded columns
    C = (Y.mT @ Y).to(dtype)
    values, vectors, info = batched_eigh_native(C)
    assert info.tolist() == [0] * batch
    control_values, control_vectors = torch.linalg.eigh(C)
    if solver == "torch":
        assert torch.equal(values, control_values) and torch.equal(vectors, control_vectors)
    errors = eigh_errors(C, values, vectors)
    control = eigh_errors(C, control_values, control_vectors)
    for name, error, control_error in zip(("eigenvalues", "orthonormality", "residual"), errors, control):
        assert error <= max(EIGH_TOL[dtype], CONTROL_FACTOR * control_error), (name, error, control_error)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_five_clears_the_bar_for_every_entry(side):
    m, n, r = (515, 1031, 64)
    s = torch.logspace(0, -4, min(m, n), dtype=torch.float64)
    G = device_spectrum(m, n, s, seed=5, batch=5).float()
    batched = basis(G, r, side, seed=2)
    cols = check_orthonormal(batched, side)
    energy = captured_energy(cols, G, side) / float((s[:r] ** 2).sum())
    assert bool((energy >= ENERGY_BAR).all()) and bool((energy <= 1 + 1e-5).all()), energy


@pytest.mark.parametrize("side", ["left", "right"])
def test_native_and_reference_find_the_same_subspace(side):
    m, n, r = 1000, 1500, 48
    s = torch.cat([torch.linspace(1.0, 0.5, r, dtype=torch.float64), torch.full((m - r,), 1e-3, dtype=torch.float64)])
    G = device_spectrum(m, n, s, seed=9).float()
    native = as_columns(basis(G, r, side, seed=3), side).cpu()
    reference = as_columns(basis(G, r, side, seed=3, backend="reference"), side).cpu()
    # A gap of 500x at r: both must find the top-r space, so the largest principal angle is tiny.
    assert projector_distance(native, reference) < 1e-4


def _cases(m, n):
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    base = torch.randn(m, 5, generator=gen, device=DEVICE)
    rank3 = device_spectrum(m, n, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), seed=6).float()
    return {"zeros": torch.zeros(m, n, device=DEVICE), "rank3": rank3,
            "duplicated-columns": base[:, torch.arange(n, device=DEVICE) % 5].contiguous()}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", ["zeros", "rank3", "duplicated-columns"])
def test_breakdown_inputs_give_orthonormal_finite_bases(case, side):
    G = _cases(300, 200)[case]
    cols = check_orthonormal(basis(G, 16, side, seed=7), side)
    if case != "zeros":  # the whole range of G is inside the basis
        total = float((G.double() ** 2).sum())
        assert float(captured_energy(cols, G, side)) / total > 1 - 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_are_accepted(dtype):
    m, n, r = 512, 768, 32
    s = torch.logspace(0, -4, m, dtype=torch.float64)
    G = device_spectrum(m, n, s, seed=8)
    cols = check_orthonormal(basis(G.to(dtype), r, "left", seed=4), "left")
    energy = float(captured_energy(cols, G, "left")) / float((s[:r] ** 2).sum())
    assert energy >= 0.98, energy  # the 16-bit rounding of G itself costs a little
