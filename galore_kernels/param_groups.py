"""Build optimizer parameter groups for GaLore from a model and a module selection.

GaLore projects the gradients of 2-D weight matrices into a low-rank subspace; every other
trainable tensor (embeddings, norms, biases, the output head) is updated as usual. This module
turns a ``target_modules`` selection -- the same values Hugging Face's
``TrainingArguments.optim_target_modules`` accepts -- into two optimizer parameter groups:

    groups = galore_param_groups(model, ["q_proj", "v_proj"], rank=128)
    optimizer = GaLoreAdamW(groups, lr=1e-3)

Matching follows transformers' ``check_target_module_exists``:

* a single string is a regex that must ``re.fullmatch`` a module name from ``named_modules()``;
* a list or tuple of strings matches a name that is in the list, that contains an entry as a
  substring, or that an entry regex-fullmatches;
* the string ``"all-linear"`` (or ``"all_linear"``) selects every ``nn.Linear`` except the
  model's output head (PEFT's convention), because projecting the vocabulary-sized head hurts
  quality and the head is often tied to the input embedding.

Matched modules that GaLore cannot project are reported, not silently dropped: modules that are
not ``nn.Linear``, frozen layers, bitsandbytes-quantized layers and non-2-D weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any, Union

import torch
from torch import nn

from .projection import check_proj_type, check_rank, check_update_proj_gap

__all__ = ["galore_param_groups", "match_galore_modules"]

logger = logging.getLogger("galore_kernels")

TargetModules = Union[str, list[str], tuple[str, ...]]

_ALL_LINEAR = "all-linear"
_EXAMPLES = '["q_proj", "v_proj"], r".*\\.mlp\\..*" or "all-linear"'


# --------------------------------------------------------------------------------------------
# target_modules validation and name matching
# --------------------------------------------------------------------------------------------


def _is_all_linear(target_modules: TargetModules) -> bool:
    # transformers treats "all_linear" and "all-linear" alike (case-sensitive), only as a str.
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == _ALL_LINEAR


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"target_modules entry {pattern!r} is not a valid regular expression ({err}); "
            f"pass names or regexes such as {_EXAMPLES}"
        ) from None


def _validate_target_modules(target_modules: Any) -> None:
    """Raise TypeError/ValueError unless ``target_modules`` is a str or a list/tuple of str."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(f"target_modules must not be an empty string; use e.g. {_EXAMPLES}")
        if not _is_all_linear(target_modules):
            _check_regex(target_modules)
        return
    if not isinstance(target_modules, (list, tuple)):
        raise TypeError(
            "target_modules must be a regex string, a list of module names/regexes or "
            f"'all-linear', e.g. {_EXAMPLES}; got {type(target_modules).__name__}"
        )
    if not target_modules:
        raise ValueError(f"target_modules must not be empty; use e.g. {_EXAMPLES}")
    for entry in target_modules:
        if not isinstance(entry, str):
            raise TypeError(
                f"target_modules entries must be strings, got {entry!r} "
                f"({type(entry).__name__}); use e.g. {_EXAMPLES}"
            )
        # An empty entry is a substring of every name and would select the whole model.
        if not entry:
            raise ValueError(f"target_modules must not contain an empty string; use e.g. {_EXAMPLES}")
        _check_regex(entry)


def _match(target_modules: TargetModules, name: str) -> tuple[bool, bool]:
    """Return (matched, by_regex) for one module name, like ``check_target_module_exists``."""
    if isinstance(target_modules, str):
        # A single string equal to the name counts as a literal match, as in transformers.
        return bool(re.fullmatch(target_modules, name)), target_modules != name
    if name in target_modules or any(entry in name for entry in target_modules):
        return True, False
    return any(re.fullmatch(entry, name) for entry in target_modules), True


# --------------------------------------------------------------------------------------------
# per-module eligibility
# --------------------------------------------------------------------------------------------


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (Hugging Face ``get_output_embeddings``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except NotImplementedError:
        return None
    return head if isinstance(head, nn.Module) else None


def _from_bitsandbytes(obj: object) -> bool:
    return type(obj).__module__.startswith("bitsandbytes")


def _quantized_reason(module: nn.Module, weight: torch.Tensor) -> str | None:
    """Why a layer counts as quantized, detected without importing bitsandbytes."""
    for obj in (module, weight):
        if _from_bitsandbytes(obj):
            return f"quantized by bitsandbytes ({type(obj).__name__})"
    # Int8Params carries SCB (row scales), Params4bit carries quant_state, even before
    # the weight is actually quantized on its device.
    for attr in ("SCB", "quant_state"):
        if hasattr(weight, attr):
            return f"quantized (weight has a {attr} attribute)"
    if not weight.dtype.is_floating_point:
        return f"quantized (weight dtype {weight.dtype} is not floating point)"
    return None


def _ineligible_reason(module: nn.Linear) -> str | None:
    """Why a matched nn.Linear's weight cannot be projected, or None if it can."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "has no weight tensor"
    # Quantization is checked before requires_grad: bitsandbytes freezes its int8/4-bit
    # weights, and "quantized" is the more useful explanation.
    quantized = _quantized_reason(module, weight)
    if quantized is not None:
        return quantized
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, GaLore projects 2-D weights only"
    if not isinstance(weight, nn.Parameter):
        return "weight is not an nn.Parameter"
    if not weight.requires_grad:
        return "frozen (weight.requires_grad is False)"
    return None


def _head_reason(
    module: nn.Module, head: nn.Module | None, head_name: str | None
) -> str | None:
    """Why 'all-linear' leaves this Linear out as (or as sharing weights with) the head."""
    if head is None:
        return None
    if module is head:
        return "output head (get_output_embeddings), excluded by 'all-linear'"
    head_weight = getattr(head, "weight", None)
    if head_weight is not None and getattr(module, "weight", None) is head_weight:
        return f"shares its weight with the output head {head_name!r}, excluded by 'all-linear'"
    return None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _candidates(
    model: nn.Module, target_modules: TargetModules
) -> Iterator[tuple[str, nn.Module, bool]]:
    """Yield (name, module, by_regex) for each matched module, in named_modules() order."""
    all_linear = _is_all_linear(target_modules)
    for name, module in model.named_modules():
        if all_linear:
            if isinstance(module, nn.Linear):
                yield name, module, False
            continue
        matched, by_regex = _match(target_modules, name)
        if matched:
            yield name, module, by_regex


def match_galore_modules(
    model: nn.Module, target_modules: TargetModules
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Which modules' weights GaLore projects: ``(selected, left_out)``.

    ``selected`` is ``[(name, module)]`` for matched ``nn.Linear`` layers (subclasses included)
    whose weight is a trainable, floating-point, 2-D ``nn.Parameter``. ``left_out`` is
    ``[(name, reason)]`` for matched modules that cannot be projected: frozen, quantized by
    bitsandbytes (or any non-floating-point weight), not 2-D, or -- under ``"all-linear"`` --
    the output head and any Linear sharing its weight.

    Matched modules that are not ``nn.Linear`` are reported only when the match was literal
    (exact name or substring, or a single string equal to the name), as transformers does: a
    regex such as ``".*attn.*"`` also matches the attention block containers, and listing them
    would bury the useful reasons. ``"all-linear"`` only considers ``nn.Linear`` modules.

    Both lists follow ``model.named_modules()`` order. Linears that share one weight are all
    listed in ``selected``; :func:`galore_param_groups` counts the weight once.

    Raises ``TypeError``/``ValueError`` for an invalid ``target_modules``. An empty selection is
    returned as is; :func:`galore_param_groups` turns it into an error.
    """
    _validate_target_modules(target_modules)
    head = _output_head(model) if _is_all_linear(target_modules) else None
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    selected: list[tuple[str, nn.Module]] = []
    left_out: list[tuple[str, str]] = []
    for name, module, by_regex in _candidates(model, target_modules):
        if not isinstance(module, nn.Linear):
            if not by_regex:
                left_out.append((name, f"not an nn.Linear ({type(module).__name__})"))
            continue
        reason = _head_reason(module, head, head_name) or _ineligible_reason(module)
        if reason is None:
            selected.append((name, module))
        else:
            left_out.append((name, reason))
    return selected, left_out


def _validate_hyperparameters(rank: Any, update_proj_gap: Any, scale: Any, proj_type: Any) -> None:
    check_rank(rank)
    check_update_proj_gap(update_proj_gap)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a finite number > 0 (e.g. scale=0.25), got {scale!r}")
    check_proj_type(proj_type)


def _no_selection_error(
    model: nn.Module, target_modules: TargetModules, left_out: list[tuple[str, str]]
) -> ValueError:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    examples = ", ".join(repr(n) for n in linears[:5]) or "none"
    if left_out:
        reasons = "; ".join(f"{n}: {r}" for n, r in left_out[:5])
        what = f"matched modules but none can be projected ({reasons})"
    else:
        what = "matched no module"
    return ValueError(
        f"target_modules={target_modules!r} {what}. nn.Linear modules in this model include: "
        f"{examples}. Pass names, substrings or regexes of those, e.g. {_EXAMPLES}."
    )


def _log_selection(left_out: list[tuple[str, str]], n_galore: int, n_plain: int) -> None:
    if left_out:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in left_out)
        logger.warning("GaLore left out %d matched module(s):\n%s", len(left_out), lines)
    logger.info(
        "GaLore projects %d weight(s); %d other trainable tensor(s) use the plain update",
        n_galore,
        n_plain,
    )


def galore_param_groups(
    model: nn.Module,
    target_modules: TargetModules,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **kw: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a GaLore group and a plain group.

    Returns ``[{"params": galore, "rank": ..., "update_proj_gap": ..., "scale": ...,
    "proj_type": ..., **kw}, {"params": plain}]``, dropping an empty group (torch optimizers
    reject them). The GaLore group holds the weights of the modules selected by
    :func:`match_galore_modules`; the plain group every other parameter with
    ``requires_grad=True``. Frozen parameters are in no group. Each parameter object appears
    once overall -- tied weights included -- and the order in both groups follows
    ``model.named_parameters()``, so per-parameter state is deterministic.

    Logs one WARNING listing the left-out matched modules (if any) and one INFO line with the
    number of projected weights, on the ``"galore_kernels"`` logger.

    Raises ``ValueError`` for invalid hyperparameters or ``target_modules``, or when no module
    can be projected (catch it for a silent fallback to a plain optimizer).
    """
    _validate_hyperparameters(rank, update_proj_gap, scale, proj_type)
    if "params" in kw:
        raise TypeError("galore_param_groups() got 'params' in **kw; the groups set it themselves")
    selected, left_out = match_galore_modules(model, target_modules)
    if not selected:
        raise _no_selection_error(model, target_modules, left_out)

    galore_ids = {id(module.weight) for _, module in selected}
    galore: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    # named_parameters() yields each parameter object once, so tied weights are not duplicated.
    for _, param in model.named_parameters():
        if param.requires_grad:
            (galore if id(param) in galore_ids else plain).append(param)

    _log_selection(left_out, len(galore), len(plain))
    galore_group = {
        "params": galore,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        **kw,
    }
    return [group for group in (galore_group, {"params": plain}) if group["params"]]
