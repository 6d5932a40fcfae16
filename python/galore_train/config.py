"""The run configuration: YAML in, validated dataclasses out.

Every key is declared here with its type and default; an unknown key or a value of the wrong type is
an error that names the key (``training.lr``) and the file. ``--set key=value`` overrides use the same
dotted names. PyYAML reads ``1e-3`` as a string (YAML 1.1), so float keys accept numeric strings.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

OPTIMIZER_TYPES = ("galore", "galore_layerwise", "adamw", "adamw8bit")
PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16-mixed")
LR_SCHEDULERS = ("constant", "linear", "cosine")
# How torchrun's processes share the model: DDP replicas, or FSDP2 shards (fully_shard per block).
DISTRIBUTED_MODES = ("ddp", "fsdp2")
SVD_METHODS = ("randomized", "exact")
REFRESH_POLICIES = ("fixed", "adaptive")
STATE_DTYPES = ("float32", "bfloat16")
# Spellings of the state dtypes the library also takes, stored in their canonical name (so that a
# resume compares like with like).
STATE_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


@dataclass
class ArchitectureConfig:
    """The embedded default model: a small Qwen2-architecture causal LM built from a config."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0  # Qwen2's dropout on attention weights (training only)


@dataclass
class ModelConfig:
    # None: the embedded default (architecture below, vocabulary of the prepared tokenizer).
    # Otherwise a local Hugging Face model folder or a hub id, loaded with from_pretrained.
    name_or_path: Optional[str] = None
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # None: the embedded default dataset, prepared under <output_dir>/data by --prepare-data.
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_fraction: float = 0.05  # held out of train_file when eval_file is not given
    tokenizer: Optional[str] = None  # None: the model's tokenizer, or the prepared default one
    default_train_examples: int = 4000
    default_eval_examples: int = 256
    default_vocab_size: int = 384


@dataclass
class TrainingConfig:
    seed: int = 0
    epochs: int = 3
    max_steps: Optional[int] = None  # optimizer steps; None: run all epochs
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 3e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    max_grad_norm: Optional[float] = 1.0
    max_seq_len: int = 128
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    log_every: int = 10
    eval_every: int = 0  # optimizer steps between evaluations; 0: at each epoch's end only
    save_every: int = 0  # optimizer steps between checkpoints; 0: at each epoch's end only
    keep_last: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: str = "ddp"  # under torchrun: ddp (replicated model) | fsdp2 (parameters, gradients, state sharded)
    # How long a rank waits in a collective that another rank never joins (it failed outside one)
    # before it gives up with an error; None: torch's default (nccl 10 minutes, gloo 30).
    distributed_timeout_minutes: Optional[float] = None


@dataclass
class OptimizerConfig:
    type: str = "galore"
    rank: int = 32
    update_proj_gap: int = 50
    scale: float = 0.25
    proj_type: str = "std"
    target_modules: Union[str, list[str]] = "all-linear"
    svd: str = "randomized"
    oversample: Optional[int] = None
    niter: Optional[int] = None
    refresh_offset: Union[int, str] = 0
    refresh_policy: str = "fixed"  # fixed | adaptive (the gap doubles while the subspace holds still)
    max_proj_gap: Optional[int] = None  # adaptive: longest gap; null = 8 * update_proj_gap
    state_dtype: str = "float32"  # Adam moments (GaLore and plain AdamW groups): float32 | bfloat16 (half the bytes)
    stochastic_rounding: bool = False  # bf16 weights (training.precision: bf16) rounded stochastically


@dataclass
class QuantizationConfig:
    enabled: bool = False
    load_in_8bit: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    output_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------- loading
def load_config(path: Optional[Union[str, Path]], overrides: tuple[str, ...] = (), *, optimizer: Optional[str] = None) -> Config:
    """The validated configuration from ``path`` (None: all defaults), ``--set`` overrides applied."""
    raw: dict = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, data, training, ...), not {type(raw).__name__}.")
    for item in overrides:
        _apply_override(raw, item)
    if optimizer is not None:
        raw.setdefault("optimizer", {})["type"] = optimizer
    config = _build(Config, raw, prefix="", source=source)
    validate(config, source)
    return config


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    config = _build(Config, raw, prefix="", source=source)
    validate(config, source)
    return config


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. --set training.lr=1e-3")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"{source}: unknown key {prefix + unknown[0]!r}; known keys here: {known}")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".", source)
        else:
            values[name] = _coerce(value, hint, key, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` checked against the type ``hint`` (with float strings accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(hint)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} = {value!r} must be a list ({_type_name(hint)})")
        if origin is tuple and len(value) != len(args):
            raise ConfigError(f"{source}: {key} = {value!r} must have {len(args)} entries")
        inner = args if origin is tuple else [args[0]] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, inner))]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # an infinite lr or eps trains NaNs without an error
                raise ConfigError(f"{source}: {key} = {value!r} must be a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"{origin.__name__} of {', '.join(_type_name(a) for a in args)}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -------------------------------------------------------------------------------- validation
def validate(config: Config, source: str) -> None:
    """Value checks that need no model or data (those run in preflight)."""
    t, o = config.training, config.optimizer

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} {message}")

    def choice(value: str, key: str, options: tuple[str, ...]) -> None:
        need(value in options, key, f"= {value!r} must be one of {', '.join(options)}")

    choice(o.type, "optimizer.type", OPTIMIZER_TYPES)
    choice(o.svd, "optimizer.svd", SVD_METHODS)
    choice(o.proj_type, "optimizer.proj_type", PROJ_TYPES)
    choice(o.refresh_policy, "optimizer.refresh_policy", REFRESH_POLICIES)
    o.state_dtype = STATE_DTYPE_ALIASES.get(o.state_dtype, o.state_dtype)
    choice(o.state_dtype, "optimizer.state_dtype", STATE_DTYPES + tuple(STATE_DTYPE_ALIASES))
    need(o.max_proj_gap is None or o.max_proj_gap >= o.update_proj_gap, "optimizer.max_proj_gap",
         f"= {o.max_proj_gap} must be null or >= optimizer.update_proj_gap = {o.update_proj_gap}")
    choice(t.precision, "training.precision", PRECISIONS)
    choice(t.lr_scheduler, "training.lr_scheduler", LR_SCHEDULERS)
    choice(t.distributed, "training.distributed", DISTRIBUTED_MODES)
    need(t.distributed_timeout_minutes is None or t.distributed_timeout_minutes > 0,
         "training.distributed_timeout_minutes", f"= {t.distributed_timeout_minutes} must be > 0 or null "
         "(torch's default)")
    need(o.rank >= 1, "optimizer.rank", f"= {o.rank} must be >= 1")
    need(o.update_proj_gap >= 1, "optimizer.update_proj_gap", f"= {o.update_proj_gap} must be >= 1")
    need(o.scale > 0, "optimizer.scale", f"= {o.scale} must be > 0")
    need(o.refresh_offset == "stagger" or (isinstance(o.refresh_offset, int) and o.refresh_offset >= 0),
         "optimizer.refresh_offset", f"= {o.refresh_offset!r} must be an integer >= 0 or 'stagger'")
    need(t.epochs >= 1, "training.epochs", f"= {t.epochs} must be >= 1")
    need(t.max_steps is None or t.max_steps >= 1, "training.max_steps", f"= {t.max_steps} must be >= 1 or null")
    need(t.micro_batch_size >= 1, "training.micro_batch_size", f"= {t.micro_batch_size} must be >= 1")
    need(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps",
         f"= {t.gradient_accumulation_steps} must be >= 1")
    need(t.lr > 0, "training.lr", f"= {t.lr} must be > 0")
    need(t.warmup_steps >= 0, "training.warmup_steps", f"= {t.warmup_steps} must be >= 0")
    need(t.weight_decay >= 0, "training.weight_decay", f"= {t.weight_decay} must be >= 0")
    need(all(0 <= b < 1 for b in t.betas), "training.betas", f"= {list(t.betas)} must each be in [0, 1)")
    need(t.eps >= 0, "training.eps", f"= {t.eps} must be >= 0")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm", "must be > 0 or null (no clipping)")
    need(t.max_seq_len >= 8, "training.max_seq_len", f"= {t.max_seq_len} must be >= 8")
    for key in ("log_every", "eval_every", "save_every"):
        need(getattr(t, key) >= 0, f"training.{key}", "must be >= 0")
    need(t.log_every >= 1, "training.log_every", "must be >= 1")
    need(0 < config.data.eval_fraction < 1, "data.eval_fraction", "must be in (0, 1)")
    need(config.data.eval_file is None or config.data.train_file is not None, "data.eval_file",
         f"= {config.data.eval_file!r} is set but data.train_file is null: the embedded default dataset has its own "
         "eval split; set data.train_file to your training data too, or remove data.eval_file")
    need(bool(config.output_dir), "output_dir", "must be a folder path")
    for key in ("oversample", "niter"):
        value = getattr(o, key)
        need(value is None or value >= 0, f"optimizer.{key}", f"= {value} must be >= 0 or null (the default)")
    a = config.model.architecture
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        need(getattr(a, key) >= 1, f"model.architecture.{key}", f"= {getattr(a, key)} must be >= 1")
    need(a.hidden_size % a.num_attention_heads == 0, "model.architecture.hidden_size",
         f"= {a.hidden_size} must be a multiple of num_attention_heads = {a.num_attention_heads}")
    need((a.hidden_size // a.num_attention_heads) % 2 == 0, "model.architecture.hidden_size",
         f"= {a.hidden_size} over num_attention_heads = {a.num_attention_heads} gives an odd head size "
         f"{a.hidden_size // a.num_attention_heads}; rotary position embeddings need it even")
    need(a.num_attention_heads % a.num_key_value_heads == 0, "model.architecture.num_key_value_heads",
         f"= {a.num_key_value_heads} must divide num_attention_heads = {a.num_attention_heads}")
    need(0.0 <= a.attention_dropout < 1.0, "model.architecture.attention_dropout",
         f"= {a.attention_dropout} must be in [0, 1)")
