"""Which experts a strategy keeps: the target per layer (``keep`` or a global ``budget``), the
top-scoring experts of a layer (the same number from each routing group of a group-limited
router), and the iterative drop loop (one expert per layer per round, re-estimated)."""

from __future__ import annotations

import contextlib
import math

import torch
from moescope.analysis.core.errors import MoescopeError


def routing_groups(view) -> list[list[int]]:
    """The router's expert groups: one per routing group for group-limited routers (DeepSeek-V3),
    else the whole layer. Selection happens within each, the same number from each."""
    if not view.spec.group_limited:
        return [list(range(view.num_experts))]
    n_group = view.router_params.n_group
    per = view.num_experts // n_group
    return [list(range(k * per, (k + 1) * per)) for k in range(n_group)]


def per_group_count(view, count: int) -> int:
    """Experts kept per routing group when a layer keeps ``count``; refused when uneven."""
    groups = routing_groups(view)
    if count % len(groups) or count // len(groups) < (2 if len(groups) > 1 else 1):
        raise MoescopeError(f"layer {view.index}: keeping {count} experts cannot leave the router's {len(groups)} "
                            f"routing groups the same size with at least 2 each; keep a multiple of {len(groups)}")
    return count // len(groups)


def keep_counts(model, params: dict, scores: dict[int, torch.Tensor] | None = None,
                higher_is_better: bool = True) -> dict[int, int]:
    """Experts to keep per MoE layer: ``keep`` (uniform) or ``budget`` (total, split by ranking
    ``scores`` across layers when given, else proportionally to each layer's size). Needs only the
    model's structure (a model built from its config alone will do)."""
    keep, budget = params.get("keep"), params.get("budget")
    if (keep is None) == (budget is None):
        raise MoescopeError("give exactly one target: keep (experts per layer) or budget (experts in all)")
    layers = model.layers
    if budget is not None and any(v.spec.group_limited for v in layers.values()):
        raise MoescopeError("a global budget is not supported for group-limited routers (routing groups must stay "
                            "equal); give keep (experts per layer)")
    if keep is not None:
        keep = int(keep)
        for l, v in layers.items():
            if not v.top_k <= keep <= v.num_experts:
                raise MoescopeError(f"keep={keep} is not possible in layer {l}: it must be between top-k "
                                    f"({v.top_k}) and the layer's {v.num_experts} experts")
            per_group_count(v, keep)
        return {l: keep for l in layers}
    budget = int(budget)
    lo = sum(v.top_k for v in layers.values())
    hi = sum(v.num_experts for v in layers.values())
    if not lo <= budget <= hi:
        raise MoescopeError(f"budget={budget} is not possible: it must be between {lo} (top-k in every layer) and {hi}")
    counts = {l: v.top_k for l, v in layers.items()}
    if scores is None:
        extra = budget - lo
        spare = {l: v.num_experts - v.top_k for l, v in layers.items()}
        total_spare = sum(spare.values()) or 1
        for l in layers:
            counts[l] += math.floor(extra * spare[l] / total_spare)
        left = budget - sum(counts.values())
        for l in sorted(layers, key=lambda l: -spare[l]):
            if left == 0:
                break
            if counts[l] < layers[l].num_experts:
                counts[l] += 1
                left -= 1
        return counts
    # rank the experts beyond each layer's top-k guaranteed best by score, across layers
    pool = []
    for l, s in scores.items():
        order = torch.argsort(s, descending=higher_is_better)
        for rank, e in enumerate(order.tolist()):
            if rank >= layers[l].top_k:
                pool.append((float(s[e]) if higher_is_better else -float(s[e]), l))
    pool.sort(key=lambda t: -t[0])
    for _, l in pool[: budget - lo]:
        counts[l] += 1
    return counts


def nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, value), x)


def top_layer(view, s: torch.Tensor, count: int) -> list[int]:
    """The ``count`` highest-scoring experts of a layer (ties: lower index first), the same number
    from each routing group where the router is group-limited."""
    per = per_group_count(view, count)
    out = []
    for members in routing_groups(view):
        order = sorted(members, key=lambda e: (-float(s[e]), e))
        out += order[: per if len(routing_groups(view)) > 1 else count]
    return sorted(out)


def top(model, scores: dict[int, torch.Tensor], counts: dict[int, int]) -> dict[int, list[int]]:
    """:func:`top_layer` of every scored layer."""
    return {l: top_layer(model.layers[l], s, counts[l]) for l, s in scores.items()}


def iterative_drop(ctx, counts: dict[int, int], score_fn, metrics, after_round=None,
                   restore: bool = True) -> dict[int, list[int]]:
    """Drop one expert per layer (one per routing group) per round, the lowest keep-score,
    re-analysing the pruned model each round; returns the surviving original indices.
    ``after_round(r, rounds)`` runs after each round's drops (the lottery finetunes there);
    ``restore=False`` leaves ``ctx.model`` edited (only for a model the caller made for it)."""
    model = ctx.model
    alive = {l: list(range(v.num_experts)) for l, v in model.layers.items()}
    rounds = max((len(alive[l]) - counts[l]) // len(routing_groups(model.layers[l])) for l in alive)
    with contextlib.ExitStack() as stack:
        if restore:
            for l in model.layers:
                stack.enter_context(model.temporary_edit(l))
        for r in range(rounds):
            scores = score_fn(ctx.analysis(metrics=metrics))
            for l in model.layers:
                if len(alive[l]) <= counts[l]:
                    continue
                s = scores[l]
                view = model.layers[l]
                n_groups = len(routing_groups(view))
                keep_local = top_layer(view, s, len(s) - n_groups)  # one fewer in every routing group
                model.keep(l, keep_local)
                alive[l] = [alive[l][e] for e in keep_local]
            if after_round is not None:
                after_round(r, rounds)
            ctx.report("rounds", r + 1, rounds)
    return {l: sorted(a) for l, a in alive.items()}


def uniform_count(model, counts: dict[int, int]) -> int:
    """The per-layer count nearest to the mean of ``counts`` (the total kept as close as
    possible), within top-k and the layers' sizes."""
    mean = sum(counts.values()) / max(len(counts), 1)
    lo = max(v.top_k for v in model.layers.values())
    hi = min(v.num_experts for v in model.layers.values())
    return min(max(int(math.floor(mean + 0.5)), lo), hi)


def even_out(plan, model, scores: dict[int, torch.Tensor], count: int | None = None, by: str = ""):
    """A copy of ``plan`` keeping ``count`` output experts in every MoE layer (default: the count
    nearest the plan's mean, :func:`uniform_count`): a layer with more drops its kept experts with
    the lowest ``scores`` (higher = matters more), a layer with fewer adds back its dropped experts
    with the highest; merged groups stay as they are. ``by`` names the scores in the provenance."""
    import copy

    from moescope.analysis.pruning.plan import edit_layer

    before = plan.experts_after(model)
    count = uniform_count(model, before) if count is None else int(count)
    out = copy.deepcopy(plan)
    for l, view in model.layers.items():
        E = view.num_experts
        if not view.top_k <= count <= E:
            raise MoescopeError(f"cannot even out to {count} experts per layer: layer {l} needs between top-k "
                                f"({view.top_k}) and {E}")
        lp = plan.layers.get(l)
        groups = lp.groups if lp is not None else [[e] for e in range(E)]
        merged = [g for g in groups if len(g) > 1]
        singles = [g[0] for g in groups if len(g) == 1]
        dropped = [e for e in range(E) if all(e not in g for g in groups)]
        s = nan_to(scores[l].double(), float("-inf"))
        change = count - len(groups)
        if change < 0:
            if len(merged) > count:
                raise MoescopeError(f"cannot even out to {count} experts per layer: layer {l} has {len(merged)} "
                                    "merged groups; split some first or choose a larger count")
            least = sorted(singles, key=lambda e: (float(s[e]), -e))[:-change]
            dropped = dropped + least
        elif change > 0:
            most = sorted(dropped, key=lambda e: (-float(s[e]), e))[:change]
            dropped = [e for e in dropped if e not in most]
        if change:
            out = edit_layer(out, l, E, dropped, merged)
    out.provenance = {**out.provenance, "evened_out": {"count": count, "by": by,
                                                       "before": {str(l): c for l, c in before.items()}}}
    return out


def usage_threshold_counts(model, usage_counts: dict[int, torch.Tensor], total: int) -> dict[int, int]:
    """MC-SMoE's global allocation of ``total`` output experts (groups) over the MoE layers, as the
    authors' Mixtral script does it (``msmoe-merging-mixtral.py`` → ``grouping_mixtral.py``,
    ``_assign_num_groups_per_layer``): each layer's usage is normalised to sum to 1 and its most-used
    expert set to 1 (every layer keeps at least one group); all layers' values are sorted together,
    descending, and the value at position ``total`` (0-based; ``total − 1`` when every expert is
    kept) is the threshold; a layer gets as many groups as it has experts used strictly more than
    the threshold. Ties at the threshold all fall below it, so the sum can be less than ``total``.

    Refused in one line: a threshold of 1 (fewer groups asked than layers: every layer keeps at
    least its most-used expert's group), or a layer left with fewer groups than its router's top-k
    (a plan cannot route to fewer experts than k). A target that cannot give every layer its top-k
    whatever the usage (a budget below Σ top-k, a keep below top-k) never gets here: the strategy's
    target check refuses it from the config, before any weights load; what is left here depends on
    the measured usage, so it is known only after the routing pass (and still before any merge)."""
    layers = sorted(usage_counts)
    freq = {}
    for l in layers:
        u = usage_counts[l].double()
        u = u / u.sum() if float(u.sum()) > 0 else torch.zeros_like(u)
        u[int(torch.argmax(u))] = 1.0
        freq[l] = u
    flat = torch.sort(torch.cat([freq[l] for l in layers]), descending=True).values
    at = total - 1 if total == flat.numel() else total
    threshold = float(flat[at])
    if threshold == 1.0:
        raise MoescopeError(f"usage-threshold allocation: {total} groups cannot give each of the {len(layers)} MoE "
                            "layers one (every layer keeps its most-used expert's group); ask for more")
    counts = {l: int((freq[l] > threshold).sum()) for l in layers}
    for l in layers:
        k = model.layers[l].top_k
        if counts[l] < k:
            raise MoescopeError(f"usage-threshold allocation leaves layer {l} {counts[l]} group(s), fewer than its "
                                f"top-k ({k}), on this calibration data's usage; ask for more groups (a larger keep "
                                "or budget)")
    return counts
