"""training.distributed_timeout_minutes reaches the process group: a rank left waiting in a collective
that another rank never joins (it failed outside one) stops with an error after it, instead of
torch's default (gloo: 30 minutes). Two real gloo processes through galore_train.distributed."""
import subprocess
import sys
import time

from ranks import free_port

from .conftest import subprocess_env

WORKER = r"""
import os, sys, time
import torch
from galore_train import distributed
info = distributed.from_environment()
distributed.init(info, torch.device("cpu"), timeout_minutes=float(sys.argv[1]))
if info.rank == 1:  # never joins: the failed rank
    time.sleep(60)
    sys.exit(0)
start = time.monotonic()
try:
    distributed.all_sum([1.0], info, torch.device("cpu"))
except Exception as err:  # torch's timeout error (its class differs between versions)
    print(f"gave up after {time.monotonic() - start:.1f} s: {type(err).__name__}", flush=True)
    os._exit(3)  # not sys.exit: gloo's threads can abort the interpreter's teardown after a timeout
print("the collective returned", flush=True)
"""


def test_a_rank_waiting_for_a_failed_one_gives_up_after_the_timeout():
    port = free_port()
    ranks = []
    for rank in range(2):
        env = dict(subprocess_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, "-c", WORKER, "0.05"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    try:
        out, _ = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == 3, out[-2000:]
    waited = float(out.split("gave up after ")[1].split(" s")[0])
    assert 2.0 <= waited <= 30.0, out  # 3 s asked for; torch's default would be 30 minutes
    assert time.monotonic() - start < 120
