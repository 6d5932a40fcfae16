"""Per-tensor non-finite flags for a bucket, computed on the device.

The dense Adam phase updates each element independently, so unlike the projection (whose output
already carries any Inf/NaN of the whole gradient) it needs the flag before it starts: one read of
the gradients that sets ``nonfinite[b] = 1`` when tensor b holds an Inf or a NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import ELEMENTWISE_WARPS, FP_FUSION, TORCH_TO_TL, elementwise_block, load_pointer, pointer_table


@triton.jit
def _nonfinite_kernel(
    table,  # (B,) int64
    nonfinite_ptr,  # (B,) int32, zeroed by the launcher
    numel,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    batch = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptr = load_pointer(table, batch, DTYPE)
    x = tl.load(ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    tl.atomic_max(nonfinite_ptr + batch, tl.max(bad.to(tl.int32), axis=0))


def nonfinite_flags_triton(tensors: Sequence[Tensor]) -> Tensor:  # (B,) int32
    device, numel = tensors[0].device, tensors[0].numel()
    flags = torch.zeros(len(tensors), dtype=torch.int32, device=device)
    block = elementwise_block()
    grid = (triton.cdiv(numel, block), len(tensors))
    _nonfinite_kernel[grid](pointer_table(tensors, device), flags, numel,
                            DTYPE=TORCH_TO_TL[tensors[0].dtype], BLOCK=block, num_warps=ELEMENTWISE_WARPS,
                            enable_fp_fusion=FP_FUSION)
    return flags
