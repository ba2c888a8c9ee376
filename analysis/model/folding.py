"""Folding experts: a many-to-one map of each group member's intermediate neurons onto the merged
expert's, and HC-SMoE's ``fix-dom-same`` rule that chooses it.

A SwiGLU expert ``y = W_down (act(W_gate x) ⊙ W_up x)`` is a sum over its I intermediate neurons,
neuron ``k`` being the gate row ``W_gate[k]``, the up row ``W_up[k]`` (their biases where the
family has them) and the down column ``W_down[:, k]``. A permutation (:mod:`analysis.alignment`)
places each member neuron on one neuron of the reference, one to one; a *fold* may send several
member neurons to the same target. With member coefficients ``c_m`` (non-negative), merged neuron
``i`` is

    n_i = Σ_{m, k : f_m(k) = i} c_m · n_{m,k}  /  Σ_{m, k : f_m(k) = i} c_m

for the gate row, the up row and the down column alike (the same rule for all three), where a
member without a map (``None``, the reference) keeps every neuron in place, ``f_m(k) = k``. Where
no weight lands on a neuron (every member that reaches it has ``c = 0``) it is the plain mean of
the neurons that reach it. Tensors that do not depend on the neuron order (GPT-OSS's down bias) are
averaged with ``c / Σ c``. Each fold is checked to reach every neuron of the merged expert.

HC-SMoE's ``fix-dom-same`` (Chen et al. 2025; the authors' ``hcsmoe/merging/grouping_mixtral.py``,
``_merge_moe_experts_with_dominant_same_rule``, as ``scripts/mixtral/run.sh`` runs it: ``--merge
fix-dom-same --mode all --ingredient act+weight``) chooses the fold: the group's data are, for
every member, the MoE-layer inputs of the calibration tokens routed to it (its top-k), each row
scaled by the token's softmax router probability of that member (``mode all``), all members'
rows concatenated (at most ``FOLD_TOKEN_LIMIT`` of them, a seeded random subset beyond, the
script's ``data_limit``); the coefficients are the members' routed-token counts over the group's
total (``mode all``'s ``input_weight``). On those data, for the dominant expert ``D`` and each
other member ``m``: ``C = corr(h_D, h_m) + corr(v_D, v_m)`` ``[I, I]``, the Pearson correlations
of the intermediate activations ``h = act(W_gate x) ⊙ W_up x`` over the rows and of the neurons'
weight vectors ``v = [W_gate[k], W_up[k], W_down[:, k]]`` over their entries (``ingredient
act+weight``, the authors' ``compute_covariance``: ``cov / (n − 1)`` over ``σ_a σ_b + ε``), and
member neuron ``k`` goes to ``argmax_i C[i, k]`` (the first of equals).
"""

from __future__ import annotations

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.alignment import (
    OUTPUT_SIDE,
    _index,
    _layout,
    check_alignable,
    intermediate_activations,
    intermediate_size,
    neuron_features,
)
from torch import Tensor

FOLD_TOKEN_LIMIT = 50_000  # the authors' data_limit: rows of a group's data used to match its neurons
CORR_EPS = 1e-7  # ε of the authors' correlation denominator (σ_a σ_b + ε)


def check_folds(view, groups: list[list[int]], folds) -> None:
    """Refuse folds whose maps do not have one target per intermediate neuron of the layer's
    experts (the model-independent checks are the plan's), or a layer whose experts hold tensors
    that cannot be folded."""
    if folds is None:
        return
    where = f"layer {view.index}"
    if len(folds) != len(groups):
        raise MoescopeError(f"{where}: 'folds' has {len(folds)} entries for {len(groups)} groups")
    if not any(f is not None for fs in folds for f in (fs or [])):
        return
    check_alignable(view)
    I = intermediate_size(view)
    for g, fs in zip(groups, folds):
        if fs is None:
            continue
        if len(fs) != len(g):
            raise MoescopeError(f"{where}: group {g} has {len(g)} members but {len(fs)} folds")
        for e, f in zip(g, fs):
            if f is not None and (len(f) != I or not all(0 <= i < I for i in f)):
                raise MoescopeError(f"{where}: the fold of expert {e} does not send each of its {I} intermediate "
                                    f"neurons to one of the merged expert's {I} (0..{I - 1}); it lists {len(f)}")


def fold_weights(maps: list[Tensor], coeffs: list[float], size: int) -> list[Tensor]:
    """Per member, the weight ``[I]`` of each of its neurons in the neuron it is folded into: its
    coefficient over the total coefficient reaching that neuron, or one over the number of neurons
    reaching it where that total is 0 (float64)."""
    c = [float(w) for w in coeffs]
    total = torch.zeros(size, dtype=torch.float64)
    count = torch.zeros(size, dtype=torch.float64)
    for f, w in zip(maps, c):
        total.index_add_(0, f, torch.full((f.numel(),), w, dtype=torch.float64))
        count.index_add_(0, f, torch.ones(f.numel(), dtype=torch.float64))
    out = []
    for f, w in zip(maps, c):
        t = total[f]
        out.append(torch.where(t > 0, w / torch.where(t > 0, t, torch.ones_like(t)), 1.0 / count[f]))
    return out


def fold_group(view, tensors: dict[str, Tensor], group: list[int], coeffs: list[float], folds) -> dict[str, Tensor]:
    """The merged expert of ``group`` (one ``[...]`` slice per fused tensor name, float32) under
    ``folds`` (per member: None, neurons in place, or a list of I targets): see the module
    docstring. ``tensors`` are the layer's fused expert tensors (name → ``[E, ...]``)."""
    neurons = _layout(view).neurons
    I = intermediate_size(view)
    maps = [torch.arange(I) if f is None else torch.as_tensor(f, dtype=torch.long) for f in folds]
    weights = fold_weights(maps, coeffs, I)
    c = torch.tensor([float(w) for w in coeffs], dtype=torch.float64)
    share = c / c.sum() if float(c.sum()) > 0 else torch.full_like(c, 1.0 / len(c))
    out = {}
    for name, t in tensors.items():
        if name not in neurons:  # output side (check_alignable refuses anything else): c / Σc
            if name not in OUTPUT_SIDE:
                raise MoescopeError(f"layer {view.index}: cannot fold expert tensor {name}")
            acc = sum(float(s) * t[e].double() for e, s in zip(group, share.tolist()))
            out[name] = acc.float()
            continue
        axis, form = neurons[name]
        acc = torch.zeros_like(t[group[0]], dtype=torch.float64)
        for e, f, w in zip(group, maps, weights):
            src = t[e].double()
            shape = [1] * src.dim()
            shape[axis] = -1
            scale = _spread(w, form).reshape(shape)
            acc.index_add_(axis, _index(f, form), src * scale)
        out[name] = acc.float()
    return out


def _spread(w: Tensor, form: str) -> Tensor:
    """Per-neuron values laid out along a neuron axis of the given form (as :func:`_index` lays out
    indices): gate then up halves, interleaved gate/up, or plain."""
    if form == "interleaved":
        return torch.stack([w, w], dim=1).reshape(-1)
    if form == "halves":
        return torch.cat([w, w])
    return w


# ---------------------------------------------------------------- HC-SMoE's fix-dom-same


def pearson_columns(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """``[Ia, Ib]`` correlation of ``a [n, Ia]``'s columns with ``b [n, Ib]``'s, as the authors'
    ``compute_covariance``: ``Σ (a − ā)(b − b̄) / (n − 1)`` over ``σ_a σ_b + ε`` (unbiased σ), in
    float64, in chunks of ``b``'s columns."""
    a = a.double()
    n = a.shape[0]
    ac = a - a.mean(0)
    sa = ac.pow(2).sum(0).div(n - 1).sqrt()
    out = []
    for j in range(0, b.shape[1], chunk):
        bc = b[:, j:j + chunk].double()
        bc = bc - bc.mean(0)
        sb = bc.pow(2).sum(0).div(n - 1).sqrt()
        out.append((ac.T @ bc) / (n - 1) / (sa[:, None] * sb[None, :] + CORR_EPS))
    return torch.cat(out, dim=1)


def routed_group_rows(view, group: list[int], x: Tensor, limit: int = FOLD_TOKEN_LIMIT, seed: int = 0
                      ) -> tuple[Tensor, list[int]]:
    """The group's data for ``fix-dom-same`` and each member's routed-token count: for each member in
    turn, the rows of ``x [T, d]`` whose top-k (the family's routing rule) holds it, each scaled by
    the token's softmax router probability of that member (the authors' ``mode all``), concatenated;
    at most ``limit`` of them, a seeded random subset (the authors' ``data_limit``; the order of rows
    does not change a correlation)."""
    x = x.reshape(-1, x.shape[-1])
    routing = view.route(x)
    probs = torch.softmax(routing.logits.float(), dim=-1)
    rows, counts = [], []
    for e in group:
        tok = (routing.topk_idx == e).any(-1)
        counts.append(int(tok.sum()))
        rows.append(x[tok].float() * probs[tok, e, None])
    data = torch.cat(rows)
    if data.shape[0] > limit:
        keep = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        data = data[keep]
    return data, counts


def fix_dom_same(view, group: list[int], dominant: int, x: Tensor, limit: int = FOLD_TOKEN_LIMIT, seed: int = 0
                 ) -> tuple[list[list[int] | None], list[float]]:
    """HC-SMoE's ``fix-dom-same`` fold of ``group`` onto its member ``group[dominant]`` on the
    layer's calibration inputs ``x [T, d]`` (module docstring): (per member the fold, None for the
    dominant; the coefficients, routed-token shares, uniform where no member was routed). With fewer
    than two rows of group data the activations say nothing and the weights alone match."""
    check_alignable(view)
    data, counts = routed_group_rows(view, group, x, limit, seed)
    total = sum(counts)
    coeffs = [c / total for c in counts] if total > 0 else [1.0 / len(group)] * len(group)
    dom = group[dominant]
    use_act = data.shape[0] >= 2
    h_dom = intermediate_activations(view, dom, data) if use_act else None
    v_dom = neuron_features(view, dom).T  # [3d (+2), I]: one column per neuron
    folds: list[list[int] | None] = []
    for e in group:
        if e == dom:
            folds.append(None)
            continue
        C = pearson_columns(v_dom, neuron_features(view, e).T)
        if use_act:
            C = pearson_columns(h_dom, intermediate_activations(view, e, data)) + C
        folds.append(torch.argmax(C, dim=0).tolist())
    return folds, coeffs


def centroid_member(distance: Tensor, group: list[int]) -> int:
    """The position in ``group`` of the member nearest the group's centroid, from the Euclidean
    distances between the members' representations (``‖x_i − x̄‖² = (1/m) Σ_j ‖x_i − x_j‖² − const``,
    so the member with the least sum of squared distances to the others; the first of equals): the
    dominant expert of HC-SMoE's clustering path (``clustering.py``: the member closest to its
    cluster's centre)."""
    D = distance.double()[group][:, group]
    score = D.pow(2).sum(1)
    return int(torch.argmin(score))
