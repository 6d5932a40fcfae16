"""Atomic, verifiable, resumable training checkpoints.

Layout::

    <output_dir>/checkpoints/step-<N>/
        model.safetensors (or shards + model.safetensors.index.json, config.json, ...)
        training_state.pt     torch.save of a dict: optimizer, scheduler, trainer position, RNG, config
        optimizer/            FSDP2 runs only: the optimizer state, sharded (torch.distributed.checkpoint)
        manifest.json         written last: every other file with its size and sha256

A checkpoint is written into ``checkpoints/.tmp-step-<N>-<pid>/``; every file and the folder are
fsynced, ``manifest.json`` is written last, and only then is the folder renamed to ``step-<N>``.
A crash before that rename leaves a ``.tmp-*`` folder that every reader ignores and that the next
save (or prune) removes. A checkpoint is *complete* when its manifest is present and every file it
lists has the listed size and sha256; resuming picks the newest complete one and warns about each
newer one it had to skip.

Names starting with a dot inside ``checkpoints/`` belong to this module:

- ``.tmp-step-<N>-<pid>``: a save in progress (or one that crashed),
- ``.old-step-<N>-<pid>``: the previous ``step-<N>`` while a re-save of the same step swaps it out,
- ``.trash-step-<N>-<pid>``: a checkpoint being deleted by ``prune_checkpoints``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import operator
import os
import random
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
MANIFEST_NAME = "manifest.json"
TRAINING_STATE_NAME = "training_state.pt"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SHARDED_OPTIMIZER_DIRNAME = "optimizer"  # FSDP2 runs: the optimizer state, one file per rank (torch.distributed.checkpoint)
FORMAT_VERSION = 1
RNG_FORMAT_VERSION = 1

_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_RE = re.compile(r"^\.(tmp|old|trash)-step-(\d+)-(\d+)$")
_HASH_CHUNK = 8 << 20

# Temporary folders this process is writing right now (another thread's save must not clean them up).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, is not complete, or cannot be loaded."""


class TrainingStopped(Exception):
    """SIGTERM ended the run after a step whose checkpoint was written: --resume continues it."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) or only partly restored."""


# ============================================================================================ RNG
def capture_rng_state() -> dict:
    """The state of every RNG a training step draws from, in a form ``torch.load(weights_only=True)``
    accepts (tensors, ints, floats, strings, lists, dicts, None).

    CUDA states are captured for every device (``torch.cuda.get_rng_state_all``) once CUDA is
    initialized; before that no CUDA generator has been used, so there is nothing to capture (and
    capturing would create a context on every visible GPU).
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "format_version": RNG_FORMAT_VERSION,
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Puts back what :func:`capture_rng_state` returned (also after a save/load round trip)."""
    if not isinstance(state, dict) or "python" not in state or "torch" not in state:
        raise CheckpointError("restore_rng_state: not an RNG state from capture_rng_state().")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npst = state.get("numpy")
    if npst is not None:
        keys = npst["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (npst["bit_generator"], keys.astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]),
             float(npst["cached_gaussian"]))
        )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = list(state.get("cuda") or [])
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        _warn(
            f"restore_rng_state: the checkpoint holds RNG states for {len(cuda_states)} CUDA device(s) "
            "but CUDA is not available here; they are not restored."
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        _warn(
            f"restore_rng_state: the checkpoint holds RNG states for {len(cuda_states)} CUDA device(s), "
            f"this process sees {count}; restoring the first {min(count, len(cuda_states))}."
        )
    for index, cuda_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(cuda_state.cpu(), device=index)


# =========================================================================================== save
def save_checkpoint(output_dir: PathLike, step: int, *, model, training_state: dict,
                    model_state: Optional[dict] = None) -> Path:
    """Writes ``output_dir/checkpoints/step-<step>/`` atomically and returns its path.

    ``training_state`` must hold only what ``torch.load(weights_only=True)`` reads back: tensors,
    numbers, strings, bools, None, lists, tuples, dicts (also torch.Size/dtype/device). It is checked
    before anything is written, so a bad value fails the save instead of the later resume.
    ``model_state``: the weights to write instead of ``model``'s own (FSDP2's gathered full state
    dict; ``model`` then only names the format, through its ``save_pretrained``).
    """
    _check_training_state(training_state)
    tmp = begin_checkpoint(output_dir, step)
    return finish_checkpoint(tmp, model=model, training_state=training_state, model_state=model_state)


def begin_checkpoint(output_dir: PathLike, step: int) -> Path:
    """The empty temporary folder of step ``step``'s checkpoint, for :func:`finish_checkpoint` (or
    :func:`abandon_checkpoint`). Other processes may write into it in between (sharded optimizer
    state); the manifest then lists their files too."""
    step = _step_number(step)
    root = Path(output_dir) / CHECKPOINT_DIRNAME
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(root.parent)
    _cleanup_stale(root)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    with _ACTIVE_LOCK:
        if str(tmp) in _ACTIVE:
            raise CheckpointError(f"save_checkpoint: step {step} is already being saved by this process ({tmp}).")
        _ACTIVE.add(str(tmp))
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except BaseException:
        abandon_checkpoint(tmp)
        raise
    return tmp


def finish_checkpoint(tmp: Path, *, model, training_state: dict, model_state: Optional[dict] = None) -> Path:
    """Writes the model and ``training_state`` into ``tmp`` (from :func:`begin_checkpoint`), then the
    manifest of every file there, and renames it to ``step-<N>``; on an error ``tmp`` is removed."""
    match = _TEMP_RE.match(tmp.name)
    if match is None or match.group(1) != "tmp":
        raise CheckpointError(f"finish_checkpoint: {tmp} is not a folder from begin_checkpoint().")
    step = int(match.group(2))
    final = tmp.parent / f"step-{step}"
    try:
        _check_training_state(training_state)
        _save_model(model, tmp, model_state)
        with open(tmp / TRAINING_STATE_NAME, "wb") as f:
            torch.save(training_state, f)
            f.flush()
            os.fsync(f.fileno())
        files = _payload_files(tmp)
        if TRAINING_STATE_NAME not in files:
            raise CheckpointError(f"save_checkpoint: {TRAINING_STATE_NAME} missing after writing it in {tmp}.")
        for rel in files:
            _fsync_file(tmp / rel)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_unix": time.time(),
            "files": {rel: {"size": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)} for rel in files},
        }
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for folder in sorted({(tmp / rel).parent for rel in files} | {tmp}, key=lambda p: -len(p.parts)):
            _fsync_dir(folder)
        _publish(tmp, final, step)
    except BaseException:
        # An exception (not a crash) cleans up after itself; a crash leaves only the .tmp folder.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(str(tmp))
    return final


def abandon_checkpoint(tmp: Path) -> None:
    """Removes an unfinished checkpoint folder from :func:`begin_checkpoint`."""
    shutil.rmtree(tmp, ignore_errors=True)
    with _ACTIVE_LOCK:
        _ACTIVE.discard(str(tmp))


def _step_number(step) -> int:
    try:
        index = -1 if isinstance(step, bool) else operator.index(step)  # also numpy/torch integers
    except TypeError:
        index = -1
    if index < 0:
        raise CheckpointError(f"save_checkpoint: step={step!r} must be an integer >= 0.")
    return index


def _check_training_state(training_state) -> None:
    if not isinstance(training_state, dict):
        raise CheckpointError(f"save_checkpoint: training_state must be a dict, got {type(training_state).__name__}.")
    _check_weights_only_safe(training_state, "training_state")


def _publish(tmp: Path, final: Path, step: int) -> None:
    """Moves the finished temporary folder to ``final``; an existing ``final`` is swapped out first
    and deleted only once the new one is in place."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(root)
        return
    old = root / f".old-step-{step}-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        try:
            os.rename(old, final)  # put the previous checkpoint back
        except OSError:
            logger.error("checkpoint: could not move %s back to %s; it is kept under the old name", old, final)
        raise
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _save_model(model, folder: Path, state_dict: Optional[dict] = None) -> None:
    model = _unwrap(model)
    save_pretrained = getattr(model, "save_pretrained", None)
    if state_dict is not None:
        if not (callable(save_pretrained) and _accepts_kwarg(save_pretrained, "state_dict")):
            raise CheckpointError(
                f"save_checkpoint: a model_state needs a model whose save_pretrained() takes a state_dict "
                f"(a transformers model); {type(model).__name__} has none.")
        save_pretrained(str(folder), state_dict=state_dict)
        return
    if callable(save_pretrained):
        if _accepts_kwarg(save_pretrained, "safe_serialization"):
            save_pretrained(str(folder), safe_serialization=True)
        else:
            save_pretrained(str(folder))
        return
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(
            f"save_checkpoint: model of type {type(model).__name__} has no save_pretrained() and is not an "
            "nn.Module; cannot save its weights."
        )
    from safetensors.torch import save_model

    # save_model drops the duplicate names of tied/shared tensors (load_model_weights restores them).
    save_model(model, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})


def _accepts_kwarg(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    # Only a named parameter: transformers 5 has no safe_serialization (always safetensors) and would
    # pass an unknown keyword on to its hub upload arguments.
    return any(p.name == name and p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)


def _unwrap(model):
    """The module whose state_dict has the plain parameter names (no DDP ``module.`` or
    torch.compile ``_orig_mod.`` prefixes)."""
    for _ in range(8):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DataParallel",
            "DistributedDataParallel",
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


# Exact types: subclasses such as numpy.float64 (a float) do not load with weights_only=True.
_SAFE_PRIMITIVES = (int, float, bool, str, bytes, complex, type(None))
_SAFE_TORCH = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj, where: str) -> None:
    if type(obj) in _SAFE_PRIMITIVES or isinstance(obj, _SAFE_TORCH):
        return
    if isinstance(obj, dict):  # also OrderedDict
        for key, value in obj.items():
            if type(key) not in _SAFE_PRIMITIVES:
                raise CheckpointError(
                    f"save_checkpoint: {where} has a key of type {type(key).__name__} ({key!r}); "
                    "training_state keys must be str/int/float/bool/None."
                )
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"save_checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot read back. Store only tensors, numbers, strings, bools, "
        "None, lists, tuples and dicts (convert numpy values with .item()/.tolist() or torch.from_numpy)."
    )


# ========================================================================================= verify
def checkpoint_is_complete(path: PathLike, *, verify_checksums: bool = True) -> tuple[bool, str]:
    """(True, "ok") when ``path`` has a manifest and every file it lists has the listed size and
    sha256; otherwise (False, why). ``verify_checksums=False`` checks presence and sizes only."""
    path = Path(path)
    if not path.exists():
        return False, f"{path} does not exist"
    if not path.is_dir():
        return False, f"{path} is not a directory"
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return False, f"{MANIFEST_NAME} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"{MANIFEST_NAME} is unreadable ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return False, f"{MANIFEST_NAME} has no 'files' table"
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return False, f"{MANIFEST_NAME} has format_version {version!r}; this code reads up to {FORMAT_VERSION}"
    match = _STEP_RE.match(path.name)
    if match and manifest.get("step") != int(match.group(1)):
        return False, f"{MANIFEST_NAME} says step {manifest.get('step')!r} but the folder is {path.name}"
    files = manifest["files"]
    if TRAINING_STATE_NAME not in files:
        return False, f"{MANIFEST_NAME} does not list {TRAINING_STATE_NAME}"
    for rel, entry in sorted(files.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return False, f"{MANIFEST_NAME} lists an unsafe path {rel!r}"
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            return False, f"{MANIFEST_NAME} entry for {rel} lacks size/sha256"
        file = path / rel
        if not file.is_file():
            return False, f"{rel} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return False, f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if verify_checksums:
            digest = _sha256(file)
            if digest != entry["sha256"]:
                return False, f"{rel} fails its sha256 check (corrupt): {digest[:12]}... != {str(entry['sha256'])[:12]}..."
    return True, "ok"


def list_checkpoints(output_dir: PathLike) -> list[tuple[int, Path]]:
    """Every ``step-<N>`` folder under ``output_dir/checkpoints``, complete or not, sorted by step;
    ``.tmp-*`` folders are ignored. A step whose ``step-<N>`` vanished while a re-save of it was
    swapping folders (a crash between the two renames) is listed by its ``.old-step-<N>-*`` folder."""
    root = Path(output_dir) / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    orphans: dict[int, Path] = {}
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        match = _STEP_RE.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
            continue
        match = _TEMP_RE.match(entry.name)
        if match and match.group(1) == "old":
            step = int(match.group(2))
            if step not in orphans or entry.stat().st_mtime > orphans[step].stat().st_mtime:
                orphans[step] = entry
    for step, entry in orphans.items():
        found.setdefault(step, entry)
    return sorted(found.items())


def find_resume_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint, or None when there is none. Every newer checkpoint that is
    incomplete or corrupt is skipped with a warning that names it and says why."""
    skipped: list[tuple[Path, str]] = []
    chosen: Optional[Path] = None
    for _, path in reversed(list_checkpoints(output_dir)):
        ok, reason = checkpoint_is_complete(path)
        if ok:
            chosen = path
            break
        skipped.append((path, reason))
    target = f"falling back to {_step_name(chosen)} ({chosen})" if chosen else "no complete checkpoint is left to fall back to"
    for path, reason in skipped:
        _warn(f"checkpoint {path} is incomplete or corrupt: {reason}; {target}.")
    return chosen


def resolve_resume(arg: Optional[str], output_dir: PathLike) -> Optional[Path]:
    """``None`` -> None; ``"auto"`` -> :func:`find_resume_checkpoint` (None on a fresh run); any
    other string -> that checkpoint folder, which must be complete (else :class:`CheckpointError`)."""
    if arg is None:
        return None
    if isinstance(arg, str) and arg.strip().lower() == "auto":
        return find_resume_checkpoint(output_dir)
    if isinstance(arg, str) and not arg.strip():
        raise CheckpointError("resume: empty checkpoint path (pass a step-<N> folder, 'auto', or nothing).")
    path = Path(arg).expanduser()
    ok, reason = checkpoint_is_complete(path)
    if not ok:
        hint = ""
        if path.is_dir() and ((path / CHECKPOINT_DIRNAME).is_dir() or any(_STEP_RE.match(p.name) for p in path.iterdir())):
            hint = (" It looks like an output or checkpoints folder: pass one of its step-<N> folders, or "
                    "'auto' with that output directory.")
        raise CheckpointError(f"cannot resume from {path}: {reason}.{hint}")
    return path


def _step_name(path: Path) -> str:
    match = _TEMP_RE.match(path.name)
    return f"step-{match.group(2)}" if match else path.name


# =========================================================================================== load
def load_training_state(path: PathLike) -> dict:
    """``training_state.pt`` of the checkpoint folder ``path`` (or that file itself), loaded with
    ``weights_only=True`` onto the CPU (optimizer/scheduler ``load_state_dict`` move it to the
    parameters' devices)."""
    path = Path(path)
    file = path / TRAINING_STATE_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt pickle, or an unsafe type
        raise CheckpointError(f"cannot load {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a dict (got {type(state).__name__}).")
    return state


def load_model_weights(path: PathLike, model) -> None:
    """Loads the checkpoint's safetensors weights into the already-built ``model`` (strict: every
    parameter/persistent buffer must be in the files, except names that share memory with a loaded
    one, e.g. tied embeddings; every tensor in the files must belong to the model)."""
    from safetensors.torch import load_file

    path = Path(path)
    module = _unwrap(model)
    if not isinstance(module, torch.nn.Module):
        raise CheckpointError(f"load_model_weights: {type(module).__name__} is not an nn.Module.")
    index_file = path / SAFETENSORS_INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {index_file}: {exc}") from exc
        shards = sorted(set(weight_map.values()))
    elif (path / SAFETENSORS_NAME).is_file():
        shards = [SAFETENSORS_NAME]
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"load_model_weights: no safetensors weights in {path}.")

    expected = module.state_dict()
    aliases = _alias_groups(expected)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise CheckpointError(f"load_model_weights: shard {file} is missing.")
        try:
            tensors = load_file(str(file), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc
        try:
            result = module.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when not strict
            raise CheckpointError(f"load_model_weights: {file} does not fit the model: {exc}") from exc
        unexpected.extend(result.unexpected_keys)
        loaded.update(k for k in tensors if k in expected)
        del tensors
    missing = [k for k in expected if k not in loaded and not (aliases.get(k, set()) & loaded)]
    if missing or unexpected:
        raise CheckpointError(
            f"load_model_weights: {path} does not match the model: "
            f"missing {len(missing)} {missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}."
        )


def _alias_groups(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """name -> the other names whose tensor is the same memory (tied weights)."""
    by_memory: dict[tuple, set[str]] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        by_memory.setdefault(key, set()).add(name)
    return {name: names - {name} for names in by_memory.values() for name in names}


# ========================================================================================== prune
def prune_checkpoints(output_dir: PathLike, keep_last: int) -> list[Path]:
    """Deletes every checkpoint except the newest ``keep_last`` complete ones (incomplete ones are
    deleted and never count as kept; the newest complete one is never deleted). ``keep_last <= 0``
    keeps all. Also removes stale ``.tmp-*`` folders of crashed saves. Returns what was removed."""
    root = Path(output_dir) / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return []
    removed = _cleanup_stale(root)
    if keep_last <= 0:
        return removed
    checkpoints = list_checkpoints(output_dir)
    keep: set[Path] = set()
    for _, path in reversed(checkpoints):
        if len(keep) >= keep_last:
            break
        # Manifest and sizes, not checksums: a complete save is caught by them, and re-hashing every
        # kept checkpoint at each save would read gigabytes for a large model (resume verifies sums).
        if checkpoint_is_complete(path, verify_checksums=False)[0]:
            keep.add(path)
    if not keep:
        if not checkpoints:
            return removed
        # Nothing complete: delete nothing, what is there may be all that is left to salvage.
        _warn(f"prune_checkpoints: no complete checkpoint under {root}; nothing pruned.")
        return removed
    for step, path in checkpoints:
        if path in keep:
            continue
        trash = root / f".trash-step-{step}-{os.getpid()}"
        try:
            os.rename(path, trash)  # out of sight first: an interrupted delete leaves no half checkpoint
        except OSError as exc:
            logger.warning("prune: could not remove %s: %s", path, exc)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    _fsync_dir(root)
    return removed


def _cleanup_stale(root: Path) -> list[Path]:
    """Removes leftovers of crashed saves/prunes of other (dead) processes and of earlier
    incarnations of this pid; an ``.old-step-<N>`` whose ``step-<N>`` is missing is moved back."""
    removed: list[Path] = []
    me = os.getpid()
    with _ACTIVE_LOCK:
        active = set(_ACTIVE)
    for entry in sorted(root.iterdir()):
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_dir() or str(entry) in active:
            continue
        kind, step, pid = match.group(1), int(match.group(2)), int(match.group(3))
        if pid != me and _pid_alive(pid):
            continue
        if kind == "old" and not (root / f"step-{step}").exists():
            try:
                os.rename(entry, root / f"step-{step}")
                logger.warning("checkpoint: restored %s from an interrupted re-save (%s)", root / f"step-{step}", entry.name)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


# ========================================================================================= helpers
def _payload_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, CheckpointWarning, stacklevel=3)
