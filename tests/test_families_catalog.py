"""The family catalog, the routing rules and layouts by hand, and per-family enumeration and
skipping proofs (tiny models from ``conftest.fresh_tiny``)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, fresh_tiny
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure.sensitivity import SubsetScorer, enumerate_layer, naive_subset_loss
from moescope.analysis.model import family_catalog, load_moe, skipping, wrap_model
from moescope.analysis.model.layouts import LAYOUTS
from moescope.analysis.model.routing import (
    RouterParams,
    softmax_group_topk,
    softmax_topk,
    topk_sigmoid,
    topk_softmax,
)
from moescope.analysis.model.synthetic import tiny_config, tiny_model
from moescope.analysis.run.cli import main
from test_families import hf_route

REQUIRED = ["glm4_moe", "qwen3_next", "qwen3_5_moe", "llama4_text", "ernie4_5_moe", "minimax_m2", "deepseek_v2",
            "granitemoe", "hunyuan_v1_moe"]
README = Path(__file__).resolve().parent.parent / "README.md"
CONSTRAINTS = README.parent / "constraints.txt"


# ---------------------------------------------------------------- the catalog


def test_catalog_covers_every_moe_model_type_with_a_status_and_reason():
    entries = {e.model_type: e for e in family_catalog.catalog()}
    supported = {mt for mt, e in entries.items() if e.status == "supported"}
    assert len({e.family for e in entries.values() if e.status == "supported"}) >= 25
    assert set(REQUIRED) <= supported
    for fam in FAMILIES:  # every family with a tiny model is listed as supported
        assert entries[tiny_config(fam).model_type].status == "supported"
    for mt in family_catalog.transformers_moe_model_types():
        e = entries[mt]
        assert e.status in ("supported", "refused", "not yet")
        if e.status == "supported":
            assert e.routing and e.shared_experts and e.expert_layout
        else:
            assert e.reason and len(e.reason) > 20, mt
    # the scan of transformers' modelling code finds the families we support (it sees their MoE blocks)
    assert {"mixtral", "glm4_moe", "llama4_text", "jetmoe", "dbrx", "switch_transformers"} <= set(entries)
    assert entries["jetmoe"].status == "refused" and "attention" in entries["jetmoe"].reason
    assert "llama" not in entries and "bert" not in entries  # dense models are not listed


def test_cli_families_json_markdown_and_the_readme_table(capsys):
    assert main(["families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model_type"] for r in rows] == [e.model_type for e in family_catalog.catalog()]
    assert {r["status"] for r in rows} == {"supported", "refused", "not yet"}
    assert main(["families"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^deepseek_v4\s+refused\s+hash-routed", text, re.M)
    assert main(["families", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert f"from transformers {transformers.__version__})." in table.splitlines()[0]


def locked_version(package: str) -> str:
    """The version constraints.txt pins ``package`` to."""
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def test_the_readme_family_table_is_the_locked_transformers_table(capsys):
    """The README's table is generated from the transformers version constraints.txt locks (the one a
    fresh clone's install command puts in place), and under that version it is the output verbatim.
    Under another transformers (installed without the lock) the table may list other model types:
    that is not a fault of the checkout, so the verbatim comparison is skipped with the reason."""
    locked = locked_version("transformers")
    readme = README.read_text(encoding="utf-8")
    assert f"from transformers {locked})." in readme, (
        f"README family table was not generated from the locked transformers {locked}: run bash .ci/refresh-lock")
    if transformers.__version__ != locked:
        pytest.skip(f"transformers {transformers.__version__} is installed, the lock says {locked} "
                    "(pip install -c constraints.txt -e '.[dev]' installs it)")
    assert main(["families", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.strip() in readme, "README family table is stale: run bash .ci/refresh-lock"


def test_refused_and_not_yet_families_are_refused_at_load_with_their_reason(tmp_path):
    from transformers import DbrxConfig, JetMoeConfig

    for cfg, match in [(JetMoeConfig(), "refused: mixture of attention"), (DbrxConfig(), "not yet: experts stored")]:
        folder = tmp_path / cfg.model_type
        cfg.save_pretrained(folder)
        with pytest.raises(MoescopeError, match=match):
            load_moe(str(folder), weights=False)
    assert main(["info", str(tmp_path / "jetmoe")]) == 2


# ---------------------------------------------------------------- rules and layouts by hand


def test_routing_rules_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    # softmax_topk with a selection bias: expert 3 (p≈0.032) wins with bias +1, weights stay p
    params = RouterParams(top_k=2, renormalize=False, score_bias=torch.tensor([0.0, 0.0, 0.0, 1.0]))
    idx, w = softmax_topk(logits, params)
    assert sorted(idx[0].tolist()) == [0, 3]
    assert torch.allclose(w[0].sort().values, torch.stack([p[3], p[0]]))
    # DeepSeek-V2 group-limited greedy: groups {0,1} {2,3}; group max 0.64 vs 0.09 → only group 0
    params = RouterParams(top_k=2, renormalize=False, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    idx, w = softmax_group_topk(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), params)
    assert sorted(idx[0].tolist()) == [0, 1] and torch.allclose(w[0].sort(descending=True).values, 2 * p[:2])
    # allowed mask (expert 2 removed): the softmax runs over the kept experts only
    idx, w = softmax_group_topk(logits, params, torch.tensor([True, True, False, True]))
    q = torch.softmax(torch.tensor([2.0, 1.0, -1.0]), -1)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert torch.allclose(w[0].sort(descending=True).values, 2 * q[:2])
    # Llama 4: σ of the top-k logits, no renormalisation
    idx, w = topk_sigmoid(logits, RouterParams(top_k=2, renormalize=False))
    assert idx[0].tolist() == [0, 1] and torch.allclose(w[0], torch.sigmoid(torch.tensor([2.0, 1.0])))
    # Cohere 2 sigmoid variant, renormalised, and the average with shared experts (scale ½)
    params = RouterParams(top_k=2, renormalize=True, score_fn="sigmoid", routed_scaling_factor=0.5)
    idx, w = topk_softmax(logits, params)
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert torch.allclose(w[0], 0.5 * s / s.sum())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_run_an_expert_as_its_own_weight_matrices(layout):
    family = {"gate_up": "mixtral", "llama4": "llama4_text", "gpt_oss": "gpt_oss"}[layout]
    layer = next(iter(fresh_tiny(family).layers.values()))
    assert layer.spec.expert_layout == layout
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for e in (0, 5):
            w = layer.expert_weights(e)
            if layout == "gpt_oss":  # clamped SwiGLU with biases, transformers' own activation
                g, u = x @ w.gate.T + w.gate_bias, x @ w.up.T + w.up_bias
                g, u = g.clamp(max=layer.experts.limit), u.clamp(-layer.experts.limit, layer.experts.limit)
                h = g * torch.sigmoid(g * layer.experts.alpha) * (u + 1)
                want = h @ w.down.T + w.down_bias
            else:
                want = (torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T
            assert torch.allclose(layer.expert_forward(e, x), want, atol=1e-5)


# ---------------------------------------------------------------- per-family enumeration and skipping


def _subsets(model, layer, keep):
    E = layer.num_experts
    n_group = layer.router_params.n_group if model.family.group_limited else 1
    per = E // n_group
    return [C for C in itertools.combinations(range(E), keep)
            if len({sum(e // per == g for e in C) for g in range(n_group)}) == 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_enumeration_equals_brute_force(family):
    model = fresh_tiny(family)
    l = model.moe_layers[-1]
    layer = model.layers[l]
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    subsets = _subsets(model, layer, 6)
    fast = SubsetScorer(layer, x, chunk_tokens=17).losses(subsets)
    naive = torch.tensor([naive_subset_loss(model, l, x, list(C)) for C in subsets], dtype=torch.float64)
    assert torch.allclose(fast, naive, rtol=1e-4, atol=1e-5)
    best = enumerate_layer(layer, x, keep=6)
    assert best.keep == list(subsets[int(torch.argmin(naive))]) and len(best.candidates) == len(subsets)
    assert best.loss == pytest.approx(float(naive.min()), rel=1e-4)
    assert len(subsets) == (16 if len(subsets) < math.comb(8, 6) else 28)  # C(4,3)² with 2 routing groups


@pytest.mark.parametrize("family", FAMILIES)
def test_children_scored_incrementally_equal_scoring_each_child(family):
    """Greedy and beam score the children C − {j} of a subset by re-routing only the tokens that chose
    j (where the rule allows it): the losses equal scoring every child from scratch, chunked or not,
    and a removal the rule calls local leaves every token that did not choose the expert untouched."""
    from moescope.analysis.model.routing import ROUTING_RULES, unchosen_removal_is_local

    model = fresh_tiny(family)
    layer = model.layers[model.moe_layers[-1]]
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
    E = layer.num_experts
    parents = [tuple(range(E)), tuple(e for e in range(E) if e != 3)]
    for chunk in (17, 4096):
        scorer = SubsetScorer(layer, x, chunk_tokens=chunk)
        kids = scorer.losses_after_drop(parents)
        assert len(kids) == len({tuple(c for c in C if c != j) for C in parents for j in C})
        direct = scorer.losses(list(kids))
        assert torch.allclose(torch.tensor(list(kids.values()), dtype=torch.float64), direct, rtol=1e-5, atol=1e-6)
    rule, p = ROUTING_RULES[layer.spec.routing], layer.router_params
    if unchosen_removal_is_local(layer.spec.routing, p):
        logits = layer.router_logits(x)
        idx, w = rule(logits, p, None)
        for j in range(E):
            allowed = torch.ones(E, dtype=torch.bool)
            allowed[j] = False
            idx2, w2 = rule(logits, p, allowed.expand(x.shape[0], E))
            keep = ~(idx == j).any(1)  # tokens that did not choose j
            assert torch.equal(idx2[keep].sort(1).values, idx[keep].sort(1).values)
            assert torch.allclose(w2[keep].float().sort(1).values, w[keep].float().sort(1).values, rtol=1e-5)


@pytest.mark.parametrize("family,dtype", [(f, d) for f in FAMILIES for d in (torch.float32, torch.bfloat16)],
                         ids=[f"{f}-{d}" for f in FAMILIES for d in ("float32", "bfloat16")])
def test_skipping_equals_dropping_the_skipped_terms(family, dtype):
    model = fresh_tiny(family, dtype)
    layer = model.layers[model.moe_layers[0]]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        r = layer.route(x)
        # the transformers router's own decision, which the patch sees; scaled as our rule folds in
        # factors the block applies afterwards (Laguna's routed scale, Cohere 2's average with shared)
        _, hf_w, hf_idx = hf_route(layer, x)
        hf_w = hf_w.reshape(r.topk_weights.shape)
        scale = r.topk_weights.float().sum(-1, keepdim=True) / hf_w.float().sum(-1, keepdim=True)
        # β halfway between two middle ratios w₂/w₁ (half of the tokens skip their second expert)
        ratios = (hf_w.float().sort(-1, descending=True).values[:, 1] / hf_w.float().max(-1).values).sort().values
        beta = float(ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
        skip = skipping.skip_mask(hf_w, beta)  # as the patch decides, on the router's own weights
        r.topk_idx = hf_idx.reshape(r.topk_idx.shape)
        r.topk_weights = skipping.renormalized((hf_w.float() * scale).to(hf_w.dtype), skip)
        want = layer.combine(x, r)
        shared = layer.shared_forward(x)
        want = want if shared is None else want + shared
        counter = skipping.install(model, {layer.index: beta})
        got = layer.block(x[None])
        got = (got[0] if isinstance(got, tuple) else got).reshape(want.shape)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-7 * float(want.abs().max())
    assert (got - want).abs().max() <= tol
    assert counter.skipped == int(skip.sum()) and 0 < counter.fraction < 1
    skipping.remove(model)


@pytest.mark.parametrize("overrides", [{"num_shared_experts": 0}, {"expert_selection_fn": "sigmoid"},
                                       {"expert_selection_fn": "sigmoid", "norm_topk_prob": False,
                                        "shared_expert_combination_strategy": "sum"}])
def test_cohere2_variants_reproduce_the_block(overrides):
    """Cohere 2's config switches: no shared experts, sigmoid instead of softmax, sum instead of average."""
    model = wrap_model(tiny_model("cohere2_moe", **overrides))
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.layers.values():
            assert (layer.forward(x) - layer.block(x[None])[0]).abs().max() <= 1e-5
            assert (layer.shared is None) == (overrides.get("num_shared_experts") == 0)
