"""Aligning experts before merging (permutations of intermediate neurons) and the merge operators.

Every check is against an independent computation: the unpermuted model's own forward pass, a
brute force over all permutations of a tiny expert, or a naive per-entry TIES written here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import CORE_FAMILIES, FAMILIES, fresh_tiny
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import wrap_model
from moescope.analysis.model.alignment import (
    activation_matching,
    align_group,
    intermediate_activations,
    intermediate_size,
    permute_expert,
    permute_expert_in_place,
    weight_matching,
)
from moescope.analysis.model.merging import combine_tensors, ties_merge
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.strategies import StrategyContext, make_plan
from test_strategies import BATCH, FAST


def _params(view) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in view.experts.named_parameters(recurse=False)}


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _copy_permuted(view, src: int, dst: int, q: torch.Tensor) -> None:
    """Make expert ``dst`` a copy of expert ``src`` with its intermediate neurons permuted by ``q``."""
    with torch.no_grad():
        params = dict(view.experts.named_parameters(recurse=False))
        for p in params.values():
            p[dst].copy_(p[src])
        permute_expert_in_place(view, dst, q)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_permuted_expert_computes_the_same_function(family):
    model = fresh_tiny(family)
    hf = model.hf
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = hf(input_ids=ids).logits
    for l, view in model.layers.items():
        old = _params(view)
        for e in range(view.num_experts):
            permute_expert_in_place(view, e, _perm(intermediate_size(view), 10 * l + e))
        changed = [n for n, t in _params(view).items() if not torch.equal(t, old[n])]
        # every tensor on the intermediate side moved (down_proj_bias lives on the output side)
        assert sorted(changed) == sorted(n for n in old if n != "down_proj_bias")
    with torch.no_grad():
        after = hf(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("align", ["weights", "activations"])
def test_merging_an_expert_with_a_permuted_copy_of_itself_gives_it_back(family, align):
    model = fresh_tiny(family)
    l = model.moe_layers[0]
    view = model.layers[l]
    I = intermediate_size(view)
    q = _perm(I, 3)
    _copy_permuted(view, 0, 1, q)
    expert0 = _params(view)
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    perms = align_group(view, [0, 1], [0.6, 0.4], align, x)
    assert perms[0] is None  # the reference: the largest coefficient
    # expert 1's neuron j is expert 0's neuron q[j]; aligning it back is the inverse of q
    assert perms[1] == torch.argsort(q).tolist()
    # 6 outputs, 3 from each half (DeepSeek-V3's two routing groups stay the same size)
    groups = [[0, 1], [2], [3], [4, 5], [6], [7]]
    coeffs = [[0.6, 0.4], [1.0], [1.0], [0.5, 0.5], [1.0], [1.0]]
    unaligned = combine_tensors(view, groups, coeffs)
    model.merge(l, groups, coeffs, permutations=[perms, None, None, None, None, None])
    for name, t in _params(view).items():
        torch.testing.assert_close(t[0], expert0[name][0], rtol=1e-5, atol=1e-6)
        for new, old in ((1, 2), (2, 3), (4, 6), (5, 7)):  # kept experts: exactly
            assert torch.equal(t[new], expert0[name][old])
        torch.testing.assert_close(t[3], (expert0[name][4] + expert0[name][5]) / 2)
    assert not torch.allclose(unaligned["down_proj"][0], expert0["down_proj"][0], atol=1e-3)


def _brute_force(score: torch.Tensor) -> list[int]:
    n = score.shape[0]
    best = max(itertools.permutations(range(n)), key=lambda p: sum(float(score[i, p[i]]) for i in range(n)))
    return list(best)


LAYOUT_FAMILIES = ["mixtral", "llama4_text", "gpt_oss"]  # one per expert storage form


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_weight_and_activation_matching_find_the_best_permutation(family):
    """On a 6-neuron expert, the linear assignment equals a brute force over all 720 permutations
    of the objective computed here from the standard-orientation weights."""
    model = wrap_model(tiny_model(family, intermediate_size=6))
    view = model.layers[0]
    assert intermediate_size(view) == 6
    a, b = view.expert_weights(0), view.expert_weights(3)

    def vec(w, i):
        parts = [w.gate[i], w.up[i], w.down[:, i]]
        parts += [w.gate_bias[i : i + 1], w.up_bias[i : i + 1]] if w.gate_bias is not None else []
        return torch.cat([p.detach().double() for p in parts])

    score = torch.tensor([[float(vec(a, i) @ vec(b, j)) for j in range(6)] for i in range(6)])
    assert weight_matching(view, 0, 3).tolist() == _brute_force(score)

    x = torch.randn(200, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ha, hb = intermediate_activations(view, 0, x).double(), intermediate_activations(view, 3, x).double()
    corr = torch.tensor([[float(torch.corrcoef(torch.stack([ha[:, i], hb[:, j]]))[0, 1]) for j in range(6)]
                         for i in range(6)])
    assert activation_matching(view, 0, 3, x).tolist() == _brute_force(corr)


def test_intermediate_activations_are_what_the_down_projection_reads():
    for family in LAYOUT_FAMILIES:
        model = fresh_tiny(family)
        view = model.layers[0]
        x = torch.randn(5, model.config.hidden_size)
        w = view.expert_weights(2)
        h = intermediate_activations(view, 2, x)
        out = h @ w.down.T.detach() + (w.down_bias.detach() if w.down_bias is not None else 0)
        torch.testing.assert_close(out, view.expert_forward(2, x).detach(), rtol=1e-5, atol=1e-5)


def _naive_ties(members: list[torch.Tensor], coeffs: list[float], density: float) -> torch.Tensor:
    """TIES on flat tensors, one entry at a time (the formula of merging.py's docstring)."""
    s = sum(coeffs)
    w = [c / s for c in coeffs]
    n = members[0].numel()
    flat = [m.reshape(-1).tolist() for m in members]
    mean = [sum(w[i] * flat[i][k] for i in range(len(flat))) for k in range(n)]
    tau = [[flat[i][k] - mean[k] for k in range(n)] for i in range(len(flat))]
    keep = math.ceil(density * n)
    for t in tau:
        cut = sorted((abs(v) for v in t), reverse=True)[keep - 1]
        for k in range(n):
            if abs(t[k]) < cut:
                t[k] = 0.0
    out = []
    for k in range(n):
        total = sum(w[i] * tau[i][k] for i in range(len(tau)))
        if abs(total) <= 1e-6 * sum(w[i] * abs(tau[i][k]) for i in range(len(tau))):
            total = 0.0  # exactly balanced (untrimmed): no sign
        sign = (total > 0) - (total < 0)
        agree = [i for i in range(len(tau)) if tau[i][k] != 0 and ((tau[i][k] > 0) - (tau[i][k] < 0)) == sign]
        delta = sum(w[i] * tau[i][k] for i in agree) / sum(w[i] for i in agree) if agree else 0.0
        out.append(s * (mean[k] + delta))
    return torch.tensor(out).reshape(members[0].shape)


def test_ties_matches_a_naive_implementation_and_reduces_to_the_average_for_pairs():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 4, 5, generator=g)
    for coeffs, density in (([0.5, 0.3, 0.2], 0.4), ([1.0, 1.0, 1.0], 1.0), ([0.7, 0.2, 0.3], 0.15)):
        got = ties_merge(P, coeffs, density)
        torch.testing.assert_close(got, _naive_ties(list(P), coeffs, density), rtol=1e-5, atol=1e-6)
        linear = sum(c * p for c, p in zip(coeffs, P))
        # untrimmed (density 1) no sign wins anywhere and TIES is the weighted sum; trimmed it is not
        assert torch.allclose(got, linear, atol=1e-5) == (density == 1.0)
    # two members: their differences from the mean are opposite, so no sign wins: the weighted mean
    torch.testing.assert_close(ties_merge(P[:2], [0.7, 0.3], 0.2), 0.7 * P[0] + 0.3 * P[1])


def test_ties_hand_cases():
    # untrimmed, the w-weighted differences from the w-weighted mean always sum to 0: no sign
    # wins and TIES is the coefficient-weighted sum. Members 1, 2, 9 with c = (1, 1, 2):
    # w = (.25, .25, .5), mean 5.25, result Σc · mean = 21
    torch.testing.assert_close(ties_merge(torch.tensor([[1.0], [2.0], [9.0]]), [1, 1, 2], 1.0), torch.tensor([21.0]))
    # trimming breaks the balance. Members (0, 0), (1, 3), (5, 0), w = 1/3: mean (2, 1);
    # τ = (-2, -1), (-1, 2), (3, -1); density 1/2 keeps one entry each: -2 | 2 (entry 1) | 3.
    # Entry 0: τ̂ = (-2, 0, 3), Σ = 1/3 > 0 → sign +, only member 3 agrees → δ = 3.
    # Entry 1: τ̂ = (0, 2, 0) → δ = 2. Result (2 + 3, 1 + 2) = (5, 3).
    Q = torch.tensor([[0.0, 0.0], [1.0, 3.0], [5.0, 0.0]])
    torch.testing.assert_close(ties_merge(Q, [1 / 3, 1 / 3, 1 / 3], 0.5), torch.tensor([5.0, 3.0]))


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_every_merge_setting_applies_saves_and_loads_with_plain_from_pretrained(family, tmp_path):
    """The whole pipeline (strategy → plan JSON → apply → save → plain reload) on one family per
    mechanism; the exactness of alignment itself is proven on every family above."""
    from transformers import AutoModelForCausalLM

    model = fresh_tiny(family)
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    for i, params in enumerate(({"keep": 4, "align": "activations", "merge": "ties", "density": 0.5},
                                {"keep": 4, "align": "weights", "merge": "learned", "epochs": 1})):
        params = {**params, "representation": "weights", "similarity": "cosine", "grouping": "greedy"}
        plan = make_plan("merge", ctx, params)
        assert plan.provenance["align"] == params["align"]
        merged = [lp for lp in plan.layers.values() if any(len(g) > 1 for g in lp.groups)]
        assert merged and all(lp.permutations is not None for lp in merged)
        plan = PruningPlan.from_json(plan.to_json())  # the JSON carries alignment and operator
        pruned = apply(fresh_tiny(family), plan)
        out = pruned.save(tmp_path / f"out{i}")
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned.hf(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-4)


def test_aligned_merge_beats_unaligned_on_permuted_duplicates(tmp_path):
    """Experts 2 and 5 of every layer compute the same function in different neuron orders: the
    strategy groups them, and only the aligned merge reproduces the original layer's output."""
    model = wrap_model(tiny_model("mixtral"), source="tiny-mixtral")
    for l, view in model.layers.items():
        _copy_permuted(view, 2, 5, _perm(intermediate_size(view), l))
    errors = {}
    for align in ("none", "weights", "activations"):
        ctx = StrategyContext(model, BATCH, Cache(tmp_path / "cache"), FAST)  # one analysis for all three
        plan = make_plan("merge", ctx, {"keep": 7, "grouping": "greedy", "representation": "outputs",
                                        "merge": "uniform", "align": align})
        assert all([2, 5] in lp.groups for lp in plan.layers.values())
        x = torch.randn(50, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
        ref = model.layers[0].expert_forward(2, x).detach()
        with model.temporary_edit(0):
            apply_layer = plan.layers[0]
            model.merge(0, apply_layer.groups, apply_layer.coefficients, permutations=apply_layer.permutations)
            j = apply_layer.groups.index([2, 5])
            errors[align] = float((model.layers[0].expert_forward(j, x).detach() - ref).abs().max())
    assert errors["weights"] < 1e-5 and errors["activations"] < 1e-5 and errors["none"] > 1e-2


def test_bad_alignment_settings_and_permutations_are_refused(tmp_path):
    model = wrap_model(tiny_model("mixtral"), source="tiny-mixtral")
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    with pytest.raises(MoescopeError, match="unknown align"):
        make_plan("merge", ctx, {"keep": 4, "align": "sideways"})
    with pytest.raises(MoescopeError, match="density"):
        make_plan("merge", ctx, {"keep": 4, "merge": "ties", "density": 0})
    with pytest.raises(MoescopeError, match="needs calibration"):
        make_plan("merge", StrategyContext(model, None, Cache(tmp_path / "d"), FAST), {"keep": 4, "align": "activations"})
    raw = {"version": 1, "base_model": "x", "layers": {"0": {"groups": [[0, 1], [2]], "permutations": [[None, [0, 0]], None]}}}
    with pytest.raises(MoescopeError, match="permutations"):
        PruningPlan.from_json(raw)
    bad_size = PruningPlan("x", {0: LayerPlan([[0, 1]] + [[e] for e in range(2, 8)],
                                              permutations=[[None, [1, 0, 2]]] + [None] * 6)})
    with pytest.raises(MoescopeError, match="48 intermediate neurons"):
        bad_size.validate_for(model)
    before = model.fingerprint()
    with pytest.raises(MoescopeError, match="operator"):
        PruningPlan.from_json({"version": 1, "base_model": "x", "layers": {"0": {"groups": [[0, 1]], "operator": "avg"}}})
    assert model.fingerprint() == before


def test_permute_expert_leaves_other_experts_and_the_input_alone():
    model = wrap_model(tiny_model("gpt_oss"))
    view = model.layers[0]
    t = _params(view)
    new = permute_expert(view, t, 4, _perm(intermediate_size(view), 0))
    for name in t:
        torch.testing.assert_close(t[name], _params(view)[name])  # input not modified
        keep = [e for e in range(view.num_experts) if e != 4]
        torch.testing.assert_close(new[name][keep], t[name][keep])


def test_the_upcycled_demo_shares_one_neuron_order_and_the_scratch_demo_does_not(demo_dir):
    """Upcycled experts descend from one FFN, so weight matching pairs each neuron with itself;
    experts trained from scratch agree only up to an arbitrary permutation (a random one fixes
    about one neuron of 256)."""
    from moescope.analysis.core.paths import demo_upcycled_dir
    from moescope.analysis.model import load_moe

    if not (demo_upcycled_dir() / "config.json").is_file():
        pytest.fail(f"the upcycled demo is missing at {demo_upcycled_dir()}")
    fixed = {}
    for source in ("demo", "demo-upcycled"):
        model = load_moe(source)
        view = model.layers[2]
        fixed[source] = [float((weight_matching(view, 0, e) == torch.arange(256)).float().mean()) for e in (1, 5)]
        assert len(model.tokenizer) == 4096 and model.info()["num_experts"] == {str(l): 8 for l in range(4)}
    assert min(fixed["demo-upcycled"]) > 0.9 and max(fixed["demo"]) < 0.05, fixed


def test_a_missing_upcycled_demo_says_how_to_build_it(tmp_path, monkeypatch):
    from moescope.analysis.model import load_moe

    monkeypatch.setenv("MOESCOPE_DEMO_UPCYCLED_DIR", str(tmp_path / "nothing"))
    with pytest.raises(MoescopeError, match=r"demo-upcycled model is missing .*train_model\.py --upcycle"):
        load_moe("demo-upcycled")


def test_experts_with_a_tensor_the_layout_does_not_place_are_refused_before_any_work(tmp_path):
    """A per-expert tensor that the layout does not place on the neuron axis (here a made-up
    per-neuron scale) cannot be permuted exactly: aligning is refused in one line before any
    analysis, while merging without alignment still works (its rows are averaged like any other)."""
    model = fresh_tiny("mixtral")
    for view in model.layers.values():
        view.experts.register_parameter("neuron_scale", torch.nn.Parameter(torch.ones(view.num_experts, 48)))
    cache = Cache(tmp_path / "c")
    ctx = StrategyContext(model, BATCH, cache, FAST)
    params = {"keep": 6, "representation": "weights", "similarity": "cosine", "grouping": "greedy"}
    with pytest.raises(MoescopeError, match=r"\['neuron_scale'\].*cannot be permuted exactly.*align=none"):
        make_plan("merge", ctx, {**params, "align": "weights"})
    assert cache.entries() == []  # refused before the analysis ran
    with pytest.raises(MoescopeError, match="cannot be permuted exactly"):
        permute_expert_in_place(model.layers[0], 1, _perm(48, 0))
    plan = make_plan("merge", ctx, {**params, "align": "none"})
    apply(model, plan)
    assert model.layers[0].experts.neuron_scale.shape == (6, 48)


def test_align_and_density_are_generated_cli_flags():
    from moescope.analysis.run.cli import build_parser
    from moescope.analysis.run.commands import strategy_params
    from moescope.analysis.strategies import get_strategy

    merge = get_strategy("merge")
    declared = {p["name"]: p for p in merge.describe()["params"]}
    assert declared["align"]["choices"] == ["none", "weights", "activations", "routed-activations"]
    # group-and-merge merges raw weights (alignment is MC-SMoE's addition, on by default in router-guided)
    assert declared["align"]["default"] == "none" and declared["density"]["default"] == 0.2
    router_guided = {p["name"]: p for p in get_strategy("router-guided").describe()["params"]}
    assert router_guided["align"]["default"] == "activations" and router_guided["merge"]["default"] == "frequency"
    assert {"frequency", "ties"} <= set(declared["merge"]["choices"])
    args = build_parser().parse_args(["plan", "demo", "--strategy", "merge", "--keep", "6", "--align", "weights",
                                      "--merge", "ties", "--density", "0.5", "-o", "p.json"])
    assert strategy_params(args, merge) == {"keep": 6, "align": "weights", "merge": "ties", "density": 0.5}
