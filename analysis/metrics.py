"""Expert similarity, routing statistics and the MC-Suite criteria, as pure tensor functions.

Shapes: E experts, T tokens, d hidden size, k top-k. ``Y [E, T, d]`` holds every expert's output
on the same T tokens with the router bypassed (the data-centric representation). Each function's
docstring states its formula; ``tests/test_metrics.py`` checks them on hand-computable cases.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METRICS_VERSION = 2

# ---------------------------------------------------------------- similarity of expert outputs


def _centered(Y: Tensor) -> Tensor:
    Y = Y.double() if Y.dtype == torch.float64 else Y.float()
    return Y - Y.mean(dim=1, keepdim=True)


def linear_cka_matrix(Y: Tensor) -> Tensor:
    """Linear CKA between every pair of experts, in the feature-space form (no T×T Gram):

    ``CKA(i, j) = ‖Y_iᶜᵀ Y_jᶜ‖_F² / (‖Y_iᶜᵀ Y_iᶜ‖_F ‖Y_jᶜᵀ Y_jᶜ‖_F)`` with ``Yᶜ`` centred over tokens.
    Invariant to orthogonal transforms and isotropic scaling of either representation.
    """
    Yc = _centered(Y)
    E = Yc.shape[0]
    hsic = torch.zeros(E, E, dtype=torch.float64)
    for i in range(E):
        for j in range(i, E):
            v = (Yc[i].T @ Yc[j]).double().pow(2).sum()
            hsic[i, j] = hsic[j, i] = v
    norms = hsic.diagonal().sqrt()
    cka = hsic / torch.outer(norms, norms).clamp_min(1e-30)
    return cka.float()


def _rbf_gram(X: Tensor) -> Tensor:
    """RBF kernel ``exp(-‖x_s − x_t‖² / (2σ²))`` with σ the median pairwise distance."""
    d2 = torch.cdist(X, X).pow(2)
    off = d2[~torch.eye(X.shape[0], dtype=torch.bool)]
    sigma2 = off.sqrt().median().pow(2).clamp_min(1e-12)
    return torch.exp(-d2 / (2 * sigma2))


def _center_gram(K: Tensor) -> Tensor:
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def rbf_cka_matrix(Y: Tensor, batch_tokens: int = 512, n_batches: int = 4, seed: int = 0) -> Tensor:
    """RBF-kernel CKA, ``HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j))`` with centred Gram
    matrices ``K`` over ``batch_tokens`` tokens (median-distance bandwidth per expert), averaged over
    ``n_batches`` random token mini-batches so that it stays tractable (T×T only per mini-batch)."""
    E, T, _ = Y.shape
    g = torch.Generator().manual_seed(seed)
    b = min(batch_tokens, T)
    total = torch.zeros(E, E, dtype=torch.float64)
    batches = 1 if b == T else n_batches
    for _ in range(batches):
        idx = torch.randperm(T, generator=g)[:b]
        grams = [_center_gram(_rbf_gram(Y[e, idx].float())).double() for e in range(E)]
        hsic = torch.zeros(E, E, dtype=torch.float64)
        for i in range(E):
            for j in range(i, E):
                hsic[i, j] = hsic[j, i] = (grams[i] * grams[j]).sum()
        norms = hsic.diagonal().sqrt()
        total += hsic / torch.outer(norms, norms).clamp_min(1e-30)
    return (total / batches).float()


def output_cosine_matrix(Y: Tensor) -> Tensor:
    """Mean over tokens of the cosine between two experts' outputs on that token."""
    Yn = torch.nn.functional.normalize(Y.float(), dim=-1)
    return torch.einsum("etd,ftd->ef", Yn, Yn) / Y.shape[1]


def output_mse_matrix(Y: Tensor) -> Tensor:
    """``mean_{t,d} (y_i(t) − y_j(t))²``, via the Gram of the flattened outputs."""
    Yf = Y.float().reshape(Y.shape[0], -1)
    G = Yf @ Yf.T
    sq = G.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * G) / Yf.shape[1]).clamp_min(0)


# ---------------------------------------------------------------- model-centric representations


def flat_cosine_matrix(V: Tensor) -> Tensor:
    """Cosine similarity between rows of ``V [E, P]`` (vectorised weights)."""
    Vn = torch.nn.functional.normalize(V.float(), dim=-1)
    return Vn @ Vn.T


def flat_mse_matrix(V: Tensor) -> Tensor:
    """Mean squared difference between rows of ``V [E, P]``."""
    V = V.float()
    G = V @ V.T
    sq = G.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * G) / V.shape[1]).clamp_min(0)


def weight_gram(layer) -> tuple[Tensor, int]:
    """Gram matrix ``G [E, E]`` of the vectorised expert weights concat(W_gate, W_up, W_down),
    and their length P, accumulated tensor by tensor over the fused parameters (no copy of the
    layer's weights is made; the layout, transposed or interleaved, does not change the Gram)."""
    E = layer.num_experts
    G = torch.zeros(E, E, dtype=torch.float64)
    n = 0
    for name in ("gate_up_proj", "down_proj"):
        P = getattr(layer.experts, name).detach().reshape(E, -1)
        P = P if P.dtype == torch.float32 else P.float()
        G += (P @ P.T).double().cpu()
        n += P.shape[1]
    return G, n


def gram_cosine(G: Tensor) -> Tensor:
    norms = G.diagonal().clamp_min(1e-30).sqrt()
    return (G / torch.outer(norms, norms)).float()


def gram_mse(G: Tensor, n: int) -> Tensor:
    sq = G.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * G) / n).clamp_min(0).float()


def surrogate_weights(layer) -> Tensor:
    """``[E, d, d]``: the surrogate weight ``W_down · (W_gate ⊙ W_up)`` of each expert."""
    out = []
    for e in range(layer.num_experts):
        w = layer.expert_weights(e)
        out.append(w.down.float() @ (w.gate.float() * w.up.float()))
    return torch.stack(out)


# ---------------------------------------------------------------- routing statistics


def usage_counts(topk_idx: Tensor, num_experts: int) -> Tensor:
    """Number of tokens routed to each expert (a token counts once per expert it selects)."""
    return torch.bincount(topk_idx.reshape(-1), minlength=num_experts).to(torch.float64)


def coactivation_counts(topk_idx: Tensor, num_experts: int) -> Tensor:
    """``C[i, j]`` = number of tokens that selected both i and j (diagonal: usage counts)."""
    M = torch.zeros(topk_idx.shape[0], num_experts, dtype=torch.float64)
    M.scatter_(1, topk_idx.long(), 1.0)
    return M.T @ M


def vocabulary_coverage(topk_idx: Tensor, token_ids: Tensor, num_experts: int) -> Tensor:
    """Number of distinct token ids routed to each expert."""
    out = torch.zeros(num_experts, dtype=torch.float64)
    for e in range(num_experts):
        tok = (topk_idx == e).any(-1)
        out[e] = torch.unique(token_ids[tok]).numel()
    return out


def mean_pairwise_cosine(X: Tensor) -> float:
    """Mean cosine over distinct pairs of rows: ``(‖Σ x̂‖² − n) / (n(n − 1))``; NaN for n < 2."""
    n = X.shape[0]
    if n < 2:
        return float("nan")
    s = torch.nn.functional.normalize(X.double(), dim=-1).sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def skip_ratio_median(topk_weights: Tensor) -> float:
    """Median over tokens of ``w₂ / w₁`` (second over first largest routing weight): the β of
    dynamic skipping for top-2 routing (Lu et al.)."""
    w = topk_weights.float().sort(dim=-1, descending=True).values
    if w.shape[1] < 2:
        return float("nan")
    return float((w[:, 1] / w[:, 0].clamp_min(1e-30)).median())


def load_balance_entropy(counts: Tensor) -> float:
    """Entropy of the usage distribution divided by ``log E`` (1 = perfectly balanced)."""
    p = counts.double() / counts.sum().clamp_min(1e-30)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(len(counts)))


# ---------------------------------------------------------------- activation / gradient statistics


def gaussian_entropy(A: Tensor) -> float:
    """``Σ_j log σ_j`` over the columns (hidden dimensions) of ``A [n, d]``: the differential
    entropy of a Gaussian with those per-dimension deviations, up to an additive constant."""
    if A.shape[0] < 2:
        return float("nan")
    return float(A.double().std(dim=0).clamp_min(1e-30).log().sum())


def outlier_fraction(A: Tensor) -> float:
    """Fraction of entries of ``A [n, d]`` outside ``μ_j ± 3σ_j`` of their column j."""
    if A.shape[0] < 2:
        return float("nan")
    A = A.double()
    mu, sd = A.mean(0), A.std(0)
    return float(((A - mu).abs() > 3 * sd).double().mean())


def mean_offdiag(S: Tensor) -> Tensor:
    """Row means of a square matrix without its diagonal."""
    E = S.shape[0]
    mask = ~torch.eye(E, dtype=torch.bool)
    return (S * mask).sum(1) / max(E - 1, 1)


def stable_rank(W: Tensor) -> float:
    """``Σ σ_i² / σ_1² = ‖W‖_F² / ‖W‖_2²``."""
    s = torch.linalg.svdvals(W.double())
    return float((s**2).sum() / (s[0] ** 2).clamp_min(1e-30))

