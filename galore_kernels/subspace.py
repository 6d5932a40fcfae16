"""The orthonormal basis GaLore projects onto: top-r singular subspace of a gradient.

``exact`` calls ``torch.linalg.svd`` on the float32 matrix, exactly as galore-torch 1.0 does.
``randomized`` is the sketch-and-power-iterate algorithm of DESIGN.md; its defaults (oversampling
that grows with the rank, two power iterations) capture >= 99% of the exact top-r energy on
gradient-like spectra where ``torch.svd_lowrank(q=r+8, niter=2)`` stops near 97%.

Sketches are drawn from a ``torch.Generator``. The optimizers seed one per refresh from
(optimizer seed, parameter index, refresh count) with :func:`refresh_seed`, so every data-parallel
rank computes the same basis and a resumed run draws the same sketches.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from . import dispatch
from .projection import check_rank
from .seeding import mix_fields

METHODS = ("exact", "randomized")


def default_oversample(rank: int) -> int:
    """Extra sketch columns: r/2, at least 16. Gradients' spectra decay slowly near rank r, so a
    fixed +8..10 (torch.svd_lowrank's habit) leaves a few percent of the energy behind."""
    return max(16, rank // 2)


def default_niter(rank: int) -> int:
    return 2


def top_subspace(
    G: Tensor,  # (m, n) or (B, m, n)
    rank: int,
    *,
    side: Literal["left", "right"] = "left",
    method: Literal["exact", "randomized"] = "randomized",
    oversample: Optional[int] = None,
    niter: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    refresh_backend: str = "auto",
) -> Tensor:  # left: (..., m, rank), right: (..., rank, n); float32, orthonormal
    """Orthonormal basis of the top-``rank`` left (columns) or right (rows) singular subspace of G.

    ``rank`` larger than ``min(m, n)`` is an error here (the optimizers clamp it with a warning).
    ``generator=None`` draws the randomized sketch from torch's global generator.
    """
    if G.dim() not in (2, 3):
        raise ValueError(f"top_subspace expects G of shape (m, n) or (B, m, n), got {tuple(G.shape)}.")
    if not G.is_floating_point():
        raise TypeError(f"top_subspace expects a floating-point G, got dtype {G.dtype}.")
    check_rank(rank)
    if rank > min(G.shape[-2:]):
        raise ValueError(f"rank={rank} exceeds min(m, n)={min(G.shape[-2:])} for G of shape {tuple(G.shape)}.")
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} must be 'left' or 'right'.")
    if method == "exact":
        return exact_basis(G, rank, side)
    if method != "randomized":
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}.")
    backend = dispatch.refresh_backend(dispatch.requested_backend("refresh", refresh_backend), G.device)
    return randomized_basis(G, rank, side, oversample, niter, generator, backend)


def randomized_basis(
    G: Tensor,  # (..., m, n)
    rank: int,
    side: str,
    oversample: Optional[int],
    niter: Optional[int],
    generator: Optional[torch.Generator],
    backend: "dispatch.RefreshBackend",
) -> Tensor:  # left: (..., m, rank), right: (..., rank, n)
    """Randomized top-``rank`` basis of one side of G through the chosen refresh backend."""
    niter = default_niter(rank) if niter is None else niter
    if niter < 0:
        raise ValueError(f"niter={niter} must be >= 0.")
    # The right subspace of G is the left subspace of G^T.
    A = G if side == "left" else G.mT
    omega = gaussian_sketch(A, rank, oversample, generator)
    P = canonical_signs(backend.randomized_basis(A, omega, rank, niter))
    return P if side == "left" else P.mT.contiguous()


def randomized_bases_batched(
    grads: list[Tensor],  # same shape (m, n) each
    rank: int,
    side: str,  # "left" | "right"
    oversample: Optional[int],
    niter: Optional[int],
    generators: list[torch.Generator],
    backend: "dispatch.RefreshBackend",
) -> list[Tensor]:  # per gradient: left (m, rank), right (rank, n)
    """:func:`randomized_basis` of several same-shape gradients in one backend call.

    Each matrix keeps its own generator, so every basis equals the one its own call would give.
    """
    niter = default_niter(rank) if niter is None else niter
    A = torch.stack([g if side == "left" else g.mT for g in grads])
    omega = torch.stack([gaussian_sketch(a, rank, oversample, gen) for a, gen in zip(A, generators)])
    P = canonical_signs(backend.randomized_basis(A, omega, rank, niter))
    return [b if side == "left" else b.mT.contiguous() for b in P.unbind(0)]


def canonical_signs(P: Tensor) -> Tensor:  # (..., m, r) -> same, each column's largest entry positive
    """Fixes each basis vector's arbitrary sign: its entry of largest magnitude is made positive.

    GaLore carries Adam's moments across a refresh in the new basis' coordinates, so a sign that
    flips under a rounding-level change of the gradient (eigensolvers give no sign guarantee) would
    make two runs that differ only in summation order diverge.
    """
    index = P.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(P, -2, index))
    return P * torch.where(sign == 0, torch.ones_like(sign), sign)


def exact_basis(G: Tensor, rank: int, side: str) -> Tensor:
    """galore-torch's refresh: full SVD of the float32 matrix, the top-``rank`` vectors."""
    matrix = G if G.dtype == torch.float32 else G.float()
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return _compact(U[..., :, :rank] if side == "left" else Vh[..., :rank, :])


def _compact(basis: Tensor) -> Tensor:
    """A copy that owns only the basis (a slice of U or Vh pins the whole factor) and keeps LAPACK's
    column-major layout, so later products run the same BLAS calls as on galore-torch's views."""
    return basis.mT.clone(memory_format=torch.contiguous_format).mT


def gaussian_sketch(
    A: Tensor,  # (..., m, n)
    rank: int,
    oversample: Optional[int],
    generator: Optional[torch.Generator],
) -> Tensor:  # (..., n, k) float32 with k = min(rank + oversample, min(m, n))
    return sketch(tuple(A.shape), rank, oversample, generator, A.device)


def sketch(
    shape: tuple[int, ...],  # (..., m, n): the matrix the sketch multiplies
    rank: int,
    oversample: Optional[int],
    generator: Optional[torch.Generator],
    device: torch.device,
) -> Tensor:  # (..., n, k) float32 Gaussian, k = min(rank + oversample, min(m, n))
    """:func:`gaussian_sketch` from the matrix's shape alone (a row-sharded matrix's global shape)."""
    p = default_oversample(rank) if oversample is None else oversample
    if p < 0:
        raise ValueError(f"oversample={p} must be >= 0.")
    k = min(rank + p, min(shape[-2:]))
    return torch.randn((*shape[:-2], shape[-1], k), generator=generator, device=device, dtype=torch.float32)


def refresh_seed(seed: int, param_index: int, refresh_count: int) -> int:
    """A 63-bit generator seed from (optimizer seed, parameter index, refresh count).

    SplitMix64 finalisation of each field in turn, so nearby triples give unrelated streams.
    """
    return mix_fields(0x9E3779B97F4A7C15, seed, param_index, refresh_count) >> 1


def rounding_seed(seed: int, param_index: int) -> int:
    """A parameter's stochastic-rounding seed (below 2^31) from (optimizer seed, parameter index): the
    step is mixed in per update (``reference.step.ROUNDING_KEY_MULTIPLIER``). A domain tag keeps it
    apart from the refresh seeds."""
    return mix_fields(0x5DEECE66D, seed, param_index) >> 33


def refresh_generator(seed: int, param_index: int, refresh_count: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(refresh_seed(seed, param_index, refresh_count))
    return gen


def projection_bases(
    grad: Tensor,  # (m, n)
    rank: int,
    side: str,  # "left" | "right" | "full"
    *,
    method: str,
    oversample: Optional[int],
    niter: Optional[int],
    generator: Optional[torch.Generator],
    backend: "dispatch.RefreshBackend",
) -> tuple[Optional[Tensor], Optional[Tensor]]:  # (P (m, r) or None, Q (r, n) or None)
    """The bases a GaLore refresh stores for ``side``. ``full`` takes both sides of one SVD when exact
    (as galore-torch does) and two randomized refreshes, left then right, from one generator."""
    if method == "exact":
        if side != "full":
            basis = exact_basis(grad, rank, side)
            return (basis, None) if side == "left" else (None, basis)
        matrix = grad if grad.dtype == torch.float32 else grad.float()
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return _compact(U[:, :rank]), _compact(Vh[:rank, :])
    left = right = None
    if side in ("left", "full"):
        left = randomized_basis(grad, rank, "left", oversample, niter, generator, backend)
    if side in ("right", "full"):
        right = randomized_basis(grad, rank, "right", oversample, niter, generator, backend)
    return left, right
