"""Drop grid and enumeration equal their naive definitions."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.measure.sensitivity import (
    SubsetScorer,
    drop_grid,
    enumerate_layer,
    naive_subset_loss,
    perplexity,
)
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model

IDS = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def naive_ppl(hf, ids) -> float:
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
    return math.exp(-lp.mean().item())


def layer_input(model, layer, ids=IDS):
    for l, x in LayerStream(model, ids).layers():
        if l == layer:
            return x
    raise AssertionError


@pytest.mark.slow  # every cell: 8 naive whole-model runs per MoE layer
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_drop_grid_equals_separately_pruned_models(family):
    model = wrap_model(tiny_model(family))
    grid = drop_grid(model, IDS)
    assert grid.baseline == pytest.approx(naive_ppl(model.hf, IDS), rel=1e-5)
    assert grid.layers == model.moe_layers and all(len(r) == 8 for r in grid.ppl)
    for row, l in enumerate(model.moe_layers):
        for e in range(8):  # every cell
            rest = [k for k in range(8) if k != e]
            copy_ = wrap_model(copy.deepcopy(model.hf))
            if family == "deepseek_v3":  # 7 experts cannot fill 2 equal routing groups: masked router
                with copy_.restricted(l, rest):
                    want = naive_ppl(copy_.hf, IDS)
            else:
                copy_.keep(l, rest)
                want = naive_ppl(copy_.hf, IDS)
            assert grid.ppl[row][e] == pytest.approx(want, rel=1e-4)
    assert model.num_experts() == {l: 8 for l in model.moe_layers}  # the model is restored


def test_drop_grid_cells_whose_first_affected_token_is_mid_sequence_equal_the_pruned_model():
    """The fast loop's check of the grid's token boundary (the slow test above checks every cell of
    four families): in layer 0 of a tiny Mixtral (attention follows), cells where some sequence's
    first re-routed token lies after its start, so the tokens before it keep their baseline loss
    and the ones from it on are recomputed; each cell equals the separately pruned model."""
    from moescope.analysis.measure.sensitivity import _routing_changed

    model = wrap_model(tiny_model("mixtral"))
    grid = drop_grid(model, IDS)
    view = model.layers[0]
    flat = layer_input(model, 0).reshape(-1, view.hidden_size if hasattr(view, "hidden_size") else
                                        model.hf.config.hidden_size)
    full = view.route(flat)
    checked = 0
    for e in range(8):
        allowed = torch.ones(8, dtype=torch.bool)
        allowed[e] = False
        hit = _routing_changed(full, view.route(flat, allowed=allowed)).reshape(IDS.shape)
        firsts = [int(h.nonzero()[0]) for h in hit if h.any()]
        if not any(f > 0 for f in firsts):
            continue
        pruned = wrap_model(copy.deepcopy(model.hf))
        pruned.keep(0, [k for k in range(8) if k != e])
        assert grid.ppl[0][e] == pytest.approx(naive_ppl(pruned.hf, IDS), rel=1e-5), f"expert {e}"
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "this input no longer re-routes a token after a sequence's start: pick another"


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss", "phimoe"])
def test_subset_scores_equal_running_the_pruned_block(family):
    model = wrap_model(tiny_model(family))
    l = model.moe_layers[-1]
    x = layer_input(model, l)
    subsets = list(itertools.combinations(range(8), 4))
    fast = SubsetScorer(model.layers[l], x, chunk_tokens=37).losses(subsets)  # odd chunks accumulate
    for s in (0, 17, 42, 69):
        assert fast[s].item() == pytest.approx(naive_subset_loss(model, l, x, list(subsets[s])), rel=1e-4)
    best = enumerate_layer(model.layers[l], x, keep=4)
    naive = min(subsets, key=lambda C: naive_subset_loss(model, l, x, list(C)))
    assert best.keep == list(naive) and best.method == "exact" and len(best.candidates) == 70


def test_greedy_and_beam_search_use_the_same_loss():
    model = wrap_model(tiny_model("mixtral"))
    x = layer_input(model, 0)
    exact = enumerate_layer(model.layers[0], x, keep=5, method="exact")
    for method in ("greedy", "beam"):
        r = enumerate_layer(model.layers[0], x, keep=5, method=method)
        assert r.loss >= exact.loss - 1e-9
        assert r.loss == pytest.approx(naive_subset_loss(model, 0, x, r.keep), rel=1e-4)
    with pytest.raises(MoescopeError, match="between top-k"):
        enumerate_layer(model.layers[0], x, keep=1)


def test_deepseek_enumeration_keeps_routing_groups_balanced():
    model = wrap_model(tiny_model("deepseek_v3"))
    l = model.moe_layers[0]
    r = enumerate_layer(model.layers[l], layer_input(model, l), keep=4)
    assert sum(e < 4 for e in r.keep) == 2 and len(r.candidates) == 36  # C(4,2)²


def test_perplexity_matches_the_full_model():
    model = wrap_model(tiny_model("qwen3_moe"))
    assert perplexity(model, IDS, chunk_size=3) == pytest.approx(naive_ppl(model.hf, IDS), rel=1e-5)
