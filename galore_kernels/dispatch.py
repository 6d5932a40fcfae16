"""Backend choice, in one place: which implementation runs a step and which computes a refresh.

Step backends (``GaLoreAdamW(backend=...)``): ``auto | reference | triton``.
Refresh backends (``refresh_backend=...``): ``auto | reference | native``.
``GALORE_KERNELS_BACKEND`` / ``GALORE_KERNELS_REFRESH_BACKEND`` force one for the whole process and
win over the argument. ``auto`` picks the fastest implementation that can run on the tensors' device;
an explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.

Kernel issues plug in here: each backend is a small table of functions with the reference's
signatures, so the optimizer's math never changes when a backend is added.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import native, reference

logger = logging.getLogger("galore_kernels")

STEP_BACKENDS = ("auto", "reference", "triton")
REFRESH_BACKENDS = ("auto", "reference", "native")
STEP_ENV = "GALORE_KERNELS_BACKEND"
REFRESH_ENV = "GALORE_KERNELS_REFRESH_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class StepBackend:
    name: str
    step: Callable[..., None]  # signature of reference.galore_adamw_step_reference
    update: Callable[..., None]  # signature of reference.galore_adamw_update_reference
    project: Callable[..., torch.Tensor]  # signature of reference.project_reference
    project_back: Callable[..., torch.Tensor]  # signature of reference.project_back_reference


@dataclass(frozen=True)
class RefreshBackend:
    name: str
    randomized_basis: Callable[..., torch.Tensor]  # signature of reference.randomized_basis_reference


REFERENCE_STEP = StepBackend(
    "reference",
    step=reference.galore_adamw_step_reference,
    update=reference.galore_adamw_update_reference,
    project=reference.project_reference,
    project_back=reference.project_back_reference,
)
REFERENCE_REFRESH = RefreshBackend("reference", randomized_basis=reference.randomized_basis_reference)
NATIVE_REFRESH = RefreshBackend("native", randomized_basis=native.randomized_basis_native)
_fallbacks_logged: set = set()


def requested_backend(kind: str, argument: str) -> str:
    """The backend name in force for ``kind`` ("step" or "refresh"): the environment wins."""
    choices, env = (STEP_BACKENDS, STEP_ENV) if kind == "step" else (REFRESH_BACKENDS, REFRESH_ENV)
    forced = os.environ.get(env, "").strip().lower()
    if forced:
        if forced not in choices:
            raise ValueError(f"environment variable {env}={forced!r} is not one of {', '.join(choices)}; unset it or fix it.")
        return forced
    name = str(argument).lower()
    if name not in choices:
        what = "backend" if kind == "step" else "refresh_backend"
        raise ValueError(f"{what}={argument!r} is not one of {', '.join(choices)}.")
    return name


def step_backend(name: str, device: torch.device) -> StepBackend:
    """The step implementation for tensors on ``device`` under the requested ``name``."""
    if name == "triton":
        raise BackendUnavailableError(_triton_unavailable_reason(device))
    return REFERENCE_STEP  # "auto" and "reference"


def refresh_backend(name: str, device: torch.device) -> RefreshBackend:
    """The randomized-refresh implementation for tensors on ``device`` under the requested ``name``.

    ``auto`` takes the native op when it is built for the device, else the reference, saying so in
    one log line per process and reason.
    """
    if name == "reference":
        return REFERENCE_REFRESH
    reason = native.unavailable_reason(torch.device(device))
    if reason is None:
        return NATIVE_REFRESH
    if name == "native":
        raise BackendUnavailableError(
            f"refresh_backend='native' was requested for tensors on {device}, but {reason}. Use "
            f"refresh_backend='auto' or 'reference' (or unset {REFRESH_ENV})."
        )
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        logger.warning("galore_kernels: randomized refresh runs on the PyTorch reference: %s", reason)
    return REFERENCE_REFRESH


def _triton_unavailable_reason(device: torch.device) -> str:
    return (
        f"backend='triton' was requested for tensors on {device}, but this build of galore_kernels "
        "ships no Triton step kernels yet. Use backend='auto' or 'reference' (or unset "
        f"{STEP_ENV})."
    )

