"""Shared pieces of the step benchmarks (bench_step.py, bench_model_step.py, gpu_check.sh).

- :func:`measure_ceilings`: the two ceilings of METHOD.md, measured in the same process as the
  benchmark: device-to-device copy bandwidth (bytes read + written) and the matmul rate at each
  operand precision (bf16; float32 as TF32, torch's ``"high"``; float32 as IEEE, ``"highest"``).
- :func:`time_cuda`: median of CUDA-event timings of one call (warm-up first, inputs rotated by the
  caller), with a host-clock fallback on the CPU.
- :func:`import_galore_torch`: galore-torch's ``GaLoreAdamW`` (``galore_torch.adamw.AdamW``) without
  the package ``__init__``, which imports bitsandbytes (as ``../shared/anchors/anchor_bench.py`` does).
- :func:`seed_galore_torch`: puts a random orthonormal basis into galore-torch's projector so that its
  first step does not run a full SVD (steady state is what is timed; an SVD of 4096x4096 costs 1.4 s).
- ``python benchmarks/ceilings.py summary STEP.json MODEL.json REFRESH.json``: the short table that
  benchmarks/gpu_check.sh prints last (any file may be missing).
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import time
import types
from typing import Callable, Optional

import torch

MATMUL_PRECISIONS = {"bf16": None, "tf32": "high", "ieee": "highest"}


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if cuda() else "cpu"


def l2_bytes() -> int:
    if not cuda():
        return 32 * 2**20
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_sets(working_set_bytes: int, cap: int = 8) -> int:
    """How many input sets to rotate among so that a step does not find the last step's data in
    L2: enough that the sets together are three times the cache, at most ``cap``."""
    return max(1, min(cap, math.ceil(3 * l2_bytes() / max(1, working_set_bytes))))


class precision:
    """``with precision("highest"):`` sets torch's float32 matmul precision and restores it."""

    def __init__(self, value: Optional[str]):
        self.value = value

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        if self.value:
            torch.set_float32_matmul_precision(self.value)
        return self

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


def time_cuda(fn: Callable[[int], object], rounds: int, warmup: int = 3) -> list[float]:
    """Per-call times in ms of ``fn(i)`` (i = call index, for rotating inputs): CUDA events around each
    call with a synchronisation after it, as the anchor measured; a host clock on the CPU."""
    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(warmup, warmup + rounds):
        times.append(time_one(fn, i))
    return times


def time_one(fn: Callable[[int], object], i: int) -> float:
    if cuda():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t) * 1e3


def time_loop(fn: Callable[[int], object], calls: int, first: int = 0) -> tuple[float, float]:
    """(device ms, host ms) per call of ``calls`` back-to-back calls: the device time between two
    events (launches overlap the previous call's kernels: a training loop's throughput rather than
    one call's latency), and the host time spent issuing them. Host close to device time means the
    loop is bound by launch overhead, not by the kernels."""
    sync()
    if cuda():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        for i in range(first, first + calls):
            fn(i)
        host = (time.perf_counter() - t) * 1e3 / calls
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls, host
    t = time.perf_counter()
    for i in range(first, first + calls):
        fn(i)
    ms = (time.perf_counter() - t) * 1e3 / calls
    return ms, ms


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------ ceilings
_CEILINGS: Optional[dict] = None


def measure_ceilings() -> dict:
    """{"copy_GBps", "bf16_TFLOPs", "tf32_TFLOPs", "ieee_TFLOPs", ...} measured once per process.

    Copy: a 1 GiB float32 buffer copied device to device, bytes read + written over the median
    time. Matmul: a square product on random data (8192^3 for bf16 and TF32, 4096^3 for IEEE fp32,
    which runs on CUDA cores), 2 n^3 flops over the median time. On the CPU: small sizes, for the
    smoke run only.
    """
    global _CEILINGS
    if _CEILINGS is not None:
        return _CEILINGS
    dev = "cuda" if cuda() else "cpu"
    out = {"device": device_name(), "L2_MB": round(l2_bytes() / 2**20, 1)}
    n = (1 << 28) if cuda() else (1 << 22)
    ms = _copy_ms(n, dev)
    out["copy_GBps"] = _sig(2 * n * 4 / ms / 1e6)
    out["copy_ms"] = round(ms, 4)
    out["copy_bytes"] = 2 * n * 4
    for name, prec in MATMUL_PRECISIONS.items():
        size = (8192 if name != "ieee" else 4096) if cuda() else 256
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        ms = _matmul_ms(size, dtype, prec or "highest", dev)
        out[f"{name}_TFLOPs"] = _sig(2 * size**3 / ms / 1e9)
        out[f"{name}_matmul_size"] = size
    if cuda():
        torch.cuda.empty_cache()
    _CEILINGS = out
    return out


def _copy_ms(n: int, dev: str) -> float:
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    return median(time_cuda(lambda i: y.copy_(x), rounds=20 if cuda() else 5))


def _matmul_ms(size: int, dtype: torch.dtype, float32_precision: str, dev: str) -> float:
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=dev, dtype=dtype, generator=gen)
    c = torch.empty(size, size, device=dev, dtype=dtype)
    with precision(float32_precision):
        return median(time_cuda(lambda i: torch.mm(a, b, out=c), rounds=10 if cuda() else 3, warmup=3))


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a CPU's bf16 rate is far below 0.1 TFLOP/s)."""
    return float(f"{x:.{digits}g}")


def matmul_rate(ceilings: dict, operand: str) -> float:
    """flop/s at operand precision ``operand`` ("bf16", "tf32" or "ieee")."""
    return ceilings[f"{operand}_TFLOPs"] * 1e12


# ------------------------------------------------------------------------------ galore-torch
_GALORE_TORCH: Optional[tuple] = None


def import_galore_torch():
    """(GaLoreAdamW class, GaLoreProjector class) from galore-torch, or (None, reason)."""
    global _GALORE_TORCH
    if _GALORE_TORCH is not None:
        return _GALORE_TORCH
    try:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("galore-torch is not installed (bash benchmarks/fetch_gpu_wheels.sh, carry .whl)")
        if "galore_torch" not in sys.modules:
            pkg = types.ModuleType("galore_torch")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["galore_torch"] = pkg
        from galore_torch.adamw import AdamW
        from galore_torch.galore_projector import GaLoreProjector
        _GALORE_TORCH = (AdamW, GaLoreProjector)
    except Exception as err:  # noqa: BLE001 - any failure means: no galore-torch column
        _GALORE_TORCH = (None, f"galore-torch not importable: {type(err).__name__}: {err}")
    return _GALORE_TORCH


def orthonormal(rows: int, cols: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (rows, cols) float32 matrix with orthonormal columns (rows >= cols)."""
    g = torch.randn(rows, cols, generator=generator).to(device)
    return torch.linalg.qr(g)[0].contiguous()


def seed_galore_torch(optimizer, params: list, rank: int, scale: float, gap: int) -> None:
    """Give each projected parameter of galore-torch's optimizer a projector with a random
    orthonormal basis (in the parameter's dtype, as its SVD would return it) and step 1, so the next
    step projects without an SVD. galore-torch decides the side with ``m >= n -> right`` ('std')."""
    _, Projector = import_galore_torch()
    gen = torch.Generator().manual_seed(1)
    for p in params:
        m, n = p.shape
        r = min(rank, m, n)
        proj = Projector(rank, update_proj_gap=gap, scale=scale, proj_type="std")
        if m >= n:  # right: (r, n) rows
            basis = orthonormal(n, r, p.device, gen).T.contiguous()
        else:  # left: (m, r) columns
            basis = orthonormal(m, r, p.device, gen)
        proj.ortho_matrix = basis.to(p.dtype)
        state = optimizer.state[p]
        state["step"] = 1
        state["projector"] = proj


# ------------------------------------------------------------------------------- the summary
def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(step_json: str, model_json: str, refresh_json: str) -> None:
    """The short table gpu_check.sh ends with."""
    step = _load(step_json)
    if step:
        c = step.get("ceilings", {})
        print(f"card: {step.get('device')}  torch {step.get('torch')}  triton {step.get('triton')}  {step.get('date')}")
        print(f"ceilings (this run): copy {c.get('copy_GBps')} GB/s, bf16 {c.get('bf16_TFLOPs')} TFLOP/s, "
              f"tf32 {c.get('tf32_TFLOPs')}, ieee fp32 {c.get('ieee_TFLOPs')}")
        print("one step per weight, ms (median of CUDA events); x = triton / floor; gt = galore-torch; "
              "err = triton's R vs float64; host = triton's host ms per step in a back-to-back loop")
        print("graph = the Triton step replayed from a CUDA graph (device time); x = graph (else triton) / floor")
        print(f"{'case':24s} {'floor':>6s} {'triton':>7s} {'graph':>7s} {'x':>5s} {'gt':>6s} {'vs gt':>6s} {'adamw':>6s} "
              f"{'ref':>6s} {'compiled':>8s} {'err':>7s} {'host':>6s}")
        for case in step.get("cases", []):
            t = case.get("methods", {})

            def ms(name, t=t):
                v = t.get(name, {}).get("ms")
                return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

            tr = t.get("triton", {})
            best = t.get("triton_graph") or tr
            x = f"{best['x_floor']:.2f}" if "x_floor" in best else "-"
            sp = f"{best['speedup_vs_galore_torch']:.1f}x" if "speedup_vs_galore_torch" in best else "-"
            err = f"{tr['err_R']:.1e}" if "err_R" in tr else "-"
            host = f"{tr['host_ms_loop']:.3f}" if "host_ms_loop" in tr else "-"
            print(f"{case['case']:24s} {case['floor_ms']:6.3f} {ms('triton'):>7s} {ms('triton_graph'):>7s} {x:>5s} {ms('galore_torch'):>6s} "
                  f"{sp:>6s} {ms('torch_adamw_fused'):>6s} {ms('reference'):>6s} {ms('reference_compiled'):>8s} {err:>7s} {host:>6s}")
        misses = [t for t in step.get("targets", []) if t.startswith("MISS")]
        print(f"targets: {len(step.get('targets', [])) - len(misses)} PASS, {len(misses)} MISS")
        for line in misses[:12]:
            print("  ", line)
    else:
        print(f"(no step benchmark results in {step_json})")
    model = _load(model_json)
    if model:
        print(f"whole-model optimizer step ({model.get('config')}):")
        for name, row in model.get("methods", {}).items():
            extra = f" replays {row['replays']}" if "replays" in row else ""
            extra += f" peak {row['peak_alloc_GB']} GB" if "peak_alloc_GB" in row else ""
            extra += f" state {row['state_MB']} MB" if "state_MB" in row else ""
            print(f"  {name:26s} {row.get('ms', '-'):>9} ms  loop {row.get('ms_loop', '-'):>9}  "
                  f"host {row.get('host_ms_loop', '-'):>9}{extra}")
        best = [(row["ms"], name) for name, row in model.get("methods", {}).items() if name.startswith("triton")]
        if best and model.get("device") != "cpu":
            ms, name = min(best)
            print(f"  target <= 2.5 ms: {'PASS' if ms <= 2.5 else 'MISS'} ({ms:.3f} ms, {name})")
    else:
        print(f"(no model benchmark results in {model_json})")
    refresh = _load(refresh_json)
    if refresh:
        print("refresh (ms, median; energy):")
        for b in refresh.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "refresh_cost_ms" in info:  # the whole-model case: refresh step minus steady step
                cost = info["refresh_cost_ms"]
                verdict = f"target <= 150 ms: {'PASS' if cost <= 150 else 'MISS'}" if info.get("device", "cpu") != "cpu" else ""
                print(f"  {b['name']:60s} {cost:9.2f}  per model refresh ({info.get('weights')} weights) {verdict}")
                continue
            print(f"  {b['name']:60s} {b['stats']['median'] * 1e3:9.2f}  {info.get('energy', '')}")
    else:
        print(f"(no refresh benchmark results in {refresh_json})")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "summary":
        args = sys.argv[2:] + [""] * 3
        summary(*args[:3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "ceilings":
        print(json.dumps(measure_ceilings(), indent=1))
    else:
        print(__doc__)
