"""The routing rules of the supported families, as plain functions of router logits.

Each rule maps router logits ``[T, E]`` to ``(topk_idx [T, k], topk_weights [T, k])`` exactly as
the family's transformers router does at inference, with one addition: ``allowed`` (a bool
``[E]`` mask) restricts the choice to a subset of experts, which is what a pruned block whose
router rows were removed computes (the family's renormalisation applied over the kept ones).
``tests/test_families.py`` checks every rule against the real transformers block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class RouterParams:
    """Everything a rule needs besides the logits (read off one MoE block)."""

    top_k: int
    renormalize: bool
    cast_weights_to_logits_dtype: bool = False
    score_bias: Tensor | None = None  # [E] DeepSeek-V3 selection bias
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    jitter_eps: float = 0.0  # PhiMoE sparsemixer threshold


def _masked(logits: Tensor, allowed: Tensor | None) -> Tensor:
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def softmax_topk(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mixtral / Qwen-MoE / OLMoE: ``w = topk(softmax(logits))``, then ``w / Σw`` if renormalised."""
    probs = torch.softmax(_masked(logits, allowed).float(), dim=-1)
    weights, idx = torch.topk(probs, p.top_k, dim=-1)
    if p.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if p.cast_weights_to_logits_dtype:
        weights = weights.to(logits.dtype)
    return idx, weights


def sigmoid_group_topk(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: ``s = σ(logits)``; experts are chosen on ``s + bias`` among the ``topk_group``
    groups with the largest sum of their two best ``s + bias``; weights are the chosen ``s``,
    renormalised if configured, times ``routed_scaling_factor``."""
    scores = logits.float().sigmoid()
    num_experts = scores.shape[-1]
    choice = scores + p.score_bias.float() if p.score_bias is not None else scores
    choice = _masked(choice, allowed)
    per_group = num_experts // p.n_group
    group_scores = choice.view(-1, p.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, p.n_group, per_group).reshape(-1, num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if p.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * p.routed_scaling_factor


def topk_softmax(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GPT-OSS: ``topk(logits + bias)``, then a softmax over the k chosen logits."""
    values, idx = torch.topk(_masked(logits, allowed), p.top_k, dim=-1)
    return idx, F.softmax(values, dim=1, dtype=values.dtype)


def sparsemixer_top2(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PhiMoE's sparsemixer at inference (transformers' own function, training off)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    weights, idx = sparsemixer(_masked(logits, allowed), jitter_eps=p.jitter_eps, training=False, top_k=p.top_k)
    return idx, weights


def mix(Y: Tensor, topk_idx: Tensor, topk_weights: Tensor) -> Tensor:
    """Mix precomputed expert outputs ``Y [E, T, d]`` by a routing: ``Σ_k w[t, k] · Y[idx[t, k], t]``
    (out of place, so it also carries gradients through the weights or ``Y``)."""
    t = torch.arange(Y.shape[1], device=Y.device)
    out = torch.zeros_like(Y[0])
    for k in range(topk_idx.shape[1]):
        out = out + topk_weights[:, k, None].float() * Y[topk_idx[:, k], t]
    return out


ROUTING_RULES: dict[str, Callable[[Tensor, RouterParams, Tensor | None], tuple[Tensor, Tensor]]] = {
    "softmax_topk": softmax_topk,
    "sigmoid_group_topk": sigmoid_group_topk,
    "topk_softmax": topk_softmax,
    "sparsemixer": sparsemixer_top2,
}
