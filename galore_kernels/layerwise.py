"""Layer-wise GaLore: each parameter is updated from its own gradient hook and its gradient freed at once.

``attach_layerwise`` registers a ``register_post_accumulate_grad_hook`` on every parameter of the
given groups. The update math is :class:`GaLoreAdamW`'s (one instance holds the state), so a
layer-wise run and a standard one agree to float tolerance and share the checkpoint format.

Gradient accumulation over ``A`` micro-batches (DESIGN.md "Layer-wise mode"): the basis is fixed inside
a window and projection is linear, so each micro-batch adds ``P^T G_i`` into a float32 low-rank
accumulator and ``G_i`` is freed. The Adam step runs once, at the window's last micro-batch. A window
that refreshes the basis needs the whole window's gradient, so for that parameter the full gradient
is kept (torch sums it in ``.grad``) until the window ends; ``refresh_offset="stagger"`` in the param
groups spreads the parameters' refresh windows so that few full gradients live at once. Plain
(non-GaLore) parameters accumulate their full gradient as usual.

A window ends when the backward pass of its last micro-batch finishes (detected with an autograd
end-of-backward callback); ``flush()`` ends a short tail window. The learning-rate schedule advances
once per window. Clipping (``max_grad_norm``) is per parameter: no update may wait for the global
norm of all gradients. It clips the gradient the step consumes: the projected window gradient of a
GaLore parameter, the full one of a plain parameter. fp16 loss scaling is refused: a GradScaler
decides whether to skip a step only after seeing every gradient, and layer-wise updates happen
before that.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from . import sharded
from .optimizer import GaLoreAdamW

OPTIMIZERS = ("galore_adamw",)


def attach_layerwise(
    model: nn.Module,
    param_groups: Iterable,
    *,
    lr: float = 1e-3,
    optimizer: str = "galore_adamw",
    grad_accumulation_steps: int = 1,
    max_grad_norm: Optional[float] = None,
    lr_lambda: Optional[Callable[[int], float]] = None,
    grad_scaler=None,
    **optimizer_kwargs,
) -> "LayerwiseHandle":
    """Makes ``model``'s backward pass update the parameters of ``param_groups`` layer by layer.

    ``optimizer_kwargs`` go to :class:`GaLoreAdamW` (betas, eps, weight_decay, seed, backend, ...).
    Do not zero gradients between the micro-batches of a window: refresh windows keep summing in
    ``.grad`` as in standard accumulation.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported in layer-wise mode; use one of {OPTIMIZERS}.")
    if isinstance(grad_accumulation_steps, bool) or not isinstance(grad_accumulation_steps, int) or grad_accumulation_steps < 1:
        raise ValueError(f"grad_accumulation_steps={grad_accumulation_steps!r} must be an integer >= 1.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0 or None (no clipping).")
    if grad_scaler is not None and grad_scaler.is_enabled():
        raise ValueError(
            "fp16 loss scaling cannot be combined with layer-wise updates: a GradScaler unscales and "
            "checks every gradient for inf/NaN before it decides to step, but layer-wise mode applies "
            "each update inside backward, before that decision. Train in bf16 (no scaling needed), "
            "or use the standard GaLoreAdamW with the scaler."
        )
    opt = GaLoreAdamW(param_groups, lr=lr, **optimizer_kwargs)
    if any(sharded.is_dtensor(p) for group in opt.param_groups for p in group["params"]):
        raise ValueError(
            "attach_layerwise: the parameters include DTensors (FSDP2's fully_shard); layer-wise mode does not "
            "step sharded parameters (its hooks would run collectives inside backward). Use GaLoreAdamW with "
            "optimizer.step() after backward: it steps FSDP2-sharded parameters on their local rows.")
    return LayerwiseHandle(model, opt, grad_accumulation_steps, max_grad_norm, lr_lambda)


class LayerwiseHandle:
    """What ``attach_layerwise`` returns: counters, checkpointing, ``flush()`` and ``remove()``."""

    def __init__(self, model, opt: GaLoreAdamW, accumulation: int, max_grad_norm, lr_lambda):
        self.model = model
        self.optimizer = opt
        self.accumulation = accumulation
        self.max_grad_norm = max_grad_norm
        self.lr_lambda = lr_lambda
        self.base_lrs = [group["lr"] for group in opt.param_groups]
        self.step_count = 0  # optimizer steps (windows) completed
        self._apply_schedule()
        self.micro_step = 0  # backward passes completed in the current window
        self._lowrank_acc: dict[Tensor, Tensor] = {}  # param -> float32 sum of P^T G_i this window
        self._full_pending: dict[Tensor, None] = {}  # params whose window gradient sums in .grad
        self._queued_for_task: Optional[int] = None  # the backward pass whose end we wait for
        self._hooks = []
        for group in opt.param_groups:
            self._hook_group(group)

    def _hook_group(self, group: dict) -> None:
        self._hooks.extend(
            p.register_post_accumulate_grad_hook(self._on_grad)
            for p in group["params"]
            if p.requires_grad  # a frozen parameter never gets a gradient (and torch refuses the hook)
        )

    # ------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._queued_for_task:
            # Keyed by the backward pass, so a pass that raised (its callback never ran) cannot stop
            # the next one from being counted.
            self._queued_for_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        last = self.micro_step == self.accumulation - 1
        opt = self.optimizer
        keep_full = opt.side(p) is None or opt.refresh_due(p)
        if keep_full:
            # torch keeps summing this window's gradient in p.grad.
            if last:
                self._full_pending.pop(p, None)
                self._step_full(p)
            else:
                self._full_pending[p] = None
            return
        lowrank = opt.project(p, p.grad)  # a new float32 tensor
        acc = self._lowrank_acc.get(p)
        if acc is None:
            self._lowrank_acc[p] = lowrank
        else:
            acc.add_(lowrank)
        p.grad = None
        if last:
            self._step_lowrank(p)

    def _on_backward_end(self) -> None:
        self._queued_for_task: Optional[int] = None  # the backward pass whose end we wait for
        self.micro_step += 1
        if self.micro_step == self.accumulation:
            self._end_window()

    # ------------------------------------------------------------------------------- steps
    def _step_full(self, p: Tensor) -> None:
        """Window end for a parameter holding its full window gradient (refresh window or plain)."""
        opt, grad = self.optimizer, p.grad
        p.grad = None
        side = opt.prepare(p, grad)  # checks, refreshes the basis
        if side is not False:
            opt.update_from_lowrank(p, self._clip(opt.project(p, grad)))

    def _step_lowrank(self, p: Tensor) -> None:
        opt = self.optimizer
        acc = self._lowrank_acc.pop(p)
        if opt.check_finite(p, acc):
            opt.update_from_lowrank(p, self._clip(acc))

    def _clip(self, grad: Tensor) -> Tensor:
        if self.max_grad_norm is None:
            return grad
        norm = torch.linalg.vector_norm(grad)
        factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        return grad * factor

    @torch.no_grad()
    def _end_window(self) -> None:
        if len(self.optimizer.param_groups) != len(self.base_lrs):
            raise RuntimeError(
                "layer-wise mode: a param group was added with handle.optimizer.add_param_group(), so its "
                "parameters have no gradient hooks and would never be updated; add groups with "
                "handle.add_param_group() (it hooks them and schedules their lr)."
            )
        # Parameters that got gradients earlier in the window but none in its last micro-batch.
        for p in list(self._full_pending):
            self._full_pending.pop(p)
            if p.grad is not None:
                self._step_full(p)
        for p in list(self._lowrank_acc):
            self._step_lowrank(p)
        self.micro_step = 0
        self.step_count += 1
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        """lr = base_lr * lr_lambda(step_count), as torch's LambdaLR stepped once per window."""
        if self.lr_lambda is not None:
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base_lr * self.lr_lambda(self.step_count)

    # ----------------------------------------------------------------------------- public
    def flush(self) -> bool:
        """Steps a tail window shorter than ``grad_accumulation_steps``; False if none was open."""
        if self.micro_step == 0:
            return False
        self._end_window()
        return True

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group to the optimizer and hooks its parameters; its ``lr`` is the schedule's base
        lr for it. Between windows only (after a window's last micro-batch, or after ``flush()``)."""
        if self.micro_step or self._lowrank_acc or self._full_pending:
            raise RuntimeError("layer-wise add_param_group() called inside an accumulation window; add the "
                               "group after the window's last micro-batch, or call flush() first.")
        self.optimizer.add_param_group(param_group)
        group = self.optimizer.param_groups[-1]
        self.base_lrs.append(group["lr"])
        self._hook_group(group)
        self._apply_schedule()

    def remove(self) -> None:
        """Detaches the hooks; gradients then accumulate in ``.grad`` as usual."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        if self.micro_step or self._lowrank_acc or self._full_pending:
            raise RuntimeError(
                f"layer-wise state_dict() called inside an accumulation window ({self.micro_step} of "
                f"{self.accumulation} micro-batches done): part of the window's gradient lives only "
                "in memory. Checkpoint after the window's last micro-batch, or call flush() first."
            )
        return {
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self.base_lrs = list(state["base_lrs"])
        self._apply_schedule()
        # An open window is dropped whole: its low-rank sums, and the gradients that refresh windows
        # and plain parameters were still summing in .grad.
        for p in self._full_pending:
            p.grad = None
        self.micro_step = 0
        self._lowrank_acc.clear()
        self._full_pending.clear()
        self._queued_for_task = None
