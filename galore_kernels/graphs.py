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
        self._graph_buckets: list = []  # (device-step cache key, parameters) recorded in the graph
        self.replays = 0  # steps served by the graph (for tests and logs)
        self.eager_steps = 0

    def __call__(self) -> None:
        opt = self.optimizer
        if not self._steady():
            self._eager()
            return
        fingerprint = self._tensors_fingerprint()
        if self.graph is None or fingerprint != self._fingerprint:
            self._capture()
            self._fingerprint = self._tensors_fingerprint()
        opt.fill_lr_buffers()
        self.graph.replay()
        self._advance_host_steps()
        self.replays += 1

    # ------------------------------------------------------------------------------ internals
    def _eager(self) -> None:
        self.optimizer.step()
        self.eager_steps += 1

    def _steady(self) -> bool:
        """True when every parameter with a gradient would be stepped by a CUDA bucket launch."""
        opt = self.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                backend = opt._step_backend(p)
                if p.device.type != "cuda" or backend.galore_bucket is None or p.dtype not in backend.bucket_dtypes:
                    return False
                if "step" not in opt.state.get(p, {}) or not opt._bucketable(p, group):
                    return False
        return True

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
        self._graph_buckets = list(opt._last_buckets)

    def _advance_host_steps(self) -> None:
        """The replay advanced the device counts; keep the host counts (and the cache) in step."""
        opt = self.optimizer
        for key, params in self._graph_buckets:
            for p in params:
                opt.state[p]["step"] += 1
            steps, host = opt._device_step_cache[key]
            opt._device_step_cache[key] = (steps, tuple(h + 1 for h in host))
