"""Shared test helpers: matrices with known spectra, subspace distances, the galore-torch oracle.

Nothing here calls galore_kernels: these are the independent yardsticks the tests measure it with.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Optional

import torch
from torch import Tensor


# --------------------------------------------------------------------------------- generators
def generator(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed, so a failing draw can be reproduced."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


# ------------------------------------------------------------------------ known-spectrum matrices
def haar_orthonormal(m: int, k: int, gen: torch.Generator) -> Tensor:
    """(m, k) float64 with orthonormal columns: Q of the QR of a Gaussian (signs fixed so Q is
    Haar-distributed; they do not matter for any test, but it costs nothing)."""
    Q, R = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))


def known_spectrum(
    m: int, n: int, s: Tensor, gen: torch.Generator, batch: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """G = U diag(s) V^T in float64 with U (m, p), V (n, p) orthonormal, p = len(s) <= min(m, n).

    Returns (G, U, V); with ``batch`` every entry has its own random U and V, shapes get a leading B.
    The singular values of G are ``s`` (and zeros) by construction, to float64 rounding.
    """
    s = s.to(torch.float64)
    if batch is None:
        U = haar_orthonormal(m, len(s), gen)
        V = haar_orthonormal(n, len(s), gen)
        return (U * s) @ V.T, U, V
    parts = [known_spectrum(m, n, s, gen) for _ in range(batch)]
    return tuple(torch.stack([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]


def logspace_spectrum(m: int, n: int, lo_exp: float = -4.0) -> Tensor:
    """Singular values 10^0 .. 10^lo_exp, min(m, n) of them, geometrically spaced (float64)."""
    return torch.logspace(0.0, lo_exp, min(m, n), dtype=torch.float64)


# ------------------------------------------------------------------------------- subspace maths
def as_columns(basis: Tensor, side: str) -> Tensor:
    """A basis as float64 columns: left bases are (.., m, r) already, right ones (.., r, n) rows."""
    basis = basis.to(torch.float64)
    return basis if side == "left" else basis.mT


def projector(columns: Tensor) -> Tensor:
    columns = columns.to(torch.float64)
    return columns @ columns.mT


def projector_distance(A: Tensor, B: Tensor) -> float:
    """max over the batch of ||A A^T - B B^T||_2 for column bases A, B: the sine of the largest
    principal angle between the two spans. Independent of the signs (and any rotation) of the
    basis vectors."""
    diff = projector(A) - projector(B)
    return float(torch.linalg.matrix_norm(diff, ord=2).max())


def orthonormality_error(columns: Tensor) -> float:
    """max |Q^T Q - I| over all entries (and the batch), computed in float64."""
    Q = columns.to(torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return float((Q.mT @ Q - eye).abs().max())


def captured_energy(columns: Tensor, G: Tensor, side: str) -> Tensor:
    """||P^T G||_F^2 (left) or ||G Q^T||_F^2 (right) in float64, per batch entry."""
    P = columns.to(torch.float64)
    G = G.to(torch.float64)
    product = P.mT @ G if side == "left" else G @ P
    return (product * product).sum(dim=(-2, -1))


def max_rel(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max())


# ----------------------------------------------------------------------------- galore-torch 1.0
def galore_torch_adamw():
    """galore-torch 1.0's ``GaLoreAdamW`` (galore_torch.adamw.AdamW) without running its package
    ``__init__``, which imports bitsandbytes."""
    if "galore_torch.adamw" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("galore-torch is not installed")
        if "galore_torch" not in sys.modules:
            pkg = types.ModuleType("galore_torch")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["galore_torch"] = pkg
    from galore_torch.adamw import AdamW

    return AdamW
