"""Looking at a model's experts token by token: which tokens each expert receives, how many would
skip under dynamic skipping, and how a criterion lines up with the drop grid.

The routing trace is the per-token routing of every MoE layer on a calibration batch (the chosen
experts ``topk_idx [T, k]`` and their weights ``topk_weights [T, k]``, T = N·L tokens in row-major
order of ``input_ids [N, L]``). It costs one forward pass and is cached like an analysis (key:
model fingerprint, dtype, data fingerprint, version). Everything else here reads a trace, a stored
analysis or a drop grid and computes nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from moescope.analysis.core.cache import StoredResult
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.merging import is_distance  # MSE and Euclidean: smaller = more alike
from torch import Tensor

TRACE_VERSION = 1

Progress = Callable[[str, int, int], None]


class RoutingTrace(StoredResult):
    """Read access to a stored routing trace."""

    @property
    def input_ids(self) -> Tensor:  # [N, L]
        return self._t["input_ids"]

    def num_experts(self, layer: int) -> int:
        return int(self.meta["layers"][str(self._check(layer))]["num_experts"])

    def topk_idx(self, layer: int) -> Tensor:  # [T, k]
        return self._t[f"L{self._check(layer)}.topk_idx"]

    def topk_weights(self, layer: int) -> Tensor:  # [T, k]
        return self._t[f"L{self._check(layer)}.topk_weights"]

    def _check(self, layer: int) -> int:
        if str(layer) not in self.meta["layers"]:
            raise MoescopeError(f"layer {layer} is not an MoE layer of this trace; MoE layers: {self.layers}")
        return int(layer)


def _trace_parts(model, batch) -> dict:
    return {"model": model.fingerprint(), "dtype": str(next(model.hf.parameters()).dtype),
            "data": batch.fingerprint, "version": TRACE_VERSION}


def routing_trace(model, batch, cache=None, chunk_size: int = 8, progress: Progress | None = None) -> RoutingTrace:
    """Route every token of ``batch`` (a TokenBatch) through every MoE layer of ``model`` and store
    the choices; served from ``cache`` when done before. ``progress("trace", layer + 1, layers)``."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.measure.capture import LayerStream

    cache = cache or Cache()
    parts = _trace_parts(model, batch)

    def compute():
        tensors = {"input_ids": batch.input_ids.to(torch.int64).contiguous()}
        layers = {}
        stream = LayerStream(model, batch.input_ids, chunk_size=chunk_size)
        n = model.num_hidden_layers
        for l, x in stream.layers():
            if x is not None:
                view = model.layers[l]
                with model.materialized(view.block):
                    r = view.route(x)
                tensors[f"L{l}.topk_idx"] = r.topk_idx.to(torch.int32).cpu().contiguous()
                tensors[f"L{l}.topk_weights"] = r.topk_weights.float().cpu().contiguous()
                layers[str(l)] = {"num_experts": view.num_experts, "top_k": view.top_k}
            if progress:
                progress("trace", l + 1, n)
        meta = {"model": parts["model"], "model_source": model.source, "data": batch.describe(), "layers": layers}
        return {"tensors": tensors, "meta": meta}

    label = f"{model.source.split('/')[-1]}-{batch.source}-{batch.n_samples}x{batch.seq_len}"
    return RoutingTrace(cache.get_or_compute("routing", parts, compute, label=label))


def lookup_routing_trace(model, batch, cache=None) -> RoutingTrace | None:
    """The stored trace :func:`routing_trace` would return, or None (never computes)."""
    from moescope.analysis.core.cache import lookup

    return lookup("routing", _trace_parts(model, batch), RoutingTrace, cache)


# ---------------------------------------------------------------- tokens an expert receives


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_examples(trace: RoutingTrace, tokenizer, layer: int, expert: int, n: int = 10,
                   context: int = 8, per_token: int = 2) -> list[dict]:
    """The ``n`` occurrences routed to ``expert`` in ``layer`` with the largest routing weight, at most
    ``per_token`` per distinct token id (so one frequent token does not fill the list), each as
    ``{"sequence", "position", "before", "token", "after", "weight", "choice"}``: the decoded token,
    ``context`` decoded tokens either side within its sequence, its routing weight for this expert
    and which of its choices the expert was (1 = the highest-weighted)."""
    E = trace.num_experts(layer)
    if not 0 <= expert < E:
        raise MoescopeError(f"layer {layer}: expert {expert} is not in 0..{E - 1}")
    idx, w = trace.topk_idx(layer), trace.topk_weights(layer)
    ids = trace.input_ids
    L = ids.shape[1]
    flat = ids.reshape(-1)
    hit = idx == expert  # [T, k]
    tokens = hit.any(-1).nonzero().squeeze(-1)
    if tokens.numel() == 0:
        return []
    weight = (w * hit).sum(-1)[tokens]
    # the expert's rank among the token's choices, by weight (1 = largest)
    mine = weight[:, None]
    choice = (w[tokens] > mine).sum(-1) + 1
    out, seen = [], {}
    for i in torch.argsort(weight, descending=True, stable=True).tolist():
        t = int(tokens[i])
        tok = int(flat[t])
        if seen.get(tok, 0) >= per_token:
            continue
        seen[tok] = seen.get(tok, 0) + 1
        row, pos = divmod(t, L)
        seq = ids[row].tolist()
        out.append({
            "sequence": row, "position": pos,
            "before": _decode(tokenizer, seq[max(0, pos - context) : pos]),
            "token": _decode(tokenizer, [tok]),
            "after": _decode(tokenizer, seq[pos + 1 : pos + 1 + context]),
            "weight": float(weight[i]), "choice": int(choice[i]),
        })
        if len(out) == n:
            break
    return out


def top_tokens(trace: RoutingTrace, tokenizer, layer: int, expert: int, n: int = 15) -> list[dict]:
    """The token ids routed to ``expert`` most often: ``{"token", "count", "share"}`` where share is
    the fraction of that token's occurrences in the batch that chose this expert."""
    E = trace.num_experts(layer)
    if not 0 <= expert < E:
        raise MoescopeError(f"layer {layer}: expert {expert} is not in 0..{E - 1}")
    flat = trace.input_ids.reshape(-1)
    hit = (trace.topk_idx(layer) == expert).any(-1)
    routed = torch.bincount(flat[hit], minlength=int(flat.max()) + 1)
    total = torch.bincount(flat, minlength=routed.numel())
    order = torch.argsort(routed, descending=True, stable=True)[:n]
    return [{"token": _decode(tokenizer, [int(t)]), "count": int(routed[t]), "share": float(routed[t] / total[t])}
            for t in order.tolist() if routed[t] > 0]


# ---------------------------------------------------------------- dynamic skipping


def skip_ratios(trace: RoutingTrace, betas: dict[int, float]) -> dict[int, dict[str, float]]:
    """Per layer, under dynamic skipping with threshold ``betas[layer]``
    (:func:`analysis.skipping.skip_mask`): ``tokens`` = fraction of tokens that skip at least one
    of their selected experts, ``calls`` = fraction of selected (token, expert) calls skipped."""
    from moescope.analysis.model.skipping import skip_mask

    out = {}
    for l, beta in sorted(betas.items()):
        skip = skip_mask(trace.topk_weights(int(l)), float(beta))
        out[int(l)] = {"beta": float(beta), "tokens": float(skip.any(-1).float().mean()),
                       "calls": float(skip.float().mean())}
    return out


# ---------------------------------------------------------------- criteria against the drop grid


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length vectors (average ranks for ties), over the
    positions where both are finite; NaN with fewer than 3 such positions or a constant side."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}")
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok], y[ok]
    if x.numel() < 3:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx @ ry) / denom) if denom > 0 else float("nan")


def _average_ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for v in torch.unique(x):  # ties share their mean rank
        m = x == v
        if int(m.sum()) > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def criterion_grid_correlation(result, grid, criterion: str) -> dict[int, float]:
    """Per MoE layer, the Spearman correlation between ``criterion`` (of a stored analysis) and the
    perplexity increase when each expert alone is dropped (:class:`analysis.sensitivity.DropGrid`).
    Positive: experts with a low value matter less, so dropping by ``min`` follows the grid."""
    out = {}
    delta = dict(zip(grid.layers, grid.delta()))
    for l in result.layers:
        if l in delta:
            v = result.criterion(l, criterion)
            if v.numel() != len(delta[l]):
                raise MoescopeError(f"layer {l}: the analysis has {v.numel()} experts but the drop grid "
                                    f"{len(delta[l])}; they come from different models")
            out[l] = spearman(v, delta[l])
    if not out:
        raise MoescopeError(f"the drop grid (layers {grid.layers}) and the analysis (layers {result.layers}) "
                            "share no MoE layer")
    return out


def drop_ranks(result, criterion: str, order: str) -> Tensor:
    """``[layers, max E]`` order in which dropping by ``order`` (min | max) of ``criterion`` removes
    each expert of each layer (0 = first; an expert without a value goes first; NaN pads)."""
    from moescope.analysis.measure.criteria import criterion_scores

    if order not in ("min", "max"):
        raise MoescopeError(f"order must be min or max, got {order!r}")
    scores = criterion_scores(result, criterion, order)
    width = max(s.numel() for s in scores.values())
    out = torch.full((len(result.layers), width), float("nan"))
    for i, l in enumerate(result.layers):
        s = scores[l]
        ranking = sorted(range(s.numel()), key=lambda e: (float(s[e]), e))  # lowest keep-score first
        for r, e in enumerate(ranking):
            out[i, e] = r
    return out


# a bounded similarity (CKA, cosine) at or above this says two experts are near-duplicates: the
# default merge threshold (the Similarity page) and what the Model page calls a merge candidate
SIMILAR_AT = 0.9


def similarity_bounds(similarity: str) -> tuple[float, float] | None:
    """The values a similarity can take, for an absolute colour scale: 0–1 for CKA (linear or
    RBF), −1–1 for a cosine; None for a distance (MSE), which has no upper bound."""
    if is_distance(similarity):
        return None
    if similarity.startswith("cka"):
        return 0.0, 1.0
    return -1.0, 1.0


def pairs_beyond(S: Tensor, threshold: float, higher_is_similar: bool = True) -> list[tuple[int, int]]:
    """Distinct expert pairs ``(i < j)`` at least as alike as ``threshold`` (``S ≥ t`` for a
    similarity, ``S ≤ t`` for a distance)."""
    E = S.shape[0]
    i, j = torch.triu_indices(E, E, offset=1)
    v = S[i, j]
    hit = (v >= threshold) if higher_is_similar else (v <= threshold)
    return [(int(a), int(b)) for a, b in zip(i[hit].tolist(), j[hit].tolist())]


def top_pairs(S: Tensor, n: int = 5, higher_is_similar: bool = True) -> list[dict]:
    """The ``n`` most similar distinct expert pairs of a similarity matrix ``[E, E]`` as
    ``{"experts": (i, j), "value": S[i, j]}`` (for a distance such as MSE pass ``higher_is_similar=False``)."""
    E = S.shape[0]
    i, j = torch.triu_indices(E, E, offset=1)
    vals = S[i, j].double()
    key = torch.where(torch.isfinite(vals), vals if higher_is_similar else -vals, torch.tensor(-math.inf))
    order = torch.argsort(key, descending=True, stable=True)[:n]
    return [{"experts": (int(i[k]), int(j[k])), "value": float(vals[k])} for k in order.tolist()]


def cluster_order(S: Tensor, higher_is_similar: bool = True) -> list[int]:
    """An order of the experts that puts alike experts next to each other: the leaves of an
    average-linkage hierarchical clustering (scipy) on the dissimilarity ``1 − S/max|S|`` (for a
    similarity) or ``S`` (for a distance such as MSE), with the optimal leaf ordering (adjacent
    leaves as alike as possible). A permutation of ``range(E)``; the identity for E ≤ 2."""
    import numpy as np
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    M = S.double().cpu().numpy()
    E = M.shape[0]
    if E <= 2:
        return list(range(E))
    M = np.nan_to_num((M + M.T) / 2, nan=0.0, posinf=0.0, neginf=0.0)
    if higher_is_similar:
        scale = np.abs(M).max() or 1.0
        D = 1.0 - M / scale
    else:
        D = M.copy()
    D = np.clip(D, 0.0, None)
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(D, checks=False), method="average")
    Z = optimal_leaf_ordering(Z, squareform(D, checks=False))
    return [int(e) for e in leaves_list(Z)]
