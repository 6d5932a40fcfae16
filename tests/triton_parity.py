"""Yardsticks for the Triton step kernels, shared by the interpreter tests (CPU, CI) and the GPU tests.

The kernels round their matmul operands to the parameter's dtype (bf16/fp16 tensor-core operands;
fp32 stays fp32) and accumulate in float32. ``bucket_step64`` computes the same step in float64
with the same operand rounding, so a kernel's deviation from it is only float32 accumulation and
the final rounding of the weight. ``bucket_step_torch`` is the same-precision torch control
(flash-attention's rule): a kernel may not be much worse than torch computing in its precision.
Nothing here calls the kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from helpers import generator

HP = dict(beta1=0.9, beta2=0.999, eps=1e-6, scale=0.25)


@dataclass
class Bucket:
    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    bases: list
    steps_before: int
    side: str

    def clone(self) -> "Bucket":
        c = lambda xs: [x.clone() for x in xs]  # noqa: E731
        return Bucket(c(self.params), c(self.grads), c(self.exp_avgs), c(self.exp_avg_sqs), c(self.bases),
                      self.steps_before, self.side)


def make_bucket(shape, rank, side, dtype, batch, steps_before, seed, device="cpu", weight_scale=0.02,
                state_dtype=torch.float32) -> Bucket:
    """Fresh random weights, gradients, orthonormal bases and (after step 0) moments in
    ``state_dtype``; never zeros."""
    gen = generator(seed)
    m, n = shape
    params, grads, ms, vs, bases = [], [], [], [], []
    low = (rank, n) if side == "left" else (m, rank)
    for _ in range(batch):
        params.append((torch.randn(m, n, generator=gen) * weight_scale).to(dtype))
        grads.append(torch.randn(m, n, generator=gen).to(dtype))
        q = torch.linalg.qr(torch.randn(m if side == "left" else n, rank, generator=gen, dtype=torch.float64))[0]
        bases.append((q if side == "left" else q.T).float().contiguous())
        if steps_before == 0:
            ms.append(torch.zeros(low, dtype=state_dtype)); vs.append(torch.zeros(low, dtype=state_dtype))
        else:
            ms.append((torch.randn(low, generator=gen) * 0.1).to(state_dtype))
            vs.append((torch.rand(low, generator=gen) * 0.01 + 1e-4).to(state_dtype))
    b = Bucket(params, grads, ms, vs, bases, steps_before, side)
    if device != "cpu":
        b = Bucket(*[[t.to(device) for t in xs] for xs in (params, grads, ms, vs, bases)], steps_before, side)
    return b


def step_size(lr: float, t: int) -> float:
    return lr * math.sqrt(1 - HP["beta2"] ** t) / (1 - HP["beta1"] ** t)


def projected64(side: str, operand: torch.dtype, g: Tensor, basis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(G, P, R) in float64 with the kernels' operand rounding: R = P^T G (left) or G P^T (right)."""
    g64, p64 = g.to(operand).double(), basis.to(operand).double()
    return g64, p64, (p64.T @ g64 if side == "left" else g64 @ p64.T)


def bucket_step64(b: Bucket, lr: float, weight_decay: float) -> tuple[list, list, list]:
    """(weights, exp_avgs, exp_avg_sqs) in float64 after one step, with the kernels' operand rounding."""
    operand = b.params[0].dtype
    t = b.steps_before + 1
    ws, ms, vs = [], [], []
    for w, g, m, v, basis in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases):
        g64, p64, r = projected64(b.side, operand, g, basis)
        m64 = HP["beta1"] * m.double() + (1 - HP["beta1"]) * r
        v64 = HP["beta2"] * v.double() + (1 - HP["beta2"]) * r * r
        n64 = m64 / (v64.sqrt() + HP["eps"]) * (step_size(lr, t) * HP["scale"])
        n64 = n64.float().to(operand).double()  # the kernel stores N in fp32 and feeds the dot in `operand`
        back = p64 @ n64 if b.side == "left" else n64 @ p64
        ws.append((w.double() - back) * (1 - lr * weight_decay))
        ms.append(m64); vs.append(v64)
    return ws, ms, vs


def bucket_step_torch(b: Bucket, lr: float, weight_decay: float) -> list:
    """The same-precision torch control: the step with torch matmuls in the parameter's dtype."""
    operand = b.params[0].dtype
    t = b.steps_before + 1
    out = []
    for w, g, m, v, basis in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases):
        p = basis.to(operand)
        r = (p.T @ g if b.side == "left" else g @ p.T).float()
        m1 = HP["beta1"] * m.float() + (1 - HP["beta1"]) * r
        v1 = HP["beta2"] * v.float() + (1 - HP["beta2"]) * r * r
        n = (m1 / (v1.sqrt() + HP["eps"]) * (step_size(lr, t) * HP["scale"])).to(operand)
        back = (p @ n if b.side == "left" else n @ p).float()
        out.append(((w.float() - back) * (1 - lr * weight_decay)).to(w.dtype))
    return out


def update_error(new: Tensor, old: Tensor, expected64: Tensor) -> float:
    """||(new - old) - (expected - old)|| / ||expected - old||: the error of the update itself (a
    weight moves by a small fraction of itself, so an error relative to the weight would hide it)."""
    delta64 = expected64 - old.double()
    return float((new.double() - expected64).norm() / delta64.norm())


def relative_error(x: Tensor, ref64: Tensor) -> float:
    return float((x.double() - ref64).norm() / ref64.norm())


def bf16_ulp(x: Tensor) -> Tensor:
    """The spacing of bf16 values at |x| (float64): 2^(exponent - 7)."""
    x = x.double().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def rounding_bias_ratio(new: Tensor, old: Tensor, expected64: Tensor) -> float:
    """For updates far below an ulp: how much of the expected movement the rounded weights made,
    sum(sign(d) (new - old)) / sum(|d|) in ulps, d = expected - old. Round to nearest gives 0 (every
    update lost); unbiased stochastic rounding gives 1 up to sampling noise."""
    ulp = bf16_ulp(old)
    d = (expected64 - old.double()) / ulp
    moved = (new.double() - old.double()) / ulp
    return float((torch.sign(d) * moved).sum() / d.abs().sum())


def float32_coefficient_errors(beta: float) -> tuple[float, float]:
    """How far the kernels' float32 ``beta`` and ``1 - beta`` (computed in float32) are from the exact
    ones: 1 - fp32(0.999) is 1.3e-5 relative off 0.001, about 200 float32 ulps."""
    beta32 = torch.tensor(beta, dtype=torch.float32)
    return abs(float(beta32) - beta), abs(float(1.0 - beta32) - (1.0 - beta))


def adam_moment_errors(m: Tensor, v: Tensor, r: Tensor, r_err) -> tuple[Tensor, Tensor]:
    """Per element, how far the kernels' float32 Adam moments ``b1 M + (1 - b1) R`` and
    ``b2 V + (1 - b2) R^2`` may be from the float64 ones (all float64 inputs): ``r_err`` (R's own
    float32 error) carried through, the float32 betas (float32_coefficient_errors), and the
    update's own float32 roundings."""
    b1, b2, u = HP["beta1"], HP["beta2"], 2.0 ** -24
    (d_b1, d_c1), (d_b2, d_c2) = float32_coefficient_errors(b1), float32_coefficient_errors(b2)
    err_m = (1 - b1) * r_err + d_b1 * m.abs() + d_c1 * r.abs() + 4 * u * (b1 * m.abs() + (1 - b1) * r.abs())
    err_v = ((1 - b2) * (2 * r.abs() * r_err + r_err ** 2) + d_b2 * v + d_c2 * r * r
             + 4 * u * (b2 * v + (1 - b2) * r * r))
    return err_m, err_v


def moment_error_bounds(b: Bucket) -> tuple[list, list]:
    """Per element, how far the kernel's float32 moments may be from ``bucket_step64``'s float64
    ones before any rounding to bf16 (adam_moment_errors), with R's float32 accumulation over K
    products bounded by K u sum|p||g| (the rigorous bound for u = 2^-24 and IEEE accumulation;
    tensor cores stay well inside it in practice). It matters where the moment nearly cancels
    (b1 M + (1 - b1) R ~ 0): there an ulp of the result is smaller than the float32 error of its terms."""
    operand = b.params[0].dtype
    err_m, err_v = [], []
    for g, m, v, basis in zip(b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases):
        g64, p64, r = projected64(b.side, operand, g, basis)
        r_abs = p64.abs().T @ g64.abs() if b.side == "left" else g64.abs() @ p64.abs().T
        k = g64.shape[0] if b.side == "left" else g64.shape[1]
        em, ev = adam_moment_errors(m.double(), v.double(), r, k * 2.0 ** -24 * r_abs)
        err_m.append(em)
        err_v.append(ev)
    return err_m, err_v


def check_rounded_state(stored: Tensor, ref64: Tensor, float32_error: Tensor) -> None:
    """bf16 moments are the float32 result rounded stochastically: each element is one of the two
    bf16 neighbours of its float32 value, which is within ``float32_error`` (``moment_error_bounds``)
    of the float64 reference; and (unlike rounding to nearest) often the farther one."""
    assert stored.dtype == torch.bfloat16
    ulp = bf16_ulp(ref64.abs() + float32_error)  # the float32 value's neighbours may be a binade up
    excess = (stored.double() - ref64).abs() - (ulp * 1.001 + float32_error)
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())} of {excess.numel()} elements are not a bf16 neighbour of their value; "
        f"worst: stored {float(stored.flatten()[worst]):.6e}, float64 {float(ref64.flatten()[worst]):.6e}, "
        f"ulp {float(ulp.flatten()[worst]):.3e}, float32 error bound {float(float32_error.flatten()[worst]):.3e}")
    farther = (stored.double() - ref64).abs() > ulp / 2 * 1.001
    assert int(farther.sum()) >= max(1, farther.numel() // 20), f"{int(farther.sum())} of {farther.numel()} farther"


# Stated tolerances. A kernel's update error must stay within CONTROL_FACTOR times the error of the
# same-precision torch control (flash-attention's rule) plus UPDATE_TOL: the control carries the
# conditioning of the draw (Adam's normalisation amplifies the rounding of tiny projected entries),
# UPDATE_TOL the kernel's own rounding. fp32: float32 accumulation against float64. 16-bit: at most
# half an ulp of the weight at the final rounding, small against the update at the test's weight
# scale (0.02) and learning rate (0.1). Moments see float32 accumulation of exact products only.
UPDATE_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}
MOMENT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
CONTROL_FACTOR = 2.0


def record_tma_decisions(monkeypatch) -> list:
    """The list that will hold every utils.tma_ready answer the GEMM launchers get (True: the
    launch loads its operands through TMA descriptors)."""
    from galore_kernels.triton_ops import back_apply, project

    decisions = []
    for module in (project, back_apply):
        real = module.tma_ready
        monkeypatch.setattr(module, "tma_ready", lambda cfg, rows, real=real: decisions.append(real(cfg, rows)) or decisions[-1])
    return decisions


def projection_launch(m: int, n: int, rank: int, side: str, dtype=torch.bfloat16, batch: int = 1) -> tuple:
    """(output tiles x batch, K steps, K steps per split, splits) of the projection launch that
    steps a bucket of ``batch`` (m, n) weights: what project_partials_triton decides."""
    from galore_kernels.triton_ops import project, utils

    cfg, tiles, per_split, splits = project.projection_launch(side, (m, n), rank, dtype, batch)
    reduction = m if side == "left" else n
    return tiles * batch, utils.cdiv(reduction, cfg.block_k), per_split, splits
