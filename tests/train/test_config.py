"""Config loading: every shipped config validates; unknown keys and wrong types name the key."""
from pathlib import Path

import pytest

from galore_train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "python" / "configs"


@pytest.mark.parametrize("name", ["default", "galore_compare_galore", "galore_compare_adamw", "quantized_8bit", "real_model"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.output_dir


def test_compare_configs_differ_only_in_optimizer_and_output():
    galore = load_config(CONFIGS / "galore_compare_galore.yaml").to_dict()
    adamw = load_config(CONFIGS / "galore_compare_adamw.yaml").to_dict()
    assert galore.pop("output_dir") != adamw.pop("output_dir")
    assert (galore["optimizer"].pop("type"), adamw["optimizer"].pop("type")) == ("galore", "adamw")
    assert galore == adamw


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'training\.lrr'.*training\.lr"):
        load_config(write(tmp_path, "training:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'"):
        load_config(write(tmp_path, "trainer: {}\n"))


@pytest.mark.parametrize("text, key", [
    ("training:\n  epochs: three\n", "training.epochs"),
    ("training:\n  epochs: 2.5\n", "training.epochs"),
    ("training:\n  gradient_checkpointing: 1\n", "training.gradient_checkpointing"),
    ("training:\n  betas: [0.9]\n", "training.betas"),
    ("optimizer:\n  target_modules: 5\n", "optimizer.target_modules"),
    ("model:\n  architecture:\n    hidden_size: big\n", "model.architecture.hidden_size"),
    ("training:\n  precision: fp8\n", "training.precision"),
    ("training:\n  distributed: deepspeed\n", "training.distributed"),
    ("training:\n  distributed_timeout_minutes: 0\n", "training.distributed_timeout_minutes"),
    ("training:\n  distributed_timeout_minutes: soon\n", "training.distributed_timeout_minutes"),
    ("optimizer:\n  type: sgd\n", "optimizer.type"),
    ("optimizer:\n  rank: 0\n", "optimizer.rank"),
    ("optimizer:\n  state_dtype: float16\n", "optimizer.state_dtype"),
    ("training:\n  lr: .inf\n", "training.lr"),
    ("training:\n  eps: .nan\n", "training.eps"),
    ("optimizer:\n  scale: 1e400\n", "optimizer.scale"),
    ("optimizer:\n  oversample: -5\n", "optimizer.oversample"),
    ("optimizer:\n  niter: -1\n", "optimizer.niter"),
    ("model:\n  architecture:\n    num_key_value_heads: 0\n", "model.architecture.num_key_value_heads"),
    ("model:\n  architecture:\n    num_attention_heads: 0\n", "model.architecture.num_attention_heads"),
    ("model:\n  architecture:\n    hidden_size: 36\n    num_attention_heads: 4\n", "model.architecture.hidden_size"),
    ("model:\n  architecture:\n    intermediate_size: -1\n", "model.architecture.intermediate_size"),
    ("data:\n  eval_file: held_out.jsonl\n", "data.eval_file"),
])
def test_wrong_types_and_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_yaml_float_strings_and_overrides(tmp_path):
    # PyYAML reads 1e-3 as a string; float keys accept it.
    config = load_config(write(tmp_path, "training:\n  lr: 1e-3\n"),
                         ("training.epochs=5", "optimizer.target_modules=[q_proj, v_proj]", "training.max_steps=null"),
                         optimizer="galore_layerwise")
    assert config.training.lr == pytest.approx(1e-3)
    assert config.training.epochs == 5
    assert config.optimizer.target_modules == ["q_proj", "v_proj"]
    assert config.training.max_steps is None
    assert config.optimizer.type == "galore_layerwise"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ("training.lr",))


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))


@pytest.mark.parametrize("spelling, canonical", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_state_dtype_spellings_are_stored_canonically(tmp_path, spelling, canonical):
    """The library's spellings work here too, stored by one name (a resume compares the names)."""
    config = load_config(write(tmp_path, f"optimizer:\n  state_dtype: {spelling}\n"))
    assert config.optimizer.state_dtype == canonical
    assert config.to_dict()["optimizer"]["state_dtype"] == canonical
