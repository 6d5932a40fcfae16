"""SplitMix64, the one integer hash behind every seed the package derives (refresh sketches,
stochastic-rounding bits): nearby inputs give unrelated 64-bit outputs. No imports, so the reference
and the optimizer layer can both use it."""
from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finaliser of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix_fields(tag: int, *fields: int) -> int:
    """``tag`` hashed with each field in turn (64 bits): distinct tags keep derived seeds apart."""
    h = tag
    for value in fields:
        h = splitmix64((h ^ (value & MASK64)) & MASK64)
    return h
