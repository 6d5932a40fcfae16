"""The Triton GEMMs' TMA operand loads on a GPU (skipped without one): parity at realistic shapes
and CUDA-graph replay (the descriptors' scratch comes from torch's allocator, during capture from the
graph's pool). A file and a gpu_check stage of its own, so that a fault of this path, not yet run on a
GPU when written, cannot take the other GPU tests with it.

The same path is checked on the CPU through Triton's interpreter (tests/triton_interp) and compiled
for sm_90 ahead of time (tests/test_triton_compile.py).
"""
import copy

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW
from test_triton_gpu import (SHAPES, TF32_TOL, _restore_float32_precision, assert_graph_replay_equals_eager,  # noqa: F401
                             float32_step_errors, run_bucket_cuda, to_cpu)
from triton_parity import (CONTROL_FACTOR, MOMENT_TOL, UPDATE_TOL, bucket_step64, bucket_step_torch, make_bucket,
                           record_tma_decisions, relative_error, update_error)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# The TMA operand path (GALORE_KERNELS_GEMM_CONFIG's sixth field; the sweep's candidates): 16-bit
# bases as the optimizer hands them; (1023, 2049) rank 100 has rows that are no 16-byte multiple in
# bf16 and falls back to pointer loads.
TMA_TILES = ["64,128,64,4,3,1", "128,128,64,8,3,1", "128,256,64,8,3,1"]


@pytest.mark.parametrize("tiles", TMA_TILES)
@pytest.mark.parametrize("shape, rank", SHAPES[:3])
def test_tma_operand_loads_match_float64(monkeypatch, tiles, shape, rank):
    decisions = record_tma_decisions(monkeypatch)
    monkeypatch.setenv("GALORE_KERNELS_GEMM_CONFIG", tiles)
    side = "left" if shape[0] < shape[1] else "right"
    b = make_bucket(shape, rank, side, torch.bfloat16, batch=2, steps_before=7, seed=rank + 11, device="cuda")
    b = type(b)(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, [p.bfloat16() for p in b.bases], b.steps_before, side)
    old = to_cpu(b)
    expected_w, expected_m, _ = bucket_step64(old, 0.1, 0.1)
    control = bucket_step_torch(make_bucket(shape, rank, side, torch.bfloat16, 2, 7, rank + 11, "cuda"), 0.1, 0.1)
    run_bucket_cuda(b, 0.1, 0.1)
    for i in range(2):
        err = update_error(b.params[i].cpu(), old.params[i], expected_w[i])
        control_err = update_error(control[i].cpu(), old.params[i], expected_w[i])
        assert err <= CONTROL_FACTOR * control_err + UPDATE_TOL[torch.bfloat16], (err, control_err)
        assert relative_error(b.exp_avgs[i].cpu(), expected_m[i]) <= MOMENT_TOL[torch.bfloat16]
    takes_tma = shape != (1023, 2049)  # rows of 2049 or 100 bf16 elements are no 16-byte multiples
    assert decisions and all(d == takes_tma for d in decisions), decisions


@pytest.mark.parametrize("shape, rank", SHAPES[:2])
def test_tma_operand_loads_with_tf32(monkeypatch, shape, rank):
    """float32 weights at torch's "high" precision: TF32 dots on TMA-loaded tiles, with the
    transposed copies of the thin operands (utils.k_major_operands)."""
    torch.set_float32_matmul_precision("high")
    decisions = record_tma_decisions(monkeypatch)
    monkeypatch.setenv("GALORE_KERNELS_GEMM_CONFIG", "64,128,32,4,3,1")
    errs, m_errs = float32_step_errors(shape, rank)
    assert max(errs) <= TF32_TOL and max(m_errs) <= TF32_TOL, (errs, m_errs)
    assert decisions and all(decisions), decisions  # 1024 and 2736 float32 rows, rank 256: 16-byte multiples


def test_graph_replay_with_tma_operand_loads_equals_eager(monkeypatch):
    """Device-side descriptors take their scratch from torch's allocator at each launch: under CUDA
    graph capture it comes from the graph's pool and the replays equal eager steps."""
    monkeypatch.setenv("GALORE_KERNELS_GEMM_CONFIG", TMA_TILES[1])
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().bfloat16()  # noqa: E731
    model_g = make()
    model_e = copy.deepcopy(model_g)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() == 2], "rank": 32, "update_proj_gap": 4},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.dim() != 2]}]
    opt_g = GaLoreAdamW(groups(model_g), lr=1e-3, backend="triton", seed=1, state_dtype="bfloat16")
    opt_e = GaLoreAdamW(groups(model_e), lr=1e-3, backend="triton", seed=1, state_dtype="bfloat16")
    assert_graph_replay_equals_eager(model_g, model_e, opt_g, opt_e, (64, 256), torch.bfloat16)
