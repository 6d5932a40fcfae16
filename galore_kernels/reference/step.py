"""Pure-PyTorch reference of one GaLore AdamW step (DESIGN.md "Notation and the update").

The Triton kernels implement the same functions under parallel names and are checked against these.
Arithmetic is float32 whatever the parameter dtype: the gradient and the basis are read in float32,
a bf16/fp16 weight is updated in float32 and rounded once (to nearest, or stochastically on request;
a float64 weight is updated in place, in float64),
and so are bf16 moments (the optimizer's ``state_dtype="bfloat16"``): the update reads them in
float32 and stores them rounded stochastically, the normalised step being computed from the
unrounded float32 values. Rounded to nearest, bf16 moments would be biased for good: beta2's decay of
0.1% a step is below half a bf16 ulp, so V could never shrink. For float32
parameters the operations run in galore-torch 1.0's order, so its trajectory is matched closely.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..projection import Side
from ..seeding import MASK64, splitmix64


def project_reference(
    grad: Tensor,  # (m, n)
    proj_left: Optional[Tensor],  # (m, r) for side left/full
    proj_right: Optional[Tensor],  # (r, n) for side right/full
    side: Side,
) -> Tensor:  # (r, n) left, (m, r) right, (r, r) full; float32
    g = grad.float()
    if side == "left":
        return proj_left.float().t() @ g
    if side == "right":
        return g @ proj_right.float().t()
    return proj_left.float().t() @ g @ proj_right.float().t()


def project_back_reference(
    lowrank: Tensor,  # shape of project_reference's result
    proj_left: Optional[Tensor],
    proj_right: Optional[Tensor],
    side: Side,
) -> Tensor:  # (m, n) float32
    if side == "left":
        return proj_left.float() @ lowrank
    if side == "right":
        return lowrank @ proj_right.float()
    return proj_left.float() @ lowrank @ proj_right.float()


# A stochastically rounded step draws its bits from a generator keyed by (seed * MULT + step, stream):
# stream 0 rounds the weight, 1 and 2 the moments (the Triton kernels key Philox the same way and take
# words 0, 1, 2 of its blocks; the two backends' bits differ, each is reproducible).
ROUNDING_KEY_MULTIPLIER = 1_000_003
WEIGHT_STREAM, EXP_AVG_STREAM, EXP_AVG_SQ_STREAM = 0, 1, 2


def stochastic_round_reference(
    x: Tensor,  # float32
    seed: int,  # the parameter's random seed, below 2^31
    step: int,  # after the increment
    stream: int = WEIGHT_STREAM,
) -> Tensor:  # bf16, each element x rounded down or up with probability proportional to the distance
    """Unbiased rounding to bf16: 16 uniform random bits are added to the 16 bits that bf16 drops,
    and the sum is truncated, so the carry into the kept bits happens with the right probability."""
    gen = torch.Generator(device=x.device)
    # Hashed: torch's CPU generator keeps only the low 32 bits of its seed, and nearby keys (another
    # parameter's, a step later) must not share them.
    gen.manual_seed(splitmix64(((seed * ROUNDING_KEY_MULTIPLIER + step) * 4 + stream) & MASK64) >> 1)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32, device=x.device)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # 0xFFFF0000 as an int32
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """lr * sqrt(1 - b2^t) / (1 - b1^t), ``step`` counted after the increment (t >= 1)."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def galore_adamw_update_reference(
    param: Tensor,  # (m, n), updated in place
    lowrank_grad: Tensor,  # projected gradient, float32 (the full gradient when side is None)
    exp_avg: Tensor,  # same shape as lowrank_grad, float32 or bf16, updated in place
    exp_avg_sq: Tensor,  # same shape and dtype as exp_avg, updated in place
    proj_left: Optional[Tensor],
    proj_right: Optional[Tensor],
    *,
    side: Optional[Side],  # None: plain AdamW, no projection
    step: int,  # after the increment
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    correct_bias: bool,
    rounding_seed: Optional[int] = None,  # the parameter's random seed (bf16 moments, stochastic rounding)
    stochastic_rounding: bool = False,  # bf16 weights rounded stochastically
    weight_rounding_seed: Optional[int] = None,  # the weight's own seed, if not rounding_seed (a shard's rows)
) -> None:
    """Adam on the (projected) gradient, back-projection, then decoupled decay after the update."""
    m = exp_avg if exp_avg.dtype == torch.float32 else exp_avg.float()
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float32 else exp_avg_sq.float()
    m.mul_(beta1).add_(lowrank_grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(lowrank_grad, lowrank_grad, value=1.0 - beta2)
    normalized = m / v.sqrt().add_(eps)
    seed = 0 if rounding_seed is None else rounding_seed
    if m is not exp_avg:  # bf16 moments: stored rounded stochastically, the step uses the float32 values
        exp_avg.copy_(stochastic_round_reference(m, seed, step, EXP_AVG_STREAM))
        exp_avg_sq.copy_(stochastic_round_reference(v, seed, step, EXP_AVG_SQ_STREAM))
    if side is not None:
        normalized = project_back_reference(normalized, proj_left, proj_right, side) * scale
    step_size = adam_step_size(lr, beta1, beta2, step, correct_bias)
    # 16-bit weights are updated in float32 and rounded once; float32 and float64 weights in place, so
    # a float64 weight keeps its precision (the update itself is float32).
    target = param if param.dtype in (torch.float32, torch.float64) else param.float()
    target.add_(normalized, alpha=-step_size)
    if weight_decay > 0.0:
        target.add_(target, alpha=-lr * weight_decay)
    if target is not param:
        if stochastic_rounding and param.dtype == torch.bfloat16:
            weight_seed = seed if weight_rounding_seed is None else weight_rounding_seed
            target = stochastic_round_reference(target, weight_seed, step, WEIGHT_STREAM)
        param.copy_(target)


def galore_adamw_step_reference(
    param: Tensor,  # (m, n), updated in place
    grad: Tensor,  # (m, n), full gradient
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    proj_left: Optional[Tensor],
    proj_right: Optional[Tensor],
    *,
    side: Optional[Side],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    correct_bias: bool,
    rounding_seed: Optional[int] = None,
    stochastic_rounding: bool = False,
) -> None:
    """project -> low-rank Adam -> back-project -> apply, for one parameter."""
    if side is None:
        lowrank = grad if grad.dtype == torch.float32 else grad.float()
    else:
        lowrank = project_reference(grad, proj_left, proj_right, side)
    galore_adamw_update_reference(
        param, lowrank, exp_avg, exp_avg_sq, proj_left, proj_right, side=side, step=step, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
        correct_bias=correct_bias, rounding_seed=rounding_seed, stochastic_rounding=stochastic_rounding,
    )
