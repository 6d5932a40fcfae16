"""The fused step's kernels against float64 references: odd shapes, ranks 8 and 16, both sides,
fp32/bf16/fp16, weight decay on and off, the first and a later step, outputs poisoned first."""
import zlib

import pytest
import torch

from triton_parity import (CONTROL_FACTOR, HP, MOMENT_TOL, UPDATE_TOL, adam_moment_errors, bf16_ulp, bucket_step64,
                           bucket_step_torch, check_rounded_state, make_bucket, moment_error_bounds,
                           record_tma_decisions, relative_error, rounding_bias_ratio, step_size, update_error)

from galore_kernels.triton_ops import project as project_module
from galore_kernels.triton_ops.adam import dense_adamw_triton, lowrank_adam_triton
from galore_kernels.triton_ops.back_apply import back_apply_triton
from galore_kernels.triton_ops.nonfinite import nonfinite_flags_triton
from galore_kernels.triton_ops.project import lowrank_project_triton, project_partials_triton
from galore_kernels.reference import galore_adamw_update_reference
from galore_kernels.triton_ops.step import dense_adamw_step_triton, galore_adamw_step_triton, update_triton

SHAPES = [(33, 65), (65, 33), (48, 80)]
LR = 0.1


def run_bucket(b, lr, weight_decay, rounding_seeds=None):
    """One bucket step; with ``rounding_seeds`` the bf16 weights are rounded stochastically."""
    steps = torch.full((len(b.params),), b.steps_before, dtype=torch.int32)
    galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps,
                             torch.tensor([lr]), side=b.side, weight_decay=weight_decay, rounding_seeds=rounding_seeds,
                             stochastic_rounding=rounding_seeds is not None, **HP)
    return steps


def step_and_check_against_float64(b, weight_decay=0.1):
    """Steps bucket ``b`` and checks it against float64 with the kernels' operand rounding: each
    weight's update within CONTROL_FACTOR times the same-precision torch control's error plus
    UPDATE_TOL, the moments within MOMENT_TOL. Returns (the bucket before the step, the step counts)."""
    dtype = b.params[0].dtype
    old = b.clone()
    expected_w, expected_m, expected_v = bucket_step64(old, LR, weight_decay)
    control = bucket_step_torch(old, LR, weight_decay)
    steps = run_bucket(b, LR, weight_decay)
    for i in range(len(b.params)):
        err = update_error(b.params[i], old.params[i], expected_w[i])
        control_err = update_error(control[i], old.params[i], expected_w[i])
        assert err <= CONTROL_FACTOR * control_err + UPDATE_TOL[dtype], (i, err, control_err)
        assert relative_error(b.exp_avgs[i], expected_m[i]) <= MOMENT_TOL[dtype]
        assert relative_error(b.exp_avg_sqs[i], expected_v[i]) <= MOMENT_TOL[dtype]
    return old, steps


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("steps_before", [0, 5])
def test_galore_bucket_step_matches_float64(shape, rank, side, dtype, weight_decay, steps_before):
    seed = zlib.crc32(repr((shape, rank, side, dtype, weight_decay, steps_before)).encode())
    b = make_bucket(shape, rank, side, dtype, batch=2, steps_before=steps_before, seed=seed)
    _, steps = step_and_check_against_float64(b, weight_decay)
    assert steps.tolist() == [steps_before + 1] * 2
    for i in range(2):
        assert b.params[i].dtype == dtype and torch.isfinite(b.params[i]).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps_before", [0, 5])
def test_bf16_moments_are_rounded_once_and_the_step_uses_float32(side, dtype, steps_before):
    """state_dtype="bfloat16": the moments are read in float32 and stored rounded stochastically;
    the update is computed from the unrounded values, so it has the float32-moment tolerance."""
    b = make_bucket((33, 65), 8, side, dtype, batch=2, steps_before=steps_before, seed=41 + steps_before,
                    state_dtype=torch.bfloat16)
    old = b.clone()
    expected_w, expected_m, expected_v = bucket_step64(old, LR, 0.1)
    control = bucket_step_torch(old, LR, 0.1)
    for x in b.exp_avgs:
        assert x.dtype == torch.bfloat16
    err_m, err_v = moment_error_bounds(old)
    run_bucket(b, LR, 0.1)
    for i in range(2):
        err = update_error(b.params[i], old.params[i], expected_w[i])
        control_err = update_error(control[i], old.params[i], expected_w[i])
        assert err <= CONTROL_FACTOR * control_err + UPDATE_TOL[dtype], (i, err, control_err)
        check_rounded_state(b.exp_avgs[i], expected_m[i], err_m[i])
        check_rounded_state(b.exp_avg_sqs[i], expected_v[i], err_v[i])


@pytest.mark.parametrize("side", ["left", "right"])
def test_stochastic_rounding_keeps_updates_far_below_an_ulp(side):
    """lr 1e-2 with weights ~0.3: the updates are about a tenth of an ulp. Round to nearest loses
    nearly all of them; stochastic rounding moves each weight to a bf16 neighbour of its float32 value
    and, summed, by the expected amount (sampling noise about 5% here). Weights near 0.3 so that no
    update crosses a binade."""
    lr = 1e-2
    b = make_bucket((48, 80), 8, side, torch.bfloat16, batch=2, steps_before=3, seed=23, weight_scale=1.0)
    for w in b.params:
        w.copy_((w.float().sign() * 0.3 + w.float() * 1e-3).bfloat16())  # |w| in [0.25, 0.5)
    old = b.clone()
    expected_w, _, _ = bucket_step64(old, lr, 0.0)
    nearest = b.clone()
    run_bucket(nearest, lr, 0.0)
    for i in range(2):
        assert rounding_bias_ratio(nearest.params[i], old.params[i], expected_w[i]) < 0.25  # the few above half an ulp
    seeds = torch.tensor([5, 6], dtype=torch.int64)
    run_bucket(b, lr, 0.0, rounding_seeds=seeds)
    for i in range(2):
        off = (b.params[i].double() - expected_w[i]).abs() / bf16_ulp(expected_w[i])
        assert float(off.max()) <= 1.0, "not a bf16 neighbour of the float32 value"
        ratio = rounding_bias_ratio(b.params[i], old.params[i], expected_w[i])
        assert 0.85 < ratio < 1.15, ratio
    again = old.clone()
    run_bucket(again, lr, 0.0, rounding_seeds=seeds)
    assert all(torch.equal(x, y) for x, y in zip(again.params, b.params))  # reproducible
    other = old.clone()
    run_bucket(other, lr, 0.0, rounding_seeds=torch.tensor([7, 6], dtype=torch.int64))
    assert not torch.equal(other.params[0], b.params[0]) and torch.equal(other.params[1], b.params[1])


def test_stochastic_rounding_of_dense_weights():
    shape, lr = (65, 33), 1e-3
    params = [torch.ones(shape, dtype=torch.bfloat16) for _ in range(2)]
    grads = [torch.ones(shape, dtype=torch.bfloat16) for _ in range(2)]
    ms, vs = [torch.zeros(shape) for _ in range(2)], [torch.zeros(shape) for _ in range(2)]
    steps = torch.zeros(2, dtype=torch.int32)
    dense_adamw_step_triton(params, grads, ms, vs, steps, torch.tensor([lr]), beta1=0.9, beta2=0.999, eps=0.0,
                            weight_decay=0.0, rounding_seeds=torch.tensor([1, 2], dtype=torch.int64),
                            stochastic_rounding=True)
    # The first Adam step is -lr exactly: 1 - 1e-3 lies between 1 - 2^-8 and 1, 0.256 of the way down.
    for w in params:
        values = set(w.float().unique().tolist())
        assert values <= {1.0, 1.0 - 2**-8}
        fraction = float((w.float() < 1).double().mean())
        assert abs(fraction - 1e-3 / 2**-8) < 0.05, fraction
    assert not torch.equal(params[0], params[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_fp16_bucket_step(side):
    b = make_bucket((48, 80), 16, side, torch.float16, batch=3, steps_before=2, seed=11)
    old = b.clone()
    expected_w, _, _ = bucket_step64(old, LR, 0.1)
    run_bucket(b, LR, 0.1)
    for i in range(3):
        assert update_error(b.params[i], old.params[i], expected_w[i]) <= UPDATE_TOL[torch.float16]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_writes_every_element(side, dtype):
    b = make_bucket((65, 33), 8, side, dtype, batch=3, steps_before=1, seed=3)
    low = b.exp_avgs[0].shape
    out = torch.full((3, *low), float("nan"))
    lowrank, nonfinite = lowrank_project_triton(b.grads, b.bases, side, 8, out=out)
    assert lowrank is out and nonfinite.tolist() == [0, 0, 0]
    for i in range(3):
        g, p = b.grads[i].double(), b.bases[i].to(dtype).double()
        expected = p.T @ g if side == "left" else g @ p.T
        assert relative_error(out[i], expected) <= 1e-6


def test_adam_phase_writes_every_element_and_scales():
    gen = torch.Generator().manual_seed(5)
    lowrank = torch.randn(2, 8, 33, generator=gen)
    ms = [torch.randn(8, 33, generator=gen) for _ in range(2)]
    vs = [torch.rand(8, 33, generator=gen) + 0.01 for _ in range(2)]
    m0, v0 = [m.clone() for m in ms], [v.clone() for v in vs]
    out = torch.full_like(lowrank, float("nan"))
    steps = torch.tensor([0, 9], dtype=torch.int32)
    lowrank_adam_triton(lowrank, ms, vs, steps, torch.tensor([0.01]), torch.zeros(2, dtype=torch.int32),
                        beta1=0.9, beta2=0.999, eps=1e-6, scale=0.25, correct_bias=True, out=out)
    for i, t in enumerate([1, 10]):
        m = 0.9 * m0[i].double() + 0.1 * lowrank[i].double()
        v = 0.999 * v0[i].double() + 0.001 * lowrank[i].double() ** 2
        n = m / (v.sqrt() + 1e-6) * step_size(0.01, t) * 0.25
        assert relative_error(out[i], n) <= 1e-6
        assert relative_error(ms[i], m) <= 1e-6 and relative_error(vs[i], v) <= 1e-6


def test_no_bias_correction_uses_plain_lr():
    lowrank = torch.randn(1, 4, 16)
    m, v = [torch.zeros(4, 16)], [torch.zeros(4, 16)]
    out = lowrank_adam_triton(lowrank, m, v, torch.tensor([3], dtype=torch.int32), torch.tensor([0.5]),
                              torch.zeros(1, dtype=torch.int32), beta1=0.9, beta2=0.999, eps=1e-6, scale=1.0,
                              correct_bias=False)
    expected = (0.1 * lowrank[0].double()) / ((0.001 * lowrank[0].double() ** 2).sqrt() + 1e-6) * 0.5
    assert relative_error(out[0], expected) <= 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, on the Inf/NaN
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_nonfinite_gradient_leaves_only_its_matrix_untouched(bad, side):
    b = make_bucket((33, 65), 8, side, torch.float32, batch=3, steps_before=4, seed=7)
    b.grads[1][5, 7] = bad
    old = b.clone()
    expected_w, expected_m, _ = bucket_step64(old, LR, 0.1)
    steps = run_bucket(b, LR, 0.1)
    assert steps.tolist() == [5, 5, 5]  # a masked step still counts (no host synchronisation)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert torch.equal(getattr(b, key)[1], getattr(old, key)[1]), key
    for i in (0, 2):
        assert update_error(b.params[i], old.params[i], expected_w[i]) <= UPDATE_TOL[torch.float32]
        assert relative_error(b.exp_avgs[i], expected_m[i]) <= 1e-5


@pytest.mark.parametrize("shape", [(33,), (65, 33), (7, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_bucket_step_matches_float64(shape, dtype, weight_decay):
    gen = torch.Generator().manual_seed(len(shape) * 7 + int(weight_decay * 10))
    params = [(torch.randn(shape, generator=gen) * 0.02).to(dtype) for _ in range(3)]
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    ms = [torch.randn(shape, generator=gen) * 0.1 for _ in range(3)]
    vs = [torch.rand(shape, generator=gen) * 0.01 + 1e-4 for _ in range(3)]
    old = [x.clone() for x in params]
    m0, v0 = [x.clone() for x in ms], [x.clone() for x in vs]
    grads[2].view(-1)[0] = float("nan")
    steps = torch.tensor([0, 3, 3], dtype=torch.int32)
    dense_adamw_step_triton(params, grads, ms, vs, steps, torch.tensor([LR]), beta1=0.9, beta2=0.999, eps=1e-6,
                            weight_decay=weight_decay)
    assert steps.tolist() == [1, 4, 4]
    for i, t in enumerate([1, 4]):
        g = grads[i].double()
        m = 0.9 * m0[i].double() + 0.1 * g
        v = 0.999 * v0[i].double() + 0.001 * g * g
        w = (old[i].double() - step_size(LR, t) * m / (v.sqrt() + 1e-6)) * (1 - LR * weight_decay)
        assert update_error(params[i], old[i], w) <= UPDATE_TOL[dtype]
        assert relative_error(ms[i], m) <= 1e-6
    assert torch.equal(params[2], old[2]) and torch.equal(ms[2], m0[2]) and torch.equal(vs[2], v0[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_bucket_step_with_bf16_moments(dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (65, 33)
    params = [(torch.randn(shape, generator=gen) * 0.02).to(dtype) for _ in range(2)]
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
    ms = [(torch.randn(shape, generator=gen) * 0.1).bfloat16() for _ in range(2)]
    vs = [(torch.rand(shape, generator=gen) * 0.01 + 1e-4).bfloat16() for _ in range(2)]
    old, m0, v0 = [x.clone() for x in params], [x.clone() for x in ms], [x.clone() for x in vs]
    steps = torch.tensor([3, 3], dtype=torch.int32)
    dense_adamw_step_triton(params, grads, ms, vs, steps, torch.tensor([LR]), beta1=0.9, beta2=0.999, eps=1e-6,
                            weight_decay=0.1)
    for i in range(2):
        g = grads[i].double()
        m = 0.9 * m0[i].double() + 0.1 * g
        v = 0.999 * v0[i].double() + 0.001 * g * g
        w = (old[i].double() - step_size(LR, 4) * m / (v.sqrt() + 1e-6)) * (1 - LR * 0.1)
        assert update_error(params[i], old[i], w) <= UPDATE_TOL[dtype]
        err_m, err_v = adam_moment_errors(m0[i].double(), v0[i].double(), g, 0.0)  # no accumulation: R is G
        check_rounded_state(ms[i], m, err_m)
        check_rounded_state(vs[i], v, err_v)


def test_nonfinite_flags():
    xs = [torch.randn(300) for _ in range(4)]
    xs[1][299] = float("inf")
    xs[3][0] = float("nan")
    assert nonfinite_flags_triton(xs).tolist() == [0, 1, 0, 1]


def test_dense_phase_alone_respects_flags():
    p, g = [torch.randn(40)], [torch.randn(40)]
    m, v = [torch.zeros(40)], [torch.zeros(40)]
    before = p[0].clone()
    dense_adamw_triton(p, g, m, v, torch.zeros(1, dtype=torch.int32), torch.tensor([0.1]),
                       torch.ones(1, dtype=torch.int32), beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1,
                       correct_bias=True)
    assert torch.equal(p[0], before) and torch.equal(m[0], torch.zeros(40))


def test_bucket_rejects_mismatched_inputs():
    b = make_bucket((33, 65), 8, "left", torch.float32, batch=2, steps_before=0, seed=1)
    steps, lr = torch.zeros(2, dtype=torch.int32), torch.tensor([0.1])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        galore_adamw_step_triton(b.params, [b.grads[0], b.grads[1][:, :64]], b.exp_avgs, b.exp_avg_sqs, b.bases,
                                 steps, lr, side="left", weight_decay=0.0, **HP)
    with pytest.raises(ValueError, match="not contiguous"):
        galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs,
                                 [b.bases[0], b.bases[1].T.contiguous().T], steps, lr, side="left", weight_decay=0.0, **HP)
    with pytest.raises(ValueError, match="steps must be a contiguous int32"):
        galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps.long(), lr,
                                 side="left", weight_decay=0.0, **HP)
    with pytest.raises(ValueError, match="'full' runs on the reference"):
        galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps, lr,
                                 side="full", weight_decay=0.0, **HP)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_bases_give_the_same_step_as_float32_bases(side, dtype):
    """The optimizer hands 16-bit weights their basis in their own dtype (no conversion in the
    kernels); the kernels round a float32 basis to that dtype themselves: the same step, bit for bit."""
    b32 = make_bucket((48, 80), 16, side, dtype, batch=2, steps_before=3, seed=21)
    b16 = b32.clone()
    b16.bases = [basis.to(dtype) for basis in b16.bases]
    run_bucket(b32, LR, 0.1)
    run_bucket(b16, LR, 0.1)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for x, y in zip(getattr(b32, key), getattr(b16, key)):
            assert torch.equal(x, y), key


# Operands through TMA tensor descriptors (GALORE_KERNELS_GEMM_CONFIG's sixth field), which the
# interpreter emulates: rows of 16-byte multiples take them, others fall back to pointer loads.
TMA_CONFIG = "32,64,32,4,1,1"


@pytest.mark.parametrize("shape, rank, takes_tma", [((48, 80), 16, True), ((80, 48), 8, True), ((33, 65), 8, False)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_operand_loads_match_float64(monkeypatch, shape, rank, takes_tma, side, dtype):
    decisions = record_tma_decisions(monkeypatch)
    monkeypatch.setenv("GALORE_KERNELS_GEMM_CONFIG", TMA_CONFIG)
    seed = zlib.crc32(repr(("tma", shape, rank, side, dtype)).encode())
    b = make_bucket(shape, rank, side, dtype, batch=2, steps_before=5, seed=seed)
    bases = [p.to(dtype) for p in b.bases]  # what the optimizer hands the kernels for 16-bit weights
    out = torch.full((2, *b.exp_avgs[0].shape), float("nan"))
    lowrank, _ = lowrank_project_triton(b.grads, bases, side, rank, out=out)
    for i in range(2):
        g, p = b.grads[i].double(), bases[i].double()
        assert relative_error(lowrank[i], p.T @ g if side == "left" else g @ p.T) <= 1e-6
    step_and_check_against_float64(make_bucket(shape, rank, side, dtype, batch=2, steps_before=5, seed=seed))
    assert decisions and all(d == takes_tma for d in decisions), decisions


# Split-K projection (utils.project_splits): the interpreter's tiles (BLOCK_K 32) with the count fixed
# at three by the projection's own setting. K = 160 or 130 is 5 steps (splits of 2, 2 and 1), K = 97
# is 4 (2 and 2: never an empty split); K = 30 is one step, which no count splits.
SPLIT_CONFIG = "32,64,32,4,1,0,3"
SPLIT_CASES = [((160, 48), 8, "left", 3), ((48, 130), 16, "right", 3), ((97, 40), 8, "left", 2), ((30, 40), 8, "left", 1)]


def poisoned_partials(monkeypatch) -> None:
    """Partial-product scratch filled with NaN, so that a partial left unwritten fails the test."""
    real = project_module.partials_scratch

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(project_module, "partials_scratch", poisoned)


@pytest.mark.parametrize("shape, rank, side, splits", SPLIT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_projection_partials_cover_the_reduction(monkeypatch, shape, rank, side, splits, dtype):
    """Each partial is the product over its own range of K steps, and in order they add up to R."""
    monkeypatch.setenv("GALORE_KERNELS_PROJECT_CONFIG", SPLIT_CONFIG)
    poisoned_partials(monkeypatch)
    b = make_bucket(shape, rank, side, dtype, batch=2, steps_before=1, seed=zlib.crc32(repr((shape, side)).encode()))
    bases = [p.to(dtype) for p in b.bases]
    partials, nonfinite = project_partials_triton(b.grads, bases, side, rank)
    assert partials.shape[:2] == (2, splits) and nonfinite.tolist() == [0, 0]
    reduction = shape[0] if side == "left" else shape[1]
    bounds = [min(reduction, 64 * s) for s in range(splits + 1)] if splits > 1 else [0, reduction]
    for i in range(2):
        g, p = b.grads[i].double(), bases[i].double()
        for s in range(splits):
            k = slice(bounds[s], bounds[s + 1])
            expected = p[k].T @ g[k] if side == "left" else g[:, k] @ p[:, k].T
            assert relative_error(partials[i, s], expected) <= 1e-6, (i, s)
    out = torch.full((2, *b.exp_avgs[0].shape), float("nan"))
    summed, _ = lowrank_project_triton(b.grads, bases, side, rank, out=out)
    assert summed is out
    for i in range(2):
        g, p = b.grads[i].double(), bases[i].double()
        assert relative_error(out[i], p.T @ g if side == "left" else g @ p.T) <= 1e-6


@pytest.mark.parametrize("shape, rank, side, splits", SPLIT_CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_projection_step_matches_float64_and_its_summed_r(monkeypatch, shape, rank, side, splits, dtype):
    """The whole bucket step with a split projection is within the usual tolerances of float64, and
    bit for bit the Adam phase run on R summed by sum_partials (what layer-wise accumulation feeds it):
    the kernel adds the partials in the same order."""
    monkeypatch.setenv("GALORE_KERNELS_PROJECT_CONFIG", SPLIT_CONFIG)
    poisoned_partials(monkeypatch)
    b = make_bucket(shape, rank, side, dtype, batch=2, steps_before=5, seed=zlib.crc32(repr(("step", shape)).encode()))
    old, _ = step_and_check_against_float64(b)
    # The same step with R summed outside the Adam kernel.
    again = old.clone()
    lowrank, nonfinite = lowrank_project_triton(again.grads, again.bases, side, rank)
    steps = torch.full((2,), again.steps_before, dtype=torch.int32)
    normalized = lowrank_adam_triton(lowrank, again.exp_avgs, again.exp_avg_sqs, steps, torch.tensor([LR]), nonfinite,
                                     out_dtype=dtype, correct_bias=True, **HP)
    back_apply_triton(again.params, normalized, again.bases, torch.tensor([LR]), nonfinite, side=side, weight_decay=0.1)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for x, y in zip(getattr(b, key), getattr(again, key)):
            assert torch.equal(x, y), key


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_split_projection_flags_a_nonfinite_gradient_in_any_split(monkeypatch):
    monkeypatch.setenv("GALORE_KERNELS_PROJECT_CONFIG", SPLIT_CONFIG)
    b = make_bucket((160, 48), 8, "left", torch.float32, batch=3, steps_before=2, seed=9)
    b.grads[0][3, 5] = float("inf")  # first split's rows
    b.grads[2][150, 40] = float("nan")  # last split's rows
    old = b.clone()
    run_bucket(b, LR, 0.1)
    for i in (0, 2):
        for key in ("params", "exp_avgs", "exp_avg_sqs"):
            assert torch.equal(getattr(b, key)[i], getattr(old, key)[i]), (i, key)
    assert not torch.equal(b.params[1], old.params[1])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, on the Inf it flags
def test_split_partials_whose_sum_could_overflow_mask_the_step(monkeypatch):
    """Each partial is finite, but their sum overflows to Inf in the Adam kernel: the projection flags
    partials above FLT_MAX / splits, so the step is masked as it is without splits (there the
    accumulator itself overflows)."""
    for setting in (None, SPLIT_CONFIG):
        if setting:
            monkeypatch.setenv("GALORE_KERNELS_PROJECT_CONFIG", setting)
        b = make_bucket((160, 48), 8, "left", torch.float32, batch=2, steps_before=2, seed=13)
        b.bases[0].zero_()
        b.bases[0][0, 0] = b.bases[0][64, 0] = 1.0  # rows in the first and the second split
        b.grads[0][0, 0] = b.grads[0][64, 0] = 2e38
        partials, nonfinite = project_partials_triton(b.grads, b.bases, "left", 8)
        assert partials.shape[1] == (3 if setting else 1) and torch.isfinite(partials[0, :, 0, 0]).all() == bool(setting)
        assert nonfinite.tolist() == [1, 0], setting
        old = b.clone()
        run_bucket(b, LR, 0.1)
        for key in ("params", "exp_avgs", "exp_avg_sqs"):
            assert torch.equal(getattr(b, key)[0], getattr(old, key)[0]), (setting, key)
        assert not torch.equal(b.params[1], old.params[1])


def test_automatic_split_count_runs_end_to_end(monkeypatch):
    """The split count the launcher chooses itself (utils.project_splits), with its thresholds scaled
    down to the interpreter's tiny shapes: 2 programs, 5 K steps -> 3 splits (2 + 2 + 1 steps)."""
    from galore_kernels.triton_ops import utils

    monkeypatch.setattr(utils, "MIN_PROGRAMS", 64)
    monkeypatch.setattr(utils, "MIN_SPLIT_STEPS", 1)
    poisoned_partials(monkeypatch)
    b = make_bucket((160, 48), 8, "left", torch.bfloat16, batch=2, steps_before=3, seed=31)
    partials, _ = project_partials_triton(b.grads, b.bases, "left", 8)
    assert partials.shape[:2] == (2, 3)
    step_and_check_against_float64(b)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_prefetch_changes_no_bit(monkeypatch, side, dtype):
    """Loading the W tile before the GEMM loop (utils.prefetch_weight) or after it: the same step."""
    runs = []
    for setting in ("1", "0"):
        monkeypatch.setenv("GALORE_KERNELS_PREFETCH_W", setting)
        b = make_bucket((65, 33), 8, side, dtype, batch=2, steps_before=2, seed=17)
        run_bucket(b, LR, 0.1)
        runs.append(b)
    for x, y in zip(runs[0].params, runs[1].params):
        assert torch.equal(x, y)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape, rank", [((65, 33), 8), ((48, 80), 16)])
@pytest.mark.parametrize("tma", [False, True])
def test_k_major_operands_change_no_bit(monkeypatch, side, shape, rank, tma):
    """TF32 makes the GEMMs read transposed copies (utils.k_major_operands: the back-projection's B,
    the left projection's P^T; the interpreter never runs TF32, so it is forced here): the same step,
    bit for bit, as the operands read as stored; also through TMA descriptors (48x80 at rank 16:
    rows of 16-byte multiples)."""
    from galore_kernels.triton_ops import back_apply

    if tma:
        monkeypatch.setenv("GALORE_KERNELS_GEMM_CONFIG", TMA_CONFIG)
    runs = []
    for k_major in (True, False):
        for module in (back_apply, project_module):
            monkeypatch.setattr(module, "k_major_operands", lambda dtype, k_major=k_major: k_major)
        b = make_bucket(shape, rank, side, torch.float32, batch=3, steps_before=2, seed=19)
        run_bucket(b, LR, 0.1)
        runs.append(b)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for x, y in zip(getattr(runs[0], key), getattr(runs[1], key)):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("side, shape, rank", [("right", (27, 20), 6), ("left", (20, 27), 5)])
def test_per_parameter_update_at_an_unaligned_lowrank_size(side, shape, rank):
    """update_triton (layer-wise mode's path, and FSDP2-sharded parameters') with an R whose element
    count is no multiple of 4 (27 x 6, 5 x 27): its one-slice scratch must still pass the kernels'
    16-byte checks (a view of a batch of one once took the unpadded size as its batch stride)."""
    gen = torch.Generator().manual_seed(11)
    m, n = shape
    basis = torch.linalg.qr(torch.randn(max(m, n), rank, generator=gen))[0]
    proj_left, proj_right = (basis[:m].contiguous(), None) if side == "left" else (None, basis[:n].T.contiguous())
    lowrank = torch.randn((rank, n) if side == "left" else (m, rank), generator=gen)
    moments = [torch.rand(lowrank.shape, generator=gen) for _ in range(2)]
    param = torch.randn(shape, generator=gen)
    expected = [t.clone() for t in (param, *moments)]
    scalars = dict(side=side, step=3, lr=LR, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, scale=0.25,
                   correct_bias=True)
    galore_adamw_update_reference(expected[0], lowrank, expected[1], expected[2], proj_left, proj_right, **scalars)
    update_triton(param, lowrank, moments[0], moments[1], proj_left, proj_right, **scalars)
    for got, want in zip((param, *moments), expected):
        assert relative_error(got, want) <= 1e-6
