"""Pure-PyTorch reference of the randomized subspace refresh (DESIGN.md "Randomized subspace refresh").

This is what the native ops are checked against and what runs when they are not built. Everything is
batched over leading dimensions: ``G`` is ``(..., m, n)`` and the result ``(..., m, r)``.

    Y = G @ Omega
    repeat niter times:  Q = basis(Y);  Z = basis(G^T Q);  Y = G Z
    niter > 0:  Y^T Y = V diag(lam) V^T;  P0 = Y V[:, top r] lam_top^-1/2;  P = one CholeskyQR pass of P0
    niter = 0:  Q = orth(Y);  B = Q^T G (k x n);  B B^T = U diag(lam) U^T;  P = Q @ U[:, top r]

``basis`` (inside the power iterations) is one CholeskyQR pass: a well-conditioned basis is all the
next product needs. Its Gram is float32 first; the entries where that breaks down (failed Cholesky,
a pivot ratio at or below 1e-6, i.e. a sketch condition number beyond ~1e3) redo the pass with a
float64 Gram, and the entries where that breaks down too get ``orth``. ``orth`` is CholeskyQR2 in
float64, accepted on its second pass's Gram, falling back to shifted CholeskyQR3 and then Householder.

With ``niter > 0`` ``Z`` is orthonormal and ``Y = G Z``, so the top-r left singular vectors of
``G Z Z^T`` are those of ``Y``: the eigenvectors of the k x k float64 Gram ``Y^T Y`` give them as
``P0 = Y V lam^-1/2`` (no ``k x n`` product with ``G``, no orthonormalisation of the m x k ``Y``).
``P0`` is orthonormal up to rounding that grows with ``sigma_1 / sigma_r``; one CholeskyQR pass of
the m x r ``P0`` (float64 Gram, accepted when that Gram is near the identity, the CholeskyQR2
criterion) makes it orthonormal to float32 rounding. Entries where it is not accepted (rank of ``G``
below r, a zero gradient) take the ``niter = 0`` route from ``orth(Y)``, whose Householder fallback
returns an orthonormal basis whatever the rank.

Gram matrices of the returned basis, Cholesky factors and the small ``k x k`` eigenproblem are
float64: they are tiny, and float64 keeps CholeskyQR2 stable up to a sketch condition number of about
1e8 (float32 would stop near 1e3). The products with ``G`` and the ``m x k`` products with ``L^-T``
stay in float32.

Row-sharded matrices (FSDP2's ``Shard(0)``, ``galore_kernels.sharded``) run the same code: every sum
over a tall matrix's rows (its Gram, ``Q^T A``) goes through a :class:`Rows` object, which for rows
split across ranks adds the other ranks' partial sums. The result is the same on every rank, so the
branches taken on it agree. :data:`LOCAL_ROWS` (all rows here) changes nothing: same ops, same bits.
"""
from __future__ import annotations

import torch
from torch import Tensor

# After orthonormalisation, ||Q^T Q - I||_max above this means the factorisation broke down.
_ORTHONORMAL_TOL = 1e-6
# CholeskyQR2 is accepted when its second Gram C2 = Q1^T Q1 has ||C2 - I||_F^2 below this (every
# eigenvalue in [0.5, 1.5]: the second pass then leaves Q orthonormal to rounding).
_SECOND_GRAM_TOL2 = 0.25
# A single power-iteration CholeskyQR pass needs every pivot ratio L_jj^2 / C_jj above this.
_PIVOT_TOL = 1e-12
# The same test for a float32 Gram: L_jj^2 / C_jj >= 1 / cond^2, so 1e-6 admits sketch condition
# numbers up to ~1e3, where the float32 Gram's relative error eps32 * cond^2 ~ 0.06 still leaves a
# well-conditioned basis (cond(Q) ~ 1.1); beyond, the pass is redone with a float64 Gram.
_PIVOT_TOL_FP32 = 1e-6


class Rows:
    """Where a tall matrix's rows are: all in this process (this class), or split across ranks (a
    subclass in ``galore_kernels.sharded`` sums partial products over the ranks)."""

    def sum(self, partial: Tensor) -> Tensor:
        """The sum over all rows of a product whose rows here gave ``partial`` (a Gram, Q^T A)."""
        return partial

    def total(self, local_rows: int) -> int:
        """The number of rows across all ranks."""
        return local_rows

    def gather(self, Y: Tensor) -> Tensor:  # (..., local rows, k) -> (..., all rows, k)
        return Y

    def take(self, Y: Tensor) -> Tensor:  # (..., all rows, k) -> (..., local rows, k)
        return Y


LOCAL_ROWS = Rows()


def randomized_basis_reference(
    G: Tensor,  # (..., m, n), any float dtype
    omega: Tensor,  # (..., n, k) Gaussian sketch, k >= rank
    rank: int,
    niter: int,
    rows: Rows = LOCAL_ROWS,  # where G's rows (and the result's) are
    cols: Rows = LOCAL_ROWS,  # where G's columns (and omega's rows) are
) -> Tensor:  # (..., m, rank) float32, orthonormal columns spanning G's top-rank left subspace
    G = G.float()
    Gt = G.mT
    Y = cols.sum(G @ omega.float())
    for _ in range(niter):
        Q = _power_basis(Y, rows)
        Z = _power_basis(rows.sum(Gt @ Q), cols)
        Y = cols.sum(G @ Z)
    if niter == 0:
        return _ritz_from_orth(Y, G, rank, rows, cols)
    P, ok = _ritz_basis(Y, rank, rows)
    if not bool(ok.all()):
        P = torch.where(ok[..., None, None], P, _ritz_from_orth(Y, Y, rank, rows))
    return P


def _ritz_basis(Y: Tensor, rank: int, rows: Rows) -> tuple[Tensor, Tensor]:  # (..., m, k) f32 -> (..., m, rank) f32, ok
    """Top-rank left singular vectors of Y from the eigenvectors of its float64 Gram, then one
    CholeskyQR pass; ok says that pass was accepted (its Gram within the CholeskyQR2 bound of I)."""
    k = Y.shape[-1]
    Yd = Y.double()
    lam, V = torch.linalg.eigh(rows.sum(Yd.mT @ Yd))  # eigenvalues ascending
    top = V[..., :, k - rank:].flip(-1)  # (..., k, rank), largest first
    scale = lam[..., k - rank:].flip(-1).sqrt().unsqueeze(-2)  # (..., 1, rank): the singular values
    P0 = Y @ (top / scale).float()
    P, ok, C = _cholesky_qr_pass(P0, 0.0, rows)
    return P, ok & _near_identity(C)


def _ritz_from_orth(Y: Tensor, A: Tensor, rank: int, rows: Rows, cols: Rows = LOCAL_ROWS) -> Tensor:
    """Q = orth(Y), R = Q^T A, P = Q @ top eigenvectors of R R^T (A = G, or A = Y = G Z; ``cols``:
    where A's columns are)."""
    Q = orthonormalize_reference(Y, rows)
    R = rows.sum(Q.mT @ A).double()  # (..., k, n) or (..., k, k)
    _, U = torch.linalg.eigh(cols.sum(R @ R.mT))  # eigenvalues ascending
    top = U[..., :, -rank:].flip(-1)  # (..., k, rank), largest first
    return Q @ top.float()


def orthonormalize_reference(Y: Tensor, rows: Rows = LOCAL_ROWS) -> Tensor:  # (..., m, k) -> float32, Q^T Q = I
    """An orthonormal basis of Y's columns: CholeskyQR2, then shifted CholeskyQR3, then Householder.

    Each batch entry takes the first method that succeeds on it. A rank-deficient ``Y`` (zero or
    duplicated columns) defeats both Cholesky variants and gets Householder, whose ``Q`` is
    orthonormal whatever the rank; the extra columns then span an arbitrary complement.
    """
    Yd = Y.double()
    Q1, ok1, _ = _cholesky_qr_pass(Yd, 0.0, rows)
    Q, ok2, C2 = _cholesky_qr_pass(Q1, 0.0, rows)
    ok = ok1 & ok2 & _near_identity(C2)
    if not bool(ok.all()):
        Q = torch.where(ok[..., None, None], Q,
                        _cholesky_qr(_cholesky_qr(_shifted_cholesky_qr(Yd, rows), rows), rows))
        ok = _is_orthonormal(Q, rows)
    if not bool(ok.all()):  # Householder needs every row: split rows are gathered (a rare fallback)
        Q = torch.where(ok[..., None, None], Q, rows.take(torch.linalg.qr(rows.gather(Yd)).Q))
    return Q.float()


def _power_basis(Y: Tensor, rows: Rows) -> Tensor:  # (..., m, k) float32 -> float32, well-conditioned
    """One CholeskyQR pass with a float32 Gram; entries where it breaks down redo it with a float64
    Gram, and the entries where that breaks down too get :func:`orthonormalize_reference`."""
    Q, ok, _ = _cholesky_qr_pass(Y, _PIVOT_TOL_FP32, rows, torch.float32)
    if not bool(ok.all()):
        Q64, ok64, _ = _cholesky_qr_pass(Y, _PIVOT_TOL, rows)
        Q = torch.where(ok[..., None, None], Q, Q64)
        ok = ok | ok64
        if not bool(ok.all()):
            Q = torch.where(ok[..., None, None], Q, orthonormalize_reference(Y, rows))
    return Q


def _cholesky_qr_pass(
    Y: Tensor, pivot_tol: float, rows: Rows, gram_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """Y L^-T in Y's dtype, with L L^T = Y^T Y formed in ``gram_dtype`` and L^-T applied as a product.

    Returns (Q, ok, C): ok says the Cholesky succeeded, L^-T is finite in Y's dtype and (with
    ``pivot_tol > 0``) every pivot ratio L_jj^2 / C_jj exceeds ``pivot_tol``.
    """
    k = Y.shape[-1]
    Yd = Y.to(gram_dtype)
    C = rows.sum(Yd.mT @ Yd)
    L, info = torch.linalg.cholesky_ex(C)
    W = torch.linalg.solve_triangular(L, torch.eye(k, dtype=Yd.dtype, device=Yd.device), upper=False).mT.to(Y.dtype)
    ok = (info == 0) & W.isfinite().all(-1).all(-1)
    if pivot_tol > 0:
        ratio = L.diagonal(0, -2, -1).square() / C.diagonal(0, -2, -1)
        ok = ok & (ratio > pivot_tol).all(-1)  # NaN (a zero column) compares False
    return Y @ W, ok, C


def _near_identity(C: Tensor) -> Tensor:  # (..., k, k) -> (...,) bool
    k = C.shape[-1]
    eye = torch.eye(k, dtype=C.dtype, device=C.device)
    return (C - eye).square().sum(dim=(-2, -1)) < _SECOND_GRAM_TOL2  # NaN compares False


def _cholesky_qr(Y: Tensor, rows: Rows) -> Tensor:
    """One CholeskyQR pass (fallback chain): Y R^-1 with R^T R = Y^T Y. NaN where the Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(rows.sum(Y.mT @ Y))
    Q = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return torch.where((info == 0)[..., None, None], Q, torch.full_like(Q, float("nan")))


def _shifted_cholesky_qr(Y: Tensor, rows: Rows) -> Tensor:
    """CholeskyQR with the Gram shifted by s*I (Fukaya et al. 2020): survives cond(Y) up to 1/eps."""
    m, k = rows.total(Y.shape[-2]), Y.shape[-1]
    eps = torch.finfo(Y.dtype).eps
    norm2 = rows.sum((Y * Y).sum(dim=(-2, -1)))  # ||Y||_F^2 bounds ||Y||_2^2
    shift = 11.0 * (m * k + k * (k + 1)) * eps * norm2
    C = rows.sum(Y.mT @ Y) + shift[..., None, None] * torch.eye(k, dtype=Y.dtype, device=Y.device)
    L, info = torch.linalg.cholesky_ex(C)
    Q = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT
    return torch.where((info == 0)[..., None, None], Q, torch.full_like(Q, float("nan")))


def _is_orthonormal(Q: Tensor, rows: Rows) -> Tensor:  # (..., m, k) -> (...,) bool
    k = Q.shape[-1]
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    err = (rows.sum(Q.mT @ Q) - eye).abs().amax(dim=(-2, -1))
    return err < _ORTHONORMAL_TOL  # NaN compares False
