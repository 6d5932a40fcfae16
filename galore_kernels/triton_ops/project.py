"""Phase 1 of the fused step: ``R[b] = project(G[b])`` for a bucket of same-shape gradients.

left:  R = P^T G   (P: m x r basis, G: m x n)  -> R: r x n
right: R = G Q^T   (Q: r x n basis rows)       -> R: m x r

One program owns one output tile and one split of the reduction. R is thin (one side is the rank),
so a single matrix may have fewer tiles than the GPU has SMs; the reduction is then split
(``utils.project_splits``) and each split stores its partial product in a slice of its own. No
atomics: the Adam kernel, which reads R anyway, sums the partials in split order before its
non-linear update, so a step's bits do not depend on timing. With one split R is stored directly.

The epilogue also records, per matrix, whether any element of a partial is non-finite (or, split,
above FLT_MAX / splits, so that the sum cannot overflow where no one checks it): an Inf or NaN
anywhere in G reaches R, so this is the device-side guard that the Adam phase uses to leave the
moments and the weight untouched, without a host round trip (a maximum, so order does not matter).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (FP_FUSION, TORCH_TO_TL, GemmConfig, check_stacked, dot_precision, gemm_config,
                    interpreter_workarounds, k_major_operands, load_pointer, partials_scratch, pointer_table,
                    project_splits, stacked_scratch, stacked_table, tile_product, tile_product_tma, tma_ready,
                    transposed_stack)

FLT_MAX = torch.finfo(torch.float32).max


@triton.jit
def _lowrank_project_kernel(
    a_table,  # (B,) int64: A operand of each product (P^T for left, G for right)
    b_table,  # (B,) int64: B operand (G for left, Q^T for right)
    out_ptr,  # (B, S, M, N) float32: partial products, each slice contiguous (utils.partials_scratch)
    nonfinite_ptr,  # (B,) int32, zeroed by the launcher; set to 1 where R holds Inf/NaN
    out_batch_stride,
    split_stride,  # elements between a matrix's partials
    split_steps,  # K steps (of BLOCK_K) per split; all of K with one split
    finite_bound,  # float32: largest |partial| whose sum over the splits cannot overflow (FLT_MAX / splits)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    OPERAND: tl.constexpr,  # dtype both operands are cast to before tl.dot
    PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands ("ieee" or "tf32")
    INTERPRETER: tl.constexpr,  # utils.interpreter_workarounds
    RANK_ON_M: tl.constexpr,  # True for left (R = P^T G), False for right (R = G Q^T)
    A_K_MAJOR: tl.constexpr,  # A stored M x K (G; P^T copied for TF32), else as its K x M transpose (P)
    TMA: tl.constexpr,  # operands through TMA descriptors (utils.tile_product_tma)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    split = pid // tiles
    pid = pid % tiles
    k_start = split * split_steps * BLOCK_K
    k_end = tl.minimum(K, k_start + split_steps * BLOCK_K)
    # Programs that read the same slab of G run back to back, so G comes from HBM about once and
    # its re-reads (one per tile along the rank) hit L2: the rank axis varies fastest.
    if RANK_ON_M:  # left: R is r x n
        tiles_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % tiles_m
        pid_n = pid // tiles_m
    else:  # right: R is m x r
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // tiles_n
        pid_n = pid % tiles_n
    a_ptr = load_pointer(a_table, batch, A_DTYPE)
    b_ptr = load_pointer(b_table, batch, B_DTYPE)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if TMA:  # left: A = P^T stored as P (K x M) or copied (M x K), B = G (K x N); right: A = G (M x K), B = Q^T stored as Q (N x K)
        acc = tile_product_tma(a_ptr, b_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, K, k_start, k_end,
                               stride_am if A_K_MAJOR else stride_ak, stride_bk if RANK_ON_M else stride_bn,
                               OPERAND, PRECISION, INTERPRETER, A_K_MAJOR, RANK_ON_M, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = tile_product(a_ptr, b_ptr, offs_m, offs_n, M, N, K, k_start, k_end, stride_am, stride_ak, stride_bk, stride_bn,
                           OPERAND, PRECISION, INTERPRETER, BLOCK_M, BLOCK_N, BLOCK_K)

    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = (out_ptr + batch.to(tl.int64) * out_batch_stride + split.to(tl.int64) * split_stride
           + offs_m[:, None] * N + offs_n[None, :])
    tl.store(out, acc, mask=inside)
    # Inf/NaN, or (split) a partial so large that the sum of the splits could overflow to Inf in the
    # Adam kernel: with one split the bound is FLT_MAX, so only Inf exceeds it.
    bad = ((acc != acc) | (tl.abs(acc) > finite_bound)) & inside
    tl.atomic_max(nonfinite_ptr + batch, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))


def project_operands(side: str, shape: tuple[int, int], rank: int) -> tuple[tuple, tuple, tuple]:
    """(M, N, K), A strides, B strides of the product that projects an (m, n) gradient."""
    m, n = shape
    if side == "left":  # P^T (r x m, read from P: m x r row-major) @ G (m x n)
        return (rank, n, m), (1, rank), (n, 1)
    if side == "right":  # G (m x n) @ Q^T (n x r, read from Q: r x n row-major)
        return (m, rank, n), (n, 1), (1, n)
    raise ValueError(f"side={side!r}: the Triton projection runs 'left' or 'right' ('full' stays on the reference)")


def projection_launch(side: str, shape: tuple[int, int], rank: int, dtype: torch.dtype,
                      batch: int) -> tuple[GemmConfig, int, int, int]:
    """(tile configuration, output tiles per matrix, K steps per split, splits) of the projection
    launch for a bucket of ``batch`` (m, n) gradients of ``dtype``."""
    (M, N, K), _, _ = project_operands(side, shape, rank)
    cfg = gemm_config("project", M, N, dtype, batch)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    return (cfg, tiles, *project_splits(cfg, tiles * batch, K))


def project_partials_triton(
    grads: Sequence[Tensor],  # B x (m, n), one dtype
    bases: Sequence[Tensor],  # B x (m, r) for left, B x (r, n) for right; float32 or the gradients' dtype
    side: str,
    rank: int,
    out: Optional[Tensor] = None,  # (B, r, n) or (B, m, r) float32 (utils.stacked_scratch), used with one split
) -> tuple[Tensor, Tensor]:  # partials: (B, S, r, n) or (B, S, m, r) float32; nonfinite: (B,) int32
    """Projects every gradient of a bucket in one launch; R[b] is the sum of partials[b, s] in order
    of s (one split: ``out``, or new scratch, viewed as (B, 1, ...))."""
    device, dtype = grads[0].device, grads[0].dtype
    batch = len(grads)
    (M, N, K), (sam, sak), (sbk, sbn) = project_operands(side, tuple(grads[0].shape), rank)
    if out is not None:
        check_stacked("out", out, (batch, M, N))
    cfg, tiles, split_steps, splits = projection_launch(side, tuple(grads[0].shape), rank, dtype, batch)
    if splits > 1:
        partials = partials_scratch(batch, splits, M, N, device)
    else:
        partials = (stacked_scratch(batch, M, N, device) if out is None else out).unsqueeze(1)
    nonfinite = torch.zeros(batch, dtype=torch.int32, device=device)
    basis_table, grad_table = pointer_table(bases, device), pointer_table(grads, device)
    a_table, b_table = (basis_table, grad_table) if side == "left" else (grad_table, basis_table)
    basis_dtype = bases[0].dtype  # float32, or the gradients' dtype (read without a conversion)
    a_dtype, b_dtype = (basis_dtype, dtype) if side == "left" else (dtype, basis_dtype)
    m, n = grads[0].shape
    basis_row = rank if side == "left" else n  # P is m x r, Q is r x n
    a_k_major = side == "right" or k_major_operands(dtype)
    if side == "left" and a_k_major:  # P^T (r x m) copied once per step: TF32 reads K-major operands only
        p_transposed = transposed_stack(bases)  # alive until the launch
        a_table, (sam, sak), basis_row = stacked_table(p_transposed), (m, 1), m
    tma = tma_ready(cfg, (n * grads[0].element_size(), basis_row * bases[0].element_size()))
    _lowrank_project_kernel[(tiles * splits, batch)](
        a_table, b_table, partials, nonfinite, partials.stride(0), partials.stride(1) if splits > 1 else 0,
        split_steps, FLT_MAX / splits, M, N, K,
        sam, sak, sbk, sbn,
        A_DTYPE=TORCH_TO_TL[a_dtype], B_DTYPE=TORCH_TO_TL[b_dtype], OPERAND=TORCH_TO_TL[dtype],
        PRECISION=dot_precision(dtype), INTERPRETER=interpreter_workarounds(), RANK_ON_M=side == "left",
        A_K_MAJOR=a_k_major, TMA=tma,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )
    return partials, nonfinite


def sum_partials(partials: Tensor, out: Optional[Tensor] = None) -> Tensor:  # (B, S, a, b) -> (B, a, b)
    """R from its partial products, added in split order as the Adam kernel adds them (the same bits)."""
    if partials.shape[1] == 1 and out is None:
        return partials[:, 0]
    if partials.shape[1] == 1 and partials.data_ptr() == out.data_ptr():
        return out  # the projection stored R there itself
    if out is None:
        out = stacked_scratch(partials.shape[0], *partials.shape[2:], partials.device)
    out.copy_(partials[:, 0])
    for s in range(1, partials.shape[1]):
        out.add_(partials[:, s])
    return out


def lowrank_project_triton(
    grads: Sequence[Tensor],  # B x (m, n), one dtype
    bases: Sequence[Tensor],  # B x (m, r) for left, B x (r, n) for right; float32 or the gradients' dtype
    side: str,
    rank: int,
    out: Optional[Tensor] = None,  # (B, r, n) or (B, m, r) float32 (utils.stacked_scratch); allocated if None
) -> tuple[Tensor, Tensor]:  # R: (B, r, n) or (B, m, r) float32; nonfinite: (B,) int32
    """Projects every gradient of a bucket: R itself (its partials summed when the reduction was split)."""
    partials, nonfinite = project_partials_triton(grads, bases, side, rank, out)
    return sum_partials(partials, out), nonfinite
