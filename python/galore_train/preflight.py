"""Checks that fail early, before any training step and before anything is written, each with a fix.

Every check raises :class:`PreflightError` whose ``message`` names the config key to change and a value
that works; the CLI prints it and exits with status 2. The checks that need no model run first
(:func:`check_output_dir`, :func:`check_bitsandbytes`, :func:`check_combination`); the others run once
the model, the routing table or the data exist.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import Config
from .modeling import is_quantized_module

__all__ = [
    "DeviceError",
    "PreflightError",
    "check_bitsandbytes",
    "check_combination",
    "check_dataset",
    "check_output_dir",
    "check_quantized_model",
    "check_ranks",
    "check_seq_len",
]

BNB_INSTALL = "`pip install bitsandbytes>=0.45 accelerate`"


class PreflightError(Exception):
    """A problem found before training; ``message`` says what to change."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class DeviceError(PreflightError, ValueError):
    """``training.device`` names a device this machine does not have (raised by ``resolve_device``)."""


# ------------------------------------------------------------------------------ output folder
def check_fresh_start(path: Union[str, Path], resume: Optional[str], overwrite: bool) -> None:
    """A run that does not resume must not share output_dir with an earlier run's checkpoints: its
    own would be pruned as the older ones, and a later --resume would pick the earlier run's."""
    from .checkpoint import list_checkpoints

    if resume is not None or overwrite:
        return
    found = list_checkpoints(Path(os.path.expanduser(str(path))))
    if found:
        raise PreflightError(
            f"output_dir = {str(path)!r} holds checkpoints of an earlier run (newest: {found[-1][1].name}): continue "
            "it with --resume, set another output_dir, or pass --overwrite to delete its checkpoints and start over"
        )


def check_output_dir(path: Union[str, Path]) -> None:
    """``path`` can be created or written: it is not a file, and it (or its nearest existing ancestor)
    is a writable folder on a writable file system. Writes nothing."""
    path = Path(os.path.expanduser(str(path)))
    fix = "set output_dir to a folder you can write (e.g. runs/my_run)"
    if path.exists() and not path.is_dir():
        raise PreflightError(f"output_dir = {str(path)!r} is a file, not a folder; remove it or {fix}")
    existing = path.absolute()
    while not existing.exists():
        parent = existing.parent
        if parent == existing:
            break
        existing = parent
    if not existing.is_dir():
        raise PreflightError(
            f"output_dir = {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder; {fix}"
        )
    where = "" if existing == path.absolute() else f" (its nearest existing folder {str(existing)!r})"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"output_dir = {str(path)!r} is not writable{where}: permission denied; {fix}")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise PreflightError(f"output_dir = {str(path)!r} is on a read-only file system{where}; {fix}")


# ------------------------------------------------------------------------------- bitsandbytes
def _importable(name: str) -> Optional[str]:
    """None when ``name`` imports, else why not."""
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - a broken install fails in many ways
        return f"{type(err).__name__}: {err}"
    return None


def check_bitsandbytes(config: Config) -> None:
    """bitsandbytes (and accelerate, for 8-bit loading) importable when quantization or adamw8bit asks for it."""
    quant, eight_bit_opt = config.quantization.enabled, config.optimizer.type == "adamw8bit"
    if not (quant or eight_bit_opt):
        return
    needed = ["bitsandbytes"] + (["accelerate"] if quant else [])
    who = " and ".join(
        w for w, on in (("quantization.enabled: true", quant), ("optimizer.type: adamw8bit", eight_bit_opt)) if on
    )
    for name in needed:
        why = _importable(name)
        if why is not None:
            alternatives = []
            if quant:
                alternatives.append("quantization.enabled: false")
            if eight_bit_opt:
                alternatives.append("optimizer.type: adamw (or galore)")
            raise PreflightError(
                f"{who} needs {name}, which cannot be imported ({why}); {BNB_INSTALL}, or set "
                f"{' and '.join(alternatives)}"
            )


# -------------------------------------------------------------------------------- combinations
def check_combination(config: Config, *, world_size: int, device) -> None:
    """Refuses the setting combinations that would crash (or silently misbehave) later."""
    t, o, q = config.training, config.optimizer, config.quantization
    device = torch.device(device)
    if t.distributed == "fsdp2":
        check_fsdp2(config, world_size)
    if o.type == "galore_layerwise" and world_size > 1:
        raise PreflightError(
            f"optimizer.type: galore_layerwise cannot run with {world_size} processes: its hooks update each weight "
            "as soon as its gradient is ready, before DDP reduces gradients across processes, so the replicas would "
            "diverge; set optimizer.type: galore (or run a single process)"
        )
    if o.type == "galore_layerwise" and t.precision == "fp16-mixed":
        raise PreflightError(
            "optimizer.type: galore_layerwise cannot use training.precision: fp16-mixed: the hooks step each weight "
            "inside backward, before the loss scaler can unscale gradients or skip an overflowing step; set "
            "training.precision: bf16-mixed (or fp32), or optimizer.type: galore"
        )
    if t.precision == "fp16-mixed" and device.type != "cuda":
        raise PreflightError(
            f"training.precision: fp16-mixed needs a CUDA device (fp16 autocast with loss scaling), but the device is "
            f"{device}; set training.precision: bf16-mixed (works on CPU) or fp32"
        )
    if t.precision in ("bf16-mixed", "bf16") and device.type == "cuda":
        try:
            supported = torch.cuda.is_bf16_supported()
        except Exception:  # noqa: BLE001
            supported = True
        if not supported:
            raise PreflightError(
                f"training.precision: {t.precision} needs a GPU with bfloat16 support and {device} has none; set "
                "training.precision: fp16-mixed or fp32"
            )
    if q.enabled and not q.load_in_8bit:
        raise PreflightError(
            "quantization.load_in_8bit: false asks for 4-bit loading, which this trainer does not support yet; set "
            "quantization.load_in_8bit: true (int8 base weights) or quantization.enabled: false"
        )
    if q.enabled and t.precision == "bf16":
        raise PreflightError(
            "quantization.enabled: true cannot use training.precision: bf16: the int8 layers compute in fp16/fp32 and "
            "their float parts are kept in float32; set training.precision: bf16-mixed (or fp32)"
        )
    if o.type == "adamw8bit":
        why = _adamw8bit_step_failure(device)
        if why is not None:
            raise PreflightError(
                f"optimizer.type: adamw8bit cannot step on {device} with this bitsandbytes ({why}); set "
                "optimizer.type: adamw (or galore), or run on a CUDA device"
            )


def check_fsdp2(config: Config, world_size: int) -> None:
    """training.distributed: fsdp2 shards the model across torchrun's processes; what cannot be sharded."""
    t, o, q = config.training, config.optimizer, config.quantization
    why = None
    if world_size < 2:
        why = ("it shards the model across processes and this is one process; launch with "
               "`torchrun --nproc_per_node N -m galore_train ...` (N >= 2), or set training.distributed: ddp")
    elif q.enabled:
        why = ("FSDP2 cannot shard bitsandbytes' int8 weights; set quantization.enabled: false (the float model is "
               "sharded instead), or training.distributed: ddp")
    elif o.type == "galore_layerwise":
        why = ("layer-wise hooks step each weight inside backward, before FSDP2 reduce-scatters its gradient; set "
               "optimizer.type: galore (sharded GaLore steps each rank's rows), or training.distributed: ddp")
    elif o.type == "adamw8bit":
        why = ("bitsandbytes' AdamW8bit cannot step sharded (DTensor) parameters; set optimizer.type: adamw or "
               "galore, or training.distributed: ddp")
    elif t.precision == "fp16-mixed":
        why = ("the loss scaler does not unscale sharded gradients here; set training.precision: bf16-mixed "
               "(no scaler needed), or training.distributed: ddp")
    if why is not None:
        raise PreflightError(f"training.distributed: fsdp2 cannot run: {why}")


def _adamw8bit_step_failure(device: torch.device) -> Optional[str]:
    """None when a bitsandbytes AdamW8bit step (8-bit state) works on ``device``, else why not."""
    try:
        import bitsandbytes as bnb

        param = nn.Parameter(torch.ones(4, 4, device=device))
        param.grad = torch.full((4, 4), 0.1, device=device)
        # min_8bit_size=1: the tiny tensor gets the 8-bit state real weights would get.
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3, min_8bit_size=1)
        optimizer.step()
        if not torch.isfinite(param.detach()).all():
            return "the test step produced non-finite values"
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


# ------------------------------------------------------------------------------ quantized model
def check_quantized_model(model: nn.Module) -> None:
    """With quantization on: the model has quantized layers, and every int8 layer is complete."""
    found = 0
    for name, module in model.named_modules():
        if not is_quantized_module(module):
            continue
        found += 1
        problem = _int8_problem(module)
        if problem is not None:
            raise PreflightError(
                f"the int8 layer {name} ({type(module).__name__}) is broken: {problem}. Quantization happens when the "
                "model is loaded; reload it from its float weights with quantization.enabled: true (a folder saved "
                "from a quantized model may be incomplete), or set quantization.enabled: false"
            )
    if found == 0:
        raise PreflightError(
            "quantization.enabled: true but the model has no quantized layer (no bitsandbytes Linear8bitLt), so it "
            "would train in full precision; check that bitsandbytes and accelerate work here "
            f"({BNB_INSTALL}), or set quantization.enabled: false"
        )


def _int8_problem(module: nn.Module) -> Optional[str]:
    weight = getattr(module, "weight", None)
    cls = type(module).__name__
    is_8bit = "8bit" in cls.lower() or type(weight).__name__ == "Int8Params" or hasattr(weight, "SCB")
    if not is_8bit:
        if "4bit" in cls.lower() or hasattr(weight, "quant_state"):
            return "it is a 4-bit layer, which this trainer does not support (quantization.load_in_8bit: true loads int8)"
        return None
    if not isinstance(weight, torch.Tensor):
        return "it has no weight tensor"
    if weight.dtype != torch.int8:
        return (f"its weight is {str(weight.dtype).replace('torch.', '')}, not int8: it was never quantized "
                "(bitsandbytes quantizes when the layer is moved to its device)")
    scb = getattr(weight, "SCB", None)
    if scb is None:
        state = getattr(module, "state", None)
        scb = getattr(state, "SCB", None)
    if scb is None:
        return "its row scales (weight.SCB) are missing"
    out_features = getattr(module, "out_features", weight.shape[0])
    if not isinstance(scb, torch.Tensor) or scb.dim() != 1 or scb.numel() != out_features:
        shape = tuple(scb.shape) if isinstance(scb, torch.Tensor) else type(scb).__name__
        return f"its row scales (weight.SCB) have shape {shape}, expected ({out_features},) (one per output feature)"
    if not torch.isfinite(scb).all():
        return "its row scales (weight.SCB) contain NaN or infinite values"
    return None


# ------------------------------------------------------------------------------------- ranks
def check_ranks(model: nn.Module, routing, config: Config) -> None:
    """``optimizer.rank`` fits every GaLore weight: 1 <= rank <= min(rows, cols).

    A rank above min(m, n) for some weights is refused (not clamped) with the offending weights and the
    largest rank valid for all of them: an explicit fix beats a silent per-weight clamp.
    """
    rank = config.optimizer.rank
    galore = [r for r in routing.routes if r.decision == "galore"]
    if routing.optimizer_type not in ("galore", "galore_layerwise") or not galore:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PreflightError(f"optimizer.rank = {rank!r} must be an integer >= 1; e.g. optimizer.rank: 32")
    offending = [r for r in galore if len(r.shape) == 2 and rank > min(r.shape)]
    if not offending:
        return
    largest = min(min(r.shape) for r in galore if len(r.shape) == 2)
    names = _compact_names(offending)
    raise PreflightError(
        f"optimizer.rank = {rank} is larger than min(rows, cols) of {len(offending)} of the {len(galore)} GaLore "
        f"weight(s): {names}. The largest rank valid for every GaLore weight is {largest}: set optimizer.rank: "
        f"{largest} (or lower), or narrow optimizer.target_modules to leave the small weights to AdamW"
    )


def _compact_names(routes, limit: int = 6) -> str:
    from .routing import _grouped

    items = [f"{name} ({'x'.join(map(str, r.shape))}{', x' + str(n) if n > 1 else ''})"
             for name, n, r in _grouped(list(routes))]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------------- dataset
def check_dataset(n_train_examples: int, n_eval_examples: int, n_dropped: int, path_desc: str) -> None:
    """Training and evaluation sets are non-empty after tokenization and truncation."""
    dropped = (f" ({n_dropped} example(s) were dropped: empty, or with no target token left within "
               "training.max_seq_len)") if n_dropped else ""
    if n_train_examples <= 0:
        raise PreflightError(
            f"no training examples left in {path_desc} after tokenization{dropped}; check that data.train_file holds "
            "records (text, instruction/output or messages) and raise training.max_seq_len if prompts are long"
        )
    if n_eval_examples <= 0:
        raise PreflightError(
            f"no evaluation examples left in {path_desc} after tokenization{dropped}; set data.eval_file to a file "
            "with examples, or raise data.eval_fraction (or add records) so that at least one is held out"
        )


# ------------------------------------------------------------------------------- sequence len
def check_seq_len(model: nn.Module, config: Config) -> None:
    """``training.max_seq_len`` fits the model's position range (``max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    seq = config.training.max_seq_len
    if seq <= limit:
        return
    fix = f"set training.max_seq_len: {limit} (or lower)"
    if config.model.name_or_path is None:
        fix += f", or raise model.architecture.max_position_embeddings to {seq} or more"
    raise PreflightError(
        f"training.max_seq_len = {seq} exceeds the model's max_position_embeddings = {limit}; {fix}"
    )
