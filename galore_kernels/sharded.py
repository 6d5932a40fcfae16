"""GaLore on row-sharded parameters: FSDP2's ``fully_shard`` (DTensor ``Shard(0)``), and HSDP.

A weight ``W`` (m x n) whose rows are split across the ranks of a mesh dimension is stepped on its
local rows, and no rank ever gathers a whole gradient (DESIGN.md "Randomized subspace refresh"):

- right side (``R = G Q^T``, m x r): the rows of ``R``, ``M``, ``V`` and ``N`` follow W's rows, and the
  basis ``Q`` (r x n) is the same on every rank. A step needs no communication at all.
- left side (``R = P^T G``, r x n): ``P``'s rows follow W's, so ``R`` is a sum over the ranks: an
  all-reduce of r x n a step (``optimizer.step()`` sums a param group's together, in one call). ``M``, ``V``, ``N`` are then the same on every rank (each computes the
  same Adam update from the same ``R``), and ``W``'s rows take ``P_i N``.
- ``full``: one all-reduce of r x r a step.
- a randomized refresh runs the reference algorithm with its row sums (Grams, products with ``G^T``)
  all-reduced over the ranks (:class:`RowSplit`): k x k and n x k all-reduces. Every rank draws the
  whole sketch from the same seeded generator, so the basis equals the unsharded one up to rounding.
  ``svd="exact"`` gathers the gradient for its SVD (galore-torch's method; no sketch to split).
- the non-finite guard is global: when any rank's rows of ``G`` are not finite, every rank of the
  mesh skips (HSDP's replicas too).
- replicated state stays identical on every rank: a step whose moments are replicated (left, ``full``)
  runs the Triton kernels only where every rank can (else the reference everywhere), and ``svd="exact"``
  is computed by the group's first rank and broadcast.
- stochastic rounding draws a shard's bits from a seed keyed by its first global row (the first shard
  keeps the parameter's seed), so shards do not repeat each other's bits; replicated moments keep the
  parameter's seed on every rank, and HSDP replicas of a shard draw alike.

State tensors are DTensors on the parameter's mesh: row-sharded ones (``M``, ``V`` of the right side,
``P``) placed like the parameter, the others replicated, so ``torch.distributed.checkpoint`` saves
each once and a resumed run gets its rows back.

Sharded parameters are stepped one at a time on their local tensors by the step backend's
per-parameter functions (the Triton bucket launches take plain tensors only). The randomized refresh
runs on the PyTorch reference (the native op has no collectives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import REFERENCE_STEP
from .reference import refresh as reference_refresh
from .seeding import mix_fields
from .subspace import canonical_signs, default_niter, projection_bases as unsharded_bases, sketch

try:  # torch built without distributed support has no DTensor: nothing is ever sharded there
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


Rows, LOCAL_ROWS = reference_refresh.Rows, reference_refresh.LOCAL_ROWS  # all rows here: a plain tensor's
_SHARD_SEED_TAG = 0x243F6A8885A308D3  # keeps shard rounding seeds apart from the other derived seeds


def is_dtensor(t: Optional[Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor this rank holds (a view sharing storage: in-place updates reach the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True, eq=False)
class RowSplit(Rows):
    """Rows of a DTensor split over one mesh dimension (torch.chunk's rule, as ``Shard(0)`` splits)."""

    mesh: object  # the parameter's DeviceMesh
    placements: tuple  # the parameter's placements: one Shard(0), Replicate() elsewhere
    group: object  # the process group of the sharded mesh dimension; None: replicated, nothing to reduce
    counts: tuple  # rows held by each rank of that group
    index: int  # this rank's position in the group
    replica_groups: tuple = ()  # the process groups of the mesh's replicated dimensions (HSDP's replicas)

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.index])

    def sum(self, partial: Tensor) -> Tensor:
        if self.group is None:  # a replicated tensor: all rows are here
            return partial
        partial = partial.contiguous()
        dist.all_reduce(partial, group=self.group)
        return partial

    def total(self, local_rows: int) -> int:
        return sum(self.counts)

    def gather(self, Y: Tensor) -> Tensor:  # (..., local rows, k) -> (..., all rows, k)
        if self.group is None:
            return Y
        widest = max(self.counts)
        pad = widest - Y.shape[-2]
        padded = torch.nn.functional.pad(Y, (0, 0, 0, pad)).contiguous()
        pieces = [torch.empty_like(padded) for _ in self.counts]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([piece[..., :count, :] for piece, count in zip(pieces, self.counts)], dim=-2)

    def take(self, Y: Tensor) -> Tensor:  # (..., all rows, k) -> (..., local rows, k)
        return Y.narrow(-2, self.offset, self.counts[self.index])

    def agree(self, flags: Tensor) -> list:
        """Each flag (any shape; 1 true, 0 false) true on every rank of the mesh: one all-reduce per
        mesh dimension (the replicas of HSDP too: a rank that skips or falls back alone would leave
        its replicas behind), one wait of the host. Returns flags.tolist() as booleans."""
        flags = flags.to(torch.float32).contiguous()
        for group in (self.group, *self.replica_groups):
            if group is not None:
                dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        return [[value == 1.0 for value in row] for row in flags.tolist()]

    def rounding_seed(self, seed: Optional[int]) -> Optional[int]:
        """The seed of this shard's stochastic rounding bits (below 2^31, as the kernels take)."""
        if seed is None or self.offset == 0:
            return seed
        return mix_fields(_SHARD_SEED_TAG, seed, self.offset) >> 33

    def replicated(self) -> tuple:
        return tuple(Replicate() for _ in self.placements)

    def dtensor(self, local_tensor: Tensor, rows_split: bool, shape: tuple) -> Tensor:
        """``local_tensor`` as a DTensor of global ``shape`` on the parameter's mesh: placed like the
        parameter when ``rows_split``, replicated otherwise."""
        placements = self.placements if rows_split else self.replicated()
        return DTensor.from_local(local_tensor, self.mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())


def row_split(p: Tensor, where: str) -> Optional[RowSplit]:
    """How ``p``'s rows are split across ranks; None for a plain tensor. An unsupported layout is a
    ValueError naming ``where`` (the parameter) and what to use instead."""
    if not is_dtensor(p):
        return None
    placements = tuple(p.placements)
    mesh = p.device_mesh
    sharded = [d for d, placement in enumerate(placements) if not isinstance(placement, Replicate)]
    if not sharded:  # replicated everywhere: every rank holds and steps the whole tensor
        return RowSplit(mesh, placements, None, (p.shape[0] if p.dim() else 1,), 0, _groups(mesh, range(mesh.ndim)))
    if len(sharded) != 1 or not isinstance(placements[sharded[0]], Shard) or placements[sharded[0]].dim % p.dim() != 0:
        raise ValueError(
            f"{where} is a DTensor with placements {placements}; GaLoreAdamW steps DTensors sharded on their first "
            "dimension over one mesh dimension (Shard(0), Replicate() on any others: FSDP2's fully_shard and HSDP), "
            "or replicated. Shard the parameter on dim 0 (fully_shard's default).")
    mesh_dim = sharded[0]
    size, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows = p.shape[0]
    chunk = -(-rows // size)
    counts = tuple(max(0, min(rows, (i + 1) * chunk) - min(rows, i * chunk)) for i in range(size))
    held = p.to_local().shape[0]
    if held != counts[index]:
        raise ValueError(
            f"{where} holds {held} of its {rows} rows on this rank, but Shard(0) over {size} ranks gives "
            f"{counts[index]} (torch.chunk's split); GaLoreAdamW supports that split only (fully_shard's default "
            "shard_placement_fn).")
    replicated = [d for d in range(mesh.ndim) if d != mesh_dim]
    return RowSplit(mesh, placements, mesh.get_group(mesh_dim), counts, index, _groups(mesh, replicated))


def _groups(mesh, dims) -> tuple:
    """The process groups of ``mesh``'s dimensions ``dims`` that have more than one rank."""
    return tuple(mesh.get_group(d) for d in dims if mesh.size(d) > 1)


def check_grad(grad: Tensor, p: Tensor, where: str) -> None:
    if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
        got = tuple(grad.placements) if is_dtensor(grad) else "a plain tensor"
        raise ValueError(
            f"{where}: the gradient of a DTensor parameter with placements {tuple(p.placements)} is {got}; it must "
            "be a DTensor placed like the parameter (FSDP2 reduce-scatters gradients so: step after backward).")


# ------------------------------------------------------------------------------------------- refresh
def projection_bases(
    grad: Tensor,  # (local rows, n) of the global (m, n) gradient
    split: RowSplit,
    rank: int,
    side: str,  # "left" | "right" | "full"
    *,
    method: str,
    oversample: Optional[int],
    niter: Optional[int],
    generator: Optional[torch.Generator],
) -> tuple[Optional[Tensor], Optional[Tensor]]:  # (P's local rows (m_i, r) or None, Q (r, n) or None)
    """subspace.projection_bases for a row-sharded gradient: the same bases (to rounding), P's rows
    split like W's, Q whole on every rank."""
    if method == "exact":  # a full SVD needs the whole matrix
        return _exact_bases(grad, split, rank, side)
    m, n = split.total(grad.shape[0]), grad.shape[1]
    niter = default_niter(rank) if niter is None else niter
    left = right = None
    if side in ("left", "full"):  # A = G: its rows are split, the sketch (n x k) is whole
        omega = sketch((m, n), rank, oversample, generator, grad.device)
        P = reference_refresh.randomized_basis_reference(grad, omega, rank, niter, rows=split)
        left = canonical_signs_split(P, split)
    if side in ("right", "full"):  # A = G^T: its columns are split, and so are the sketch's (m x k) rows
        omega = split.take(sketch((n, m), rank, oversample, generator, grad.device))
        P = reference_refresh.randomized_basis_reference(grad.mT, omega, rank, niter, cols=split)
        right = canonical_signs(P).mT.contiguous()
    return left, right


def _exact_bases(grad: Tensor, split: RowSplit, rank: int, side: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """galore-torch's SVD of the gathered gradient, computed by the group's first rank and broadcast
    (an SVD gives no sign guarantee: the ranks' row blocks of P must come from one factorisation)."""
    whole = split.gather(grad.float())
    m, n = whole.shape
    sides = [key for key in ("left", "right") if side in (key, "full")]
    shapes = {"left": (m, rank), "right": (rank, n)}
    failure = None
    if split.index == 0:  # also a replicated tensor's only "rank"
        try:
            left, right = unsharded_bases(whole, rank, side, method="exact", oversample=None, niter=None,
                                          generator=None, backend=None)
            bases = {key: basis.contiguous() for key, basis in (("left", left), ("right", right)) if key in sides}
        except RuntimeError as err:  # the other ranks wait in the broadcast: send them NaN, then all raise
            failure = err
            bases = {key: torch.full(shapes[key], float("nan"), device=grad.device) for key in sides}
    else:
        bases = {key: torch.empty(shapes[key], dtype=torch.float32, device=grad.device) for key in sides}
    if split.group is not None:
        for key in sides:
            dist.broadcast(bases[key], src=dist.get_global_rank(split.group, 0), group=split.group)
    if failure is not None or any(bool(basis.isnan().any()) for basis in bases.values()):
        raise RuntimeError("svd='exact' failed on the first rank of the parameter's process group "
                           f"({failure or 'see that rank'}); use svd='randomized' for this group.") from failure
    # A copy of this rank's rows: a view would keep the whole (m, r) basis alive on every rank.
    return (split.take(bases["left"]).clone() if "left" in bases else None), bases.get("right")


def canonical_signs_split(P: Tensor, split: RowSplit) -> Tensor:  # (m_i, r) -> same
    """subspace.canonical_signs over rows split across ranks: each column's entry of largest
    magnitude over all ranks (the first such, as argmax picks) is made positive."""
    if split.group is None:
        return canonical_signs(P)
    if P.shape[-2] > 0:
        index = P.abs().argmax(dim=-2, keepdim=True)  # the first of equal magnitudes, as canonical_signs
        value = torch.gather(P, -2, index).squeeze(-2)
        magnitude = value.abs()
    else:  # no rows here: never the largest
        magnitude = torch.full(P.shape[-1:], -1.0, dtype=P.dtype, device=P.device)
        value = torch.ones_like(magnitude)
    mine = torch.stack([magnitude, value]).contiguous()
    everyone = [torch.empty_like(mine) for _ in split.counts]
    dist.all_gather(everyone, mine, group=split.group)
    magnitudes = torch.stack([e[0] for e in everyone])  # (ranks, r)
    values = torch.stack([e[1] for e in everyone])
    first = (magnitudes == magnitudes.max(dim=0, keepdim=True).values).to(torch.int8).argmax(dim=0)
    sign = torch.sign(values.gather(0, first.unsqueeze(0)).squeeze(0))
    return P * torch.where(sign == 0, torch.ones_like(sign), sign)


# ---------------------------------------------------------------------------------------------- step
def _backend_for(backend, held: Tensor):
    """The reference where this rank holds no rows (nothing to launch a kernel over)."""
    return backend if held.numel() > 0 else REFERENCE_STEP


def project_rows(backend, grad: Tensor, proj_left, proj_right, side: Optional[str]) -> Tensor:
    """This rank's part of the projected gradient (float32): the whole of it on the right (its rows),
    a partial sum over this rank's rows on the left and ``full``; the gradient itself without side."""
    held = local(grad)
    if side is None:
        return held if held.dtype == torch.float32 else held.float()
    return _backend_for(backend, held).project(held, local(proj_left), local(proj_right), side)


def project(backend, grad: Tensor, proj_left, proj_right, side: str, split: RowSplit) -> Tensor:
    """The projected gradient (float32) from this rank's rows; summed over the ranks on the left."""
    lowrank = project_rows(backend, grad, proj_left, proj_right, side)
    return split.sum(lowrank) if side in ("left", "full") else lowrank


def sum_together(partials: list[tuple[RowSplit, Tensor]]) -> None:
    """Each partial sum summed over its split's ranks, in place: one all-reduce per process group of
    the partials laid end to end, instead of one per tensor (latency, not bytes, bounds them)."""
    by_group: dict[int, list[Tensor]] = {}
    for split, partial in partials:
        if split.group is not None:
            by_group.setdefault(id(split.group), [split.group]).append(partial)
    for group, *tensors in by_group.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(summed.view_as(t))


def kernels_fit(backend, p: Tensor, grad: Tensor) -> bool:
    """Whether ``backend``'s kernels take this rank's rows (False for the reference)."""
    held = local(p)
    return backend.fits is not None and held.numel() > 0 and backend.fits(held, local(grad))


def update(backend, p: Tensor, lowrank: Tensor, tensors: tuple, scalars: dict, split: RowSplit,
           kernels_everywhere: bool) -> None:
    """Adam on the (projected) gradient and the update of this rank's rows of ``p``.

    Moments replicated on every rank (left, ``full``) must get the same bits everywhere, so they take
    the kernels only when every rank can (``kernels_everywhere``, agreed by an all-reduce)."""
    held = local(p)
    side = scalars["side"]
    replicated = side in ("left", "full")
    if replicated and not kernels_everywhere:
        backend = REFERENCE_STEP
    shard_seed = split.rounding_seed(scalars["rounding_seed"])
    if replicated:  # the moments keep the parameter's seed, the weight's rows take the shard's
        scalars = dict(scalars, weight_rounding_seed=shard_seed)
    else:  # the moments' rows are the weight's
        scalars = dict(scalars, rounding_seed=shard_seed)
    _backend_for(backend, held).update(held, lowrank, *(local(t) for t in tensors), **scalars)


def step(backend, p: Tensor, grad: Tensor, tensors: tuple, scalars: dict, split: RowSplit,
         kernels_everywhere: bool) -> None:
    """One parameter's step (optimizer.step_param); optimizer.step() sums the group's projections together."""
    _, _, proj_left, proj_right = tensors
    lowrank = project(backend, grad, proj_left, proj_right, scalars["side"], split)
    update(backend, p, lowrank, tensors, scalars, split, kernels_everywhere)
