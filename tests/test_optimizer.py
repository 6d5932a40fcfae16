"""GaLoreAdamW behaviour: checkpoints, dtypes, seeding, bad input, backend choice."""
import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from galore_kernels import BackendUnavailableError, GaLoreAdamW


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 7)).to(dtype)


def galore_groups(model, **kw):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    galore = {"params": [m.weight for m in linears], "rank": 6, "update_proj_gap": 3, **kw}
    return [galore, {"params": [m.bias for m in linears]}]


def batches(n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=gen).to(dtype), torch.randn(16, 7, generator=gen).to(dtype)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y).float() ** 2).mean().backward()
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("policy, state_dtype", [("fixed", "float32"), ("adaptive", "float32"), ("fixed", "bfloat16")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_continues_bit_for_bit(dtype, policy, state_dtype):
    """Resume mid-run from a weights_only checkpoint, in a fresh model and optimizer: the run continues
    exactly as the uninterrupted one (randomized refresh at steps 0, 3, 6, ... crosses the resume)."""
    data = batches(10, dtype)
    ref_model = make_model(dtype)
    kw = dict(lr=1e-2, weight_decay=0.05, seed=7, state_dtype=state_dtype)
    ref_opt = GaLoreAdamW(galore_groups(ref_model, refresh_policy=policy), **kw)
    train(ref_model, ref_opt, data)

    model = make_model(dtype)
    opt = GaLoreAdamW(galore_groups(model, refresh_policy=policy), **kw)
    train(model, opt, data[:4])
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})

    resumed = make_model(dtype, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = GaLoreAdamW(galore_groups(resumed, refresh_policy=policy), **kw)
    resumed_opt.load_state_dict(checkpoint["optim"])
    moments = getattr(torch, state_dtype)
    bases = dtype if state_dtype == "bfloat16" else torch.float32  # 16-bit weights' bases in their dtype
    for p in resumed.parameters():
        state = resumed_opt.state[p]
        for key, dtype_wanted in (("exp_avg", moments), ("exp_avg_sq", moments), ("proj_left", bases),
                                  ("proj_right", bases)):
            if key in state:
                assert state[key].dtype == dtype_wanted, (key, state[key].dtype)
    train(resumed, resumed_opt, data[4:])

    for a, b in zip(ref_model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref_model.parameters(), resumed.parameters()):
        sa, sb = ref_opt.state[a], resumed_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


def test_state_is_plain_float32_for_bf16_params():
    model = make_model(torch.bfloat16)
    opt = GaLoreAdamW(galore_groups(model), lr=1e-3)
    train(model, opt, batches(2, torch.bfloat16))
    w = model[0].weight  # 40 x 24: m >= n projects on the right, rank 6
    state = opt.state[w]
    assert state["exp_avg"].shape == (40, 6) and state["exp_avg"].dtype == torch.float32
    assert state["proj_right"].shape == (6, 24) and state["proj_right"].dtype == torch.float32
    assert "proj_left" not in state
    assert isinstance(state["step"], int) and state["step"] == 2
    assert model[0].weight.dtype == torch.bfloat16
    # Everything in the state dict is a tensor, a number, a string, None or a container of those.
    sd = opt.state_dict()
    allowed = (torch.Tensor, int, float, str, bool, type(None), tuple, list, dict)

    def walk(x):
        assert isinstance(x, allowed), type(x)
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(sd)


def test_randomized_refresh_is_seeded_per_parameter():
    def bases(seed):
        torch.manual_seed(0)
        a = nn.Parameter(torch.randn(30, 50))
        b = nn.Parameter(a.detach().clone())
        opt = GaLoreAdamW([{"params": [a, b], "rank": 4}], seed=seed)
        g = torch.randn(30, 50)
        a.grad, b.grad = g.clone(), g.clone()
        torch.manual_seed(999)  # the global RNG must play no part
        opt.step()
        return opt.state[a]["proj_left"], opt.state[b]["proj_left"]

    a0, b0 = bases(0)
    a0_again, b0_again = bases(0)
    a1, _ = bases(1)
    assert torch.equal(a0, a0_again) and torch.equal(b0, b0_again)
    assert not torch.equal(a0, b0)  # parameter index is part of the seed
    assert not torch.equal(a0, a1)  # so is the optimizer seed
    # Different sketches, same subspace (the gradient here is full-rank random; compare projectors).
    assert torch.allclose(a0 @ a0.T @ a0, a0, atol=1e-5)


def test_refresh_schedule_matches_galore_torch_and_staggers_on_request():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 20)) for _ in range(4)]
    plain = GaLoreAdamW([{"params": params, "rank": 2, "update_proj_gap": 4}])
    stagger = GaLoreAdamW([{"params": [nn.Parameter(p.detach().clone()) for p in params], "rank": 2,
                            "update_proj_gap": 4, "refresh_offset": "stagger"}])
    refresh_steps = {opt: [[] for _ in params] for opt in (plain, stagger)}
    for t in range(9):
        for opt in (plain, stagger):
            ps = opt.param_groups[0]["params"]
            for i, p in enumerate(ps):
                p.grad = torch.randn(12, 20)
                if opt.refresh_due(p):
                    refresh_steps[opt][i].append(t)
            opt.step()
            for i, p in enumerate(ps):
                assert opt.state[p]["refresh_count"] == len(refresh_steps[opt][i])
    assert refresh_steps[plain] == [[0, 4, 8]] * 4
    # Phases 0, 1, 2, 3: refresh at the first step, then whenever (t + phase) % 4 == 0.
    assert refresh_steps[stagger] == [[0, 4, 8], [0, 3, 7], [0, 2, 6], [0, 1, 5]]


def test_galore_torch_constructor_and_groups_run_unchanged():
    model = make_model()
    groups = [
        {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"},
        {"params": [model[4].weight, model[0].bias, model[2].bias, model[4].bias]},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation chatter
        opt = GaLoreAdamW(groups, 1e-3, (0.9, 0.999), 1e-6, 0.0, True, True)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(3))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.param_groups[0]["svd"] == "randomized"  # our default refresh


def test_closure_is_evaluated_with_grad_enabled():
    model = make_model()
    opt = GaLoreAdamW(galore_groups(model))
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0


# ------------------------------------------------------------------------------------ bad input
def test_rank_below_one_is_rejected():
    w = nn.Parameter(torch.randn(8, 8))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            GaLoreAdamW([{"params": [w], "rank": bad}])


def test_unknown_proj_type_is_rejected():
    with pytest.raises(ValueError, match="proj_type='sideways'.*std"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(8, 8))], "rank": 2, "proj_type": "sideways"}])


def test_non_2d_parameter_in_galore_group_is_rejected_by_position_and_shape():
    conv = nn.Parameter(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(4, 3, 3, 3\).*2-D"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(8, 8)), conv], "rank": 2}])


def test_failed_group_is_not_left_behind():
    opt = GaLoreAdamW([nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4, 4))], "rank": 2})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_is_rejected_with_parameter_named():
    emb = nn.Embedding(10, 6, sparse=True)
    opt = GaLoreAdamW([{"params": [emb.weight], "rank": 2}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradient for parameter #0 \(shape \(10, 6\)\)"):
        opt.step()


def test_rank_above_smaller_side_is_clamped_with_warning():
    w = nn.Parameter(torch.randn(5, 9))
    with pytest.warns(UserWarning, match="clamped to 5"):
        opt = GaLoreAdamW([{"params": [w], "rank": 8, "svd": "exact"}], lr=1e-2)
    w.grad = torch.randn(5, 9)
    opt.step()
    assert opt.state[w]["proj_left"].shape == (5, 5)
    assert opt.state[w]["exp_avg"].shape == (5, 9)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_parameter_step(bad):
    torch.manual_seed(0)
    w, other = nn.Parameter(torch.randn(12, 20)), nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([{"params": [w, other], "rank": 3, "update_proj_gap": 2}], lr=1e-2)

    def grads(poison):
        g = torch.randn(12, 20)
        if poison:
            g[3, 4] = bad
        w.grad, other.grad = g, torch.randn(20, 12)

    # At step 0: nothing is created or changed for w, the other parameter steps normally.
    w0, o0 = w.detach().clone(), other.detach().clone()
    grads(poison=True)
    with pytest.warns(RuntimeWarning, match=r"parameter #0 .*non-finite"):
        opt.step()
    assert torch.equal(w, w0) and "proj_left" not in opt.state[w]
    assert not torch.equal(other, o0)

    # Later: weights, moments, basis and step count untouched; one warning per parameter only.
    grads(poison=False)
    opt.step()
    snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[w].items()}
    w1 = w.detach().clone()
    grads(poison=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(w, w1)
    for key, value in snapshot.items():
        assert torch.equal(opt.state[w][key], value) if torch.is_tensor(value) else opt.state[w][key] == value
    assert opt.state[w]["step"] == 1


def test_bf16_state_halves_the_moments_and_tracks_float32_state():
    """state_dtype="bfloat16": moments stored in bf16 (half the bytes), bases still float32, and the
    trajectory stays close to the float32-state one (the step is computed from the unrounded values;
    only the stored moments carry bf16 rounding)."""
    data = batches(12)
    runs = {}
    for state_dtype in ("float32", "bfloat16"):
        model = make_model()
        opt = GaLoreAdamW(galore_groups(model), lr=1e-2, state_dtype=state_dtype)
        train(model, opt, data)
        runs[state_dtype] = (model, opt)
    (m32, o32), (m16, o16) = runs["float32"], runs["bfloat16"]
    start = make_model()
    for p32, p16, p0 in zip(m32.parameters(), m16.parameters(), start.parameters()):
        s32, s16 = o32.state[p32], o16.state[p16]
        assert s16["exp_avg"].dtype == s16["exp_avg_sq"].dtype == torch.bfloat16
        assert s16["exp_avg"].element_size() * 2 == s32["exp_avg"].element_size()
        for key in ("proj_left", "proj_right"):
            if key in s16:
                assert s16[key].dtype == torch.float32
        moved32 = (p32 - p0).detach().double()
        assert float((p16 - p32).detach().double().norm()) <= 0.02 * float(moved32.norm())
        assert not torch.equal(p16, p32)  # the rounding is real: the two runs are not the same run
    rel = (o16.state[m16[0].weight]["exp_avg_sq"].double() - o32.state[m32[0].weight]["exp_avg_sq"].double()).norm()
    assert float(rel) <= 0.02 * float(o32.state[m32[0].weight]["exp_avg_sq"].double().norm())


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_bf16_state_keeps_16bit_weights_bases_in_their_dtype(policy):
    """bf16 weights with state_dtype="bfloat16": the bases are stored in bf16 (the dtype the kernels
    read; no float32 copy), orthonormal to bf16 rounding, and the updates track the float32-state
    ones when both optimizers see the same gradients (bf16 models amplify any difference, so the
    gradients come from the float32-state model and are copied)."""
    m32, m16 = make_model(torch.bfloat16), make_model(torch.bfloat16)
    o32 = GaLoreAdamW(galore_groups(m32, refresh_policy=policy), lr=1e-2)
    o16 = GaLoreAdamW(galore_groups(m16, refresh_policy=policy), lr=1e-2, state_dtype="bfloat16")
    start = [p.detach().clone() for p in m32.parameters()]
    for x, y in batches(7, torch.bfloat16):  # refreshes at steps 0, 3, 6
        o32.zero_grad()
        ((m32(x) - y).float() ** 2).mean().backward()
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            p16.grad = p32.grad.clone()
        o32.step()
        o16.step()
    for p32, p16, p0 in zip(m32.parameters(), m16.parameters(), start):
        for key in ("proj_left", "proj_right"):
            if key in o16.state[p16]:
                basis = o16.state[p16][key]
                assert basis.dtype == torch.bfloat16 and o32.state[p32][key].dtype == torch.float32
                cols = basis.float() if key == "proj_left" else basis.float().T
                assert float((cols.T @ cols - torch.eye(cols.shape[1])).abs().max()) < 2e-2
        moved = (p32 - p0).detach().double()
        assert float((p16 - p32).detach().double().norm()) <= 0.05 * float(moved.norm())


def test_state_dtype_per_group_and_its_checks():
    model = make_model()
    groups = galore_groups(model)
    groups[1]["state_dtype"] = torch.bfloat16  # the biases' group; aliases are canonicalised
    opt = GaLoreAdamW(groups, lr=1e-2)
    train(model, opt, batches(1))
    assert [g["state_dtype"] for g in opt.param_groups] == ["float32", "bfloat16"]
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32
    assert opt.state[model[0].bias]["exp_avg"].dtype == torch.bfloat16
    for bad in ("float16", torch.float16, "int8", 16):
        with pytest.raises(ValueError, match="state_dtype"):
            GaLoreAdamW(make_model().parameters(), state_dtype=bad)
    with pytest.raises(ValueError, match="param group 1: state_dtype"):
        GaLoreAdamW([{"params": [model[0].weight]}, {"params": [model[0].bias], "state_dtype": "fp16"}])


def test_checkpoint_from_before_state_dtype_loads_as_float32_state():
    model = make_model()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, batches(2))
    old = roundtrip(opt.state_dict())
    for group in old["param_groups"]:
        del group["state_dtype"]
    groups = galore_groups(model)
    groups[1]["stochastic_rounding"] = False  # a per-group choice the old checkpoint knows nothing of
    fresh = GaLoreAdamW(groups, lr=1e-2, state_dtype="bfloat16", stochastic_rounding=True)
    for group in old["param_groups"]:
        del group["stochastic_rounding"]
    fresh.load_state_dict(old)
    assert all(g["state_dtype"] == "float32" for g in fresh.param_groups)
    assert [g["stochastic_rounding"] for g in fresh.param_groups] == [True, False]  # each group keeps its own
    train(model, fresh, batches(1, seed=5))
    assert fresh.state[model[0].weight]["exp_avg"].dtype == torch.float32


def test_optimizer_arguments_are_checked():
    w = [nn.Parameter(torch.randn(4, 4))]
    for kwargs in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1e-8}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            GaLoreAdamW(w, **kwargs)
    for group in ({"update_proj_gap": 0}, {"svd": "qr"}, {"oversample": -1}, {"niter": 1.5}, {"refresh_offset": "late"}):
        with pytest.raises(ValueError, match=next(iter(group))):
            GaLoreAdamW([{"params": w, "rank": 2, **group}])


# ------------------------------------------------------------------------------------- backends
def test_unavailable_step_backend_fails_at_construction_with_reason(monkeypatch):
    monkeypatch.delenv("GALORE_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("GALORE_KERNELS_REFRESH_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="backend='triton'.*TRITON_INTERPRET.*auto"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], backend="cuda")


def test_library_import_does_not_import_triton_and_auto_is_reference_on_cpu():
    code = ("import sys, torch, galore_kernels\n"
            "from galore_kernels import dispatch\n"
            "assert dispatch.step_backend('auto', torch.device('cpu')).name == 'reference'\n"
            "assert 'galore_kernels.triton_ops' not in sys.modules\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_missing_native_extension_is_named_when_forced_and_auto_falls_back(monkeypatch, caplog):
    from galore_kernels import dispatch, native

    monkeypatch.delenv("GALORE_KERNELS_REFRESH_BACKEND", raising=False)
    monkeypatch.setitem(native._state, "reason", "the native extension is not built (test)")
    monkeypatch.setattr(dispatch, "_fallbacks_logged", set())
    with pytest.raises(BackendUnavailableError, match=r"refresh_backend='native'.*not built \(test\)"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], refresh_backend="native")
    with caplog.at_level("WARNING", logger="galore_kernels"):
        for _ in range(2):
            opt = GaLoreAdamW([{"params": [nn.Parameter(torch.randn(8, 12))], "rank": 2}])
    assert [r.getMessage() for r in caplog.records].count(
        "galore_kernels: randomized refresh runs on the PyTorch reference: the native extension is not built (test)") == 1
    assert dispatch.refresh_backend(opt.refresh_backend, torch.device("cpu")).name == "reference"


def test_environment_forces_the_backend_for_the_process(monkeypatch):
    monkeypatch.setenv("GALORE_KERNELS_BACKEND", "reference")
    opt = GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], backend="triton")  # the environment wins
    assert opt.backend == "reference"
    monkeypatch.setenv("GALORE_KERNELS_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="triton"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], backend="reference")
    monkeypatch.setenv("GALORE_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="GALORE_KERNELS_BACKEND='fast'"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))])
    monkeypatch.delenv("GALORE_KERNELS_BACKEND")
    monkeypatch.setenv("GALORE_KERNELS_REFRESH_BACKEND", "sideways")
    with pytest.raises(ValueError, match="GALORE_KERNELS_REFRESH_BACKEND='sideways'"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))])
    monkeypatch.setenv("GALORE_KERNELS_REFRESH_BACKEND", "reference")
    assert GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], refresh_backend="native").refresh_backend == "reference"


def test_randomized_basis_signs_are_canonical_and_stable_under_rounding_noise():
    """Eigensolvers give no sign guarantee; GaLore carries moments across refreshes in basis coordinates,
    so each vector's sign is fixed (largest entry positive) and rounding noise cannot flip it."""
    from galore_kernels.subspace import top_subspace

    torch.manual_seed(0)
    for trial in range(20):
        G = torch.randn(32, 5) @ torch.randn(5, 32) + 0.01 * torch.randn(32, 32)
        noisy = G + 1e-7 * G.abs().max() * torch.randn(32, 32)
        for side in ("left", "right"):
            a = top_subspace(G, 4, side=side, generator=torch.Generator().manual_seed(trial))
            b = top_subspace(noisy, 4, side=side, generator=torch.Generator().manual_seed(trial))
            vectors = a if side == "left" else a.T
            peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
            assert (peak > 0).all()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def adaptive_refresh_steps(gradient, steps=40, **group):
    w = nn.Parameter(torch.zeros(40, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "refresh_policy": "adaptive",
                        "max_proj_gap": 16, **group}], lr=1e-3)
    refreshed = []
    for t in range(steps):
        w.grad = gradient(t)
        if opt.refresh_due(w):
            refreshed.append(t)
        opt.step()
    return refreshed, opt.state[w]


def test_adaptive_policy_lengthens_the_gap_of_a_stable_subspace():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(40, 4, generator=gen))[0], torch.linalg.qr(torch.randn(24, 4, generator=gen))[0]

    def stable(t):  # same top-4 subspace every step, changing weights and a little noise
        return U @ torch.diag(torch.rand(4, generator=gen) + 1.0) @ V.T + 1e-3 * torch.randn(40, 24, generator=gen)

    refreshed, state = adaptive_refresh_steps(stable)
    assert refreshed == [0, 2, 6, 14, 30]  # gaps 2, 4, 8, 16, 16 (capped by max_proj_gap)
    assert state["proj_gap"] == 16 and state["last_overlap"] > 0.99


def test_adaptive_policy_keeps_refreshing_a_moving_subspace_at_the_base_gap():
    gen = torch.Generator().manual_seed(1)
    refreshed, state = adaptive_refresh_steps(lambda t: torch.randn(40, 24, generator=gen), steps=12)
    assert refreshed == [0, 2, 4, 6, 8, 10]
    assert state["proj_gap"] == 2 and state["last_overlap"] < 0.9


def test_adaptive_policy_settings_are_checked():
    w = [nn.Parameter(torch.randn(8, 8))]
    cases = [
        ({"refresh_policy": "sometimes"}, "refresh_policy"),
        ({"refresh_policy": "adaptive", "update_proj_gap": 4, "max_proj_gap": 1}, "max_proj_gap"),
        ({"refresh_policy": "adaptive", "adaptive_overlap": 0.0}, "adaptive_overlap"),
    ]
    for group, key in cases:
        with pytest.raises(ValueError, match=key):
            GaLoreAdamW([{"params": w, "rank": 2, **group}])


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_batched_refresh_of_same_shape_weights_equals_per_parameter_refresh(shape, monkeypatch):
    """step() refreshes same-shape weights in one backend call; each keeps its own seeded sketch, so
    the result is what stepping each parameter alone (layer-wise mode's path) gives."""
    import galore_kernels.optimizer as optimizer_module

    calls = []
    real = optimizer_module.randomized_bases_batched
    monkeypatch.setattr(optimizer_module, "randomized_bases_batched", lambda grads, *a: calls.append(len(grads)) or real(grads, *a))
    torch.manual_seed(0)
    start = [torch.randn(shape) for _ in range(3)]
    batched = [nn.Parameter(w.clone()) for w in start]
    single = [nn.Parameter(w.clone()) for w in start]
    groups = lambda ps: [{"params": ps, "rank": 4, "update_proj_gap": 3}]  # noqa: E731
    opt_batched, opt_single = GaLoreAdamW(groups(batched), lr=1e-2), GaLoreAdamW(groups(single), lr=1e-2)
    for _ in range(7):
        grads = [torch.randn(shape) for _ in range(3)]
        for p, q, g in zip(batched, single, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_batched.step()
        for q in single:
            opt_single.step_param(q, q.grad)
    assert calls == [3, 3, 3]  # steps 0, 3, 6
    for p, q in zip(batched, single):
        assert torch.equal(p, q)  # the same kernels per matrix: bitwise on the CPU
        torch.testing.assert_close(opt_batched.state[p]["exp_avg"], opt_single.state[q]["exp_avg"], rtol=1e-5, atol=1e-8)


def test_numpy_integer_settings_are_stored_as_python_ints():
    import numpy as np

    w = nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": np.int64(3), "update_proj_gap": np.int32(5)}])
    w.grad = torch.randn(8, 12)
    opt.step()
    group = roundtrip(opt.state_dict())["param_groups"][0]  # weights_only=True
    assert (group["rank"], group["update_proj_gap"]) == (3, 5) and type(group["rank"]) is int


def test_refresh_offset_as_numpy_integer_is_accepted():
    import numpy as np

    w = nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 4, "refresh_offset": np.int64(3)}])
    assert type(opt.param_groups[0]["refresh_offset"]) is int and opt.param_groups[0]["refresh_offset"] == 3


def test_rank_changed_after_the_first_step_keeps_each_parameters_rank_with_a_warning():
    """galore-torch fixes the rank in its projector; here the moments fix it: a later change of the
    group's rank warns once and the parameter keeps stepping (through refreshes) at its rank."""
    model = make_model()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, batches(2))
    opt.param_groups[0]["rank"] = 3
    with pytest.warns(RuntimeWarning, match="keeps rank 6"):
        train(model, opt, batches(5, seed=2))  # refreshes at steps 3 and 6
    for p in opt.param_groups[0]["params"]:
        state = opt.state[p]
        bases = [state[k] for k in ("proj_left", "proj_right") if k in state]
        assert state["refresh_count"] == 3 and 6 in state["exp_avg"].shape and all(6 in b.shape for b in bases)
        assert torch.isfinite(p).all()


def test_switching_to_the_adaptive_policy_mid_run_takes_effect_from_the_next_refresh():
    model = make_model()
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, batches(4))  # refreshes at 0 and 3 under the fixed policy
    opt.param_groups[0]["refresh_policy"] = "adaptive"
    w = opt.param_groups[0]["params"][0]
    assert opt.steps_until_refresh(w) == 2  # until its first adaptive refresh: the fixed schedule (step 6)
    train(model, opt, batches(3, seed=2))
    assert opt.state[w]["refresh_count"] == 3 and opt.state[w]["proj_gap"] == 3  # the adaptive gap starts


def test_float64_weights_keep_their_precision():
    """The update is float32 arithmetic, but a float64 weight is updated in float64, not rounded
    to float32 at every step (galore-torch and torch's AdamW leave it untouched at lr = 0)."""
    model = make_model(dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, GaLoreAdamW(galore_groups(model), lr=0.0), batches(2, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt = GaLoreAdamW(galore_groups(model), lr=1e-12)  # an update far below float32's resolution
    train(model, opt, batches(1, dtype=torch.float64))
    changes = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert all(0 < c < 1e-9 for c in changes), changes


def test_state_dict_without_newer_group_keys_keeps_the_constructed_settings():
    """A checkpoint from before a group key existed (seed, svd, refresh_policy, ...) loads: the keys
    it lacks keep what this optimizer was constructed with, and stepping goes on."""
    model = make_model()
    opt = GaLoreAdamW(galore_groups(model, refresh_policy="adaptive"), lr=1e-2, seed=7)
    train(model, opt, batches(2))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in ("seed", "svd", "refresh_policy", "max_proj_gap", "adaptive_overlap", "refresh_offset"):
            group.pop(key, None)
    again = GaLoreAdamW(galore_groups(model, refresh_policy="adaptive"), lr=1e-2, seed=7)
    again.load_state_dict(roundtrip(saved))
    assert again.param_groups[0]["seed"] == 7 and again.param_groups[0]["refresh_policy"] == "adaptive"
    train(model, again, batches(4, seed=2))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_of_other_group_kinds_is_refused_with_the_group_named():
    """A plain-AdamW group's state loaded into a GaLore group (or back) would not fit its moments."""
    model = make_model()
    plain = GaLoreAdamW([{"params": [m.weight for m in model if isinstance(m, nn.Linear)]},
                         {"params": [m.bias for m in model if isinstance(m, nn.Linear)]}], lr=1e-2)
    train(model, plain, batches(1))
    with pytest.raises(ValueError, match="param group 0 is a plain AdamW group"):
        GaLoreAdamW(galore_groups(model), lr=1e-2).load_state_dict(plain.state_dict())
    galore = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, galore, batches(1))
    with pytest.raises(ValueError, match="param group 0 is a GaLore group"):
        plain.load_state_dict(galore.state_dict())
