"""Bindings of the native refresh ops built from ``csrc/`` into ``galore_kernels/_C.so``.

The library registers ``torch.ops.galore_kernels.{orthonormalize, randomized_basis, batched_eigh}``
through the dispatcher (``TORCH_LIBRARY``; a CPU kernel always, a CUDA kernel when built with CUDA). This module
loads it once, registers fake (meta) kernels so ``torch.compile`` and ``opcheck`` can trace the ops,
and wraps them with the reference functions' signatures. When the library is missing or cannot load,
:func:`unavailable_reason` says why and the dispatch falls back to the PyTorch reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

LIBRARY = Path(__file__).with_name("_C.so")
_state: dict = {}


def load() -> Optional[str]:
    """Loads the library once. None when it is loaded, else the reason it is not."""
    if "reason" not in _state:
        _state["reason"] = _load()
    return _state["reason"]


def _load() -> Optional[str]:
    if not LIBRARY.exists():
        return (f"the native extension is not built ({LIBRARY} is missing; reinstall with "
                "`pip install -v --no-build-isolation -e .` and read its build log)")
    try:
        torch.ops.load_library(str(LIBRARY))
    except (OSError, RuntimeError) as err:
        return f"the native extension {LIBRARY} failed to load: {err}"
    _register_fakes()
    return None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the native ops can run on ``device``, else why not."""
    reason = load()
    if reason is not None:
        return reason
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("galore_kernels::randomized_basis", key):
        return f"the native extension has no kernel for {device.type} tensors (built without it)"
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("galore_kernels::orthonormalize")
    def _orthonormalize_fake(Y: Tensor) -> Tensor:
        torch._check(Y.dim() == 3, lambda: f"orthonormalize expects (B, m, k), got {tuple(Y.shape)}")
        return Y.new_empty(Y.shape, dtype=torch.float32)

    @torch.library.register_fake("galore_kernels::randomized_basis")
    def _randomized_basis_fake(G: Tensor, omega: Tensor, rank: int, niter: int) -> Tensor:
        torch._check(G.dim() == 3 and omega.dim() == 3, lambda: "randomized_basis expects G (B, m, n) and omega (B, n, k)")
        return G.new_empty((G.shape[0], G.shape[1], rank), dtype=torch.float32)

    @torch.library.register_fake("galore_kernels::batched_eigh")
    def _batched_eigh_fake(C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        torch._check(C.dim() == 3 and C.shape[1] == C.shape[2], lambda: f"batched_eigh expects (B, n, n), got {tuple(C.shape)}")
        batch, n = C.shape[0], C.shape[1]
        vectors = C.new_empty((batch, n, n)).mT  # column-major, as linalg.eigh returns them
        return C.new_empty((batch, n)), vectors, C.new_empty((batch,), dtype=torch.int32)


def randomized_basis_native(
    G: Tensor,  # (..., m, n)
    omega: Tensor,  # (..., n, k)
    rank: int,
    niter: int,
) -> Tensor:  # (..., m, rank) float32
    """``reference.randomized_basis_reference`` through the native op (leading dims flattened)."""
    lead = G.shape[:-2]
    out = torch.ops.galore_kernels.randomized_basis(
        G.reshape(-1, *G.shape[-2:]), omega.reshape(-1, *omega.shape[-2:]).float(), rank, niter
    )
    return out.reshape(*lead, *out.shape[-2:])


def batched_eigh_native(C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(eigenvalues ascending (B, n), eigenvectors as columns (B, n, n), info (B,) int32, 0 = converged)
    of symmetric float32/float64 matrices (B, n, n): ``torch.linalg.eigh`` on the CPU; on CUDA one
    cuSOLVER call for the whole batch (``cusolverDnXsyevBatched``), where torch solves the matrices
    one after another (``GALORE_KERNELS_EIGH=auto|batched|torch`` chooses; see csrc/eigh_cuda.cu)."""
    reason = load()
    if reason is not None:
        raise RuntimeError(f"galore_kernels.native.batched_eigh_native: {reason}")
    return torch.ops.galore_kernels.batched_eigh(C)


def orthonormalize_native(Y: Tensor) -> Tensor:  # (..., m, k) -> (..., m, k) float32
    lead = Y.shape[:-2]
    out = torch.ops.galore_kernels.orthonormalize(Y.reshape(-1, *Y.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])
