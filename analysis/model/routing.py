"""The routing rules of the supported families, as plain functions of router logits.

Each rule maps router logits ``[T, E]`` to ``(topk_idx [T, k], topk_weights [T, k])`` exactly as
the family's transformers router does at inference, with one addition: ``allowed`` (a bool
``[E]`` mask) restricts the choice to a subset of experts, which is what a pruned block whose
router rows were removed computes (the family's renormalisation applied over the kept ones).
``tests/test_families.py`` checks every rule against the real transformers block.

Where the rules differ (all seen in transformers 5's MoE routers):

==========================  ======================================================================
``softmax_topk``            ``p = softmax(l)``; top-k of ``p`` (or of ``p + b`` with a selection bias,
                            ERNIE 4.5); weights ``p``, renormalised if configured (Mixtral, Qwen, …)
``softmax_group_topk``      DeepSeek-V2: top-k of ``softmax(l)`` among the ``topk_group`` groups with
                            the largest single score (``group_limited_greedy``), × scaling factor
``sigmoid_group_topk``      DeepSeek-V3 and kin: ``s = σ(l)``, chosen on ``s + b`` (score-correction
                            bias) within the best groups (top-2 sum), weights ``s`` renormalised,
                            × scaling factor; one group = plain sigmoid top-k (MiniMax-M2, Laguna, …)
``topk_softmax``            top-k of the logits (+ router bias), softmax over the k (GPT-OSS,
                            Granite, Cohere); ``score_fn="sigmoid"``: σ of the k (renormalised if set)
``topk_sigmoid``            Llama 4: top-k of the logits, weights σ(l) of the k, never renormalised
                            (the family multiplies them into the expert input, see ``FamilySpec``)
``sparsemixer``             PhiMoE
==========================  ======================================================================
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
    score_bias: Tensor | None = None  # [E] selection-only bias (DeepSeek-V3 e_score_correction_bias, …)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    jitter_eps: float = 0.0  # PhiMoE sparsemixer threshold
    score_fn: str = "softmax"  # topk_softmax: "softmax" or "sigmoid" over the k chosen logits (Cohere 2)
    logit_softcap: float = 0.0  # sigmoid rules: l ← c·tanh(l / c) first when c > 0 (Laguna)
    topk_method: str = "group_limited_greedy"  # softmax_group_topk: "greedy" ignores the groups


def _masked(logits: Tensor, allowed: Tensor | None) -> Tensor:
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def softmax_topk(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mixtral / Qwen-MoE / OLMoE / ERNIE 4.5: ``p = softmax(l)``; the k largest ``p`` (or ``p + b``
    with a selection bias) win with weights ``p``, then ``w / Σw`` if renormalised."""
    probs = torch.softmax(_masked(logits, allowed).float(), dim=-1)
    if p.score_bias is not None:
        choice = _masked(probs + p.score_bias.float().reshape(-1), allowed)
        idx = torch.topk(choice, p.top_k, dim=-1)[1]
        weights = probs.gather(1, idx)
    else:
        weights, idx = torch.topk(probs, p.top_k, dim=-1)
    if p.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if p.routed_scaling_factor != 1.0:
        weights = weights * p.routed_scaling_factor
    if p.cast_weights_to_logits_dtype:
        weights = weights.to(logits.dtype)
    return idx, weights


def softmax_group_topk(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V2: ``s = softmax(l)``; with ``group_limited_greedy`` only experts of the
    ``topk_group`` groups with the largest max-score compete; the k largest ``s`` win; weights ``s``
    (renormalised only if configured) × ``routed_scaling_factor``."""
    scores = torch.softmax(_masked(logits, allowed).float(), dim=-1)
    if p.topk_method == "group_limited_greedy" and p.n_group > 1:
        num_experts = scores.shape[-1]
        per_group = num_experts // p.n_group
        group_scores = scores.view(-1, p.n_group, per_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, p.n_group, per_group).reshape(-1, num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, idx = torch.topk(scores, k=p.top_k, dim=-1, sorted=False)
    if p.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * p.routed_scaling_factor


def sigmoid_group_topk(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: ``s = σ(logits)``; experts are chosen on ``s + bias`` among the ``topk_group``
    groups with the largest sum of their two best ``s + bias``; weights are the chosen ``s``,
    renormalised if configured, times ``routed_scaling_factor``. With one group (GLM-4.5,
    MiniMax-M2, Hunyuan, AFMoE, Laguna, LFM2, …) this is sigmoid top-k with a selection bias."""
    logits = logits.float()
    if p.logit_softcap > 0:
        logits = torch.tanh(logits / p.logit_softcap) * p.logit_softcap
    scores = logits.sigmoid()
    num_experts = scores.shape[-1]
    choice = scores + p.score_bias.float().reshape(-1) if p.score_bias is not None else scores
    choice = _masked(choice, allowed)
    if p.n_group > 1:
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
    """GPT-OSS / Granite / Cohere 2: ``topk(logits + bias)``, then a softmax over the k chosen
    logits (in float32 and cast back where the family does so); Cohere 2's ``sigmoid`` variant
    takes ``σ`` of the k chosen logits, renormalised if configured."""
    values, idx = torch.topk(_masked(logits, allowed), p.top_k, dim=-1)
    if p.score_fn == "sigmoid":
        weights = values.float().sigmoid()
        if p.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
    elif p.cast_weights_to_logits_dtype:
        weights = F.softmax(values.float(), dim=1).to(logits.dtype)
    else:
        weights = F.softmax(values, dim=1, dtype=values.dtype)
    return idx, weights if p.routed_scaling_factor == 1.0 else weights * p.routed_scaling_factor


def topk_sigmoid(logits: Tensor, p: RouterParams, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Llama 4: ``topk(logits)`` with weights ``σ(l)`` of the chosen logits (no renormalisation, so
    an expert's weight does not depend on which other experts exist)."""
    values, idx = torch.topk(_masked(logits, allowed), p.top_k, dim=1)
    return idx, values.float().sigmoid().to(logits.dtype)


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


def unchosen_removal_is_local(rule: str, p: RouterParams) -> bool:
    """Whether removing an expert that a token did not choose leaves that token's routing as it
    was (same experts, same weights up to rounding), for ``rule`` with ``p``. True where each
    expert's weight depends only on its own logit and the kept set's normalisation over the k
    chosen: top-k then softmax/sigmoid, sigmoid top-k without groups, softmax top-k renormalised
    over the chosen (without a selection bias, which a common rescaling of the probabilities would
    reorder). False for softmax weights over all experts without renormalisation (every weight
    shares the denominator), for group-limited routers (a group's score can hinge on an unchosen
    expert) and PhiMoE's sparsemixer (its threshold depends on all experts). Subset search uses it
    to re-score only the tokens that chose the removed expert."""
    if rule == "softmax_topk":
        return p.renormalize and p.score_bias is None
    if rule == "softmax_group_topk":
        return p.renormalize and (p.n_group <= 1 or p.topk_method != "group_limited_greedy")
    if rule == "sigmoid_group_topk":
        return p.n_group <= 1
    return rule in ("topk_softmax", "topk_sigmoid")


ROUTING_RULES: dict[str, Callable[[Tensor, RouterParams, Tensor | None], tuple[Tensor, Tensor]]] = {
    "softmax_topk": softmax_topk,
    "softmax_group_topk": softmax_group_topk,
    "sigmoid_group_topk": sigmoid_group_topk,
    "topk_softmax": topk_softmax,
    "topk_sigmoid": topk_sigmoid,
    "sparsemixer": sparsemixer_top2,
}

# rules whose experts are split into routing groups that an edit must keep equal in size
GROUP_LIMITED_RULES = ("sigmoid_group_topk", "softmax_group_topk")
