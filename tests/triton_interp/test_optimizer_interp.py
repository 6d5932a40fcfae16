"""GaLoreAdamW(backend="triton") against backend="reference", through Triton's interpreter on the CPU:
multi-step runs with refreshes, both sides, rank-less parameters, a state_dict round trip in the
middle (bitsandbytes' lockstep pattern), layer-wise mode, and the custom ops under opcheck/compile."""
import copy
import io

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW, attach_layerwise, dispatch
from galore_kernels.triton_ops import step as triton_step  # registers the custom ops


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # 48x80 projects left, 80x48 and 33x33 right (std rule); the LayerNorm and biases are rank-less.
    model = nn.Sequential(nn.Linear(80, 48), nn.Tanh(), nn.Linear(48, 80), nn.Tanh(), nn.Linear(80, 33),
                          nn.Tanh(), nn.Linear(33, 33), nn.LayerNorm(33))
    return model.to(dtype)


def groups(model, **extra):
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "rank": 8, "update_proj_gap": 3,
             "scale": 0.25, **extra},
            {"params": [p for p in model.parameters() if p.dim() != 2]}]


def batches(n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 80, generator=gen).to(dtype) for _ in range(n)]


def train(model, opt, data):
    for x in data:
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def max_rel_diff(a, b):
    return max(float((x.detach().double() - y.detach().double()).norm() / y.detach().double().norm()) for x, y in zip(a, b))


def test_auto_stays_on_the_reference_for_cpu_tensors():
    assert dispatch.step_backend("auto", torch.device("cpu")).name == "reference"
    assert dispatch.step_backend("triton", torch.device("cpu")).name == "triton"


# (weights, moments) relative tolerances. float32 moments: float32 accumulation order only. bf16
# moments are rounded stochastically, and the two backends draw different random bits: each step adds
# up to one bf16 ulp (2^-8 relative) of independent noise per element, carried into later steps
# (measured after 8 steps: weights 4e-3, moments 1.2e-2).
TRACK_TOL = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 3e-2)}


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_triton_optimizer_tracks_reference_with_state_dict_round_trip(state_dtype):
    data = batches(8)
    model_t, model_r = make_model(), make_model()
    kw = dict(lr=1e-2, weight_decay=0.01, seed=5, state_dtype=state_dtype)
    opt_t = GaLoreAdamW(groups(model_t), backend="triton", **kw)
    opt_r = GaLoreAdamW(groups(model_r), backend="reference", **kw)
    train(model_t, opt_t, data[:4])
    train(model_r, opt_r, data[:4])
    # Round trip the Triton optimizer's state through a checkpoint into a fresh optimizer.
    buffer = io.BytesIO()
    torch.save(opt_t.state_dict(), buffer)
    buffer.seek(0)
    opt_t = GaLoreAdamW(groups(model_t), backend="triton", **kw)
    opt_t.load_state_dict(torch.load(buffer, weights_only=True))
    train(model_t, opt_t, data[4:])
    train(model_r, opt_r, data[4:])
    weight_tol, moment_tol = TRACK_TOL[state_dtype]
    assert max_rel_diff(list(model_t.parameters()), list(model_r.parameters())) < weight_tol
    for p_t, p_r in zip(model_t.parameters(), model_r.parameters()):
        s_t, s_r = opt_t.state[p_t], opt_r.state[p_r]
        assert s_t["step"] == s_r["step"] == 8
        for key in ("exp_avg", "exp_avg_sq"):
            assert s_t[key].dtype == s_r[key].dtype == getattr(torch, state_dtype)
            assert max_rel_diff([s_t[key]], [s_r[key]]) < moment_tol, key


def test_bf16_step_from_a_shared_state_matches_reference():
    """bf16 trajectories part after a step or two (a flipped rounding of W is a large fraction of an
    update, and the model amplifies it), so the bf16 optimizer is judged one step at a time: the
    reference trains three steps, its state_dict loads into a Triton optimizer, and both take the
    same fourth step (a refresh step on the galore weights, as update_proj_gap is 3)."""
    data = batches(4, torch.bfloat16)
    model_r = make_model(torch.bfloat16)
    opt_r = GaLoreAdamW(groups(model_r), lr=1e-2, backend="reference")
    train(model_r, opt_r, data[:3])
    model_t = copy.deepcopy(model_r)
    opt_t = GaLoreAdamW(groups(model_t), lr=1e-2, backend="triton")
    opt_t.load_state_dict(opt_r.state_dict())
    start = [p.detach().clone() for p in model_r.parameters()]
    train(model_t, opt_t, data[3:])
    train(model_r, opt_r, data[3:])
    with torch.no_grad():
        for p_t, p_r, s in zip(model_t.parameters(), model_r.parameters(), start):
            moved_t, moved_r = p_t.double() - s.double(), p_r.double() - s.double()
            # bf16 operands (Triton) vs float32 math (reference), then W rounded to bf16 by both.
            assert float((moved_t - moved_r).norm()) <= 0.06 * float(moved_r.norm()) + 1e-6
            assert p_t.dtype == torch.bfloat16


def test_bf16_state_of_bf16_weights_reaches_the_kernels_without_copies():
    """state_dtype="bfloat16" keeps bf16 weights' bases in bf16: the bucket step reads the stored
    basis itself (no operand copy), and with the same gradients the Triton and reference updates
    agree to the bf16 rounding of N and W."""
    models = {b: make_model(torch.bfloat16) for b in ("triton", "reference")}
    opts = {b: GaLoreAdamW(groups(m), lr=1e-2, backend=b, state_dtype="bfloat16") for b, m in models.items()}
    start = [p.detach().clone() for p in models["reference"].parameters()]
    for x in batches(4, torch.bfloat16):
        opts["reference"].zero_grad()
        models["reference"](x).float().square().mean().backward()
        for p_t, p_r in zip(models["triton"].parameters(), models["reference"].parameters()):
            p_t.grad = p_r.grad.clone()
        for opt in opts.values():
            opt.step()
    assert opts["triton"]._operand_bases == {}
    for p_t, p_r, s in zip(models["triton"].parameters(), models["reference"].parameters(), start):
        state = opts["triton"].state[p_t]
        for key in ("proj_left", "proj_right"):
            if key in state:
                assert state[key].dtype == torch.bfloat16
        moved = (p_r.double() - s.double()).norm()
        # N as a bf16 operand (Triton) vs float32 (reference), then W rounded to bf16 by both: the
        # tolerance of the round-to-nearest bf16 comparison above.
        assert float((p_t.double() - p_r.double()).norm()) <= 0.06 * float(moved) + 1e-6


def test_bf16_second_moment_decays_on_the_kernels_too():
    """The Triton kernels round bf16 moments stochastically (see tests/test_stochastic_rounding.py):
    after gradients shrink 100x, exp_avg_sq decays as with float32 moments instead of freezing."""
    values = {}
    for state_dtype in ("float32", "bfloat16"):
        w = nn.Parameter(torch.zeros(1024))
        opt = GaLoreAdamW([w], lr=1e-3, state_dtype=state_dtype, backend="triton", seed=1)
        gen = torch.Generator().manual_seed(0)
        for step in range(300):
            w.grad = torch.randn(1024, generator=gen) * (1.0 if step < 10 else 0.01)
            opt.step()
        values[state_dtype] = opt.state[w]["exp_avg_sq"].double()
    ratio = float(values["bfloat16"].mean() / values["float32"].mean())
    assert abs(ratio - 1) < 0.03, ratio  # rounded to nearest it would stay at its peak: 1.34x here


def test_layerwise_triton_equals_standard_triton():
    data = batches(6)
    model_s, model_l = make_model(), make_model()
    opt = GaLoreAdamW(groups(model_s), lr=1e-2, weight_decay=0.01, backend="triton", seed=2)
    train(model_s, opt, data)
    handle = attach_layerwise(model_l, groups(model_l), lr=1e-2, weight_decay=0.01, backend="triton", seed=2)
    for x in data:
        model_l(x).float().square().mean().backward()
    handle.flush()
    assert max_rel_diff(list(model_l.parameters()), list(model_s.parameters())) < 1e-5


def test_stochastic_rounding_layerwise_and_bucket_steps_draw_the_same_bits():
    """bf16 weights with stochastic rounding: the bucket launches (standard mode) and the
    one-parameter adapters (layer-wise mode) key Philox with the same (seed, step), so the two modes
    give the same weights bit for bit; rounding to nearest gives different ones."""
    data = batches(4, torch.bfloat16)
    runs = {}
    for mode, stochastic in (("standard", True), ("layerwise", True), ("standard", False)):
        model = make_model(torch.bfloat16)
        if mode == "standard":
            opt = GaLoreAdamW(groups(model), lr=1e-2, backend="triton", seed=2, stochastic_rounding=stochastic)
            train(model, opt, data)
        else:
            handle = attach_layerwise(model, groups(model), lr=1e-2, backend="triton", seed=2,
                                      stochastic_rounding=stochastic)
            for x in data:
                model(x).float().square().mean().backward()
            handle.flush()
        runs[(mode, stochastic)] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(runs[("standard", True)], runs[("layerwise", True)]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs[("standard", True)], runs[("standard", False)]))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stochastic_rounding_picks_a_neighbour_of_the_nearest_rounding(backend):
    """The same step from the same state, rounded stochastically and to nearest: both round the same
    float32 values, so each weight differs by at most one bf16 ulp (the other neighbour), and the
    bits make some of them differ. A refresh step and a steady one."""
    data = batches(5, torch.bfloat16)
    model = make_model(torch.bfloat16)
    opt = GaLoreAdamW(groups(model), lr=1e-2, backend=backend, stochastic_rounding=True)
    train(model, opt, data[:2])
    for batch in (data[2:3], data[3:4]):  # step 3 refreshes (update_proj_gap 3), step 4 does not
        nearest_model = copy.deepcopy(model)
        nearest = GaLoreAdamW(groups(nearest_model), lr=1e-2, backend=backend)
        saved = opt.state_dict()
        saved["param_groups"] = [{**g, "stochastic_rounding": False} for g in saved["param_groups"]]
        nearest.load_state_dict(saved)
        train(model, opt, batch)
        train(nearest_model, nearest, batch)
        differ = 0
        with torch.no_grad():
            for p_s, p_n in zip(model.parameters(), nearest_model.parameters()):
                high = torch.maximum(p_s.double().abs(), p_n.double().abs()).clamp_min(1e-30)
                ulp = torch.exp2(torch.floor(torch.log2(high)) - 7)
                assert bool(((p_s.double() - p_n.double()).abs() <= ulp).all())
                differ += int((p_s != p_n).sum())
        assert differ > 0


def _bucket_args(bf16: bool = False):
    """A right-side bucket; ``bf16``: bf16 weights, gradients, bases and moments (the random-bits path)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    params = [(torch.randn(33, 20, generator=gen) * 0.02).to(dtype) for _ in range(2)]
    grads = [torch.randn(33, 20, generator=gen).to(dtype) for _ in range(2)]
    bases = [torch.linalg.qr(torch.randn(20, 4, generator=gen))[0].T.contiguous().to(dtype) for _ in range(2)]
    ms = [(torch.randn(33, 4, generator=gen) * 0.1).to(dtype) for _ in range(2)]
    vs = [(torch.rand(33, 4, generator=gen) * 0.01).to(dtype) for _ in range(2)]
    return params, grads, ms, vs, bases, torch.tensor([2, 2], dtype=torch.int32), torch.tensor([0.1])


# The ops' trailing arguments: (rounding_seeds, stochastic_rounding), as the optimizer passes them for
# bf16 weights with bf16 moments and stochastic rounding, or left to their defaults.
ROUNDING_VARIANTS = {"defaults": (False, ()), "bf16_random_bits": (True, (torch.tensor([11, 12]), True))}


@pytest.mark.parametrize("variant", list(ROUNDING_VARIANTS))
def test_custom_ops_pass_opcheck(variant):
    bf16, rounding = ROUNDING_VARIANTS[variant]
    params, grads, ms, vs, bases, steps, lr = _bucket_args(bf16)
    torch.library.opcheck(torch.ops.galore_kernels.triton_galore_adamw_step,
                          (params, grads, ms, vs, bases, steps, lr, "right", 0.9, 0.999, 1e-6, 0.01, 0.25, True, *rounding))
    torch.library.opcheck(torch.ops.galore_kernels.triton_dense_adamw_step,
                          (params, grads, [m.new_zeros(33, 20) for m in ms], [v.new_zeros(33, 20) for v in vs],
                           steps, lr, 0.9, 0.999, 1e-6, 0.01, True, *rounding))


@pytest.mark.parametrize("variant", list(ROUNDING_VARIANTS))
def test_torch_compile_traces_the_step_op(variant):
    bf16, rounding = ROUNDING_VARIANTS[variant]
    params, grads, ms, vs, bases, steps, lr = _bucket_args(bf16)
    eager = copy.deepcopy((params, ms, vs, steps))

    def step(params, grads, ms, vs, bases, steps, lr):
        torch.ops.galore_kernels.triton_galore_adamw_step(params, grads, ms, vs, bases, steps, lr, "right", 0.9,
                                                          0.999, 1e-6, 0.01, 0.25, True, *rounding)

    torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, ms, vs, bases, steps, lr)
    keywords = dict(zip(("rounding_seeds", "stochastic_rounding"), rounding))
    triton_step.galore_adamw_step_triton(eager[0], grads, eager[1], eager[2], bases, eager[3], lr, side="right",
                                         beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, scale=0.25, **keywords)
    for a, b in zip(params + ms + vs + [steps], eager[0] + eager[1] + eager[2] + [eager[3]]):
        assert torch.equal(a, b)


def test_exact_refresh_and_float64_parameters_take_the_fallbacks():
    """Exact bases are column-major (LAPACK's layout, kept for galore-torch parity) and float64 has
    no kernel: the Triton optimizer must still equal the reference on both."""
    data = batches(4)
    model_t, model_r = make_model(), make_model()
    extra = nn.Parameter(torch.randn(33, 40, dtype=torch.float64))
    extra_r = nn.Parameter(extra.detach().clone())
    opt_t = GaLoreAdamW(groups(model_t, svd="exact") + [{"params": [extra], "rank": 4}], lr=1e-2, backend="triton")
    opt_r = GaLoreAdamW(groups(model_r, svd="exact") + [{"params": [extra_r], "rank": 4}], lr=1e-2,
                        backend="reference")
    for x in data:
        for model, opt, e in ((model_t, opt_t, extra), (model_r, opt_r, extra_r)):
            opt.zero_grad()
            (model(x).square().mean() + e.square().sum()).backward()
            opt.step()
    assert max_rel_diff(list(model_t.parameters()), list(model_r.parameters())) < 1e-5
    assert torch.equal(extra, extra_r)  # float64: the reference ran for both


def test_rankless_parameters_of_equal_size_but_different_shapes_and_unaligned_views():
    """Rank-less buckets are keyed by shape (the kernels check shapes), and a parameter that starts
    at an address the kernels cannot promise 16-byte alignment for takes the reference path."""
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(1 + 33 * 20, generator=gen)

    def params():
        return [nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))),
                nn.Parameter(torch.randn(32, generator=torch.Generator().manual_seed(2))),
                nn.Parameter(storage[1:].view(33, 20).clone().as_strided((33, 20), (20, 1), 0))]

    p_t, p_r = params(), params()
    unaligned = torch.empty(1 + 33 * 20)[1:].view(33, 20)  # starts 4 bytes into its storage
    unaligned.copy_(p_t[2].detach())
    p_t[2] = nn.Parameter(unaligned)
    assert p_t[2].data_ptr() % 16 != 0
    opt_t = GaLoreAdamW([{"params": p_t[:2]}, {"params": [p_t[2]], "rank": 4}], lr=1e-2, backend="triton")
    opt_r = GaLoreAdamW([{"params": p_r[:2]}, {"params": [p_r[2]], "rank": 4}], lr=1e-2, backend="reference")
    for step in range(3):
        for ps, opt in ((p_t, opt_t), (p_r, opt_r)):
            opt.zero_grad()
            sum((p * (step + 1)).sin().sum() for p in ps).backward()
            opt.step()
    assert max_rel_diff(p_t, p_r) < 1e-6


def test_masked_bucket_updates_are_counted_and_reported_once():
    """The device-side guard cannot warn when it masks (no host synchronisation); the optimizer
    counts masked updates on the device and reports them at the next refresh step (or on request)."""
    model = make_model()
    opt = GaLoreAdamW(groups(model), lr=1e-2, backend="triton")
    weight = model[2].weight  # a projected weight (80x48, right)
    data = batches(4)
    for i, x in enumerate(data):  # steps 0..3; update_proj_gap 3: step 3 refreshes
        opt.zero_grad()
        model(x).float().square().mean().backward()
        if i in (1, 2):
            weight.grad[0, 0] = float("nan")
            before = weight.detach().clone()
        if i == 3:
            index = opt.param_info(weight)[0]
            with pytest.warns(RuntimeWarning, match=rf"parameter #{index} .*non-finite gradient in 2 step\(s\)"):
                opt.step()
        else:
            opt.step()
        if i in (1, 2):
            assert torch.equal(weight, before)  # masked on the device
    assert opt.nonfinite_skips() == {index: 2}
    assert opt.state[weight]["step"] == 4  # a masked bucket step still counts


def test_batched_refresh_views_with_odd_rank_reach_the_kernels_aligned():
    """A batched refresh returns left bases as views into one (B, m, r) tensor; with m*r not a
    multiple of 4 the second view is not 16-byte aligned, which the kernels' pointer hints forbid.
    The optimizer re-copies such a basis (once per refresh) and matches the reference."""
    def params():
        gen = torch.Generator().manual_seed(3)
        return [nn.Parameter(torch.randn(5, 12, generator=gen)) for _ in range(2)]

    p_t, p_r = params(), params()
    opt_t = GaLoreAdamW([{"params": p_t, "rank": 3, "update_proj_gap": 2}], lr=1e-2, backend="triton")
    opt_r = GaLoreAdamW([{"params": p_r, "rank": 3, "update_proj_gap": 2}], lr=1e-2, backend="reference")
    for step in range(4):
        for ps, opt in ((p_t, opt_t), (p_r, opt_r)):
            opt.zero_grad()
            sum((p * (step + 1)).cos().sum() for p in ps).backward()
            opt.step()
        assert all(opt_t.state[p]["proj_left"].data_ptr() % 16 == 0 for p in p_t)
    assert max_rel_diff(p_t, p_r) < 1e-5


def test_masked_updates_are_reported_at_exact_refreshes_too():
    model = make_model()
    opt = GaLoreAdamW(groups(model, svd="exact"), lr=1e-2, backend="triton")
    weight = model[2].weight
    index = opt.param_info(weight)[0]
    for i, x in enumerate(batches(4)):  # update_proj_gap 3: step 3 refreshes (exact, per parameter)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        if i == 1:
            weight.grad[3, 3] = float("inf")
        if i == 3:
            with pytest.warns(RuntimeWarning, match=rf"parameter #{index} .*in 1 step\(s\)"):
                opt.step()
        else:
            opt.step()
    assert opt.nonfinite_skips() == {index: 1}


def test_rank_changed_mid_run_keeps_each_parameters_rank_on_the_kernels_too():
    """The bucket launches take each parameter's rank from its moments, so a later change of the
    group's rank warns and both backends keep stepping at the old rank, in step with each other."""
    data = batches(6)
    model_t, model_r = make_model(), make_model()
    opt_t = GaLoreAdamW(groups(model_t), lr=1e-2, backend="triton")
    opt_r = GaLoreAdamW(groups(model_r), lr=1e-2, backend="reference")
    train(model_t, opt_t, data[:2])
    train(model_r, opt_r, data[:2])
    for opt in (opt_t, opt_r):
        opt.param_groups[0]["rank"] = 4
    with pytest.warns(RuntimeWarning, match="keeps rank 8"):
        train(model_t, opt_t, data[2:])
    with pytest.warns(RuntimeWarning, match="keeps rank 8"):
        train(model_r, opt_r, data[2:])
    assert max_rel_diff(list(model_t.parameters()), list(model_r.parameters())) < 1e-5
    assert all(8 in opt_t.state[p]["exp_avg"].shape for p in opt_t.param_groups[0]["params"])


def test_steady_steps_reuse_the_bucket_layout_and_track_the_reference(monkeypatch):
    """Steady steps reuse the last step's bucket layout (no per-parameter decisions); a gradient that
    skips steps, a refresh, a changed weight decay and a parameter given new storage all still land
    exactly where the reference lands."""
    data = batches(12)
    model_t, model_r = make_model(), make_model()
    kw = dict(lr=1e-2, weight_decay=0.01, seed=5)
    opt_t = GaLoreAdamW(groups(model_t, update_proj_gap=5), backend="triton", **kw)
    opt_r = GaLoreAdamW(groups(model_r, update_proj_gap=5), backend="reference", **kw)
    layouts = []
    real = GaLoreAdamW._bucket_layout
    monkeypatch.setattr(GaLoreAdamW, "_bucket_layout", lambda self, group: layouts.append(self) or real(self, group))
    for i, x in enumerate(data):
        for model, opt in ((model_t, opt_t), (model_r, opt_r)):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            if i in (3, 4):
                model[2].weight.grad = None  # skips two steps
            if i == 7:
                opt.param_groups[0]["weight_decay"] = 0.05  # a per-step scalar: read at every launch
            if i == 8:
                model[4].weight.data = model[4].weight.data.clone()  # new storage for a weight
            opt.step()
    assert max_rel_diff(list(model_t.parameters()), list(model_r.parameters())) < 1e-5
    steady = sum(1 for opt in layouts if opt is opt_t)
    assert steady < 2 * len(data) - 4, steady  # some steps reused the layout of both groups


def test_a_step_counted_outside_step_makes_the_reused_layout_stale():
    """Steps counted by anything but step() (a CUDA graph replay advances the host counts, a direct
    step_param) end the reuse of the last layout, so a refresh they make due is not skipped."""
    model = make_model()
    opt = GaLoreAdamW(groups(model, update_proj_gap=4), lr=1e-2, backend="triton")
    data = batches(3)
    train(model, opt, data[:2])  # refresh at step 0; the layout of step 1 is kept (next refresh: step 4)
    w = opt.param_groups[0]["params"][0]
    for _ in range(2):  # w's own count: 2 -> 4
        opt.step_param(w, w.grad)
    assert opt.refresh_due(w) and opt.state[w]["refresh_count"] == 1
    train(model, opt, data[2:])
    assert opt.state[w]["refresh_count"] == 2 and opt.state[w]["step"] == 5
