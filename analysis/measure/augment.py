"""Data augmentation for the data-centric expert representation of group-and-merge (Zhang et al.):
extra rows that are random convex mixtures of token embeddings."""

from __future__ import annotations

import math

import torch
from moescope.analysis.core.errors import MoescopeError
from torch import Tensor


def mix_token_embeddings(hidden: Tensor, ratio: float, seed: int = 0) -> Tensor:
    """Append ``M = round(ratio · T)`` random convex mixtures of token pairs to ``hidden [T, d]``.

    Each new row is ``λ · h_i + (1 − λ) · h_j`` with ``i ≠ j`` drawn uniformly from the T tokens
    (``i = j`` only when T = 1) and ``λ ~ U(0, 1)``, all from ``torch.Generator().manual_seed(seed)``
    (the data augmentation of the group-and-merge paper's data-centric expert representation).
    Returns ``[T + M, d]``: the original rows first, unchanged, then the mixtures (in ``hidden``'s
    dtype and device; mixing is computed in float32)."""
    if hidden.dim() != 2:
        raise MoescopeError(
            f"mix_token_embeddings expects hidden states [T, d], got shape {tuple(hidden.shape)}"
        )
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio < 0:
        raise MoescopeError(f"mixing ratio must be a number ≥ 0, got {ratio!r}")
    t = hidden.shape[0]
    m = round(ratio * t)
    if m == 0 or t == 0:
        return hidden.clone()
    gen = torch.Generator().manual_seed(int(seed))
    i = torch.randint(0, t, (m,), generator=gen)
    if t > 1:  # j uniform over the other T-1 tokens
        j = (i + torch.randint(1, t, (m,), generator=gen)) % t
    else:
        j = i.clone()
    lam = torch.rand(m, 1, generator=gen)
    i, j, lam = i.to(hidden.device), j.to(hidden.device), lam.to(hidden.device)
    h = hidden.float()
    mixed = lam * h[i] + (1.0 - lam) * h[j]
    return torch.cat([hidden, mixed.to(hidden.dtype)])
