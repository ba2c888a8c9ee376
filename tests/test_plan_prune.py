"""The PruningPlan contract and applying it."""

from __future__ import annotations

import json

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply

DESIGN_EXAMPLE = {
    "version": 1,
    "base_model": "demo",
    "layers": {
        "0": {"groups": [[0], [1], [2, 5], [3], [4, 6]],
              "coefficients": [[1.0], [1.0], [0.5, 0.5], [1.0], [0.7, 0.3]], "merge_router": True},
        "1": {"groups": [[0], [2], [4], [6]]},
    },
    "skip_beta": {"0": 0.42},
    "provenance": {"strategy": "enumerate", "params": {"keep": 4}, "data": "abc"},
}


def test_design_example_round_trips(tmp_path):
    plan = PruningPlan.from_json(DESIGN_EXAMPLE)
    assert plan.layers[1].groups == [[0], [2], [4], [6]] and plan.layers[1].is_pure_keep()
    assert plan.layers[0].coefficients[4] == [0.7, 0.3] and plan.skip_beta == {0: 0.42}
    path = plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(path)
    assert again.to_json() == plan.to_json()
    assert json.loads(path.read_text())["layers"]["0"]["groups"][2] == [2, 5]


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["layers"].update({"x": {"groups": [[0]]}}), "not a decoder-layer index"),
    (lambda d: d["layers"]["1"].update(groups=[[0], []]), "non-empty"),
    (lambda d: d["layers"]["1"].update(groups=[[0], ["a"]]), "expert indices"),
    (lambda d: d["layers"]["0"].update(coefficients=[[1.0]]), "same shape"),
    (lambda d: d["layers"]["0"].update(merge_router="yes"), "true or false"),
    (lambda d: d["skip_beta"].update({"0": 1.5}), r"\[0, 1\]"),
])
def test_malformed_plans_are_refused_with_the_reason(mutate, match):
    data = json.loads(json.dumps(DESIGN_EXAMPLE))
    mutate(data)
    with pytest.raises(MoescopeError, match=match):
        PruningPlan.from_json(data)


def test_bad_plan_files(tmp_path):
    with pytest.raises(MoescopeError, match="not found"):
        PruningPlan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoescopeError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "bad.json")


def test_apply_matches_direct_edits_and_refuses_atomically():
    model = wrap_model(tiny_model("mixtral"), source="demo")
    twin = wrap_model(tiny_model("mixtral"), source="demo")
    apply(model, PruningPlan.from_json(DESIGN_EXAMPLE))
    twin.merge(0, [[0], [1], [2, 5], [3], [4, 6]], [[1.0], [1.0], [0.5, 0.5], [1.0], [0.7, 0.3]])
    twin.keep(1, [0, 2, 4, 6])
    from moescope.analysis.model import skipping

    skipping.install(twin, {0: 0.42})  # the plan's skip_beta
    ids = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.hf(input_ids=ids).logits, twin.hf(input_ids=ids).logits)
    assert model.num_experts() == {0: 5, 1: 4} and model.skip_beta == {0: 0.42}

    fresh = wrap_model(tiny_model("mixtral"))
    before = fresh.layers[0].experts.gate_up_proj.clone()
    bad = PruningPlan.from_json({"base_model": "x", "layers": {"0": {"groups": [[0], [1], [2]]},
                                                               "1": {"groups": [[0]]}}})
    with pytest.raises(MoescopeError, match="top-2"):
        apply(fresh, bad)
    assert torch.equal(fresh.layers[0].experts.gate_up_proj, before)  # layer 0 untouched
    with pytest.raises(MoescopeError, match="not an MoE layer"):
        apply(fresh, PruningPlan.from_json({"base_model": "x", "layers": {"7": {"groups": [[0], [1]]}}}))


def test_from_drop_keeps_the_rest():
    model = wrap_model(tiny_model("mixtral"))
    plan = PruningPlan.from_drop(model, {0: [1, 6]}, provenance={"strategy": "manual"})
    assert plan.layers[0].kept() == [0, 2, 3, 4, 5, 7] and 1 not in plan.layers
    assert plan.experts_after(model) == {0: 6, 1: 8}
    with pytest.raises(MoescopeError, match="not in 0..7"):
        PruningPlan.from_drop(model, {0: [9]})


def test_lottery_rounds_prune_and_finetune(tmp_path):
    """The lottery strategy leaves the model it is given alone; its plan names the finetuned weights,
    which apply() puts into a fresh model of the same structure."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import TokenBatch
    from moescope.analysis.measure.analyze import AnalysisParams
    from moescope.analysis.strategies import StrategyContext, make_plan

    model = wrap_model(tiny_model("mixtral"), source="tiny")
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = TokenBatch(input_ids=ids, domains=("s",) * 4, source="s", fingerprint="s")
    original = model.layers[0].experts.gate_up_proj.detach().clone()
    before = model.fingerprint()
    cache = Cache(tmp_path / "cache")
    ctx = StrategyContext(model, batch, cache, AnalysisParams(metrics=("routing",)))
    plan = make_plan("lottery", ctx, {"keep": 6, "criterion": "EUF", "start_tokens": 128, "lr": 1e-3,
                                        "batch": 4})
    assert model.fingerprint() == before and model.num_experts() == {0: 8, 1: 8}  # the caller's model is untouched
    assert plan.provenance["finetuned"] and plan.provenance["strategy"] == "lottery:min-EUF"
    assert [r["tokens"] for r in plan.provenance["rounds"]] == [128, 256]  # the budget doubles every round
    pruned = apply(wrap_model(tiny_model("mixtral"), source="tiny"), plan, cache)
    assert pruned.num_experts() == {0: 6, 1: 6}
    kept = plan.layers[0].kept()
    # the surviving experts were finetuned, not just sliced
    assert not torch.equal(pruned.layers[0].experts.gate_up_proj.detach(), original[kept])
    # the weights are the plan's: without them the plan is refused before any edit
    fresh = wrap_model(tiny_model("mixtral"), source="tiny")
    with pytest.raises(MoescopeError, match="finetuned weights"):
        apply(fresh, plan, Cache(tmp_path / "other"))
    assert fresh.num_experts() == {0: 8, 1: 8}
    # the same request is served from the cache: the same plan
    assert make_plan("lottery", ctx, {"keep": 6, "criterion": "EUF", "start_tokens": 128,
                                      "lr": 1e-3, "batch": 4}).to_json()["layers"] == plan.to_json()["layers"]
