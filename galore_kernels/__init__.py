"""galore_kernels: kernel-accelerated GaLore (gradient low-rank projection) for PyTorch.

Public API:
- :class:`GaLoreAdamW`: drop-in for galore-torch's ``GaLoreAdamW``.
- :func:`galore_param_groups`: split a model into a GaLore group and a plain group.
- :func:`attach_layerwise`: update each parameter from its gradient hook (frees gradients early).
- :func:`project_gradient_hook`: rank-r gradient filtering for any optimizer.
- :func:`top_subspace`: the orthonormal basis GaLore projects onto.
- :class:`GraphedStep`: CUDA-graph replay of GaLoreAdamW's steady-state step (Triton backend).
"""
from .dispatch import BackendUnavailableError
from .graphs import GraphedStep
from .hooks import project_gradient_hook
from .layerwise import attach_layerwise
from .optimizer import GaLoreAdamW
from .param_groups import galore_param_groups
from .subspace import top_subspace

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "GaLoreAdamW",
    "GraphedStep",
    "attach_layerwise",
    "galore_param_groups",
    "project_gradient_hook",
    "top_subspace",
]
