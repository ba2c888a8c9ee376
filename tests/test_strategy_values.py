"""Every strategy checked on what it chooses, on tiny models whose right answer is known by
construction.

The controlled model is a one-layer Mixtral whose attention output is zeroed and whose token
embeddings are one-hot: the MoE input of a token of class j is exactly ``κ·e_j`` with
``κ = 1/sqrt(1/d + eps)`` (RMSNorm of a one-hot vector), so router column j *is* the logit vector
of class j (times κ). Usage counts, re-routing after a drop, routing weights and expert outputs
are then computed here by hand from a small table, independently of moescope's code.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.prune import apply
from moescope.analysis.strategies import StrategyContext, make_plan

D = 32
EPS = 1e-5  # the tiny Mixtral's RMSNorm eps
KAPPA = 1 / math.sqrt(1 / D + EPS)
FAST = AnalysisParams(similarity_tokens=128, rbf_batch_tokens=32, rbf_batches=1, chunk_size=4)

# (tokens of the class, expert ranking best first, gap between the first and second logit)
CLASSES = [
    (13, [2, 0, 7, 1, 3, 6, 5, 4], 0.10),
    (8, [0, 6, 5, 7, 2, 1, 3, 4], 0.20),
    (10, [3, 7, 6, 4, 0, 1, 2, 5], 0.30),
    (18, [4, 2, 7, 5, 3, 1, 6, 0], 0.05),
    (15, [7, 5, 1, 2, 3, 0, 4, 6], 0.15),
]
TOKEN0 = 10  # class j is token id TOKEN0 + j


def class_logits(ranking, gap) -> list[float]:
    """Router column of a class: 2 for its first expert, 2 − gap for the second, then 0.4 apart."""
    z = [0.0] * 8
    for i, e in enumerate(ranking):
        z[e] = 2.0 if i == 0 else 2.0 - gap - 0.4 * (i - 1)
    return z


def token_ids(classes, rows=4, seed=0) -> torch.Tensor:
    flat = [TOKEN0 + j for j, (n, *_) in enumerate(classes) for _ in range(n)]
    random.Random(seed).shuffle(flat)
    return torch.tensor(flat).reshape(rows, -1)


def controlled(columns: list[list[float]], seed: int = 0):
    """One-layer tiny Mixtral: class j's MoE input is κ·e_j and its router logits κ·columns[j]."""
    hf = tiny_model("mixtral", seed=seed, num_hidden_layers=1)
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        emb = hf.model.embed_tokens.weight
        for j in range(len(columns)):
            emb[TOKEN0 + j] = 0.0
            emb[TOKEN0 + j, j] = 1.0
        W = hf.model.layers[0].mlp.gate.weight
        W.zero_()
        for j, z in enumerate(columns):
            W[:, j] = torch.tensor(z)
    return wrap_model(hf, source="controlled")


def ctx_for(model, ids, tmp_path, params=FAST):
    batch = TokenBatch(input_ids=ids, domains=("s",) * ids.shape[0], source="s", fingerprint=f"ids-{hash(tuple(ids.flatten().tolist()))}")
    return StrategyContext(model, batch, Cache(tmp_path / "cache"), params)


def usage(classes, alive) -> dict[int, int]:
    """Tokens routed to each alive expert: every class goes to its two best alive experts."""
    u = {e: 0 for e in alive}
    for n, ranking, *_ in classes:
        for e in [e for e in ranking if e in alive][:2]:
            u[e] += n
    return u


def kept_by_score(score: dict[int, float], keep: int) -> list[int]:
    return sorted(sorted(score, key=lambda e: (-score[e], e))[:keep])


def iterative_min_usage(classes, keep) -> list[int]:
    """Naive iterative EUF-min: drop the least-used alive expert, re-route, repeat."""
    alive = list(range(8))
    while len(alive) > keep:
        u = usage(classes, alive)
        low = min(u.values())
        assert sum(v == low for v in u.values()) == 1  # the construction has no ties
        alive.remove(min(u, key=u.get))
    return sorted(alive)


@pytest.fixture
def table_model():
    return controlled([class_logits(r, g) for _, r, g in CLASSES])


IDS = token_ids(CLASSES)


def test_the_construction_gives_one_hot_moe_inputs(table_model):
    seen = []
    h = table_model.layers[0].block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, D)))
    with torch.no_grad():
        table_model.hf(input_ids=IDS)
    h.remove()
    want = torch.zeros(IDS.numel(), D)
    want[torch.arange(IDS.numel()), IDS.flatten() - TOKEN0] = KAPPA
    torch.testing.assert_close(seen[0], want, rtol=1e-6, atol=1e-6)


def kept(plan) -> list[int]:
    return plan.layers[0].kept()


# ---------------------------------------------------------------- random


def test_random_is_seeded_differs_between_seeds_and_keeps_distinct_experts(tmp_path):
    model = wrap_model(tiny_model("mixtral"), source="r")
    ctx = ctx_for(model, IDS, tmp_path)
    plans = {s: make_plan("random", ctx, {"keep": 4, "seed": s}) for s in (0, 1, 2)}
    again = make_plan("random", ctx, {"keep": 4, "seed": 1})
    assert again.to_json()["layers"] == plans[1].to_json()["layers"]
    choices = {s: tuple(tuple(lp.kept()) for _, lp in sorted(p.layers.items())) for s, p in plans.items()}
    assert len(set(choices.values())) == 3  # three seeds, three different choices
    for p in plans.values():
        for lp in p.layers.values():
            k = lp.kept()
            assert len(k) == 4 and len(set(k)) == 4 and all(0 <= e < 8 for e in k) and lp.is_pure_keep()


def test_random_on_deepseek_keeps_routing_groups_equal(tmp_path):
    model = wrap_model(tiny_model("deepseek_v3"), source="r")
    for seed in range(3):
        plan = make_plan("random", ctx_for(model, IDS, tmp_path), {"keep": 4, "seed": seed})
        for lp in plan.layers.values():
            k = lp.kept()
            assert len(set(k)) == 4 and sum(e < 4 for e in k) == 2  # two of each routing group {0..3}, {4..7}


# ---------------------------------------------------------------- frequency and criteria


def test_frequency_and_euf_keep_the_experts_the_table_routes_to_most(table_model, tmp_path):
    u = usage(CLASSES, range(8))
    assert u == {0: 21, 1: 0, 2: 31, 3: 10, 4: 18, 5: 15, 6: 8, 7: 25}  # by hand from the table
    ctx = ctx_for(table_model, IDS, tmp_path)
    assert kept(make_plan("frequency", ctx, {"keep": 4})) == [0, 2, 4, 7]
    assert kept(make_plan("frequency", ctx, {"keep": 5})) == [0, 2, 4, 5, 7]
    assert kept(make_plan("criterion", ctx, {"keep": 4, "criterion": "EUF", "order": "min"})) == [0, 2, 4, 7]
    # max drops the most used: the four least used remain, the never-routed expert 1 among them
    assert kept(make_plan("criterion", ctx, {"keep": 4, "criterion": "EUF", "order": "max"})) == [1, 3, 5, 6]


def test_iterative_differs_from_one_shot_as_re_routing_predicts(table_model, tmp_path):
    """keep 4 of 8 by EUF-min in four rounds: each drop re-routes its tokens to the class's next
    alive expert, which changes which expert is least used next."""
    one_shot, iterative = kept_by_score(usage(CLASSES, range(8)), 4), iterative_min_usage(CLASSES, 4)
    assert one_shot == [0, 2, 4, 7] and iterative == [2, 4, 5, 7]  # by hand: 1, 6, 3, 0 go in turn
    ctx = ctx_for(table_model, IDS, tmp_path)
    p = {"keep": 4, "criterion": "EUF", "order": "min"}
    assert kept(make_plan("criterion", ctx, p)) == one_shot
    assert kept(make_plan("criterion", ctx, {**p, "mode": "iterative"})) == iterative
    assert kept(make_plan("criterion", ctx, {**p, "keep": 6, "mode": "iterative"})) == iterative_min_usage(CLASSES, 6)


def test_router_weight_norm_criterion_follows_the_router_rows(table_model, tmp_path):
    columns = torch.tensor([class_logits(r, g) for _, r, g in CLASSES]).T  # [8, classes]
    norms = {e: float(columns[e].norm()) for e in range(8)}
    ctx = ctx_for(table_model, IDS, tmp_path)
    assert kept(make_plan("criterion", ctx, {"keep": 3, "criterion": "RWN", "order": "min"})) == kept_by_score(norms, 3)
    small_first = {e: -v for e, v in norms.items()}
    assert kept(make_plan("criterion", ctx, {"keep": 3, "criterion": "RWN", "order": "max"})) == kept_by_score(small_first, 3)


def naive_expert(model, e: int, x: torch.Tensor) -> torch.Tensor:
    """Mixtral expert e by its formula: W_down (silu(W_gate x) ⊙ W_up x)."""
    gu, down = model.hf.model.layers[0].mlp.experts.gate_up_proj[e], model.hf.model.layers[0].mlp.experts.down_proj[e]
    gate, up = gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2 :]
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def scaled_table_model():
    """The table model with expert e's W_down scaled by a distinct factor (so activation norms
    differ by construction)."""
    model = controlled([class_logits(r, g) for _, r, g in CLASSES])
    with torch.no_grad():
        for e, s in enumerate([1.0, 5.0, 0.3, 2.0, 0.6, 3.0, 1.5, 0.8]):
            model.hf.model.layers[0].mlp.experts.down_proj[e] *= s
    return model


def test_activation_criteria_pick_by_their_formulas(tmp_path):
    """EAN (MC-Suite eq. 13: Σ_j ‖A[:, j]‖₂ over the routed tokens), EAN-mean (mean ‖y‖ on routed
    tokens) and REAP (mean routing weight × ‖y‖) computed here from the table: class j's tokens go
    to its top-2 with renormalised softmax weights of κ·logits."""
    model = scaled_table_model()
    ean, ean_mean, reap = {}, {}, {}
    with torch.no_grad():
        for e in range(8):
            rows, norms, weighted = [], [], []
            for j, (n, ranking, gap) in enumerate(CLASSES):
                if e not in ranking[:2]:
                    continue
                x = torch.zeros(D)
                x[j] = KAPPA
                out = naive_expert(model, e, x).double()
                y = float(out.norm())
                z = torch.tensor(class_logits(ranking, gap)) * KAPPA
                top = torch.softmax(z, 0)[ranking[:2]]
                w = float(top[ranking[:2].index(e)] / top.sum())
                rows += [out] * n
                norms += [y] * n
                weighted += [w * y] * n
            if norms:  # expert 1 is never routed: no value, dropped first
                A = torch.stack(rows)  # [routed tokens, hidden units]
                ean[e] = sum(float(A[:, u].norm()) for u in range(A.shape[1]))
                ean_mean[e], reap[e] = sum(norms) / len(norms), sum(weighted) / len(weighted)
    assert set(ean) == {0, 2, 3, 4, 5, 6, 7}
    ctx = ctx_for(model, IDS, tmp_path)
    res = ctx.analysis(metrics=("routing", "activations"))
    for name, want in (("EAN", ean), ("EAN-mean", ean_mean), ("REAP", reap)):
        got = res.criterion(0, name)
        assert math.isnan(float(got[1]))
        for e, v in want.items():
            assert float(got[e]) == pytest.approx(v, rel=1e-4), (name, e)
        assert kept(make_plan("criterion", ctx, {"keep": 4, "criterion": name, "order": "min"})) == kept_by_score(want, 4)
        largest_dropped = kept_by_score({e: -v for e, v in want.items()}, 4)
        assert kept(make_plan("criterion", ctx, {"keep": 4, "criterion": name, "order": "max"})) == largest_dropped
    assert kept_by_score(ean_mean, 4) != kept_by_score(reap, 4)  # the routing weight matters here


def test_gradient_norm_criterion_equals_autograd_and_drops_the_unrouted_expert(tmp_path):
    model = scaled_table_model()
    hf = model.hf
    ex = hf.model.layers[0].mlp.experts
    hf.zero_grad()
    logits = hf(input_ids=IDS).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
    loss.backward()
    egn = {e: float(torch.cat([ex.gate_up_proj.grad[e].flatten(), ex.down_proj.grad[e].flatten()]).norm())
           for e in range(8)}
    hf.zero_grad()
    assert egn[1] == 0.0 and min(v for e, v in egn.items() if e != 1) > 0  # never routed: no gradient
    ctx = ctx_for(model, IDS, tmp_path)
    got = ctx.analysis(metrics=("routing", "gradients")).criterion(0, "EGN")
    for e in range(8):
        assert float(got[e]) == pytest.approx(egn[e], rel=1e-3, abs=1e-9)
    plan = make_plan("criterion", ctx, {"keep": 7, "criterion": "EGN", "order": "min"})
    assert kept(plan) == [0, 2, 3, 4, 5, 6, 7]
    assert kept(make_plan("criterion", ctx, {"keep": 4, "criterion": "EGN", "order": "min"})) == kept_by_score(egn, 4)


# ---------------------------------------------------------------- enumeration


class NaiveLoss:
    """``‖pruned block(x) − block(x)‖_F`` with the pruned block built structurally (keep) and run
    by transformers; memoised per subset."""

    def __init__(self, model, x, layer=0):
        self.model, self.x, self.layer, self.memo = model, x, layer, {}
        with torch.no_grad():
            self.full = model.layers[layer].block(x[None])

    def __call__(self, keep_set) -> float:
        key = tuple(sorted(keep_set))
        if key not in self.memo:
            with torch.no_grad(), self.model.temporary_edit(self.layer):
                self.model.keep(self.layer, list(key))
                pruned = self.model.layers[self.layer].block(self.x[None])
            self.memo[key] = float((pruned - self.full).double().pow(2).sum().sqrt())
        return self.memo[key]


def moe_input(model, ids, layer=0) -> torch.Tensor:
    seen = []
    h = model.layers[layer].block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model.hf(input_ids=ids)
    h.remove()
    return seen[0]


def naive_search(loss, n, keep, width):
    """Remove one expert at a time keeping the ``width`` best subsets (1: greedy)."""
    beam = [tuple(range(n))]
    while len(beam[0]) > keep:
        nxt = sorted({tuple(e for e in C if e != d) for C in beam for d in C})
        beam = sorted(nxt, key=loss)[:width]
    return list(beam[0])


def test_enumerate_drops_the_never_routed_expert_at_no_cost(table_model, tmp_path):
    loss = NaiveLoss(table_model, moe_input(table_model, IDS))
    assert loss([0, 2, 3, 4, 5, 6, 7]) < 1e-4  # rounding only: no token re-routes
    assert min(loss([k for k in range(8) if k != e]) for e in (0, 2, 3, 4, 5, 6, 7)) > 0.1
    ctx = ctx_for(table_model, IDS, tmp_path)
    for method in ("exact", "greedy", "beam"):
        for mode in ("layer-wise", "progressive"):
            plan = make_plan("enumerate", ctx, {"keep": 7, "method": method, "mode": mode})
            assert kept(plan) == [0, 2, 3, 4, 5, 6, 7], (method, mode)


@pytest.mark.slow
def test_enumerate_methods_equal_their_naive_searches(table_model, tmp_path):
    loss = NaiveLoss(table_model, moe_input(table_model, IDS))
    ctx = ctx_for(table_model, IDS, tmp_path)
    brute = min(itertools.combinations(range(8), 4), key=loss)
    assert kept(make_plan("enumerate", ctx, {"keep": 4, "method": "exact"})) == list(brute)
    greedy, beam = naive_search(loss, 8, 4, 1), naive_search(loss, 8, 4, 4)
    assert kept(make_plan("enumerate", ctx, {"keep": 4, "method": "greedy"})) == greedy
    assert kept(make_plan("enumerate", ctx, {"keep": 4, "method": "beam"})) == beam


@pytest.mark.slow
def test_progressive_enumeration_sees_the_pruned_earlier_layer():
    """Two-layer model, keep 2: layer-wise scores layer 1 on the original model's inputs,
    progressive on the inputs after layer 0 was pruned; both brute-forced here."""
    import copy

    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model = wrap_model(tiny_model("mixtral", seed=3), source="p")
    subsets = list(itertools.combinations(range(8), 2))
    s0 = min(subsets, key=NaiveLoss(model, moe_input(model, ids, 0), 0))
    s1_layerwise = min(subsets, key=NaiveLoss(model, moe_input(model, ids, 1), 1))
    pruned = wrap_model(copy.deepcopy(model.hf))
    pruned.keep(0, list(s0))
    s1_progressive = min(subsets, key=NaiveLoss(model, moe_input(pruned, ids, 1), 1))
    assert s1_progressive != s1_layerwise  # the construction makes the two modes disagree
    batch = TokenBatch(input_ids=ids, domains=("s",) * 4, source="s", fingerprint="p")
    ctx = StrategyContext(model, batch, None, FAST)
    lw = make_plan("enumerate", ctx, {"keep": 2, "mode": "layer-wise"})
    pg = make_plan("enumerate", ctx, {"keep": 2, "mode": "progressive"})
    assert (lw.layers[0].kept(), lw.layers[1].kept()) == (list(s0), list(s1_layerwise))
    assert (pg.layers[0].kept(), pg.layers[1].kept()) == (list(s0), list(s1_progressive))


# ---------------------------------------------------------------- group-and-merge

PAIRS = [(0, 3), (1, 7), (2, 6), (4, 5)]  # expert b is an exact copy of expert a (weights only)


def copies_model():
    model = controlled([class_logits(r, g) for _, r, g in CLASSES])
    ex = model.hf.model.layers[0].mlp.experts
    with torch.no_grad():
        for a, b in PAIRS:
            ex.gate_up_proj[b] = ex.gate_up_proj[a]
            ex.down_proj[b] = ex.down_proj[a]
    return model


def expected_coefficients(merge: str) -> list[list[float]]:
    u = usage(CLASSES, range(8))
    out = []
    for a, b in PAIRS:
        if merge == "uniform":
            out.append([0.5, 0.5])
        elif merge == "usage":
            out.append([u[a] / (u[a] + u[b]), u[b] / (u[a] + u[b])])
        else:  # max: the more used member
            out.append([1.0, 0.0] if u[a] > u[b] else [0.0, 1.0])
    return out


@pytest.mark.parametrize("grouping, similarity", [("spectral", "cka_linear"), ("greedy", "cka_linear"),
                                                  ("spectral", "cosine"), ("greedy", "mse")])
def test_merge_groups_exact_copies_with_hand_computed_coefficients(grouping, similarity, tmp_path):
    model = copies_model()
    ctx = ctx_for(model, IDS, tmp_path)
    for merge in ("max", "uniform", "usage"):
        plan = make_plan("merge", ctx, {"keep": 4, "grouping": grouping, "similarity": similarity, "merge": merge})
        lp = plan.layers[0]
        assert lp.groups == [list(p) for p in PAIRS], (grouping, merge)
        want = expected_coefficients(merge)
        for got_c, want_c in zip(lp.coefficients, want, strict=True):
            assert got_c == pytest.approx(want_c, abs=1e-6), (grouping, merge)
    assert expected_coefficients("usage")[0] == pytest.approx([21 / 31, 10 / 31])  # by hand: usage 21 and 10


@pytest.mark.parametrize("merge_router", [True, False])
def test_router_rows_are_merged_with_the_coefficients_or_taken_from_the_leading_member(merge_router, tmp_path):
    model = copies_model()
    W = model.layers[0].router_weight.detach().clone()
    ctx = ctx_for(model, IDS, tmp_path)
    plan = make_plan("merge", ctx, {"keep": 4, "grouping": "greedy", "merge": "usage", "merge_router": merge_router})
    assert plan.layers[0].merge_router is merge_router
    pruned = apply(copies_model(), plan)
    got = pruned.layers[0].router_weight.detach()
    for j, ((a, b), (ca, cb)) in enumerate(zip(PAIRS, expected_coefficients("usage"), strict=True)):
        want = ca * W[a] + cb * W[b] if merge_router else W[a if ca >= cb else b]
        torch.testing.assert_close(got[j], want, rtol=1e-6, atol=1e-6)
        # the merged expert is the copy itself: Σc = 1 over identical weights
        torch.testing.assert_close(pruned.layers[0].experts.down_proj[j], model.layers[0].experts.down_proj[a])


def test_learned_coefficients_of_exact_copies_stay_equal_and_beat_uniform(tmp_path):
    """Without router merging the loss depends on a copy pair's coefficients only through their
    sum, so both get the same gradient and the same SGD steps from the uniform start (α stays
    uniform, λ moves: the experts' coefficients λα stay equal and leave 0.5)."""
    model = copies_model()
    ctx = ctx_for(model, IDS, tmp_path)
    plan = make_plan("merge", ctx, {"keep": 4, "grouping": "greedy", "merge": "learned", "merge_router": False,
                                    "epochs": 10, "lr": 0.01})
    info = plan.provenance["learned"]["0"]
    coeffs = plan.layers[0].coefficients
    assert info["kept"] and info["held_loss_end"] < info["held_loss_start"]
    assert all(c[0] == c[1] for c in coeffs) and any(abs(c[0] - 0.5) > 1e-3 for c in coeffs)
    # independently: the learned merge reproduces the layer better than the uniform one on every token
    x = moe_input(model, IDS)
    with torch.no_grad():
        full = model.layers[0].block(x[None])
    errors = {}
    for name, p in (("learned", plan), ("uniform", make_plan("merge", ctx, {"keep": 4, "grouping": "greedy",
                                                                         "merge": "uniform", "merge_router": False}))):
        merged = apply(copies_model(), p)
        with torch.no_grad():
            errors[name] = float((merged.layers[0].block(x[None]) - full).pow(2).mean())
    assert errors["learned"] < errors["uniform"]


FOLLOW = {1: 0, 3: 6, 5: 2, 7: 4}  # follower → leader whose router row it copies minus a constant
LEADER_RANKS = [[2, 0, 6, 4], [0, 6, 4, 2], [6, 4, 0, 2], [4, 2, 6, 0], [6, 2, 4, 0]]


def test_router_guided_groups_followers_with_the_leader_of_identical_logits(tmp_path):
    columns = []
    for ranks, (_, _, gap) in zip(LEADER_RANKS, CLASSES, strict=True):
        z = [0.0] * 8
        for i, e in enumerate(ranks):
            z[e] = 2.0 if i == 0 else 2.0 - gap - 0.4 * (i - 1)
        for f, lead in FOLLOW.items():
            z[f] = z[lead] - 3.0  # never selected; centred logits identical to its leader's
        columns.append(z)
    model = controlled(columns)
    ctx = ctx_for(model, IDS, tmp_path)
    plan = make_plan("router-guided", ctx, {"keep": 4})
    assert plan.layers[0].groups == [[0, 1], [2, 5], [4, 7], [6, 3]]
    assert plan.layers[0].coefficients == [[1.0, 0.0]] * 4  # usage-weighted: followers are never used
    uniform = make_plan("router-guided", ctx, {"keep": 4, "merge": "uniform"})
    assert uniform.layers[0].coefficients == [[0.5, 0.5]] * 4


# ---------------------------------------------------------------- manual, skip, lottery


def test_manual_plans_are_exactly_what_was_given(table_model, tmp_path):
    ctx = ctx_for(table_model, IDS, tmp_path)
    assert kept(make_plan("manual", ctx, {"drop": {"0": [1, 6]}})) == [0, 2, 3, 4, 5, 7]
    plan = make_plan("manual", ctx, {"groups": {"0": [[0, 3], [1], [2, 6], [4, 5, 7]]},
                                     "coefficients": {"0": [[0.7, 0.3], [1.0], [0.5, 0.5], [0.2, 0.3, 0.5]]},
                                     "merge_router": False})
    lp = plan.layers[0]
    assert lp.groups == [[0, 3], [1], [2, 6], [4, 5, 7]] and lp.coefficients[3] == [0.2, 0.3, 0.5]
    assert lp.merge_router is False


def test_skip_beta_is_the_median_second_to_first_weight_of_the_table(table_model, tmp_path):
    # top-2 renormalised: w₂/w₁ = exp(κ·(z₂ − z₁)) = exp(−κ·gap) for every token of a class
    ratios = sorted(r for n, _, gap in CLASSES for r in [math.exp(-KAPPA * gap)] * n)
    lower_median = ratios[(len(ratios) - 1) // 2]
    assert lower_median == pytest.approx(math.exp(-KAPPA * 0.15))  # 10 + 8 tokens below, class 4 spans 19..33
    ctx = ctx_for(table_model, IDS, tmp_path)
    assert make_plan("skip", ctx, {}).skip_beta[0] == pytest.approx(lower_median, rel=1e-5)
    both = make_plan("frequency", ctx, {"keep": 4, "with_skip": True})
    # with pruning, β is the pruned model's median (the authors' dynamic_skipping.py runs on the model it
    # is given): among {0, 2, 4, 7} the classes' first two are 0.10, 1.0, 0.8, 0.05, 0.95 apart (13, 8, 10,
    # 18, 15 tokens); the 32nd and 33rd of the 64 ratios both fall in the 0.8 class
    assert kept(both) == [0, 2, 4, 7] and both.skip_beta[0] == pytest.approx(math.exp(-KAPPA * 0.8), rel=1e-5)


@pytest.mark.slow  # four rounds of (no-op) finetuning
def test_lottery_without_learning_equals_iterative_dropping(table_model, tmp_path):
    """With lr 0 the finetunes change nothing, so the lottery's rounds are the iterative EUF drops."""

    batch = TokenBatch(input_ids=IDS, domains=("s",) * 4, source="s", fingerprint="lottery")
    before = table_model.layers[0].experts.down_proj.detach().clone()
    cache = Cache(tmp_path / "c")
    ctx = StrategyContext(model=table_model, calib=batch, cache=cache,
                          analysis_params=AnalysisParams(metrics=("routing",)))
    plan = make_plan("lottery", ctx, {"keep": 4, "criterion": "EUF", "order": "min", "start_tokens": 64, "lr": 0.0,
                                        "batch": 4})
    assert kept(plan) == iterative_min_usage(CLASSES, 4) == [2, 4, 5, 7]
    assert [r["tokens"] for r in plan.provenance["rounds"]] == [64, 128, 256, 512]
    assert torch.equal(table_model.layers[0].experts.down_proj.detach(), before)  # the caller's model is untouched
    apply(table_model, plan, cache=cache)  # the finetuned (here: unchanged) weights come from the cache
    assert torch.equal(table_model.layers[0].experts.down_proj.detach(), before[[2, 4, 5, 7]])
