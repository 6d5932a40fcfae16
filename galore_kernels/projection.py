"""Which side of a gradient GaLore projects, and the checks on the settings that decide it.

The side rule is galore-torch 1.0's, kept exactly so trajectories match step for step:
``std`` projects on the left when ``m < n`` and on the right otherwise (square included);
``reverse_std`` swaps that; ``left``/``right`` force a side; ``full`` projects both sides.

Unlike galore-torch, the side is decided once from the weight's shape and then used for both the
projection and the back-projection. galore-torch re-derives it in ``project_back`` from the shape of
the low-rank tensor, which for ``reverse_std`` picks the wrong side whenever that tensor is square
(``m < n`` with ``rank >= m``): the back-projection then fails or mixes the wrong basis in.
"""
from __future__ import annotations

import operator
import warnings
from typing import Literal

Side = Literal["left", "right", "full"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def projection_side(shape: tuple[int, ...], proj_type: str) -> Side:
    """The side GaLore projects a weight of ``shape`` (m, n) on, for ``proj_type``."""
    check_proj_type(proj_type)
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type  # type: ignore[return-value]


def check_proj_type(proj_type: str, where: str = "proj_type") -> None:
    if proj_type not in PROJ_TYPES:
        raise ValueError(
            f"{where}={proj_type!r} is not a GaLore projection type; use one of {', '.join(PROJ_TYPES)} "
            f"('std' is galore-torch's default)."
        )


def _positive_int(value):
    """``value`` as an int when it is an integer >= 1 (NumPy and torch integers accepted, bool not),
    else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number >= 1 else None


def check_rank(rank, where: str = "rank") -> int:
    """``rank`` as an int, or a ValueError naming ``where``."""
    value = _positive_int(rank)
    if value is None:
        raise ValueError(f"{where}={rank!r} is invalid: the GaLore rank must be an integer >= 1 (e.g. 128).")
    return value


def check_update_proj_gap(gap, where: str = "update_proj_gap") -> int:
    """``gap`` as an int, or a ValueError naming ``where``."""
    value = _positive_int(gap)
    if value is None:
        raise ValueError(f"{where}={gap!r} must be an integer >= 1 (steps between refreshes, e.g. 200).")
    return value


def effective_rank(rank: int, shape: tuple[int, ...], what: str = "parameter") -> int:
    """``rank`` clamped to the smaller side of ``shape``, warning when it had to be clamped."""
    limit = min(shape)
    if rank > limit:
        warnings.warn(
            f"GaLore rank {rank} is larger than the smaller side of {what} with shape "
            f"{tuple(shape)}; clamped to {limit}. Lower 'rank' for this group to silence this.",
            stacklevel=3,
        )
        return limit
    return rank
