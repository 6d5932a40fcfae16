"""Data-parallel plumbing: torchrun's environment in, DDP or FSDP2 (gloo on CPU, nccl on GPU) out.

Every collective the trainer needs is a sum of a few numbers; each helper is a no-op in a single
process, so the training loop reads the same either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_environment() -> DistInfo:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device, timeout_minutes: Optional[float] = None) -> None:
    """The process group (nccl on CUDA, gloo on the CPU). ``timeout_minutes`` bounds how long a rank
    waits in a collective; None keeps torch's default."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
        dist.init_process_group(backend=backend, **timeout)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (float64 for exact token counts)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank_failed(failure: Optional[BaseException], info: DistInfo, device: torch.device) -> bool:
    """Whether ``failure`` is set on any rank (every rank must call it: one all-reduce)."""
    (failed,) = all_sum([0.0 if failure is None else 1.0], info, device)
    return failed > 0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo):
    """Every rank's ``obj`` in rank order on rank 0 (None on the others); ``[obj]`` in one process."""
    if not info.enabled:
        return [obj]
    box = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------ FSDP2
def shard_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> None:
    """FSDP2 in place: ``fully_shard`` on each transformer block, then on the root (embeddings, final
    norm, head), over one mesh of all ranks. Each parameter becomes a DTensor holding this rank's
    rows (``Shard(0)``); a block's parameters are gathered for its forward and backward only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (info.world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a transformers model says must not be split (``_no_split_modules``: its decoder
    layers); without that attribute, the entries of its largest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def full_model_state(model: torch.nn.Module) -> tuple[dict, Optional[BaseException]]:
    """The sharded model's whole state dict on rank 0, in CPU memory (empty on the other ranks), and
    rank 0's failure to hold it. A collective: one gather per tensor, and every rank takes part in
    each one even after rank 0 failed (say, out of CPU memory), so no rank is left waiting in a
    gather another skipped."""
    # A tied weight is one parameter under several names; keep the first, as an unsharded model's
    # save_pretrained does.
    first_names = {name for name, _ in model.named_parameters()}
    tied_aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names
    keep = dist.get_rank() == 0
    state: dict = {}
    failure: Optional[BaseException] = None
    for name, value in model.state_dict().items():
        if name in tied_aliases:
            continue
        whole = value.full_tensor() if hasattr(value, "full_tensor") else value  # the gather
        if keep and failure is None:
            try:
                state[name] = whole.detach().to("cpu", copy=True)
            except Exception as err:  # noqa: BLE001
                failure, state = err, {}
        del whole
    return state, failure


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter names, each rank's rows as DTensors (no copy)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def save_sharded_optimizer(state: dict, folder) -> None:
    """Every rank writes its rows of :func:`optimizer_state` into ``folder`` (torch.distributed.checkpoint:
    one file per rank, replicated tensors once); a collective, whose failure on any rank is raised on
    every rank as a CheckpointError. Rank 0 then checks that it sees every rank's file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .checkpoint import CheckpointError

    try:
        dcp.save({"optimizer": state}, checkpoint_id=str(folder))
    except CheckpointException as err:  # a BaseException: it would pass an `except Exception` by
        raise CheckpointError(f"writing the sharded optimizer state into {folder} failed: {_failures(err)}") from err
    if dist.get_rank() == 0:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
        missing = sorted({info.relative_path for info in metadata.storage_data.values()}
                         - {p.name for p in Path(folder).iterdir()})
        if missing:
            raise CheckpointError(
                f"the other ranks' optimizer shards {missing} are not in {folder} as rank 0 sees it: output_dir "
                "must be on a file system that every rank sees (shared or network storage across nodes)")


def load_sharded_optimizer(model: torch.nn.Module, optimizer, folder, info: DistInfo, device: torch.device) -> None:
    """What :func:`save_sharded_optimizer` wrote, into ``optimizer``; a collective. A failure on any
    rank is raised on every rank, after the same collectives, as a CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = Path(folder)
    fix = "resume from an earlier step-<N> folder (--resume <path>) or start a new run in another output_dir"
    # The template has this run's shapes and placements (torch fills it by a zero-gradient step at
    # lr 0, a collective for sharded GaLore); each rank reads the rows it holds now.
    template = optimizer_state(model, optimizer)
    failure, stateless = None, []
    try:
        if not (folder / ".metadata").is_file():
            raise FileNotFoundError(f"{folder} is missing, so the checkpoint was not written by a "
                                    "training.distributed: fsdp2 run")
        saved_keys = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
        # Parameters that had no gradient before the save had no state: they get none now either
        # (the optimizer's load_state_dict drops the template's).
        stateless = [n for n in template["state"] if not any(k.startswith(f"optimizer.state.{n}.") for k in saved_keys)]
        for name in stateless:
            del template["state"][name]
    except Exception as err:  # noqa: BLE001
        failure = err
    _agree(failure, info, device, f"cannot resume from {folder.parent}: its sharded optimizer state is unreadable", fix)
    try:
        dcp.load({"optimizer": template}, checkpoint_id=str(folder))
        set_optimizer_state_dict(model, optimizer, template, options=StateDictOptions(strict=not stateless))
    except CheckpointException as err:  # raised on every rank alike
        failure = RuntimeError(_failures(err))
    except Exception as err:  # noqa: BLE001
        failure = err
    _agree(failure, info, device, f"cannot load the sharded optimizer state in {folder}", fix)


def _agree(failure: Optional[BaseException], info: DistInfo, device: torch.device, what: str, fix: str) -> None:
    """Raises CheckpointError on every rank when ``failure`` is set on any."""
    from .checkpoint import CheckpointError

    if any_rank_failed(failure, info, device):
        cause = f"{type(failure).__name__}: {failure}" if failure is not None else "another rank failed"
        raise CheckpointError(f"{what} ({cause}); {fix}.") from failure


def _failures(err) -> str:
    """Each rank's exception in a torch.distributed.checkpoint CheckpointException."""
    failures = getattr(err, "failures", None) or {}
    causes = {rank: pair[0] if isinstance(pair, tuple) else pair for rank, pair in failures.items()}
    return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in sorted(causes.items())) or str(err)
