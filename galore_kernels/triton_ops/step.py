"""A whole bucket's GaLore AdamW step in a fixed handful of launches, and its torch.library ops.

``galore_adamw_step_triton``: B same-shape parameters projected on one side, three launches
(project + guard, Adam, back-project + apply) and one ``steps += 1``, whatever B is.
``dense_adamw_step_triton``: B same-size parameters without a rank, two launches plus the count.

Both are exposed as custom ops, ``torch.ops.galore_kernels.triton_galore_adamw_step`` and
``torch.ops.galore_kernels.triton_dense_adamw_step``, with fake kernels, so ``torch.compile`` can
trace an optimizer step through them. The step counts and the learning rate are device tensors and
no launch depends on a host-side value that changes between steps: a steady-state step is one CUDA
graph replay (see ``galore_kernels.graphs``).

The single-parameter adapters at the end have the reference functions' signatures; the dispatch
table serves them to layer-wise mode and to any caller that steps one parameter at a time.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import step as reference_step
from .adam import dense_adamw_triton, lowrank_adam_triton
from .back_apply import back_apply_triton
from .nonfinite import nonfinite_flags_triton
from .project import lowrank_project_triton, project_partials_triton
from .utils import STATE_DTYPES, SUPPORTED_DTYPES, aligned, check_bucket, stacked_scratch


def _check_galore_bucket(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: the Triton step projects 'left' or 'right'; 'full' runs on the reference.")
    if not params:
        raise ValueError("an empty bucket: pass at least one parameter.")
    shape, dtype = tuple(params[0].shape), params[0].dtype
    if len(shape) != 2 or dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton step takes 2-D float32/bf16/fp16 weights, got {shape} {dtype}.")
    counts = {len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), len(bases), steps.numel()}
    if len(counts) != 1:
        raise ValueError(f"bucket lists differ in length: params {len(params)}, grads {len(grads)}, "
                         f"exp_avgs {len(exp_avgs)}, exp_avg_sqs {len(exp_avg_sqs)}, bases {len(bases)}, steps {steps.numel()}.")
    rank = bases[0].shape[1] if side == "left" else bases[0].shape[0]
    m, n = shape
    check_bucket("params", params, shape, dtype)
    check_bucket("grads", grads, shape, dtype)
    if bases[0].dtype not in (torch.float32, dtype):
        raise ValueError(f"bases must be float32 or the parameters' dtype {dtype}, got {bases[0].dtype}.")
    check_bucket("bases", bases, (m, rank) if side == "left" else (rank, n), bases[0].dtype)
    _check_moments(exp_avgs, exp_avg_sqs, (rank, n) if side == "left" else (m, rank))
    _check_scalars(steps, lr, params[0].device)


def _check_moments(exp_avgs, exp_avg_sqs, shape: tuple) -> None:
    dtype = exp_avgs[0].dtype
    if dtype not in STATE_DTYPES:
        raise ValueError(f"exp_avgs are {dtype}; the Triton step keeps moments in float32 or bfloat16.")
    check_bucket("exp_avgs", exp_avgs, shape, dtype)
    check_bucket("exp_avg_sqs", exp_avg_sqs, shape, dtype)


def _check_rounding(rounding_seeds: Optional[Tensor], stochastic_rounding: bool, count: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    if stochastic_rounding and dtype != torch.bfloat16:
        raise ValueError(f"stochastic_rounding is for bf16 weights, these are {dtype}; pass False.")
    if rounding_seeds is None:
        return
    if (rounding_seeds.dtype != torch.int64 or tuple(rounding_seeds.shape) != (count,) or rounding_seeds.device != device
            or not rounding_seeds.is_contiguous()):
        raise ValueError(f"rounding_seeds must be a contiguous ({count},) int64 tensor on {device}, got "
                         f"{rounding_seeds.dtype} {tuple(rounding_seeds.shape)} on {rounding_seeds.device}.")


def _check_scalars(steps: Tensor, lr: Tensor, device: torch.device) -> None:
    if steps.dtype != torch.int32 or steps.device != device or not steps.is_contiguous():
        raise ValueError(f"steps must be a contiguous int32 tensor on {device}, got {steps.dtype} on {steps.device}.")
    if lr.dtype != torch.float32 or lr.numel() != 1 or lr.device != device:
        raise ValueError(f"lr must be a one-element float32 tensor on {device}, got {lr.dtype} {tuple(lr.shape)} on {lr.device}.")


def galore_adamw_step_triton(
    params: Sequence[Tensor],  # B x (m, n), updated in place
    grads: Sequence[Tensor],  # B x (m, n), same dtype as params
    exp_avgs: Sequence[Tensor],  # B x (r, n) left / (m, r) right, float32 or bf16, updated in place
    exp_avg_sqs: Sequence[Tensor],  # like exp_avgs
    bases: Sequence[Tensor],  # B x (m, r) left / (r, n) right, float32 or the params' dtype (faster)
    steps: Tensor,  # (B,) int32 steps taken so far; incremented
    lr: Tensor,  # (1,) float32
    *, side: str, beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
    correct_bias: bool = True,
    rounding_seeds: Optional[Tensor] = None,  # (B,) int64 seeds of the random bits (None: 0..B-1)
    stochastic_rounding: bool = False,  # bf16 weights rounded stochastically (bf16 moments always are)
) -> None:
    """project -> low-rank Adam -> back-project -> apply for a bucket; a matrix whose gradient
    holds Inf/NaN keeps its weight and moments (its step still counts). Random bits (stochastic
    rounding of bf16 weights on request, and of bf16 moments) are keyed by (seed, step) per matrix."""
    _check_galore_bucket(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side)
    _check_rounding(rounding_seeds, stochastic_rounding, len(params), params[0].dtype, params[0].device)
    _galore_step_launches(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2, eps,
                          weight_decay, scale, correct_bias, rounding_seeds=rounding_seeds,
                          stochastic_rounding=stochastic_rounding)


def _galore_step_launches(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2, eps,
                          weight_decay, scale, correct_bias, skipped=None, rounding_seeds=None,
                          stochastic_rounding=False) -> None:
    rank = bases[0].shape[1] if side == "left" else bases[0].shape[0]
    partials, nonfinite = project_partials_triton(grads, bases, side, rank)  # R, or its split-K partials
    if skipped is not None:
        skipped.add_(nonfinite)
    normalized = lowrank_adam_triton(partials, exp_avgs, exp_avg_sqs, steps, lr, nonfinite, beta1=beta1,
                                     beta2=beta2, eps=eps, scale=scale, correct_bias=correct_bias,
                                     out_dtype=params[0].dtype, rounding_seeds=rounding_seeds)
    back_apply_triton(params, normalized, bases, lr, nonfinite, side=side, weight_decay=weight_decay,
                      stochastic_rounding=stochastic_rounding, rounding_seeds=rounding_seeds, steps=steps)
    steps.add_(1)


def dense_adamw_step_triton(
    params: Sequence[Tensor],  # B tensors of one numel and dtype, updated in place
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],  # float32 or bf16, shaped like params
    exp_avg_sqs: Sequence[Tensor],  # like exp_avgs
    steps: Tensor,  # (B,) int32; incremented
    lr: Tensor,  # (1,) float32
    *, beta1: float, beta2: float, eps: float, weight_decay: float, correct_bias: bool = True,
    rounding_seeds: Optional[Tensor] = None,  # (B,) int64 seeds of the random bits (None: 0..B-1)
    stochastic_rounding: bool = False,  # bf16 weights rounded stochastically (bf16 moments always are)
) -> None:
    """AdamW with decay after the update (galore-torch's rule for parameters without a rank)."""
    if not params:
        raise ValueError("an empty bucket: pass at least one parameter.")
    shape, dtype = tuple(params[0].shape), params[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton step takes float32/bf16/fp16 parameters, got {dtype}.")
    if len({len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), steps.numel()}) != 1:
        raise ValueError("bucket lists differ in length.")
    check_bucket("params", params, shape, dtype)
    check_bucket("grads", grads, shape, dtype)
    _check_moments(exp_avgs, exp_avg_sqs, shape)
    _check_scalars(steps, lr, params[0].device)
    _check_rounding(rounding_seeds, stochastic_rounding, len(params), dtype, params[0].device)
    _dense_step_launches(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                         correct_bias, rounding_seeds=rounding_seeds, stochastic_rounding=stochastic_rounding)


def _dense_step_launches(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                         correct_bias, skipped=None, rounding_seeds=None, stochastic_rounding=False) -> None:
    nonfinite = nonfinite_flags_triton(grads)
    if skipped is not None:
        skipped.add_(nonfinite)
    dense_adamw_triton(params, grads, exp_avgs, exp_avg_sqs, steps, lr, nonfinite, beta1=beta1, beta2=beta2,
                       eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rounding_seeds=rounding_seeds,
                       stochastic_rounding=stochastic_rounding)
    steps.add_(1)


# ------------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("galore_kernels::triton_galore_adamw_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def _galore_step_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], bases: list[Tensor], steps: Tensor, lr: Tensor, side: str,
                    beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                    correct_bias: bool, rounding_seeds: Optional[Tensor] = None,
                    stochastic_rounding: bool = False) -> None:
    galore_adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side=side, beta1=beta1,
                             beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                             correct_bias=correct_bias, rounding_seeds=rounding_seeds,
                             stochastic_rounding=stochastic_rounding)


@_galore_step_op.register_fake
def _galore_step_fake(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2, eps,
                      weight_decay, scale, correct_bias, rounding_seeds=None, stochastic_rounding=False) -> None:
    return None


@torch.library.custom_op("galore_kernels::triton_dense_adamw_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"))
def _dense_step_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   exp_avg_sqs: list[Tensor], steps: Tensor, lr: Tensor, beta1: float, beta2: float,
                   eps: float, weight_decay: float, correct_bias: bool, rounding_seeds: Optional[Tensor] = None,
                   stochastic_rounding: bool = False) -> None:
    dense_adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, correct_bias=correct_bias, rounding_seeds=rounding_seeds,
                            stochastic_rounding=stochastic_rounding)


@_dense_step_op.register_fake
def _dense_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                     correct_bias, rounding_seeds=None, stochastic_rounding=False) -> None:
    return None


def galore_bucket_step(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2, eps,
                       weight_decay, scale, correct_bias, *, validated: bool = False,
                       skipped: Optional[Tensor] = None, rounding_seeds: Optional[Tensor] = None,
                       stochastic_rounding: bool = False) -> None:
    """The bucket step for callers that hold a bucket (the optimizer): the custom op while
    ``torch.compile`` traces, the launcher itself otherwise (the op's dispatch costs host time).
    ``validated=True`` (the caller guarantees shapes, dtypes, contiguity and alignment) skips the
    per-tensor checks, a few microseconds per tensor and step. ``skipped`` ((B,) int32, optional)
    counts, per matrix, the steps whose update the non-finite guard masked (eager only).
    ``rounding_seeds`` ((B,) int64): the matrices' random seeds (bf16 moments; with
    ``stochastic_rounding``, bf16 weights rounded stochastically)."""
    if torch.compiler.is_compiling():
        return torch.ops.galore_kernels.triton_galore_adamw_step(
            params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2, eps, weight_decay,
            scale, correct_bias, rounding_seeds, stochastic_rounding)
    if validated:
        return _galore_step_launches(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side, beta1, beta2,
                                     eps, weight_decay, scale, correct_bias, skipped, rounding_seeds,
                                     stochastic_rounding)
    galore_adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, bases, steps, lr, side=side, beta1=beta1,
                             beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                             correct_bias=correct_bias, rounding_seeds=rounding_seeds,
                             stochastic_rounding=stochastic_rounding)


def dense_bucket_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                      correct_bias, *, validated: bool = False, skipped: Optional[Tensor] = None,
                      rounding_seeds: Optional[Tensor] = None, stochastic_rounding: bool = False) -> None:
    """Like :func:`galore_bucket_step`, for rank-less parameters."""
    if torch.compiler.is_compiling():
        return torch.ops.galore_kernels.triton_dense_adamw_step(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, correct_bias,
            rounding_seeds, stochastic_rounding)
    if validated:
        return _dense_step_launches(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                                    weight_decay, correct_bias, skipped, rounding_seeds, stochastic_rounding)
    dense_adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, correct_bias=correct_bias, rounding_seeds=rounding_seeds,
                            stochastic_rounding=stochastic_rounding)


# ------------------------------------------------------------- single-parameter adapters (dispatch)
def _device_seed(rounding_seed: Optional[int], device: torch.device) -> Optional[Tensor]:
    """One parameter's random seed as a (1,) int64 device tensor (None: none given)."""
    if rounding_seed is None:
        return None
    return torch.full((1,), rounding_seed, dtype=torch.int64, device=device)


def _device_scalars(step: int, lr, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (steps, lr) device tensors for one parameter: fills, no host-to-device copy (a tensor
    ``lr`` is used as it is: reading it into a float would synchronise)."""
    steps = torch.full((1,), step - 1, dtype=torch.int32, device=device)
    if isinstance(lr, Tensor):
        return steps, lr.reshape(1).to(device=device, dtype=torch.float32)
    return steps, torch.full((1,), lr, dtype=torch.float32, device=device)


def step_triton(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                proj_left: Optional[Tensor], proj_right: Optional[Tensor], *, side, step: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                correct_bias: bool, rounding_seed: Optional[int] = None, stochastic_rounding: bool = False) -> None:
    """``reference.galore_adamw_step_reference`` on the kernels (``step`` counted after the increment)."""
    if side == "full" or not kernel_fits(param, grad):
        return reference_step.galore_adamw_step_reference(
            param, grad, exp_avg, exp_avg_sq, proj_left, proj_right, side=side, step=step, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale, correct_bias=correct_bias,
            rounding_seed=rounding_seed, stochastic_rounding=stochastic_rounding)
    steps, lr_t = _device_scalars(step, lr, param.device)
    rounding = dict(rounding_seeds=_device_seed(rounding_seed, param.device), stochastic_rounding=stochastic_rounding)
    if side is None:
        dense_adamw_step_triton([param], [grad], [exp_avg], [exp_avg_sq], steps, lr_t, beta1=beta1, beta2=beta2,
                                eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, **rounding)
        return None
    basis = kernel_basis(proj_left if side == "left" else proj_right)
    galore_adamw_step_triton([param], [grad], [exp_avg], [exp_avg_sq], [basis], steps, lr_t, side=side,
                             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                             correct_bias=correct_bias, **rounding)
    return None


def project_triton(grad: Tensor, proj_left: Optional[Tensor], proj_right: Optional[Tensor], side) -> Tensor:
    """``reference.project_reference`` on the projection kernel."""
    if side == "full" or not kernel_fits(grad, grad):
        return reference_step.project_reference(grad, proj_left, proj_right, side)
    basis = kernel_basis(proj_left if side == "left" else proj_right)
    rank = basis.shape[1] if side == "left" else basis.shape[0]
    lowrank, _ = lowrank_project_triton([grad], [basis], side, rank)
    return lowrank[0]


def update_triton(param: Tensor, lowrank_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                  proj_left: Optional[Tensor], proj_right: Optional[Tensor], *, side, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                  correct_bias: bool, rounding_seed: Optional[int] = None, stochastic_rounding: bool = False,
                  weight_rounding_seed: Optional[int] = None) -> None:
    """``reference.galore_adamw_update_reference`` on the Adam and back-projection kernels (for a
    parameter without a rank: the dense Adam kernel, which reads the float32 gradient as it is)."""
    dense_fits = side is None and lowrank_grad.dtype == torch.float32 and kernel_fits(lowrank_grad, lowrank_grad)
    if side == "full" or not kernel_fits(param, param) or (side is None and not dense_fits):
        return reference_step.galore_adamw_update_reference(
            param, lowrank_grad, exp_avg, exp_avg_sq, proj_left, proj_right, side=side, step=step, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale, correct_bias=correct_bias,
            rounding_seed=rounding_seed, stochastic_rounding=stochastic_rounding,
            weight_rounding_seed=weight_rounding_seed)
    _check_rounding(None, stochastic_rounding, 1, param.dtype, param.device)
    steps, lr_t = _device_scalars(step, lr, param.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=param.device)  # the caller checked the gradient
    seeds = _device_seed(rounding_seed, param.device)
    if side is None:
        if weight_rounding_seed not in (None, rounding_seed):  # one kernel rounds the weight and its moments
            raise ValueError("update_triton: a parameter without projection takes one rounding seed, "
                             f"got rounding_seed={rounding_seed} and weight_rounding_seed={weight_rounding_seed}.")
        dense_adamw_triton([param], [lowrank_grad], [exp_avg], [exp_avg_sq], steps, lr_t, nonfinite, beta1=beta1,
                           beta2=beta2, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                           rounding_seeds=seeds, stochastic_rounding=stochastic_rounding)
        return None
    basis = kernel_basis(proj_left if side == "left" else proj_right)
    lowrank = stacked_scratch(1, *lowrank_grad.shape, param.device)
    lowrank[0].copy_(lowrank_grad)
    normalized = lowrank_adam_triton(lowrank, [exp_avg], [exp_avg_sq], steps, lr_t, nonfinite, beta1=beta1,
                                     beta2=beta2, eps=eps, scale=scale, correct_bias=correct_bias,
                                     out_dtype=param.dtype, rounding_seeds=seeds)
    weight_seeds = seeds if weight_rounding_seed is None else _device_seed(weight_rounding_seed, param.device)
    back_apply_triton([param], normalized, [basis], lr_t, nonfinite, side=side, weight_decay=weight_decay,
                      stochastic_rounding=stochastic_rounding, rounding_seeds=weight_seeds, steps=steps)
    return None


def kernel_basis(basis: Tensor) -> Tensor:
    """The basis as the kernels read it: contiguous and 16-byte aligned (exact bases are
    column-major; a batched refresh returns views into one tensor that need not be aligned)."""
    if basis.is_contiguous() and aligned(basis):
        return basis
    return basis.clone(memory_format=torch.contiguous_format)


def kernel_fits(param: Tensor, grad: Tensor) -> bool:
    """Whether the kernels take these tensors (contiguous, 16-byte aligned, a supported dtype); else
    the reference runs (one parameter) or it is stepped alone (the optimizer's buckets)."""
    return (param.dtype in SUPPORTED_DTYPES and grad.dtype == param.dtype and param.is_contiguous()
            and grad.is_contiguous() and aligned(param) and aligned(grad))
