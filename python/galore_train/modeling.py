"""The model: the embedded default Qwen2-architecture LM, or any causal LM loaded with from_pretrained.

* ``model.name_or_path: null`` builds the embedded default from ``model.architecture`` (a
  ``transformers.Qwen2Config``) with the tokenizer's vocabulary size, seeded with ``training.seed``
  so two runs start from identical weights.
* Otherwise ``AutoModelForCausalLM.from_pretrained(name_or_path)``: one code path for a local model
  folder and a Hugging Face Hub id. Nothing is forced online; ``HF_HUB_OFFLINE`` is respected.
* ``quantization.enabled`` (mode A): the Linear layers are loaded as bitsandbytes ``Linear8bitLt``
  int8 layers (frozen); embeddings, norms, biases and the output head stay float and trainable. The
  embedded default is first saved to a temporary folder and loaded back through the same quantized
  ``from_pretrained`` call, so mode A works on it too (nothing is written under ``output_dir``).

Every loading failure is a :class:`ModelLoadError` whose message says which config key to change.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import Config

__all__ = ["ModelLoadError", "build_model", "is_quantized_module", "resolve_device", "model_dtype"]

# bitsandbytes layer classes whose weight is stored quantized (bitsandbytes also has float layers,
# e.g. StableEmbedding, which must not count as quantized).
_QUANTIZED_CLASS_HINTS = ("8bit", "4bit", "fp4", "nf4", "int8")


class ModelLoadError(RuntimeError):
    """The model could not be built or loaded; the message says what to change."""


# ------------------------------------------------------------------------------------ device
def resolve_device(spec: str) -> torch.device:
    """``training.device`` as a torch device: auto | cpu | cuda | cuda:N.

    Raises a ``ValueError`` (that is also a ``PreflightError``, so the CLI exits 2) naming the fix when
    CUDA is asked for but not usable here, or the spec is not one of those forms.
    """
    from .preflight import DeviceError

    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index: Optional[int] = None
        if text != "cuda":
            suffix = text[len("cuda:"):]
            if not suffix.isdigit():
                raise DeviceError(f"training.device = {spec!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index)")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise DeviceError(
                f"training.device = {spec!r} but CUDA is not available on this machine (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); set training.device: cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise DeviceError(
                f"training.device = {spec!r} but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                "set training.device to one of those, or to cuda / auto"
            )
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    raise DeviceError(f"training.device = {spec!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index)")


# ------------------------------------------------------------------------------ quantization
def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` holds a quantized weight (bitsandbytes Linear8bitLt / Linear4bit and the like).

    Detected without importing bitsandbytes: a bitsandbytes layer class whose name says 8/4-bit, a
    bitsandbytes weight class (Int8Params, Params4bit), a weight carrying ``SCB`` (int8 row scales) or
    ``quant_state`` (4-bit), or a non-floating-point (int8/uint8) weight.
    """
    cls = type(module)
    if cls.__module__.startswith("bitsandbytes") and any(h in cls.__name__.lower() for h in _QUANTIZED_CLASS_HINTS):
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if type(weight).__module__.startswith("bitsandbytes"):
        return True
    if hasattr(weight, "SCB") or hasattr(weight, "quant_state"):
        return True
    return not weight.dtype.is_floating_point and not weight.dtype.is_complex


def quantized_weight_kind(module: nn.Module) -> str:
    """A short description of a quantized module's weight: 'int8', '4-bit' or 'quantized'."""
    weight = getattr(module, "weight", None)
    name = type(module).__name__.lower()
    if "4bit" in name or "fp4" in name or "nf4" in name or hasattr(weight, "quant_state"):
        return "4-bit"
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 or "8bit" in name:
        return "int8"
    return "quantized"


# ------------------------------------------------------------------------------------- model
def model_dtype(config: Config) -> torch.dtype:
    """The dtype of the (non-quantized) weights: bf16 for precision bf16, float32 otherwise."""
    return torch.bfloat16 if config.training.precision == "bf16" else torch.float32


def build_model(
    config: Config,
    *,
    vocab_size: Optional[int],
    device: torch.device,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
):
    """The model to train, on ``device``, in train mode, dtype and quantization as configured.

    ``vocab_size``: the tokenizer's size (``len(tokenizer)``). The embedded default uses it as its
    vocabulary (None: ``data.default_vocab_size``); a loaded model must have at least that many
    embedding rows (ModelLoadError otherwise). The special-token ids are optional and only written
    into the embedded default's config.
    """
    device = torch.device(device)
    dtype = model_dtype(config)
    quantize = config.quantization.enabled
    if quantize and not config.quantization.load_in_8bit:
        raise ModelLoadError(
            "quantization.load_in_8bit = false asks for 4-bit loading, which this trainer does not support yet; "
            "set quantization.load_in_8bit: true (or quantization.enabled: false)"
        )
    if config.model.name_or_path is None:
        default = _build_default(config, vocab_size, bos_token_id, eos_token_id, pad_token_id)
        if quantize:
            # The same quantized from_pretrained path as a folder: through a temporary folder that is
            # removed afterwards (the loaded tensors are independent of the files).
            with tempfile.TemporaryDirectory(prefix="galore_default_model_") as tmp:
                # Every rank writes its own folder: once torch.distributed is up, transformers (5.x)
                # writes on rank 0 only and would leave the other ranks' folders empty.
                if hasattr(default, "should_save_on_this_rank"):
                    default.should_save_on_this_rank = lambda is_main_process: True
                default.save_pretrained(tmp, is_main_process=True)
                del default
                model = _from_pretrained(tmp, config, dtype, device, source="the embedded default model")
        else:
            model = default.to(device=device, dtype=dtype)
    else:
        model = _from_pretrained(config.model.name_or_path, config, dtype, device, source=None)
        if not quantize:
            model = model.to(device)
        _check_vocab(model, vocab_size, config)

    if quantize:
        _freeze_quantized(model)
        # bitsandbytes warns on every int8 matmul that float inputs are cast to fp16; once is enough.
        warnings.filterwarnings("once", message=r"MatMul8bitLt: inputs will be cast")
    if config.training.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()
    return model


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers 5 renamed the method; both are accepted)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _build_default(config: Config, vocab_size, bos_token_id, eos_token_id, pad_token_id):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = config.model.architecture
    vocab = int(vocab_size) if vocab_size is not None else int(config.data.default_vocab_size)
    if vocab < 1:
        raise ModelLoadError(f"the tokenizer has {vocab} tokens; point data.tokenizer at a real tokenizer")
    special = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                 ("pad_token_id", pad_token_id)) if v is not None}
    qcfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=a.tie_word_embeddings,
        attention_dropout=a.attention_dropout,
        use_cache=False,
        attn_implementation="sdpa",
        **special,
    )
    torch.manual_seed(config.training.seed)
    model = Qwen2ForCausalLM(qcfg)
    return model


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.count("/") > 1
        or text in (".", "..")
    )


def _from_pretrained(name_or_path: str, config: Config, dtype: torch.dtype, device: torch.device, *, source):
    """``AutoModelForCausalLM.from_pretrained`` with errors turned into ModelLoadError."""
    from transformers import AutoModelForCausalLM

    what = source or f"model.name_or_path = {name_or_path!r}"
    local = Path(os.path.expanduser(name_or_path))
    is_local = local.exists()
    if is_local:
        if not local.is_dir():
            raise ModelLoadError(
                f"{what} is a file, not a model folder; point model.name_or_path at the folder that holds "
                "config.json and the weights (what save_pretrained writes), or set it to null for the embedded default"
            )
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{what}: the folder {local} has no config.json, so it is not a Hugging Face model folder; point "
                "model.name_or_path at the folder that holds config.json and the weights (what save_pretrained "
                "writes), or set it to null for the embedded default"
            )
        name_or_path = str(local)
    elif _looks_like_path(name_or_path):
        raise ModelLoadError(
            f"{what}: the folder {local} does not exist; fix model.name_or_path (a model folder or a Hugging Face "
            "hub id such as Qwen/Qwen2.5-0.5B), or set it to null for the embedded default"
        )

    kwargs = dict(trust_remote_code=config.model.trust_remote_code, dtype=dtype)
    if config.quantization.enabled:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
            import accelerate  # noqa: F401
        except ImportError as err:
            raise ModelLoadError(
                f"quantization.enabled needs bitsandbytes and accelerate ({err}); `pip install bitsandbytes>=0.45 "
                "accelerate`, or set quantization.enabled: false"
            ) from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": _indexed(device)}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - every loading failure becomes a message with a fix
        raise ModelLoadError(_load_failure_message(name_or_path, what, is_local, err)) from err


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _load_failure_message(name_or_path: str, what: str, is_local: bool, err: Exception) -> str:
    detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    text = str(err)
    if "trust_remote_code" in text:
        return (
            f"{what} could not be loaded ({detail}). The model ships its own code: if you trust it, set "
            "model.trust_remote_code: true"
        )
    if is_local:
        return (
            f"{what} could not be loaded from the folder {name_or_path} ({detail}). Check that the folder holds "
            "config.json and the weights (model.safetensors or pytorch_model.bin, as save_pretrained writes them) of "
            "a causal language model, or set model.name_or_path to another folder (null: the embedded default)"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
           else "it could not be fetched (is there network?) and is not in the local Hugging Face cache")
    return (
        f"{what} could not be loaded ({detail}). No folder of that name exists, so it was treated as a Hugging Face "
        f"Hub id, and {why}. If this machine has no network, download the model on a machine that has one "
        f"with `galore-train download {name_or_path} --to DIR`, copy DIR here and set model.name_or_path: DIR. "
        "If it has network, check the id's spelling (and HF_TOKEN for gated models)."
    )


def _check_vocab(model, vocab_size: Optional[int], config: Config) -> None:
    if vocab_size is None:
        return
    embeddings = model.get_input_embeddings()
    rows = getattr(getattr(embeddings, "weight", None), "shape", (None,))[0]
    if rows is not None and vocab_size > rows:
        raise ModelLoadError(
            f"the tokenizer has {vocab_size} tokens but model.name_or_path = {config.model.name_or_path!r} has only "
            f"{rows} embedding rows, so some token ids would index past the embedding; set data.tokenizer to the "
            "model's own tokenizer (or null to use the one in the model folder)"
        )


def _freeze_quantized(model: nn.Module) -> None:
    """Mode A: quantized base weights frozen, every float parameter trainable."""
    quantized_weights = set()
    for module in model.modules():
        if is_quantized_module(module):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                quantized_weights.add(id(weight))
                if weight.requires_grad:
                    weight.requires_grad_(False)
    for param in model.parameters():
        if id(param) not in quantized_weights and param.dtype.is_floating_point and not param.requires_grad:
            param.requires_grad_(True)
