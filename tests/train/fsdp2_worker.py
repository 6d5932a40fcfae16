"""Scenarios of the trainer's FSDP2 plumbing on 2 gloo ranks, run by torch.distributed.run.

``fsdp2_worker.py failed_save CONFIG``: the trainer's CLI on CONFIG, with rank 1's optimizer shard
write failing for the checkpoint of step 4 (a full disk on one node). ``fsdp2_worker.py unshared_save
CONFIG``: the same with rank 1 writing its shards to a disk of its own. ``fsdp2_worker.py
unused_parameter``: a sharded optimizer state saved into $GALORE_FSDP2_FOLDER while one parameter
never had a gradient is resumed bitwise.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def failed_save(config: str) -> int:
    from torch.distributed.checkpoint import FileSystemWriter

    from galore_train.cli import main

    write_data = FileSystemWriter.write_data

    def full_disk_on_rank_1(self, plan, planner):
        if dist.get_rank() == 1 and ".tmp-step-4-" in str(self.path):
            raise OSError(28, "No space left on device (injected on rank 1)")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = full_disk_on_rank_1
    return main(["--config", config])


def unshared_save(config: str) -> int:
    """The trainer's CLI on CONFIG, with rank 1 writing its optimizer shards into a folder of its own
    (another node's disk: an output_dir that is not shared)."""
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemWriter

    from galore_train.cli import main

    write_data = FileSystemWriter.write_data

    def own_disk_on_rank_1(self, plan, planner):
        if dist.get_rank() == 1:
            self.path = Path(os.environ["GALORE_FSDP2_OTHER_DISK"]) / Path(self.path).parent.name / "optimizer"
            self.fs.mkdir(self.path)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = own_disk_on_rank_1
    return main(["--config", config])


def unused_parameter() -> int:
    from torch.distributed.fsdp import fully_shard

    from galore_kernels import GaLoreAdamW
    from galore_train.distributed import (
        from_environment,
        load_sharded_optimizer,
        optimizer_state,
        save_sharded_optimizer,
    )

    folder = os.environ["GALORE_FSDP2_FOLDER"]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    x = torch.randn(8, 24)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(24, 40), nn.Linear(24, 40)

        def forward(self, x):
            return self.used(x)

    def build(weights):
        model = Net()
        model.load_state_dict(weights)
        fully_shard(model)
        groups = [{"params": [model.used.weight, model.unused.weight], "rank": 4, "update_proj_gap": 2},
                  {"params": [model.used.bias, model.unused.bias]}]
        return model, GaLoreAdamW(groups, lr=1e-2, seed=0)

    def steps(model, opt, count):
        for _ in range(count):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    initial = Net().state_dict()
    model, opt = build(initial)
    steps(model, opt, 3)
    saved_weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    save_sharded_optimizer(optimizer_state(model, opt), folder)
    steps(model, opt, 3)
    resumed, resumed_opt = build(saved_weights)
    load_sharded_optimizer(resumed, resumed_opt, folder, from_environment(), torch.device("cpu"))
    assert resumed.unused.weight not in resumed_opt.state or not resumed_opt.state[resumed.unused.weight], \
        "a parameter without a gradient got state on resume"
    steps(resumed, resumed_opt, 3)
    for name, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), resumed.state_dict()[name].full_tensor()), name
    print(f"scenario unused_parameter: ok (rank {dist.get_rank()})")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1] in ("failed_save", "unshared_save"):
        sys.exit({"failed_save": failed_save, "unshared_save": unshared_save}[sys.argv[1]](sys.argv[2]))
    sys.exit(unused_parameter())
