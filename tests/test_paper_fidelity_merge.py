"""The group-and-merge side as published (issue #22, part B), each test from the paper's equation or
the authors' file on a hand-checkable case, asserting the published answer:

- group-and-merge (Zhang et al. 2024, ``papers/group-and-merge_…``): eq. 3 (CKA, one kernel estimate
  over the batch), eq. 6 (learned merge), Algorithm 1 line 5 (mixup of token embeddings);
- MC-SMoE: ``mcsmoe/merging/grouping_mixtral.py`` (router-logit cosine, most-used leaders,
  frequency-weighted merge), ``mcsmoe/merging/grouping.py`` (``SpectralClustering(assign_labels="kmeans",
  random_state=0)``);
- HC-SMoE: ``hcsmoe/merging/clustering.py`` (Euclidean distances between the experts' mean outputs,
  average linkage; its fix-dom-same merge is tests/test_fix_dom_same.py's);
- TIES on a group of two: the weighted mean (moescope's definition, made exact).
"""

from __future__ import annotations

import math

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure.analyze import AnalysisParams, analyze_layer, augmented_stream, run_analysis
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.model import wrap_model
from moescope.analysis.model.merging import (
    group_experts,
    learned_merge_coefficients,
    router_guided_groups,
    ties_merge,
)
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import PruningPlan, unused_kept_note
from moescope.analysis.pruning.prune import apply
from moescope.analysis.strategies import StrategyContext, get_strategy, make_plan
from moescope.analysis.strategies.presets import PRESETS, expand, make_preset_plan, validate_preset

FAST = AnalysisParams(similarity_tokens=128, rbf_batch_tokens=48, rbf_batches=1, chunk_size=4)
IDS = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))
BATCH = TokenBatch(input_ids=IDS, domains=("s",) * 8, source="synthetic", fingerprint="synthetic-fid")


def mixtral(**overrides):
    return wrap_model(tiny_model("mixtral", **overrides), source="tiny-mixtral")


def moe_input(model, layer=0):
    for l, x in LayerStream(model, IDS).layers():
        if l == layer:
            return x
    raise AssertionError(layer)


# ---- MC-SMoE: router-guided similarity is the cosine of the RAW router-logit columns --------------
def test_router_similarity_is_mc_smoe_raw_logit_cosine_not_a_correlation():
    """grouping_mixtral.py, similarity_base "router-logits": cosine(logits[:, i], logits[:, j]).
    Columns 11..14 and 14..11: cosine 620/630, Pearson −1; expert 1 joins leader 0 (MC-SMoE) where the
    centred variant would send it to leader 2 (columns −2..−5, Pearson +1 with expert 1)."""
    model = mixtral()
    view = model.layers[0]
    d = model.config.hidden_size
    x = torch.zeros(4, d)
    x[:, 0] = 1.0
    x[:, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # token t: [1, t, 0, …]
    W = torch.zeros(view.num_experts, d)
    W[0, :2] = torch.tensor([10.0, 1.0])  # logits 11, 12, 13, 14
    W[1, :2] = torch.tensor([15.0, -1.0])  # 14, 13, 12, 11
    W[2, :2] = torch.tensor([-1.0, -1.0])  # −2, −3, −4, −5
    W[3, :2] = torch.tensor([5.0, 0.0])  # 5, 5, 5, 5
    with torch.no_grad():
        view.router_weight.copy_(W)
    got = analyze_layer(view, x, torch.arange(4), AnalysisParams(metrics=("routing",)))
    raw = got.routing["logit_similarity"]
    assert raw[0, 1].item() == pytest.approx(620 / 630, abs=1e-6)
    assert got.routing["logit_correlation"][0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    assert got.routing["logit_correlation"][1, 2].item() == pytest.approx(1.0, abs=1e-6)
    usage = torch.tensor([0.4, 0.1, 0.3, 0.2])  # leaders (r = 2): experts 0 and 2
    sub = [0, 1, 2, 3]
    assert router_guided_groups(usage, raw[sub][:, sub], 2) == [[0, 1, 3], [2]]
    assert router_guided_groups(usage, got.routing["logit_correlation"][sub][:, sub], 2)[1] == [2, 1]


def test_router_guided_strategy_defaults_are_mc_smoes():
    declared = {p.name: p.default for p in get_strategy("router-guided").all_params()}
    assert declared["router_similarity"] == "cosine"  # the raw logits
    assert declared["merge"] == "frequency" and declared["align"] == "activations"


# ---- HC-SMoE: mean output over all tokens, Euclidean, average linkage ----------------------------
def naive_average_linkage(D, r):
    """HC-SMoE's clustering.py ``compute_distance(method="average")``: merge the two clusters with the
    smallest mean pairwise distance until r remain (a reference written from its definition)."""
    clusters = [[i] for i in range(len(D))]
    while len(clusters) > r:
        _, i, j = min((sum(D[a][b] for a in x for b in y) / (len(x) * len(y)), i, j)
                      for i, x in enumerate(clusters) for j, y in enumerate(clusters) if i < j)
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return sorted(clusters)


def test_average_linkage_on_euclidean_distances_by_hand():
    """Means 0, 1, 2.5, 7, 7.5: {3,4} at 0.5, {0,1} at 1, then d({0,1},{2}) = (2.5+1.5)/2 = 2 beats
    d({2},{3,4}) = 4.75: two groups [[0, 1, 2], [3, 4]]."""
    V = torch.tensor([[0.0], [1.0], [2.5], [7.0], [7.5]])
    D = M.euclidean_distance_matrix(V)
    assert D[2, 4].item() == pytest.approx(5.0)
    from moescope.analysis.model.merging import affinity

    A = affinity(D, "mean_output_euclidean")
    assert group_experts(A, 2, "agglomerative", distance=D) == [[0, 1, 2], [3, 4]]
    # average linkage is not invariant to remapping distances: on 1 − affinity (exp(−d / median)) these
    # 2-D means group differently, so the representation's own distances are what is clustered
    P = torch.tensor([[0, 6], [5, 3], [3, 2], [1, 1], [1, 0], [6, 6]], dtype=torch.float64)
    D = M.euclidean_distance_matrix(P).double()
    want = naive_average_linkage(D.tolist(), 2)
    assert want == [[0, 1, 2, 3, 4], [5]]
    A = affinity(D, "mean_output_euclidean")
    assert group_experts(A, 2, "agglomerative", distance=D) == want
    assert group_experts(A, 2, "agglomerative") != want


def test_hc_smoe_freq_preset_end_to_end_equals_the_reference_on_mean_outputs(tmp_path):
    """HC-SMoE's clustering with its frequency-weighted merge (``hc-smoe-freq``; ``hc-smoe`` is the
    script's fix-dom-same fold of the same groups, tests/test_fix_dom_same.py)."""
    model = mixtral()
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    plan = make_preset_plan("hc-smoe-freq", ctx, {"keep": 3})
    assert plan.provenance["preset"] == "hc-smoe-freq"
    res = ctx.analysis(metrics=("routing", "similarity"), augment_ratio=0.0)
    for l, x in LayerStream(model, IDS).layers():
        if x is None:
            continue
        view = model.layers[l]
        with torch.no_grad():  # every expert on ALL calibration tokens, router bypassed, then the mean
            means = torch.stack([view.expert_forward(e, x).double().mean(0) for e in range(view.num_experts)])
        D = torch.cdist(means, means)
        torch.testing.assert_close(res.similarity(l, "mean_output_euclidean").double(), D, atol=1e-5, rtol=1e-5)
        assert sorted(sorted(g) for g in plan.layers[l].groups) == naive_average_linkage(D.tolist(), 3)
        usage = res.routing(l, "usage")
        for g, c in zip(plan.layers[l].groups, plan.layers[l].coefficients):  # frequency-weighted
            want = [float(usage[e] / usage[g].sum()) for e in g] if float(usage[g].sum()) > 0 else [1 / len(g)] * len(g)
            assert c == pytest.approx(want, abs=1e-6)
        assert plan.layers[l].permutations is None  # raw weights


# ---- MC-SMoE grouping.py: SpectralClustering(assign_labels="kmeans", random_state=0) ---------------
def test_spectral_grouping_is_mc_smoes_kmeans_call():
    from sklearn.cluster import SpectralClustering

    g = torch.Generator().manual_seed(11)
    differs = 0
    for _ in range(30):
        X = torch.rand(10, 3, generator=g, dtype=torch.float64)
        A = (X @ X.T) / (X.norm(dim=1)[:, None] * X.norm(dim=1)[None, :])
        A.fill_diagonal_(1.0)
        labels = SpectralClustering(n_clusters=4, affinity="precomputed", assign_labels="kmeans",
                                    random_state=0).fit_predict(A.numpy())
        want = sorted(sorted(i for i in range(10) if labels[i] == k) for k in set(labels.tolist()))
        if len(want) == 4:
            assert group_experts(A, 4, "spectral") == want
        discretize = group_experts(A, 4, "spectral_discretize")
        differs += discretize != group_experts(A, 4, "spectral")
    assert differs > 0  # the label assignment is a real choice: discretize stays under its own name
    two_blocks = torch.full((6, 6), 0.05, dtype=torch.float64)
    two_blocks[:3, :3] = two_blocks[3:, 3:] = 0.9
    two_blocks.fill_diagonal_(1.0)
    assert group_experts(two_blocks, 2, "spectral") == [[0, 1, 2], [3, 4, 5]]


# ---- TIES of two members is the weighted mean, exactly ------------------------------------------
def test_ties_of_a_skewed_two_expert_group_is_the_weighted_mean():
    """demo-upcycled layer 1, group [3, 4], weights .92/.08 was off by up to 0.083 in 6 of 65,536
    entries: τ₁ = .08 (W₁ − W₂), τ₂ = −.92 (W₁ − W₂) give an elected mass of exactly 0."""
    g = torch.Generator().manual_seed(3)
    P = torch.randn(2, 256, 256, generator=g)
    P[1] = P[0] + 1e-3 * torch.randn(256, 256, generator=g)  # upcycled: near-identical members
    want = 0.92 * P[0] + 0.08 * P[1]
    for density in (0.2, 0.5, 1.0):
        torch.testing.assert_close(ties_merge(P, [0.92, 0.08], density), want, atol=1e-7, rtol=0)
    model = mixtral()
    before = {n: getattr(model.layers[0].experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    groups = [[0, 1]] + [[e] for e in range(2, 8)]
    coeffs = [[0.92, 0.08]] + [[1.0]] * 6
    model.merge(0, groups, coeffs, operator="ties", density=0.2)
    for name, W in before.items():
        torch.testing.assert_close(getattr(model.layers[0].experts, name)[0].detach(), 0.92 * W[0] + 0.08 * W[1],
                                   atol=1e-6, rtol=0)


# ---- group-and-merge eq. 6: θ = λ Σ α θ_i, Σ α = 1, router rows Σ α W_i --------------------------
def test_learned_merge_parameterisation_of_eq_6():
    beta = [torch.tensor([0.0, math.log(3.0)]), torch.tensor([0.7])]
    experts, router = learned_merge_coefficients(beta, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(router[0], torch.tensor([0.25, 0.75]))  # softmax: Σ α = 1
    torch.testing.assert_close(experts[0], torch.tensor([0.5, 1.5]))  # λ α
    torch.testing.assert_close(router[1], torch.tensor([1.0]))  # a group of one keeps its router row
    torch.testing.assert_close(experts[1], torch.tensor([0.5]))


def test_learned_merge_plan_scales_experts_by_lambda_and_merges_router_rows_with_alpha(tmp_path):
    model = mixtral()
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    plan = make_plan("merge", ctx, {"keep": 5, "merge": "learned", "epochs": 2, "lr": 0.05, "grouping": "greedy"})
    declared = {p.name: p.default for p in get_strategy("merge").all_params()}
    assert declared["lr"] == 1e-3 and declared["epochs"] == 50  # App. A
    for l, lp in plan.layers.items():
        info = plan.provenance["learned"][str(l)]
        assert info["steps"] == 2 * 6  # 2 epochs over the 6 training sequences (3:1 of 8), one per step
        for g, c, a in zip(lp.groups, lp.coefficients, lp.router_coefficients):
            assert sum(a) == pytest.approx(1.0, abs=1e-6)  # Σ α = 1 for the router rows
            if len(g) == 1:
                assert a == [1.0]  # a single expert's router row is never rescaled
            lam = [ci / ai for ci, ai in zip(c, a)]
            assert max(lam) - min(lam) < 1e-5  # experts: one λ per group times α
    # the JSON carries both, and applying it merges the router rows with α, the experts with λ α
    plan = PruningPlan.from_json(plan.to_json())
    W = model.layers[0].router_weight.detach().clone()
    down = model.layers[0].experts.down_proj.detach().clone()
    pruned = apply(mixtral(), plan)
    lp = plan.layers[0]
    for j, (g, c, a) in enumerate(zip(lp.groups, lp.coefficients, lp.router_coefficients)):
        torch.testing.assert_close(pruned.layers[0].router_weight[j].detach(), sum(ai * W[e] for e, ai in zip(g, a)),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pruned.layers[0].experts.down_proj[j].detach(),
                                   sum(ci * down[e] for e, ci in zip(g, c)), atol=1e-6, rtol=1e-6)


# ---- the merge strategy merges raw weights unless asked ---------------------------------------------
def test_group_and_merge_default_is_raw_weights(tmp_path):
    assert {p.name: p.default for p in get_strategy("merge").all_params()}["align"] == "none"
    ctx = StrategyContext(mixtral(), BATCH, Cache(tmp_path / "c"), FAST)
    plan = make_plan("merge", ctx, {"keep": 4, "representation": "weights", "similarity": "cosine"})
    assert plan.provenance["align"] == "none"
    assert all(lp.permutations is None for lp in plan.layers.values())


# ---- Algorithm 1 line 5: R(f_i) = f_i(Mixup(D)), token embeddings mixed ---------------------------
def test_augmentation_mixes_two_sequences_token_embeddings_and_runs_them_through_the_model(tmp_path):
    model = mixtral()
    params = AnalysisParams(similarity_tokens=64, chunk_size=4, augment_ratio=1.0, augment="embeddings", seed=5)
    from moescope.analysis.measure.augment import mixup_pairs

    a, b, lam = mixup_pairs(IDS.shape[0], 1.0, 5)
    assert len(a) == 8 and bool((a != b).all()) and bool(((lam > 0) & (lam < 1)).all())
    stream = augmented_stream(model, IDS, params)
    emb = model.hf.get_input_embeddings().weight.detach()
    first = torch.cat(stream.hidden)
    want = lam[:, None, None] * emb[IDS[a]] + (1 - lam[:, None, None]) * emb[IDS[b]]
    torch.testing.assert_close(first, want, atol=1e-6, rtol=1e-6)
    # the mixtures enter the output similarities only; criteria and routing see the calibration tokens
    plain = run_analysis(model, BATCH, AnalysisParams(similarity_tokens=64, chunk_size=4, seed=5,
                                                      metrics=("routing", "similarity", "activations")),
                         cache=Cache(tmp_path / "a"))
    mixed = run_analysis(model, BATCH, AnalysisParams(similarity_tokens=64, chunk_size=4, augment_ratio=1.0,
                                                      augment="embeddings", seed=5,
                                                      metrics=("routing", "similarity", "activations")),
                         cache=Cache(tmp_path / "b"))
    for l in plain.layers:
        assert (plain.similarity(l, "cka_linear") - mixed.similarity(l, "cka_linear")).abs().max() > 1e-4
        torch.testing.assert_close(plain.criterion(l, "EAN"), mixed.criterion(l, "EAN"))
        torch.testing.assert_close(plain.routing(l, "usage"), mixed.routing(l, "usage"))


# ---- eq. 3: RBF CKA is one kernel estimate over the whole batch ----------------------------------
def naive_rbf_cka(X, Y):
    """CKA (eq. 3) with HSIC = tr(K H L H)/(s−1)², K_mn = exp(−‖x_m − x_n‖² / 2σ²), σ the median distance,
    over all s tokens at once (a reference, n×n Grams held)."""
    def gram(Z):
        d2 = torch.cdist(Z.double(), Z.double()).pow(2)
        iu = torch.triu_indices(len(Z), len(Z), 1)
        sigma2 = d2[iu[0], iu[1]].sqrt().median().pow(2)
        return torch.exp(-d2 / (2 * sigma2))

    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = gram(X), gram(Y)
    hsic = lambda A, B: torch.trace(A @ H @ B @ H)  # noqa: E731
    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def test_rbf_cka_is_one_estimate_over_the_batch_in_blocks():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(301, 5, generator=g)
    Z = X.pow(2) + 0.3 * torch.randn(301, 5, generator=g)
    Y = torch.stack([X, Z, 3 * X])
    want = naive_rbf_cka(X, Z)
    for work_bytes in (3 * 301 * 8 * 5, 2**28):  # 5-row blocks, and one block
        got = M.rbf_cka_matrix(Y, work_bytes=work_bytes)
        assert got[0, 1].item() == pytest.approx(want, rel=2e-5)
        assert got[0, 2].item() == pytest.approx(1.0, abs=1e-5)  # median bandwidth: scale-free
    minibatch = M.rbf_cka_minibatch_matrix(Y, batch_tokens=64, n_batches=4)[0, 1].item()
    assert abs(minibatch - want) > 1e-3  # the mini-batch mean is another quantity (cka_rbf_minibatch)


# ---- presets --------------------------------------------------------------------------------------
def test_presets_are_declared_parameters_and_overridable():
    for name, preset in PRESETS.items():
        declared = {p.name for p in get_strategy(preset.strategy).all_params()}
        assert set(preset.params) <= declared, name
    strategy, params = expand("gam-data", {"similarity": "cosine", "keep": 6})
    assert strategy == "merge" and params["similarity"] == "cosine" and params["augment"] == "embeddings"
    assert PRESETS["gam-data"].calib_samples == 128 and PRESETS["enumerate"].calib_samples == 128
    assert expand("max-rwn")[1]["order"] == "max" and expand("min-ean")[1]["order"] == "min"  # Table 1
    assert expand("max-ets")[1]["order"] == "max" and expand("max-ecc")[1]["order"] == "max"
    # MC-SMoE's Mixtral script merges unaligned weights; the paper's permutation alignment has its own name
    assert expand("mc-smoe")[1]["align"] == "none" and expand("mc-smoe-aligned")[1]["align"] == "activations"


def test_a_preset_that_cannot_apply_is_refused_from_the_config_in_one_line():
    top1 = wrap_model(tiny_model("mixtral", num_experts_per_tok=1), source="tiny-top1")
    with pytest.raises(MoescopeError, match=r"^preset enumerate-skip: .*dynamic skipping needs a router that selects at least 2 experts"):
        validate_preset("enumerate-skip", {"keep": 4}, top1)
    assert validate_preset("enumerate-skip", {"keep": 4, "with_skip": False}, top1)[0] == "enumerate"
    with pytest.raises(MoescopeError, match=r"^preset hc-smoe: keep=1 is not possible in layer 0: it must be "
                                            r"between top-k \(2\)"):
        validate_preset("hc-smoe", {"keep": 1}, mixtral())
    with pytest.raises(MoescopeError, match="unknown preset 'hc_smoe'"):
        validate_preset("hc_smoe", {"keep": 4}, mixtral())


def test_cli_lists_presets_and_plans_from_one_with_overrides(capsys, tmp_path, monkeypatch, demo_dir):
    import json

    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["strategies", "--json"]) == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    merge_presets = {p["name"]: p for p in listed["merge"]["presets"]}
    assert merge_presets["gam-data"]["params"]["augment"] == "embeddings" and merge_presets["gam-data"]["calib_samples"] == 128
    assert {"mc-smoe", "mc-smoe-aligned"} == {p["name"] for p in listed["router-guided"]["presets"]}
    assert main(["strategies"]) == 0
    assert "preset hc-smoe: --representation mean_output --similarity euclidean" in capsys.readouterr().out
    out = tmp_path / "plan.json"
    rc = main(["plan", "demo", "--preset", "max-rwn", "--keep", "6", "--mode", "iterative", "--samples", "4",
               "--seq-len", "32", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    plan = PruningPlan.load(out)
    assert plan.provenance["preset"] == "max-rwn"
    # on these 4×32 tokens Max-RWN keeps an expert no token reached: the CLI says which, in one line
    flagged = plan.provenance["unused_kept"]
    assert flagged and all(set(v["kept"]) <= set(plan.layers[int(l)].kept()) for l, v in flagged.items())
    assert err.strip().splitlines() == [f"warning: max-rwn (criterion) {unused_kept_note(plan)}"]
    assert plan.provenance["params"] == {"criterion": "RWN", "order": "max", "mode": "iterative", "keep": 6}
    assert main(["plan", "demo", "--preset", "hc-smoe", "--keep", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moescope: error: preset hc-smoe: keep=1 is not possible in layer 0: it must be between top-k (2) "
                   "and the layer's 8 experts"]
    assert main(["plan", "demo", "--preset", "hc-smoe", "--strategy", "enumerate", "--keep", "4", "-o", str(out)]) == 2
    assert "preset hc-smoe is a merge recipe" in capsys.readouterr().err
