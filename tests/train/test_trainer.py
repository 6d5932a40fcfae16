"""The trainer end to end: outputs, exact accumulation, resume after a real kill, preflight, DDP, download."""
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch


from ranks import free_port

from .conftest import (
    DATA_SIZES,
    TINY_ARCH,
    final_weights,
    run_cli,
    run_subprocess,
    subprocess_env,
    tiny_config,
    write_config,
)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_default_end_to_end(tmp_path, capsys):
    """--prepare-data then training on the embedded default: every output is there and eval loss falls."""
    out = tmp_path / "run"
    config = {"output_dir": str(out), "model": {"architecture": dict(TINY_ARCH)}, "data": dict(DATA_SIZES),
              "training": {"epochs": 3, "micro_batch_size": 8, "lr": 5e-3, "warmup_steps": 2, "max_seq_len": 64,
                           "save_every": 0}, "optimizer": {"rank": 4, "update_proj_gap": 5}}
    assert run_cli(config, tmp_path) == 2  # not prepared yet: a clear preflight error, nothing written
    assert "--prepare-data" in capsys.readouterr().err and not out.exists()
    assert run_cli(config, tmp_path, "--prepare-data") == 0
    assert run_cli(config, tmp_path) == 0
    printed = capsys.readouterr().out
    assert "parameter routing (optimizer: galore)" in printed and "eval loss per epoch" in printed

    summary = json.loads((out / "summary.json").read_text())
    losses = summary["eval_loss_per_epoch"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert summary["mode"].startswith("B: GaLore") and summary["peak_memory_bytes"] > 0
    memory = json.loads((out / "memory_report.json").read_text())
    assert {"load", "train", "eval"} <= set(memory["phases"])
    assert memory["tensors"]["optimizer_state"]["galore_moments"]["bytes"] > 0
    assert memory["tensors"]["saving_vs_full_rank_adam_bytes"] > 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "eval"] == [12, 24, 36]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-24", "step-36"]  # keep_last 2


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_accumulation_matches_one_big_micro_batch(tmp_path, prepared, optimizer):
    """micro_batch_size=2 x accumulation 4 == micro_batch_size=8 x 1: token-normalised window loss."""
    results = {}
    for name, mbs, acc in (("split", 2, 4), ("whole", 8, 1)):
        config = tiny_config(tmp_path / name, prepared, training={"micro_batch_size": mbs, "gradient_accumulation_steps": acc,
                                                                  "max_steps": 6, "epochs": 1},
                             optimizer={"type": optimizer})
        assert run_cli(config, tmp_path, name=f"{name}.yaml") == 0
        results[name] = final_weights(tmp_path / name)
    for key, value in results["whole"].items():
        torch.testing.assert_close(results["split"][key], value, rtol=1e-4, atol=2e-5, msg=key)


def test_layerwise_matches_standard_galore_through_the_trainer(tmp_path, prepared):
    results = {}
    for kind in ("galore", "galore_layerwise"):
        config = tiny_config(tmp_path / kind, prepared, training={"micro_batch_size": 4, "gradient_accumulation_steps": 3,
                                                                  "epochs": 1},
                             optimizer={"type": kind})
        assert run_cli(config, tmp_path, name=f"{kind}.yaml") == 0
        results[kind] = final_weights(tmp_path / kind)
    for key, value in results["galore"].items():
        torch.testing.assert_close(results["galore_layerwise"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------- resume
KILL_AFTER_SAVE = r"""
import os, sys, time
from pathlib import Path
import galore_train.trainer as trainer
from galore_train.cli import main

kill_step, marker = int(sys.argv[1]), Path(sys.argv[2])
real_save = trainer.save_checkpoint

def save_then_wait(output_dir, step, **kw):
    path = real_save(output_dir, step, **kw)
    if step == kill_step:
        marker.write_text(str(path))
        time.sleep(600)  # the parent SIGKILLs us here, after a complete checkpoint
    return path

trainer.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[3:]))
"""


def kill_after_checkpoint(config_path, tmp_path, kill_step):
    script = tmp_path / "kill_after_save.py"
    script.write_text(KILL_AFTER_SAVE)
    marker = tmp_path / "saved.marker"
    proc = subprocess.Popen([sys.executable, str(script), str(kill_step), str(marker), "--config", str(config_path)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never reached its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("optimizer, accumulation", [("galore", 1), ("galore", 3), ("galore_layerwise", 3)])
def test_resume_after_kill_is_bitwise_identical(tmp_path, prepared, optimizer, accumulation):
    """96 examples / micro-batch 8 = 12 micro-batches: with accumulation 3 that is 4 windows an epoch,
    with 1 it is 12; checkpoints every 2 steps; the kill lands mid-epoch."""
    training = {"gradient_accumulation_steps": accumulation, "save_every": 2, "epochs": 2}
    if accumulation == 3:
        training["micro_batch_size"] = 7  # 14 micro-batches: windows of 3, 3, 3, 3, 2 (a tail window)
    straight = tiny_config(tmp_path / "straight", prepared, training=training, optimizer={"type": optimizer})
    killed = tiny_config(tmp_path / "killed", prepared, training=training, optimizer={"type": optimizer})
    straight_path = write_config(tmp_path / "straight.yaml", straight)
    killed_path = write_config(tmp_path / "killed.yaml", killed)

    done = run_subprocess(["-m", "galore_train", "--config", str(straight_path)])
    assert done.returncode == 0, done.stderr
    kill_after_checkpoint(killed_path, tmp_path, kill_step=4)
    resumed = run_subprocess(["-m", "galore_train", "--config", str(killed_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-4" in resumed.stdout

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))


def test_max_steps_inside_an_epoch_then_resume_with_more_steps_continues_that_epoch(tmp_path, prepared):
    """max_steps = 5 of a 12-step epoch, then --resume with max_steps unset: the run goes on from the
    epoch's 6th micro-batch and ends bitwise where an uninterrupted epoch ends (constant schedule, so
    the horizon does not change the learning rate)."""
    training = {"epochs": 1, "lr_scheduler": "constant", "warmup_steps": 0}
    straight = tiny_config(tmp_path / "straight", prepared, training=training)
    assert run_cli(straight, tmp_path, name="straight.yaml") == 0
    stopped = tiny_config(tmp_path / "stopped", prepared, training={**training, "max_steps": 5})
    assert run_cli(stopped, tmp_path, name="stopped.yaml") == 0
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["last_epoch_partial"] and len(summary["eval_loss_per_epoch"]) == 1

    stopped["training"]["max_steps"] = None
    assert run_cli(stopped, tmp_path, "--resume", name="stopped.yaml") == 0
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    expected = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["steps"] == expected["steps"] == 12 and not summary["last_epoch_partial"]
    assert summary["eval_loss_per_epoch"] == expected["eval_loss_per_epoch"]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = lambda path: [r["step"] for r in read_jsonl(path / "metrics.jsonl") if r["type"] == "train"]  # noqa: E731
    assert trained(tmp_path / "stopped") == trained(tmp_path / "straight") == list(range(1, 13))


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_bitwise(tmp_path, prepared):
    """A scheduler's preemption: SIGTERM mid-run finishes the step, saves it (no save_every needed)
    and exits 143; --resume then ends bitwise where an uninterrupted run ends."""
    training = {"epochs": 2, "save_every": 0}
    straight = tiny_config(tmp_path / "straight", prepared, training=training)
    stopped = tiny_config(tmp_path / "stopped", prepared, training=training)
    done = run_subprocess(["-m", "galore_train", "--config", str(write_config(tmp_path / "straight.yaml", straight))])
    assert done.returncode == 0, done.stderr
    config_path = write_config(tmp_path / "stopped.yaml", stopped)
    proc = subprocess.Popen([sys.executable, "-m", "galore_train", "--config", str(config_path)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and '"step": 3,' in metrics.read_text()):  # mid-epoch (12 steps an epoch)
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never reached step 3"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    saved = [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")
    resumed = run_subprocess(["-m", "galore_train", "--config", str(config_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, prepared):
    config = tiny_config(tmp_path / "run", prepared, training={"save_every": 2, "epochs": 1, "max_steps": 6})
    assert run_cli(config, tmp_path) == 0
    reference = final_weights(tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "step-6"
    state_file = latest / "training_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(config, tmp_path, "--resume", "auto") == 0
    assert any("step-6" in str(w.message) and "falling back" in str(w.message) for w in caught)
    resumed = final_weights(tmp_path / "run")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_explicit_incomplete_resume_path_is_refused(tmp_path, prepared, capsys):
    config = tiny_config(tmp_path / "run", prepared)
    assert run_cli(config, tmp_path, "--resume", str(tmp_path / "run" / "checkpoints" / "step-9")) == 2
    assert "step-9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- preflight
@pytest.mark.parametrize("change, expected", [
    ({"optimizer": {"rank": 100}}, "rank"),
    ({"training": {"max_seq_len": 512}}, "max_seq_len"),
    ({"training": {"precision": "fp16-mixed"}, "optimizer": {"type": "galore_layerwise"}}, "layer"),
    ({"quantization": {"enabled": True}, "training": {"precision": "bf16"}}, "bf16"),
    ({"training": {"device": "cuda:7"}}, "cuda"),
])
def test_preflight_failures_exit_2_with_nothing_written(tmp_path, prepared, capsys, change, expected):
    config = tiny_config(tmp_path / "run", prepared, **change)
    assert run_cli(config, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("galore-train: error:") and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_empty_dataset_and_unwritable_output_are_refused(tmp_path, prepared, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tiny_config(tmp_path / "run", prepared, data={"train_file": str(empty)})
    assert run_cli(config, tmp_path) == 2
    assert "empty.jsonl" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = tiny_config(blocker / "run", prepared)
    assert run_cli(config, tmp_path) == 2
    assert str(blocker) in capsys.readouterr().err


def test_quantized_mode_a_trains_float_params_only(tmp_path, prepared, capsys):
    config = tiny_config(tmp_path / "run", prepared, quantization={"enabled": True, "load_in_8bit": True},
                         training={"max_steps": 3, "epochs": 1})
    assert run_cli(config, tmp_path) == 0
    printed = capsys.readouterr().out
    assert "falling back to AdamW" in printed and "int8" in printed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mode"].startswith("A:") and summary["routing"]["galore"]["tensors"] == 0
    assert summary["routing"]["frozen"]["tensors"] == 2 * 7  # q k v o gate up down per layer


# -------------------------------------------------------------------------------- distributed
def torchrun(config_path, *extra) -> None:
    """``galore_train`` on 2 CPU processes (gloo) under torch.distributed.run, on a free port."""
    done = run_subprocess(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), "-m", "galore_train", "--config", str(config_path),
                           *extra])
    assert done.returncode == 0, done.stderr


def test_two_process_ddp_equals_one_process(tmp_path, prepared):
    """Global batch 8 as 2 ranks x 4 or 1 rank x 8; instruction records differ in target-token counts."""
    single = tiny_config(tmp_path / "single", prepared, training={"micro_batch_size": 8, "max_steps": 4, "epochs": 1})
    ddp = tiny_config(tmp_path / "ddp", prepared, training={"micro_batch_size": 4, "max_steps": 4, "epochs": 1})
    done = run_subprocess(["-m", "galore_train", "--config", str(write_config(tmp_path / "single.yaml", single))])
    assert done.returncode == 0, done.stderr
    torchrun(write_config(tmp_path / "ddp.yaml", ddp))
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_two_process_ddp_with_dropout_resumes_bitwise(tmp_path, prepared):
    """Each rank's RNG state is checkpointed and restored (dropout draws differ between ranks): 2 ranks
    with attention dropout, stopped by max_steps after 3 steps and resumed to 6, end bitwise where an
    uninterrupted 6-step run ends."""
    training = {"micro_batch_size": 4, "epochs": 1, "lr_scheduler": "constant", "warmup_steps": 0, "max_steps": 6}
    model = {"architecture": {**TINY_ARCH, "attention_dropout": 0.3}}
    torchrun(write_config(tmp_path / "straight.yaml", tiny_config(tmp_path / "straight", prepared, training=training,
                                                                   model=model)))
    stopped = tiny_config(tmp_path / "stopped", prepared, training={**training, "max_steps": 3}, model=model)
    torchrun(write_config(tmp_path / "stopped.yaml", stopped))
    stopped["training"]["max_steps"] = 6
    torchrun(write_config(tmp_path / "stopped.yaml", stopped), "--resume")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_in_quantized_mode_a(tmp_path, prepared):
    """Mode A builds the embedded default through a temporary save_pretrained folder on every rank
    (transformers writes nothing on ranks other than 0 once torch.distributed is up, unless told to)."""
    config = tiny_config(tmp_path / "ddp", prepared, quantization={"enabled": True, "load_in_8bit": True},
                         training={"micro_batch_size": 4, "max_steps": 2, "epochs": 1})
    torchrun(write_config(tmp_path / "ddp.yaml", config))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["mode"].startswith("A:") and summary["steps"] == 2


def uneven_data(tmp_path, prepared) -> dict:
    """81 training and 9 eval records: over 2 ranks x 4, 11 micro-batches, the last of one example
    (rank 1 has none), so accumulation over 2 ends the epoch with a window of one micro-batch; rank 1
    evaluates one batch fewer than rank 0 (4 examples against 5)."""
    train, evalset = tmp_path / "train81.jsonl", tmp_path / "eval9.jsonl"
    train.write_text("".join(prepared.train_path.read_text().splitlines(keepends=True)[:81]))
    evalset.write_text("".join(prepared.eval_path.read_text().splitlines(keepends=True)[:9]))
    return {"train_file": str(train), "eval_file": str(evalset)}


@pytest.mark.parametrize("optimizer", ["galore", "adamw"])
def test_two_process_fsdp2_equals_one_process(tmp_path, prepared, optimizer):
    """FSDP2 over 2 ranks trains what one process trains: a whole epoch (a short last window whose
    micro-batch leaves rank 1 empty, uneven evaluation), accumulation over 2 micro-batches,
    global-norm clipping, GaLore refreshes every 3 steps. The checkpoint's model is the one-process checkpoint's (same names),
    its optimizer state one shard per rank."""
    data = uneven_data(tmp_path, prepared)
    training = {"epochs": 1, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5}
    single = tiny_config(tmp_path / "single", prepared, data=data, optimizer={"type": optimizer},
                         training={**training, "micro_batch_size": 8})
    fsdp = tiny_config(tmp_path / "fsdp", prepared, data=data, optimizer={"type": optimizer},
                       training={**training, "micro_batch_size": 4, "distributed": "fsdp2"})
    done = run_subprocess(["-m", "galore_train", "--config", str(write_config(tmp_path / "single.yaml", single))])
    assert done.returncode == 0, done.stderr
    torchrun(write_config(tmp_path / "fsdp.yaml", fsdp))
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["distributed"] == "fsdp2" and two["steps"] == one["steps"] == 6
    assert two["eval_loss_per_epoch"] == pytest.approx(one["eval_loss_per_epoch"], rel=1e-5)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-6"
    assert sorted(p.name for p in (checkpoint / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= manifest.keys()
    report = json.loads((tmp_path / "fsdp" / "memory_report.json").read_text())["tensors"]
    assert report["parameters_sharded"] is True
    assert report["trainable_numel"] < sum(t.numel() for t in a.values())  # rank 0's rows only


def test_two_process_fsdp2_with_dropout_resumes_bitwise(tmp_path, prepared):
    """An FSDP2 run stopped after 3 of 6 steps (a GaLore refresh at step 3, accumulation, dropout)
    and resumed from its sharded checkpoint ends bitwise where the uninterrupted run ends."""
    data = uneven_data(tmp_path, prepared)
    training = {"micro_batch_size": 4, "epochs": 1, "lr_scheduler": "constant", "warmup_steps": 0, "max_steps": 6,
                "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "distributed": "fsdp2"}
    model = {"architecture": {**TINY_ARCH, "attention_dropout": 0.3}}
    straight = tiny_config(tmp_path / "straight", prepared, data=data, training=training, model=model)
    torchrun(write_config(tmp_path / "straight.yaml", straight))
    stopped = tiny_config(tmp_path / "stopped", prepared, data=data, training={**training, "max_steps": 3}, model=model)
    torchrun(write_config(tmp_path / "stopped.yaml", stopped))
    stopped["training"]["max_steps"] = 6
    torchrun(write_config(tmp_path / "stopped.yaml", stopped), "--resume")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = read_jsonl(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in metrics if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_fsdp2_save_failing_on_one_rank_is_a_clear_error_and_keeps_the_earlier_checkpoint(tmp_path, prepared):
    """Rank 1 cannot write its optimizer shard of step 4 (a full disk, injected): both ranks stop with
    the trainer's message and exit 2; step-2 stays complete, and no step-4 or temporary folder is left."""
    from galore_train.checkpoint import checkpoint_is_complete

    config = tiny_config(tmp_path / "run", prepared, training={"micro_batch_size": 4, "max_steps": 6, "epochs": 1,
                                                                "save_every": 2, "distributed": "fsdp2"})
    done = run_subprocess(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), str(Path(__file__).parent / "fsdp2_worker.py"),
                           "failed_save", str(write_config(tmp_path / "run.yaml", config))])
    assert done.returncode != 0
    assert "exitcode  : 2" in done.stderr and "exitcode  : 1" not in done.stderr, done.stderr[-3000:]
    assert "could not write the checkpoint of step 4" in done.stderr and "No space left on device" in done.stderr
    assert "then continue with --resume" in done.stderr
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["step-2"] and checkpoint_is_complete(tmp_path / "run" / "checkpoints" / "step-2")[0]


def run_fsdp2_worker(scenario: str, config_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(Path(__file__).parent / "fsdp2_worker.py"), scenario, str(config_path)],
        env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=300)


def test_fsdp2_output_dir_not_shared_between_ranks_is_refused_at_the_first_save(tmp_path, prepared):
    """Rank 1 writes its shards where rank 0 cannot see them (another node's disk): the first save
    fails on every rank with the requirement named, and no checkpoint claims to be complete."""
    config = tiny_config(tmp_path / "run", prepared, training={"micro_batch_size": 4, "max_steps": 4, "epochs": 1,
                                                                "save_every": 2, "distributed": "fsdp2"})
    done = run_fsdp2_worker("unshared_save", write_config(tmp_path / "run.yaml", config),
                            GALORE_FSDP2_OTHER_DISK=str(tmp_path / "node1"))
    assert done.returncode != 0 and "exitcode  : 1" not in done.stderr, done.stderr[-3000:]
    assert "could not write the checkpoint of step 2" in done.stderr
    assert "output_dir must be on a file system that every rank sees" in done.stderr
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_fsdp2_resume_from_an_unreadable_optimizer_state_is_a_clear_error(tmp_path, prepared):
    """A checkpoint whose manifest verifies but whose sharded optimizer metadata is garbage (written
    so by a faulty disk before the manifest): every rank stops with exit 2 and the way out."""
    import hashlib

    config = tiny_config(tmp_path / "run", prepared, training={"micro_batch_size": 4, "max_steps": 4, "epochs": 1,
                                                                "save_every": 2, "distributed": "fsdp2"})
    torchrun(write_config(tmp_path / "run.yaml", config))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"
    garbage = bytes(range(256)) * 4
    (checkpoint / "optimizer" / ".metadata").write_bytes(garbage)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["optimizer/.metadata"] = {"size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    config["training"]["max_steps"] = 6
    done = run_subprocess(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), "-m", "galore_train", "--config",
                           str(write_config(tmp_path / "run.yaml", config)), "--resume"])
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr and "exitcode  : 1" not in done.stderr, \
        done.stderr[-3000:]
    assert "its sharded optimizer state is unreadable" in done.stderr
    assert "resume from an earlier step-<N> folder" in done.stderr


def test_fsdp2_resume_leaves_a_parameter_without_gradient_without_state(tmp_path):
    """torch builds the resume template by a zero-gradient step that gives every parameter state;
    a parameter that had none when saved (never in the graph) gets none back, and the run resumes bitwise."""
    from ranks import run_ranks

    run_ranks(2, "unused_parameter", worker=Path(__file__).parent / "fsdp2_worker.py",
              GALORE_FSDP2_FOLDER=str(tmp_path / "optimizer"))


def test_download_without_network_fails_fast_with_its_message(tmp_path):
    started = time.time()
    done = run_subprocess(["-m", "galore_train", "download", "Qwen/Qwen2-0.5B", "--to", str(tmp_path / "m")], timeout=120)
    assert done.returncode == 2
    assert "could not download 'Qwen/Qwen2-0.5B'" in done.stderr and "offline" in done.stderr
    assert time.time() - started < 60


def test_local_model_folder_trains_through_from_pretrained(tmp_path, prepared):
    """model.name_or_path = a folder saved with save_pretrained (model + tokenizer), loaded for real."""
    import transformers

    from galore_train.data import load_tokenizer

    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    folder = tmp_path / "tiny-qwen2"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=len(tokenizer), **TINY_ARCH))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tiny_config(tmp_path / "run", prepared, model={"name_or_path": str(folder)},
                         training={"max_steps": 4, "epochs": 1})
    config["data"]["tokenizer"] = None  # the model folder's own tokenizer
    assert run_cli(config, tmp_path) == 0
    trained = final_weights(tmp_path / "run")
    start = model.state_dict()
    changed = [k for k in trained if k in start and not torch.equal(trained[k], start[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_quantized_mode_a_resumes_bitwise(tmp_path, prepared):
    """Mode A checkpoints hold the int8 model (save_pretrained) and reload into a freshly quantized one."""
    import shutil

    config = tiny_config(tmp_path / "run", prepared, quantization={"enabled": True, "load_in_8bit": True},
                         training={"max_steps": 6, "epochs": 1, "save_every": 2})
    assert run_cli(config, tmp_path) == 0
    straight = final_weights(tmp_path / "run")
    for step in (4, 6):  # back to the state after step 2
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step-{step}")
    assert run_cli(config, tmp_path, "--resume") == 0
    resumed = final_weights(tmp_path / "run")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_clipping_leaves_a_non_finite_gradient_to_the_optimizer_guard():
    from galore_train.trainer import clip_if_finite

    a, b = nn_param([3.0, 4.0]), nn_param([1.0, 0.0])
    assert float(clip_if_finite([a, b], 1.0)) > 1.0
    assert torch.allclose(a.grad.norm() ** 2 + b.grad.norm() ** 2, torch.tensor(1.0), atol=1e-5)
    a, b = nn_param([float("inf"), 0.0]), nn_param([1.0, 2.0])
    assert not torch.isfinite(clip_if_finite([a, b], 1.0))
    assert torch.equal(b.grad, torch.tensor([1.0, 2.0]))  # untouched, not zeroed by an infinite norm


def nn_param(grad):
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return p


def test_resume_with_a_different_batch_plan_is_refused(tmp_path, prepared, capsys):
    config = tiny_config(tmp_path / "run", prepared, training={"save_every": 2, "max_steps": 2, "epochs": 1})
    assert run_cli(config, tmp_path) == 0
    config["training"]["micro_batch_size"] = 4
    assert run_cli(config, tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "training.micro_batch_size was 8, now 4" in err and "cannot resume" in err


@pytest.mark.parametrize("change, named", [
    ({"optimizer": {"type": "adamw"}}, "optimizer.type was 'galore', now 'adamw'"),
    ({"optimizer": {"type": "galore_layerwise"}}, "optimizer.type was 'galore', now 'galore_layerwise'"),
    ({"data": {"eval_fraction": 0.25}}, "the training examples were"),
    ({"training": {"max_seq_len": 22}}, "the training examples were"),
])
def test_resume_that_changes_the_optimizer_or_the_data_is_refused_before_loading(tmp_path, prepared, capsys, change, named):
    """Refused with exit 2 and the change named, before any loader runs (a changed optimizer used to
    fail inside load_state_dict with a traceback; a changed eval split or max_seq_len changes the
    training examples, so the saved position would point elsewhere, and was accepted)."""
    config = tiny_config(tmp_path / "run", prepared, training={"save_every": 2, "max_steps": 2, "epochs": 1})
    config["data"] = {"train_file": config["data"]["train_file"], "tokenizer": config["data"]["tokenizer"]}  # split
    assert run_cli(config, tmp_path) == 0
    for section, values in change.items():
        config[section].update(values)
    assert run_cli(config, tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and named in err and "Traceback" not in err


def test_resume_keeps_this_runs_hyperparameters_and_follows_the_new_schedule(tmp_path, prepared):
    """Stopped at max_steps = 3 of a cosine schedule (whose lr reaches 0 there), resumed with
    max_steps = 6 and another peak lr: step 4 uses the new lr at the new schedule's position
    (was: the saved groups' lr, 0). The logged lr is the one each step used."""
    import math

    config = tiny_config(tmp_path / "run", prepared, training={"max_steps": 3, "epochs": 1, "lr_scheduler": "cosine",
                                                               "warmup_steps": 2, "lr": 3e-3})
    assert run_cli(config, tmp_path) == 0
    config["training"].update(max_steps=6, lr=1e-3)
    assert run_cli(config, tmp_path, "--resume") == 0
    logged = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"}
    assert logged[1] == pytest.approx(3e-3 * 0.5) and logged[2] == pytest.approx(3e-3)  # warm-up: (step + 1) / 2
    cosine = lambda step, total: 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2)))  # noqa: E731
    assert logged[3] == pytest.approx(3e-3 * cosine(2, 3))
    for step in (4, 5, 6):  # the schedule's position is the step count before the step
        assert logged[step] == pytest.approx(1e-3 * cosine(step - 1, 6)), step


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path, prepared, capsys):
    """Its own checkpoints would be pruned as the older ones and --resume would pick the earlier
    run's: refused with exit 2 and nothing touched, unless --overwrite (which deletes them)."""
    config = tiny_config(tmp_path / "run", prepared, training={"max_steps": 4, "epochs": 1, "save_every": 2})
    assert run_cli(config, tmp_path) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert before == ["step-2", "step-4"]
    config["training"].update(max_steps=2, save_every=1)
    assert run_cli(config, tmp_path) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert run_cli(config, tmp_path, "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1", "step-2"]


def test_a_failed_save_is_a_clear_error_and_keeps_the_earlier_checkpoints(tmp_path, prepared, capsys, monkeypatch):
    """A full disk while saving step 4: exit 2 with a message naming the intact checkpoints, which
    stay loadable; --resume then continues from step 2."""
    import galore_train.trainer as trainer

    real_save = trainer.save_checkpoint

    def save_or_fail(output_dir, step, **kw):
        if step == 4:  # safetensors reports a full disk as its own error, not as an OSError
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(output_dir, step, **kw)

    monkeypatch.setattr(trainer, "save_checkpoint", save_or_fail)
    config = tiny_config(tmp_path / "run", prepared, training={"max_steps": 6, "epochs": 1, "save_every": 2})
    assert run_cli(config, tmp_path) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "No space left" in err and "step-2" in err
    assert "Traceback" not in err
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert run_cli(config, tmp_path, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out


def test_pruning_checks_sizes_not_checksums(tmp_path, prepared, monkeypatch):
    """Pruning decides on the manifest and file sizes (a crashed save fails them); it does not
    re-hash every kept checkpoint at each save."""
    import galore_train.checkpoint as ckpt

    config = tiny_config(tmp_path / "run", prepared, training={"max_steps": 3, "epochs": 1, "save_every": 1})
    assert run_cli(config, tmp_path) == 0
    monkeypatch.setattr(ckpt, "_sha256", lambda file: pytest.fail(f"pruning hashed {file}"))
    removed = ckpt.prune_checkpoints(tmp_path / "run", keep_last=1)
    assert sorted(p.name for p in removed) == ["step-1", "step-2"]
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-3"]


def test_resume_accepts_the_same_data_file_spelled_as_a_relative_path(tmp_path, prepared):
    import os

    config = tiny_config(tmp_path / "run", prepared, training={"max_steps": 2, "epochs": 1})
    assert run_cli(config, tmp_path) == 0
    config["data"]["train_file"] = os.path.relpath(config["data"]["train_file"])
    config["training"]["max_steps"] = 3
    assert run_cli(config, tmp_path, "--resume") == 0


def test_resume_checks_the_optimizer_state_settings_with_defaults_for_older_checkpoints(tmp_path):
    """A resume that would silently drop state_dtype or stochastic_rounding is refused; a checkpoint
    written before the keys existed ran with their defaults."""
    from galore_train.checkpoint import CheckpointError
    from galore_train.trainer import check_resumable

    from .conftest import make_config

    saved_config = make_config().to_dict()
    for key in ("state_dtype", "stochastic_rounding"):
        del saved_config["optimizer"][key]  # an older checkpoint
    saved = {"config": saved_config, "trainer": {"world_size": 1}}
    check_resumable(saved, make_config(), 1, tmp_path)  # the defaults: resumable
    with pytest.raises(CheckpointError, match="optimizer.state_dtype was 'float32', now 'bfloat16'"):
        check_resumable(saved, make_config(optimizer={"state_dtype": "bfloat16"}), 1, tmp_path)
    saved["config"] = make_config(optimizer={"stochastic_rounding": True}).to_dict()
    with pytest.raises(CheckpointError, match="optimizer.stochastic_rounding was True, now False"):
        check_resumable(saved, make_config(), 1, tmp_path)


def test_resume_under_the_other_distributed_mode_is_refused(tmp_path):
    """A DDP checkpoint holds the optimizer state whole, an FSDP2 one sharded beside it; a checkpoint
    written before the key existed ran under DDP."""
    from galore_train.checkpoint import CheckpointError
    from galore_train.trainer import check_resumable

    from .conftest import make_config

    saved_config = make_config().to_dict()
    del saved_config["training"]["distributed"]
    saved = {"config": saved_config, "trainer": {"world_size": 2}}
    check_resumable(saved, make_config(), 2, tmp_path)
    with pytest.raises(CheckpointError, match="training.distributed was 'ddp', now 'fsdp2'"):
        check_resumable(saved, make_config(training={"distributed": "fsdp2"}), 2, tmp_path)
