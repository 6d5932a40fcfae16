"""Tile sweep of the step's two GEMM kernels, kernel by kernel (a tuning aid for the GPU sessions).

    python benchmarks/sweep_gemm.py                  # on a GPU: every case x every candidate tile
    python benchmarks/sweep_gemm.py 64,128,64,4,3    # only the listed tiles (block_m,block_n,block_k,warps,stages[,tma])
    TRITON_INTERPRET=1 python benchmarks/sweep_gemm.py   # a dry run of this script on the CPU (tiny shapes)

For each case (the bf16 4096x4096 rank-512 target, and the 368M model's three bucket shapes at rank
256) and each tile, the projection (``lowrank_project_triton``) and the back-projection
(``back_apply_triton``) run through ``GALORE_KERNELS_GEMM_CONFIG``; each kernel is timed alone with
CUDA events (median of ``SWEEP_ROUNDS``, after a warm-up that includes the compile), and the table
gives ms per kernel and its ratio to the kernel's bytes floor at the measured copy bandwidth.
A tile that fails to compile or launch is reported, not fatal. The winners go into
``utils.GEMM_CONFIGS`` (and so into the ahead-of-time compile test).
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
from galore_kernels.triton_ops.back_apply import back_apply_triton  # noqa: E402
from galore_kernels.triton_ops.project import lowrank_project_triton  # noqa: E402
from galore_kernels.triton_ops.utils import GEMM_CONFIG_ENV, GEMM_CONFIGS, interpreting, stacked_scratch  # noqa: E402

CUDA = torch.cuda.is_available() and not interpreting()
DEV = torch.device("cuda" if CUDA else "cpu")
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "20" if CUDA else "1"))
# (batch, m, n, rank, dtype): the target case, then the 368M model's buckets (q/k/v/o, gate/up, down).
CASES = ([(1, 4096, 4096, 512, torch.bfloat16), (96, 1024, 1024, 256, torch.bfloat16),
          (48, 2736, 1024, 256, torch.bfloat16), (24, 1024, 2736, 256, torch.bfloat16)] if CUDA
         else [(2, 48, 80, 16, torch.bfloat16)])
# block_m,block_n,block_k,warps,stages[,tma]: pointer loads first, then the same tiles with TMA operand
# loads (utils.tile_product_tma), which a tile that does not compile or fit reports as failed.
CANDIDATES = ["64,128,64,4,3", "128,128,64,4,3", "128,128,64,8,3", "128,256,64,8,3", "64,256,64,4,3",
              "128,64,64,4,3", "64,64,64,4,3", "64,128,64,4,4", "128,128,32,4,4", "256,128,64,8,3",
              "64,128,64,4,3,1", "128,128,64,8,3,1", "128,128,64,8,4,1", "128,256,64,8,3,1", "256,128,64,8,3,1",
              "64,256,64,4,3,1"]


def bucket(batch: int, m: int, n: int, rank: int, dtype: torch.dtype):
    """Weights, gradients, 16-bit bases and an N as the optimizer hands them to the kernels."""
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
    fn()  # warm-up: compiles this tile
    C.sync()
    return statistics.median(C.time_one(lambda i: fn(), 0) for _ in range(ROUNDS))


def sweep_case(case, tiles: list[str], bandwidth: float) -> None:
    batch, m, n, rank, dtype = case
    side, weights, grads, bases, normalized = bucket(*case)
    lr = torch.full((1,), 1e-6, device=DEV)
    flags = torch.zeros(batch, dtype=torch.int32, device=DEV)
    size = torch.empty((), dtype=dtype).element_size()
    low_bytes = normalized[0].numel() * 4
    floors = {"project": batch * (m * n * size + low_bytes) / bandwidth,  # G read, R written (float32)
              "back_apply": batch * 2 * m * n * size / bandwidth}  # W read and written
    kernels = {"project": lambda: lowrank_project_triton(grads, bases, side, rank),
               "back_apply": lambda: back_apply_triton(weights, normalized, bases, lr, flags, side=side, weight_decay=0.0)}
    print(f"\n{batch} x {m}x{n} rank {rank} {str(dtype).split('.')[-1]} ({side}); bytes floor: "
          + ", ".join(f"{k} {v:.4f} ms" for k, v in floors.items()))
    print(f"  {'tile (bm,bn,bk,warps,stages,tma)':30s} {'project ms':>11s} {'x floor':>8s} {'back_apply ms':>14s} {'x floor':>8s}")
    for tile in tiles:
        os.environ[GEMM_CONFIG_ENV] = tile
        cells = []
        for name, fn in kernels.items():
            try:
                ms = time_ms(fn)
                cells.append(f"{ms:11.4f} {ms / floors[name]:8.2f}")
            except Exception as err:  # noqa: BLE001 - a tile that does not fit is a result too
                cells.append(f"{'failed':>11s} {type(err).__name__[:8]:>8s}")
        print(f"  {tile:30s} {cells[0]} {cells[1]:>23s}")
    os.environ.pop(GEMM_CONFIG_ENV, None)


def main(argv: list[str]) -> None:
    tiles = argv or (CANDIDATES if CUDA else [",".join(map(str, vars(GEMM_CONFIGS["interpreter"]).values()))])
    bandwidth = C.measure_ceilings()["copy_GBps"] * 1e6 if CUDA else 1e7  # bytes per ms
    start = time.perf_counter()
    print(f"{C.device_name()}: GEMM tile sweep, {ROUNDS} rounds per kernel and tile; copy bandwidth "
          f"{bandwidth / 1e6:.0f} GB/s")
    for case in CASES:
        sweep_case(case, tiles, bandwidth)
    print(f"\nsweep took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
