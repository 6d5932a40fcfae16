"""The optimizer the routing table asks for, and its learning-rate schedule.

| effective type | what steps the weights |
|---|---|
| galore | ``galore_kernels.GaLoreAdamW``: routed GaLore weights projected, the rest plain AdamW |
| galore_layerwise | the same math from gradient hooks (``galore_kernels.attach_layerwise``), gradients freed at once |
| adamw | ``GaLoreAdamW`` with no projected group: AdamW with float32 moments and decoupled decay after the update, so a GaLore/AdamW comparison differs only by the projection |
| adamw8bit | ``bitsandbytes.optim.AdamW8bit`` |

The schedule (constant, linear or cosine decay after a linear warm-up) advances once per optimizer
step. Global-norm clipping is done by the trainer for the standard optimizers; layer-wise mode clips
per parameter (DESIGN.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from galore_kernels import GaLoreAdamW, attach_layerwise

from .config import Config
from .routing import RoutingTable


@dataclass
class OptimizerBundle:
    kind: str  # effective optimizer type
    optimizer: Any  # a torch optimizer (for layer-wise: the handle's GaLoreAdamW)
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR]  # None in layer-wise mode (the handle schedules)
    layerwise: Any = None  # the LayerwiseHandle in layer-wise mode

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self, *, optimizer: bool = True) -> dict:
        """Everything to resume; ``optimizer=False`` leaves the optimizer's own state out (FSDP2 runs
        save it sharded, with torch.distributed.checkpoint)."""
        if self.layerwise is not None:
            return {"layerwise": self.layerwise.state_dict()}
        state = {"scheduler": self.scheduler.state_dict()}
        if optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, load_optimizer: Optional[Callable[[], None]] = None) -> None:
        """Loads the saved moments, bases and schedule position; the hyperparameters stay this run's
        config's (lr, betas, eps, weight decay, refresh settings: a resume may change them, and the
        keys it may not change are refused before this runs), and the learning rate is recomputed
        from the schedule at the saved position (it follows a changed total of steps).
        ``load_optimizer``: loads the optimizer's state another way than from ``state["optimizer"]``."""
        if self.layerwise is not None:
            base_lrs = list(self.layerwise.base_lrs)
            settings = _group_settings(self.optimizer)
            self.layerwise.load_state_dict(state["layerwise"])
            _apply_group_settings(self.optimizer, settings)
            self.layerwise.base_lrs = base_lrs
            self.layerwise._apply_schedule()
            return
        settings = _group_settings(self.optimizer)
        if load_optimizer is not None:
            load_optimizer()
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _apply_group_settings(self.optimizer, settings)
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _group_settings(optimizer) -> list[dict]:
    """Every group's settings as this run's config built them (all but the parameters and the lr)."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]


def _apply_group_settings(optimizer, settings: list[dict]) -> None:
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)


def lr_lambda(config: Config, total_steps: int) -> Callable[[int], float]:
    t = config.training
    warmup, kind = t.warmup_steps, t.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, routing: RoutingTable, config: Config, total_steps: int) -> OptimizerBundle:
    t, o = config.training, config.optimizer
    kind = routing.optimizer_type
    schedule = lr_lambda(config, total_steps)
    common = dict(betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    galore_options = dict(state_dtype=o.state_dtype, stochastic_rounding=o.stochastic_rounding)
    plain = routing.adamw_params(model)
    galore = routing.galore_params(model) if kind in ("galore", "galore_layerwise") else []
    groups = []
    if galore:
        groups.append({
            "params": galore, "rank": o.rank, "update_proj_gap": o.update_proj_gap, "scale": o.scale,
            "proj_type": o.proj_type, "svd": o.svd, "oversample": o.oversample, "niter": o.niter,
            "refresh_offset": o.refresh_offset, "refresh_policy": o.refresh_policy, "max_proj_gap": o.max_proj_gap,
        })
    if plain:
        groups.append({"params": plain})
    if kind == "galore_layerwise":
        handle = attach_layerwise(
            model, groups, lr=t.lr, grad_accumulation_steps=t.gradient_accumulation_steps,
            max_grad_norm=t.max_grad_norm, lr_lambda=schedule, seed=t.seed, **galore_options, **common,
        )
        return OptimizerBundle(kind, handle.optimizer, None, handle)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(plain, lr=t.lr, **common)
    else:  # galore, adamw
        optimizer = GaLoreAdamW(groups, lr=t.lr, seed=t.seed, **galore_options, **common)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return OptimizerBundle(kind, optimizer, scheduler)
