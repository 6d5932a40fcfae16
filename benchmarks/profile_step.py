"""Where one Triton step's device time goes, kernel by kernel (torch.profiler over graph replays).

    python benchmarks/profile_step.py            # on a GPU; prints a table per case

A tuning aid for the GPU sessions: bench_step.py says how far a step is from its floor, this says
which of project / adam / back_apply (and the small launches) takes the time.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, installed or not
from galore_kernels.triton_ops.step import galore_adamw_step_triton  # noqa: E402

CASES = [(4096, 4096, 512, torch.bfloat16, "highest"), (4096, 11008, 512, torch.bfloat16, "highest"),
         (11008, 4096, 512, torch.bfloat16, "highest"), (4096, 11008, 512, torch.float32, "high")]
HP = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, scale=0.25, correct_bias=True)


def case(m: int, n: int, r: int, dtype: torch.dtype, precision: str) -> None:
    torch.set_float32_matmul_precision(precision)
    side = "left" if m < n else "right"
    W = torch.randn(m, n, device="cuda").to(dtype)
    G = torch.randn(m, n, device="cuda").to(dtype)
    q = torch.linalg.qr(torch.randn(m if side == "left" else n, r, device="cuda"))[0]
    P = (q if side == "left" else q.T).contiguous()
    P = P if dtype == torch.float32 else P.to(dtype)  # what the optimizer passes for 16-bit weights
    low = (r, n) if side == "left" else (m, r)
    M, V = torch.randn(low, device="cuda"), torch.rand(low, device="cuda")
    steps, lr = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.full((1,), 1e-3, device="cuda")

    def step():
        galore_adamw_step_triton([W], [G], [M], [V], [P], steps, lr, side=side, **HP)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    print(f"\n=== {m}x{n} r{r} {str(dtype).split('.')[-1]} ({precision}), side {side}: per-kernel device time over 20 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    for args in CASES:
        case(*args)
