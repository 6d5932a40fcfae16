"""Gradient filtering for users who keep their own optimizer.

``project_gradient_hook(param, rank)`` registers a tensor hook that replaces each gradient of
``param`` by its rank-r filtered version of the same shape and dtype: ``P P^T G`` (left side),
``G Q^T Q`` (right side) or ``P P^T G Q^T Q`` (full), with the basis refreshed from the incoming
gradient every ``update_proj_gap`` calls. The optimizer then sees gradients confined to the top
subspace, without GaLore's low-rank optimizer state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, sharded
from .projection import check_proj_type, check_rank, check_update_proj_gap, effective_rank, projection_side
from .subspace import METHODS, projection_bases, refresh_generator


class GradientProjectionHook:
    """The registered hook: call ``remove()`` to detach it. Counts calls and refreshes."""

    def __init__(self, param: Tensor, rank: int, update_proj_gap: int, proj_type: str, svd: str,
                 oversample: Optional[int], niter: Optional[int], seed: int, refresh_backend: str,
                 backend: str = "auto"):
        if param.dim() != 2:
            raise ValueError(f"project_gradient_hook needs a 2-D parameter, got shape {tuple(param.shape)}.")
        if sharded.is_dtensor(param):
            raise ValueError(
                f"project_gradient_hook: the parameter of shape {tuple(param.shape)} is a DTensor (FSDP2); gradient "
                "filtering hooks do not support sharded parameters. Use GaLoreAdamW, which steps them on their rows.")
        check_rank(rank)
        check_proj_type(proj_type)
        if svd not in METHODS:
            raise ValueError(f"svd={svd!r} must be one of {', '.join(METHODS)}.")
        self.rank = effective_rank(rank, tuple(param.shape))
        self.side = projection_side(tuple(param.shape), proj_type)
        self.update_proj_gap = check_update_proj_gap(update_proj_gap)
        self.svd, self.oversample, self.niter, self.seed = svd, oversample, niter, seed
        self.refresh_backend = dispatch.requested_backend("refresh", refresh_backend)
        self.backend = dispatch.requested_backend("step", backend)  # GALORE_KERNELS_BACKEND wins, as everywhere
        self.calls = 0
        self.refresh_count = 0
        self.proj_left: Optional[Tensor] = None
        self.proj_right: Optional[Tensor] = None
        self._handle = param.register_hook(self)

    @torch.no_grad()
    def __call__(self, grad: Tensor) -> Tensor:
        if not bool(torch.isfinite(grad).all()):
            return grad  # no basis from a NaN gradient; the user's optimizer or scaler handles it
        if self.calls % self.update_proj_gap == 0:
            self._refresh(grad)
        self.calls += 1
        kernels = dispatch.step_backend(self.backend, grad.device)
        lowrank = kernels.project(grad, self.proj_left, self.proj_right, self.side)
        return kernels.project_back(lowrank, self.proj_left, self.proj_right, self.side).to(grad.dtype)

    def _refresh(self, grad: Tensor) -> None:
        generator = None
        if self.svd == "randomized":
            generator = refresh_generator(self.seed, 0, self.refresh_count, grad.device)
        self.proj_left, self.proj_right = projection_bases(
            grad, self.rank, self.side, method=self.svd, oversample=self.oversample, niter=self.niter,
            generator=generator, backend=dispatch.refresh_backend(self.refresh_backend, grad.device),
        )
        self.refresh_count += 1

    def remove(self) -> None:
        self._handle.remove()


def project_gradient_hook(
    param: Tensor,
    rank: int,
    *,
    update_proj_gap: int = 200,
    proj_type: str = "std",
    svd: str = "randomized",
    oversample: Optional[int] = None,
    niter: Optional[int] = None,
    seed: int = 0,
    refresh_backend: str = "auto",
    backend: str = "auto",
) -> GradientProjectionHook:
    """Registers a hook replacing ``param``'s gradient by its rank-``rank`` filtered version.

    Randomized refreshes are seeded by (``seed``, refresh count): give each parameter its own seed
    if their sketches should differ. ``backend`` ("auto", "reference", "triton") runs the
    projections, as the optimizer's does.
    """
    return GradientProjectionHook(param, rank, update_proj_gap, proj_type, svd, oversample, niter, seed,
                                  refresh_backend, backend)
