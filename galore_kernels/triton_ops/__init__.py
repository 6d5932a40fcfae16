"""Triton kernels of the fused GaLore step (DESIGN.md "Fused step"), one op per module.

- ``project``: phase 1, R = project(G) with the device-side non-finite guard.
- ``adam``: the Adam phase on R (emits the scaled update N) and, for rank-less parameters, dense AdamW.
- ``back_apply``: phase 2, W <- (W - back(N)) * (1 - lr * wd) in place.
- ``nonfinite``: per-tensor Inf/NaN flags for the dense path.
- ``step``: a bucket's whole step, its torch.library ops, and single-parameter adapters.
- ``utils``: launch configurations, precision mapping, pointer tables.

Importing this package imports Triton; ``galore_kernels.dispatch`` does so only when the Triton
backend is asked for, so the rest of the library never needs Triton.
"""
