"""Phase 2 of the fused step: back-project and apply, in place.

left:  W <- (W - P N) * (1 - lr * wd)    P: m x r, N: r x n
right: W <- (W - N Q) * (1 - lr * wd)    N: m x r, Q: r x n

``N`` arrives already multiplied by the Adam step size and GaLore's scale (see adam.py), so the
epilogue is one subtraction and the decoupled decay. The product has K = r; one program owns one
tile of W, reads it once and writes it once. 16-bit weights are updated in float32 and rounded once,
to nearest or (bf16, on request) stochastically (utils.round_weight).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (FP_FUSION, TORCH_TO_TL, dot_precision, gemm_config, interpreter_workarounds, k_major_operands,
                    load_pointer, pointer_table, prefetch_weight, random_seeds, round_weight, stacked_table,
                    tile_product, tile_product_tma, tma_ready, transposed_stack)


@triton.jit
def _back_apply_kernel(
    a_table,  # (B,) int64: P (left) or N (right)
    b_table,  # (B,) int64: N (left) or Q (right)
    w_table,  # (B,) int64: the weights, updated in place
    lr_ptr,  # (1,) float32
    nonfinite_ptr,  # (B,) int32: nonzero = leave this weight untouched
    seeds_ptr,  # (B,) int64: stochastic rounding seeds (read only when STOCHASTIC)
    steps_ptr,  # (B,) int32: steps before this one (read only when STOCHASTIC)
    M,
    N,
    K,
    weight_decay,
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # bf16 weights rounded stochastically
    INTERPRETER: tl.constexpr,  # utils.interpreter_workarounds
    TMA: tl.constexpr,  # operands through TMA descriptors (utils.tile_product_tma)
    B_K_MAJOR: tl.constexpr,  # B stored as its N x K transpose (utils.k_major_operands), else K x N
    PREFETCH_W: tl.constexpr,  # load the W tile before the GEMM loop (utils.prefetch_weight)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    # Both operands are row-major: A is M x K, B is K x N or (B_K_MAJOR) N x K. In the operand dtype
    # they go to the tensor cores without a conversion in registers (the optimizer passes them so).
    a_ptr = load_pointer(a_table, batch, A_DTYPE)
    b_ptr = load_pointer(b_table, batch, B_DTYPE)
    w_ptr = load_pointer(w_table, batch, W_DTYPE)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs_w = offs_m[:, None] * N + offs_n[None, :]
    if PREFETCH_W:  # issued before the GEMM loop, whose few K = rank steps then hide its latency
        w = tl.load(w_ptr + offs_w, mask=inside, other=0.0)
    if TMA:
        acc = tile_product_tma(a_ptr, b_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, K, 0, K, K,
                               K if B_K_MAJOR else N, OPERAND, PRECISION, INTERPRETER, True, not B_K_MAJOR,
                               BLOCK_M, BLOCK_N, BLOCK_K)
    elif B_K_MAJOR:
        acc = tile_product(a_ptr, b_ptr, offs_m, offs_n, M, N, K, 0, K, K, 1, 1, K, OPERAND, PRECISION, INTERPRETER,
                           BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = tile_product(a_ptr, b_ptr, offs_m, offs_n, M, N, K, 0, K, K, 1, N, 1, OPERAND, PRECISION, INTERPRETER,
                           BLOCK_M, BLOCK_N, BLOCK_K)

    if not PREFETCH_W:
        w = tl.load(w_ptr + offs_w, mask=inside, other=0.0)
    finite = tl.load(nonfinite_ptr + batch) == 0
    decay = 1.0 - tl.load(lr_ptr) * weight_decay
    w = (w.to(tl.float32) - acc) * decay
    # A skipped weight writes nothing (its row limit drops to 0; see adam.py on the mask).
    update = (offs_m[:, None] < tl.where(finite, M, 0)) & (offs_n[None, :] < N)
    w = round_weight(w, W_DTYPE, STOCHASTIC, seeds_ptr, steps_ptr, batch, offs_w, INTERPRETER)
    tl.store(w_ptr + offs_w, w, mask=update)


def back_apply_triton(
    params: Sequence[Tensor],  # B x (m, n), one dtype, updated in place
    normalized: Tensor,  # (B, r, n) left or (B, m, r) right, float32 or the params' dtype; step size and scale applied
    bases: Sequence[Tensor],  # B x (m, r) left or B x (r, n) right, float32 or the params' dtype
    lr: Tensor,  # (1,) float32
    nonfinite: Tensor,  # (B,) int32
    *, side: str, weight_decay: float,
    stochastic_rounding: bool = False,  # bf16 weights rounded stochastically
    rounding_seeds: Optional[Tensor] = None,  # (B,) int64 seeds of the random bits (None: 0..B-1)
    steps: Optional[Tensor] = None,  # (B,) int32 steps before this one: needed with stochastic_rounding
) -> None:
    device, dtype = params[0].device, params[0].dtype
    m, n = params[0].shape
    rank = normalized.shape[1] if side == "left" else normalized.shape[2]
    basis_table, n_table = pointer_table(bases, device), stacked_table(normalized)
    a_table, b_table = (basis_table, n_table) if side == "left" else (n_table, basis_table)
    a_dtype, b_dtype = (bases[0].dtype, normalized.dtype) if side == "left" else (normalized.dtype, bases[0].dtype)
    b_k_major = k_major_operands(dtype)
    if b_k_major:  # B (N left, Q right: r x n) copied to its n x r transpose, once per step
        b_transposed = transposed_stack(normalized if side == "left" else bases)  # alive until the launch
        b_table = stacked_table(b_transposed)
    cfg = gemm_config("back_apply", m, n, dtype, len(params))
    # A is M x K and B is K x N (or N x K), row-major: rows of K (= rank) and of N (or K) elements.
    tma = tma_ready(cfg, (rank * torch.finfo(a_dtype).bits // 8, (rank if b_k_major else n) * torch.finfo(b_dtype).bits // 8))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), len(params))
    stochastic = bool(stochastic_rounding)
    if stochastic:
        if dtype != torch.bfloat16 or steps is None:
            raise ValueError(f"stochastic rounding needs bf16 weights (these are {dtype}) and their step counts.")
        rounding_seeds = random_seeds(rounding_seeds, len(params), device)
    _back_apply_kernel[grid](
        a_table, b_table, pointer_table(params, device), lr, nonfinite,
        rounding_seeds if stochastic else nonfinite, steps if stochastic else nonfinite, m, n, rank, weight_decay,
        A_DTYPE=TORCH_TO_TL[a_dtype], B_DTYPE=TORCH_TO_TL[b_dtype], W_DTYPE=TORCH_TO_TL[dtype], OPERAND=TORCH_TO_TL[dtype], PRECISION=dot_precision(dtype),
        STOCHASTIC=stochastic, INTERPRETER=interpreter_workarounds(), TMA=tma, B_K_MAJOR=b_k_major,
        PREFETCH_W=prefetch_weight(cfg, params[0].element_size()),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )
