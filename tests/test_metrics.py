"""Every metric against its formula on a case whose value is known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure.analyze import AnalysisParams, analyze_layer
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gram_cka(X, Y):
    """Textbook linear CKA through T×T Gram matrices (the form the library avoids)."""
    T = X.shape[0]
    H = torch.eye(T, dtype=torch.float64) - 1.0 / T
    K, L = H @ (X.double() @ X.double().T) @ H, H @ (Y.double() @ Y.double().T) @ H
    return float((K * L).sum() / ((K * K).sum().sqrt() * (L * L).sum().sqrt()))


def test_identical_experts_have_cka_one_cosine_one_mse_zero():
    y = rand(200, 16)
    Y = torch.stack([y, y, rand(200, 16, seed=1)])
    assert M.linear_cka_matrix(Y)[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert M.rbf_cka_matrix(Y)[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert M.output_cosine_matrix(Y)[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert M.output_mse_matrix(Y)[0, 1].item() == pytest.approx(0.0, abs=1e-5)
    assert M.linear_cka_matrix(Y)[0, 2].item() < 0.5


def test_linear_cka_matches_the_gram_form_and_its_invariances():
    X, Z = rand(120, 10), rand(120, 10, seed=3)
    Z = Z + 0.8 * X  # related, so CKA is well inside (0, 1)
    want = gram_cka(X, Z)
    assert 0.2 < want < 0.99
    assert M.linear_cka_matrix(torch.stack([X, Z]))[0, 1].item() == pytest.approx(want, rel=1e-5)
    Q, _ = torch.linalg.qr(rand(10, 10, seed=5))
    moved = torch.stack([X @ Q * 7.5, Z])  # orthogonal transform and isotropic scaling of X
    assert M.linear_cka_matrix(moved)[0, 1].item() == pytest.approx(want, rel=1e-5)
    # RBF CKA with a median bandwidth is invariant to both as well (distances scale uniformly)
    r1 = M.rbf_cka_matrix(torch.stack([X, Z]))[0, 1]
    r2 = M.rbf_cka_matrix(moved)[0, 1]
    assert r1.item() == pytest.approx(r2.item(), rel=1e-4)


def test_cosine_and_mse_on_a_hand_case():
    Y = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 2 experts, 2 tokens
    # token 0: cos(e0, e1) = 0; token 1: 1 -> mean 0.5
    assert M.output_cosine_matrix(Y)[0, 1].item() == pytest.approx(0.5)
    # squared differences: token 0: 1 + 1, token 1: 0 + 1 -> 3 / (2 tokens × 2 dims)
    assert M.output_mse_matrix(Y)[0, 1].item() == pytest.approx(0.75)
    V = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert M.flat_cosine_matrix(V)[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert M.flat_mse_matrix(V)[0, 1].item() == pytest.approx(0.5)


def test_usage_and_coactivation_three_experts_by_hand():
    # 4 tokens, top-2 over 3 experts
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])
    assert M.usage_counts(idx, 3).tolist() == [3, 3, 2]
    C = M.coactivation_counts(idx, 3)
    assert C.tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    tokens = torch.tensor([5, 5, 7, 9])
    assert M.vocabulary_coverage(idx, tokens, 3).tolist() == [2, 3, 2]  # e0: {5,7}, e1: {5,7,9}, e2: {5,9}
    assert M.load_balance_entropy(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert M.load_balance_entropy(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.0)


def test_skip_ratio_entropy_outliers_stable_rank_pairwise_cosine():
    w = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])  # ratios 2/3, 1/4, 1 -> median 2/3
    assert M.skip_ratio_median(w) == pytest.approx(2 / 3)
    A = torch.stack([rand(20000, seed=1), 2 * rand(20000, seed=2)], dim=1)
    assert M.gaussian_entropy(A) == pytest.approx(math.log(1) + math.log(2), abs=0.02)
    B = torch.zeros(100, 1)
    B[0, 0] = 100.0  # one entry far outside μ ± 3σ of its column
    assert M.outlier_fraction(B) == pytest.approx(0.01)
    assert M.stable_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(10 / 9)
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines 0, 1/√2, 1/√2
    assert M.mean_pairwise_cosine(X) == pytest.approx((0 + 2 / math.sqrt(2)) / 3)
    assert M.mean_offdiag(torch.tensor([[1.0, 2.0], [4.0, 1.0]])).tolist() == [2.0, 4.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_stream_reproduces_the_full_forward(family):
    model = wrap_model(tiny_model(family))
    ids = torch.randint(3, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.hf(input_ids=ids).logits
    stream = LayerStream(model, ids, chunk_size=2)
    captured = [l for l, x in stream.layers() if x is not None]
    assert captured == model.moe_layers
    got = torch.cat(list(stream.logits_per_chunk()))
    assert (got - want).abs().max() <= 1e-5


def test_a_duplicated_expert_is_found_by_every_similarity():
    model = wrap_model(tiny_model("mixtral"))
    layer = model.layers[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[3].copy_(layer.experts.gate_up_proj[5])
        layer.experts.down_proj[3].copy_(layer.experts.down_proj[5])
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    stream = LayerStream(model, ids)
    x = stream.step()
    a = analyze_layer(layer, x, stream.token_ids, AnalysisParams(similarity_tokens=128, rbf_batch_tokens=64))
    for name in ("cka_linear", "cka_rbf", "cosine", "weight_cosine", "surrogate_cosine"):
        S = a.similarity[name]
        assert S[3, 5].item() == pytest.approx(1.0, abs=1e-5), name
        off = S.clone().fill_diagonal_(-1)
        assert off.max().item() == pytest.approx(S[3, 5].item(), abs=1e-6), name  # the most similar pair
    for name in ("mse", "weight_mse", "surrogate_mse"):
        assert a.similarity[name][3, 5].item() == pytest.approx(0.0, abs=1e-7)
    # routing statistics agree with the router's own decisions
    r = layer.route(x)
    assert a.routing["usage_count"].sum().item() == r.topk_idx.numel()
    assert a.criteria["EUF"].sum().item() == pytest.approx(2.0)


def test_weight_gram_equals_the_vectorised_weights():
    from moescope.analysis.model import wrap_model as wrap

    for family in ("mixtral", "gpt_oss"):
        layer = wrap(tiny_model(family)).layers[0]
        V = torch.stack([torch.cat([w.gate.reshape(-1), w.up.reshape(-1), w.down.reshape(-1)]).detach()
                         for w in (layer.expert_weights(e) for e in range(8))]).double()
        G, n = M.weight_gram(layer)
        # GPT-OSS experts also have biases; the weights part is what the Gram covers
        assert n == V.shape[1]
        assert torch.allclose(G, V @ V.T, atol=1e-6 * float(G.diagonal().max()))
        assert torch.allclose(M.gram_cosine(G), M.flat_cosine_matrix(V.float()), atol=1e-5)
        assert torch.allclose(M.gram_mse(G, n), M.flat_mse_matrix(V.float()), atol=1e-6)
