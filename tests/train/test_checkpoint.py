import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from galore_train import checkpoint as ck
from galore_train.checkpoint import (
    CHECKPOINT_DIRNAME,
    CheckpointError,
    capture_rng_state,
    checkpoint_is_complete,
    find_resume_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)

PYTHON_DIR = Path(ck.__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scale", torch.tensor([2.0]))


def _state(step: int) -> dict:
    return {
        "optimizer": {"state": {0: {"exp_avg": torch.full((3, 2), float(step)), "step": step}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "scheduler": {"last_epoch": step, "_last_lr": [1e-3]},
        "trainer": {"step": step, "epoch": 0, "position": 17 * step, "loss": None},
        "rng": capture_rng_state(),
        "config": {"lr": 1e-3, "name": "tiny", "ranks": [1, 2]},
    }


def _save(tmp_path, step, model=None):
    return save_checkpoint(tmp_path, step, model=model or Tiny(), training_state=_state(step))


# ------------------------------------------------------------------------------ round trip
def test_round_trip_and_rng(tmp_path):
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached gauss_next in python's state
    model = Tiny()
    state = _state(5)
    path = save_checkpoint(tmp_path, 5, model=model, training_state=state)
    expected = (
        [random.random() for _ in range(5)], np.random.rand(5).tolist(), torch.rand(5), random.gauss(0, 1),
    )

    assert path == tmp_path / CHECKPOINT_DIRNAME / "step-5"
    assert checkpoint_is_complete(path) == (True, "ok")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["format_version"] == ck.FORMAT_VERSION
    assert set(manifest["files"]) == {"model.safetensors", "training_state.pt"}
    assert manifest["files"]["training_state.pt"]["size"] == (path / "training_state.pt").stat().st_size
    assert list_checkpoints(tmp_path) == [(5, path)]

    loaded = load_training_state(path)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["trainer"] == state["trainer"] and loaded["config"] == state["config"]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)

    # Scramble every RNG, then restore from the loaded (serialized) state.
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(loaded["rng"])
    got = ([random.random() for _ in range(5)], np.random.rand(5).tolist(), torch.rand(5), random.gauss(0, 1))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert got[3] == expected[3]

    other = Tiny()
    load_model_weights(path, other)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert other.head.weight is other.emb.weight


def test_training_state_must_be_weights_only_loadable(tmp_path):
    with pytest.raises(CheckpointError, match=r"training_state\['trainer'\]\['loss'\].*numpy"):
        save_checkpoint(tmp_path, 1, model=Tiny(), training_state={"trainer": {"loss": np.float64(1.0)}})
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / CHECKPOINT_DIRNAME).exists()  # validated before anything was written


def test_object_with_save_pretrained(tmp_path):
    calls = []

    class Saver:
        def save_pretrained(self, path):
            calls.append(path)
            Path(path, "weights.bin").write_bytes(b"abc")

    path = save_checkpoint(tmp_path, 3, model=Saver(), training_state={"x": 1})
    assert calls and checkpoint_is_complete(path)[0]
    assert "weights.bin" in json.loads((path / "manifest.json").read_text())["files"]


def test_files_other_processes_write_between_begin_and_finish_are_in_the_manifest(tmp_path):
    """FSDP2 checkpoints: rank 0 begins the folder, every rank writes its optimizer shard into it,
    rank 0 finishes it with the model passed as a state dict; a corrupted shard makes it incomplete."""
    calls = []

    class Saver:
        def save_pretrained(self, path, state_dict=None):
            calls.append(sorted(state_dict))
            Path(path, "model.safetensors").write_bytes(b"weights")

    tmp = ck.begin_checkpoint(tmp_path, 4)
    assert tmp.is_dir() and not list(tmp.iterdir()) and list_checkpoints(tmp_path) == []
    (tmp / "optimizer").mkdir()
    for rank in range(2):
        (tmp / "optimizer" / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 64)
    path = ck.finish_checkpoint(tmp, model=Saver(), training_state={"x": 1}, model_state={"w": torch.ones(2)})
    assert calls == [["w"]] and not tmp.exists() and path == tmp_path / CHECKPOINT_DIRNAME / "step-4"
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "model.safetensors", "training_state.pt"} == set(listed)
    assert checkpoint_is_complete(path)[0]
    (path / "optimizer" / "__1_0.distcp").write_bytes(b"\x07" * 64)
    assert not checkpoint_is_complete(path)[0]


def test_an_abandoned_or_foreign_folder_is_not_finished(tmp_path):
    tmp = ck.begin_checkpoint(tmp_path, 2)
    ck.abandon_checkpoint(tmp)
    assert not tmp.exists() and list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="is not a folder from begin_checkpoint"):
        ck.finish_checkpoint(tmp_path / "somewhere", model=Tiny(), training_state={})
    with pytest.raises(CheckpointError, match="needs a model whose save_pretrained"):
        save_checkpoint(tmp_path, 3, model=Tiny(), training_state={}, model_state={"w": torch.ones(1)})
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / CHECKPOINT_DIRNAME).iterdir())


def test_hf_tiny_qwen2_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    path = save_checkpoint(tmp_path, 7, model=model, training_state={"trainer": {"step": 7}})
    assert checkpoint_is_complete(path)[0]
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()

    torch.manual_seed(1)
    fresh = transformers.Qwen2ForCausalLM(config)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    load_model_weights(path, fresh)
    ref, got = model.state_dict(), fresh.state_dict()
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_load_model_weights_is_strict(tmp_path):
    path = _save(tmp_path, 1)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

    with pytest.raises(CheckpointError, match="unexpected"):
        load_model_weights(path, Other())
    bigger = Tiny()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="missing 2"):
        load_model_weights(path, bigger)


# --------------------------------------------------------------------------- interruption
def crash_when_moving_a_tmp_folder_in(monkeypatch, message):
    real_rename = os.rename

    def crash(src, dst):
        if ".tmp-step-" in str(src):
            raise OSError(message)
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", crash)


def test_crash_at_final_rename_keeps_previous(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    crash_when_moving_a_tmp_folder_in(monkeypatch, "simulated crash at the final rename")
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [(1, first)]
    assert find_resume_checkpoint(tmp_path) == first
    assert checkpoint_is_complete(first)[0]


def test_crash_during_resave_of_same_step(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    before = load_training_state(first)["trainer"]
    crash_when_moving_a_tmp_folder_in(monkeypatch, "simulated crash moving the new folder in")
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 1, model=Tiny(), training_state={"trainer": {"step": 1, "new": True}})
    monkeypatch.undo()
    # The old folder was moved back: step-1 is the previous, complete checkpoint.
    assert find_resume_checkpoint(tmp_path) == first
    assert load_training_state(first)["trainer"] == before
    root = tmp_path / CHECKPOINT_DIRNAME
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]

    # A real re-save of the same step replaces it.
    save_checkpoint(tmp_path, 1, model=Tiny(), training_state={"trainer": {"step": 1, "new": True}})
    assert load_training_state(first)["trainer"] == {"step": 1, "new": True}
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]


def test_orphaned_old_folder_is_listed_and_restored(tmp_path):
    first = _save(tmp_path, 4)
    root = tmp_path / CHECKPOINT_DIRNAME
    # A process (pid 999999999, long gone) crashed between its two renames.
    orphan = root / ".old-step-4-999999999"
    os.rename(first, orphan)
    assert list_checkpoints(tmp_path) == [(4, orphan)]
    assert find_resume_checkpoint(tmp_path) == orphan
    _save(tmp_path, 5)  # the next save's cleanup moves it back
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not orphan.exists() and checkpoint_is_complete(first)[0]


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from galore_train.checkpoint import save_checkpoint

    out, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class SlowModel:
        def save_pretrained(self, path):
            with open(Path(path) / "model.safetensors", "wb") as f:
                f.write(b"\\0" * (8 << 20))  # part of a big file
                f.flush()
                marker.write_text("writing")
                time.sleep(60)  # killed here, mid-write
                f.write(b"\\0" * (8 << 20))

    save_checkpoint(out, 2, model=SlowModel(), training_state={"big": torch.zeros(1 << 20)})
    """
)


def test_sigkill_mid_write_leaves_previous_checkpoint(tmp_path):
    first = _save(tmp_path, 1)
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 20
        tmp_dir = tmp_path / CHECKPOINT_DIRNAME / f".tmp-step-2-{child.pid}"
        while not (marker.exists() and tmp_dir.exists()):
            assert child.poll() is None, "child exited before it started writing"
            assert time.monotonic() < deadline, "child never started writing"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert tmp_dir.is_dir() and not (tmp_dir / "manifest.json").exists()
    assert list_checkpoints(tmp_path) == [(1, first)]
    assert find_resume_checkpoint(tmp_path) == first
    assert resolve_resume("auto", tmp_path) == first
    # The next save cleans up the dead child's temporary folder.
    _save(tmp_path, 3)
    assert not tmp_dir.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]


# ---------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("victim", ["training_state.pt", "model.safetensors"])
def test_truncated_newest_falls_back_with_warning(tmp_path, victim, caplog):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    with open(second / victim, "r+b") as f:
        f.truncate(os.path.getsize(second / victim) // 2)
    ok, reason = checkpoint_is_complete(second)
    assert not ok and victim in reason and "bytes" in reason
    with pytest.warns(ck.CheckpointWarning) as record:
        assert find_resume_checkpoint(tmp_path) == first
    message = str(record[0].message)
    assert str(second) in message and "falling back to step-1" in message and victim in message
    assert any(str(second) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_flipped_byte_same_size_detected(tmp_path):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    file = second / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert file.stat().st_size == size
    ok, reason = checkpoint_is_complete(second)
    assert not ok and "sha256" in reason and "model.safetensors" in reason
    assert checkpoint_is_complete(second, verify_checksums=False)[0]
    with pytest.warns(ck.CheckpointWarning, match="step-2.*falling back to step-1"):
        assert find_resume_checkpoint(tmp_path) == first


def test_missing_manifest_and_all_corrupt(tmp_path):
    only = _save(tmp_path, 1)
    (only / "manifest.json").unlink()
    assert checkpoint_is_complete(only) == (False, "manifest.json is missing (the save did not finish)")
    with pytest.warns(ck.CheckpointWarning, match="no complete checkpoint"):
        assert find_resume_checkpoint(tmp_path) is None


# ---------------------------------------------------------------------------------- resolve
def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_resume("auto", tmp_path) is None  # fresh run: nothing, and no warning
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    (bad / "training_state.pt").write_bytes(b"short")
    assert resolve_resume(str(good), tmp_path) == good
    with pytest.raises(CheckpointError) as info:
        resolve_resume(str(bad), tmp_path)
    assert str(bad) in str(info.value) and "training_state.pt" in str(info.value)
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(missing), tmp_path)
    with pytest.raises(CheckpointError, match="step-<N> folders"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.warns(ck.CheckpointWarning):
        assert resolve_resume("auto", tmp_path) == good


def test_load_training_state_errors(tmp_path):
    path = _save(tmp_path, 1)
    with open(path / "training_state.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_training_state(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "missing")


# ------------------------------------------------------------------------------------ prune
def test_prune_keeps_newest_complete(tmp_path):
    paths = {step: _save(tmp_path, step) for step in (1, 2, 3, 4, 5)}
    # step-4 corrupt, step-5 truncated: neither may count as kept.
    (paths[4] / "manifest.json").unlink()
    with open(paths[5] / "training_state.pt", "r+b") as f:
        f.truncate(10)
    stale = tmp_path / CHECKPOINT_DIRNAME / ".tmp-step-6-999999999"
    stale.mkdir()
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert set(removed) == {paths[1], paths[4], paths[5], stale}
    assert all(checkpoint_is_complete(p)[0] for _, p in list_checkpoints(tmp_path))
    assert not any(p.name.startswith(".") for p in (tmp_path / CHECKPOINT_DIRNAME).iterdir())

    assert prune_checkpoints(tmp_path, keep_last=0) == []
    assert prune_checkpoints(tmp_path, keep_last=1) == [paths[2]]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert prune_checkpoints(tmp_path, keep_last=1) == []  # never the newest complete one


def test_prune_deletes_nothing_without_a_complete_checkpoint(tmp_path):
    only = _save(tmp_path, 1)
    (only / "manifest.json").unlink()
    with pytest.warns(ck.CheckpointWarning, match="nothing pruned"):
        assert prune_checkpoints(tmp_path, keep_last=1) == []
    assert only.exists()
    assert prune_checkpoints(tmp_path / "empty", keep_last=1) == []


def test_prune_leaves_live_processes_temp_folders(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / CHECKPOINT_DIRNAME
    live = root / f".tmp-step-2-{os.getppid()}"  # the parent process is alive
    live.mkdir()
    prune_checkpoints(tmp_path, keep_last=1)
    assert live.exists()


def test_load_model_weights_shape_mismatch(tmp_path):
    path = _save(tmp_path, 1)
    wrong = Tiny()
    wrong.lin = nn.Linear(4, 5)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_weights(path, wrong)


def test_save_pretrained_gets_safe_serialization_when_it_takes_it(tmp_path):
    seen = {}

    class Legacy:
        def save_pretrained(self, path, safe_serialization=False):
            seen["safe"] = safe_serialization
            Path(path, "model.safetensors").write_bytes(b"x")

    save_checkpoint(tmp_path, 1, model=Legacy(), training_state={})
    assert seen == {"safe": True}
