"""Casting a weight to the dtype an export writes, without losing it silently.

A cast to a narrower float keeps the value up to rounding, except where it lies beyond the
target's range: float16 holds at most 65,504, so a bfloat16 or float32 weight of 1e5 becomes
infinity. Such a cast is refused in one line naming the tensor, its largest value and the dtypes
that hold it, before the folder is complete (the export is written atomically)."""

from __future__ import annotations

import torch
from moescope.analysis.core.errors import MoescopeError
from torch import Tensor


def cast_for_writing(t: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``t`` in ``dtype``; refused when a finite value of ``t`` would not be finite in ``dtype``."""
    if t.dtype == dtype or not t.is_floating_point():
        return t
    out = t.to(dtype)
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        lost = torch.isfinite(t) & ~torch.isfinite(out)
        if bool(lost.any()):
            largest = float(t[lost].abs().max())
            raise MoescopeError(f"{name} holds {largest:.4g}, beyond {str(dtype).removeprefix('torch.')}'s range "
                                f"(largest {torch.finfo(dtype).max:.6g}): writing it in that dtype would make it "
                                "infinite; export in bfloat16 or float32 (--dtype), or leave --dtype out to keep "
                                "the checkpoint's own")
    return out
