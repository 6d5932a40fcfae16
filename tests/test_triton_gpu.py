"""The Triton step on a GPU (skipped without one): parity at realistic shapes, a multi-step run of
GaLoreAdamW(backend="triton") against the reference, and CUDA-graph replay against eager steps.

Run by benchmarks/gpu_check.sh on the GPU machines; the same kernels are checked on the CPU in CI
through Triton's interpreter (tests/triton_interp) and compiled ahead of time for sm_90
(tests/test_triton_compile.py).
"""

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW
from triton_parity import (CONTROL_FACTOR, HP, MOMENT_TOL, UPDATE_TOL, bf16_ulp, bucket_step64, bucket_step_torch,
                           check_rounded_state, make_bucket, moment_error_bounds, projection_launch, relative_error,
                           rounding_bias_ratio, update_error)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Odd and realistic shapes (the anchor model's MLP is 2736 wide); ranks as trained.
SHAPES = [((1024, 2736), 256), ((2736, 1024), 256), ((1023, 2049), 100), ((4096, 4096), 512)]
TF32_TOL = 5e-3  # TF32 operands keep 10 mantissa bits: about bf16's error, a little better


@pytest.fixture(autouse=True)
def _restore_float32_precision():
    """A test that sets torch's float32 matmul precision leaves it as it found it."""
    previous = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def float32_precision(request):
    torch.set_float32_matmul_precision(request.param)
    return request.param


def run_bucket_cuda(b, lr, weight_decay):
    from galore_kernels.triton_ops.step import galore_adamw_step_triton

    steps = torch.full((len(b.params),), b.steps_before, dtype=torch.int32, device="cuda")
    galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps,
                             torch.tensor([lr], device="cuda"), side=b.side, weight_decay=weight_decay, **HP)
    torch.cuda.synchronize()
    return steps


def to_cpu(b):
    return type(b)(*[[t.cpu() for t in xs] for xs in (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases)],
                   b.steps_before, b.side)


@pytest.mark.parametrize("shape, rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps_before", [0, 7])
def test_16bit_bucket_step_matches_float64(shape, rank, dtype, steps_before):
    side = "left" if shape[0] < shape[1] else "right"
    b = make_bucket(shape, rank, side, dtype, batch=2, steps_before=steps_before, seed=rank + steps_before, device="cuda")
    old = to_cpu(b)
    expected_w, expected_m, _ = bucket_step64(old, 0.1, 0.1)
    control = bucket_step_torch(make_bucket(shape, rank, side, dtype, 2, steps_before, rank + steps_before, "cuda"), 0.1, 0.1)
    assert run_bucket_cuda(b, 0.1, 0.1).tolist() == [steps_before + 1] * 2
    for i in range(2):
        err = update_error(b.params[i].cpu(), old.params[i], expected_w[i])
        control_err = update_error(control[i].cpu(), old.params[i], expected_w[i])
        assert err <= CONTROL_FACTOR * control_err + UPDATE_TOL[dtype], (err, control_err)
        assert relative_error(b.exp_avgs[i].cpu(), expected_m[i]) <= MOMENT_TOL[dtype]


@pytest.mark.parametrize("shape, rank", SHAPES[:3])
@pytest.mark.parametrize("float32_precision", ["highest", "high"], indirect=True)
def test_float32_bucket_step_follows_matmul_precision(shape, rank, float32_precision):
    errs, m_errs = float32_step_errors(shape, rank)
    if float32_precision == "highest":  # IEEE fp32 dot
        assert max(errs) <= 1e-5 and max(m_errs) <= 1e-5, (errs, m_errs)
    else:  # TF32: clearly worse than IEEE, clearly better than nothing
        assert max(errs) <= TF32_TOL and 1e-6 < max(m_errs) <= TF32_TOL, (errs, m_errs)


def float32_step_errors(shape, rank) -> tuple[list, list]:
    """(update errors, first-moment errors) against float64 of one step of a bucket of two float32
    weights, at whatever float32 matmul precision torch is set to."""
    side = "left" if shape[0] < shape[1] else "right"
    b = make_bucket(shape, rank, side, torch.float32, batch=2, steps_before=3, seed=rank, device="cuda")
    old = to_cpu(b)
    expected_w, expected_m, _ = bucket_step64(old, 0.1, 0.0)
    run_bucket_cuda(b, 0.1, 0.0)
    errs = [update_error(b.params[i].cpu(), old.params[i], expected_w[i]) for i in range(2)]
    return errs, [relative_error(b.exp_avgs[i].cpu(), expected_m[i]) for i in range(2)]


# Thin single matrices: fewer projection tiles than SMs, so the reduction is split and R reaches the
# Adam kernel as partial products (utils.project_splits).
SPLIT_SHAPES = [((4096, 4096), 128, "right"), ((2048, 8192), 64, "left")]


@pytest.mark.parametrize("shape, rank, side", SPLIT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_projection_step_matches_float64(shape, rank, side, dtype):
    assert projection_launch(*shape, rank, side, dtype)[3] > 1
    b = make_bucket(shape, rank, side, dtype, batch=1, steps_before=4, seed=rank, device="cuda")
    old = to_cpu(b)
    expected_w, expected_m, expected_v = bucket_step64(old, 0.1, 0.1)
    control = bucket_step_torch(make_bucket(shape, rank, side, dtype, 1, 4, rank, "cuda"), 0.1, 0.1)
    run_bucket_cuda(b, 0.1, 0.1)  # float32: torch's default "highest", IEEE dots
    err = update_error(b.params[0].cpu(), old.params[0], expected_w[0])
    control_err = update_error(control[0].cpu(), old.params[0], expected_w[0])
    assert err <= CONTROL_FACTOR * control_err + UPDATE_TOL[dtype], (err, control_err)
    assert relative_error(b.exp_avgs[0].cpu(), expected_m[0]) <= MOMENT_TOL[dtype]
    assert relative_error(b.exp_avg_sqs[0].cpu(), expected_v[0]) <= MOMENT_TOL[dtype]


@pytest.mark.parametrize("shape, rank", SHAPES[:2])
def test_bf16_state_and_stochastic_rounding_at_realistic_shapes(shape, rank):
    """The compiled random-bits paths (Philox words 0-2): bf16 moments are bf16 neighbours of the
    float64 values, often the farther one (stochastic rounding); with updates far below an ulp the
    stochastically rounded weights move by the expected amount, where rounding to nearest would not."""
    from galore_kernels.triton_ops.step import galore_adamw_step_triton

    side = "left" if shape[0] < shape[1] else "right"
    lr = 1e-2
    b = make_bucket(shape, rank, side, torch.bfloat16, batch=2, steps_before=3, seed=rank, device="cuda",
                    weight_scale=1.0, state_dtype=torch.bfloat16)
    for w in b.params:  # |w| in [0.25, 0.5): no update crosses a binade
        w.copy_((w.float().sign() * 0.3 + w.float() * 1e-3).bfloat16())
    old = to_cpu(b)
    expected_w, expected_m, expected_v = bucket_step64(old, lr, 0.0)
    err_m, err_v = moment_error_bounds(old)
    steps = torch.full((2,), 3, dtype=torch.int32, device="cuda")
    galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps,
                             torch.tensor([lr], device="cuda"), side=side, weight_decay=0.0,
                             rounding_seeds=torch.tensor([5, 6], device="cuda"), stochastic_rounding=True, **HP)
    torch.cuda.synchronize()
    for i in range(2):
        check_rounded_state(b.exp_avgs[i].cpu(), expected_m[i], err_m[i])
        check_rounded_state(b.exp_avg_sqs[i].cpu(), expected_v[i], err_v[i])
        # The float32 weight before rounding is within ~1e-4 of an ulp of the float64 one here
        # (|w| ~ 0.3, the update's accumulation over the rank is tiny against it).
        off = (b.params[i].cpu().double() - expected_w[i]).abs() / bf16_ulp(expected_w[i])
        assert float(off.max()) <= 1.001, f"a weight is {float(off.max()):.4f} ulps from its float64 value"
        ratio = rounding_bias_ratio(b.params[i].cpu(), old.params[i], expected_w[i])
        assert 0.9 < ratio < 1.1, ratio


def test_nonfinite_gradient_masks_on_device():
    b = make_bucket((1024, 2736), 64, "left", torch.bfloat16, batch=3, steps_before=2, seed=1, device="cuda")
    b.grads[2][100, 2000] = float("nan")
    old = b.clone()
    run_bucket_cuda(b, 0.1, 0.1)
    assert torch.equal(b.params[2], old.params[2]) and torch.equal(b.exp_avgs[2], old.exp_avgs[2])
    assert not torch.equal(b.params[0], old.params[0])


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 384), nn.GELU(), nn.Linear(384, 256),
                         nn.LayerNorm(256)).cuda()


def groups(model, gap=4):
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "rank": 32, "update_proj_gap": gap},
            {"params": [p for p in model.parameters() if p.dim() != 2]}]


def data(n):
    gen = torch.Generator(device="cuda").manual_seed(3)
    return [torch.randn(64, 256, device="cuda", generator=gen) for _ in range(n)]


def test_multi_step_triton_matches_reference():
    torch.set_float32_matmul_precision("highest")
    model_t, model_r = small_model(), small_model()
    opt_t = GaLoreAdamW(groups(model_t), lr=1e-3, weight_decay=0.01, backend="triton", seed=1)
    opt_r = GaLoreAdamW(groups(model_r), lr=1e-3, weight_decay=0.01, backend="reference", seed=1)
    for x in data(10):
        for model, opt in ((model_t, opt_t), (model_r, opt_r)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p_t, p_r in zip(model_t.parameters(), model_r.parameters()):
        assert float((p_t - p_r).norm() / p_r.norm()) < 1e-4


def test_cuda_graph_replay_equals_eager_steps():
    from galore_kernels.graphs import GraphedStep

    model_g, model_e = small_model(), small_model()
    opt_g = GaLoreAdamW(groups(model_g), lr=1e-3, weight_decay=0.01, backend="triton", seed=1)
    opt_e = GaLoreAdamW(groups(model_e), lr=1e-3, weight_decay=0.01, backend="triton", seed=1)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: 1.0 / (1 + s))  # lr changes every step
    sched_e = torch.optim.lr_scheduler.LambdaLR(opt_e, lambda s: 1.0 / (1 + s))
    graphed = GraphedStep(opt_g)
    for x in data(12):
        model_g(x).square().mean().backward()
        graphed()
        opt_g.zero_grad(set_to_none=False)
        sched_g.step()
        model_e(x).square().mean().backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=False)
        sched_e.step()
    torch.cuda.synchronize()
    assert graphed.replays >= 6 and graphed.eager_steps >= 3  # refresh steps (gap 4) ran eagerly
    for p_g, p_e in zip(model_g.parameters(), model_e.parameters()):
        assert torch.equal(p_g, p_e)
    for p_g, p_e in zip(model_g.parameters(), model_e.parameters()):
        assert opt_g.state[p_g]["step"] == opt_e.state[p_e]["step"] == 12
        assert torch.equal(opt_g.state[p_g]["exp_avg"], opt_e.state[p_e]["exp_avg"])



def assert_graph_replay_equals_eager(model_g, model_e, opt_g, opt_e, input_shape, dtype, steps=10):
    """Ten steps of the same data: GraphedStep(opt_g) on model_g, plain steps of opt_e on model_e;
    the graph replayed at least three of them and the weights are bitwise equal."""
    from galore_kernels.graphs import GraphedStep

    graphed = GraphedStep(opt_g)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(steps):
        x = torch.randn(*input_shape, device="cuda", generator=gen).to(dtype)
        for model, stepper, opt in ((model_g, graphed, opt_g), (model_e, opt_e.step, opt_e)):
            model(x).float().square().mean().backward()
            stepper()
            opt.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    assert graphed.replays >= 3
    for p_g, p_e in zip(model_g.parameters(), model_e.parameters()):
        assert torch.equal(p_g, p_e)


def same_shape_model(dtype, seed=0):
    """Four same-shape square layers (one batched refresh, views into one tensor, odd rank) and a
    LayerNorm, in ``dtype``: what bf16 training hands the bucket path."""
    torch.manual_seed(seed)
    layers = [nn.Linear(250, 250) for _ in range(4)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())], nn.LayerNorm(250)).cuda().to(dtype)


def same_shape_groups(model):
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "rank": 31, "update_proj_gap": 4},
            {"params": [p for p in model.parameters() if p.dim() != 2]}]


@pytest.mark.parametrize("dtype, options, precision", [
    (torch.bfloat16, {}, "highest"), (torch.float16, {}, "highest"), (torch.float32, {}, "highest"),
    # TF32: the GEMMs read transposed copies of thin operands, allocated inside the captured step.
    (torch.float32, {}, "high"),
    # bf16 moments, and stochastic rounding (its Philox key reads the device step: a replay must draw
    # the bits an eager step draws).
    (torch.bfloat16, {"state_dtype": "bfloat16", "stochastic_rounding": True}, "highest"),
])
def test_graph_replay_equals_eager_for_same_shape_layers(dtype, options, precision):
    torch.set_float32_matmul_precision(precision)
    model_g, model_e = same_shape_model(dtype), same_shape_model(dtype)
    opt_g = GaLoreAdamW(same_shape_groups(model_g), lr=1e-3, weight_decay=0.01, backend="triton", seed=1, **options)
    opt_e = GaLoreAdamW(same_shape_groups(model_e), lr=1e-3, weight_decay=0.01, backend="triton", seed=1, **options)
    assert_graph_replay_equals_eager(model_g, model_e, opt_g, opt_e, (32, 250), dtype)


def test_a_shorter_refresh_gap_mid_run_is_not_skipped_by_replays():
    """The replays left until the next refresh were counted at capture: a group's update_proj_gap
    shortened mid-run must end them (a recapture), so the refresh it makes due runs on time."""
    from galore_kernels.graphs import GraphedStep

    model_g, model_e = same_shape_model(torch.float32), same_shape_model(torch.float32)
    opts = [GaLoreAdamW(same_shape_groups(m), lr=1e-3, backend="triton", seed=1) for m in (model_g, model_e)]
    for opt in opts:
        opt.param_groups[0]["update_proj_gap"] = 8
    graphed = GraphedStep(opts[0])
    x = torch.randn(32, 250, device="cuda")
    for i in range(12):
        if i == 4:
            for opt in opts:
                opt.param_groups[0]["update_proj_gap"] = 3  # refreshes due at steps 6 and 9, not 8
        for model, stepper, opt in ((model_g, graphed, opts[0]), (model_e, opts[1].step, opts[1])):
            model(x).square().mean().backward()
            stepper()
            opt.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    assert graphed.replays >= 3
    for p_g, p_e in zip(model_g.parameters(), model_e.parameters()):
        assert opts[0].state[p_g].get("refresh_count") == opts[1].state[p_e].get("refresh_count")
        assert torch.equal(p_g, p_e)


def test_a_direct_step_between_graph_calls_forces_an_eager_step():
    """A step() outside GraphedStep advances the counts the graph would replay from: the next call
    must not replay (it would skip a due refresh or read a freed basis)."""
    from galore_kernels.graphs import GraphedStep

    model = same_shape_model(torch.float32)
    opt = GaLoreAdamW(same_shape_groups(model), lr=1e-3, backend="triton", seed=1)
    graphed = GraphedStep(opt)
    x = torch.randn(32, 250, device="cuda")
    for _ in range(3):
        model(x).square().mean().backward()
        graphed()
        opt.zero_grad(set_to_none=False)
    replays = graphed.replays
    assert replays >= 1
    model(x).square().mean().backward()
    opt.step()  # outside the graph: step 3 -> 4, a refresh is due at step 4
    opt.zero_grad(set_to_none=False)
    model(x).square().mean().backward()
    eager = graphed.eager_steps
    graphed()
    assert graphed.eager_steps == eager + 1 and graphed.replays == replays
    assert all(opt.state[p]["step"] == 5 for p in model.parameters())
