"""The Adam phase of the fused step, elementwise over a bucket of same-size tensors.

Low-rank (phase 1's epilogue, DESIGN.md "Fused step"): from the projected gradient R update the
moments in place and emit ``N = s * scale * M / (sqrt(V) + eps)``, the step already scaled, so the
back-projection's epilogue only subtracts and decays. Dense (parameters without a rank): the same
Adam, applied to the weight in place with decoupled decay after the update (galore-torch's rule).

Per-step scalars come from device memory: the step counts (B,) and the learning rate (1,). Nothing
here is specialised on a per-step value, so a steady-state step compiles once and can be captured in
a CUDA graph. A matrix whose ``nonfinite`` flag is set keeps its moments (and weight) unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (ALIGNMENT, ELEMENTWISE_WARPS, FP_FUSION, TORCH_TO_TL, check_stacked, elementwise_block,
                    interpreter_workarounds, load_pointer, pointer_table, random_seeds, round_weight, rounding_key,
                    stacked_scratch, stacked_table, stochastic_bf16, to_dtype)


@triton.jit
def _one_minus_pow(t, log_beta):
    """1 - beta^t in float32 without cancellation: 1 - 0.999^1 computed as 1 - exp(..) would keep
    only 4 digits. -expm1(t log beta) by Kahan's trick (Triton has no expm1); beta = 0 gives 1."""
    x = t * log_beta
    u = tl.exp(x)
    expm1 = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return tl.where(u == 0.0, 1.0, -expm1)


@triton.jit
def _adam_kernel(
    grad_table,  # (B,) int64: projected gradient R (float32; its first partial when split) or, dense, the gradient
    exp_avg_table,  # (B,) int64: M (STATE_DTYPE), updated in place
    exp_avg_sq_table,  # (B,) int64: V (STATE_DTYPE), updated in place
    out_table,  # (B,) int64: N (float32) for low-rank, the weight (in place) for dense
    steps_ptr,  # (B,) int32: steps taken before this one
    lr_ptr,  # (1,) float32
    nonfinite_ptr,  # (B,) int32: nonzero = skip this matrix
    seeds_ptr,  # (B,) int64: random seeds (read for bf16 moments, and for STOCHASTIC weights)
    numel,
    split_stride,  # elements between the partials of R (SPLITS > 1)
    beta1,
    beta2,
    log_beta1,  # log(beta1), from the host in float64 (-inf for beta1 = 0)
    log_beta2,
    eps,
    weight_decay,
    scale,
    GRAD_DTYPE: tl.constexpr,
    SPLITS: tl.constexpr,  # R arrives as this many partial products, summed here in order (project.py)
    STATE_DTYPE: tl.constexpr,  # the moments: float32, or bf16 (read in float32, stored rounded stochastically)
    OUT_DTYPE: tl.constexpr,
    DENSE: tl.constexpr,
    CORRECT_BIAS: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # dense bf16 weights rounded stochastically
    INTERPRETER: tl.constexpr,  # utils.interpreter_workarounds
    BLOCK: tl.constexpr,
):
    batch = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    finite = tl.load(nonfinite_ptr + batch) == 0
    lr = tl.load(lr_ptr)
    step_size = lr
    if CORRECT_BIAS:
        t = (tl.load(steps_ptr + batch) + 1).to(tl.float32)
        step_size = lr * tl.sqrt(_one_minus_pow(t, log_beta2)) / _one_minus_pow(t, log_beta1)

    grad_ptr = load_pointer(grad_table, batch, GRAD_DTYPE)
    m_ptr = load_pointer(exp_avg_table, batch, STATE_DTYPE)
    v_ptr = load_pointer(exp_avg_sq_table, batch, STATE_DTYPE)
    out_ptr = load_pointer(out_table, batch, OUT_DTYPE)
    g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):  # the reduction the projection split, before the non-linear update
        g += tl.load(grad_ptr + split * split_stride + offs, mask=inside, other=0.0)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    normalized = m / (tl.sqrt(v) + eps)
    # A skipped matrix writes nothing: its limit drops to 0 (a mask built by comparisons only, as
    # Triton's interpreter mis-types a block mask and-ed with a scalar flag).
    update = offs < tl.where(finite, numel, 0)
    if STATE_DTYPE == tl.bfloat16:
        # Stochastically: rounded to nearest, V could never decay (beta2's 0.1% a step is below half
        # a bf16 ulp) and small gradients would never reach M.
        _, bits_m, bits_v, _ = tl.randint4x(rounding_key(seeds_ptr, steps_ptr, batch), offs)
        tl.store(m_ptr + offs, stochastic_bf16(m, bits_m), mask=update)
        tl.store(v_ptr + offs, stochastic_bf16(v, bits_v), mask=update)
    else:
        tl.store(m_ptr + offs, m, mask=update)
        tl.store(v_ptr + offs, v, mask=update)
    if DENSE:
        w = tl.load(out_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        w = (w - step_size * normalized) * (1.0 - lr * weight_decay)
        w = round_weight(w, OUT_DTYPE, STOCHASTIC, seeds_ptr, steps_ptr, batch, offs, INTERPRETER)
        tl.store(out_ptr + offs, w, mask=update)
    else:  # N in the back-projection's operand dtype: the GEMM reads it without a conversion
        tl.store(out_ptr + offs, to_dtype(normalized * (step_size * scale), OUT_DTYPE, INTERPRETER), mask=inside)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else float("-inf")


def _launch(grad_table, exp_avgs, exp_avg_sqs, out_table, steps, lr, nonfinite, numel, grad_dtype,
            out_dtype, dense, beta1, beta2, eps, weight_decay, scale, correct_bias, rounding_seeds=None,
            stochastic=False, splits=1, split_stride=0) -> None:
    device = exp_avgs[0].device
    block = elementwise_block()
    grid = (triton.cdiv(numel, block), len(exp_avgs))
    if stochastic or exp_avgs[0].dtype == torch.bfloat16:
        rounding_seeds = random_seeds(rounding_seeds, len(exp_avgs), device)
    _adam_kernel[grid](
        grad_table, pointer_table(exp_avgs, device), pointer_table(exp_avg_sqs, device), out_table,
        steps, lr, nonfinite, nonfinite if rounding_seeds is None else rounding_seeds, numel, split_stride, beta1, beta2, _log(beta1),
        _log(beta2), eps, weight_decay, scale,
        GRAD_DTYPE=TORCH_TO_TL[grad_dtype], SPLITS=splits, STATE_DTYPE=TORCH_TO_TL[exp_avgs[0].dtype], OUT_DTYPE=TORCH_TO_TL[out_dtype], DENSE=dense,
        CORRECT_BIAS=correct_bias, STOCHASTIC=bool(stochastic), INTERPRETER=interpreter_workarounds(), BLOCK=block, num_warps=ELEMENTWISE_WARPS,
        enable_fp_fusion=FP_FUSION,
    )


def lowrank_adam_triton(
    lowrank: Tensor,  # (B, a, b) float32: R of every matrix in the bucket; or (B, S, a, b): its partials
    exp_avgs: Sequence[Tensor],  # B x (a, b) float32 or bf16 (STATE_DTYPES), updated in place
    exp_avg_sqs: Sequence[Tensor],  # B x (a, b), like exp_avgs
    steps: Tensor,  # (B,) int32, steps before this one
    lr: Tensor,  # (1,) float32
    nonfinite: Tensor,  # (B,) int32
    *, beta1: float, beta2: float, eps: float, scale: float, correct_bias: bool,
    out: Optional[Tensor] = None,  # (B, a, b) (utils.stacked_scratch) in out_dtype; allocated if None
    out_dtype: torch.dtype = torch.float32,  # the back-projection's operand dtype
    rounding_seeds: Optional[Tensor] = None,  # (B,) int64: random bits of bf16 moments (None: 0..B-1)
) -> Tensor:  # N: (B, a, b) out_dtype, already multiplied by the step size and scale
    partials = lowrank if lowrank.dim() == 4 else lowrank.unsqueeze(1)  # (B, S, a, b)
    batch, splits, rows, cols = partials.shape
    first = partials[:, 0]
    check_stacked("lowrank", first, (batch, rows, cols))
    if splits > 1 and (partials.stride(1) * 4) % ALIGNMENT:
        raise ValueError(f"the partials of R must lie 16-byte multiples apart (utils.partials_scratch), got "
                         f"strides {partials.stride()}.")
    if out is not None:
        check_stacked("out", out, (batch, rows, cols), out_dtype)
    normalized = stacked_scratch(batch, rows, cols, lowrank.device, out_dtype) if out is None else out
    _launch(stacked_table(first), exp_avgs, exp_avg_sqs, stacked_table(normalized), steps, lr,
            nonfinite, rows * cols, torch.float32, out_dtype, False, beta1, beta2, eps,
            0.0, scale, correct_bias, rounding_seeds, splits=splits,
            split_stride=partials.stride(1) if splits > 1 else 0)
    return normalized


def dense_adamw_triton(
    params: Sequence[Tensor],  # B tensors of one numel and dtype, updated in place
    grads: Sequence[Tensor],  # B tensors like params
    exp_avgs: Sequence[Tensor],  # float32 or bf16, shaped like params
    exp_avg_sqs: Sequence[Tensor],  # like exp_avgs
    steps: Tensor,  # (B,) int32
    lr: Tensor,  # (1,) float32
    nonfinite: Tensor,  # (B,) int32
    *, beta1: float, beta2: float, eps: float, weight_decay: float, correct_bias: bool,
    rounding_seeds: Optional[Tensor] = None,  # (B,) int64 seeds of the random bits (None: 0..B-1)
    stochastic_rounding: bool = False,  # bf16 weights rounded stochastically
) -> None:
    device = params[0].device
    if stochastic_rounding and params[0].dtype != torch.bfloat16:
        raise ValueError(f"stochastic_rounding is for bf16 weights, these are {params[0].dtype}.")
    _launch(pointer_table(grads, device), exp_avgs, exp_avg_sqs, pointer_table(params, device), steps,
            lr, nonfinite, params[0].numel(), grads[0].dtype, params[0].dtype, True, beta1, beta2, eps,
            weight_decay, 1.0, correct_bias, rounding_seeds, stochastic_rounding)
