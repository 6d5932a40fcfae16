"""Launch heuristics and small helpers shared by the Triton ops (one place, as in Liger-Kernel).

Every kernel here works on a *bucket*: B parameters of one shape and dtype, stepped by one launch.
User tensors (weights, gradients, moments, bases) are separate allocations, so a kernel receives a
pointer table (an int64 tensor of ``data_ptr()``s on the kernels' device) per operand and loads its
own row. Tables are cached by the addresses they hold, so a steady-state step copies nothing to the
device, and a cached table stays valid for as long as the same addresses are passed.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Stochastic rounding: the per-step Philox key is seed * ROUNDING_KEY_MULTIPLIER + step, seeds below 2^31.
ROUNDING_KEY_MULTIPLIER: tl.constexpr = tl.constexpr(1000003)
# Adam moments: float32, or bf16 (read in float32, stored rounded stochastically); fp16 would underflow g^2.
STATE_DTYPES = (torch.float32, torch.bfloat16)
SUPPORTED_DTYPES = tuple(TORCH_TO_TL)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------ precision
# torch.get_float32_matmul_precision() -> tl.dot input_precision for float32 operands. torch's
# default "highest" is IEEE fp32; tl.dot's own default would be TF32, which silently changes what a
# user who kept "highest" asked for. "medium" allows bf16 inside torch's matmuls; Triton has no
# such mode for fp32 operands, so it gets TF32, the nearest cheaper one.
FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def dot_precision(param_dtype: torch.dtype) -> str:
    """The ``input_precision`` of the projection matmuls for parameters of ``param_dtype``.

    bf16/fp16 parameters multiply in their own dtype (fp32 accumulation); the precision flag only
    matters for float32 operands and follows torch's global setting.
    """
    if param_dtype != torch.float32 or interpreting():
        return "ieee"  # ignored for 16-bit operands; one value keeps the compiled variants few
    return FP32_PRECISION[torch.get_float32_matmul_precision()]


def k_major_operands(param_dtype: torch.dtype) -> bool:
    """Whether the GEMMs of parameters of ``param_dtype`` want every shared-memory operand K-major
    (contiguous along the reduction). TF32 wgmma reads only those: any other layout reaches shared
    memory transposed, one 4-byte element per copy (sm_90 PTX; RESULTS.md). 16-bit wgmma reads either
    order, and IEEE float32 runs on the FMA units."""
    return dot_precision(param_dtype) == "tf32"


def interpreter_workarounds() -> bool:
    """The ``INTERPRETER`` constexpr of the kernels: True only under Triton's interpreter.

    Two interpreter bugs (triton 3.9) would otherwise make the CPU parity tests test the interpreter:
    its ``tl.dot`` multiplies bf16 operands as their raw 16-bit patterns, and its float32 -> bf16 cast
    truncates where compiled Triton rounds to nearest even. Under the flag the kernels round with
    :func:`to_dtype`'s bit arithmetic and multiply the rounded 16-bit operands in float32, which is
    what the tensor cores compute (products of 16-bit values are exact in float32). Compiled kernels
    never take these branches (the ahead-of-time compile test builds them with the flag off).
    """
    return interpreting()


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even, also under the interpreter (see above)."""
    if INTERPRETER and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def rounding_key(seeds_ptr, steps_ptr, batch):
    """The Philox key of a parameter's step: (its seed, the step after the increment). Its random
    bits are counted by element; word 0 of a block rounds the weight, words 1 and 2 the moments. A
    step is reproducible, a resumed run draws the same bits, nothing is read from the host (CUDA
    graphs replay it)."""
    return tl.load(seeds_ptr + batch) * ROUNDING_KEY_MULTIPLIER + (tl.load(steps_ptr + batch) + 1)


@triton.jit
def stochastic_bf16(x, bits):
    """float32 ``x`` to bf16, up or down with probabilities proportional to the distances (unbiased):
    16 random bits added to the 16 that bf16 drops carry into the kept ones or not."""
    noise = bits.to(tl.uint32, bitcast=True) & 0xFFFF
    kept = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    return kept.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the dropped bits are zero


@triton.jit
def round_weight(w, W_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, seeds_ptr, steps_ptr, batch, offsets,
                 INTERPRETER: tl.constexpr):
    """The updated float32 weight in its dtype: to nearest even, or (STOCHASTIC, bf16 weights only)
    stochastically, so that updates below half a bf16 ulp still move the weight on average."""
    if STOCHASTIC:
        return stochastic_bf16(w, tl.randint(rounding_key(seeds_ptr, steps_ptr, batch), offsets))
    return to_dtype(w, W_DTYPE, INTERPRETER)


@triton.jit
def load_pointer(table, batch, DTYPE: tl.constexpr):
    """Row ``batch`` of a pointer table as a ``DTYPE`` pointer, declared 16-byte aligned (the
    launchers check it): a pointer made from a loaded integer otherwise has unknown alignment and
    every load and store of the kernel goes scalar (measured on an H200: the bf16 back-projection of
    a 4096x4096 weight at rank 512 took 1.0 ms instead of 0.17 ms)."""
    return tl.multiple_of(tl.load(table + batch).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x`` rounded to the dot's operand dtype (widened back to float32 under the interpreter)."""
    x = to_dtype(x, DTYPE, INTERPRETER)
    if INTERPRETER:
        x = x.to(tl.float32)
    return x


@triton.jit
def tile_product(a_ptr, b_ptr, offs_m, offs_n, M, N, K, k_start, k_end, stride_am, stride_ak, stride_bk, stride_bn,
                 OPERAND: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile of A @ B (A: M x K, B: K x N, any strides) over the reduction steps
    ``k_start:k_end`` (a split of it, or all of it: 0, K; k_start a multiple of BLOCK_K), the operands
    rounded to OPERAND, float32 accumulation: (BLOCK_M, BLOCK_N) float32, zero outside."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(dot_operand(a, OPERAND, INTERPRETER), dot_operand(b, OPERAND, INTERPRETER), acc=acc,
                     input_precision=PRECISION)
    return acc


@triton.jit
def tile_product_tma(a_ptr, b_ptr, off_m, off_n, M, N, K, k_start, k_end, lda, ldb,
                     OPERAND: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                     A_K_MAJOR: tl.constexpr, B_N_MAJOR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`tile_product` with both operands loaded by the tensor memory accelerator (TMA) through
    device-side descriptors: bulk copies into shared memory, out-of-bounds rows zero-filled. Each
    operand is a row-major matrix with row stride ``lda``/``ldb`` (16-byte multiples, base 16-byte
    aligned: the launchers check): A is M x K (A_K_MAJOR) or stored as its K x M transpose, B is
    K x N (B_N_MAJOR) or stored as N x K. A transposed tile is a view for the tensor cores (16-bit
    wgmma reads either major order), not a copy."""
    if A_K_MAJOR:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[lda, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[lda, 1], block_shape=[BLOCK_K, BLOCK_M])
    if B_N_MAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[ldb, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[ldb, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if A_K_MAJOR:
            a = a_desc.load([off_m, k0])
        else:
            a = tl.trans(a_desc.load([k0, off_m]))
        if B_N_MAJOR:
            b = b_desc.load([k0, off_n])
        else:
            b = tl.trans(b_desc.load([off_n, k0]))
        acc = tl.dot(dot_operand(a, OPERAND, INTERPRETER), dot_operand(b, OPERAND, INTERPRETER), acc=acc,
                     input_precision=PRECISION)
    return acc


def tma_ready(cfg: "GemmConfig", row_bytes: Sequence[int]) -> bool:
    """Whether a launch with ``cfg`` loads its operands through TMA: the configuration asks for it
    and every operand's row stride is a multiple of 16 bytes (the hardware's rule; bases are
    16-byte aligned already). Otherwise the pointer loads of :func:`tile_product` run."""
    if not cfg.tma or any(b % ALIGNMENT for b in row_bytes):
        return False
    if not interpreting():
        _ensure_allocator()
    return True


def _torch_allocation(size: int, alignment: int, stream) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors live in a global scratch that Triton asks an allocator for at each
    launch; torch's caching allocator serves it (also under CUDA graph capture). A user's own
    allocator is kept. The setting is per thread (layer-wise hooks run in autograd's threads)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocation)


# ------------------------------------------------------------------------------ launch configs
@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # operands through TMA descriptors where their layout allows (tile_product_tma)
    split_k: int = 0  # projection only: reduction splits; 0 = chosen by project_splits from the shape


# The configurations each GEMM kernel can pick (the ahead-of-time compile test builds each one).
# Thin outputs (one side is the rank) favour a tall tile on the long side; 16-bit operands take a
# deeper K step. The two kernels differ in shape (the projection reduces over a whole side of G into
# a thin R; the back-projection reduces over the rank into all of W), so each has its own table,
# tuned on its own by benchmarks/sweep_gemm.py. gemm_config takes the first of large, wide, square
# that the shape fills (MIN_PROGRAMS).
GEMM_KERNELS = ("project", "back_apply")
GEMM_CONFIGS = {
    kernel: {
        "wide_16bit": GemmConfig(64, 128, 64, 4, 3),
        "wide_fp32": GemmConfig(64, 128, 32, 4, 3),
        "square_16bit": GemmConfig(64, 64, 64, 4, 3),
        "square_fp32": GemmConfig(64, 64, 32, 4, 3),
    }
    for kernel in GEMM_KERNELS
}
# The float32 projection's 8-warp 128x128 tile (H200, 2026-11-28, one run, CUDA-graph step times,
# RESULTS.md): TF32 4096x11008 r512 (left) 1.55 -> 1.03 ms, and 2-4% faster on the other measured
# float32 cases (IEEE and TF32, 4096x4096 r512 right, 4096x11008 r512 left). Its 16-bit counterpart
# showed no gain on the 368M model's step in the same session: 16-bit keeps the 64x128 tile.
GEMM_CONFIGS["project"]["large_fp32"] = GemmConfig(128, 128, 32, 8, 3)
# The interpreter gets small tiles: it runs every element in NumPy.
INTERPRETER_GEMM_CONFIG = GemmConfig(32, 64, 32, 4, 1)
# Every launch asks for floating-point contraction (a * b + c as one FMA) explicitly: it is Triton's
# default up to 3.9 (what the GPU figures and tolerances were measured with), and becomes off in
# 3.10. Pinned, a step's bits do not change with the Triton version, and 3.9 does not warn at each
# first launch.
FP_FUSION = True
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4
INTERPRETER_ELEMENTWISE_BLOCK = 256


# Tuning knobs for GPU sessions (benchmarks sweep them), each
# "block_m,block_n,block_k,num_warps,num_stages[,tma[,split_k]]": the first replaces every GEMM
# configuration, the kernel's own (GEMM_CONFIG_ENVS) wins over it for that kernel. Also honoured under
# the interpreter, where the parity tests use them for the TMA and split-K paths. Not for production
# use: only GEMM_CONFIGS are compile-tested.
GEMM_CONFIG_ENV = "GALORE_KERNELS_GEMM_CONFIG"
GEMM_CONFIG_ENVS = {"project": "GALORE_KERNELS_PROJECT_CONFIG", "back_apply": "GALORE_KERNELS_BACK_APPLY_CONFIG"}


# Below this many programs a launch has at most one program per streaming multiprocessor (an H100
# or H200 has 132), too little work in flight to hide memory latency: the launchers then take the
# smaller square tile, and the projection splits its reduction. A constant, not the device's count,
# so that a step computes the same bits on any card (resume elsewhere).
MIN_PROGRAMS = 132
# Split-K of the projection: at most this many splits, each of at least this many K steps (a
# pipelined main loop much longer than its prologue).
MAX_SPLITS = 8
MIN_SPLIT_STEPS = 8


def _parse_gemm_config(name: str, value: str, kernel: str) -> GemmConfig:
    values = value.split(",")
    try:
        if len(values) not in (5, 6, 7):
            raise ValueError(len(values))
        numbers = [int(v) for v in values]
        cfg = GemmConfig(*numbers[:5], *(bool(v) for v in numbers[5:6]), *numbers[6:7])
        if min(numbers[:5]) < 1 or not 0 <= cfg.split_k <= MAX_SPLITS:
            raise ValueError(numbers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} must be five to seven integers: "
                         "block_m,block_n,block_k,num_warps,num_stages[,tma (0 or 1)[,split_k (0 = auto, at most "
                         f"{MAX_SPLITS})]], all but split_k positive") from err
    if cfg.split_k > 1 and kernel != "project":
        raise ValueError(f"{name}={value!r}: split_k applies to the projection only (the {kernel} kernel's "
                         "epilogue needs the whole reduction); give 0 or leave the field out.")
    return cfg


def gemm_config(kernel: str, out_rows: int, out_cols: int, operand_dtype: torch.dtype, batch: int = 1) -> GemmConfig:
    """Tile shape of ``kernel`` ("project" or "back_apply") for ``batch`` (out_rows x out_cols)
    outputs with a long reduction or K = rank."""
    for name in (GEMM_CONFIG_ENVS[kernel], GEMM_CONFIG_ENV):
        override = os.environ.get(name)
        if override:
            return _parse_gemm_config(name, override, kernel)
    if interpreting():
        return INTERPRETER_GEMM_CONFIG
    table = GEMM_CONFIGS[kernel]
    bits = "16bit" if operand_dtype != torch.float32 else "fp32"
    if max(out_rows, out_cols) >= 1024 and min(out_rows, out_cols) >= 64:
        for tier in ("large", "wide"):  # the largest tile that still gives every SM a program
            cfg = table.get(f"{tier}_{bits}")
            if cfg is not None and cdiv(out_rows, cfg.block_m) * cdiv(out_cols, cfg.block_n) * batch >= MIN_PROGRAMS:
                return cfg
    return table[f"square_{bits}"]


# The back-projection can issue its W tile's load before the GEMM loop, so that the loop (K = rank:
# 4-16 steps) hides the load's latency, which otherwise follows it. The tile then stays in registers
# through the loop: only 4-warp tiles of 16-bit weights whose W takes at most PREFETCH_REGISTERS
# 32-bit registers per thread can do it. For bf16 at 64x128 that is 128 -> 168 registers per thread
# (ptxas, sm_90a), still 3 CTAs per SM; at 64x64, 64 -> 92, still 4. Larger tiles would spill (a
# 128x256 8-warp tile holds 250 registers already), an 8-warp 128x128 tile would drop from 2 CTAs per
# SM to 1, and a float32 64x64 one from 4 to 3.
# Off by default: on the H200 (2026-11-28, benchmarks/sweep_gemm.py, alternating in one run) no gain
# was measurable (the 368M model's buckets: differences within the noise, both ways), and off saves
# its registers. GALORE_KERNELS_PREFETCH_W=auto takes it where the register rule allows, 1 forces it,
# 0 (the default) leaves it out.
PREFETCH_REGISTERS = 32
PREFETCH_ENV = "GALORE_KERNELS_PREFETCH_W"


def prefetch_weight(cfg: GemmConfig, weight_bytes: int) -> bool:
    """Whether the back-projection of a weight of ``weight_bytes`` per element loads its tile of W
    before the GEMM loop."""
    setting = os.environ.get(PREFETCH_ENV, "0")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{PREFETCH_ENV}={setting!r}: use 0 (the default), auto or 1.")
    if setting != "auto":
        return setting == "1"
    threads = cfg.num_warps * 32
    return (cfg.num_warps == 4 and weight_bytes == 2
            and cfg.block_m * cfg.block_n * weight_bytes <= PREFETCH_REGISTERS * 4 * threads)


def project_splits(cfg: GemmConfig, programs: int, reduction: int) -> tuple[int, int]:
    """(K steps per split, splits) of a projection launch of ``programs`` output tiles (times the
    batch) over a reduction of ``reduction``: split only while there are fewer programs than SMs, each
    split keeping at least MIN_SPLIT_STEPS steps, unless the configuration fixes the count. The
    partial products are summed in split order by the Adam kernel (deterministic: no atomics), so the
    count depends on the shape and the bucket's size alone, and a step gives the same bits on any card."""
    steps = max(1, cdiv(reduction, cfg.block_k))
    splits = cfg.split_k
    if not splits:
        splits = 1
        while (programs * splits < MIN_PROGRAMS and splits < MAX_SPLITS
               and steps >= 2 * splits * MIN_SPLIT_STEPS):
            splits *= 2
    per_split = cdiv(steps, min(splits, steps))
    return per_split, cdiv(steps, per_split)  # no split left empty


def elementwise_block() -> int:
    return INTERPRETER_ELEMENTWISE_BLOCK if interpreting() else ELEMENTWISE_BLOCK


# ------------------------------------------------------------------------------ pointer tables
_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 512
# Tables used while a CUDA graph was being captured: the graph reads them (and replays the copy of
# those first built during the capture from their pinned host buffer) at every replay, so they are
# never evicted.
_CAPTURED_TABLES: dict = {}


def _table(key: tuple, pointers: Callable[[], Sequence[int]], device: torch.device) -> Tensor:
    """The cached int64 device tensor holding ``pointers()``; built without a host synchronisation."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    table = _TABLE_CACHE.get(key) or _CAPTURED_TABLES.get(key)
    if table is not None:
        if key in _TABLE_CACHE:
            _TABLE_CACHE.move_to_end(key)
            if capturing:  # a graph will read this table at every replay: never evict it
                _CAPTURED_TABLES[key] = table
        return table[1]
    host = torch.tensor(list(pointers()), dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        table = (host, host.to(device, non_blocking=True))
        if capturing:
            _CAPTURED_TABLES[key] = table
            return table[1]
    else:
        table = (host, host)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table[1]


def pointer_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """An int64 tensor on ``device`` holding each tensor's data pointer, cached by those pointers.

    A new table is filled from pinned host memory with a non-blocking copy (no host synchronisation;
    a copy made while a CUDA graph is being captured is replayed from the same pinned buffer, which
    stays cached for good).
    """
    pointers = tuple(t.data_ptr() for t in tensors)
    return _table((device.type, device.index, pointers), lambda: pointers, device)


def stacked_table(stacked: Tensor) -> Tensor:  # (B, ...) contiguous -> (B,) int64 on its device
    """The pointer table of the B slices of a stacked scratch tensor. The caching allocator hands a
    bucket's scratch the same address step after step, so this is a cache hit: no launch."""
    batch = stacked.shape[0]
    step = stacked.stride(0) * stacked.element_size()
    base, device = stacked.data_ptr(), stacked.device
    key = (device.type, device.index, "stacked", base, batch, step)
    return _table(key, lambda: [base + i * step for i in range(batch)], device)


ALIGNMENT = 16  # bytes; load_pointer promises it to the compiler


def random_seeds(rounding_seeds: Optional[Tensor], count: int, device: torch.device) -> Tensor:
    """The (B,) int64 seeds of a bucket's random bits; without any given, 0..B-1 (distinct per matrix;
    the optimizer passes seeds from its own seed and the parameter indices)."""
    return torch.arange(count, dtype=torch.int64, device=device) if rounding_seeds is None else rounding_seeds


def aligned(t: Tensor) -> bool:
    return t.data_ptr() % ALIGNMENT == 0


def stacked_scratch(batch: int, rows: int, cols: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Tensor:  # (B, rows, cols)
    """Scratch whose slices each start 16-byte aligned (each slice contiguous; the batch stride is
    rounded up to 16 bytes)."""
    per, granule = rows * cols, ALIGNMENT // _element_size(dtype)
    padded = -(-per // granule) * granule
    # as_strided, not view: a view of a batch of one would take the unpadded size as its batch stride
    return torch.empty((batch, padded), dtype=dtype, device=device).as_strided((batch, rows, cols), (padded, cols, 1))


def partials_scratch(batch: int, splits: int, rows: int, cols: int, device: torch.device) -> Tensor:  # (B, S, rows, cols)
    """float32 scratch for the partial products of a split reduction: each (b, s) slice contiguous and
    64-byte aligned, the split stride a multiple of 16 elements (which Triton's launch specialises as
    16-divisible, so the summing kernel keeps its vector loads)."""
    per = -(-rows * cols // 16) * 16
    return torch.empty((batch, splits, per), dtype=torch.float32, device=device).as_strided(
        (batch, splits, rows, cols), (splits * per, per, cols, 1))


def transposed_stack(matrices: Sequence[Tensor] | Tensor) -> Tensor:  # B x (a, b) -> (B, b, a)
    """The transposes of a bucket's matrices (a list, or a stacked (B, a, b) tensor), contiguous in
    stacked_scratch (each slice 16-byte aligned): one launch for a stacked tensor, two for a list
    (stacked first, a temporary of the bucket's size), whatever B is."""
    stacked = matrices if isinstance(matrices, Tensor) else torch.stack(list(matrices))
    out = stacked_scratch(stacked.shape[0], stacked.shape[2], stacked.shape[1], stacked.device, stacked.dtype)
    out.copy_(stacked.transpose(1, 2))
    return out


def check_stacked(name: str, t: Tensor, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
    """A stacked scratch as stacked_scratch makes it (a contiguous tensor of 16-byte slices qualifies)."""
    if (tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.stride(-1) != 1 or t.stride(-2) != shape[-1]
            or (t.stride(0) * t.element_size()) % ALIGNMENT or not aligned(t)):
        raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)} with contiguous, 16-byte aligned slices "
                         f"(see utils.stacked_scratch), got {t.dtype} {tuple(t.shape)} strides {t.stride()}.")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_bucket(name: str, tensors: Sequence[Tensor], shape: tuple, dtype: torch.dtype | None = None) -> None:
    """Every tensor of a bucket must share shape (and dtype), be contiguous, 16-byte aligned and sit
    on one device."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; the bucket needs {tuple(shape)}.")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name}[{i}] is {t.dtype}; the bucket needs {dtype}.")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}; the bucket is on {device}.")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; the Triton step needs contiguous tensors "
                             "(pass .contiguous() tensors, or use backend='reference').")
        if not aligned(t):
            raise ValueError(f"{name}[{i}] starts at an address that is not {ALIGNMENT}-byte aligned (a view into "
                             "another tensor?); pass .clone() tensors, or use backend='reference'.")


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
