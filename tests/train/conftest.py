"""Shared set-up for trainer tests: one prepared tiny dataset, tiny configs, run helpers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import torch

from galore_train.cli import main as cli_main
from galore_train.config import config_from_dict
from galore_train.data import prepare_default_data

TINY_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True}
# Module-level tests (routing, preflight) build the embedded default at this size with a 64-token vocabulary.
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
VOCAB = 64
CPU = torch.device("cpu")
DATA_SIZES = {"default_train_examples": 96, "default_eval_examples": 16, "default_vocab_size": 384}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The embedded default dataset at tiny size, prepared once for the session."""
    root = tmp_path_factory.mktemp("prepared")
    return prepare_default_data(root / "data", seed=0, n_train=DATA_SIZES["default_train_examples"],
                                n_eval=DATA_SIZES["default_eval_examples"], vocab_size=DATA_SIZES["default_vocab_size"])


def merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base`` section by section (nested dicts merge, other values replace)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def make_config(**sections):
    return config_from_dict(merge({"model": {"architecture": dict(ARCH)}, "optimizer": {"rank": 8}}, sections))


def tiny_config(out: Path, prepared, **sections) -> dict:
    """A tiny run on the prepared data given as user files (so nothing is prepared per test)."""
    config = {
        "output_dir": str(out),
        "model": {"architecture": dict(TINY_ARCH)},
        "data": {"train_file": str(prepared.train_path), "eval_file": str(prepared.eval_path),
                 "tokenizer": str(prepared.tokenizer_dir)},
        "training": {"seed": 0, "epochs": 2, "micro_batch_size": 8, "gradient_accumulation_steps": 1,
                     "lr": 3e-3, "warmup_steps": 2, "max_seq_len": 64, "log_every": 1, "save_every": 0,
                     "keep_last": 10, "max_grad_norm": None},
        "optimizer": {"type": "galore", "rank": 4, "update_proj_gap": 3},
    }
    return merge(config, sections)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(config: dict, tmp_path: Path, *extra: str, name: str = "config.yaml") -> int:
    return cli_main(["--config", str(write_config(tmp_path / name, config)), *extra])


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_subprocess(args: list, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def final_weights(out: Path) -> dict:
    steps = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*"))
    return load_file(str(steps[-1][1] / "model.safetensors"))


