"""Data augmentation for the data-centric expert representation of group-and-merge (Zhang et al.,
§3.5 and Algorithm 1 line 5, ``R(f_i) = f_i(Mixup(D))``): calibration sequences whose token
embeddings are random convex mixtures of two calibration sequences' embeddings, run through the
model like any other sequence (:func:`mixup_pairs`, :func:`mix_embeddings`); and moescope's own
cheaper variant, mixing the rows of one layer's input hidden states (:func:`mix_hidden_rows`)."""

from __future__ import annotations

import math

import torch
from moescope.analysis.core.errors import MoescopeError
from torch import Tensor

AUGMENTS = ("embeddings", "hidden_states")


def _check_ratio(ratio) -> None:
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio < 0:
        raise MoescopeError(f"mixing ratio must be a number ≥ 0, got {ratio!r}")


def _pairs(n: int, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``m`` pairs ``(i, j)`` drawn uniformly from ``n`` items with ``i ≠ j`` (``i = j`` only when n = 1)."""
    i = torch.randint(0, n, (m,), generator=gen)
    j = (i + torch.randint(1, n, (m,), generator=gen)) % n if n > 1 else i.clone()
    return i, j


def mixup_pairs(n_sequences: int, ratio: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The mixup of Algorithm 1: ``M = round(ratio · N)`` mixed sequences, each from two distinct
    calibration sequences ``a ≠ b`` drawn uniformly and one mixing weight ``λ ~ U(0, 1)`` (mixup's
    Beta(1, 1)) for the whole sequence. Returns ``(a [M], b [M], λ [M])``, all from
    ``torch.Generator().manual_seed(seed)``."""
    _check_ratio(ratio)
    m = round(ratio * n_sequences)
    gen = torch.Generator().manual_seed(int(seed))
    if m == 0 or n_sequences == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    a, b = _pairs(n_sequences, m, gen)
    return a, b, torch.rand(m, generator=gen)


def mix_embeddings(emb_a: Tensor, emb_b: Tensor, lam: Tensor) -> Tensor:
    """``λ · e_a + (1 − λ) · e_b`` position by position for token embeddings ``[M, L, d]`` of two
    sequences and ``λ [M]`` (computed in float32, returned in ``emb_a``'s dtype)."""
    if emb_a.shape != emb_b.shape or emb_a.dim() != 3 or lam.shape != emb_a.shape[:1]:
        raise MoescopeError(f"mix_embeddings expects two [M, L, d] embeddings and λ [M], got "
                            f"{tuple(emb_a.shape)}, {tuple(emb_b.shape)}, {tuple(lam.shape)}")
    w = lam.to(emb_a.device, torch.float32)[:, None, None]
    return (w * emb_a.float() + (1 - w) * emb_b.float()).to(emb_a.dtype)


def mix_hidden_rows(hidden: Tensor, ratio: float, seed: int = 0) -> Tensor:
    """moescope's variant (``augment=hidden_states``): append ``M = round(ratio · T)`` random convex
    mixtures of token pairs to one layer's input ``hidden [T, d]``.

    Each new row is ``λ · h_i + (1 − λ) · h_j`` with ``i ≠ j`` drawn uniformly from the T tokens
    (``i = j`` only when T = 1) and ``λ ~ U(0, 1)``, all from ``torch.Generator().manual_seed(seed)``.
    Returns ``[T + M, d]``: the original rows first, unchanged, then the mixtures (in ``hidden``'s
    dtype and device; mixing is computed in float32). Unlike the paper's mixup the mixtures never
    pass through the layers before this one."""
    if hidden.dim() != 2:
        raise MoescopeError(f"mix_hidden_rows expects hidden states [T, d], got shape {tuple(hidden.shape)}")
    _check_ratio(ratio)
    t = hidden.shape[0]
    m = round(ratio * t)
    if m == 0 or t == 0:
        return hidden.clone()
    gen = torch.Generator().manual_seed(int(seed))
    i, j = _pairs(t, m, gen)
    lam = torch.rand(m, 1, generator=gen)
    i, j, lam = i.to(hidden.device), j.to(hidden.device), lam.to(hidden.device)
    h = hidden.float()
    mixed = lam * h[i] + (1.0 - lam) * h[j]
    return torch.cat([hidden, mixed.to(hidden.dtype)])
