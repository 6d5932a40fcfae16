"""FSDP2-sharded parameters on a GPU (nccl, one rank: the GPU machines have one GPU): the Triton
backend's kernels on a rank's rows against the reference optimizer, the row-split refresh against the
unsharded one on CUDA, and a bitwise resume through torch.distributed.checkpoint. Skipped without CUDA.
The scenarios are tests/sharded_worker.py's, which the CPU suite runs on 2-4 gloo ranks."""
import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_available() or not dist.is_nccl_available(),
                                reason="needs a CUDA GPU and nccl")


def test_one_gpu_rank_steps_refreshes_and_resumes():
    run_ranks(1, "triton", "refresh", "resume", "replicated", GALORE_SHARDED_DEVICE="cuda")
