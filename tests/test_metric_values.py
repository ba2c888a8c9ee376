"""Every similarity, routing statistic and criterion checked by value against a second, naive
implementation written here from the formula (or a case small enough to do by hand).

The naive side never calls ``moescope.analysis.measure.metrics``: expert outputs come from the fused
tensors and the router weight directly (and are first checked against the transformers block
itself), Gram matrices are built token × token, medians come from :mod:`statistics`, standard
deviations and stable ranks from numpy, rank correlations from scipy, gradients from a plain
autograd pass over the whole batch.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moescope.analysis.core.cache import Cache
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure.analyze import AnalysisParams, AnalysisResult, analyze_layer, gradient_criteria
from moescope.analysis.measure.explore import (
    RoutingTrace,
    criterion_grid_correlation,
    skip_ratios,
    spearman,
    top_pairs,
)
from moescope.analysis.measure.sensitivity import DropGrid
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from scipy.stats import spearmanr

T = 91  # tokens: odd, and T(T-1)/2 is odd too, so every median below is a single middle value


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- naive references


def centering(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) - 1.0 / n


def naive_linear_cka(X, Y) -> float:
    """HSIC with linear token × token Grams: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))."""
    H = centering(X.shape[0])
    K = H @ (X.double() @ X.double().T) @ H
    L = H @ (Y.double() @ Y.double().T) @ H
    return float((K * L).sum() / ((K * K).sum() * (L * L).sum()).sqrt())


def naive_rbf_gram(Z) -> torch.Tensor:
    """exp(-‖z_s − z_t‖² / (2σ²)), σ = median distance over the distinct token pairs (the rule the
    code documents), then centred: H K H."""
    Z = Z.double()
    n = Z.shape[0]
    D2 = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    s, t = torch.triu_indices(n, n, offset=1)
    sigma = statistics.median(D2[s, t].sqrt().tolist())
    H = centering(n)
    return H @ torch.exp(-D2 / (2 * sigma**2)) @ H


def naive_rbf_cka(X, Y) -> float:
    return gram_cka(naive_rbf_gram(X), naive_rbf_gram(Y))


def gram_cka(K, L) -> float:
    return float((K * L).sum() / ((K * K).sum() * (L * L).sum()).sqrt())


def cos(a, b) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def token_cos(A, B) -> float:
    """Mean over tokens (rows) of the cosine between A[t] and B[t]."""
    A, B = A.double(), B.double()
    return float(((A * B).sum(-1) / (A.norm(dim=-1) * B.norm(dim=-1))).mean())


def np_std(A) -> np.ndarray:
    return np.std(np.asarray(A, dtype=np.float64), axis=0, ddof=1)


def np_outliers(A) -> float:
    A = np.asarray(A, dtype=np.float64)
    mu, sd = A.mean(0), np.std(A, axis=0, ddof=1)
    return float((np.abs(A - mu) > 3 * sd).mean())


def np_stable_rank(W) -> float:
    s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
    return float((s**2).sum() / s.max() ** 2)


def mean_offdiag(S: list[list[float]], e: int) -> float:
    return sum(S[e][f] for f in range(len(S)) if f != e) / (len(S) - 1)


# ---------------------------------------------------------------- similarity functions


def nonlinear_pair(n=T, seed=0):
    X = rand(n, 6, seed=seed)
    Z = X**2 + 0.1 * rand(n, 6, seed=seed + 1)  # related, but not linearly
    return X, Z


def test_rbf_cka_equals_a_naive_hsic_with_a_median_bandwidth_and_differs_from_linear():
    X, Z = nonlinear_pair()
    want = naive_rbf_cka(X, Z)
    got = M.rbf_cka_matrix(torch.stack([X, Z, X]))
    assert got[0, 1].item() == pytest.approx(want, rel=1e-4)
    assert got[1, 0].item() == pytest.approx(want, rel=1e-4)
    assert got[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    # the case is one where the kernel matters: linear CKA is far from RBF CKA here
    lin = naive_linear_cka(X, Z)
    assert want - lin > 0.1
    assert M.linear_cka_matrix(torch.stack([X, Z]))[0, 1].item() == pytest.approx(lin, rel=1e-5)


def test_rbf_cka_bandwidth_is_the_median_distance_not_a_fixed_one():
    # scaling one representation by 10 leaves a median-bandwidth RBF CKA unchanged; a fixed σ would not
    X, Z = nonlinear_pair(seed=4)
    want = naive_rbf_cka(X, Z)
    got = M.rbf_cka_matrix(torch.stack([X, 10 * Z]))[0, 1].item()
    assert got == pytest.approx(want, rel=1e-4)


def test_rbf_cka_minibatch_averages_the_documented_seeded_token_minibatches():
    X, Z = nonlinear_pair(n=200, seed=7)
    b, n_batches, seed = 43, 3, 5  # 43·42/2 is odd: single-valued medians
    g = torch.Generator().manual_seed(seed)
    per_batch = []
    for _ in range(n_batches):
        idx = torch.randperm(200, generator=g)[:b]
        per_batch.append(naive_rbf_cka(X[idx], Z[idx]))
    assert max(per_batch) - min(per_batch) > 1e-3  # the batches really differ
    got = M.rbf_cka_minibatch_matrix(torch.stack([X, Z]), batch_tokens=b, n_batches=n_batches, seed=seed)[0, 1].item()
    assert got == pytest.approx(sum(per_batch) / n_batches, rel=1e-4)


def test_output_cosine_and_mse_against_token_loops():
    Y = torch.stack([rand(7, 5, seed=s) for s in range(3)])
    C, D = M.output_cosine_matrix(Y), M.output_mse_matrix(Y)
    for i in range(3):
        for j in range(3):
            want_c = sum(cos(Y[i, t], Y[j, t]) for t in range(7)) / 7
            want_d = sum(float((Y[i, t, k] - Y[j, t, k]) ** 2) for t in range(7) for k in range(5)) / 35
            assert C[i, j].item() == pytest.approx(want_c, abs=1e-6)
            assert D[i, j].item() == pytest.approx(want_d, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- routing / activation statistics by hand


def test_skip_ratio_median_sorts_each_token_and_needs_two_choices():
    w = torch.tensor([[0.3, 0.6], [0.8, 0.2], [0.1, 0.1], [0.5, 0.4], [0.2, 0.5]])  # unsorted rows
    # ratios small/large: 1/2, 1/4, 1, 4/5, 2/5 -> sorted 1/4, 2/5, 1/2, 4/5, 1 -> median 1/2
    assert M.skip_ratio_median(w) == pytest.approx(0.5)
    # top-3 (Lu et al. App. A.2): the ratio is w_k / Σ w: 0.1, 0.2, 0.2 -> median 0.2
    w3 = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    assert M.skip_ratio_median(w3) == pytest.approx(0.2)
    # an even count: the mean of the two middle ratios, as the authors' np.median (1/4, 1/2 -> 3/8)
    assert M.skip_ratio_median(torch.tensor([[0.8, 0.2], [0.6, 0.3], [0.5, 0.5], [0.9, 0.09]])) == pytest.approx(0.375)
    assert math.isnan(M.skip_ratio_median(torch.ones(4, 1)))


def test_load_balance_entropy_of_an_uneven_usage():
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])
    p = [0.5, 0.25, 0.25]
    assert M.load_balance_entropy(counts) == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))


def test_coactivation_with_three_choices_by_hand():
    idx = torch.tensor([[0, 1, 2], [0, 1, 3], [3, 2, 1]])  # 3 tokens, top-3 of 4 experts
    C = M.coactivation_counts(idx, 4)
    want = [[sum(1 for row in idx.tolist() if i in row and j in row) for j in range(4)] for i in range(4)]
    assert C.tolist() == want
    assert C.tolist() == [[2, 2, 1, 1], [2, 3, 2, 2], [1, 2, 2, 1], [1, 2, 1, 2]]


def test_gaussian_entropy_and_outliers_exactly():
    A = torch.tensor([[0.0, 0.0], [2.0, 6.0]])  # column stds (n-1): √2 and 3√2
    assert M.gaussian_entropy(A) == pytest.approx(math.log(math.sqrt(2)) + math.log(3 * math.sqrt(2)))
    assert math.isnan(M.gaussian_entropy(A[:1]))
    B = torch.zeros(40, 3)
    B[0, 0], B[1, 0] = 50.0, 1.0  # column 0: the 50 lies outside μ ± 3σ, the 1 does not
    B[:, 1] = torch.arange(40.0)  # uniform column: nothing outside ±3σ
    B[5, 2] = -60.0
    assert np_outliers(B) == pytest.approx(2 / 120)
    assert M.outlier_fraction(B) == pytest.approx(2 / 120)


def test_stable_rank_of_a_rotated_rectangular_matrix():
    U, _ = torch.linalg.qr(rand(5, 5, seed=1))
    V, _ = torch.linalg.qr(rand(3, 3, seed=2))
    S = torch.zeros(5, 3)
    S[0, 0], S[1, 1], S[2, 2] = 4.0, 2.0, 1.0
    W = U @ S @ V.T
    assert M.stable_rank(W) == pytest.approx((16 + 4 + 1) / 16, rel=1e-6)
    assert M.stable_rank(W) == pytest.approx(np_stable_rank(W), rel=1e-6)


# ---------------------------------------------------------------- one layer, every metric, against naive


@pytest.fixture(scope="module")
def layer_case():
    """A tiny Mixtral layer, an input with a few large tokens (so activation outliers exist), token
    ids with repeats, ``analyze_layer`` on all of it, and the naive quantities."""
    model = wrap_model(tiny_model("mixtral"))
    view = model.layers[0]
    x = rand(T, 32, seed=11)
    x[::15] *= 6.0
    token_ids = torch.randint(3, 20, (T,), generator=torch.Generator().manual_seed(12))
    params = AnalysisParams(similarity_tokens=T, rbf_batch_tokens=T, rbf_batches=1)
    got = analyze_layer(view, x, token_ids, params)

    E, k = 8, 2
    gu = view.experts.gate_up_proj.detach().double()  # [E, 2I, d]
    down = view.experts.down_proj.detach().double()  # [E, d, I]
    I = down.shape[2]
    Wg, Wu = gu[:, :I], gu[:, I:]
    xd = x.double()
    Y = torch.stack([(F.silu(xd @ Wg[e].T) * (xd @ Wu[e].T)) @ down[e].T for e in range(E)])  # [E, T, d]
    logits = xd @ view.router.weight.detach().double().T
    probs = torch.softmax(logits, -1)
    top_w, top_i = torch.topk(probs, k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)  # Mixtral renormalises
    # the naive experts and router reproduce the transformers block itself
    mixed = torch.stack([sum(top_w[t, j] * Y[top_i[t, j], t] for j in range(k)) for t in range(T)])
    with torch.no_grad():
        block = view.block(x[None])
    block = (block[0] if isinstance(block, tuple) else block).reshape(T, -1)
    assert torch.allclose(mixed.float(), block, atol=1e-5)
    routed = [[t for t in range(T) if e in top_i[t].tolist()] for e in range(E)]
    assert all(routed), "every expert should get tokens in this case"
    vec = torch.stack([torch.cat([Wg[e].reshape(-1), Wu[e].reshape(-1), down[e].reshape(-1)]) for e in range(E)])
    sur = torch.stack([down[e] @ (Wg[e] * Wu[e]) for e in range(E)]).reshape(E, -1)
    naive = dict(Y=Y, logits=logits, top_i=top_i, top_w=top_w, routed=routed, vec=vec, sur=sur,
                 Wg=Wg, Wu=Wu, down=down, router=view.router.weight.detach().double())
    return got, naive, x, token_ids


def _pairwise(f, E=8):
    return [[f(i, j) for j in range(E)] for i in range(E)]


def test_layer_output_similarities_by_value(layer_case):
    got, n, _, _ = layer_case
    Y = n["Y"]
    rbf = [naive_rbf_gram(Y[e]) for e in range(8)]
    want = {
        "cka_linear": _pairwise(lambda i, j: naive_linear_cka(Y[i], Y[j])),
        "cka_rbf": _pairwise(lambda i, j: gram_cka(rbf[i], rbf[j])),
        "cosine": _pairwise(lambda i, j: token_cos(Y[i], Y[j])),
        "mse": _pairwise(lambda i, j: float(((Y[i] - Y[j]) ** 2).mean())),
    }
    for name, W in want.items():
        assert torch.allclose(got.similarity[name].double(), torch.tensor(W, dtype=torch.float64),
                              rtol=1e-4, atol=1e-6), name
    # the kernels give different answers on these experts (so swapping one for the other shows)
    assert (got.similarity["cka_rbf"] - got.similarity["cka_linear"]).abs().max() > 0.02


def test_layer_weight_and_surrogate_similarities_by_value(layer_case):
    got, n, _, _ = layer_case
    V, S = n["vec"], n["sur"]
    want = {
        "weight_cosine": _pairwise(lambda i, j: cos(V[i], V[j])),
        "weight_mse": _pairwise(lambda i, j: float(((V[i] - V[j]) ** 2).mean())),
        "surrogate_cosine": _pairwise(lambda i, j: cos(S[i], S[j])),
        "surrogate_mse": _pairwise(lambda i, j: float(((S[i] - S[j]) ** 2).mean())),
    }
    for name, W in want.items():
        assert torch.allclose(got.similarity[name].double(), torch.tensor(W, dtype=torch.float64),
                              rtol=1e-4, atol=1e-7), name


def test_layer_routing_statistics_by_value(layer_case):
    got, n, _, token_ids = layer_case
    top_i, top_w, logits = n["top_i"].tolist(), n["top_w"], n["logits"]
    counts = [sum(row.count(e) for row in top_i) for e in range(8)]
    assert got.routing["usage_count"].tolist() == counts
    assert got.routing["usage"].tolist() == pytest.approx([c / T for c in counts])
    co = [[sum(1 for row in top_i if i in row and j in row) for j in range(8)] for i in range(8)]
    assert got.routing["coactivation"].tolist() == co
    vocab = [len({int(token_ids[t]) for t in n["routed"][e]}) for e in range(8)]
    assert got.routing["vocab_coverage"].tolist() == vocab
    assert torch.allclose(got.routing["mean_logit"].double(), logits.mean(0), atol=1e-6)
    # MC-SMoE's router-guided similarity: cosine of the raw logit columns; centred: its own name
    assert torch.allclose(got.routing["logit_similarity"].double(),
                          torch.tensor(_pairwise(lambda i, j: cos(logits[:, i], logits[:, j])), dtype=torch.float64),
                          atol=1e-5)
    Lc = logits - logits.mean(0)
    assert torch.allclose(got.routing["logit_correlation"].double(),
                          torch.tensor(_pairwise(lambda i, j: cos(Lc[:, i], Lc[:, j])), dtype=torch.float64), atol=1e-5)
    ratios = [float(min(r) / max(r)) for r in top_w.tolist()]
    assert got.scalars["beta"] == pytest.approx(statistics.median(ratios), rel=1e-5)
    p = [c / sum(counts) for c in counts if c]
    assert got.scalars["balance_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(8))


def test_layer_criteria_by_value(layer_case):
    got, n, x, token_ids = layer_case
    Y, routed, top_i, top_w = n["Y"], n["routed"], n["top_i"].tolist(), n["top_w"].tolist()
    Wg, Wu, down, V = n["Wg"], n["Wu"], n["down"], n["vec"]
    distinct = len(set(token_ids.tolist()))
    want = {name: [] for name in ("EWS", "RWN", "WSR", "EWN", "EUF", "ECC-rowsum", "EVC", "ETS-cosine",
                                  "EAS", "EAS-output", "EAE", "EAO", "EAO-frac", "EAN", "EAN-mean", "REAP")}
    # each expert's mean unit-normalised routed output, for eq. 11's mean cosine over all pairs
    unit = {e: (Y[e, routed[e]].double() / Y[e, routed[e]].double().norm(dim=-1, keepdim=True)) for e in range(8)}
    for e in range(8):
        toks = routed[e]
        ye = Y[e, toks]  # its outputs on its routed tokens
        gate_w = [top_w[t][top_i[t].index(e)] for t in toks]
        want["EWS"].append(sum(cos(V[e], V[f]) for f in range(8) if f != e) / 7)
        want["RWN"].append(float(n["router"][e].norm()))
        want["WSR"].append((np_stable_rank(Wg[e]) + np_stable_rank(Wu[e]) + np_stable_rank(down[e])) / 3)
        want["EWN"].append(float(V[e].norm()))
        want["EUF"].append(len(toks) / T)
        want["ECC-rowsum"].append(sum(len(top_i[t]) - 1 for t in toks) / T)  # partners it was chosen with, per token
        want["EVC"].append(len({int(token_ids[t]) for t in toks}) / distinct)
        xs = x[toks].double()
        xs = xs / xs.norm(dim=-1, keepdim=True)
        m = len(toks)
        want["ETS-cosine"].append(float(((xs @ xs.T).sum() - m) / (m * (m - 1))))  # mean over pairs a ≠ b
        # eq. 11: Σ_{q≠p} mean over (a_m, a_n) ∈ A_p × A_q of cos(a_m, a_n), every pair written out
        want["EAS"].append(sum(float((unit[e] @ unit[f].T).mean()) for f in range(8) if f != e))
        want["EAS-output"].append(sum(token_cos(Y[e], Y[f]) for f in range(8) if f != e) / 7)
        want["EAE"].append(float(np.log(np_std(ye)).sum()))
        want["EAO"].append(np_outliers(ye) * ye.numel())  # a count (§2.4 ③), not a fraction
        want["EAO-frac"].append(np_outliers(ye))
        want["EAN"].append(sum(float(ye[:, j].norm()) for j in range(ye.shape[1])))  # eq. 13
        want["EAN-mean"].append(float(ye.norm(dim=-1).mean()))
        want["REAP"].append(statistics.mean(g * float(ye[i].norm()) for i, g in enumerate(gate_w)))
    assert any(v > 0 for v in want["EAO"]), "the case should have activation outliers"
    assert set(got.criteria) == set(want) | {"ECC", "ETS"}
    for name, values in want.items():
        assert got.criteria[name].tolist() == pytest.approx(values, rel=2e-4, abs=1e-6), name
    # the pair criteria: eq. 8 co-selection counts and eq. 10 shared distinct token ids
    co = [[sum(1 for row in top_i if p in row and q in row) for q in range(8)] for p in range(8)]
    ids = {e: {int(token_ids[t]) for t in routed[e]} for e in range(8)}
    assert got.pairs["ECC"].tolist() == co
    assert got.pairs["ETS"].tolist() == [[len(ids[p] & ids[q]) for q in range(8)] for p in range(8)]


def test_an_expert_nobody_routes_to_has_no_activation_criteria():
    model = wrap_model(tiny_model("mixtral"))
    view = model.layers[0]
    with torch.no_grad():
        view.router.weight[5] = -100 * view.router.weight[5].abs().sum()  # never chosen
    x = rand(T, 32, seed=11).abs()  # keeps the -100·‖w‖₁ logit hugely negative
    got = analyze_layer(view, x, torch.arange(T), AnalysisParams(metrics=("routing", "activations")))
    assert got.criteria["EUF"][5] == 0 and got.criteria["EVC"][5] == 0 and got.criteria["ECC-rowsum"][5] == 0
    assert not got.pairs["ECC"][5].any() and not got.pairs["ETS"][5].any()  # in no pair, shares no token
    for name in ("EAN", "EAN-mean", "REAP", "EAE", "EAO", "EAO-frac", "ETS-cosine", "EAS"):
        assert math.isnan(got.criteria[name][5].item()), name
        assert not math.isnan(got.criteria[name][4].item()), name


# ---------------------------------------------------------------- gradient criteria


def test_gradient_criteria_by_value_against_one_autograd_pass():
    model = wrap_model(tiny_model("mixtral"))
    hf = model.hf
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(3))
    got = gradient_criteria(model, ids, chunk_size=1)  # four chunks, accumulated

    # naive: the mean next-token cross-entropy over the whole batch, one backward pass
    params = [p for l in model.layers.values() for p in (l.experts.gate_up_proj, l.experts.down_proj)]
    for p in hf.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    logits = hf(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    assert sorted(got) == model.moe_layers
    for n_layer, l in enumerate(model.moe_layers):
        g_gu, g_down = grads[2 * n_layer].double(), grads[2 * n_layer + 1].double()
        I = g_down.shape[2]
        vecs = [torch.cat([g_gu[e, :I].reshape(-1), g_gu[e, I:].reshape(-1), g_down[e].reshape(-1)]) for e in range(8)]
        want = {
            "EGN": [float(v.norm()) for v in vecs],
            "EGS": [sum(cos(vecs[e], vecs[f]) for f in range(8) if f != e) / 7 for e in range(8)],
            # W_down's gradient [d, I]: per hidden dimension d, its deviation over the I neurons
            "EGE": [float(np.log(np_std(g_down[e].T)).sum()) for e in range(8)],
            "EGO": [np_outliers(v[:, None]) for v in vecs],
        }
        assert any(v > 0 for v in want["EGO"])
        for name, values in want.items():
            assert got[l][name].tolist() == pytest.approx(values, rel=1e-3, abs=1e-7), (l, name)
    assert all(p.grad is None for p in params)  # the pass leaves no gradients behind


# ---------------------------------------------------------------- explore: skipping, ranks, pairs


def _stored(cache: Cache, kind: str, tensors: dict, layers: dict) -> object:
    return cache.put(kind, {"case": kind, "n": len(tensors)}, tensors=tensors, meta={"layers": layers})


def test_skip_ratios_by_the_rule_on_hand_weights(tmp_path):
    w0 = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.4, 0.6]])  # top-2
    w1 = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.8, 0.15, 0.05]])  # top-3
    entry = _stored(Cache(tmp_path), "routing", {
        "input_ids": torch.zeros(1, 4, dtype=torch.int64),
        "L0.topk_idx": torch.tensor([[0, 1]] * 4, dtype=torch.int32), "L0.topk_weights": w0,
        "L1.topk_idx": torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32), "L1.topk_weights": w1,
    }, {"0": {"num_experts": 2, "top_k": 2}, "1": {"num_experts": 3, "top_k": 3}})
    got = skip_ratios(RoutingTrace(entry), {0: 0.5, 1: 0.5})
    # top-2 (Lu et al. §3.3), β = ½: skip the second when w₂ < ½ w₁: tokens 0 (0.3 < 0.35) and 2 (0.1 < 0.45)
    assert got[0] == {"beta": 0.5, "tokens": 0.5, "calls": 2 / 8}
    # top-3 (App. A.2): keep the fewest leading i with Σ_{m>i} w ≤ ½ Σ_{m≤3} w (= ½ here).
    #   token 0: i=1: 0.4 ≤ 0.5 -> skips 2.  token 1: i=1: 0.6 > 0.5; i=2: 0.25 ≤ 0.5 -> skips 1.
    #   token 2: i=1: 0.2 ≤ 0.5 -> skips 2.
    assert got[1] == {"beta": 0.5, "tokens": 1.0, "calls": pytest.approx(5 / 9)}


def test_spearman_matches_scipy_with_ties_and_missing_values():
    a = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, float("nan"), 5.0]
    b = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0, float("inf")]
    ok = [i for i in range(10) if math.isfinite(a[i]) and math.isfinite(b[i])]
    want = spearmanr([a[i] for i in ok], [b[i] for i in ok]).statistic
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1, 2], [2, 1]))


def test_criterion_grid_correlation_is_spearman_with_the_perplexity_increase(tmp_path):
    crit = {0: [0.1, 0.4, 0.2, 0.9, 0.3], 2: [5.0, 1.0, 3.0, 2.0, 4.0]}
    ppl = {0: [10.5, 11.0, 10.2, 14.0, 10.9], 2: [10.1, 12.0, 10.3, 10.2, 11.0]}
    entry = _stored(Cache(tmp_path), "analysis",
                    {f"L{l}.crit.EAN": torch.tensor(v) for l, v in crit.items()},
                    {str(l): {"num_experts": 5, "top_k": 2, "scalars": {}, "timings": {}} for l in crit})
    grid = DropGrid(baseline=10.0, layers=[0, 2], ppl=[ppl[0], ppl[2]])
    got = criterion_grid_correlation(AnalysisResult(entry), grid, "EAN")
    assert sorted(got) == [0, 2]
    for l in crit:
        assert got[l] == pytest.approx(spearmanr(crit[l], [p - 10.0 for p in ppl[l]]).statistic, abs=1e-6)
    assert got[0] == pytest.approx(0.9)  # ranks 1 4 2 5 3 vs 2 4 1 5 3: 1 - 6·2/(5·24)


def test_top_pairs_orders_distinct_pairs_and_skips_nan():
    S = torch.tensor([[1.0, 0.3, float("nan"), 0.8],
                      [0.3, 1.0, 0.95, 0.1],
                      [float("nan"), 0.95, 1.0, 0.5],
                      [0.8, 0.1, 0.5, 1.0]])
    pairs = top_pairs(S, 4)
    assert [p["experts"] for p in pairs] == [(1, 2), (0, 3), (2, 3), (0, 1)]
    assert [p["value"] for p in pairs] == pytest.approx([0.95, 0.8, 0.5, 0.3])
    assert [p["experts"] for p in top_pairs(S, 2, higher_is_similar=False)] == [(1, 3), (0, 1)]
