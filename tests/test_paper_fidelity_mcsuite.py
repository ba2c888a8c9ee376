"""MC-Suite's criteria and lottery (Jaiswal et al., "Finding Fantastic Experts in MoEs") and dynamic
skipping (Lu et al., "Not All Experts are Equal", §3.3 and App. A.2) checked against the papers'
equations on inputs whose answer is worked out by hand in the comments.

Each test cites the equation it checks; none re-derives moescope's own code path: the expected
numbers come from the equation written out (loops over tokens, pairs, hidden units) or by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure.analyze import AnalysisResult
from moescope.analysis.measure.criteria import CRITERIA, LayerStats, criterion_scores, pair_drop_order
from moescope.analysis.model import skipping, wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.strategies import make_plan
from moescope.analysis.strategies.base import get_strategy, validate_request
from test_strategy_values import CLASSES, IDS, class_logits, controlled, ctx_for, kept

# ---------------------------------------------------------------- hand-made layers for the criteria


def stats_for(routed: dict[int, list[list[float]]], E: int) -> LayerStats:
    """A layer whose expert e outputs its input unchanged (so A_e is the rows routed to e) and whose
    router sends each listed row to exactly the expert it is listed under (top-1, weight 1)."""
    rows, idx = [], []
    for e, xs in routed.items():
        rows += xs
        idx += [e] * len(xs)
    x = torch.tensor(rows, dtype=torch.float32)
    topk_idx = torch.tensor(idx)[:, None]
    view = SimpleNamespace(num_experts=E, expert_forward=lambda e, h: h)
    routing = SimpleNamespace(topk_idx=topk_idx, topk_weights=torch.ones(len(idx), 1))
    counts = M.usage_counts(topk_idx, E)
    return LayerStats(view, x, torch.arange(len(idx)), routing, counts, M.coactivation_counts(topk_idx, E),
                      torch.zeros(E), None)


def stored_analysis(tmp_path, layers: dict[int, dict[str, torch.Tensor]]) -> AnalysisResult:
    """An analysis entry holding only the given tensors (``pair.ECC``, ``routing.usage_count``, …)."""
    tensors = {f"L{l}.{k}": v.float() for l, d in layers.items() for k, v in d.items()}
    meta = {"layers": {str(l): {"num_experts": 4, "top_k": 2, "scalars": {}, "timings": {}} for l in layers}}
    return AnalysisResult(Cache(tmp_path).put("analysis", {"case": str(sorted(tensors))}, tensors=tensors, meta=meta))


# ---------------------------------------------------------------- EAN (eq. 13)


def test_ean_is_the_sum_over_hidden_units_of_each_units_norm_over_routed_tokens():
    """MC-Suite eq. 13: EAN_p = sum(norm_l2(A_p, dim=0)) = Σ_j ‖A_p[:, j]‖₂.

    Expert 0 sees one token with output (3, 4): EAN = 3 + 4 = 7, mean ‖y‖ = 5.
    Expert 1 sees 100 tokens with output (0.6, 0.8): EAN = √100·0.6 + √100·0.8 = 14, mean ‖y‖ = 1.
    Eq. 13 ranks expert 1 above expert 0; the mean-per-token norm (EAN-mean) ranks them the other way,
    so Min-EAN drops expert 0 and Min-EAN-mean drops expert 1."""
    s = stats_for({0: [[3.0, 4.0]], 1: [[0.6, 0.8]] * 100}, E=2)
    assert CRITERIA["EAN"].compute(s).tolist() == pytest.approx([7.0, 14.0])
    assert CRITERIA["EAN-mean"].compute(s).tolist() == pytest.approx([5.0, 1.0])
    assert M.unit_norm_sum(torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(7.0)


# ---------------------------------------------------------------- EAO (§2.4 ③)


def test_eao_counts_the_outliers_where_eao_frac_divides_by_the_entries():
    """MC-Suite §2.4 ③: EAO *counts* the activations outside μ ± 3σ (c = 3), per hidden unit here.

    Expert 0: 41 tokens, unit 0 is forty 0s and one 10 (μ = 10/41, σ = 1.562: 10 is 6.2σ out), unit 1
    the same at another token: 2 outliers in 82 entries. Expert 1: 11 tokens, unit 0 ten 0s and one
    10 (μ = 0.909, σ = 3.015: 10 is 3.015σ out), unit 1 constant: 1 outlier in 22 entries.
    Counts 2 > 1 (Min-EAO drops expert 1); fractions 2/82 < 1/22 (Min-EAO-frac drops expert 0)."""
    a = [[0.0, 0.0] for _ in range(41)]
    a[3][0], a[17][1] = 10.0, 10.0
    b = [[0.0, 1.0] for _ in range(11)]
    b[5][0] = 10.0
    s = stats_for({0: a, 1: b}, E=2)
    assert CRITERIA["EAO"].compute(s).tolist() == [2.0, 1.0]
    assert CRITERIA["EAO-frac"].compute(s).tolist() == pytest.approx([2 / 82, 1 / 22])


# ---------------------------------------------------------------- EAS (eq. 11)


def test_eas_is_the_mean_cosine_over_all_pairs_of_routed_outputs():
    """MC-Suite eq. 11: S[p, q] = 1/(|A_p||A_q|) Σ_{a_m∈A_p, a_n∈A_q} cos(a_m, a_n); EAS_p = Σ_{q≠p} S[p, q]
    (the text: similarity "with E − {E_p}"). Each expert on its own routed tokens:
    A_0 = {(1,0), (0,1)}, A_1 = {(2,0), (1,1)}, A_2 = {(−1,0), (0,−1)}.
    S[0,1] = (1 + 1/√2 + 0 + 1/√2)/4, S[0,2] = (−1 + 0 + 0 − 1)/4 = −1/2,
    S[1,2] = (−1 + 0 − 1/√2 − 1/√2)/4."""
    r = 1 / math.sqrt(2)
    s01, s02, s12 = (1 + 2 * r) / 4, -0.5, (-1 - 2 * r) / 4
    s = stats_for({0: [[1.0, 0.0], [0.0, 1.0]], 1: [[2.0, 0.0], [1.0, 1.0]], 2: [[-1.0, 0.0], [0.0, -1.0]]}, E=3)
    assert CRITERIA["EAS"].compute(s).tolist() == pytest.approx([s01 + s02, s01 + s12, s02 + s12], abs=1e-6)


# ---------------------------------------------------------------- ECC (eq. 8) and ETS (eq. 10): pairs


def test_pair_rule_and_row_sum_disagree_on_a_hand_routing_trace(tmp_path):
    """MC-Suite eq. 8: the collaboration matrix counts the tokens that selected both p and q; "we select
    the expert pair (E_p, E_q) wrt. the min or max argument and drop-index is identified as the expert
    that tends to have lower usage frequency".

    Trace (top-2): 5 tokens pick {0,1}, 4 pick {2,3}, 4 pick {1,2}. Usage: 0→5, 1→9, 2→8, 3→4.
    Max pair: (0,1) with 5 → drop its lower-usage member 0. The row sum (5, 9, 8, 4) = usage × (k−1)
    would drop 1 at the max end. Min pair: the first zero pair (0,2) → drop 0 (5 < 8); the row sum's
    min drops 3. Dropping on: after 0, the max pair among {1,2,3} is (1,2) or (2,3), both 4: the first,
    (1,2), drops 2 (8 < 9); then (1,3) has 0 → drop 3."""
    trace = torch.tensor([[0, 1]] * 5 + [[2, 3]] * 4 + [[1, 2]] * 4)
    C = M.coactivation_counts(trace, 4)
    usage = M.usage_counts(trace, 4)
    assert C[0, 1] == 5 and C[2, 3] == 4 and C[1, 2] == 4 and C[0, 2] == 0 and usage.tolist() == [5, 9, 8, 4]
    assert pair_drop_order(C, usage, "max") == [0, 2, 3, 1]
    assert pair_drop_order(C, usage, "min")[0] == 0
    rowsum = C.sum(1) - C.diagonal()
    assert int(rowsum.argmax()) == 1 and int(rowsum.argmin()) == 3  # what the row sum would drop instead

    res = stored_analysis(tmp_path, {0: {"pair.ECC": C, "routing.usage_count": usage, "crit.ECC-rowsum": rowsum}})
    first = {name_end: int(criterion_scores(res, *name_end)[0].argmin())
             for name_end in (("ECC", "max"), ("ECC", "min"), ("ECC-rowsum", "max"), ("ECC-rowsum", "min"))}
    assert first == {("ECC", "max"): 0, ("ECC", "min"): 0, ("ECC-rowsum", "max"): 1, ("ECC-rowsum", "min"): 3}


def test_ecc_pair_rule_one_shot_and_iterative_on_the_table_model(tmp_path):
    """Eq. 8 end to end on a model whose routing is known by construction (tests/test_strategy_values.py):
    class j's tokens go to the top-2 of its ranking. Pairs (tokens): {0,2}: 13, {0,6}: 8, {3,7}: 10,
    {2,4}: 18, {5,7}: 15; usage 0:21, 1:0, 2:31, 3:10, 4:18, 5:15, 6:8, 7:25.

    One-shot Max-ECC, keep 5, on the one matrix: (2,4)=18 → drop 4 (18 < 31); (5,7)=15 → drop 5
    (15 < 25); (0,2)=13 → drop 0 (21 < 31): keeps [1, 2, 3, 6, 7].
    Iterative, re-routed after each drop: drop 4; class 3 now goes to {2,7}: (2,7)=18 is the max → drop 2
    (31 < 43); class 0 goes to {0,7} and class 3 to {7,5}: (5,7)=33 → drop 5: keeps [0, 1, 3, 6, 7].
    The row sum (∝ usage) drops 2, the most-used expert, first."""
    assert [c[1][:2] for c in CLASSES] == [[2, 0], [0, 6], [3, 7], [4, 2], [7, 5]]
    ctx = ctx_for(controlled([class_logits(r, g) for _, r, g in CLASSES]), IDS, tmp_path)
    assert kept(make_plan("criterion", ctx, {"keep": 5, "criterion": "ECC"})) == [1, 2, 3, 6, 7]  # max: its default
    assert kept(make_plan("criterion", ctx, {"keep": 5, "criterion": "ECC", "mode": "iterative"})) == [0, 1, 3, 6, 7]
    assert kept(make_plan("criterion", ctx, {"keep": 7, "criterion": "ECC-rowsum", "order": "max"})) == [0, 1, 3, 4, 5, 6, 7]
    # ETS (eq. 10): X_p are the token ids routed to p; every class is one token id, so each of the
    # five pairs shares exactly one id: all tie at 1, the first pair (0,2) is picked → drop 0 (21 < 31)
    res = ctx.analysis(metrics=("routing",))
    ets = res.pair(0, "ETS")
    assert sorted(ets[p, q].item() for p in range(8) for q in range(p + 1, 8) if ets[p, q]) == [1.0] * 5
    assert kept(make_plan("criterion", ctx, {"keep": 7, "criterion": "ETS"})) == [1, 2, 3, 4, 5, 6, 7]


def test_ets_counts_shared_token_ids_not_shared_positions():
    """MC-Suite eq. 10: count(X_p ∩ X_q), with X_p the tokens routed to p as in eq. 9 (whose
    unique(X_p) counts vocabulary entries). Ids (5, 5, 7, 9) routed {0,1}, {2,3}, {0,2}, {1,3}:
    X_0 = {5,7}, X_1 = {5,9}, X_2 = {5,7}, X_3 = {5,9}. Shared ids: (0,2) = 2, (1,3) = 2, the rest 1;
    every pair of positions co-selected once (eq. 8 would see no difference)."""
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    O = M.token_overlap_counts(idx, torch.tensor([5, 5, 7, 9]), 4)
    assert O.tolist() == [[2, 1, 2, 1], [1, 2, 1, 2], [2, 1, 2, 1], [1, 2, 1, 2]]


# ---------------------------------------------------------------- default ends (Table 1, Figs. 8–15)


def test_default_ends_are_the_papers_better_ends():
    """Table 1: Max-RWN, Max-ETS, Min-EGE, Min-EAN; Fig. 10: highest ECC; Fig. 12: highest EAS;
    Fig. 15: highest EWS; Figs. 8, 9, 13: lowest EVC, EUF, EAE; §3.1 ④: dominant experts have a lower
    stable rank, so the highest WSR goes."""
    want = {"RWN": "max", "ETS": "max", "ECC": "max", "EAS": "max", "EWS": "max", "WSR": "max",
            "EGE": "min", "EAN": "min", "EVC": "min", "EUF": "min", "EAE": "min"}
    assert {n: CRITERIA[n].drop for n in want} == want
    assert CRITERIA["ECC"].pair and CRITERIA["ETS"].pair and not CRITERIA["EAN"].pair


# ---------------------------------------------------------------- dynamic skipping (Lu et al.)


def mixtral_expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e by its formula from the fused tensors: W_down (silu(W_gate x) ⊙ W_up x)."""
    gu, down = layer.experts.gate_up_proj[e].double(), layer.experts.down_proj[e].double()
    gate, up = gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2:]
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


@torch.no_grad()
def test_a_skipped_tokens_output_is_its_first_expert_at_the_whole_weight():
    """Lu et al. §3.3 and the authors' wrapper.py: a top-2 token with w₂ < β·w₁ is not sent to its
    second expert, and the remaining weight is renormalised (routing_weights /= sum), i.e. App. A.2's
    ẑ = Σ_{m≤i} w_m f_m / Σ_{m≤i} w_m. For Mixtral's renormalised top-2, ẑ = f₁(x) exactly; a token
    above the threshold keeps w₁ f₁ + w₂ f₂."""
    model = wrap_model(tiny_model("mixtral"))
    layer = model.layers[0]
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    p = torch.softmax(x.double() @ layer.router.weight.double().T, -1)  # softmax over all 8, by hand
    w, e = p.topk(2, -1)
    ratio = w[:, 1] / w[:, 0]
    s = ratio.sort().values  # β halfway between the two middle ratios: 8 tokens on each side, none on the
    beta = float((s[7] + s[8]) / 2)  # boundary (the median itself sat on it: float32 routing decided it either way)
    skipping.install(model, {0: beta})
    got = layer.block(x[None])
    got = (got[0] if isinstance(got, tuple) else got)[0].double()
    for t in range(16):
        f1, f2 = mixtral_expert(layer, int(e[t, 0]), x[t].double()), mixtral_expert(layer, int(e[t, 1]), x[t].double())
        if ratio[t] < beta:
            want = f1  # w₁ / w₁ = 1
        else:
            want = (w[t, 0] * f1 + w[t, 1] * f2) / (w[t, 0] + w[t, 1])
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-6)
    assert 0 < model.skip_counter.skipped < 16


@torch.no_grad()
def test_without_renormalising_router_the_kept_weight_takes_the_whole_mass():
    """A router that does not renormalise its top-k (Qwen3-MoE with norm_topk_prob=False): the paper
    (Mixtral only) is silent; moescope rescales the kept weight to the sum of both selected weights, so
    a skipped token outputs (w₁ + w₂) f₁(x) and the layer keeps its output scale."""
    model = wrap_model(tiny_model("qwen3_moe", norm_topk_prob=False))
    layer = model.layers[model.moe_layers[0]]
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    w, e = torch.softmax(x.double() @ layer.router_weight.double().T, -1).topk(2, -1)
    skipping.install(model, {layer.index: 1.0})  # β = 1: every token skips its second expert
    got = layer.block(x[None])
    got = (got[0] if isinstance(got, tuple) else got)[0].double()
    want = torch.stack([(w[t, 0] + w[t, 1]) * mixtral_expert(layer, int(e[t, 0]), x[t].double()) for t in range(16)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_top3_rule_compares_the_skipped_mass_with_all_k_weights():
    """Lu et al. App. A.2: keep the top i* experts, i* = min i with Σ_{m>i} w_m ≤ β Σ_{m≤k} w_m.
    w = (0.6, 0.25, 0.15), β = 0.4: i = 1 already holds (0.4 ≤ 0.4·1.0) → skip two experts. Against the
    kept mass instead (0.4 ≤ 0.4·0.6 fails; 0.15 ≤ 0.4·0.85 holds) only one would go.
    w = (0.5, 0.3, 0.2), β = 0.15: 0.5 > 0.15, 0.2 > 0.15 → keep all three."""
    w = torch.tensor([[0.25, 0.6, 0.15], [0.2, 0.3, 0.5]])  # unsorted on purpose
    assert skipping.skip_mask(w, 0.4).tolist()[0] == [True, False, True]
    assert skipping.skip_mask(w, 0.15).tolist()[1] == [False, False, False]


@torch.no_grad()
def test_top3_router_skips_and_renormalises_by_hand_and_beta_splits_the_tokens():
    """A top-3 Mixtral: each token's skipped set by App. A.2 written out, the kept weights renormalised,
    and β = the median of w₃ / (w₁ + w₂ + w₃) (the ratio App. A.2's rule compares for skipping at least
    one expert), so that exactly half of an even number of tokens skip (App. A.3: "the skipping will
    happen with around 50% possibility")."""
    model = wrap_model(tiny_model("mixtral", num_experts_per_tok=3))
    layer = model.layers[0]
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(6))
    p = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
    w, e = p.topk(3, -1)
    w = w / w.sum(-1, keepdim=True)  # Mixtral renormalises its top-k
    beta = M.skip_ratio_median(w)
    ratios = sorted((w[:, 2] / w.sum(-1)).tolist())
    assert beta == pytest.approx((ratios[15] + ratios[16]) / 2)
    skipping.install(model, {0: beta})
    got = layer.block(x[None])
    got = (got[0] if isinstance(got, tuple) else got)[0].double()
    skipping_tokens = 0
    for t in range(32):
        keep = next(i for i in (1, 2, 3) if float(w[t, i:].sum()) <= beta * float(w[t].sum()))
        skipping_tokens += keep < 3
        kept_w = w[t, :keep] / w[t, :keep].sum()  # × Σ all k = 1
        want = sum(kept_w[m] * mixtral_expert(layer, int(e[t, m]), x[t].double()) for m in range(keep))
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-6)
    assert skipping_tokens == 16


def test_skipping_a_top1_router_is_refused_before_any_work():
    """A top-1 router has nothing to skip: the skip strategy, with_skip and a plan's skip_beta are refused
    in one line."""
    model = wrap_model(tiny_model("mixtral", num_experts_per_tok=1))
    with pytest.raises(MoescopeError, match=r"^skip: layer 0: dynamic skipping needs a router that selects at least 2"):
        validate_request("skip", {}, model)
    with pytest.raises(MoescopeError, match="with_skip: layer 0: .*selects 1 "):
        validate_request("frequency", {"keep": 4, "with_skip": True}, model)
    from moescope.analysis.pruning.plan import PruningPlan

    with pytest.raises(MoescopeError, match="skip_beta of layer 0"):
        PruningPlan.from_json({"version": 1, "base_model": "x", "layers": {}, "skip_beta": {"0": 0.4}}).validate_for(model)
    # an evaluation's "with skipping" efficiency variant is left out for it rather than failing the run
    from moescope.analysis.run.experiments import _skip_betas

    assert _skip_betas(model, SimpleNamespace(skip_calib="demo:all"), None, None) is None


# ---------------------------------------------------------------- lottery (App. C)


def test_lottery_defaults_are_appendix_c():
    """MC-Suite App. C: AdamW with a cosine schedule, maximum lr 1e-6, batch size 8, 0.2 M tokens in the
    first round doubling every round, the optimiser reset every round; Min-EAN is the best criterion
    (Tables 1, 2)."""
    d = {p.name: p.default for p in get_strategy("lottery").all_params()}
    assert (d["lr"], d["batch"], d["start_tokens"], d["criterion"], d["order"], d["train"]) == \
        (1e-6, 8, 200_000, "EAN", None, "all")


def test_finetune_resets_adamw_and_its_cosine_schedule_every_round(monkeypatch):
    """App. C: "every round we reset the optimizer"; the cosine schedule starts at the maximum lr in
    every round and falls to 0 (cos from 0 to π over the round's steps). The finetune trains every
    parameter by default (the paper freezes none); train="moe" leaves the embeddings alone."""
    from moescope.analysis.strategies import lottery

    made, lrs = [], []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    model = wrap_model(tiny_model("mixtral"))
    ids = torch.randint(3, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    emb = model.hf.model.embed_tokens.weight.detach().clone()
    for tokens in (64, 128):  # two rounds: 2 and 4 steps of 4 rows × 8 tokens
        lottery.finetune(model, ids, tokens, lr=1e-3, batch_rows=4)
    assert len(made) == 2 and made[0] is not made[1]
    c = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.5, 1e-3 * c[0], 1e-3 * c[1], 1e-3 * c[2], 1e-3 * c[3]])
    assert not torch.equal(model.hf.model.embed_tokens.weight, emb)  # all parameters trained
    emb = model.hf.model.embed_tokens.weight.detach().clone()
    lottery.finetune(model, ids, 32, lr=1e-3, batch_rows=4, train="moe")
    assert torch.equal(model.hf.model.embed_tokens.weight, emb)
