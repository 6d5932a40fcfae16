"""Pure-PyTorch reference of the randomized subspace refresh (DESIGN.md "Randomized subspace refresh").

This is what the native ops are checked against and what runs when they are not built. Everything is
batched over leading dimensions: ``G`` is ``(..., m, n)`` and the result ``(..., m, r)``.

    Y = G @ Omega;  Q = orth(Y)
    repeat niter times:  Z = orth(G^T Q);  Q = orth(G Z)
    B = Q^T G;  B B^T = U diag(lam) U^T;  P = Q @ U[:, top r]

Gram matrices, Cholesky factors and the small ``k x k`` eigenproblem are float64: they are tiny, and
float64 keeps CholeskyQR2 stable up to a sketch condition number of about 1e8 (float32 would stop near
1e3). The big products with ``G`` stay in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

# After orthonormalisation, ||Q^T Q - I||_max above this means the factorisation broke down.
_ORTHONORMAL_TOL = 1e-6


def randomized_basis_reference(
    G: Tensor,  # (..., m, n), any float dtype
    omega: Tensor,  # (..., n, k) Gaussian sketch, k >= rank
    rank: int,
    niter: int,
) -> Tensor:  # (..., m, rank) float32, orthonormal columns spanning G's top-rank left subspace
    G = G.float()
    Gt = G.mT
    Q = orthonormalize_reference(G @ omega.float())
    for _ in range(niter):
        Z = orthonormalize_reference(Gt @ Q)
        Q = orthonormalize_reference(G @ Z)
    B = (Q.mT @ G).double()  # (..., k, n)
    _, U = torch.linalg.eigh(B @ B.mT)  # eigenvalues ascending
    top = U[..., :, -rank:].flip(-1)  # (..., k, rank), largest first
    return (Q.double() @ top).float()


def orthonormalize_reference(Y: Tensor) -> Tensor:  # (..., m, k) -> (..., m, k) float32, Q^T Q = I
    """An orthonormal basis of Y's columns: CholeskyQR2, then shifted CholeskyQR3, then Householder.

    Each batch entry takes the first method that succeeds on it. A rank-deficient ``Y`` (zero or
    duplicated columns) defeats both Cholesky variants and gets Householder, whose ``Q`` is
    orthonormal whatever the rank; the extra columns then span an arbitrary complement.
    """
    Yd = Y.double()
    Q = _cholesky_qr(_cholesky_qr(Yd))
    ok = _is_orthonormal(Q)
    if not bool(ok.all()):
        Q = torch.where(ok[..., None, None], Q, _cholesky_qr(_cholesky_qr(_shifted_cholesky_qr(Yd))))
        ok = _is_orthonormal(Q)
    if not bool(ok.all()):
        Q = torch.where(ok[..., None, None], Q, torch.linalg.qr(Yd).Q)
    return Q.float()


def _cholesky_qr(Y: Tensor) -> Tensor:
    """One CholeskyQR pass: Y R^-1 with R^T R = Y^T Y. NaN where the Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(Y.mT @ Y)
    Q = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return torch.where((info == 0)[..., None, None], Q, torch.full_like(Q, float("nan")))


def _shifted_cholesky_qr(Y: Tensor) -> Tensor:
    """CholeskyQR with the Gram shifted by s*I (Fukaya et al. 2020): survives cond(Y) up to 1/eps."""
    m, k = Y.shape[-2:]
    eps = torch.finfo(Y.dtype).eps
    norm2 = (Y * Y).sum(dim=(-2, -1))  # ||Y||_F^2 bounds ||Y||_2^2
    shift = 11.0 * (m * k + k * (k + 1)) * eps * norm2
    C = Y.mT @ Y + shift[..., None, None] * torch.eye(k, dtype=Y.dtype, device=Y.device)
    L, info = torch.linalg.cholesky_ex(C)
    Q = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return torch.where((info == 0)[..., None, None], Q, torch.full_like(Q, float("nan")))


def _is_orthonormal(Q: Tensor) -> Tensor:  # (..., m, k) -> (...,) bool
    k = Q.shape[-1]
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    err = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
    return err < _ORTHONORMAL_TOL  # NaN compares False
