"""Layer-wise mode: same weights as GaLoreAdamW stepped once per window, freed gradients, checkpoints."""
import io

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW, attach_layerwise

def LR_LAMBDA(step):  # a schedule that changes every step
    return 1.0 / (1.0 + 0.5 * step)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 33), nn.GELU(), nn.Linear(33, 5))


def groups(model, offset=0, policy="fixed"):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [
        {"params": [m.weight for m in linears], "rank": 4, "update_proj_gap": 3, "refresh_offset": offset,
         "refresh_policy": policy, "max_proj_gap": 12},
        {"params": [m.bias for m in linears]},
    ]


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 24, generator=gen), torch.randn(8, 5, generator=gen)) for _ in range(n)]


def loss_fn(model, x, y, accumulation):
    return ((model(x) - y) ** 2).mean() / accumulation


def run_standard(data, accumulation, offset=0, lr_lambda=LR_LAMBDA, policy="fixed", **kw):
    model = make_model()
    opt = GaLoreAdamW(groups(model, offset, policy), lr=1e-2, weight_decay=0.01, seed=3, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for i, (x, y) in enumerate(data):
        loss_fn(model, x, y, accumulation).backward()
        if (i + 1) % accumulation == 0 or i == len(data) - 1:  # the last, short window too
            opt.step()
            opt.zero_grad()
            sched.step()
    return model, opt


def run_layerwise(data, accumulation, offset=0, lr_lambda=LR_LAMBDA, policy="fixed", **kw):
    model = make_model()
    handle = attach_layerwise(model, groups(model, offset, policy), lr=1e-2, weight_decay=0.01, seed=3,
                              grad_accumulation_steps=accumulation, lr_lambda=lr_lambda, **kw)
    for x, y in data:
        loss_fn(model, x, y, accumulation).backward()
    handle.flush()
    return model, handle


@pytest.mark.parametrize("offset, policy", [(0, "fixed"), ("stagger", "fixed"), ("stagger", "adaptive")])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_layerwise_matches_standard_optimizer(accumulation, offset, policy):
    """11 windows of gap-3 refreshes (or adaptive gaps), a changing schedule and a short tail window
    (for A=4)."""
    data = batches(accumulation * 10 + (3 if accumulation > 1 else 1))
    std_model, std_opt = run_standard(data, accumulation, offset, policy=policy)
    lw_model, handle = run_layerwise(data, accumulation, offset, policy=policy)
    assert handle.step_count == 11
    for (name, a), b in zip(std_model.named_parameters(), lw_model.parameters()):
        # Summation order differs (per-micro-batch projections vs projection of the sum): float32 noise.
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        sa, sb = std_opt.state[a], handle.optimizer.state[b]
        assert sa["step"] == sb["step"] == 11
        assert sa.get("refresh_count") == sb.get("refresh_count")
        assert sa.get("proj_gap") == sb.get("proj_gap")
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    lr_now = handle.optimizer.param_groups[0]["lr"]
    assert lr_now == pytest.approx(1e-2 * LR_LAMBDA(11))


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_accumulation_one_is_bitwise_the_standard_step(state_dtype):
    data = batches(7)
    std_model, std_opt = run_standard(data, 1, state_dtype=state_dtype)
    lw_model, handle = run_layerwise(data, 1, state_dtype=state_dtype)
    for a, b in zip(std_model.parameters(), lw_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(std_opt.state[a]["exp_avg"], handle.optimizer.state[b]["exp_avg"])
        assert handle.optimizer.state[b]["exp_avg"].dtype == getattr(torch, state_dtype)


def test_gradients_are_freed_and_only_refresh_windows_keep_full_gradients():
    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, grad_accumulation_steps=4)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    data = batches(4 * 3)
    for i, (x, y) in enumerate(data):
        loss_fn(model, x, y, 4).backward()
        window, micro = divmod(i, 4)
        last = micro == 3
        if last:
            assert all(p.grad is None for p in model.parameters())
        elif window == 0:  # step 0 refreshes: the full window gradient is kept
            assert all(w.grad is not None for w in weights)
        else:  # steps 1, 2 use the basis from step 0: only low-rank accumulators remain
            assert all(w.grad is None for w in weights)
        if not last:
            assert all(b.grad is not None for b in biases)  # plain params accumulate as usual
    assert handle.step_count == 3


def test_checkpoint_at_window_boundary_resumes_exactly_and_mid_window_is_refused():
    data = batches(4 * 6)
    ref_model, ref_handle = run_layerwise(data, 4)

    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, weight_decay=0.01, seed=3,
                              grad_accumulation_steps=4, lr_lambda=LR_LAMBDA)
    for x, y in data[:10]:
        loss_fn(model, x, y, 4).backward()
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        handle.state_dict()
    for x, y in data[10:12]:
        loss_fn(model, x, y, 4).backward()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "layerwise": handle.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)

    resumed = make_model(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    resumed_handle = attach_layerwise(resumed, groups(resumed), lr=1e-2, weight_decay=0.01, seed=3,
                                      grad_accumulation_steps=4, lr_lambda=LR_LAMBDA)
    resumed_handle.load_state_dict(checkpoint["layerwise"])
    assert resumed_handle.step_count == 3
    for x, y in data[12:]:
        loss_fn(resumed, x, y, 4).backward()
    assert resumed_handle.step_count == ref_handle.step_count == 6
    for a, b in zip(ref_model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_per_parameter_clipping_clips_the_consumed_gradient():
    """First step (a refresh): exp_avg = (1 - b1) * clip(P^T G) for a GaLore weight."""
    data = batches(1)
    x, y = data[0]
    probe = make_model()
    loss_fn(probe, x, y, 1).backward()
    g = probe[2].weight.grad  # 33 x 40: projected on the left (m < n)

    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, max_grad_norm=1e-3)
    loss_fn(model, x, y, 1).backward()
    state = handle.optimizer.state[model[2].weight]
    projected = state["proj_left"].T @ g
    assert projected.norm() > 1e-2  # so the clip bites
    expected = (1 - 0.9) * projected * (1e-3 / (projected.norm() + 1e-6))
    torch.testing.assert_close(state["exp_avg"], expected, rtol=1e-4, atol=1e-9)
    bias_state = handle.optimizer.state[model[2].bias]
    assert bias_state["exp_avg"].norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)


def test_non_finite_gradient_skips_that_parameter_in_layerwise_mode():
    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, grad_accumulation_steps=2)
    x, y = batches(1)[0]
    loss_fn(model, x, y, 2).backward()
    loss_fn(model, x, y, 2).backward()  # window 1: refresh
    frozen = model[0].weight.detach().clone()
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loss_fn(model, x, y, 2).backward()
        loss_fn(model, x, y, 2).backward()
    assert torch.equal(model[0].weight, frozen)
    assert handle.optimizer.state[model[0].weight]["step"] == 1
    assert handle.optimizer.state[model[2].weight]["step"] == 2


def test_remove_restores_plain_gradient_accumulation():
    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2)
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    loss_fn(model, x, y, 1).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_loss_scaling_and_bad_arguments_are_refused():
    model = make_model()

    class EnabledScaler:  # torch.amp.GradScaler needs a GPU to be enabled; its interface is enough
        def is_enabled(self):
            return True

    with pytest.raises(ValueError, match="loss scaling cannot be combined with layer-wise"):
        attach_layerwise(model, groups(model), grad_scaler=EnabledScaler())
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        attach_layerwise(model, groups(model), grad_accumulation_steps=0)
    with pytest.raises(ValueError, match="optimizer='adafactor'"):
        attach_layerwise(model, groups(model), optimizer="adafactor")
    with pytest.raises(ValueError, match="max_grad_norm"):
        attach_layerwise(model, groups(model), max_grad_norm=0.0)


def test_a_backward_pass_that_raises_does_not_stop_window_accounting():
    """A caller may catch an exception from backward (e.g. out of memory) and go on; the next
    backward passes must still end their windows."""
    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, grad_accumulation_steps=2)
    x, y = batches(1)[0]

    def fail(grad):
        raise RuntimeError("simulated failure inside backward")

    hook = model[0].weight.register_hook(fail)  # runs after later layers' post-accumulate hooks
    with pytest.raises(RuntimeError, match="simulated failure"):
        loss_fn(model, x, y, 2).backward()
    hook.remove()
    model.zero_grad(set_to_none=True)
    for _ in range(4):
        loss_fn(model, x, y, 2).backward()
    assert handle.step_count == 2


def test_load_state_dict_inside_a_window_drops_the_whole_window():
    """A rollback inside a window: the open window's low-rank sums and the full gradients still
    summing in .grad (refresh windows, plain parameters) are dropped, so the next window equals a
    clean resume's."""
    data = batches(4 * 3)
    model = make_model()
    handle = attach_layerwise(model, groups(model), lr=1e-2, weight_decay=0.01, seed=3, grad_accumulation_steps=4)
    for x, y in data[:4]:
        loss_fn(model, x, y, 4).backward()
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "layerwise": handle.state_dict()}
    for x, y in data[4:6]:  # half a window, then roll back
        loss_fn(model, x, y, 4).backward()
    model.load_state_dict(saved["model"])
    handle.load_state_dict(saved["layerwise"])
    assert all(p.grad is None for p in model.parameters())
    clean = make_model(seed=99)
    clean.load_state_dict(saved["model"])
    clean_handle = attach_layerwise(clean, groups(clean), lr=1e-2, weight_decay=0.01, seed=3, grad_accumulation_steps=4)
    clean_handle.load_state_dict(saved["layerwise"])
    for x, y in data[4:8]:
        loss_fn(model, x, y, 4).backward()
        loss_fn(clean, x, y, 4).backward()
    assert handle.step_count == clean_handle.step_count == 2
    for a, b in zip(model.parameters(), clean.parameters()):
        assert torch.equal(a, b)


def test_groups_added_through_the_handle_are_hooked_and_direct_additions_are_refused():
    model = make_model()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    handle = attach_layerwise(model, [{"params": [linears[0].weight], "rank": 4}], lr=1e-2, lr_lambda=LR_LAMBDA)
    handle.add_param_group({"params": [linears[1].weight, linears[2].weight], "rank": 4, "lr": 5e-3})
    handle.add_param_group({"params": [m.bias for m in linears]})
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    loss_fn(model, x, y, 1).backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every group stepped
    assert handle.optimizer.param_groups[1]["lr"] == pytest.approx(5e-3 * LR_LAMBDA(1))

    other = make_model()
    handle = attach_layerwise(other, [{"params": [other[0].weight], "rank": 4}], lr=1e-2)
    handle.optimizer.add_param_group({"params": [other[2].weight]})
    with pytest.raises(RuntimeError, match="handle.add_param_group"):
        loss_fn(other, x, y, 1).backward()
