"""Every strategy produces a valid plan that does what its method says."""

from __future__ import annotations

import pytest
import torch
from conftest import CORE_FAMILIES as FAMILIES
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.prune import apply
from moescope.analysis.strategies import STRATEGIES, StrategyContext, make_plan

FAST = AnalysisParams(similarity_tokens=128, rbf_batch_tokens=48, rbf_batches=1, chunk_size=4)
IDS = torch.randint(3, 256, (6, 32), generator=torch.Generator().manual_seed(0))
BATCH = TokenBatch(input_ids=IDS, domains=("s",) * 6, source="synthetic", fingerprint="synthetic-0")

ALL = [
    ("random", {"keep": 4, "seed": 1}),
    ("frequency", {"keep": 4}),
    ("criterion", {"keep": 4, "criterion": "EAN", "order": "min"}),
    ("criterion", {"keep": 4, "criterion": "REAP", "order": "min", "mode": "iterative"}),
    ("criterion", {"keep": 4, "criterion": "EGN", "order": "max"}),
    ("enumerate", {"keep": 4}),
    ("enumerate", {"keep": 4, "mode": "progressive"}),
    ("merge", {"keep": 4}),
    ("merge", {"keep": 4, "similarity": "cka_rbf", "grouping": "greedy", "merge": "usage", "merge_router": False}),
    ("merge", {"keep": 4, "representation": "surrogate", "similarity": "mse", "grouping": "agglomerative", "merge": "max"}),
    ("merge", {"keep": 4, "merge": "learned", "epochs": 1}),
    ("router-guided", {"keep": 4}),
    ("merge", {"keep": 4, "representation": "mean_output", "similarity": "euclidean", "grouping": "agglomerative",
               "merge": "frequency"}),
    ("merge", {"keep": 4, "augment": "embeddings", "augment_ratio": 0.5, "grouping": "spectral_discretize"}),
]


def ctx_for(family, tmp_path, seed=0):
    model = wrap_model(tiny_model(family, seed=seed), source=f"tiny-{family}")
    return StrategyContext(model, BATCH, Cache(tmp_path / "cache"), FAST)


@pytest.mark.parametrize("name, params", ALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALL)])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_strategy_gives_a_plan_that_applies(family, name, params, tmp_path):
    ctx = ctx_for(family, tmp_path)
    before = ctx.model.fingerprint()
    plan = make_plan(name, ctx, params)
    assert ctx.model.fingerprint() == before  # strategies never leave the model edited
    assert plan.provenance["strategy"].split(":")[0] == name and plan.provenance["data"] == "synthetic-0"
    assert plan.experts_after(ctx.model) == {l: 4 for l in ctx.model.moe_layers}
    pruned = apply(wrap_model(tiny_model(family)), plan)
    assert pruned.num_experts() == {l: 4 for l in pruned.moe_layers}


def test_frequency_keeps_the_most_used_and_min_euf_agrees(tmp_path):
    ctx = ctx_for("mixtral", tmp_path)
    res = ctx.analysis(metrics=("routing",))
    plan = make_plan("frequency", ctx, {"keep": 5})
    for l in res.layers:
        usage = res.routing(l, "usage")
        kept = plan.layers[l].kept()
        assert min(usage[kept]) >= max(usage[[e for e in range(8) if e not in kept]])
    min_euf = make_plan("criterion", ctx, {"keep": 5, "criterion": "EUF", "order": "min"})
    assert {l: lp.kept() for l, lp in min_euf.layers.items()} == {l: lp.kept() for l, lp in plan.layers.items()}
    max_euf = make_plan("criterion", ctx, {"keep": 5, "criterion": "EUF", "order": "max"})
    assert max_euf.layers[0].kept() != plan.layers[0].kept()


def test_iterative_with_one_round_equals_one_shot_and_budget_is_respected(tmp_path):
    ctx = ctx_for("mixtral", tmp_path)
    p = {"keep": 7, "criterion": "EAN", "order": "min"}
    one = make_plan("criterion", ctx, p)
    it = make_plan("criterion", ctx, {**p, "mode": "iterative"})
    assert {l: lp.kept() for l, lp in one.layers.items()} == {l: lp.kept() for l, lp in it.layers.items()}
    plan = make_plan("frequency", ctx, {"budget": 11})
    assert sum(plan.experts_after(ctx.model).values()) == 11
    assert all(n >= 2 for n in plan.experts_after(ctx.model).values())
    a, b = make_plan("random", ctx, {"keep": 4, "seed": 3}), make_plan("random", ctx, {"keep": 4, "seed": 3})
    assert a.to_json()["layers"] == b.to_json()["layers"]


def test_merge_groups_duplicated_experts_together(tmp_path):
    ctx = ctx_for("mixtral", tmp_path)
    layer = ctx.model.layers[1]
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(layer.experts, name)[5].copy_(getattr(layer.experts, name)[2])
    for grouping in ("spectral", "greedy", "agglomerative"):
        plan = make_plan("merge", ctx, {"keep": 7, "grouping": grouping})
        assert [2, 5] in plan.layers[1].groups, grouping


def test_learned_coefficients_beat_uniform_on_held_out_tokens(tmp_path):
    ctx = ctx_for("mixtral", tmp_path)
    plan = make_plan("merge", ctx, {"keep": 4, "merge": "learned", "epochs": 3, "lr": 0.01})
    for info in plan.provenance["learned"].values():
        assert info["kept"] and info["held_loss_end"] < info["held_loss_start"]


@pytest.mark.parametrize("name, params, match", [
    ("nope", {"keep": 4}, "unknown strategy"),
    ("frequency", {}, "exactly one target"),
    ("frequency", {"keep": 1}, "between top-k"),
    ("frequency", {"budget": 3}, "between 4"),
    ("criterion", {"keep": 4, "criterion": "XYZ"}, "unknown criterion"),
    ("criterion", {"keep": 4, "criterion": "EAN", "order": "up"}, "min or max"),
    ("merge", {"keep": 4, "representation": "weights", "similarity": "cka_rbf"}, "not available"),
    ("merge", {"keep": 4, "grouping": "kmeans"}, "unknown grouping"),
    ("lottery", {"budget": 10}, "uniform target"),
    ("enumerate", {"budget": 3}, "between 4"),
])
def test_bad_strategy_parameters_are_refused(name, params, match, tmp_path):
    with pytest.raises(MoescopeError, match=match):
        make_plan(name, ctx_for("mixtral", tmp_path), params)


def test_registry_lists_every_strategy():
    assert set(STRATEGIES) == {"random", "frequency", "criterion", "drop-grid", "enumerate", "merge", "router-guided", "manual",
                               "skip", "lottery"}


@pytest.mark.parametrize("name, params", ALL + [("skip", {}), ("manual", {"drop": {"0": [1, 4]}})],
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALL + [("skip", {}), ("manual", {})])])
def test_every_strategy_on_the_demo_model(name, params, demo_dir, tmp_path):
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.model import load_moe

    model = load_moe("demo")
    calib = sample_tokens("demo:all", model.tokenizer, 6, 64, seed=0)
    ctx = StrategyContext(model, calib, Cache(tmp_path / "cache"), FAST)
    plan = make_plan(name, ctx, params)
    pruned = apply(load_moe("demo"), plan)
    if name == "skip":
        assert set(plan.skip_beta) == {0, 1, 2, 3} and all(0 < b <= 1 for b in plan.skip_beta.values())
    elif name == "manual":
        assert pruned.num_experts() == {0: 6, 1: 8, 2: 8, 3: 8}
    else:
        assert pruned.num_experts() == {l: 4 for l in range(4)}
