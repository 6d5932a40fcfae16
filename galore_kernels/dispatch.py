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

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

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
    # Whole-bucket steps (same-shape parameters in one launch each); None: step parameters one by one.
    galore_bucket: Optional[Callable[..., None]] = None  # signature of torch.ops.galore_kernels.triton_galore_adamw_step
    dense_bucket: Optional[Callable[..., None]] = None  # signature of torch.ops.galore_kernels.triton_dense_adamw_step
    # With the bucket steps: whether a (parameter, gradient) pair suits the kernels (dtype, layout,
    # alignment), and a basis in the layout the kernels read (copied only when it is not).
    fits: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None
    kernel_basis: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


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
    """The step implementation for tensors on ``device`` under the requested ``name``.

    ``auto`` takes Triton for CUDA tensors when Triton can compile for the device, the reference
    otherwise (CPU tensors included: the interpreter is for tests, so it is used only by name).
    """
    if name == "reference":
        return REFERENCE_STEP
    device = torch.device(device)
    reason = _cached_triton_reason(device, os.environ.get("TRITON_INTERPRET", "0"))
    if reason is None and (name == "triton" or device.type == "cuda"):
        return triton_step_backend()
    if name == "triton":
        raise BackendUnavailableError(
            f"backend='triton' was requested for tensors on {device}, but {reason}. Use backend='auto' "
            f"or 'reference' (or unset {STEP_ENV})."
        )
    return REFERENCE_STEP


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


# Triton's bf16 dot and the kernels' launch configurations need Ampere or newer.
TRITON_MIN_CAPABILITY = (8, 0)


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton step kernels can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401  (imported here: the rest of the library never needs Triton)
    except ImportError as err:
        return f"Triton is not importable ({err}); `pip install triton`"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1 before import), meant for tests"
        return None
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return f"the GPU has compute capability {capability}; the kernels need {TRITON_MIN_CAPABILITY} or newer"
    return None


@functools.lru_cache(maxsize=None)
def _cached_triton_reason(device: torch.device, interpret: str) -> Optional[str]:
    """triton_unavailable_reason, asked once per device (the optimizer asks per parameter and step)."""
    return triton_unavailable_reason(device)


@functools.lru_cache(maxsize=None)
def triton_step_backend() -> StepBackend:
    """The Triton step table (imports the kernels, and registers their ops, on first use)."""
    from .triton_ops import step as triton_step

    return StepBackend(
        "triton",
        step=triton_step.step_triton,
        update=triton_step.update_triton,
        project=triton_step.project_triton,
        project_back=reference.project_back_reference,
        galore_bucket=triton_step.galore_bucket_step,
        dense_bucket=triton_step.dense_bucket_step,
        fits=triton_step.kernel_fits,
        kernel_basis=triton_step.kernel_basis,
    )

