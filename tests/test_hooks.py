"""project_gradient_hook: gradients replaced by their rank-r filtered versions, same shape and dtype."""
import pytest
import torch
from torch import nn

from galore_kernels import project_gradient_hook


def known_spectrum(m, n, decay=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    s = decay ** torch.arange(k, dtype=torch.float64)
    return U, s, V


def feed(param, grad):
    """Runs a backward pass that delivers ``grad`` to ``param``."""
    (param * grad.to(param.dtype)).sum().backward()


@pytest.mark.parametrize("shape, side", [((20, 45), "left"), ((45, 20), "right")])
def test_exact_hook_filters_onto_the_top_singular_subspace(shape, side):
    U, s, V = known_spectrum(*shape)
    G = (U * s) @ V.T
    r = 5
    w = nn.Parameter(torch.zeros(shape))
    hook = project_gradient_hook(w, r, svd="exact")
    feed(w, G.float())
    expected = U[:, :r] @ U[:, :r].T @ G if side == "left" else G @ V[:, :r] @ V[:, :r].T
    assert hook.side == side
    torch.testing.assert_close(w.grad.double(), expected, rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(w.grad.double(), atol=1e-5) == r


def test_randomized_hook_keeps_shape_dtype_and_rank_for_bf16():
    U, s, V = known_spectrum(33, 65)
    w = nn.Parameter(torch.zeros(33, 65, dtype=torch.bfloat16))
    project_gradient_hook(w, 4)
    feed(w, ((U * s) @ V.T).float())
    assert w.grad.shape == (33, 65) and w.grad.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(w.grad.double())
    assert sv[4:].max() < 1e-2 * sv[0]  # bf16 rounding only beyond rank 4
    torch.testing.assert_close(sv[:4], s[:4], rtol=2e-2, atol=0)


def test_full_projection_filters_both_sides():
    U, s, V = known_spectrum(30, 40)
    G = ((U * s) @ V.T).float() + 0.01 * torch.randn(30, 40)
    w = nn.Parameter(torch.zeros(30, 40))
    hook = project_gradient_hook(w, 3, proj_type="full", svd="exact")
    feed(w, G)
    P, Q = hook.proj_left, hook.proj_right
    torch.testing.assert_close(w.grad, P @ P.T @ G @ Q.T @ Q, rtol=1e-4, atol=1e-6)


def test_basis_refreshes_every_gap_calls_and_remove_detaches():
    w = nn.Parameter(torch.zeros(16, 24))
    hook = project_gradient_hook(w, 2, update_proj_gap=3, seed=5)
    bases = []
    for _ in range(7):
        w.grad = None
        feed(w, torch.randn(16, 24))
        bases.append(hook.proj_left.clone())
    assert hook.calls == 7 and hook.refresh_count == 3  # calls 0, 3, 6
    changed = [not torch.equal(a, b) for a, b in zip(bases, bases[1:])]
    assert changed == [False, False, True, False, False, True]
    hook.remove()
    w.grad = None
    g = torch.randn(16, 24)
    feed(w, g)
    assert torch.equal(w.grad, g)


def test_hook_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        project_gradient_hook(nn.Parameter(torch.zeros(3, 3, 3)), 2)
    with pytest.raises(ValueError, match="rank"):
        project_gradient_hook(nn.Parameter(torch.zeros(3, 3)), 0)
    with pytest.raises(ValueError, match="proj_type"):
        project_gradient_hook(nn.Parameter(torch.zeros(3, 3)), 1, proj_type="up")


def test_environment_forces_the_hooks_backend_too(monkeypatch):
    """GALORE_KERNELS_BACKEND holds for the whole process, as for the optimizer."""
    monkeypatch.setenv("GALORE_KERNELS_BACKEND", "reference")
    hook = project_gradient_hook(nn.Parameter(torch.randn(8, 12)), 2, backend="triton")
    assert hook.backend == "reference"
    hook.remove()
