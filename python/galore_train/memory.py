"""The JSON memory report: per-phase peaks and a breakdown of the bytes held by tensors.

Per-phase peaks are measured from each phase's own start:

- CUDA: ``torch.cuda.reset_peak_memory_stats`` at the start, ``max_memory_allocated`` /
  ``max_memory_reserved`` at the end (for the tracker's device).
- CPU (always, also next to CUDA): the process's peak RSS. On Linux writing ``5`` to
  ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS; ``VmHWM`` is read at the
  end. Where that write is not permitted (or has no effect) the peak is the one since process start,
  and the report says so (``cpu_peak.per_phase_reset`` false, with the reason).

Phases may nest: before a phase resets the counters, the peak so far is folded into every phase
still open, so an outer phase's peak includes its inner phases. A phase entered several times keeps,
for each number, the maximum over its entries, plus a count.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from galore_kernels.sharded import is_dtensor, local

from .atomic import write_atomic

REPORT_FORMAT_VERSION = 1
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
# A reset that worked leaves VmHWM == VmRSS (give or take what was allocated between the write and
# the read); a larger gap means the kernel ignored the write.
_RESET_SLACK_BYTES = 8 << 20

GALORE_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
STATE_CATEGORIES = ("galore_moments", "galore_projection", "adam_moments", "other")


def read_proc_status() -> dict[str, int]:
    """VmRSS/VmHWM (and the other Vm* lines) of this process in bytes; {} where unavailable."""
    values: dict[str, int] = {}
    try:
        with open(_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Vm"):
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                        values[key] = int(parts[0]) * scale
    except OSError:
        pass
    return values


def _max_rss_getrusage() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class MemoryTracker:
    def __init__(self, device: Union[torch.device, str, int, None] = None):
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.is_cuda = device.type == "cuda" and torch.cuda.is_available()
        self._phases: dict[str, dict[str, Any]] = {}
        self._open: list[dict[str, Any]] = []  # running peaks of the phases now open, innermost last
        self._tensors: Optional[dict[str, Any]] = None
        self._process_peak_rss = 0  # VmHWM folded in before each reset: the peak since process start
        self._process_peak_cuda = {"allocated": 0, "reserved": 0}
        self._reset_supported: Optional[bool] = None  # decided at the first reset
        self._reset_note = "no phase has run yet; the per-phase CPU peak reset was not tried"

    # --------------------------------------------------------------------------------- phases
    @contextlib.contextmanager
    def phase(self, name: str):
        self._fold()
        self._reset_peaks()
        status = read_proc_status()
        entry: dict[str, Any] = {
            "name": name,
            "start": time.perf_counter(),
            "rss_at_start_bytes": status.get("VmRSS"),
            "peak_rss_bytes": status.get("VmHWM") or _max_rss_getrusage() or 0,
        }
        if self.is_cuda:
            entry["cuda_allocated_at_start_bytes"] = torch.cuda.memory_allocated(self.device)
            entry["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            entry["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        self._open.append(entry)
        try:
            yield self
        finally:
            self._fold()
            self._open.remove(entry)
            self._finish(entry)

    def _fold(self) -> None:
        """Folds the current peak counters into every open phase and the process-wide peaks."""
        status = read_proc_status()
        hwm = status.get("VmHWM") or _max_rss_getrusage()  # getrusage where there is no /proc
        if hwm is not None:
            self._process_peak_rss = max(self._process_peak_rss, hwm)
        cuda = None
        if self.is_cuda:
            cuda = (torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
            self._process_peak_cuda["allocated"] = max(self._process_peak_cuda["allocated"], cuda[0])
            self._process_peak_cuda["reserved"] = max(self._process_peak_cuda["reserved"], cuda[1])
        for entry in self._open:
            if hwm is not None:
                entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"] or 0, hwm)
            if cuda is not None:
                entry["cuda_max_allocated_bytes"] = max(entry["cuda_max_allocated_bytes"], cuda[0])
                entry["cuda_max_reserved_bytes"] = max(entry["cuda_max_reserved_bytes"], cuda[1])

    def _reset_peaks(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._reset_supported is False:
            return
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError as exc:
            self._reset_supported = False
            self._reset_note = (
                f"writing 5 to {_CLEAR_REFS} failed ({type(exc).__name__}: {exc}); CPU peaks are the "
                "peak RSS since process start, not per phase"
            )
            return
        status = read_proc_status()
        hwm, rss = status.get("VmHWM"), status.get("VmRSS")
        if hwm is None or rss is None:
            self._reset_supported = False
            self._reset_note = f"{_STATUS} has no VmHWM/VmRSS; CPU peaks are unavailable or since process start"
        elif hwm - rss > _RESET_SLACK_BYTES:
            self._reset_supported = False
            self._reset_note = (
                f"writing 5 to {_CLEAR_REFS} did not reset VmHWM ({hwm} bytes stayed above VmRSS {rss}); "
                "CPU peaks are the peak RSS since process start, not per phase"
            )
        elif self._reset_supported is None:
            self._reset_supported = True
            self._reset_note = f"peak RSS (VmHWM) is reset at each phase start via {_CLEAR_REFS}"

    def _finish(self, entry: dict[str, Any]) -> None:
        seconds = time.perf_counter() - entry["start"]
        result: dict[str, Any] = {
            "peak_rss_bytes": entry["peak_rss_bytes"],
            "rss_at_start_bytes": entry["rss_at_start_bytes"],
            "peak_rss_above_start_bytes": (
                None if entry["rss_at_start_bytes"] is None else max(0, entry["peak_rss_bytes"] - entry["rss_at_start_bytes"])
            ),
            "rss_at_end_bytes": read_proc_status().get("VmRSS"),
        }
        if self.is_cuda:
            result.update(
                cuda_max_allocated_bytes=entry["cuda_max_allocated_bytes"],
                cuda_max_reserved_bytes=entry["cuda_max_reserved_bytes"],
                cuda_allocated_at_start_bytes=entry["cuda_allocated_at_start_bytes"],
                cuda_allocated_at_end_bytes=torch.cuda.memory_allocated(self.device),
            )
        previous = self._phases.get(entry["name"])
        if previous is None:
            result.update(count=1, seconds_total=seconds, seconds_max=seconds)
            self._phases[entry["name"]] = result
            return
        for key, value in result.items():
            old = previous.get(key)
            if value is not None and (old is None or value > old):
                previous[key] = value
        previous["count"] += 1
        previous["seconds_total"] += seconds
        previous["seconds_max"] = max(previous["seconds_max"], seconds)

    # -------------------------------------------------------------------------------- tensors
    def record_tensors(self, model, optimizer=None, *, grads: bool = True) -> None:
        """Bytes held by the model's parameters (trainable/frozen, by dtype), by gradients now held
        (``grads``), and by optimizer state (galore_moments, galore_projection, adam_moments, other).
        ``optimizer`` may be an optimizer, a wrapper with ``.optimizer`` (the layer-wise handle), a
        list of those, or None. Tensors sharing memory (tied weights) are counted once."""
        seen: set[tuple] = set()
        params = {"trainable": _Bytes(), "frozen": _Bytes()}
        trainable_numel = 0
        for p in model.parameters():
            if not _first_time(p, seen):
                continue
            params["trainable" if p.requires_grad else "frozen"].add(p)
            if p.requires_grad:
                trainable_numel += local(p).numel()
        gradients = _Bytes()
        if grads:
            grad_seen: set[tuple] = set()
            for p in model.parameters():
                if p.grad is not None and _first_time(p.grad, grad_seen):
                    gradients.add(p.grad)
        state = {category: _Bytes() for category in STATE_CATEGORIES}
        state_seen: set[tuple] = set()
        optimizers = list(_optimizers(optimizer))
        for opt in optimizers:
            for param_state in getattr(opt, "state", {}).values():
                if not isinstance(param_state, dict):
                    continue
                galore = "proj_left" in param_state or "proj_right" in param_state
                for key, value in param_state.items():
                    if not isinstance(value, torch.Tensor) or not _first_time(value, state_seen):
                        continue
                    if key in GALORE_MOMENT_KEYS:
                        category = "galore_moments" if galore else "adam_moments"
                    elif galore and str(key).startswith("proj_"):
                        category = "galore_projection"
                    else:
                        category = "other"
                    state[category].add(value)
        full_rank = 2 * 4 * trainable_numel
        held_moments = sum(state[c].bytes for c in ("galore_moments", "galore_projection", "adam_moments"))
        self._tensors = {
            "recorded_at": _now(),
            "parameters": {k: v.as_dict() for k, v in params.items()},
            "parameters_bytes": params["trainable"].bytes + params["frozen"].bytes,
            "trainable_numel": trainable_numel,
            # FSDP2: every count above is this rank's shards (the report is rank 0's).
            "parameters_sharded": any(map(is_dtensor, model.parameters())),
            "gradients": gradients.as_dict() if grads else None,
            "optimizer_state": {k: v.as_dict() for k, v in state.items()},
            "optimizer_state_bytes": sum(v.bytes for v in state.values()),
            "optimizers_seen": [type(o).__name__ for o in optimizers],
            "full_rank_adam_moments_bytes": full_rank,
            "saving_vs_full_rank_adam_bytes": full_rank - held_moments,
        }

    # --------------------------------------------------------------------------------- report
    def report(self) -> dict:
        self._fold()
        status = read_proc_status()
        current: dict[str, Any] = {
            "rss_bytes": status.get("VmRSS"),
            "peak_rss_since_last_reset_bytes": status.get("VmHWM"),
            "peak_rss_since_process_start_bytes": max(self._process_peak_rss, status.get("VmHWM", 0)) or _max_rss_getrusage(),
        }
        report: dict[str, Any] = {
            "format_version": REPORT_FORMAT_VERSION,
            "timestamp": _now(),
            "device": str(self.device),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": sys.platform,
            "pid": os.getpid(),
            "cpu_peak": {
                "source": f"VmHWM in {_STATUS}" if status else "unavailable",
                "per_phase_reset": bool(self._reset_supported),
                "note": self._reset_note,
            },
            "current": current,
            "phases": {name: dict(values) for name, values in self._phases.items()},
            "open_phases": [entry["name"] for entry in self._open],
            "tensors": self._tensors if self._tensors is not None else {"recorded": False},
        }
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.device)
            report["device_name"] = props.name
            current["cuda"] = {
                "allocated_bytes": torch.cuda.memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "max_allocated_since_last_reset_bytes": torch.cuda.max_memory_allocated(self.device),
                "max_reserved_since_last_reset_bytes": torch.cuda.max_memory_reserved(self.device),
                "max_allocated_since_start_bytes": self._process_peak_cuda["allocated"],
                "max_reserved_since_start_bytes": self._process_peak_cuda["reserved"],
                "total_bytes": props.total_memory,
            }
        elif self.device.type == "cuda":
            report["device_note"] = "CUDA device requested but CUDA is not available; only CPU numbers"
        return report

    def write(self, path: Union[str, os.PathLike]) -> None:
        """Writes :meth:`report` as indented JSON, atomically (temporary file, fsync, os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.report(), indent=2, allow_nan=False, default=str) + "\n"
        write_atomic(path, text.encode("utf-8"))


class _Bytes:
    def __init__(self):
        self.bytes = 0
        self.numel = 0
        self.count = 0
        self.by_dtype: dict[str, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        tensor = local(tensor)
        size = tensor.numel() * tensor.element_size()
        self.bytes += size
        self.numel += tensor.numel()
        self.count += 1
        key = str(tensor.dtype).replace("torch.", "")
        self.by_dtype[key] = self.by_dtype.get(key, 0) + size

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "numel": self.numel, "tensors": self.count, "by_dtype": dict(sorted(self.by_dtype.items()))}


def _first_time(tensor: torch.Tensor, seen: set[tuple]) -> bool:
    """False for a tensor whose memory was already counted (tied weights, shared views)."""
    tensor = local(tensor)  # a DTensor's part on this rank (FSDP2 shards, replicated optimizer state)
    if tensor.numel() == 0 or tensor.device.type == "meta":
        key: tuple = ("id", id(tensor))
    else:
        key = (str(tensor.device), tensor.data_ptr(), tensor.numel(), tensor.dtype)
    if key in seen:
        return False
    seen.add(key)
    return True


def _optimizers(obj) -> Iterable:
    if obj is None:
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _optimizers(item)
        return
    if isinstance(obj, torch.optim.Optimizer):
        yield obj
        return
    inner = getattr(obj, "optimizer", None)
    if inner is not None and inner is not obj:
        yield from _optimizers(inner)
        return
    if hasattr(obj, "state"):
        yield obj
        return
    raise TypeError(
        f"record_tensors: {type(obj).__name__} is not an optimizer, a wrapper with .optimizer, or a list of them."
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
