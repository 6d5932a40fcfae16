"""Which optimizer updates each parameter: GaLore, plain AdamW, or nothing (frozen).

One function, :func:`route_parameters`, decides for every parameter of the model and says why; the
optimizer builder only reads the result (:meth:`RoutingTable.galore_params` /
:meth:`RoutingTable.adamw_params`), and the trainer prints :meth:`RoutingTable.format`.

Rules
    * ``optimizer.type`` galore / galore_layerwise: the weights that
      ``galore_kernels.param_groups.match_galore_modules(model, optimizer.target_modules)`` selects go
      to GaLore; every other trainable parameter to AdamW, with the reason (embedding, norm, bias,
      output head, matched-but-why-not, ...).
    * ``optimizer.type`` adamw / adamw8bit: every trainable parameter to AdamW.
    * ``requires_grad=False`` parameters and the weights of quantized layers are frozen; quantized
      layers never get GaLore.
    * GaLore asked for but no weight eligible: the effective optimizer is ``adamw`` and
      :attr:`RoutingTable.fallback_note` is the one line saying so and why.
    * Nothing trainable at all: :class:`RoutingError`.

Tied parameters (``lm_head.weight`` is ``model.embed_tokens.weight``) appear once, under the name
``named_parameters()`` keeps (the first), with the tie noted in the reason.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from torch import nn

from galore_kernels.param_groups import _is_all_linear, _output_head, match_galore_modules

from .config import Config
from .modeling import is_quantized_module, quantized_weight_kind

__all__ = ["Route", "RoutingError", "RoutingTable", "route_parameters", "DECISIONS"]

DECISIONS = ("galore", "adamw", "frozen")
GALORE_TYPES = ("galore", "galore_layerwise")


class RoutingError(ValueError):
    """The model cannot be trained as configured; the message says what to change."""


@dataclass(frozen=True)
class Route:
    name: str
    shape: tuple[int, ...]
    dtype: str
    decision: str  # "galore" | "adamw" | "frozen"
    reason: str

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class RoutingTable:
    routes: list[Route]
    optimizer_type: str  # the effective type, after a fallback
    fallback_note: Optional[str] = None
    requested_type: Optional[str] = None  # optimizer.type as configured

    # ---------------------------------------------------------------------------- parameters
    def _params(self, model: nn.Module, decision: str) -> list[nn.Parameter]:
        names = {r.name for r in self.routes if r.decision == decision}
        # named_parameters() yields each parameter object once (the first name of a tied weight).
        return [p for n, p in model.named_parameters() if n in names]

    def galore_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The GaLore-routed parameters of ``model``, in ``named_parameters()`` order."""
        return self._params(model, "galore")

    def adamw_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The AdamW-routed parameters of ``model``, in ``named_parameters()`` order."""
        return self._params(model, "adamw")

    # -------------------------------------------------------------------------------- summary
    def counts(self) -> dict:
        """``{"galore": {"tensors": n, "elements": n}, "adamw": {...}, "frozen": {...}}``."""
        out = {d: {"tensors": 0, "elements": 0} for d in DECISIONS}
        for r in self.routes:
            out[r.decision]["tensors"] += 1
            out[r.decision]["elements"] += r.elements
        return out

    def format(self) -> str:
        """The decision table: name | shape | dtype | route | reason, layers grouped, then totals."""
        rows = [("name", "shape", "dtype", "route", "reason")]
        for name, count, route in _grouped(self.routes):
            label = f"{name}  x{count}" if count > 1 else name
            rows.append((label, _shape(route.shape), route.dtype, route.decision, route.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]

        def line(row) -> str:
            return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]

        requested = self.requested_type or self.optimizer_type
        title = f"parameter routing (optimizer: {self.optimizer_type}"
        title += f", requested {requested})" if requested != self.optimizer_type else ")"
        lines = [title, line(rows[0]), line(tuple("-" * w for w in widths) + ("-" * 6,))]
        lines += [line(row) for row in rows[1:]]
        counts = self.counts()
        total_t = sum(c["tensors"] for c in counts.values())
        total_e = sum(c["elements"] for c in counts.values())
        lines.append("totals: " + ", ".join(
            f"{d} {counts[d]['tensors']} tensors / {counts[d]['elements']:,} elements" for d in DECISIONS
        ) + f"; all {total_t} tensors / {total_e:,} elements")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _grouped(routes: list[Route]) -> list[tuple[str, int, Route]]:
    """(display name, count, a representative route): routes equal but for their layer indices
    (shape, dtype, decision and reason included) are one row, their indices replaced by ``*``. When
    the layers of one name pattern route differently, the indices are listed instead, e.g.
    ``model.layers.{0-2,5}.mlp.up_proj.weight``."""
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in routes:
        template = _INDEX.sub("*", r.name)
        key = (template, r.shape, r.dtype, r.decision, r.reason)
        groups.setdefault(key, []).append(r)
    per_template: dict[str, int] = {}
    for key in groups:
        per_template[key[0]] = per_template.get(key[0], 0) + 1
    out = []
    for key, members in groups.items():
        template = key[0]
        if len(members) == 1:
            out.append((members[0].name, 1, members[0]))
            continue
        name = template
        if per_template[template] > 1 and template.count("*") == 1:
            indices = [int(_INDEX.findall(m.name)[0]) for m in members]
            name = template.replace("*", "{" + _ranges(indices) + "}")
        out.append((name, len(members), members[0]))
    return out


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    parts, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


# -------------------------------------------------------------------------------------- rules
def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name or isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))


def _kind(pname: str, owner: Optional[nn.Module], head: Optional[nn.Module], all_linear: bool) -> str:
    """Why a trainable parameter is not projected, from what it is."""
    leaf = pname.rsplit(".", 1)[-1]
    if owner is not None and owner is head and leaf == "weight":
        return "output head (excluded by all-linear)" if all_linear else "output head (not matched by target_modules)"
    if isinstance(owner, nn.Embedding) or "embed" in type(owner).__name__.lower():
        return "embedding"
    if owner is not None and _is_norm(owner):
        return "norm"
    if leaf == "bias":
        return "bias"
    if isinstance(owner, nn.Linear) and leaf == "weight":
        return "Linear weight not matched by target_modules"
    kind = type(owner).__name__ if owner is not None else "parameter"
    return f"{kind} {leaf} (not a matched Linear weight)"


def route_parameters(model: nn.Module, config: Config) -> RoutingTable:
    """The routing decision for every parameter of ``model`` under ``config.optimizer``."""
    requested = config.optimizer.type
    use_galore = requested in GALORE_TYPES
    target = config.optimizer.target_modules

    # Owner module and every name of each parameter object (several names: a tied weight).
    owner: dict[int, nn.Module] = {}
    aliases: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{leaf}" if mname else leaf
            aliases.setdefault(id(p), [])
            if full not in aliases[id(p)]:
                aliases[id(p)].append(full)
            if id(p) not in owner:
                owner[id(p)] = module

    selected_ids: set[int] = set()
    left_out: dict[int, tuple[nn.Module, str]] = {}  # weight id -> (matched module, why not projected)
    head = _output_head(model)
    all_linear = use_galore and _is_all_linear(target)
    if use_galore:
        try:
            selected, left = match_galore_modules(model, target)
        except (TypeError, ValueError) as err:
            raise RoutingError(f"optimizer.target_modules = {target!r}: {err}") from None
        selected_ids = {id(m.weight) for _, m in selected}
        modules = dict(model.named_modules())
        for mname, reason in left:
            module = modules.get(mname)
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                left_out.setdefault(id(weight), (module, reason))

    routes: list[Route] = []
    for name, p in model.named_parameters():
        mod = owner.get(id(p))
        shape, dtype = tuple(p.shape), str(p.dtype).replace("torch.", "")
        quantized = mod is not None and is_quantized_module(mod) and p is getattr(mod, "weight", None)
        tied = [a for a in aliases.get(id(p), []) if a != name]
        tie_note = f"; tied to {', '.join(tied)}" if tied else ""
        if quantized:
            kind = quantized_weight_kind(mod)
            decision, reason = "frozen", f"{kind} quantized base weight (bitsandbytes)"
        elif not p.requires_grad:
            decision, reason = "frozen", "requires_grad=False"
        elif use_galore and id(p) in selected_ids:
            decision, reason = "galore", "2-D Linear weight matched by target_modules"
        else:
            decision = "adamw"
            if use_galore and id(p) in left_out and left_out[id(p)][0] is mod and mod is not head:
                reason = f"matched but {left_out[id(p)][1]}"
            else:
                reason = _kind(name, mod, head, all_linear)
            if not use_galore and reason.startswith("Linear weight"):
                reason = f"Linear weight (optimizer.type={requested}: no GaLore)"
        routes.append(Route(name, shape, dtype, decision, reason + tie_note))

    n_trainable = sum(1 for r in routes if r.decision != "frozen")
    if n_trainable == 0:
        hint = (
            " With quantization.enabled the embeddings, norms and output head should stay trainable; check that the "
            "model has float parameters besides its int8 Linear layers."
            if config.quantization.enabled else
            " Load a model whose parameters are not all frozen (requires_grad=False), or set quantization.enabled: "
            "false if the quantized layers were the only ones."
        )
        raise RoutingError(
            f"no parameter of the model is trainable ({len(routes)} tensors, all frozen), so there is nothing to "
            f"optimize.{hint}"
        )

    effective, note = requested, None
    if use_galore and not any(r.decision == "galore" for r in routes):
        effective = "adamw"
        note = (
            f"optimizer.type={requested} but no weight is GaLore-eligible ({_why_none(target, left_out, model)}); "
            f"falling back to AdamW for the {n_trainable} trainable tensors"
        )
    return RoutingTable(routes=routes, optimizer_type=effective, fallback_note=note, requested_type=requested)


def _why_none(target, left_out: dict, model: nn.Module) -> str:
    """Why no weight is GaLore-eligible, for the fallback note."""
    reasons = [reason for _, reason in left_out.values()]
    if not reasons:
        return f"target_modules={target!r} matched no nn.Linear module"
    # The output head is left out by design under all-linear; judge the other matched layers.
    others = [r for r in reasons if "output head" not in r] or reasons
    if all(r.startswith("quantized") for r in others):
        int8 = any(is_quantized_module(m) and quantized_weight_kind(m) == "int8" for m in model.modules())
        return f"all matched Linear layers are {'int8-' if int8 else ''}quantized"
    return f"target_modules={target!r} matched {len(reasons)} module(s) that cannot be projected, e.g. {others[0]}"
