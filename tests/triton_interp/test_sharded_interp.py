"""backend="triton" on FSDP2-sharded parameters: each rank's rows through the kernels (run by the
interpreter, which this suite's TRITON_INTERPRET=1 passes on to the ranks), against the reference."""
import pytest
import torch.distributed as dist
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_ranks_step_their_rows_with_the_kernels():
    run_ranks(2, "triton")
