"""GaLoreAdamW against the update rule of DESIGN.md ("Notation and the update").

Three yardsticks, none of them galore_kernels' own reference functions:
1. a float64 model of the rule written here from DESIGN.md;
2. galore-torch 1.0's GaLoreAdamW run in lockstep on identical gradients;
3. the optimizer itself fed a contiguous copy of a non-contiguous gradient.
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW
from helpers import galore_torch_adamw, generator, max_rel, randn

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SHAPES = ((37, 53), (53, 37), (64, 64))
BETAS = (0.9, 0.999)
EPS = 1e-6


# ------------------------------------------------------------------------------ float64 model
def side_rule(m: int, n: int, proj_type: str) -> str:
    """DESIGN.md's side rule, written out again: std projects right when m >= n (square included)."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class Float64Model:
    """One parameter's AdamW / GaLore-AdamW trajectory in float64, from DESIGN.md's pseudo-code.

    The basis: a refresh takes the top-r left singular vectors (columns of U) and/or right ones (rows
    of Vh) of the gradient. Singular vectors are defined up to sign only, and the sign matters here:
    M and V carry coordinates of the old basis into the new one after a refresh, so a flipped vector
    flips the sign of M's row/column against the gradient's new coordinates. The model therefore
    takes its SVD with the *same call on the same float32 gradient* as the optimizer
    (``torch.linalg.svd(G32, full_matrices=False)``) and only then converts the basis to float64.
    Everything after that (projection, moments, step size, back-projection, decay) is float64.
    """

    def __init__(self, W0, *, lr, weight_decay, correct_bias=True, rank=None, gap=None, scale=None,
                 proj_type=None, betas=BETAS, eps=EPS):
        self.W = W0.detach().to(torch.float64).clone()
        self.lr, self.wd, self.correct_bias = lr, weight_decay, correct_bias
        self.b1, self.b2 = betas
        self.eps = eps
        self.galore = rank is not None
        self.t = 0
        self.M = self.V = None
        self.P = self.Q = None  # P: (m, r) columns, Q: (r, n) rows
        if self.galore:
            m, n = W0.shape
            self.rank = min(rank, m, n)
            self.gap, self.scale = gap, scale
            self.side = side_rule(m, n, proj_type)

    def _refresh(self, g32):
        U, _, Vh = torch.linalg.svd(g32, full_matrices=False)  # float32, as the optimizer does
        r = self.rank
        if self.side in ("left", "full"):
            self.P = U[:, :r].to(torch.float64)
        if self.side in ("right", "full"):
            self.Q = Vh[:r, :].to(torch.float64)

    def _project(self, g):
        if self.side == "left":
            return self.P.T @ g
        if self.side == "right":
            return g @ self.Q.T
        return self.P.T @ g @ self.Q.T

    def _back(self, n):
        if self.side == "left":
            return self.P @ n
        if self.side == "right":
            return n @ self.Q
        return self.P @ n @ self.Q

    def step(self, g32):
        g = g32.to(torch.float64)
        if self.galore:
            if self.t % self.gap == 0:  # t counted before the increment
                self._refresh(g32)
            R = self._project(g)
        else:
            R = g
        self.t += 1
        if self.M is None:
            self.M, self.V = torch.zeros_like(R), torch.zeros_like(R)
        self.M = self.b1 * self.M + (1 - self.b1) * R
        self.V = self.b2 * self.V + (1 - self.b2) * R * R
        N = self.M / (self.V.sqrt() + self.eps)
        if self.correct_bias:
            s = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        else:
            s = self.lr
        update = self.scale * self._back(N) if self.galore else N
        self.W = self.W - s * update
        self.W = self.W - self.lr * self.wd * self.W  # decoupled decay after the update, no scale


# Tolerance for float32 optimizer vs float64 model: each step rounds W, M, V and a few products of
# length <= 64 in float32 (relative error ~1e-7 each); after 12-40 steps that stays a few 1e-7 of the
# largest entry. 1e-5 leaves a 10x margin, yet is ~10x below the effect of a real mistake (see the
# W0 scale below). Measured today: <= 2e-7.
MODEL_RTOL = 1e-5

# Initial weights are small (1e-2) next to the total update (12 steps of ~2.5e-3): so max|W| does not
# hide the update, and swapping the order of update and decay (a term lr*wd*s*N ~ 2.5e-6 per step,
# i.e. ~1e-4 of max|W|) would fail MODEL_RTOL by ~10x.
W0_SCALE = 1e-2

# Gradients are drawn at scale 1e-4, where eps=1e-6 is ~1% of a typical |R| (so where eps sits in
# sqrt(V) + eps is tested too). The reason is proj_type="full": at a refresh, P^T G Q^T of the very
# gradient the SVD came from is diag(s) plus off-diagonal float32 rounding noise (~1e-7 ||G||), and at
# the first step Adam normalises that noise to entries of size ~1 (M / sqrt(V) = 0.1 R / (0.032 |R|))
# whose signs are rounding accidents: float32 and float64 disagree there by O(1). With |G| ~ 1e-4 the
# noise (~1e-10) sits far below eps and those entries stay ~1e-5 in both. (galore-torch does the same
# arithmetic; this is a property of "full", not a difference between implementations.)
GRAD_SCALE = 1e-4


def _galore_group(W, pt, svd="exact", gap=5):
    return {"params": [W], "rank": 8, "update_proj_gap": gap, "scale": 0.25, "proj_type": pt, "svd": svd}


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_step_matches_float64_model(proj_type, shape, correct_bias):
    m, n = shape
    gen = generator(1000 + 10 * PROJ_TYPES.index(proj_type) + SHAPES.index(shape) + 500 * correct_bias)
    W0 = randn(m, n, gen=gen, scale=W0_SCALE)
    W = nn.Parameter(W0.clone())
    model = Float64Model(W0, lr=1e-2, weight_decay=0.1, correct_bias=correct_bias, rank=8, gap=5,
                         scale=0.25, proj_type=proj_type)
    opt = GaLoreAdamW([_galore_group(W, proj_type)], lr=1e-2, weight_decay=0.1, correct_bias=correct_bias)
    for step in range(12):  # refreshes at steps 0, 5, 10
        g = randn(m, n, gen=gen, scale=GRAD_SCALE)
        W.grad = g.clone()
        opt.step()
        model.step(g)
        assert max_rel(W, model.W) < MODEL_RTOL, f"W after step {step}"

    state = opt.state[W]
    assert state["step"] == 12
    r = 8
    expected_shape = {"left": (r, n), "right": (m, r), "full": (r, r)}[side_rule(m, n, proj_type)]
    for key, ref in (("exp_avg", model.M), ("exp_avg_sq", model.V)):
        assert tuple(state[key].shape) == expected_shape, key
        assert state[key].dtype == torch.float32, key
        assert max_rel(state[key], ref) < MODEL_RTOL, key
    # The updates must not be negligible next to W0, or the comparison above would prove little.
    assert max_rel(model.W, W0) > 0.03
    # Stored bases: the float32 SVD's vectors (up to the copy), the same ones the model uses.
    if model.P is not None:
        assert max_rel(state["proj_left"], model.P) < 1e-6
    if model.Q is not None:
        assert max_rel(state["proj_right"], model.Q) < 1e-6


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 53), (53,), (3, 5, 7)], ids=str)
def test_plain_group_matches_float64_adamw_decay_after_update(shape, correct_bias):
    gen = generator(2000 + len(shape) + 7 * correct_bias)
    W = nn.Parameter(randn(*shape, gen=gen, scale=W0_SCALE))
    W_torch = nn.Parameter(W.detach().clone())
    model = Float64Model(W, lr=1e-2, weight_decay=0.1, correct_bias=correct_bias)
    opt = GaLoreAdamW([{"params": [W]}], lr=1e-2, weight_decay=0.1, correct_bias=correct_bias)
    torch_opt = torch.optim.AdamW([W_torch], lr=1e-2, weight_decay=0.1, eps=EPS)
    for _ in range(15):
        g = randn(*shape, gen=gen)
        W.grad = g.clone()
        W_torch.grad = g.clone()
        opt.step()
        torch_opt.step()
        model.step(g)
    assert max_rel(W, model.W) < MODEL_RTOL
    assert max_rel(opt.state[W]["exp_avg"], model.M) < MODEL_RTOL
    assert max_rel(opt.state[W]["exp_avg_sq"], model.V) < MODEL_RTOL
    if correct_bias:
        # torch.optim.AdamW decays before the update; that differs from the model by ~lr*wd*s per
        # step, far above MODEL_RTOL: the check above can tell the two rules apart.
        assert max_rel(W_torch, model.W) > 10 * MODEL_RTOL


def test_float64_model_detects_decay_order():
    """The model comparison is sensitive enough: the model with decay *before* the update (a plausible
    bug) is > 10x MODEL_RTOL away from the optimizer."""

    class DecayFirst(Float64Model):
        def step(self, g32):
            self.W = self.W - self.lr * self.wd * self.W
            wd, self.wd = self.wd, 0.0
            super().step(g32)
            self.wd = wd

    gen = generator(2100)
    W = nn.Parameter(randn(37, 53, gen=gen, scale=W0_SCALE))
    wrong = DecayFirst(W, lr=1e-2, weight_decay=0.1, rank=8, gap=5, scale=0.25, proj_type="std")
    opt = GaLoreAdamW([_galore_group(W, "std")], lr=1e-2, weight_decay=0.1)
    for _ in range(12):
        g = randn(37, 53, gen=gen)
        W.grad = g.clone()
        opt.step()
        wrong.step(g)
    assert max_rel(W, wrong.W) > 10 * MODEL_RTOL


# --------------------------------------------------------------------- galore-torch 1.0 parity
GT_RTOL = 1e-5  # same float32 operations in the same order: any drift at all is a change of rule


def _assert_lockstep(ours, theirs, params_ours, params_theirs, galore_params_theirs, exact):
    for p, q in zip(params_ours, params_theirs):
        if exact:
            # Pure random gradients, CPU: today the two trajectories are bitwise equal (same float32
            # operations in the same order, same LAPACK/BLAS calls). A looser check follows anyway.
            assert torch.equal(p, q)
        assert max_rel(p, q) <= GT_RTOL
        s, t = ours.state[p], theirs.state[q]
        assert s["step"] == t["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert s[key].shape == t[key].shape, key
            if exact:
                assert torch.equal(s[key], t[key]), key
            assert max_rel(s[key], t[key]) <= GT_RTOL, key
        if q in galore_params_theirs:
            ortho = t["projector"].ortho_matrix
            stored = [s[k] for k in ("proj_left", "proj_right") if k in s]
            expected = ortho if isinstance(ortho, list) else [ortho]
            assert len(stored) == len(expected)
            for a, b in zip(stored, expected):
                assert max_rel(a, b) <= GT_RTOL


def _make_galore_torch(params_groups, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch_adamw()(params_groups, no_deprecation_warning=True, **kw)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_lockstep_with_galore_torch_on_a_model(proj_type, shape, weight_decay):
    """A Linear(n -> m) weight in a GaLore group, its bias and a second Linear in a plain group;
    gradients from a real loss on galore-torch's copy, the same tensors handed to both optimizers."""
    m, n = shape
    with torch.random.fork_rng():  # seeded init without touching the global stream
        torch.manual_seed(3000 + PROJ_TYPES.index(proj_type) * 10 + SHAPES.index(shape))
        theirs_model = nn.Sequential(nn.Linear(n, m), nn.Tanh(), nn.Linear(m, 5))
    ours_model = copy.deepcopy(theirs_model)
    gen = generator(3100 + PROJ_TYPES.index(proj_type) * 10 + SHAPES.index(shape))

    def groups(model, ours):
        g = {"params": [model[0].weight], "rank": 8, "update_proj_gap": 7, "scale": 0.25, "proj_type": proj_type}
        if ours:
            g["svd"] = "exact"
        return [g, {"params": [model[0].bias, model[2].weight, model[2].bias]}]

    kw = dict(lr=1e-2, weight_decay=weight_decay)
    theirs = _make_galore_torch(groups(theirs_model, False), **kw)
    ours = GaLoreAdamW(groups(ours_model, True), **kw)
    p_theirs, p_ours = list(theirs_model.parameters()), list(ours_model.parameters())
    W0 = ours_model[0].weight.detach().clone()
    for _ in range(33):  # refreshes at 0, 7, 14, 21, 28
        x = randn(11, n, gen=gen)
        y = randn(11, 5, gen=gen)
        theirs_model.zero_grad()
        nn.functional.mse_loss(theirs_model(x), y).backward()
        for p, q in zip(p_ours, p_theirs):
            p.grad = q.grad.clone()
        theirs.step()
        ours.step()
        _assert_lockstep(ours, theirs, p_ours, p_theirs, {theirs_model[0].weight}, exact=False)
    # The GaLore weight really moved: the comparison is not between two untouched copies.
    assert max_rel(ours_model[0].weight, W0) > 100 * GT_RTOL


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_lockstep_with_galore_torch_bitwise_on_random_gradients(proj_type, shape):
    m, n = shape
    gen = generator(4000 + PROJ_TYPES.index(proj_type) * 10 + SHAPES.index(shape))
    W0 = randn(m, n, gen=gen)
    ours_W, theirs_W = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    group = {"rank": 8, "update_proj_gap": 7, "scale": 0.25, "proj_type": proj_type}
    ours = GaLoreAdamW([{"params": [ours_W], "svd": "exact", **group}], lr=1e-2, weight_decay=0.1)
    theirs = _make_galore_torch([{"params": [theirs_W], **group}], lr=1e-2, weight_decay=0.1)
    for _ in range(31):
        g = randn(m, n, gen=gen)
        ours_W.grad, theirs_W.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        _assert_lockstep(ours, theirs, [ours_W], [theirs_W], {theirs_W}, exact=True)
    assert not torch.equal(ours_W.detach(), W0)  # it moved


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_torch_state_dict_loads_and_continues_in_lockstep(proj_type):
    """Drop-in also for checkpoints: galore-torch's state dict (its bases inside GaLoreProjector
    objects, its groups without our keys) loads into GaLoreAdamW after 10 steps, and both continue
    bitwise equal through two more refreshes (t = 14, 21). A plain-AdamW group rides along."""
    m, n = 37, 53
    gen = generator(4500 + PROJ_TYPES.index(proj_type))
    W0, b0 = randn(m, n, gen=gen), randn(n, gen=gen)
    theirs_W, theirs_b = nn.Parameter(W0.clone()), nn.Parameter(b0.clone())
    group = {"rank": 8, "update_proj_gap": 7, "scale": 0.25, "proj_type": proj_type}
    theirs = _make_galore_torch([{"params": [theirs_W], **group}, {"params": [theirs_b]}], lr=1e-2, weight_decay=0.1)

    def step_both(*pairs):
        for ours_p, theirs_p in pairs:
            g = randn(*ours_p.shape, gen=gen)
            ours_p.grad, theirs_p.grad = g.clone(), g.clone()

    for _ in range(10):  # refreshes at steps 0 and 7
        theirs_W.grad, theirs_b.grad = randn(m, n, gen=gen), randn(n, gen=gen)
        theirs.step()
    buffer = io.BytesIO()  # a galore-torch checkpoint: its GaLoreProjector objects need weights_only=False
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    ours_W, ours_b = nn.Parameter(theirs_W.detach().clone()), nn.Parameter(theirs_b.detach().clone())
    ours = GaLoreAdamW([{"params": [ours_W], "svd": "exact", **group}, {"params": [ours_b]}], lr=1e-2,
                       weight_decay=0.1)
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["svd"] == "exact" and ours.param_groups[0]["refresh_policy"] == "fixed"
    assert "projector" not in ours.state[ours_W] and ours.state[ours_W]["exp_avg"].dtype == torch.float32
    pairs = [(ours_W, theirs_W), (ours_b, theirs_b)]
    for _ in range(12):
        step_both(*pairs)
        theirs.step()
        ours.step()
        _assert_lockstep(ours, theirs, [ours_W, ours_b], [theirs_W, theirs_b], {theirs_W}, exact=True)
    assert ours.state[ours_W]["refresh_count"] == 4  # at t = 0, 7 (galore-torch), 14, 21 (ours)


def test_reverse_std_with_rank_equal_to_short_side_where_galore_torch_breaks():
    """8x20, rank 8, reverse_std: the right side is projected, so the low-rank tensor is 8x8 (square)
    and galore-torch's project_back re-derives the *left* side from that shape: it multiplies the
    (8, 20) basis by an (8, 8) tensor and fails (or, were it to run, updates the wrong way).
    GaLoreAdamW keeps the side it projected and follows the float64 model."""
    m, n = 8, 20
    gen = generator(5000)
    W0 = randn(m, n, gen=gen, scale=W0_SCALE)
    grads = [randn(m, n, gen=gen) for _ in range(12)]
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": "reverse_std"}

    theirs_W = nn.Parameter(W0.clone())
    theirs = _make_galore_torch([{"params": [theirs_W], **group}], lr=1e-2, weight_decay=0.1)
    model_1 = Float64Model(W0, lr=1e-2, weight_decay=0.1, rank=8, gap=5, scale=0.25, proj_type="reverse_std")
    theirs_W.grad = grads[0].clone()
    try:
        theirs.step()
    except RuntimeError:
        pass  # galore-torch 1.0 today: "mat1 and mat2 shapes cannot be multiplied"
    else:
        model_1.step(grads[0])
        assert max_rel(theirs_W, model_1.W) > 10 * MODEL_RTOL

    ours_W = nn.Parameter(W0.clone())
    ours = GaLoreAdamW([{"params": [ours_W], "svd": "exact", **group}], lr=1e-2, weight_decay=0.1)
    model = Float64Model(W0, lr=1e-2, weight_decay=0.1, rank=8, gap=5, scale=0.25, proj_type="reverse_std")
    for g in grads:
        ours_W.grad = g.clone()
        ours.step()
        model.step(g)
    assert model.side == "right"
    assert tuple(ours.state[ours_W]["exp_avg"].shape) == (8, 8)
    assert tuple(ours.state[ours_W]["proj_right"].shape) == (8, 20)
    assert max_rel(ours_W, model.W) < MODEL_RTOL
    assert max_rel(ours.state[ours_W]["exp_avg"], model.M) < MODEL_RTOL


# ---------------------------------------------------------------- non-contiguous gradients
# A transposed view reaches BLAS/LAPACK with other strides, which may reorder float32 sums (~1e-7
# relative per product); after 12 steps that stays well below 1e-6 of max|W|. A basis computed
# differently beyond rounding (or a stride bug) would be off by O(1).
NONCONTIG_RTOL = 1e-6


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_transposed_gradient_view_equals_contiguous_copy(svd, proj_type):
    m, n = 45, 71
    gen = generator(6000 + 3 * (svd == "exact") + (proj_type == "std"))
    W0 = randn(m, n, gen=gen, scale=W0_SCALE)
    W_view, W_copy = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    opt_view = GaLoreAdamW([_galore_group(W_view, proj_type, svd)], lr=1e-2, weight_decay=0.1)
    opt_copy = GaLoreAdamW([_galore_group(W_copy, proj_type, svd)], lr=1e-2, weight_decay=0.1)
    for _ in range(12):  # refreshes at 0, 5, 10
        X = randn(n, m, gen=gen)
        W_view.grad = X.t()
        assert not W_view.grad.is_contiguous()
        W_copy.grad = X.t().contiguous()
        opt_view.step()
        opt_copy.step()
    assert max_rel(W_view, W_copy) < NONCONTIG_RTOL
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_rel(opt_view.state[W_view][key], opt_copy.state[W_copy][key]) < NONCONTIG_RTOL
