"""Stochastic rounding of bf16 weights (``stochastic_rounding=True``), on the reference path.

Round to nearest loses every update below half a bf16 ulp (2^-8 relative): a bf16 weight of 1.0
never moves under steps of 1e-3. Stochastic rounding rounds up or down with probabilities
proportional to the distances, so the expected rounded value is the float32 one. The Triton kernels
have their own tests (tests/triton_interp), with the same yardsticks.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW
from galore_kernels.reference.step import stochastic_round_reference


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each float32 value (equal where x is a bf16 value)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)  # truncation: towards zero
    carry = ((bits & 0xFFFF) != 0).to(torch.int32) * 65536
    up = ((bits & -65536) + carry).view(torch.float32)
    low, high = torch.minimum(down, up), torch.maximum(down, up)
    return low, high


def test_result_is_a_neighbour_and_exact_values_stay():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-3, 3, 4096)
    rounded = stochastic_round_reference(x, seed=11, step=1).float()
    low, high = bf16_neighbours(x)
    assert bool(((rounded == low) | (rounded == high)).all())
    exact = x.bfloat16().float()  # already bf16 values: nothing to round
    assert torch.equal(stochastic_round_reference(exact, seed=11, step=1).float(), exact)


@pytest.mark.parametrize("value", [1.0 + 2**-9, -(1.0 + 3 * 2**-10), 3.0e-3 * (1 + 2**-10)])
def test_rounding_is_unbiased(value):
    x = torch.full((20000,), value, dtype=torch.float32)
    rounded = stochastic_round_reference(x, seed=3, step=5).double()
    low, high = (t.double()[0] for t in bf16_neighbours(x[:1]))
    p_up = (value - low) / (high - low)  # the fraction that must round away from `low`
    observed = float((rounded == high).double().mean())
    sigma = (p_up * (1 - p_up) / x.numel()) ** 0.5
    assert abs(observed - p_up) < 5 * sigma, (observed, p_up)
    assert abs(float(rounded.mean()) - value) < 5 * sigma * float(high - low)


def test_bits_are_reproducible_per_seed_and_step():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = stochastic_round_reference(x, seed=7, step=3)
    assert torch.equal(a, stochastic_round_reference(x, seed=7, step=3))
    assert not torch.equal(a, stochastic_round_reference(x, seed=7, step=4))
    assert not torch.equal(a, stochastic_round_reference(x, seed=8, step=3))


def constant_gradient_run(stochastic: bool, steps: int = 40) -> torch.Tensor:
    """A bf16 weight of ones under Adam steps of lr = 1e-3 (a quarter of half an ulp at 1.0)."""
    w = nn.Parameter(torch.ones(64, 32, dtype=torch.bfloat16))
    opt = GaLoreAdamW([w], lr=1e-3, stochastic_rounding=stochastic, seed=2)
    for _ in range(steps):
        w.grad = torch.ones_like(w)  # Adam's normalised step is then 1: each update is -lr
        opt.step()
    return w.detach().float()


def test_small_updates_move_the_weight_on_average_only_when_stochastic():
    nearest = constant_gradient_run(False)
    assert torch.equal(nearest, torch.ones_like(nearest))  # every update was lost
    stochastic = constant_gradient_run(True)
    # 40 steps of -1e-3 (bias correction makes the first steps exactly lr): the mean follows 1 - 0.04.
    assert abs(float(stochastic.mean()) - (1 - 40e-3)) < 3e-3
    assert float(stochastic.std()) > 0  # elements drew different bits


def test_galore_weights_round_stochastically_and_resume_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 7)).to(torch.bfloat16)

    def groups():  # fresh dicts each time: torch writes the defaults into the dicts it is given
        return [{"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 3},
                {"params": [model[0].bias, model[2].bias]}]

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 24, generator=gen).bfloat16(), torch.randn(8, 7, generator=gen).bfloat16()) for _ in range(8)]

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ((m(x) - y).float() ** 2).mean().backward()
            opt.step()

    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = GaLoreAdamW(groups(), lr=1e-2, stochastic_rounding=True, seed=4)
    train(model, reference, data)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)
    opt = GaLoreAdamW(groups(), lr=1e-2, stochastic_rounding=True, seed=4)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = GaLoreAdamW(groups(), lr=1e-2, seed=4)  # the setting comes back with the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(g["stochastic_rounding"] for g in resumed.param_groups)
    train(model, resumed, data[3:])
    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key

    model.load_state_dict(start)
    nearest = GaLoreAdamW(groups(), lr=1e-2, seed=4)
    train(model, nearest, data)
    assert not torch.equal(model[0].weight, uninterrupted["0.weight"])  # the rounding did change something


def test_settings_are_checked():
    w16 = nn.Parameter(torch.ones(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="stochastic_rounding is for bf16 weights"):
        GaLoreAdamW([w16], stochastic_rounding=True)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        GaLoreAdamW([nn.Parameter(torch.ones(2))], stochastic_rounding="yes")
    w32 = nn.Parameter(torch.ones(4, 4))  # float32 weights are not rounded: the setting is harmless
    opt = GaLoreAdamW([w32], stochastic_rounding=True)
    assert opt.rounding_seed(w32) is None


def second_moment_after_a_drop(state_dtype: str, backend: str = "reference", steps: int = 400) -> torch.Tensor:
    """exp_avg_sq of a rank-less weight whose gradients shrink 100x after 10 steps: it must decay."""
    w = nn.Parameter(torch.zeros(4096))
    opt = GaLoreAdamW([w], lr=1e-3, state_dtype=state_dtype, backend=backend, seed=1)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        w.grad = torch.randn(4096, generator=gen) * (1.0 if step < 10 else 0.01)
        opt.step()
    return opt.state[w]["exp_avg_sq"].double()


def test_bf16_second_moment_decays_like_float32():
    """bf16 moments are stored rounded stochastically: rounded to nearest, beta2's decay (0.1% a step,
    below half a bf16 ulp) would be lost every step and exp_avg_sq would stay at its peak (here 1.47x
    the float32 value after 390 steps of decay) -- Adam's steps too small from then on."""
    v32 = second_moment_after_a_drop("float32")
    v16 = second_moment_after_a_drop("bfloat16")
    ratio = float(v16.mean() / v32.mean())
    assert abs(ratio - 1) < 0.02, ratio
    elementwise = (v16 / v32 - 1).abs()
    assert float(elementwise.median()) < 0.05  # the rounding noise of 390 steps, decayed by beta2
