"""The forms that make the analysis scale give the same numbers as the plain ones.

Linear CKA in the Gram form equals the feature form; token, column and row chunking (forced here
with a working set of a few hundred bytes) changes no similarity; the surrogate-weight Gram built a
block of rows at a time equals the Gram of the materialised surrogates; bfloat16 expert outputs
give the matrices of their float32 upcast; the Lanczos spectral norm equals the full SVD's.
"""

from __future__ import annotations

import pytest
import torch
from moescope.analysis.measure import metrics as M
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def outputs():
    # 6 experts, 37 tokens, 11 dims; experts 1 and 4 are linear maps of expert 0 so that some
    # similarities are far from zero, and every expert has a non-zero mean over tokens
    Y = rand(6, 37, 11) + rand(6, 1, 11, seed=1)
    Y[1] = Y[0] @ rand(11, 11, seed=2)
    Y[4] = 3 * Y[0] + 0.1 * rand(37, 11, seed=3)
    return Y


def test_linear_cka_gram_form_equals_feature_form(outputs):
    feature = M.linear_cka_matrix(outputs, form="feature")
    gram = M.linear_cka_matrix(outputs, form="gram")
    torch.testing.assert_close(gram, feature, atol=2e-6, rtol=0)
    assert feature[0, 4].item() > 0.99 and feature.diagonal().sub(1).abs().max().item() < 1e-6


@pytest.mark.parametrize("work_bytes", [1, 600, 6 * 37 * 4 * 5])
def test_chunking_changes_no_output_similarity(outputs, work_bytes):
    torch.testing.assert_close(M.linear_cka_matrix(outputs, form="gram", work_bytes=work_bytes),
                               M.linear_cka_matrix(outputs, form="feature"), atol=2e-6, rtol=0)
    torch.testing.assert_close(M.output_cosine_matrix(outputs, work_bytes=work_bytes),
                               M.output_cosine_matrix(outputs, work_bytes=2**30), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.output_mse_matrix(outputs, work_bytes=work_bytes),
                               M.output_mse_matrix(outputs, work_bytes=2**30), atol=1e-5, rtol=1e-6)


def test_auto_form_picks_the_cheaper_one():
    assert M.linear_cka_cost(128, 1024, 2048)["gram"] < M.linear_cka_cost(128, 1024, 2048)["feature"]
    assert M.linear_cka_cost(2, 4096, 4)["feature"] < M.linear_cka_cost(2, 4096, 4)["gram"]
    Y = rand(2, 300, 3)  # few dims, many tokens: the feature form, same value either way
    torch.testing.assert_close(M.linear_cka_matrix(Y), M.linear_cka_matrix(Y, form="gram"), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="auto, gram or feature"):
        M.linear_cka_matrix(Y, form="fast")


def test_bfloat16_outputs_give_the_matrices_of_their_upcast(outputs):
    Yb = outputs.bfloat16()
    Yf = Yb.float()
    for fn in (M.linear_cka_matrix, M.output_cosine_matrix, M.output_mse_matrix):
        torch.testing.assert_close(fn(Yb), fn(Yf), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(M.rbf_cka_matrix(Yb), M.rbf_cka_matrix(Yf))
    torch.testing.assert_close(M.rbf_cka_minibatch_matrix(Yb, batch_tokens=16),
                               M.rbf_cka_minibatch_matrix(Yf, batch_tokens=16))


def _rbf_gram(X):
    """The plain RBF kernel of one expert's tokens, σ the median pairwise distance (the reference)."""
    d2 = torch.cdist(X, X).pow(2)
    sigma2 = d2[~torch.eye(X.shape[0], dtype=torch.bool)].sqrt().median().pow(2).clamp_min(1e-12)
    return torch.exp(-d2 / (2 * sigma2))


def _center_gram(K):
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def test_rbf_cka_minibatch_batched_inner_products_equal_the_pair_loop(outputs):
    got = M.rbf_cka_minibatch_matrix(outputs, batch_tokens=20, n_batches=3, seed=5)
    g = torch.Generator().manual_seed(5)
    want = torch.zeros(6, 6, dtype=torch.float64)
    for _ in range(3):
        idx = torch.randperm(37, generator=g)[:20]
        K = [_center_gram(_rbf_gram(outputs[e, idx])).double() for e in range(6)]
        h = torch.tensor([[float((K[i] * K[j]).sum()) for j in range(6)] for i in range(6)], dtype=torch.float64)
        want += h / torch.outer(h.diagonal().sqrt(), h.diagonal().sqrt())
    torch.testing.assert_close(got, (want / 3).float(), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def layer():
    model = wrap_model(tiny_model("qwen3_moe", num_experts=5, hidden_size=24, moe_intermediate_size=12, seed=3))
    return model.layers[model.moe_layers[0]]


def test_surrogate_gram_equals_the_materialised_surrogates(layer):
    S = M.surrogate_weights(layer).reshape(layer.num_experts, -1).double()
    want = S @ S.T
    for work_bytes in (1, 5 * 24 * 4 * 7, 2**30):
        G, n = M.surrogate_gram(layer, work_bytes=work_bytes)
        assert n == 24 * 24
        torch.testing.assert_close(G, want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(M.gram_cosine(G), M.flat_cosine_matrix(S), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.gram_mse(G, n), M.flat_mse_matrix(S), atol=1e-7, rtol=1e-5)


def test_weight_gram_in_column_chunks_equals_one_product(layer):
    E = layer.num_experts
    V = torch.cat([layer.experts.gate_up_proj.detach().reshape(E, -1),
                   layer.experts.down_proj.detach().reshape(E, -1)], 1).double()
    for work_bytes in (1, 4 * E * 13, 2**30):
        G, n = M.weight_gram(layer, work_bytes=work_bytes)
        assert n == V.shape[1]
        torch.testing.assert_close(G, V @ V.T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(200, 90), (90, 300), (3, 2)])
def test_batched_stable_ranks_equal_the_full_svd(shape):
    # the Gram + Lanczos form on the smaller side, a chunk of matrices at a time (work_bytes forces
    # chunks of one), against Σσ²/σ₁² of the float64 SVD (MC-Suite eq. 5)
    mats = [rand(*shape, seed=s) for s in range(3)]
    mats[1][:, 0] *= 4
    want = [float((s**2).sum() / s[0] ** 2) for s in (torch.linalg.svdvals(W.double()) for W in mats)]
    for work_bytes in (1, 2**30):
        got = M.stable_ranks(mats, work_bytes=work_bytes)
        assert got.tolist() == pytest.approx(want, rel=2e-6)


@pytest.mark.parametrize("shape", [(200, 90), (90, 300), (3, 2)])
def test_spectral_norm_and_stable_rank_equal_the_full_svd(shape):
    W = rand(*shape, seed=7)
    W[:, 0] *= 4  # a clear top singular value
    s = torch.linalg.svdvals(W.double())
    assert M.spectral_norm(W) == pytest.approx(float(s[0]), rel=1e-6)
    assert M.stable_rank(W) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
    assert M.stable_rank(W.bfloat16()) == pytest.approx(float(M.stable_rank(W.bfloat16().float())), rel=1e-6)


REFERENCES = {
    "cka_linear": lambda Y, b, k, s: M.linear_cka_matrix(Y),
    "cka_rbf": lambda Y, b, k, s: M.rbf_cka_matrix(Y),
    "cka_rbf_minibatch": lambda Y, b, k, s: M.rbf_cka_minibatch_matrix(Y, b, k, seed=s),
    "cosine": lambda Y, b, k, s: M.output_cosine_matrix(Y),
    "mse": lambda Y, b, k, s: M.output_mse_matrix(Y),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("work_bytes,store_bytes", [(1, 0), (2**20, 0), (2**20, 2**30), (2**30, 2**30)])
def test_the_gram_pass_gives_every_output_similarity_of_the_separate_functions(dtype, work_bytes, store_bytes):
    # 5 experts, 150 tokens (tiles of 64 leave a ragged last block), 40 dims; experts 1 and 2 alike,
    # every expert with a mean far from zero (the centring and the RBF shift have work to do).
    # store_bytes 0: tiles built twice and the median found by selection in the pilot interval;
    # 2**30: the distances kept and read back; work_bytes 1: one float copy per block
    from moescope.analysis.measure import gram_pass as GP

    Y = rand(5, 150, 40, seed=4) + 3 * rand(5, 1, 40, seed=5)
    Y[2] = 2 * Y[1] + 0.05 * rand(150, 40, seed=6)
    Y = Y.to(dtype)
    for batch_tokens, n_batches in ((24, 2), (150, 3)):
        got = GP.output_similarities(Y, batch_tokens=batch_tokens, n_batches=n_batches, seed=3,
                                     work_bytes=work_bytes, store_bytes=store_bytes)
        for name, ref in REFERENCES.items():
            want = ref(Y, batch_tokens, n_batches, 3)
            tol = 2e-4 if name == "mse" else 2e-6  # the MSE in Y's units (≈ 20 here), the others on 0..1
            torch.testing.assert_close(got[name], want, atol=tol, rtol=1e-6, msg=name)
        torch.testing.assert_close(got["mean"], Y.double().mean(1).float(), atol=1e-6, rtol=1e-6)
        assert got["cka_rbf_minibatch"][1, 2] > 0.9


def test_an_rbf_median_outside_the_pilot_interval_takes_the_exact_selection(monkeypatch):
    # a pilot interval that holds no distance at all: every expert's median misses it, the counts
    # show it, and the exact all-pairs selection gives the bandwidths
    from moescope.analysis.measure import gram_pass as GP

    Y = rand(3, 90, 16, seed=8) + rand(3, 1, 16, seed=9)
    real = GP._pilot_interval

    def far_away(*args):
        sel = real(*args)
        sel.lo, sel.hi = sel.hi + 1e6, sel.hi + 2e6
        return sel

    monkeypatch.setattr(GP, "_pilot_interval", far_away)
    got = GP.output_similarities(Y, batch_tokens=30, n_batches=2, store_bytes=0)
    torch.testing.assert_close(got["cka_rbf"], M.rbf_cka_matrix(Y), atol=2e-6, rtol=0)


def test_gram_pass_costs_count_the_tiles_once_when_the_distances_are_kept():
    from moescope.analysis.measure import gram_pass as GP

    kept = GP.pass_costs(128, 1024, 2048)
    # cosine and MSE share one per-token product: E² n d once
    assert kept["grams"] == 128 * 1024**2 * 2048 / 2 and kept["token_products"] == 128**2 * 1024 * 2048
    assert GP.pass_costs(128, 1024, 2048, store_bytes=0)["grams"] == 2 * kept["grams"]


def test_spectral_groups_are_repaired_to_the_asked_count():
    from moescope.analysis.model.merging import group_experts

    A = torch.ones(16, 16, dtype=torch.float64)  # no structure: spectral clustering leaves clusters empty
    A[:8, :8] += 0.5
    for r in (2, 5, 8, 12):
        groups = group_experts(A, r, "spectral")
        assert len(groups) == r and sorted(e for g in groups for e in g) == list(range(16))
        assert groups == group_experts(A, r, "spectral")  # deterministic


def test_cluster_order_puts_alike_experts_side_by_side():
    from moescope.analysis.measure.explore import cluster_order

    perm = [5, 0, 7, 2, 4, 1, 6, 3]  # two blocks, {0, 2, 4, 6} and {1, 3, 5, 7}, interleaved
    S = torch.full((8, 8), 0.1)
    for block in ([0, 2, 4, 6], [1, 3, 5, 7]):
        for i in block:
            for j in block:
                S[i, j] = 0.9
    S = S[perm][:, perm]
    order = cluster_order(S)
    assert sorted(order) == list(range(8))
    labels = [perm[e] % 2 for e in order]
    assert labels in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)
    # a distance (higher = less alike) gives the same blocks
    assert [perm[e] % 2 for e in cluster_order(1 - S, higher_is_similar=False)] in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)


@pytest.mark.parametrize("work_bytes", [1, 5 * 11 * 11 * 4 * 2, 2**30])
def test_feature_form_in_expert_blocks_equals_the_pair_loop(outputs, work_bytes):
    Yc = [outputs[e] - outputs[e].mean(0) for e in range(6)]
    pairs = torch.tensor([[float((Yc[i].double().T @ Yc[j].double()).pow(2).sum()) for j in range(6)]
                          for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(M._feature_form_hsic(outputs, work_bytes), pairs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("sample", [1, 7, 65536])
def test_kept_distance_medians_by_selection_equal_the_full_selection(sample):
    # a one-pair probe leaves the interval a point (the median misses it: the full selection);
    # larger probes find it inside; either way the lower median of every row, exactly
    from moescope.analysis.measure import gram_pass as GP

    stored = rand(4, 1001, seed=11).abs()
    want = stored.double().sort(dim=1).values[:, 500]
    torch.testing.assert_close(GP._stored_medians(stored, seed=0, sample=sample), want, atol=0, rtol=0)
