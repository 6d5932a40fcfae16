"""Preflight checks: each refuses a bad input with a message that says what to change, and passes a good one."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from galore_train import preflight
from galore_train.modeling import ModelLoadError, build_model, resolve_device
from galore_train.preflight import PreflightError
from galore_train.routing import route_parameters

from .conftest import CPU, VOCAB, make_config, merge


@pytest.fixture(scope="module")
def tiny_model():
    config = make_config()
    return build_model(config, vocab_size=VOCAB, device=CPU), config


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    build_model(make_config(), vocab_size=VOCAB, device=CPU).save_pretrained(folder)
    config = make_config(model={"name_or_path": str(folder)}, quantization={"enabled": True})
    return build_model(config, vocab_size=VOCAB, device=CPU), config


def refused(match: str):
    return pytest.raises(PreflightError, match=match)


# ------------------------------------------------------------------------------ output folder
def test_output_dir_ok_and_nothing_written(tmp_path):
    target = tmp_path / "runs" / "a" / "b"
    preflight.check_output_dir(target)
    preflight.check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_output_dir_is_a_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    with refused(r"is a file, not a folder.*set output_dir") as err:
        preflight.check_output_dir(blocker)
    assert str(blocker) in err.value.message
    # A file in the way of a folder to create.
    with refused(r"cannot be created: .*out' is a file"):
        preflight.check_output_dir(blocker / "run1")


def test_output_dir_read_only_file_system():
    # Tests often run as root, where os.access(W_OK) is true even for a mode-0555 folder; a read-only
    # mount (as /proc/sys is in containers) is unwritable for everyone.
    base = "/proc/sys"
    if not os.path.isdir(base) or (os.access(base, os.W_OK) and not os.statvfs(base).f_flag & os.ST_RDONLY):
        pytest.skip("/proc/sys is writable here")
    with refused(r"(not writable|read-only file system).*set output_dir"):
        preflight.check_output_dir(f"{base}/galore_run/x")


def test_output_dir_permission_denied(tmp_path, monkeypatch):
    # CI runs as root, for whom a mode-0555 folder is writable; the permission answer is faked instead.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(preflight.os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode, **kw))
    with refused(r"not writable.*permission denied"):
        preflight.check_output_dir(locked / "run")


# ------------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_not_needed_without_quantization(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    preflight.check_bitsandbytes(make_config())


def test_bitsandbytes_present_passes():
    preflight.check_bitsandbytes(make_config(quantization={"enabled": True}))
    preflight.check_bitsandbytes(make_config(optimizer={"type": "adamw8bit"}))


@pytest.mark.parametrize("sections", [{"quantization": {"enabled": True}}, {"optimizer": {"type": "adamw8bit"}}])
def test_bitsandbytes_missing(monkeypatch, sections):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with refused(r"needs bitsandbytes.*pip install bitsandbytes>=0\.45 accelerate") as err:
        preflight.check_bitsandbytes(make_config(**sections))
    key = "quantization.enabled: false" if "quantization" in sections else "optimizer.type: adamw"
    assert key in err.value.message


def test_accelerate_missing_for_8bit_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with refused(r"needs accelerate.*pip install bitsandbytes>=0\.45 accelerate"):
        preflight.check_bitsandbytes(make_config(quantization={"enabled": True}))
    preflight.check_bitsandbytes(make_config(optimizer={"type": "adamw8bit"}))  # the optimizer needs no accelerate


# -------------------------------------------------------------------------------- combinations
def test_good_combinations_pass():
    for sections in ({}, {"optimizer": {"type": "galore_layerwise"}},
                     {"training": {"precision": "bf16-mixed"}}, {"training": {"precision": "bf16"}},
                     {"quantization": {"enabled": True}, "training": {"precision": "bf16-mixed",
                                                                     "gradient_checkpointing": True}}):
        preflight.check_combination(make_config(**sections), world_size=1, device=CPU)
    preflight.check_combination(make_config(), world_size=2, device=CPU)


def test_layerwise_with_several_processes():
    with refused(r"galore_layerwise cannot run with 2 processes.*before DDP reduces.*set optimizer\.type: galore"):
        preflight.check_combination(make_config(optimizer={"type": "galore_layerwise"}), world_size=2, device=CPU)


@pytest.mark.parametrize("sections, world, expected", [
    ({}, 1, r"this is one process; launch with `torchrun --nproc_per_node N"),
    ({"quantization": {"enabled": True}}, 2, r"cannot shard bitsandbytes' int8 weights; set quantization\.enabled: false"),
    ({"optimizer": {"type": "galore_layerwise"}}, 2, r"before FSDP2 reduce-scatters.*set optimizer\.type: galore"),
    ({"optimizer": {"type": "adamw8bit"}}, 2, r"AdamW8bit cannot step sharded.*set optimizer\.type: adamw or galore"),
    ({"training": {"precision": "fp16-mixed"}}, 2, r"set training\.precision: bf16-mixed"),
])
def test_fsdp2_refuses_what_cannot_be_sharded(sections, world, expected):
    config = make_config(**merge({"training": {"distributed": "fsdp2"}}, sections))
    with refused(r"training\.distributed: fsdp2 cannot run: .*" + expected + r".*training\.distributed: ddp"):
        preflight.check_combination(config, world_size=world, device=CPU)


def test_fsdp2_passes_with_galore_adamw_and_bf16():
    for sections in ({}, {"optimizer": {"type": "adamw"}}, {"training": {"precision": "bf16-mixed"}}):
        config = make_config(**merge({"training": {"distributed": "fsdp2"}}, sections))
        preflight.check_combination(config, world_size=2, device=CPU)


def test_layerwise_with_fp16_mixed():
    config = make_config(optimizer={"type": "galore_layerwise"}, training={"precision": "fp16-mixed"})
    with refused(r"galore_layerwise cannot use training\.precision: fp16-mixed.*loss scaler"):
        preflight.check_combination(config, world_size=1, device=torch.device("cuda", 0))


def test_fp16_mixed_needs_cuda():
    with refused(r"fp16-mixed needs a CUDA device.*set training\.precision: bf16-mixed"):
        preflight.check_combination(make_config(training={"precision": "fp16-mixed"}), world_size=1, device=CPU)


def test_quantization_with_pure_bf16():
    config = make_config(quantization={"enabled": True}, training={"precision": "bf16"})
    with refused(r"quantization\.enabled: true cannot use training\.precision: bf16.*bf16-mixed"):
        preflight.check_combination(config, world_size=1, device=CPU)


def test_quantization_4bit_not_supported():
    config = make_config(quantization={"enabled": True, "load_in_8bit": False})
    with refused(r"4-bit loading.*not support.*quantization\.load_in_8bit: true"):
        preflight.check_combination(config, world_size=1, device=CPU)


def test_adamw8bit_cpu_step(monkeypatch):
    config = make_config(optimizer={"type": "adamw8bit"})
    preflight.check_combination(config, world_size=1, device=CPU)  # bitsandbytes >= 0.45 steps on CPU

    import bitsandbytes as bnb

    class Broken(bnb.optim.AdamW8bit):
        def step(self, closure=None):
            raise RuntimeError("no CPU kernel for optimizer_update_8bit_blockwise")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Broken)
    with refused(r"adamw8bit cannot step on cpu.*no CPU kernel.*set optimizer\.type: adamw"):
        preflight.check_combination(config, world_size=1, device=CPU)


def test_device_errors_are_preflight_errors():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="training.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with refused(r"CUDA is not available.*set training\.device: cpu"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------------------ quantized model
def test_quantized_model_complete_passes(int8_model):
    model, _ = int8_model
    preflight.check_quantized_model(model)


def test_quantized_model_without_quantized_layers(tiny_model):
    model, _ = tiny_model
    with refused(r"no quantized layer.*quantization\.enabled: false"):
        preflight.check_quantized_model(model)


@pytest.mark.parametrize("damage, problem", [
    ("missing", r"row scales \(weight\.SCB\) are missing"),
    ("nan", r"NaN or infinite"),
    ("short", r"expected \(16,\)"),
    ("float", r"not int8"),
])
def test_broken_int8_layer_is_named(int8_model, damage, problem):
    model, _ = int8_model
    layer = model.model.layers[1].self_attn.v_proj  # 32 -> 16
    weight = layer.weight
    saved_scb, saved_data = weight.SCB, weight.data
    try:
        if damage == "missing":
            weight.SCB = None
        elif damage == "nan":
            weight.SCB = saved_scb.clone()
            weight.SCB[3] = float("nan")
        elif damage == "short":
            weight.SCB = saved_scb[:8].clone()
        else:
            weight.data = saved_data.float()
        with refused(r"int8 layer model\.layers\.1\.self_attn\.v_proj \(Linear8bitLt\) is broken: .*" + problem):
            preflight.check_quantized_model(model)
    finally:
        weight.SCB, weight.data = saved_scb, saved_data
    preflight.check_quantized_model(model)


# -------------------------------------------------------------------------------------- ranks
def test_rank_fits(tiny_model):
    model, config = tiny_model
    routing = route_parameters(model, config)
    preflight.check_ranks(model, routing, config)  # rank 8 <= 16
    config16 = make_config(optimizer={"rank": 16})
    preflight.check_ranks(model, route_parameters(model, config16), config16)


def test_rank_too_large(tiny_model):
    model, _ = tiny_model
    config = make_config(optimizer={"rank": 24})
    routing = route_parameters(model, config)
    with refused(r"optimizer\.rank = 24 is larger than min\(rows, cols\) of 4 of the 14 GaLore weight") as err:
        preflight.check_ranks(model, routing, config)
    message = err.value.message
    assert "k_proj.weight" in message and "v_proj.weight" in message and "q_proj" not in message
    assert "set optimizer.rank: 16" in message


def test_rank_not_checked_after_fallback(int8_model):
    model, config = int8_model
    config = make_config(model={"name_or_path": config.model.name_or_path}, quantization={"enabled": True},
                         optimizer={"rank": 4096})
    routing = route_parameters(model, config)
    assert routing.optimizer_type == "adamw"
    preflight.check_ranks(model, routing, config)


# ------------------------------------------------------------------------------------ dataset
def test_dataset_ok():
    preflight.check_dataset(10, 2, 0, "train.jsonl (training.max_seq_len=128)")


def test_dataset_empty_train():
    with refused(r"no training examples left in data/train\.jsonl \(training\.max_seq_len=16\).*3 example\(s\) "
                 r"were dropped.*raise training\.max_seq_len"):
        preflight.check_dataset(0, 2, 3, "data/train.jsonl (training.max_seq_len=16)")


def test_dataset_empty_eval():
    with refused(r"no evaluation examples left in data/train\.jsonl.*data\.eval_file.*data\.eval_fraction"):
        preflight.check_dataset(5, 0, 0, "data/train.jsonl (training.max_seq_len=16)")


# ------------------------------------------------------------------------------- sequence len
def test_seq_len(tiny_model):
    model, _ = tiny_model
    preflight.check_seq_len(model, make_config(training={"max_seq_len": 64}))
    with refused(r"training\.max_seq_len = 65 exceeds the model's max_position_embeddings = 64; set "
                 r"training\.max_seq_len: 64.*model\.architecture\.max_position_embeddings"):
        preflight.check_seq_len(model, make_config(training={"max_seq_len": 65}))


# ------------------------------------------------------------------------------ model loading
def test_model_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json.*model\.name_or_path"):
        build_model(make_config(model={"name_or_path": str(tmp_path / "empty")}), vocab_size=VOCAB, device=CPU)
    with pytest.raises(ModelLoadError, match=r"does not exist.*model\.name_or_path"):
        build_model(make_config(model={"name_or_path": str(tmp_path / "nope")}), vocab_size=VOCAB, device=CPU)
