"""GaLoreAdamW on FSDP2-sharded parameters (DTensor Shard(0)): CPU processes over gloo.

The scenarios live in ``sharded_worker.py`` and assert on every rank; each world size here is one
``torch.distributed.run`` on a free port, so a failure anywhere fails the test with the ranks' output.
The Triton backend's scenario runs in the interpreter suite (tests/triton_interp/test_sharded_interp.py).
"""
import re
from pathlib import Path

import pytest
import torch.distributed as dist
from ranks import run_ranks

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_ranks_train_resume_skip_refresh_round_and_refuse():
    """Left, right and full projections with uneven rows and a rank without rows; randomized and
    exact refreshes, the adaptive policy; replicas bitwise equal; bitwise resume through
    torch.distributed.checkpoint; a non-finite gradient on one rank skips everywhere; refreshes equal
    the unsharded ones, fallbacks included; replicated DTensors; stochastic rounding bits per shard;
    unsupported layouts are refused."""
    run_ranks(2, "training", "resume", "nonfinite", "refresh", "replicated", "rounding", "refusals")


def test_checkpoint_of_two_ranks_resumes_on_three(tmp_path):
    """torch.distributed.checkpoint reshards the optimizer's DTensor state: saved at 2 ranks, resumed at 3."""
    checkpoint = str(tmp_path / "checkpoint")
    run_ranks(2, "save", GALORE_SHARDED_CHECKPOINT=checkpoint)
    run_ranks(3, "resume_resharded", GALORE_SHARDED_CHECKPOINT=checkpoint)


def test_three_ranks_train_and_refresh():
    """Three-way sums, and two ranks without rows of the 1-row weight."""
    run_ranks(3, "training", "refresh")


def test_four_ranks_as_hsdp_train_refresh_skip_and_refuse():
    """HSDP: a 2 x 2 mesh, placements (Replicate(), Shard(0)); sums run over the shard dimension, and
    a NaN on one rank skips the parameter in both replicas."""
    run_ranks(4, "training", "refresh", "rounding", "nonfinite", "refusals")


def test_readme_fsdp2_example_runs_as_written(tmp_path):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "fully_shard" in b]
    assert len(blocks) == 1, "README has one FSDP2 example"
    script = tmp_path / "fsdp2_example.py"
    script.write_text(blocks[0])
    out = run_ranks(2, worker=script)
    # 256 x 64 projects on the right: each rank holds 128 rows of its rank-16 moments
    assert out.strip().splitlines()[-1] == "(Shard(dim=0),) torch.Size([128, 16])", out
