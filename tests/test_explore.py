"""Routing trace, token examples, skip ratios, criterion–grid correlation, and plan edits by hand."""

from __future__ import annotations

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import sample_tokens
from moescope.analysis.measure.analyze import AnalysisParams, lookup_analysis, run_analysis
from moescope.analysis.measure.explore import (
    criterion_grid_correlation,
    drop_ranks,
    lookup_routing_trace,
    routing_trace,
    skip_ratios,
    spearman,
    token_examples,
    top_pairs,
    top_tokens,
)
from moescope.analysis.measure.sensitivity import DropGrid, cached_drop_grid, lookup_drop_grid
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan, edit_layer
from moescope.analysis.strategies import StrategyContext, make_plan
from scipy.stats import spearmanr


@pytest.fixture(scope="module")
def demo():
    model = load_moe("demo")
    batch = sample_tokens("demo:all", model.tokenizer, 4, 48, seed=0)
    return model, batch


def test_trace_is_cached_and_matches_the_router(demo, tmp_path):
    model, batch = demo
    cache = Cache(tmp_path)
    assert lookup_routing_trace(model, batch, cache) is None  # looking never computes
    calls = []
    trace = routing_trace(model, batch, cache, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("trace", 4, 4) and trace.layers == model.moe_layers
    again = lookup_routing_trace(model, batch, cache)
    assert again is not None and again.entry.path == trace.entry.path
    assert torch.equal(trace.input_ids, batch.input_ids)
    # the analysis routes the same layer inputs: its usage must be the trace's
    res = run_analysis(model, batch, AnalysisParams(metrics=("routing",)), cache=cache)
    for l in trace.layers:
        idx = trace.topk_idx(l)
        assert idx.shape == (batch.n_tokens, 2)
        usage = torch.bincount(idx.reshape(-1).long(), minlength=8).float() / batch.n_tokens
        assert torch.allclose(usage, res.routing(l, "usage"))
        w = trace.topk_weights(l)
        assert torch.allclose(w.sum(-1), torch.ones(batch.n_tokens), atol=1e-5)  # Mixtral renormalises
    with pytest.raises(MoescopeError, match="not an MoE layer"):
        trace.topk_idx(9)


def test_token_examples_are_routed_to_the_expert_heaviest_first(demo, tmp_path):
    model, batch = demo
    trace = routing_trace(model, batch, Cache(tmp_path))
    tok = model.tokenizer
    idx, w, flat = trace.topk_idx(1), trace.topk_weights(1), batch.input_ids.reshape(-1)
    rows = token_examples(trace, tok, 1, 3, n=6, context=4)
    assert 0 < len(rows) <= 6
    weights = [r["weight"] for r in rows]
    assert weights == sorted(weights, reverse=True)
    for r in rows:
        t = r["sequence"] * batch.seq_len + r["position"]
        assert 3 in idx[t].tolist()  # really routed there
        slot = idx[t].tolist().index(3)
        assert r["weight"] == pytest.approx(float(w[t, slot]))
        assert r["choice"] == (1 if w[t, slot] == w[t].max() else 2)
        assert r["token"] == tok.decode([int(flat[t])])
        assert r["before"] == tok.decode(batch.input_ids[r["sequence"], max(0, r["position"] - 4) : r["position"]].tolist())
    # no token id more than twice
    ids = [int(flat[r["sequence"] * batch.seq_len + r["position"]]) for r in rows]
    assert max(ids.count(i) for i in ids) <= 2
    top = top_tokens(trace, tok, 1, 3, n=5)
    routed = flat[(idx == 3).any(-1)]
    best = int(torch.bincount(routed).argmax())
    assert top[0]["count"] == int((routed == best).sum())
    assert top[0]["share"] == pytest.approx(top[0]["count"] / int((flat == best).sum()))
    with pytest.raises(MoescopeError, match="not in 0..7"):
        token_examples(trace, tok, 1, 8)


class _FakeTrace:
    def __init__(self, weights):
        self.w = weights

    def topk_weights(self, layer):
        return self.w[layer]


def test_skip_ratios_by_hand():
    w2 = torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.2, 0.8], [0.9, 0.1]])  # w2/w1 = 3/7, 9/11, 1/4, 1/9
    w3 = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    r = skip_ratios(_FakeTrace({0: w2, 3: w3}), {0: 0.5, 3: 0.2})
    assert r[0] == {"beta": 0.5, "tokens": 0.75, "calls": 3 / 8}
    assert r[3]["tokens"] == 0.5 and r[3]["calls"] == pytest.approx(1 / 6)  # row 0 skips its 0.1
    assert skip_ratios(_FakeTrace({0: w2}), {0: 0.0})[0]["tokens"] == 0.0


def test_spearman_matches_scipy_and_ignores_missing_values():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, generator=g), torch.randn(20, generator=g)
    b[3] = b[7]  # a tie
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    a[0] = float("nan")
    assert spearman(a, b) == pytest.approx(spearmanr(a[1:].numpy(), b[1:].numpy()).statistic)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # NaN: too few points
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN: constant


def test_criterion_grid_correlation_and_drop_ranks(tmp_path):
    model = wrap_model(tiny_model("mixtral"))
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))

    class Batch:  # the smallest TokenBatch stand-in run_analysis needs
        input_ids, fingerprint, source, n_samples, seq_len = ids, "f" * 64, "test", 4, 24

        def describe(self):
            return "test batch"

        def domain_counts(self):
            return {"test": 4}

    res = run_analysis(model, Batch(), AnalysisParams(metrics=("routing", "weights")), cache=Cache(tmp_path))
    layers = res.layers
    # a grid whose Δ is the criterion itself correlates perfectly, its negation negatively
    ewn = {l: res.criterion(l, "EWN").tolist() for l in layers}
    grid = DropGrid(baseline=10.0, layers=layers, ppl=[[10.0 + v for v in ewn[l]] for l in layers])
    assert all(r == pytest.approx(1.0) for r in criterion_grid_correlation(res, grid, "EWN").values())
    flipped = DropGrid(baseline=10.0, layers=layers, ppl=[[10.0 - v for v in ewn[l]] for l in layers])
    assert all(r == pytest.approx(-1.0) for r in criterion_grid_correlation(res, flipped, "EWN").values())
    with pytest.raises(MoescopeError, match="share no MoE layer"):
        criterion_grid_correlation(res, DropGrid(10.0, [99], [[1.0] * 8]), "EWN")
    # drop order: rank 0 is what the criterion strategy drops first
    ranks = drop_ranks(res, "EWN", "min")
    plan = make_plan("criterion", StrategyContext(model, Batch(), Cache(tmp_path)),
                     {"criterion": "EWN", "order": "min", "keep": 7})
    for i, l in enumerate(layers):
        dropped = [e for e in range(8) if [e] not in plan.layers[l].groups]
        assert dropped == [int(torch.argmin(ranks[i]))]
        assert sorted(ranks[i].tolist()) == list(range(8))
    assert torch.equal(drop_ranks(res, "EWN", "max"), 7 - ranks)


def test_lookups_never_compute(demo, tmp_path):
    model = demo[0]
    batch = sample_tokens("demo:all", model.tokenizer, 2, 16, seed=0)
    cache = Cache(tmp_path)
    params = AnalysisParams(metrics=("routing",))
    assert lookup_analysis(model, batch, params, cache) is None
    res = run_analysis(model, batch, params, cache=cache)
    assert lookup_analysis(model, batch, params, cache).entry.path == res.entry.path
    assert lookup_drop_grid(model, batch, cache) is None
    grid = cached_drop_grid(model, batch, cache)
    assert lookup_drop_grid(model, batch, cache).ppl == grid.ppl


def test_top_pairs_reads_similarities_and_distances():
    S = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    assert [p["experts"] for p in top_pairs(S, 2)] == [(0, 2), (1, 2)]
    assert top_pairs(S, 1, higher_is_similar=False) == [{"experts": (0, 1), "value": pytest.approx(0.2)}]


# ---------------------------------------------------------------- plan edits by hand


def test_edit_layer_drops_merges_and_keeps_old_coefficients():
    plan = PruningPlan("demo", {1: LayerPlan([[0, 3], [1], [2], [4], [5], [6], [7]], [[0.7, 0.3]] + [[1.0]] * 6)},
                       provenance={"strategy": "merge:outputs"})
    out = edit_layer(plan, 0, 8, drop=[7], merge=[[2, 5], [5, 6]])  # overlapping pairs join
    assert out.layers[0].groups == [[0], [1], [2, 5, 6], [3], [4]]
    assert out.layers[0].coefficients is None  # uniform by default
    assert out.layers[1] is plan.layers[1] and plan.layers.get(0) is None  # the input is not changed
    assert out.provenance == {"strategy": "manual", "edited_from": "merge:outputs"}
    # editing layer 1: the untouched merged group keeps its learned coefficients
    out = edit_layer(out, 1, 8, drop=[7], merge=[[0, 3], [1, 2]])
    assert out.layers[1].groups == [[0, 3], [1, 2], [4], [5], [6]]
    assert out.layers[1].coefficients == [[0.7, 0.3], [0.5, 0.5], [1.0], [1.0], [1.0]]
    assert out.provenance["edited_from"] == "merge:outputs"
    # undoing every change removes the layer
    assert 0 not in edit_layer(out, 0, 8).layers
    with pytest.raises(MoescopeError, match="both dropped and merged"):
        edit_layer(out, 0, 8, drop=[2], merge=[[2, 3]])
    with pytest.raises(MoescopeError, match="not in 0..7"):
        edit_layer(out, 0, 8, drop=[8])


def test_a_hand_edit_below_top_k_is_refused_in_one_line():
    model = wrap_model(tiny_model("mixtral"))
    plan = edit_layer(PruningPlan("tiny", {}), 0, 8, drop=range(7))
    with pytest.raises(MoescopeError, match="leaves 1 expert.*top-2; keep at least 2"):
        plan.validate_for(model)
    with pytest.raises(MoescopeError, match="layer 0 keeps no experts"):
        PruningPlan.from_json(edit_layer(PruningPlan("tiny", {}), 0, 8, drop=range(8)).to_json())
