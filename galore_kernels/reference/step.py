"""Pure-PyTorch reference of one GaLore AdamW step (DESIGN.md "Notation and the update").

The Triton kernels implement the same functions under parallel names and are checked against these.
Arithmetic is float32 whatever the parameter dtype: the gradient and the basis are read in float32,
the moments are float32, and a bf16/fp16 weight is updated in float32 and rounded once. For float32
parameters the operations run in galore-torch 1.0's order, so its trajectory is matched closely.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..projection import Side


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


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """lr * sqrt(1 - b2^t) / (1 - b1^t), ``step`` counted after the increment (t >= 1)."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def galore_adamw_update_reference(
    param: Tensor,  # (m, n), updated in place
    lowrank_grad: Tensor,  # projected gradient, float32 (the full gradient when side is None)
    exp_avg: Tensor,  # same shape as lowrank_grad, float32, updated in place
    exp_avg_sq: Tensor,  # same shape as lowrank_grad, float32, updated in place
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
) -> None:
    """Adam on the (projected) gradient, back-projection, then decoupled decay after the update."""
    exp_avg.mul_(beta1).add_(lowrank_grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(lowrank_grad, lowrank_grad, value=1.0 - beta2)
    normalized = exp_avg / exp_avg_sq.sqrt().add_(eps)
    if side is not None:
        normalized = project_back_reference(normalized, proj_left, proj_right, side) * scale
    step_size = adam_step_size(lr, beta1, beta2, step, correct_bias)
    target = param if param.dtype == torch.float32 else param.float()
    target.add_(normalized, alpha=-step_size)
    if weight_decay > 0.0:
        target.add_(target, alpha=-lr * weight_decay)
    if target is not param:
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
) -> None:
    """project -> low-rank Adam -> back-project -> apply, for one parameter."""
    if side is None:
        lowrank = grad if grad.dtype == torch.float32 else grad.float()
    else:
        lowrank = project_reference(grad, proj_left, proj_right, side)
    galore_adamw_update_reference(
        param, lowrank, exp_avg, exp_avg_sq, proj_left, proj_right, side=side, step=step, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
        correct_bias=correct_bias,
    )
