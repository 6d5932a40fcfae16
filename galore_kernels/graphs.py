"""CUDA-graph replay of GaLoreAdamW's steady-state step (Triton backend).

A steady-state step (no refresh due) is a fixed sequence of launches whose per-step values (step
counts, learning rate) live in device memory, so it can be captured once and replayed: the whole
optimizer step costs one graph launch. Refresh steps (host-side decisions, an SVD-like computation,
new basis tensors) run eagerly, and the graph is captured again when the tensors it reads moved.

    step = GraphedStep(optimizer)
    for batch in data:
        loss(batch).backward()        # gradients must keep their storage: zero_grad(set_to_none=False)
        step()                        # replay, or an eager step when a refresh is due
        optimizer.zero_grad(set_to_none=False)

The graph reads the same gradient tensors every time, so they must not be freed between steps. A
float ``lr`` is written into a device buffer before each replay; a scheduler may also keep ``lr`` as a
float32 device tensor and update it in place.
"""
from __future__ import annotations

from typing import Optional

import torch

from .optimizer import GaLoreAdamW


class GraphedStep:
    def __init__(self, optimizer: GaLoreAdamW):
        if not isinstance(optimizer, GaLoreAdamW):
            raise TypeError(f"GraphedStep wraps a GaLoreAdamW, got {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._fingerprint: Optional[tuple] = None
        self._graph_buckets: list = []  # (device-step cache key, parameters, step tensor) in the graph
        self._captured_grads: tuple = ()
        self._captured_settings: Optional[tuple] = None
        self._eager_fingerprint: Optional[tuple] = None  # tensors right after the last eager step
        self._eager_seen = -1  # the optimizer's _step_calls after this object's last eager step
        self._eager_settings = None  # _settings() at that step
        self._replays_left = 0  # steady steps left before some parameter's refresh is due
        self.replays = 0  # steps served by the graph (for tests and logs)
        self.eager_steps = 0

    def __call__(self) -> None:
        # Fast path: the captured graph stays valid for a known number of steps (until the first
        # parameter's next refresh) while the gradients keep their storage and nothing else moved.
        if (self.graph is not None and self._replays_left > 0 and self.optimizer._step_calls == self._eager_seen
                and self._grad_pointers() == self._captured_grads and self._counts_in_step()
                and self._settings() == self._captured_settings):
            self._replay()
            return
        steady = self._steady()
        fingerprint = self._tensors_fingerprint() if steady else None
        if (steady and self.graph is not None and fingerprint == self._fingerprint and self._counts_in_step()
                and self.optimizer._step_calls == self._eager_seen and self._settings() == self._captured_settings):
            self._replays_left = self._steady_steps()
            self._replay()
        elif (steady and fingerprint == self._eager_fingerprint and self.optimizer._step_calls == self._eager_seen
              and self._settings() == self._eager_settings):
            # The last call was an eager step over these very tensors: kernels compiled, pointer
            # tables and device step counts cached. That is the warm-up a capture needs.
            self._capture()
            self._fingerprint, self._captured_grads = fingerprint, self._grad_pointers()
            self._captured_settings = self._settings()
            self._replays_left = self._steady_steps()
            self._replay()
        else:
            self._eager()

    def _replay(self) -> None:
        self.optimizer.fill_lr_buffers()
        self.graph.replay()
        self._advance_host_steps()
        self._replays_left -= 1
        self.replays += 1

    # ------------------------------------------------------------------------------ internals
    def _eager(self) -> None:
        # Only a step that ran every parameter through the bucket launches leaves what a capture
        # needs (device step counts, pointer tables, compiled kernels) for exactly those buckets; a
        # refresh step may have stepped some parameters one at a time.
        bucketed = self._steady()
        self.optimizer.step()
        self.eager_steps += 1
        self._eager_seen = self.optimizer._step_calls  # a step or state load elsewhere changes it
        self._eager_settings = self._settings()  # a capture records what this warm-up step ran with
        self._eager_fingerprint = self._tensors_fingerprint() if bucketed and self._steady() else None

    def _settings(self) -> tuple:
        """What the graph bakes in besides tensors: each group's constants (a float lr is refilled
        before each replay; a tensor lr is read in place, so its identity counts), the refresh
        schedule (it fixes how many replays may run) and torch's float32 matmul precision (it picks
        the compiled kernels)."""
        groups = tuple((g["betas"], g["eps"], g["weight_decay"], g.get("scale"), g["correct_bias"],
                        g["stochastic_rounding"], g["seed"], id(g["lr"]) if isinstance(g["lr"], torch.Tensor) else None,
                        # the refresh schedule: the replays left until the next refresh follow from it
                        g.get("rank"), g.get("update_proj_gap"), g.get("refresh_policy"), g.get("refresh_offset"))
                       for g in self.optimizer.param_groups)
        return groups, torch.get_float32_matmul_precision()

    def _steady(self) -> bool:
        """True when every parameter with a gradient would be stepped by a CUDA bucket launch."""
        opt = self.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.device.type != "cuda" or "step" not in opt.state.get(p, {}) or not opt._bucketable(p, group):
                    return False
        return True

    def _steady_steps(self) -> float:
        opt = self.optimizer
        return opt._steady_steps(p for g in opt.param_groups for p in g["params"])

    def _grad_pointers(self) -> tuple:
        """The storage of every parameter and gradient (a parameter given new storage, ``p.data = ...``,
        must not be written through the old pointers the graph holds)."""
        return tuple((p.data_ptr(), p.grad.data_ptr() if p.grad is not None else 0)
                     for g in self.optimizer.param_groups for p in g["params"])

    def _tensors_fingerprint(self) -> tuple:
        opt = self.optimizer
        ptrs = []
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                ptrs.append((p.data_ptr(), p.grad.data_ptr(),
                             *(state[k].data_ptr() for k in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right") if k in state)))
        return tuple(ptrs)

    def _capture(self) -> None:
        """Records one step. Capturing runs the host code but no kernel, so the host step counts
        (advanced by the recorded step) are put back; the replay that follows performs the step."""
        opt = self.optimizer
        saved = {id(p): opt.state[p]["step"] for g in opt.param_groups for p in g["params"] if p in opt.state}
        saved_cache = dict(opt._device_step_cache)
        # Warm-up on a side stream (torch's rule before capture) is the eager step that made the
        # state steady; the pointer tables and device step counts it built are reused here.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        opt._capturing = True
        try:
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                opt.step()
        finally:
            opt._capturing = False
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in saved:
                        opt.state[p]["step"] = saved[id(p)]
            opt._device_step_cache.clear()
            opt._device_step_cache.update(saved_cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph
        self._graph_buckets = [(key, params, opt._device_step_cache[key][0]) for key, params in opt._last_buckets]

    def _advance_host_steps(self) -> None:
        """The replay advanced the device counts; keep the host counts (and the cache) in step."""
        opt = self.optimizer
        for key, params, steps in self._graph_buckets:
            for p in params:
                opt.state[p]["step"] += 1
            opt._device_step_cache[key] = (steps, tuple(opt.state[p]["step"] for p in params))

    def _counts_in_step(self) -> bool:
        """The graph's device step counts are still the optimizer's (no eager step, state load or
        other change of the host counts since the last replay)."""
        cache = self.optimizer._device_step_cache
        for key, params, steps in self._graph_buckets:
            entry = cache.get(key)
            if entry is None or entry[0] is not steps or entry[1] != tuple(self.optimizer.state[p]["step"] for p in params):
                return False
        return True
