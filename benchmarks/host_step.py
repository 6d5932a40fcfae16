"""Host (Python) time of GaLoreAdamW's eager Triton step, the kernels not run: what the optimizer
itself adds to every step that is not replayed from a CUDA graph (GraphedStep).

    python benchmarks/host_step.py [rounds]       # any machine: no GPU needed

The 368M anchor model's parameter layout (24 layers: 168 projected weights and 51 rank-less tensors;
narrower matrices, which leave the host work unchanged), bf16, rank 32, no refresh in the timed steps.
Triton's interpreter makes the backend accept CPU tensors, and every kernel's launch is replaced by a
no-op, so the time is the optimizer's own: bucket decisions, checks, pointer tables, launch arguments.
Triton's launch binding (tens of microseconds a launch, 13 launches a step here) comes on top on a GPU.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors for the Triton backend
sys.path.insert(0, os.environ.get("GALORE_REPO", str(Path(__file__).resolve().parents[1])))  # the repository, installed or not

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from galore_kernels import GaLoreAdamW  # noqa: E402
from galore_kernels.triton_ops import adam, back_apply, nonfinite, project  # noqa: E402

LAUNCHES = {"count": 0}


def _no_launch(self, *args, grid, warmup, **kwargs):
    LAUNCHES["count"] += 1


def model_params():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=24, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    named = list(model.named_parameters())
    projected = [p for n, p in named if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    ids = {id(p) for p in projected}
    return projected, [p for _, p in named if id(p) not in ids]


def main(rounds: int) -> None:
    for kernel in (project._lowrank_project_kernel, adam._adam_kernel, back_apply._back_apply_kernel,
                   nonfinite._nonfinite_kernel):
        kernel.run = _no_launch.__get__(kernel, JITFunction)
    projected, rest = model_params()
    opt = GaLoreAdamW([{"params": rest}, {"params": projected, "rank": 32, "update_proj_gap": 10_000}], lr=1e-3,
                      backend="triton")
    for _ in range(3):  # the first refreshes every basis
        opt.step()
    LAUNCHES["count"] = 0
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    print(f"{len(projected)} projected + {len(rest)} rank-less tensors, {LAUNCHES['count'] / rounds:.0f} launches a step: "
          f"host time per eager step median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
          f"({rounds} steps, torch {torch.__version__}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
