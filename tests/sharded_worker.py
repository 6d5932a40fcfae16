"""One rank of tests/test_sharded.py, started by torch.distributed.run (gloo, CPU).

Each scenario asserts on every rank; a failed assertion exits non-zero and fails the test. The
single-process references run in every rank from the same seeds, so no tensors need to travel.
``GALORE_SHARDED_DEVICE=cuda`` runs them on GPUs over nccl (one GPU per rank; the GPU tests use one).
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from galore_kernels import GaLoreAdamW, attach_layerwise, project_gradient_hook, sharded
from galore_kernels.subspace import projection_bases
from galore_kernels.dispatch import REFERENCE_REFRESH

# Sharded and single-process runs differ in summation order only (all-reduced Grams and products,
# reduce-scattered gradients): float32 rounding, amplified a little by 7 Adam steps and 3 refreshes.
RELATIVE_TOL = 2e-5
DEVICE = os.environ.get("GALORE_SHARDED_DEVICE", "cpu")


def rows_on_last_mesh_dim(mesh, placement) -> list:
    """``placement`` on the mesh's last dimension, replicated over the others (HSDP's layout)."""
    return [Replicate()] * (mesh.ndim - 1) + [placement]


def make_model() -> torch.nn.Sequential:
    """Weights that project left (48x64), right with uneven rows (53x48), both sides (37x53), and a
    1-row weight that leaves a rank without rows (with 2 ranks or more)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 53), torch.nn.Tanh(),
        torch.nn.Linear(53, 37), torch.nn.Tanh(), torch.nn.Linear(37, 1)).to(DEVICE)


def param_groups(model, svd: str) -> list[dict]:
    left_right = [model[0].weight, model[2].weight, model[6].weight]
    full = [model[4].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in left_right + full)]
    return [{"params": rest},
            {"params": left_right, "rank": 6, "update_proj_gap": 3, "svd": svd, "refresh_policy": "adaptive"},
            {"params": full, "rank": 5, "update_proj_gap": 2, "proj_type": "full", "svd": svd}]


def shard(model, mesh):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batches(count: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(24, 64, generator=gen).to(DEVICE) for _ in range(count)]  # 24: equal shares for 1-4 ranks


def train(model, opt, data, rank: int, world: int) -> None:
    for x in data:
        model(x.chunk(world)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()


def assert_close(reference: torch.nn.Module, model: torch.nn.Module, tol: float, what: str) -> None:
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        a, b = (t.full_tensor() if sharded.is_dtensor(t) else t for t in (a, b))
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err <= tol, f"{what}: {name} differs by {err:.2e} (relative), more than {tol:.0e}"


def assert_replicas_equal(opt: GaLoreAdamW, what: str) -> None:
    """Every rank holding the same rows of a parameter or a state tensor (all ranks for a replicated
    one, the HSDP replicas of a shard) holds the same bits: DTensor's contract, and what
    torch.distributed.checkpoint relies on when it saves one replica."""
    mine = []
    for index, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        tensors = {"weight": p, **{k: v for k, v in opt.state[p].items() if sharded.is_dtensor(v)}}
        for key, value in tensors.items():
            coordinate = value.device_mesh.get_coordinate()
            rows = tuple(c for c, placement in zip(coordinate, value.placements) if isinstance(placement, Shard))
            mine.append(((index, key, rows), value.to_local().detach().cpu()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    listed = [[key[:2] for key, _ in entries] for entries in everyone]
    assert all(names == listed[0] for names in listed), f"{what}: the ranks hold different state entries"
    held: dict = {}
    for entries in everyone:
        for key, value in entries:
            held.setdefault(key, []).append(value)
    for key, values in held.items():
        for value in values[1:]:
            assert torch.equal(value, values[0]), f"{what}: replicas of parameter {key[0]}'s {key[1]} (rows {key[2]}) differ"


def scenario_training(mesh, rank: int, world: int) -> None:
    """FSDP2 training equals single-process training; state placed as documented (the row-split
    tensors sharded like the weight, the others replicated).

    Randomized refreshes: the single-process run computes its own gradients. Exact refreshes (a
    full SVD, whose singular vectors' signs can flip under rounding-level changes of G, as in
    galore-torch): the single-process optimizer is fed the sharded run's gradients, gathered."""
    trained = {}
    for svd in ("randomized", "exact"):
        reference, model = trained[svd] = make_model(), shard(make_model(), mesh)
        assert tuple(model[0].weight.placements) == tuple(rows_on_last_mesh_dim(mesh, Shard(0)))
        opt_ref = GaLoreAdamW(param_groups(reference, svd), lr=1e-2, weight_decay=0.1)
        opt = GaLoreAdamW(param_groups(model, svd), lr=1e-2, weight_decay=0.1)
        for x in batches(7):
            model(x.chunk(world)[rank]).square().mean().backward()
            if svd == "exact":
                for a, b in zip(reference.parameters(), model.parameters()):
                    a.grad = b.grad.full_tensor()
            else:
                reference(x).square().mean().backward()
            opt.step()
            opt_ref.step()
            opt.zero_grad()
            opt_ref.zero_grad()
        assert_close(reference, model, RELATIVE_TOL, f"svd={svd}")
        assert_replicas_equal(opt, f"svd={svd}")
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            state, state_ref = opt.state[p], opt_ref.state[p_ref]
            assert state["step"] == state_ref["step"] == 7 and state.get("refresh_count") == state_ref.get("refresh_count")
            assert state.get("proj_gap") == state_ref.get("proj_gap")  # the adaptive policy decided alike
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                assert sharded.is_dtensor(value), f"{key} of {tuple(p.shape)} is not a DTensor"
                rows_split = key == "proj_left" or (key.startswith("exp_avg") and opt.side(p) in (None, "right"))
                expected = tuple(p.placements) if rows_split else tuple(Replicate() for _ in p.placements)
                assert tuple(value.placements) == expected, (key, tuple(p.shape), value.placements)
                assert value.shape == state_ref[key].shape
                whole = value.full_tensor()
                err = ((whole - state_ref[key]).abs().max() / state_ref[key].abs().max().clamp_min(1e-30)).item()
                assert err <= 1e-3, f"{key} of {tuple(p.shape)} differs by {err:.2e}"
    # step_param, one parameter at a time (its own all-reduces), as step() (the group's summed together).
    one_by_one = shard(make_model(), mesh)
    opt = GaLoreAdamW(param_groups(one_by_one, "randomized"), lr=1e-2, weight_decay=0.1)
    for x in batches(7):
        one_by_one(x.chunk(world)[rank]).square().mean().backward()
        for p in one_by_one.parameters():
            opt.step_param(p, p.grad)
        opt.zero_grad()
    assert_close(trained["randomized"][1], one_by_one, RELATIVE_TOL, "step_param")
    assert_replicas_equal(opt, "step_param")


def scenario_triton(mesh, rank: int, world: int) -> None:
    """backend="triton" (run by the interpreter here: TRITON_INTERPRET=1) steps each rank's rows with
    the kernels, and a rank without rows with the reference; it matches the reference optimizer fed
    the same gradients."""
    reference, model = make_model(), shard(make_model(), mesh)
    opt_ref = GaLoreAdamW(param_groups(reference, "randomized"), lr=1e-2, weight_decay=0.1, backend="reference")
    opt = GaLoreAdamW(param_groups(model, "randomized"), lr=1e-2, weight_decay=0.1, backend="triton")
    assert opt._step_backend(model[0].weight).name == "triton"
    for x in batches(4):
        model(x.chunk(world)[rank]).square().mean().backward()
        for a, b in zip(reference.parameters(), model.parameters()):
            a.grad = b.grad.full_tensor()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    assert_close(reference, model, 1e-4, "backend=triton")
    # The 1-row weight projects on the left and leaves a rank without rows: its replicated moments
    # must not take the kernels on some ranks and the reference on others.
    assert_replicas_equal(opt, "backend=triton")
    if mesh.size(-1) == 2:  # the kernels' rounding bits, keyed by shard
        scenario_rounding(mesh, rank, world, backend="triton")


def scenario_rounding(mesh, rank: int, world: int, backend: str = "auto") -> None:
    """bf16 weights with stochastic rounding and bf16 moments, on a mesh whose last dimension has two
    shards: the second shard's rows repeat the first's, weights and gradients alike, so only the
    rounding bits can tell them apart, and they must (each shard draws its own). The first shard of a
    parameter without projection draws the unsharded run's bits; replicated moments (the left
    projection's) stay identical on every rank."""
    assert mesh.size(-1) == 2
    shapes = {"plain": (8, 256), "right": (300, 256), "left": (4, 256)}
    gen = torch.Generator().manual_seed(5)
    halves = {name: torch.randn(m // 2, n, generator=gen) for name, (m, n) in shapes.items()}
    weights = {name: torch.cat([half, half]).to(DEVICE, torch.bfloat16) for name, half in halves.items()}

    def optimizer(params):
        groups = [{"params": [params["plain"]]},
                  {"params": [params["right"], params["left"]], "rank": 2, "update_proj_gap": 50}]
        return GaLoreAdamW(groups, lr=1e-3, state_dtype="bfloat16", stochastic_rounding=True, seed=4, backend=backend)

    placements = rows_on_last_mesh_dim(mesh, Shard(0))
    plain = {name: torch.nn.Parameter(w.clone()) for name, w in weights.items()}
    split = {name: torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for name, w in weights.items()}
    opt_plain, opt_split = optimizer(plain), optimizer(split)
    for step in range(3):
        for name, half in halves.items():
            grad = (torch.cat([half, half]) * (step + 1) * 1e-2).to(DEVICE, torch.bfloat16)
            plain[name].grad = grad.clone()
            split[name].grad = distribute_tensor(grad.clone(), mesh, placements)
        opt_plain.step()
        opt_split.step()
    assert_replicas_equal(opt_split, "stochastic rounding")
    for name, (m, _) in shapes.items():
        whole = split[name].full_tensor()
        assert not torch.equal(whole[: m // 2], whole[m // 2:]), f"{name}: the two shards drew the same rounding bits"
    assert torch.equal(split["plain"].full_tensor()[:4], plain["plain"][:4]), "the first shard's bits are not the unsharded ones"


def save_checkpoint(model, opt, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)


def load_checkpoint(model, opt, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


def scenario_resume(mesh, rank: int, world: int) -> None:
    """A run saved after 4 steps with torch.distributed.checkpoint and resumed into a new model and
    optimizer ends bit for bit where the uninterrupted run ends; so does an in-memory state_dict
    round trip."""
    data = batches(7)
    straight = shard(make_model(), mesh)
    train(straight, GaLoreAdamW(param_groups(straight, "randomized"), lr=1e-2), data, rank, world)

    first = shard(make_model(), mesh)
    opt_first = GaLoreAdamW(param_groups(first, "randomized"), lr=1e-2)
    train(first, opt_first, data[:4], rank, world)
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)
    save_checkpoint(first, opt_first, folder[0])

    resumed = shard(make_model(), mesh)
    opt_resumed = GaLoreAdamW(param_groups(resumed, "randomized"), lr=1e-2)
    load_checkpoint(resumed, opt_resumed, folder[0])
    train(resumed, opt_resumed, data[4:], rank, world)
    assert_close(straight, resumed, 0.0, "resumed through torch.distributed.checkpoint")

    # In memory: the optimizer's own state_dict into a new optimizer over the same parameters.
    opt_again = GaLoreAdamW(param_groups(first, "randomized"), lr=1e-2)
    opt_again.load_state_dict(opt_first.state_dict())
    train(first, opt_again, data[4:], rank, world)
    assert_close(straight, first, 0.0, "resumed from an in-memory state_dict")


def scenario_save(mesh, rank: int, world: int) -> None:
    """The first 4 of 7 steps, saved with torch.distributed.checkpoint to $GALORE_SHARDED_CHECKPOINT."""
    model = shard(make_model(), mesh)
    opt = GaLoreAdamW(param_groups(model, "randomized"), lr=1e-2)
    train(model, opt, batches(7)[:4], rank, world)
    save_checkpoint(model, opt, os.environ["GALORE_SHARDED_CHECKPOINT"])


def scenario_resume_resharded(mesh, rank: int, world: int) -> None:
    """scenario_save's checkpoint, written at another world size, resumed here for the last 3 steps:
    the run ends where 7 single-process steps end (to rounding), replicas equal."""
    data = batches(7)
    reference = make_model()
    train(reference, GaLoreAdamW(param_groups(reference, "randomized"), lr=1e-2), data, 0, 1)
    model = shard(make_model(), mesh)
    opt = GaLoreAdamW(param_groups(model, "randomized"), lr=1e-2)
    load_checkpoint(model, opt, os.environ["GALORE_SHARDED_CHECKPOINT"])
    assert all(state["step"] == 4 for state in opt.state.values())
    train(model, opt, data[4:], rank, world)
    assert_close(reference, model, RELATIVE_TOL, "resumed at another world size")
    assert_replicas_equal(opt, "resumed at another world size")


def scenario_nonfinite(mesh, rank: int, world: int) -> None:
    """A NaN in one rank's rows of a gradient skips that parameter on every rank, so the replicated
    moments and the weight's rows stay consistent; the other parameters step."""
    model = shard(make_model(), mesh)
    opt = GaLoreAdamW(param_groups(model, "randomized"), lr=1e-2)
    train(model, opt, batches(2), rank, world)
    left, right = model[0].weight, model[2].weight
    before = {name: p.full_tensor().clone() for name, p in (("left", left), ("right", right))}
    moments = opt.state[left]["exp_avg"].full_tensor().clone()
    model(batches(1)[0].chunk(world)[rank]).square().mean().backward()
    if rank == world - 1:
        left.grad.to_local()[-1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("non-finite gradient" in str(w.message) for w in caught), "every rank warns about the skip"
    assert torch.equal(left.full_tensor(), before["left"]) and opt.state[left]["step"] == 2
    assert torch.equal(opt.state[left]["exp_avg"].full_tensor(), moments)
    assert not torch.equal(right.full_tensor(), before["right"]) and opt.state[right]["step"] == 3


def scenario_refresh(mesh, rank: int, world: int) -> None:
    """sharded.projection_bases on a row-split gradient equals the unsharded refresh (same seed):
    both sides, with and without power iterations, and for gradients that defeat CholeskyQR (zero,
    rank-deficient: the Householder fallback gathers the rows)."""
    gen = torch.Generator().manual_seed(3)
    m, n, rank_r = 45, 38, 7
    U = torch.linalg.qr(torch.randn(m, 20, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, 20, generator=gen, dtype=torch.float64))[0]
    spectrum = ((U * torch.logspace(0, -3, 20, dtype=torch.float64)) @ V.T).float()
    deficient = (torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen))
    for name, G in (("spectrum", spectrum), ("zero", torch.zeros(m, n)), ("rank 3", deficient)):
        G = G.to(DEVICE)
        D = distribute_tensor(G, mesh, rows_on_last_mesh_dim(mesh, Shard(0)))
        split = sharded.row_split(D, "G")
        for side in ("left", "right"):
            for niter in (0, 2):
                kwargs = dict(method="randomized", oversample=None, niter=niter)
                left, right = sharded.projection_bases(
                    D.to_local(), split, rank_r, side, generator=torch.Generator(DEVICE).manual_seed(9), **kwargs)
                ref_left, ref_right = projection_bases(
                    G, rank_r, side, generator=torch.Generator(DEVICE).manual_seed(9), backend=REFERENCE_REFRESH, **kwargs)
                basis = split.gather(left) if side == "left" else right
                ref = ref_left if side == "left" else ref_right
                gram = basis.mT @ basis if side == "left" else basis @ basis.mT
                assert torch.allclose(gram, torch.eye(rank_r, device=DEVICE), atol=1e-5), f"{name} {side} niter={niter}: not orthonormal"
                if name == "spectrum":
                    err = (basis - ref).abs().max().item()
                    assert err < 1e-4, f"{name} {side} niter={niter}: differs from the unsharded basis by {err:.1e}"
                elif name == "rank 3":  # beyond G's rank the basis is an arbitrary complement: G's span must be in it
                    residual = G - basis @ (basis.mT @ G) if side == "left" else G - (G @ basis.mT) @ basis
                    assert residual.norm() < 1e-4 * G.norm(), f"{name} {side} niter={niter}: misses G's span"
        # svd="exact": one SVD of the gathered gradient, by the first rank, broadcast: the unsharded bits.
        left, right = sharded.projection_bases(D.to_local(), split, rank_r, "full", method="exact", oversample=None,
                                               niter=None, generator=None)
        ref_left, ref_right = projection_bases(G, rank_r, "full", method="exact", oversample=None, niter=None,
                                               generator=None, backend=REFERENCE_REFRESH)
        assert torch.equal(split.gather(left), ref_left) and torch.equal(right, ref_right), f"{name}: exact bases differ"


def scenario_replicated(mesh, rank: int, world: int) -> None:
    """Replicated DTensor parameters (a 2-D GaLore weight, a 0-d scalar) step as plain tensors do, bit
    for bit: nothing to sum, state replicated."""
    gen = torch.Generator().manual_seed(8)
    values = [torch.randn(8, 6, generator=gen).to(DEVICE), torch.randn((), generator=gen).to(DEVICE)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    replicated = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Replicate()] * mesh.ndim)) for v in values]

    def optimizer(params):  # sharded refreshes run on the reference: so does the plain run's, for equal bits
        return GaLoreAdamW([{"params": [params[0]], "rank": 2, "update_proj_gap": 2}, {"params": [params[1]]}],
                           lr=1e-2, weight_decay=0.1, refresh_backend="reference", backend="reference")

    opt_plain, opt_replicated = optimizer(plain), optimizer(replicated)
    for step in range(4):
        grads = [torch.randn(v.shape, generator=gen).to(DEVICE) for v in values]
        for p, q, g in zip(plain, replicated, grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Replicate()] * mesh.ndim)
        opt_plain.step()
        opt_replicated.step()
    for p, q in zip(plain, replicated):
        assert torch.equal(q.to_local(), p), f"replicated parameter of shape {tuple(p.shape)} differs"
    assert_replicas_equal(opt_replicated, "replicated parameters")


def scenario_refusals(mesh, rank: int, world: int) -> None:
    """Layouts the optimizer cannot step are refused at construction, naming the parameter and the fix."""
    column_sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6, device=DEVICE), mesh, rows_on_last_mesh_dim(mesh, Shard(1))))
    try:
        GaLoreAdamW([{"params": [column_sharded], "rank": 2}])
    except ValueError as err:
        assert "Shard(0)" in str(err) and "(8, 6)" in str(err), err
    else:
        raise AssertionError("a Shard(1) parameter was accepted")
    try:
        project_gradient_hook(column_sharded, 2)
    except ValueError as err:
        assert "GaLoreAdamW" in str(err), err
    else:
        raise AssertionError("project_gradient_hook accepted a DTensor")
    model = shard(make_model(), mesh)
    try:
        attach_layerwise(model, param_groups(model, "randomized"))
    except ValueError as err:
        assert "optimizer.step()" in str(err), err
    else:
        raise AssertionError("layer-wise mode accepted FSDP2-sharded parameters")


def main() -> None:
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Four ranks: HSDP, each half of the ranks holding a replica of the sharded model.
    mesh = init_device_mesh(DEVICE, (2, 2), mesh_dim_names=("replicate", "shard")) if world == 4 else \
        init_device_mesh(DEVICE, (world,))
    if DEVICE == "cpu":
        torch.use_deterministic_algorithms(True)
    for name in sys.argv[1:]:
        globals()[f"scenario_{name}"](mesh, rank, world)
        dist.barrier()
        if rank == 0:
            print(f"scenario {name}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
