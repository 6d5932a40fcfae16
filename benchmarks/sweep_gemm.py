"""Tile sweep of the step's two GEMM kernels, kernel by kernel (a tuning aid for the GPU sessions).

    python benchmarks/sweep_gemm.py                  # on a GPU: every case x every candidate tile
    python benchmarks/sweep_gemm.py 64,128,64,4,3    # only the listed tiles (block_m,block_n,block_k,warps,stages[,tma[,split_k]])
    TRITON_INTERPRET=1 python benchmarks/sweep_gemm.py   # a dry run of this script on the CPU (tiny shapes)

For each case (the bf16 4096x4096 rank-512 target, the rank-128 one whose projection splits its
reduction, the 368M model's three bucket shapes at rank 256, TF32's worst case) and each tile, the
projection with the Adam kernel after it (``project_partials_triton``, then ``lowrank_adam_triton``,
which sums a split projection's partials: the split's whole cost) and the back-projection
(``back_apply_triton``) run through their own settings (``utils.GEMM_CONFIG_ENVS``);
each kernel is timed alone with CUDA events around a CUDA-graph replay of its launches (median of
``SWEEP_ROUNDS``, after a warm-up that includes the compile), and the table gives ms per kernel and its ratio to the kernel's floor: its
bytes at the measured copy bandwidth or its flops at the measured matmul rate, whichever is larger. Split-K candidates (seventh field) run for the projection only. A tile
that fails to compile or launch is reported, not fatal. Each case ends with its fastest tile per
kernel (the winners go into ``utils.GEMM_CONFIGS[kernel]``, and so into the ahead-of-time compile
test), then the back-projection of its first two tiles with and without the W prefetch, alternately.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ceilings as C  # noqa: E402
from galore_kernels.triton_ops.adam import lowrank_adam_triton  # noqa: E402
from galore_kernels.triton_ops.back_apply import back_apply_triton  # noqa: E402
from galore_kernels.triton_ops.project import project_partials_triton  # noqa: E402
from galore_kernels.triton_ops.utils import (GEMM_CONFIG_ENVS, INTERPRETER_GEMM_CONFIG, PREFETCH_ENV,  # noqa: E402
                                             interpreting, stacked_scratch)

CUDA = torch.cuda.is_available() and not interpreting()
DEV = torch.device("cuda" if CUDA else "cpu")
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "20" if CUDA else "1"))
# (batch, m, n, rank, dtype, float32 matmul precision): the bf16 target case, a rank-128 one whose
# projection splits its reduction, the 368M model's buckets (q/k/v/o, gate/up, down), and TF32's worst
# case (left side: its operands are not K-major, see "Read from the sm_90 PTX").
CASES = ([(1, 4096, 4096, 512, torch.bfloat16, "highest"), (1, 4096, 4096, 128, torch.bfloat16, "highest"),
          (96, 1024, 1024, 256, torch.bfloat16, "highest"), (48, 2736, 1024, 256, torch.bfloat16, "highest"),
          (24, 1024, 2736, 256, torch.bfloat16, "highest"), (1, 4096, 11008, 512, torch.float32, "high")] if CUDA
         else [(2, 48, 80, 16, torch.bfloat16, "highest")])
# block_m,block_n,block_k,warps,stages[,tma]: pointer loads first, then the same tiles with TMA operand
# loads (utils.tile_product_tma), which a tile that does not compile or fit reports as failed.
CANDIDATES = {
    "16bit": ["64,128,64,4,3", "128,128,64,4,3", "128,128,64,8,3", "128,256,64,8,3", "64,256,64,4,3",
              "128,64,64,4,3", "64,64,64,4,3", "64,128,64,4,4", "128,128,32,4,4", "256,128,64,8,3",
              "64,128,64,4,3,1", "128,128,64,8,3,1", "128,128,64,8,4,1", "128,256,64,8,3,1", "256,128,64,8,3,1",
              "64,256,64,4,3,1"],
    # Single-stage float32 tiles load G in 16-byte vectors into registers and transpose it on its way
    # into shared memory; pipelined ones (cp.async) copy TF32's transposed G 4 bytes at a time.
    "fp32": ["64,128,32,4,3", "64,64,32,4,3", "128,128,32,8,3", "128,64,32,4,3", "64,128,32,4,4",
             "64,128,32,4,1", "128,128,32,8,1", "64,128,32,4,3,1", "128,128,32,8,3,1", "64,64,32,4,4,1"],
}
# The projection alone: its reduction split in a fixed number of parts (R is thin: few output tiles).
PROJECT_CANDIDATES = {
    "16bit": ["64,64,64,4,3,0,2", "64,128,64,4,3,0,2", "64,128,64,4,3,0,4", "128,128,64,8,3,0,2",
              "128,128,64,8,3,0,4", "128,256,64,8,3,0,4"],
    "fp32": ["64,128,32,4,3,0,2", "64,64,32,4,3,0,2"],
}
# The matmul ceiling of an operand dtype or float32 precision (ceilings.measure_ceilings).
RATE = {torch.bfloat16: "bf16_TFLOPs", torch.float16: "bf16_TFLOPs", "high": "tf32_TFLOPs", "medium": "tf32_TFLOPs",
        "highest": "ieee_TFLOPs"}
# SWEEP_CASES=0,5 runs only those cases (indices into CASES), to fit a device call's time.
SELECTED = os.environ.get("SWEEP_CASES")


def bucket(batch: int, m: int, n: int, rank: int, dtype: torch.dtype):
    """Weights, gradients, bases and an N as the optimizer hands them to the kernels (16-bit weights:
    bases and N in their dtype)."""
    side = "left" if m <= n else "right"
    gen = torch.Generator(device=DEV).manual_seed(0)
    weights = [torch.randn(m, n, device=DEV, generator=gen).to(dtype) for _ in range(batch)]
    grads = [torch.randn(m, n, device=DEV, generator=gen).to(dtype) for _ in range(batch)]
    rows = m if side == "left" else n
    q = torch.linalg.qr(torch.randn(rows, rank, device=DEV, generator=gen))[0]
    bases = [(q if side == "left" else q.T).contiguous().to(dtype) for _ in range(batch)]
    low = (rank, n) if side == "left" else (m, rank)
    normalized = stacked_scratch(batch, *low, DEV, dtype)
    normalized.copy_(torch.randn(batch, *low, device=DEV, generator=gen) * 1e-3)
    return side, weights, grads, bases, normalized


def time_ms(fn) -> float:
    """Median ms of ``fn``'s kernels. On a GPU they are replayed from a CUDA graph: timed as plain
    calls, the launchers' host time (more than a single weight's kernels take: the 2026-11-28 sweep)
    would be measured instead of the tile."""
    fn()  # warm-up: compiles this tile, caches the launchers' pointer tables
    C.sync()
    run = captured(fn) if CUDA else fn
    for _ in range(3):  # the clocks come up after the compile's idle GPU
        run()
    return statistics.median(C.time_one(lambda i: run(), 0) for _ in range(ROUNDS))


def captured(fn):
    """``fn``'s launches captured in a CUDA graph (after a call on a side stream, as capture wants);
    returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sweep_case(case, tiles: list[str], project_tiles: list[str], ceilings: dict) -> None:
    batch, m, n, rank, dtype, precision = case
    torch.set_float32_matmul_precision(precision)  # what the kernels follow for float32 operands
    side, weights, grads, bases, normalized = bucket(batch, m, n, rank, dtype)
    lr = torch.full((1,), 1e-6, device=DEV)
    flags = torch.zeros(batch, dtype=torch.int32, device=DEV)
    size = torch.empty((), dtype=dtype).element_size()
    low = normalized[0].numel()
    bandwidth = ceilings["copy_GBps"] * 1e6  # bytes per ms
    rate = ceilings[RATE[dtype if dtype != torch.float32 else precision]] * 1e9  # flops per ms
    flops = batch * 2 * m * n * rank  # each GEMM
    # project: G read, R written once and read once (split: its partials), M and V read and written, N written.
    floors = {"project": max(batch * (m * n * size + low * (4 + 4 + 16 + size)) / bandwidth, flops / rate),
              "back_apply": max(batch * 2 * m * n * size / bandwidth, flops / rate)}  # W read and written
    moments = [torch.zeros_like(normalized[0], dtype=torch.float32) for _ in range(2 * batch)]
    steps = torch.zeros(batch, dtype=torch.int32, device=DEV)

    def project_and_adam():  # the Adam kernel sums a split projection's partials: its cost counts too
        partials, nonfinite = project_partials_triton(grads, bases, side, rank)
        lowrank_adam_triton(partials, moments[:batch], moments[batch:], steps, lr, nonfinite, beta1=0.9, beta2=0.999,
                            eps=1e-8, scale=0.25, correct_bias=True, out=normalized, out_dtype=normalized.dtype)

    kernels = {"project": project_and_adam,
               "back_apply": lambda: back_apply_triton(weights, normalized, bases, lr, flags, side=side, weight_decay=0.0)}
    name = str(dtype).split(".")[-1] + (f" ({precision})" if dtype == torch.float32 else "")
    print(f"\n{batch} x {m}x{n} rank {rank} {name} ({side}); floor (bytes or flops): "
          + ", ".join(f"{k} {v:.4f} ms" for k, v in floors.items()))
    print(f"  {'tile (bm,bn,bk,warps,stages,tma,split)':40s} {'proj+adam ms':>12s} {'x floor':>7s} {'back_apply ms':>14s} "
          f"{'x floor':>8s}")
    best = {}
    for tile in tiles + [t for t in project_tiles if t not in tiles]:
        cells = []
        for name, fn in kernels.items():
            if name != "project" and tile not in tiles:
                cells.append(f"{'':11s} {'':8s}")  # a split-K candidate: the projection only
                continue
            os.environ[GEMM_CONFIG_ENVS[name]] = tile
            try:
                ms = time_ms(fn)
                cells.append(f"{ms:11.4f} {ms / floors[name]:8.2f}")
                if ms < best.get(name, (float("inf"),))[0]:
                    best[name] = (ms, tile)
            except Exception as err:  # noqa: BLE001 - a tile that does not fit is a result too
                cells.append(f"{'failed':>11s} {type(err).__name__[:8]:>8s}")
            finally:
                os.environ.pop(GEMM_CONFIG_ENVS[name], None)
        print(f"  {tile:40s} {cells[0]} {cells[1]:>23s}")
    for name, (ms, tile) in best.items():
        print(f"  fastest {name}: {tile} ({ms:.4f} ms, {ms / floors[name]:.2f}x its floor)")
    prefetch_ab(kernels["back_apply"], tiles[:2], floors["back_apply"])


def prefetch_ab(back_apply, tiles: list[str], floor: float) -> None:
    """The back-projection with its W tile loaded before the GEMM loop and after it
    (utils.prefetch_weight: off by default; auto takes it for 4-warp tiles of 16-bit weights), alternately."""
    for tile in tiles:
        os.environ[GEMM_CONFIG_ENVS["back_apply"]] = tile
        cells = []
        for setting in ("1", "0", "1", "0"):
            os.environ[PREFETCH_ENV] = setting
            try:
                ms = time_ms(back_apply)
                cells.append(f"prefetch {setting}: {ms:.4f} ms ({ms / floor:.2f}x)")
            except Exception as err:  # noqa: BLE001 - reported, not fatal
                cells.append(f"prefetch {setting}: failed ({type(err).__name__})")
        os.environ.pop(PREFETCH_ENV, None)
        os.environ.pop(GEMM_CONFIG_ENVS["back_apply"], None)
        print(f"  back_apply {tile}: " + ", ".join(cells))


def main(argv: list[str]) -> None:
    interpreter_tile = ",".join(str(int(v)) for v in vars(INTERPRETER_GEMM_CONFIG).values())
    ceilings = C.measure_ceilings()
    start = time.perf_counter()
    print(f"{C.device_name()}: GEMM tile sweep, {ROUNDS} rounds per kernel and tile; copy "
          f"{ceilings['copy_GBps']:.0f} GB/s, matmul TFLOP/s bf16 {ceilings['bf16_TFLOPs']}, TF32 "
          f"{ceilings['tf32_TFLOPs']}, IEEE fp32 {ceilings['ieee_TFLOPs']}")
    for index, case in enumerate(CASES):
        if SELECTED and str(index) not in SELECTED.split(","):
            continue
        bits = "fp32" if case[4] == torch.float32 else "16bit"
        tiles = argv or (CANDIDATES[bits] if CUDA else [interpreter_tile])
        project_tiles = [] if argv else (PROJECT_CANDIDATES[bits] if CUDA else [interpreter_tile[:-1] + "2"])
        sweep_case(case, tiles, project_tiles, ceilings)
    print(f"\nsweep took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
