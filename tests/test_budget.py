"""Global budgets (issue 14): where each strategy places N kept experts, checked by value.

Each case is built so that one layer's experts matter more than the other's, and the expected
allocation is computed here independently: the drop grid by running the whole model with each
expert removed, enumeration by pruning a copy of every block for every subset (brute force over
the count splits), merging from the expert weights' cosine, even-out from scores given by hand.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.measure.sensitivity import allocate_greedy, naive_subset_loss
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan
from moescope.analysis.strategies import StrategyContext, make_plan
from moescope.analysis.strategies.merge import distinctness
from moescope.analysis.strategies.selection import even_out

IDS = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def ctx_for(model, tmp_path, ids=IDS):
    batch = TokenBatch(input_ids=ids, domains=("s",) * ids.shape[0], source="s",
                       fingerprint=f"budget-{hash(tuple(ids.flatten().tolist()))}")
    return StrategyContext(model, batch, Cache(tmp_path / "cache"))


def experts(hf, layer):
    return hf.model.layers[layer].mlp.experts


def counts_of(plan) -> dict[int, int]:
    return {l: lp.num_out for l, lp in sorted(plan.layers.items())}


# ---------------------------------------------------------------- greedy allocation by hand


def test_greedy_allocation_removes_where_the_cost_rises_least():
    costs = {0: {2: 5.0, 3: 1.0, 4: 0.0}, 1: {2: 0.5, 3: 0.2, 4: 0.0}}
    floor = {0: 2, 1: 2}
    # from (4, 4): layer 1 costs +0.2 < +1 → (4, 3); then +0.3 < +1 → (4, 2); then only layer 0 → (3, 2)
    assert allocate_greedy(costs, 7, floor) == {0: 4, 1: 3}
    assert allocate_greedy(costs, 6, floor) == {0: 4, 1: 2}
    assert allocate_greedy(costs, 5, floor) == {0: 3, 1: 2}
    with pytest.raises(MoescopeError, match="between 4 and 8"):
        allocate_greedy(costs, 3, floor)


# ---------------------------------------------------------------- drop grid


@pytest.mark.slow  # ~8 s alone, ~20 s on this loaded machine
def test_drop_grid_budget_keeps_the_experts_whose_removal_hurts_most(tmp_path):
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.model import load_moe

    model = load_moe("demo")  # trained: removing an expert hurts
    hf = model.hf
    with torch.no_grad():  # except in layer 3, whose experts now barely contribute
        experts(hf, 3).down_proj.mul_(0.01)
    ids = sample_tokens("demo:all", model.tokenizer, 4, 32, seed=0, split="validation").input_ids
    # the naive grid: the whole model run with each expert removed, perplexity of every prediction
    naive = {}
    with torch.no_grad():
        for l in range(4):
            for e in range(8):
                with model.temporary_edit(l):
                    model.keep(l, [k for k in range(8) if k != e])
                    naive[l, e] = math.exp(float(hf(input_ids=ids, labels=ids).loss))
    budget = 20
    plan = make_plan("drop-grid", ctx_for(model, tmp_path, ids), {"budget": budget, "grid_samples": 4})
    # expected: top-2 of each layer by perplexity, then the highest of the rest across layers
    ranked = {l: sorted(range(8), key=lambda e: -naive[l, e]) for l in range(4)}
    keep = {l: set(ranked[l][:2]) for l in range(4)}
    pool = sorted(((naive[l, e], l, e) for l in range(4) for e in ranked[l][2:]), reverse=True)
    for _, l, e in pool[: budget - 8]:
        keep[l].add(e)
    assert {l: sorted(k) for l, k in keep.items()} == {l: plan.layers[l].kept() for l in range(4)}
    counts = counts_of(plan)
    assert sum(counts.values()) == budget
    assert counts[3] < min(counts[l] for l in range(3))  # the layer that matters least keeps least
    same = make_plan("drop-grid", ctx_for(model, tmp_path, ids), {"keep": 5, "grid_samples": 4})
    assert counts_of(same) == {l: 5 for l in range(4)}
    assert same.layers[0].kept() == sorted(ranked[0][:5])


# ---------------------------------------------------------------- enumeration


def test_enumeration_budget_is_allocated_on_the_reconstruction_losses(tmp_path):
    hf = tiny_model("mixtral", seed=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # layer 1: near copies of expert 0, so keeping few of them loses little
        for name in ("gate_up_proj", "down_proj"):
            P = getattr(experts(hf, 1), name)
            P.copy_(P[0:1].expand_as(P) + 0.05 * P.abs().mean() * torch.randn(tuple(P.shape), generator=g))
    model = wrap_model(hf, source="enum-case")
    budget = 10
    plan = make_plan("enumerate", ctx_for(model, tmp_path), {"budget": budget, "method": "exact"})
    # naive: every subset of every size pruned on a copy of the block, loss relative to ‖F(x)‖
    xs = {l: x for l, x in LayerStream(model, IDS).layers() if x is not None}
    best = {}
    for l, x in xs.items():
        with torch.no_grad():
            y = model.layers[l].block(x[None])
            norm = float((y[0] if isinstance(y, tuple) else y).double().norm())
        best[l] = {8: (0.0, list(range(8)))}
        for k in range(2, 8):
            best[l][k] = min((naive_subset_loss(model, l, x, list(C)) / norm, list(C))
                             for C in itertools.combinations(range(8), k))
    # the best split of the budget by total relative loss (brute force over the splits)
    split = min(((c, budget - c) for c in range(2, 9) if 2 <= budget - c <= 8),
                key=lambda c: best[0][c[0]][0] + best[1][c[1]][0])
    assert counts_of(plan) == {0: split[0], 1: split[1]}
    assert split[0] > split[1]  # the layer of distinct experts keeps more
    for l, c in zip((0, 1), split):
        assert plan.layers[l].kept() == best[l][c][1]
    assert plan.provenance["counts"] == {"0": split[0], "1": split[1]}
    # progressive mode uses the same allocation
    prog = make_plan("enumerate", ctx_for(model, tmp_path), {"budget": budget, "mode": "progressive"})
    assert counts_of(prog) == counts_of(plan)


# ---------------------------------------------------------------- merging


def test_distinctness_by_hand():
    A = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.4], [0.2, 0.4, 1.0]])
    assert distinctness(A).tolist() == pytest.approx([0.1, 0.1, 0.6])


def test_merge_budget_gives_a_layer_of_copies_fewer_output_experts(tmp_path):
    hf = tiny_model("mixtral", seed=3)
    with torch.no_grad():  # layer 1: experts 0..5 are exact copies; 6 and 7 are their own
        for name in ("gate_up_proj", "down_proj"):
            P = getattr(experts(hf, 1), name)
            P[1:6] = P[0]
    model = wrap_model(hf, source="merge-case")

    def weight_vectors(l):
        ex = experts(hf, l)
        return torch.cat([ex.gate_up_proj.flatten(1), ex.down_proj.flatten(1)], 1).double()

    # distinctness from the weights' cosine: copies have a twin at cosine 1 (distinctness 0)
    for l in (0, 1):
        W = torch.nn.functional.normalize(weight_vectors(l), dim=1)
        C = (W @ W.T).fill_diagonal_(-2)
        d = 1 - (1 + C.max(1).values) / 2
        if l == 1:
            assert d[:6].abs().max() < 1e-6 and d[6:].min() > 0.2
        else:
            assert d.min() > 0.2
    plan = make_plan("merge", ctx_for(model, tmp_path),
                     {"budget": 12, "representation": "weights", "similarity": "cosine", "grouping": "greedy"})
    # pool beyond each layer's top-2: layer 0's six distinct experts outrank layer 1's six copies
    assert counts_of(plan) == {0: 8, 1: 4}
    merged = [g for g in plan.layers[1].groups if len(g) > 1]
    assert all(set(g) <= set(range(6)) for g in merged)  # only copies are merged together


# ---------------------------------------------------------------- even out


def test_even_out_drops_least_and_adds_back_most_by_the_scores():
    model = wrap_model(tiny_model("mixtral", seed=0), source="even")
    plan = PruningPlan("even", {0: LayerPlan([[e] for e in range(6)]),  # 6 kept (6, 7 dropped)
                                1: LayerPlan([[0, 1], [2], [3], [4], [5], [6], [7]], [[0.5, 0.5]] + [[1.0]] * 6)})
    scores = {0: torch.tensor([8.0, 7, 6, 5, 4, 3, 1, 2]), 1: torch.tensor([0.0, 0, 5, 1, 7, 6, 3, 4])}
    out = even_out(plan, model, scores, by="hand")  # counts 6 and 7: mean 6.5 → 7 per layer
    assert out.experts_after(model) == {0: 7, 1: 7}
    assert out.layers[0].kept() == [0, 1, 2, 3, 4, 5, 7]  # 7 (score 2) comes back before 6 (score 1)
    assert out.layers[1].groups == plan.layers[1].groups and out.provenance["evened_out"]["count"] == 7
    fewer = even_out(plan, model, scores, count=5)
    assert fewer.layers[0].groups == [[0], [1], [2], [3], [4]]  # 5 (score 3) is the least needed left
    # layer 1 keeps its merged group and drops the two lowest singles: 3 (score 1) and 6 (score 3)
    assert fewer.layers[1].groups == [[0, 1], [2], [4], [5], [7]]
    assert fewer.layers[1].coefficients[0] == [0.5, 0.5]
    assert plan.experts_after(model) == {0: 6, 1: 7}  # the input plan is left as it was
    with pytest.raises(MoescopeError, match="needs between top-k"):
        even_out(plan, model, scores, count=1)
