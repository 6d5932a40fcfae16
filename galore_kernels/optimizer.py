"""GaLoreAdamW: AdamW whose state lives in a rank-r projection of each 2-D gradient.

A drop-in for galore-torch 1.0's ``GaLoreAdamW``: the same constructor arguments and the same param
group keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``), plus ``svd`` (``"randomized"``,
the default, or ``"exact"``), ``oversample``, ``niter`` and ``refresh_offset``. The math is DESIGN.md's;
with ``svd="exact"`` and float32 parameters the trajectory follows galore-torch step for step.

Differences from galore-torch, each on purpose:
- ``exp_avg``/``exp_avg_sq`` are float32 whatever the parameter dtype, and so are the projection
  bases. ``state_dtype="bfloat16"`` (per group or for all) halves the moments (read in float32,
  stored rounded stochastically: rounded to nearest, exp_avg_sq could not decay) and keeps the bases
  of bf16/fp16 weights in the weights' dtype. Both keep their dtype through ``load_state_dict``
  (torch's base class would cast them to the parameter's dtype).
- ``stochastic_rounding=True`` (per group or for all) rounds bf16 weights to a bf16 neighbour with
  probabilities proportional to the distances, from random bits keyed by (seed, parameter index,
  step): unbiased, reproducible, resumable (see the README).
- The state is plain tensors and numbers (no projector objects), so ``state_dict()`` loads with
  ``torch.load(..., weights_only=True)`` and a resumed run continues bit for bit.
- ``reverse_std`` back-projects on the side it projected (galore-torch re-derives the side from the
  low-rank shape and gets it wrong when that is square).
- A non-finite gradient skips that parameter's step entirely (weights, moments, basis and step
  count untouched), with one warning per parameter. On the Triton backend's bucket steps the check
  runs on the device without a host synchronisation: weights and moments stay untouched and the step
  still counts; masked updates are counted on the device and reported at the next refresh step
  (see :meth:`GaLoreAdamW.nonfinite_skips`).

Backends (``backend=``): ``reference`` (PyTorch, any device) or ``triton`` (fused kernels; CUDA, or
CPU under ``TRITON_INTERPRET=1`` for tests); ``auto`` takes Triton for CUDA tensors. On Triton,
same-shape parameters of a group are stepped by one set of launches, and ``lr`` may be a float32
device tensor (read by the kernels, so a scheduler's in-place update reaches a CUDA graph replay).
- FSDP2-sharded parameters (DTensors split on their rows, ``Shard(0)``) are stepped on each rank's
  rows without gathering a gradient (``galore_kernels.sharded``); their state is DTensors.
- A rank above ``min(m, n)`` is clamped with a warning; a non-2-D parameter in a GaLore group, an
  unknown ``proj_type`` or a rank < 1 is an error that names the parameter.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import dispatch, sharded
from .projection import check_proj_type, check_rank, check_update_proj_gap, effective_rank, projection_side
from .subspace import METHODS, projection_bases, randomized_bases_batched, refresh_generator, rounding_seed

# Param-group keys of a GaLore group and their defaults (galore-torch's, plus our refresh settings).
GALORE_GROUP_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "randomized",
    "oversample": None,
    "niter": None,
    "refresh_offset": 0,  # int phase, or "stagger" to spread the group's refreshes over the gap
    "refresh_policy": "fixed",  # or "adaptive": the gap follows how far the subspace moved
    "max_proj_gap": None,  # adaptive only: the longest gap; None = 8 * update_proj_gap
    "adaptive_overlap": 0.9,  # adaptive only: subspace overlap at or above which the gap doubles
}
REFRESH_POLICIES = ("fixed", "adaptive")
# A batched refresh stacks the gradients of same-shape parameters; this bounds the stacked copy.
BATCHED_REFRESH_BYTES = 256 * 2**20
# State tensors that load_state_dict must put back in their saved dtype (torch would cast them to the
# parameter's): the moments (the group's state_dtype) and the bases (basis_dtype()).
KEEP_DTYPE_STATE = ("exp_avg", "exp_avg_sq", "proj_left", "proj_right")
# state_dtype: the moments' dtype. fp16 is not offered: (1 - beta2) g^2 underflows it for small gradients.
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STATE_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


class GaLoreAdamW(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,  # accepted for galore-torch compatibility; ignored
        *,
        seed: int = 0,
        backend: str = "auto",
        refresh_backend: str = "auto",
        state_dtype="float32",
        stochastic_rounding: bool = False,
    ):
        if lr < 0.0:
            raise ValueError(f"lr={lr} must be >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must each be in [0, 1).")
        if eps < 0.0:
            raise ValueError(f"eps={eps} must be >= 0.")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
        self.backend = dispatch.requested_backend("step", backend)
        self.refresh_backend = dispatch.requested_backend("refresh", refresh_backend)
        self._param_info: Optional[dict[int, tuple[int, dict, int]]] = None
        self._sides: dict[int, Optional[str]] = {}  # projection side per parameter, rebuilt with _param_info
        self._refreshed_this_step: set[int] = set()  # ids refreshed by a batched call in step()
        self._due_this_step: dict[int, bool] = {}  # refresh_due() answers of this step() (before refreshing)
        self._warned_nonfinite: set[int] = set()
        self._warned_rank: set[int] = set()
        # Triton bucket steps: device step counts per bucket (with the host counts they match) and
        # per-group learning-rate buffers.
        self._device_step_cache: dict[tuple, tuple[Tensor, tuple]] = {}
        self._lr_buffers: dict[tuple, tuple[dict, Tensor]] = {}  # (id(group), device) -> (group, buffer)
        self._last_buckets: list[tuple] = []  # (cache key, parameters) of the last step()'s bucket launches
        self._capturing = False  # set by galore_kernels.graphs while a CUDA graph records a step
        self._step_calls = 0  # step() calls that ran (not recorded into a graph), and state loads
        self._backends: dict[torch.device, dispatch.StepBackend] = {}
        self._skip_counters: dict[tuple, tuple[list, Tensor]] = {}  # bucket key -> (params, (B,) int32)
        self._operand_bases: dict[int, tuple[Tensor, Tensor]] = {}  # id(p) -> (float32 basis, its 16-bit copy)
        # (bucket key, group seed, device) -> (B,) int64 random seeds; kept, so that a graph captured with
        # an earlier seed never reads a freed tensor.
        self._rounding_seeds: dict[tuple, Tensor] = {}
        self._nonfinite_skips: dict[int, int] = {}  # parameter index -> masked bucket steps, as read
        self._reported_this_step = False
        # Host-time savings of steady steps: a group's bucket layout is reused while nothing it depends on
        # changed (_StepPlan), and a bucket's state lists while the state version holds.
        self._state_version = 0  # bumped whenever state tensors are created, replaced or loaded
        self._plans: dict[int, _StepPlan] = {}  # id(group) -> its last steady step's layout
        self._prepared: dict[tuple, tuple] = {}  # bucket key -> (state version, states, moments, bases)
        self._splits: dict[int, Optional[sharded.RowSplit]] = {}  # id(p) -> how its rows are split (DTensors)
        # id(p) -> (gradient finite on every rank, kernels fit on every rank), for sharded parameters (step())
        self._sharded_this_step: dict[int, tuple[bool, bool]] = {}
        self._has_sharded = False  # any DTensor parameter (set by add_param_group)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, seed=seed,
                        state_dtype=check_state_dtype(state_dtype, "state_dtype"), stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        # Fail at construction, not at the first step, when a requested backend cannot run here.
        for device in {p.device for group in self.param_groups for p in group["params"]}:
            dispatch.step_backend(self.backend, device)
            dispatch.refresh_backend(self.refresh_backend, device)

    # ----------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            where = f"param group {len(self.param_groups) - 1}"
            group["state_dtype"] = check_state_dtype(group["state_dtype"], f"{where}: state_dtype")
            _check_stochastic_rounding(group, where)
            if "rank" in group:
                _complete_galore_group(group, len(self.param_groups) - 1)
            for p in group["params"]:  # an unsupported DTensor layout fails here, not at the first step
                sharded.row_split(p, f"{where}: a parameter of shape {tuple(p.shape)}")
            self._has_sharded = self._has_sharded or any(map(sharded.is_dtensor, group["params"]))
        except Exception:
            self.param_groups.pop()
            raise
        self._param_info = None
        self._state_version += 1

    def param_info(self, p: Tensor) -> tuple[int, dict, int]:
        """(index among all parameters, its group, position inside the group).

        The index is the one ``state_dict()`` uses; it seeds the parameter's refresh sketches.
        """
        if self._param_info is None:
            self._sides = {}
            info, index = {}, 0
            for group in self.param_groups:
                for position, q in enumerate(group["params"]):
                    info[id(q)] = (index, group, position)
                    index += 1
            self._param_info = info
        return self._param_info[id(p)]

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._capturing:
            self._step_calls += 1  # GraphedStep replays only while no step ran outside it
        self._last_buckets = []
        try:
            for group in self.param_groups:
                self._step_group(group)
        finally:
            self._refreshed_this_step.clear()
            self._due_this_step.clear()
            self._sharded_this_step.clear()
            self._reported_this_step = False
        return loss

    def _step_group(self, group: dict) -> None:
        """One group's step: refreshes that are due (batched), the bucket launches, then the
        parameters no bucket takes, one at a time. A steady step (no refresh due, the same gradients
        and state as the last one) reuses the last step's bucket layout instead of re-deciding it
        parameter by parameter: on a model of a few hundred tensors that decision is most of the
        step's host time."""
        self._check_sharded_grads(group)
        plan = self._reusable_plan(group)
        if plan is None:
            self._refresh_batched(group)
            buckets, singles = self._bucket_layout(group)
            version = self._state_version
        else:
            buckets, singles = plan.buckets, plan.singles
            plan.steps_left -= 1
        for side, device, params in buckets:
            self._launch_bucket(group, side, device, params)
        split_params = [p for p in singles if self.row_split(p) is not None] if self._has_sharded else []
        for p in singles:
            if not split_params or self.row_split(p) is None:
                self.step_param(p, p.grad)
        if split_params:
            self._step_sharded(split_params)
        if plan is not None:
            plan.steps = tuple(state["step"] for state in plan.states)
        elif self._state_version == version:  # nothing refreshed or created after the layout
            states = [self.state.get(p, {}) for p in group["params"] if p.grad is not None]
            if all("step" in state for state in states):
                self._plans[id(group)] = _StepPlan(
                    self._state_version, _plan_settings(group), self._grad_pointers(group), buckets, singles,
                    self._steady_steps(group["params"]), states, tuple(state["step"] for state in states))

    def _check_sharded_grads(self, group: dict) -> None:
        """For each sharded gradient of the group, whether it is finite on every rank and whether the
        kernels take every rank's rows: one agreement (an all-reduce per mesh dimension) per set of
        process groups for the whole param group, instead of one per parameter (:meth:`_sharded_flags`
        reads them)."""
        if not self._has_sharded:
            return
        by_groups: dict[tuple, tuple] = {}
        for p in group["params"]:
            split = self.row_split(p) if p.grad is not None else None
            if split is not None:  # parameters agree together only over the same groups
                key = (id(split.group), *map(id, split.replica_groups))
                by_groups.setdefault(key, (split, []))[1].append(p)
        for split, params in by_groups.values():
            finite, fit = split.agree(self._local_flags(params, [p.grad for p in params]))
            self._sharded_this_step.update(zip(map(id, params), zip(finite, fit)))

    def _step_sharded(self, params: list[Tensor]) -> None:
        """A group's sharded parameters: each checked and refreshed when due; the projections that sum
        over the ranks (left, full: r x n, small) made first and all-reduced together, one call per
        process group instead of one per parameter; then each parameter projected (right, plain: one
        at a time, as their float32 copies are the size of the gradient) and updated."""
        ready = [p for p in params if self.prepare(p, p.grad) is not False]
        summed = {id(p): self._project_rows(p) for p in ready if self.side(p) in ("left", "full")}
        sharded.sum_together([(self.row_split(p), summed[id(p)]) for p in ready if id(p) in summed])
        for p in ready:
            lowrank = summed.pop(id(p)) if id(p) in summed else self._project_rows(p)
            tensors, scalars = self._advance(p)
            sharded.update(self._step_backend(p), p, lowrank, tensors, scalars, self.row_split(p),
                           self._sharded_flags(p, p.grad)[1])

    def _project_rows(self, p: Tensor) -> Tensor:
        state = self.state[p]
        return sharded.project_rows(self._step_backend(p), p.grad, state.get("proj_left"), state.get("proj_right"),
                                    self.side(p))

    def _local_flags(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """(2, P): each gradient finite here, the kernels fit here (one host-to-device copy)."""
        finite = torch.stack([torch.isfinite(sharded.local(grad)).all() for grad in grads])
        fit = [sharded.kernels_fit(self._step_backend(p), p, grad) for p, grad in zip(params, grads)]
        return torch.stack([finite, torch.tensor(fit, device=finite.device)])

    def _sharded_flags(self, p: Tensor, grad: Tensor) -> tuple[bool, bool]:
        """(gradient finite on every rank, kernels fit on every rank) of a sharded parameter: as
        step() agreed on them for the group, or (a step outside step()) agreed now."""
        flags = self._sharded_this_step.get(id(p))
        if flags is None:
            finite, fit = self.row_split(p).agree(self._local_flags([p], [grad]))
            flags = (finite[0], fit[0])
        return flags

    def _reusable_plan(self, group: dict) -> Optional["_StepPlan"]:
        """The group's last layout, if this step is steady like the last: no refresh due, the same
        settings, gradients and state, and no step counted since by anything else (a CUDA graph
        replay, a direct step_param) that would make its count of steady steps stale."""
        plan = self._plans.get(id(group))
        if (plan is None or plan.steps_left <= 0 or plan.version != self._state_version
                or plan.settings != _plan_settings(group) or plan.pointers != self._grad_pointers(group)
                or tuple(state["step"] for state in plan.states) != plan.steps):
            return None
        return plan

    @staticmethod
    def _grad_pointers(group: dict) -> tuple:
        """What the bucket layout depends on, per parameter: whether it has a gradient, and what the
        kernels' fit test reads of the weight and the gradient (shape, dtype, dense and contiguous,
        16-byte aligned). New gradient tensors each step (zero_grad(set_to_none=True)) keep it."""
        return tuple(None if (g := p.grad) is None else
                     ("sparse",) if g.is_sparse else
                     ("dtensor", p.shape, p.dtype, g.dtype) if sharded.is_dtensor(p) else
                     (p.shape, p.dtype, g.dtype, p.is_contiguous() and g.is_contiguous(),
                      (p.data_ptr() | g.data_ptr()) & 15)
                     for p in group["params"])

    def _steady_steps(self, params: Iterable[Tensor]) -> float:
        """How many coming steps of ``params`` (those with a gradient) refresh nothing (0: the next
        one does, or none has a gradient). A bucket layout (here) or a captured CUDA graph
        (graphs.GraphedStep) serves that many steps."""
        return min((self.steps_until_refresh(p) for p in params if p.grad is not None), default=0)

    def _bucket_layout(self, group: dict) -> tuple[list, list]:
        """([(side, device, params)] of the bucket launches, [the parameters stepped one at a time]).

        A bucket step checks the gradient on the device (no host synchronisation): a non-finite
        gradient leaves that parameter's weight and moments unchanged, but its step still counts.
        Refreshes stay on the per-parameter path, which checks the gradient on the host first.
        """
        singles, buckets = [], {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if not self._bucketable(p, group):
                singles.append(p)
                continue
            side = self.side(p)
            self._init_state(p, group)
            key = (side, tuple(p.shape), p.dtype, p.device, self.param_rank(p) if side else None)
            buckets.setdefault(key, []).append(p)
        return [(side, device, params) for (side, _, _, device, _), params in buckets.items()], singles

    def _bucketable(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` is stepped by a bucket launch this step: a bucket backend whose kernels take
        its tensors, and no refresh (or a batched one done already) for a projected parameter."""
        backend, grad, side = self._step_backend(p), p.grad, self.side(p)
        if backend.galore_bucket is None or grad.is_sparse or sharded.is_dtensor(p) or not backend.fits(p, grad):
            return False
        if side is None:
            return True
        if side == "full":
            return False
        if id(p) in self._refreshed_this_step:
            return True
        due = self._due_this_step.get(id(p))  # asked by _refresh_batched already this step
        return not (self.refresh_due(p) if due is None else due)

    def _launch_bucket(self, group: dict, side, device: torch.device, params: list[Tensor]) -> None:
        """One bucket's launches. ``validated=True`` skips the kernels' per-tensor checks: the bucket
        key fixes shape, dtype and device, :meth:`_bucketable` contiguity and alignment, and the
        state tensors are the optimizer's own (moments in the group's state_dtype, contiguous; bases laid out here)."""
        key = tuple(id(p) for p in params)  # the bucket's device step counts and skip counter
        states, moments, bases = self._prepared_bucket(key, side, params)
        backend = self._step_backend(params[0])
        steps = self._device_steps(key, states, device)
        lr = self._device_lr(group, device)
        beta1, beta2 = group["betas"]
        skipped = self._skip_counter(key, params, device)
        rounding = dict(rounding_seeds=self._bucket_rounding_seeds(key, group, params, device),
                        stochastic_rounding=_rounds_stochastically(params[0], group))
        if side is None:
            backend.dense_bucket(params, [p.grad for p in params], *moments, steps, lr, beta1, beta2,
                                 group["eps"], group["weight_decay"], group["correct_bias"], validated=True,
                                 skipped=skipped, **rounding)
        else:
            backend.galore_bucket(params, [p.grad for p in params], *moments, bases,
                                  steps, lr, side, beta1, beta2, group["eps"], group["weight_decay"],
                                  group["scale"], group["correct_bias"], validated=True, skipped=skipped,
                                  **rounding)
        for state in states:
            state["step"] += 1
        self._device_step_cache[key] = (steps, tuple(state["step"] for state in states))
        self._last_buckets.append((key, params))

    def _prepared_bucket(self, key: tuple, side, params: list[Tensor]) -> tuple[list, tuple, Optional[list]]:
        """(states, (exp_avgs, exp_avg_sqs), operand bases or None) of a bucket, checked and laid out
        once per state version (the validated launch trusts them)."""
        prepared = self._prepared.get(key)
        if prepared is not None and prepared[0] == self._state_version:
            return prepared[1:]
        states = [self.state[p] for p in params]
        lowrank = tuple(params[0].shape) if side is None else lowrank_shape(tuple(params[0].shape), self.param_rank(params[0]), side)
        for p, state in zip(params, states):
            if tuple(state["exp_avg"].shape) != lowrank:
                raise RuntimeError(f"GaLoreAdamW: parameter #{self.param_info(p)[0]} has shape {tuple(p.shape)} but "
                                   f"its moments are {tuple(state['exp_avg'].shape)} (was the parameter replaced "
                                   "in place?); re-create the optimizer for the new shape.")
            if state["exp_avg"].dtype != states[0]["exp_avg"].dtype or state["exp_avg_sq"].dtype != state["exp_avg"].dtype:
                raise RuntimeError(f"GaLoreAdamW: the moments of parameter #{self.param_info(p)[0]} are "
                                   f"{state['exp_avg'].dtype}/{state['exp_avg_sq'].dtype}, unlike the rest of its "
                                   "group's; convert them all to the group's state_dtype.")
        moments = ([state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states])
        bases = None
        if side is not None:
            backend = self._step_backend(params[0])
            name = "proj_left" if side == "left" else "proj_right"
            for state in states:  # laid out once per refresh (exact bases are column-major, ...)
                state[name] = backend.kernel_basis(state[name])
            bases = [self._operand_basis(p, state[name]) for p, state in zip(params, states)]
        self._prepared[key] = (self._state_version, states, moments, bases)
        return states, moments, bases

    def _operand_basis(self, p: Tensor, basis: Tensor) -> Tensor:
        """The basis in the kernels' operand dtype: the state's own when it has the weights' dtype
        (float32 weights; 16-bit weights with ``state_dtype="bfloat16"``); else, for bf16/fp16 weights,
        a copy in their dtype, made once per refresh (the state keeps the float32 basis), so the
        tensor cores read it without a conversion. The kernels round it to that dtype anyway."""
        if basis.dtype == p.dtype:
            return basis
        cached = self._operand_bases.get(id(p))
        if cached is None or cached[0] is not basis or cached[1].dtype != p.dtype:
            cached = self._operand_bases[id(p)] = (basis, basis.to(p.dtype))
        return cached[1]

    def rounding_seed(self, p: Tensor) -> Optional[int]:
        """The seed of ``p``'s random bits (stochastic rounding of bf16 weights, bf16 moments): None
        where its step draws none."""
        index, group, _ = self.param_info(p)
        return rounding_seed(group["seed"], index) if _draws_random_bits(p, group) else None

    def _bucket_rounding_seeds(self, key: tuple, group: dict, params: list[Tensor], device: torch.device):
        """The bucket's (B,) int64 random seeds on the device, made once (None: the step draws none)."""
        if not _draws_random_bits(params[0], group):  # a bucket shares dtype and group
            return None
        cache_key = (key, group["seed"], device)
        seeds = self._rounding_seeds.get(cache_key)
        if seeds is None:
            if self._capturing:
                raise RuntimeError("GaLoreAdamW: a CUDA graph capture met a bucket with no random seeds; "
                                   "run one eager step with the same settings before capturing.")
            seeds = self._rounding_seeds[cache_key] = torch.tensor([self.rounding_seed(p) for p in params],
                                                                   dtype=torch.int64).to(device)
        return seeds

    def _skip_counter(self, key: tuple, params: list[Tensor], device: torch.device) -> Tensor:
        """The bucket's device counts of updates masked by the non-finite guard (read lazily)."""
        entry = self._skip_counters.get(key)
        if entry is None:
            if self._capturing:
                raise RuntimeError("GaLoreAdamW: a CUDA graph capture met a bucket with no skip counter; "
                                   "run one eager step with the same gradients before capturing.")
            entry = self._skip_counters[key] = (list(params), torch.zeros(len(params), dtype=torch.int32, device=device))
        return entry[1]

    def nonfinite_skips(self) -> dict[int, int]:
        """Per parameter index, how many bucket steps (Triton backend) had their update masked because
        the gradient held Inf/NaN; warns once per parameter that has any. Reads device counters, so it
        synchronises: step() calls it only on steps that refresh (which synchronise anyway)."""
        for params, counter in self._skip_counters.values():
            counts = counter.tolist()
            if not any(counts):
                continue
            counter.zero_()
            for p, count in zip(params, counts):
                if count:
                    index = self.param_info(p)[0]
                    self._nonfinite_skips[index] = self._nonfinite_skips.get(index, 0) + count
                    self._warn_nonfinite(index, p, f"in {count} step(s) up to step {self.state[p]['step']}")
        return dict(self._nonfinite_skips)

    def _device_steps(self, key: tuple, states: list[dict], device: torch.device) -> Tensor:
        """The bucket's step counts as an int32 device tensor, which the kernels advance themselves.

        Reused while the host counts still match what the last launch left (the steady state: no copy
        to the device); rebuilt from the host counts, without a host synchronisation, otherwise.
        """
        cached = self._device_step_cache.get(key)
        host = tuple(state["step"] for state in states)
        if cached is not None and cached[1] == host and cached[0].device == device:
            return cached[0]
        if self._capturing:
            raise RuntimeError("GaLoreAdamW: a CUDA graph capture met a bucket with no device step counts; "
                               "run one eager step with the same gradients before capturing.")
        steps = torch.tensor(host, dtype=torch.int32)
        if device.type == "cuda":
            return steps.pin_memory().to(device, non_blocking=True)
        return steps.to(device)

    def _device_lr(self, group: dict, device: torch.device) -> Tensor:
        """The group's learning rate as a one-element float32 device tensor the kernels read.

        A tensor ``lr`` on the device is used as it is (a scheduler may update it in place, also
        between CUDA graph replays); a float is written into a per-group buffer by a fill.
        """
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32 and lr.numel() == 1:
            return lr.reshape(1)
        key = (id(group), device)
        if key not in self._lr_buffers:
            self._lr_buffers[key] = (group, torch.empty(1, dtype=torch.float32, device=device))
        buffer = self._lr_buffers[key][1]
        if not self._capturing:  # a captured fill would replay a stale lr: graphs.py fills before replay
            buffer.fill_(lr)
        return buffer

    def fill_lr_buffers(self) -> None:
        """Writes every group's float ``lr`` into the buffers the kernels read (before a graph replay)."""
        for group, buffer in self._lr_buffers.values():
            buffer.fill_(group["lr"])

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor) -> bool:
        """One update of ``p`` from its full gradient; False when a non-finite gradient skipped it."""
        split = self.row_split(p)
        if split is not None and id(p) not in self._sharded_this_step:  # outside step(): agree once, here
            self._sharded_this_step[id(p)] = self._sharded_flags(p, grad)
            try:
                return self.step_param(p, grad)
            finally:
                self._sharded_this_step.pop(id(p), None)
        if self.prepare(p, grad) is False:
            return False
        tensors, scalars = self._advance(p)
        if split is None:
            self._step_backend(p).step(p, grad, *tensors, **scalars)
        else:
            sharded.step(self._step_backend(p), p, grad, tensors, scalars, split, self._sharded_flags(p, grad)[1])
        return True

    # Layer-wise mode drives a step in pieces: prepare (checks, refresh), project, update_from_lowrank.
    def prepare(self, p: Tensor, grad: Tensor):
        """Checks ``grad``, creates the state and refreshes the basis when due.

        Returns the projection side (None for a plain AdamW parameter), or False when the gradient is
        not finite and the step must be skipped.
        """
        index, group, _ = self.param_info(p)
        if grad.is_sparse:
            raise RuntimeError(
                f"GaLoreAdamW got a sparse gradient for parameter #{index} (shape {tuple(p.shape)}); "
                "it supports dense gradients only (e.g. nn.Embedding(..., sparse=False))."
            )
        if self.row_split(p) is not None:
            sharded.check_grad(grad, p, f"GaLoreAdamW parameter #{index} (shape {tuple(p.shape)})")
        refreshed = id(p) in self._refreshed_this_step  # a batched refresh checked this gradient already
        if not refreshed and not self.check_finite(p, grad):
            return False
        state = self._init_state(p, group)
        side = self.side(p)
        if side is not None and not refreshed and self.refresh_due(p):
            self._refresh(p, grad, group, state, index, side)
        return side

    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """The projected gradient of ``p`` (float32) under its current basis; the full one if plain."""
        side = self.side(p)
        split = self.row_split(p)
        if side is None:
            grad = sharded.local(grad)
            return grad if grad.dtype == torch.float32 else grad.float()
        state, backend = self.state[p], self._step_backend(p)
        if split is not None:
            return sharded.project(backend, grad, state.get("proj_left"), state.get("proj_right"), side, split)
        return backend.project(grad, state.get("proj_left"), state.get("proj_right"), side)

    @torch.no_grad()
    def update_from_lowrank(self, p: Tensor, lowrank_grad: Tensor) -> None:
        """Adam on an already projected gradient, back-projection and apply (after ``prepare``)."""
        tensors, scalars = self._advance(p)
        split = self.row_split(p)
        if split is None:
            self._step_backend(p).update(p, lowrank_grad, *tensors, **scalars)
        else:  # no kernels for replicated moments: nothing here says every rank can run them
            sharded.update(self._step_backend(p), p, lowrank_grad, tensors, scalars, split, False)

    def _advance(self, p: Tensor) -> tuple[tuple, dict]:
        """Counts the step and returns the backend's state tensors and per-step scalars."""
        _, group, _ = self.param_info(p)
        state = self.state[p]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        tensors = (state["exp_avg"], state["exp_avg_sq"], state.get("proj_left"), state.get("proj_right"))
        scalars = dict(side=self.side(p), step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"], scale=group.get("scale", 1.0),
                       correct_bias=group["correct_bias"], rounding_seed=self.rounding_seed(p),
                       stochastic_rounding=_rounds_stochastically(p, group))
        return tensors, scalars

    def side(self, p: Tensor):
        if self._param_info is None or id(p) not in self._sides:
            _, group, _ = self.param_info(p)
            self._sides[id(p)] = projection_side(tuple(p.shape), group["proj_type"]) if "rank" in group else None
        return self._sides[id(p)]

    def refresh_due(self, p: Tensor) -> bool:
        """Whether the next step of ``p`` refreshes its basis: at its first step, then (fixed policy)
        whenever (step + phase) is a multiple of update_proj_gap (phase 0 is galore-torch's schedule),
        or (adaptive policy) once the parameter's current gap has passed."""
        _, group, position = self.param_info(p)
        state = self.state.get(p, {})
        if "proj_left" not in state and "proj_right" not in state:
            return True
        if group["refresh_policy"] == "adaptive" and "next_refresh" in state:
            return state["step"] >= state["next_refresh"]
        # Fixed policy, or adaptive before its first refresh under that policy (switched mid-run).
        return (state["step"] + refresh_phase(group, position)) % group["update_proj_gap"] == 0

    def steps_until_refresh(self, p: Tensor) -> float:
        """How many steps of ``p``, this one included, run before one refreshes its basis (0 when
        this one does; inf for a parameter without projection)."""
        if self.side(p) is None:
            return float("inf")
        if self.refresh_due(p):
            return 0
        _, group, position = self.param_info(p)
        step = self.state[p]["step"]
        if group["refresh_policy"] == "adaptive" and "next_refresh" in self.state[p]:
            return self.state[p]["next_refresh"] - step
        gap = group["update_proj_gap"]
        return (gap - (step + refresh_phase(group, position)) % gap) % gap

    def param_rank(self, p: Tensor) -> int:
        """The rank of ``p``'s projection. Fixed when its moments are created, as galore-torch fixes
        it in its projector: the moments live in that rank's coordinates, so a later change of the
        group's ``rank`` applies to parameters without state only (one warning per parameter)."""
        _, group, _ = self.param_info(p)
        wanted = _rank(group, p)
        moments = self.state.get(p, {}).get("exp_avg")
        side = self.side(p)
        if moments is None or side is None:
            return wanted
        rank = moments.shape[1] if side == "right" else moments.shape[0]
        if rank != wanted:
            self._warn_rank(p, rank, wanted)
        return rank

    def _warn_rank(self, p: Tensor, rank: int, wanted: int) -> None:
        index = self.param_info(p)[0]
        if index in self._warned_rank:
            return
        self._warned_rank.add(index)
        warnings.warn(
            f"GaLoreAdamW: parameter #{index} (shape {tuple(p.shape)}) keeps rank {rank}, the rank its moments "
            f"were created with; its group now asks for {wanted}. A rank applies from a parameter's first step "
            "(as in galore-torch). To change it, create a new optimizer (or delete this parameter's state).",
            RuntimeWarning,
            stacklevel=4,
        )

    def check_finite(self, p: Tensor, grad: Tensor) -> bool:
        """False (and one warning per parameter) when ``grad`` holds NaN or Inf (on any rank, for a
        sharded parameter: every rank skips together)."""
        split = self.row_split(p)
        if split is None:
            finite = bool(torch.isfinite(grad).all())
        else:
            finite = self._sharded_flags(p, grad)[0]
        if finite:
            return True
        index, _, _ = self.param_info(p)
        self._warn_nonfinite(index, p, f"at step {self.state.get(p, {}).get('step', 0)}")
        return False

    def _warn_nonfinite(self, index: int, p: Tensor, when: str) -> None:
        if index in self._warned_nonfinite:
            return
        self._warned_nonfinite.add(index)
        warnings.warn(
            f"GaLoreAdamW: parameter #{index} (shape {tuple(p.shape)}) has a non-finite gradient {when}; "
            "its update is skipped (weights, moments and basis unchanged). Shown once per parameter.",
            RuntimeWarning,
            stacklevel=4,
        )

    # ----------------------------------------------------------------------------- internals
    def _step_backend(self, p: Tensor) -> dispatch.StepBackend:
        backend = self._backends.get(p.device)  # asked per parameter and step: keep it cheap
        if backend is None:
            backend = self._backends[p.device] = dispatch.step_backend(self.backend, p.device)
        return backend

    def row_split(self, p: Tensor) -> Optional[sharded.RowSplit]:
        """How a DTensor parameter's rows are split across ranks (FSDP2); None for a plain tensor."""
        if id(p) not in self._splits:
            index = self.param_info(p)[0]
            self._splits[id(p)] = sharded.row_split(p, f"GaLoreAdamW parameter #{index} (shape {tuple(p.shape)})")
        return self._splits[id(p)]

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" in state:
            return state
        state["step"] = 0
        self._state_version += 1
        side = self.side(p)
        shape = tuple(p.shape) if side is None else lowrank_shape(tuple(p.shape), _rank(group, p), side)
        dtype = STATE_DTYPES[group["state_dtype"]]
        split = self.row_split(p)
        if split is None:
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
        else:  # the moments' rows follow the weight's rows unless the projection is on the left
            rows_split = side in (None, "right")
            held = (*sharded.local(p).shape[:1], *shape[1:]) if rows_split else shape  # (): a 0-d parameter
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = split.dtensor(torch.zeros(held, dtype=dtype, device=p.device), rows_split, shape)
        if side is not None:
            state["refresh_count"] = 0
        return state

    def _report_masked_updates(self) -> None:
        """Once per step that refreshes (it synchronises anyway): warn about masked bucket updates."""
        if self._skip_counters and not self._reported_this_step:
            self._reported_this_step = True
            self.nonfinite_skips()

    def _refresh(self, p: Tensor, grad: Tensor, group: dict, state: dict, index: int, side: str) -> None:
        self._report_masked_updates()
        generator = None
        if group["svd"] == "randomized":
            generator = refresh_generator(group["seed"], index, state["refresh_count"], grad.device)
        split = self.row_split(p)
        if split is not None:
            left, right = sharded.projection_bases(
                sharded.local(grad), split, self.param_rank(p), side, method=group["svd"],
                oversample=group["oversample"], niter=group["niter"], generator=generator)
        else:
            left, right = projection_bases(
                grad, self.param_rank(p), side, method=group["svd"], oversample=group["oversample"],
                niter=group["niter"], generator=generator,
                backend=dispatch.refresh_backend(self.refresh_backend, grad.device),
            )
        self._store_bases(p, group, state, {"proj_left": left, "proj_right": right})

    def _store_bases(self, p: Tensor, group: dict, state: dict, bases: dict) -> None:
        new = {key: basis.float() for key, basis in bases.items() if basis is not None}
        split = self.row_split(p)
        if group["refresh_policy"] == "adaptive":
            self._adapt_gap(group, state, new, self.param_info(p)[2], split)
        dtype = basis_dtype(p, group)
        for key, basis in new.items():
            basis = basis.to(dtype)
            if split is not None:  # P's rows follow the weight's; Q is whole on every rank
                rows_split = key == "proj_left"
                shape = (p.shape[0], basis.shape[1]) if rows_split else tuple(basis.shape)
                basis = split.dtensor(basis.contiguous(), rows_split, shape)
            state[key] = basis
        state["refresh_count"] += 1
        self._state_version += 1

    def _refresh_batched(self, group: dict) -> None:
        """Refreshes the group's same-shape parameters that are due, one backend call per shape.

        Only randomized one-sided refreshes are batched; each matrix keeps its own seeded sketch, so
        the bases equal the per-parameter ones (what layer-wise mode computes). A single parameter
        of a shape, and anything not batchable, is left to :meth:`prepare`.
        """
        if "rank" not in group or group["svd"] != "randomized":
            return
        buckets: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            grad, side = p.grad, self.side(p)
            if grad is None or grad.is_sparse or side == "full" or sharded.is_dtensor(p):
                continue
            due = self._due_this_step[id(p)] = self.refresh_due(p)
            if not due:
                continue
            if not self.check_finite(p, grad):
                continue
            key = (tuple(p.shape), side, grad.dtype, grad.device, self.param_rank(p))
            buckets.setdefault(key, []).append(p)
        for (shape, side, dtype, device, _), params in buckets.items():
            per_chunk = max(1, BATCHED_REFRESH_BYTES // (params[0].grad.numel() * 4))
            for start in range(0, len(params), per_chunk):
                chunk = params[start:start + per_chunk]
                if len(chunk) > 1:
                    self._refresh_chunk(chunk, group, side, device)

    def _refresh_chunk(self, params: list[Tensor], group: dict, side: str, device: torch.device) -> None:
        self._report_masked_updates()
        states = [self._init_state(p, group) for p in params]
        generators = [refresh_generator(group["seed"], self.param_info(p)[0], state["refresh_count"], device)
                      for p, state in zip(params, states)]
        bases = randomized_bases_batched(
            [p.grad for p in params], self.param_rank(params[0]), side, group["oversample"], group["niter"],
            generators, dispatch.refresh_backend(self.refresh_backend, device),
        )
        key = "proj_left" if side == "left" else "proj_right"
        for p, state, basis in zip(params, states, bases):
            self._store_bases(p, group, state, {key: basis})
            self._refreshed_this_step.add(id(p))

    def _adapt_gap(self, group: dict, state: dict, new: dict, position: int,
                   split: Optional[sharded.RowSplit] = None) -> None:
        """Adaptive policy: double the gap while the refreshed subspace overlaps the old one by at
        least ``adaptive_overlap`` (||P_old^T P_new||_F^2 / r), halve it (down to update_proj_gap)
        when it moved more. The whole subspace is compared, not just its first vector, and the gap
        can shrink again when training changes phase."""
        base = group["update_proj_gap"]
        longest = group["max_proj_gap"] or 8 * base
        if "proj_gap" not in state:  # first refresh: start at the base gap, shifted by the phase
            state["proj_gap"] = base
            state["next_refresh"] = state["step"] + base - refresh_phase(group, position)
            return
        overlap = subspace_overlap(state, new, sharded.LOCAL_ROWS if split is None else split)
        gap = state["proj_gap"]
        gap = min(2 * gap, longest) if overlap >= group["adaptive_overlap"] else max(gap // 2, base)
        state["proj_gap"] = gap
        state["last_overlap"] = overlap
        state["next_refresh"] = state["step"] + gap

    # --------------------------------------------------------------------------- state dicts
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every floating state tensor to its parameter's dtype; GaLore's moments
        (the group's ``state_dtype``) and bases (see :func:`basis_dtype`) are put back from the saved
        tensors unchanged.
        A checkpoint from before ``state_dtype`` existed loads as float32 state (its tensors are), and
        each group keeps the ``stochastic_rounding`` it had before the load."""
        groups_before = [dict(group) for group in self.param_groups]
        for index, (saved, group) in enumerate(zip(state_dict.get("param_groups", []), groups_before)):
            if ("rank" in saved) != ("rank" in group):
                raise ValueError(
                    f"GaLoreAdamW.load_state_dict: param group {index} is "
                    f"{'a GaLore group (with rank)' if 'rank' in saved else 'a plain AdamW group (no rank)'} in the "
                    f"state dict but {'a GaLore group' if 'rank' in group else 'a plain AdamW group'} here; its state would not "
                    "fit. Construct the optimizer with the same param groups the state was saved from.")
        super().load_state_dict(state_dict)
        for index, (group, before) in enumerate(zip(self.param_groups, groups_before)):
            group.setdefault("state_dtype", "float32")  # saved state without the key is float32
            for key, value in before.items():  # keys the saving optimizer did not have
                group.setdefault(key, value)
            if "rank" in group:
                _complete_galore_group(group, index)
        self._rounding_seeds.clear()
        self._state_version += 1
        self._plans.clear()
        self._prepared.clear()
        self._step_calls += 1  # invalidates a captured CUDA graph (GraphedStep)
        self._param_info = None  # the loader replaced the group dicts
        self._device_step_cache.clear()
        self._lr_buffers.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in KEEP_DTYPE_STATE:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, copy=True)
            if "projector" in self.state[p]:
                self._adopt_galore_torch_state(p)

    def _adopt_galore_torch_state(self, p: Tensor) -> None:
        """galore-torch 1.0 keeps a parameter's basis in a ``GaLoreProjector`` object; it becomes this
        optimizer's ``proj_left``/``proj_right`` (the same side rule, so the same matrices), and its
        moments take the group's state dtype."""
        index, group, _ = self.param_info(p)
        state = self.state[p]
        projector = state.pop("projector")
        ortho = getattr(projector, "ortho_matrix", None)
        side = self.side(p)
        if side is None:
            raise ValueError(f"GaLoreAdamW.load_state_dict: parameter #{index} (shape {tuple(p.shape)}) has a "
                             "galore-torch projector but its group has no 'rank'; load into the same param groups.")
        if ortho is None or "step" not in state:  # created, never stepped
            state.clear()
            return
        bases = {"left": {"proj_left": ortho}, "right": {"proj_right": ortho},
                 "full": {"proj_left": ortho[0], "proj_right": ortho[1]}}[side]
        dtype = basis_dtype(p, group)
        state.update({key: basis.detach().to(device=p.device, dtype=dtype) for key, basis in bases.items()})
        moments = STATE_DTYPES[group["state_dtype"]]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].to(device=p.device, dtype=moments).contiguous()
        # Refreshes so far, at the steps t (before the increment) with t % gap == 0: only seeds sketches.
        state["refresh_count"] = (state["step"] - 1) // group["update_proj_gap"] + 1 if state["step"] > 0 else 0


@dataclass
class _StepPlan:
    """A group's bucket layout, reused by steady steps while its inputs hold (GaLoreAdamW._reusable_plan)."""

    version: int  # the optimizer's state version it was made under
    settings: tuple  # _plan_settings(group) then
    pointers: tuple  # GaLoreAdamW._grad_pointers(group) then
    buckets: list  # [(side, device, params)]
    singles: list  # parameters stepped one at a time
    steps_left: float  # steady steps it may still serve: none of the group's parameters refreshes in them
    states: list  # the state of every parameter it steps
    steps: tuple  # their step counts after its last step: any other change means it is stale


def _plan_settings(group: dict) -> tuple:
    """The group keys a bucket layout or the refresh schedule depends on (the per-step scalars, lr,
    betas, eps, weight decay, scale, are read at every launch)."""
    return tuple(group.get(key) for key in ("rank", "proj_type", "update_proj_gap", "refresh_policy", "refresh_offset",
                                             "svd", "state_dtype", "stochastic_rounding", "seed"))


def _rounds_stochastically(p: Tensor, group: dict) -> bool:
    """Whether ``p``'s weight is rounded stochastically: its group asks for it and it is bf16."""
    return group["stochastic_rounding"] and p.dtype == torch.bfloat16


def _draws_random_bits(p: Tensor, group: dict) -> bool:
    """Whether ``p``'s step draws random bits: its weight or its (bf16) moments round stochastically."""
    return _rounds_stochastically(p, group) or group["state_dtype"] == "bfloat16"


def _check_stochastic_rounding(group: dict, where: str) -> None:
    value = group["stochastic_rounding"]
    if not isinstance(value, bool):
        raise ValueError(f"{where}: stochastic_rounding={value!r} must be True or False.")
    if value:
        for position, p in enumerate(group["params"]):
            if p.dtype == torch.float16:
                raise ValueError(f"{where}: stochastic_rounding is for bf16 weights, but parameter {position} "
                                 f"(shape {tuple(p.shape)}) is float16; use bf16 weights or set it to False.")


def check_state_dtype(value, where: str) -> str:
    """The canonical name of a moments dtype ("float32" or "bfloat16"), or an error naming the choices."""
    name = _STATE_DTYPE_ALIASES.get(value, value) if isinstance(value, (str, torch.dtype)) else value
    if name not in STATE_DTYPES:
        raise ValueError(f"{where}={value!r} must be 'float32' (the default) or 'bfloat16' (half the moments' "
                         "memory; torch.float32/torch.bfloat16 work too). float16 moments are not offered: "
                         "(1 - beta2) * g^2 underflows float16 for small gradients.")
    return name


def lowrank_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def subspace_overlap(old: dict, new: dict, rows: sharded.Rows = sharded.LOCAL_ROWS) -> float:
    """Mean over the projected sides of ||B_old^T B_new||_F^2 / r: 1 for the same subspace, about
    r / dim for unrelated ones (in float32, whatever dtype the stored bases have). ``rows``: where
    P's rows are (a sharded parameter's old P is a DTensor, its new one this rank's rows)."""
    overlaps = []
    if "proj_left" in new:  # (m, r) columns: the product sums over P's rows
        cross = rows.sum(sharded.local(old["proj_left"]).float().T @ new["proj_left"].float())
        overlaps.append(cross.square().sum() / new["proj_left"].shape[1])
    if "proj_right" in new:  # (r, n) rows
        cross = sharded.local(old["proj_right"]).float() @ new["proj_right"].float().T
        overlaps.append(cross.square().sum() / new["proj_right"].shape[0])
    return float(sum(overlaps) / len(overlaps))


def basis_dtype(p: Tensor, group: dict) -> torch.dtype:
    """The stored bases' dtype: float32, except for bf16/fp16 weights in a group with
    ``state_dtype="bfloat16"``, whose bases are kept in the weights' dtype, the dtype the kernels
    multiply them in (galore-torch keeps them so too): no float32 copy beside the operand copy."""
    if group["state_dtype"] == "bfloat16" and p.dtype in (torch.bfloat16, torch.float16):
        return p.dtype
    return torch.float32


def refresh_phase(group: dict, position: int) -> int:
    """The parameter's refresh phase: a fixed offset, or "stagger" spreading the group evenly."""
    gap, offset = group["update_proj_gap"], group["refresh_offset"]
    if offset == "stagger":
        return (position * gap) // max(1, len(group["params"]))
    return offset % gap


def _rank(group: dict, p: Tensor) -> int:
    return min(group["rank"], min(p.shape))


def _as_int(value):
    """NumPy/torch integers as Python ints (checkpoints must load with weights_only=True)."""
    if value is None or isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value  # not an integer: the checks below name it


def _complete_galore_group(group: dict, group_index: int) -> None:
    """Fills a GaLore group's defaults and rejects settings that would give a wrong update."""
    where = f"param group {group_index}"
    group["rank"] = check_rank(group["rank"], f"{where}: rank")
    for key, default in GALORE_GROUP_DEFAULTS.items():
        group.setdefault(key, default)
    group["update_proj_gap"] = check_update_proj_gap(group["update_proj_gap"], f"{where}: update_proj_gap")
    for key in ("max_proj_gap", "oversample", "niter"):
        group[key] = _as_int(group[key])
    if group["refresh_offset"] != "stagger":
        group["refresh_offset"] = _as_int(group["refresh_offset"])
    check_proj_type(group["proj_type"], f"{where}: proj_type")
    gap = group["update_proj_gap"]
    if group["svd"] not in METHODS:
        raise ValueError(f"{where}: svd={group['svd']!r} must be one of {', '.join(METHODS)}.")
    for key in ("oversample", "niter"):
        value = group[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {key}={value!r} must be None (the default) or an integer >= 0.")
    if group["refresh_policy"] not in REFRESH_POLICIES:
        raise ValueError(f"{where}: refresh_policy={group['refresh_policy']!r} must be one of {', '.join(REFRESH_POLICIES)}.")
    longest = group["max_proj_gap"]
    if longest is not None and (isinstance(longest, bool) or not isinstance(longest, int) or longest < gap):
        raise ValueError(f"{where}: max_proj_gap={longest!r} must be None or an integer >= update_proj_gap ({gap}).")
    if not 0.0 < group["adaptive_overlap"] <= 1.0:
        raise ValueError(f"{where}: adaptive_overlap={group['adaptive_overlap']!r} must be in (0, 1].")
    offset = group["refresh_offset"]
    if offset != "stagger" and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise ValueError(f"{where}: refresh_offset={offset!r} must be an integer >= 0 or 'stagger'.")
    for position, p in enumerate(group["params"]):
        if p.dim() != 2:
            raise ValueError(
                f"{where}: parameter {position} has shape {tuple(p.shape)}, but GaLore projects 2-D "
                "weights only. Move it to a group without 'rank' (e.g. with galore_param_groups), or "
                "reshape it to 2-D."
            )
        effective_rank(group["rank"], tuple(p.shape), f"{where} parameter {position}")
