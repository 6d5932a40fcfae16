"""Pure-PyTorch reference implementations: the correctness oracle and the CPU fallback."""
from .refresh import orthonormalize_reference, randomized_basis_reference
from .step import (
    galore_adamw_step_reference,
    galore_adamw_update_reference,
    project_back_reference,
    project_reference,
)

__all__ = [
    "galore_adamw_step_reference",
    "galore_adamw_update_reference",
    "orthonormalize_reference",
    "project_back_reference",
    "project_reference",
    "randomized_basis_reference",
]
