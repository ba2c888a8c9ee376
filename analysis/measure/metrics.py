"""Expert similarity, routing statistics and the MC-Suite criteria, as pure tensor functions.

Shapes: E experts, T tokens, d hidden size, k top-k. ``Y [E, T, d]`` holds every expert's output
on the same T tokens with the router bypassed (the data-centric representation). Each function's
docstring states its formula; ``tests/test_metrics.py`` checks them on hand-computable cases.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

METRICS_VERSION = 3  # 3: MC-Suite criteria as published (EAN eq. 13, EAO count, EAS eq. 11, ECC/ETS pairs), raw
#   router-logit cosine, full-batch RBF CKA, mean-output distances

# ---------------------------------------------------------------- similarity of expert outputs
#
# ``Y [E, n, d]`` may be in the model's dtype (bfloat16 expert outputs are exact in bfloat16, so
# keeping them there halves the memory); every function below converts one chunk at a time to
# float32 (float64 when Y is float64) and accumulates in float64, so the working set stays below
# ``work_bytes`` whatever E, n and d are.

WORK_BYTES = 256 * 2**20  # working set of one chunk of the similarity computations


def _acc_dtype(Y: Tensor) -> torch.dtype:
    return torch.float64 if Y.dtype == torch.float64 else torch.float32


def _rows_per_chunk(row_bytes: int, total: int, work_bytes: int = WORK_BYTES) -> int:
    """How many rows of ``row_bytes`` each fit in ``work_bytes`` (at least 1, at most ``total``)."""
    return max(1, min(total, work_bytes // max(row_bytes, 1)))


def _gram_of_chunks(chunks) -> Tensor:
    """``Σ_c F_c F_cᵀ`` in float64 over chunks ``F_c [E, ...]`` (each flattened to ``[E, -1]``): the
    Gram of the concatenated rows, with only one chunk alive at a time. Returned on the CPU."""
    G = None
    for F in chunks:
        F = F.reshape(F.shape[0], -1)
        part = (F @ F.T).double().cpu()
        G = part if G is None else G.add_(part)
    return G


def _centered(Y: Tensor) -> Tensor:
    Y = Y.to(_acc_dtype(Y))
    return Y - Y.mean(dim=-2, keepdim=True)


def linear_cka_cost(E: int, n: int, d: int) -> dict[str, float]:
    """Multiply-adds of the two exact forms of :func:`linear_cka_matrix`: the Gram form builds one
    n×n Gram per expert (``E n² d``) and takes their inner products (``E² n² / 2``); the feature form
    takes one d×d cross-covariance per expert pair (``E² n d² / 2``)."""
    return {"gram": E * n * n * d + E * E * n * n / 2, "feature": E * E * n * d * d / 2}


def linear_cka_matrix(Y: Tensor, form: str = "auto", work_bytes: int = WORK_BYTES) -> Tensor:
    """Linear CKA between every pair of experts:

    ``CKA(i, j) = ‖Y_iᶜᵀ Y_jᶜ‖_F² / (‖Y_iᶜᵀ Y_iᶜ‖_F ‖Y_jᶜᵀ Y_jᶜ‖_F)`` with ``Yᶜ`` centred over tokens.
    Invariant to orthogonal transforms and isotropic scaling of either representation.

    Two exact forms give the same matrix: ``form="feature"`` (one d×d product per expert pair) and
    ``form="gram"`` (``‖Y_iᶜᵀ Y_jᶜ‖_F² = ⟨K_i, K_j⟩_F`` with ``K = Yᶜ Yᶜᵀ`` the n×n token Gram, built
    in blocks of token rows so that only ``work_bytes`` of Gram rows are alive). ``"auto"`` picks the
    one with fewer multiply-adds (:func:`linear_cka_cost`): the Gram form whenever ``2n < E d``,
    i.e. for every real model.
    """
    E, n, d = Y.shape
    if form == "auto":
        cost = linear_cka_cost(E, n, d)
        form = "gram" if cost["gram"] <= cost["feature"] else "feature"
    if form == "gram":
        hsic = _gram_form_hsic(Y, work_bytes)
    elif form == "feature":
        hsic = _feature_form_hsic(Y, work_bytes)
    else:
        raise ValueError(f"form must be auto, gram or feature, got {form!r}")
    return _cka_from_hsic(hsic).float().cpu()


@torch.no_grad()
def _feature_form_hsic(Y: Tensor, work_bytes: int = WORK_BYTES) -> Tensor:
    """``‖Y_iᶜᵀ Y_jᶜ‖_F²`` for every pair: the d×d cross-covariances are the blocks of ``Zᵀ Z`` with
    ``Z = [Y_1ᶜ | … | Y_Eᶜ]`` (n × E·d), taken a block of experts' columns at a time (one product
    per block instead of one per pair; ``work_bytes`` of the product alive)."""
    E, n, d = Y.shape
    Z = _centered(Y).permute(1, 0, 2).reshape(n, E * d)  # [n, E·d]
    acc = Z.dtype
    per = max(1, min(E, work_bytes // max(1, E * d * d * torch.finfo(acc).bits // 8)))
    hsic = torch.empty(E, E, dtype=torch.float64, device=Y.device)
    for j0 in range(0, E, per):
        j1 = min(E, j0 + per)
        C = Z.T @ Z[:, j0 * d : j1 * d]  # [E·d, (j1−j0)·d]: every expert against experts j0..j1
        hsic[:, j0:j1] = C.reshape(E, d, j1 - j0, d).double().pow(2).sum((1, 3))
        del C
    return (hsic + hsic.T) / 2


@torch.no_grad()
def _gram_form_hsic(Y: Tensor, work_bytes: int) -> Tensor:
    """``⟨K_i, K_j⟩`` for the centred token Grams ``K_e``, built a block of rows at a time."""
    E, n, _ = Y.shape
    acc = _acc_dtype(Y)
    b = _rows_per_chunk(E * n * torch.finfo(acc).bits // 8, n, work_bytes)
    K = torch.empty(E, b, n, dtype=acc, device=Y.device)

    def row_blocks():  # the rows r0:r1 of every expert's centred token Gram
        for r0 in range(0, n, b):
            r1 = min(n, r0 + b)
            for e in range(E):
                Yc = _centered(Y[e])  # recomputed per block: n·d, against b·n·d for the product
                torch.matmul(Yc[r0:r1], Yc.T, out=K[e, : r1 - r0])
            yield K[:, : r1 - r0]

    return _gram_of_chunks(row_blocks())


def _center_gram_(K: Tensor) -> Tensor:
    """``H K H`` (``H = I − 11ᵀ/b``) for a Gram ``[..., b, b]``, in place: every row and column mean
    removed (K is overwritten and returned)."""
    rows, cols, total = K.mean(-1, keepdim=True), K.mean(-2, keepdim=True), K.mean((-2, -1), keepdim=True)
    return K.sub_(rows).sub_(cols).add_(total)


def _cka_from_hsic(hsic: Tensor) -> Tensor:
    """``HSIC(i, j) / sqrt(HSIC(i, i) HSIC(j, j))``: CKA from the matrix of HSIC values (same dtype)."""
    norms = hsic.diagonal().sqrt()
    return hsic / torch.outer(norms, norms).clamp_min(1e-30)


def _rbf_batches(T: int, batch_tokens: int, n_batches: int, seed: int) -> list[Tensor]:
    """The token mini-batches :func:`rbf_cka_minibatch_matrix` averages over (seeded; one batch of
    all tokens if they fit)."""
    g = torch.Generator().manual_seed(seed)
    b = min(batch_tokens, T)
    return [torch.randperm(T, generator=g)[:b] for _ in range(1 if b == T else n_batches)]


def _rbf_cka_of_distances(d2: Tensor) -> Tensor:
    """RBF CKA of one mini-batch from every expert's squared token distances ``d2 [E, b, b]``:
    ``exp(-d2 / (2σ²))`` with σ each expert's median off-diagonal distance, centred, and the E
    centred Grams' inner products as one ``[E, b²] @ [b², E]`` float32 product (the Grams are
    centred first, so the product sums fluctuations, not a mean), returned in float64. A float32
    ``d2`` is overwritten (every caller passes distances it owns)."""
    E, b, _ = d2.shape
    K = d2.float().clamp_min_(0)
    iu = torch.triu_indices(b, b, 1, device=d2.device)
    # the lower median of the off-diagonal distances (each pair once: the same value as counting both);
    # the median of the squared distances is the square of the median distance (the same element)
    pairs = K[:, iu[0], iu[1]].cpu().numpy()
    k = (pairs.shape[1] - 1) // 2  # the lower median (torch.median's), by selection
    sigma2 = torch.from_numpy(np.partition(pairs, k, axis=1)[:, k].copy()).to(K.device).clamp_min(1e-12)
    K.mul_((-0.5 / sigma2)[:, None, None]).exp_()
    K = _center_gram_(K).reshape(E, -1)
    return _cka_from_hsic((K @ K.T).double().cpu())


def rbf_cka_minibatch_matrix(Y: Tensor, batch_tokens: int = 512, n_batches: int = 4, seed: int = 0) -> Tensor:
    """``cka_rbf_minibatch``: the mean over ``n_batches`` random token mini-batches of
    ``batch_tokens`` tokens of the RBF CKA of each mini-batch (median-distance bandwidth per expert
    and mini-batch). moescope's cheap variant, not the CKA definition: the definition is one kernel
    estimate over the whole batch (:func:`rbf_cka_matrix`). The E centred Grams of a mini-batch are
    flattened and their inner products taken as one ``[E, b²] @ [b², E]`` product in float64."""
    E, T, _ = Y.shape
    batches = _rbf_batches(T, batch_tokens, n_batches, seed)
    total = torch.zeros(E, E, dtype=torch.float64)
    for idx in batches:
        idx = idx.to(Y.device)
        X = Y[:, idx].float()
        total += _rbf_cka_of_distances(torch.cdist(X, X).pow(2))
        del X
    return (total / len(batches)).float()


def _upper_sq_distances(Ye: Tensor, sq: Tensor, r0: int, r1: int) -> Tensor:
    """``‖y_s − y_t‖²`` for the rows ``s ∈ [r0, r1)`` against the tokens ``t ≥ r0`` only:
    ``[r1 − r0, n − r0]`` (the pairs below the diagonal block are another block's, by symmetry)."""
    return (sq[r0:r1, None] + sq[None, r0:] - 2 * (Ye[r0:r1] @ Ye[r0:].T)).clamp_min_(0)


RBF_BLOCK_ROWS = 256  # rows of a Gram block in the RBF passes (small blocks stay in cache)


def _upper_blocks(n: int, rows: int):
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


@torch.no_grad()
def rbf_bandwidths(Y: Tensor, work_bytes: int = WORK_BYTES, world=None) -> Tensor:
    """``σ² [E]``: per expert, the square of the lower median of its off-diagonal token distances
    ``‖y_s − y_t‖`` over all ``n(n − 1)/2`` pairs (the median heuristic of the RBF kernel), exact:
    the pairs of one expert are gathered a block of rows at a time (``n²/2`` floats alive, the
    upper triangle only) and the median taken by selection (the median of the squared distances
    is the square of the median distance: the same element). Under torchrun (``world`` of several
    ranks, each holding all of Y) each rank takes every ``size``-th expert and the values are
    summed over the ranks (one rank's value and 0.0 from the others: exact)."""
    E, n, _ = Y.shape
    out = torch.ones(E, dtype=torch.float64)
    if n < 2:
        return out
    dp = world is not None and world.distributed
    b = min(RBF_BLOCK_ROWS, _rows_per_chunk(n * 4, n, work_bytes))
    above = torch.ones(b, b, dtype=torch.bool, device=Y.device).triu_(1)
    for e in range(E):
        if dp and not world.mine(e):
            out[e] = 0.0
            continue
        Ye = Y[e].to(_acc_dtype(Y))
        sq = (Ye * Ye).sum(-1)
        parts = []
        for r0, r1 in _upper_blocks(n, b):
            d2 = _upper_sq_distances(Ye, sq, r0, r1)
            w = r1 - r0
            parts += [d2[:, :w][above[:w, :w]].float().cpu(), d2[:, w:].float().reshape(-1).cpu()]
        pairs = torch.cat(parts).numpy()
        del parts
        k = (pairs.size - 1) // 2  # the lower median, by selection (numpy's introselect: linear time)
        out[e] = float(np.partition(pairs, k)[k])
    if dp:
        out = world.sum(out)
    return out.clamp_min(1e-12)


@torch.no_grad()
def rbf_cka_matrix(Y: Tensor, work_bytes: int = WORK_BYTES, world=None) -> Tensor:
    """RBF-kernel CKA as the CKA definition has it (group-and-merge eq. 3, Kornblith et al.):
    ``HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j))`` with ``HSIC(K, L) ∝ tr(K H L H)`` and
    one kernel estimate over the whole batch of n tokens: ``K_st = exp(−‖y_s − y_t‖² / (2σ²))``
    with σ each expert's median off-diagonal distance (:func:`rbf_bandwidths`).

    Exact, never subsampled, and no n×n Gram is held (1 GiB each at 16k tokens in float32). With
    ``H = I − 11ᵀ/n``, ``tr(K_i H K_j H) = ⟨K_i, K_j⟩ − (2/n) r_i·r_j + (g_i g_j)/n²`` where ``r`` are
    the Gram's row sums and ``g`` its total, so one pass over blocks of rows (the upper triangle:
    ``K`` is symmetric) accumulates the Frobenius products, row sums and totals of every expert's
    Gram at once (float64), after the bandwidth pass; only ``work_bytes`` of Gram rows are alive.

    Under torchrun (``world`` of several ranks, each holding all of Y) the bandwidths are split by
    expert and the row blocks round-robin; the Frobenius products and row sums are sums over
    blocks, reduced in float64 (equal to one process up to the order of those sums)."""
    E, n, _ = Y.shape
    acc = _acc_dtype(Y)
    dp = world is not None and world.distributed
    sigma2 = rbf_bandwidths(Y, work_bytes, world).to(device=Y.device, dtype=acc)
    b = min(RBF_BLOCK_ROWS, _rows_per_chunk(E * n * 8, n, work_bytes))
    sqs = [(Y[e].to(acc) * Y[e].to(acc)).sum(-1) for e in range(E)]
    frob = torch.zeros(E, E, dtype=torch.float64)
    rows = torch.zeros(E, n, dtype=torch.float64)
    for i, (r0, r1) in enumerate(_upper_blocks(n, b)):
        if dp and not world.mine(i):
            continue
        w = r1 - r0
        K = torch.empty(E, w, n - r0, dtype=acc, device=Y.device)
        for e in range(E):
            K[e] = torch.exp(-_upper_sq_distances(Y[e].to(acc), sqs[e], r0, r1) / (2 * sigma2[e]))
        square, rest = K[:, :, :w].reshape(E, -1), K[:, :, w:].reshape(E, -1)
        frob += (square.double() @ square.double().T).cpu() + 2 * (rest.double() @ rest.double().T).cpu()
        rows[:, r0:r1] += K.sum(2).double().cpu()  # the block's rows: the square and the rest
        rows[:, r1:] += K[:, :, w:].sum(1).double().cpu()  # the rest's columns are the later rows' (symmetry)
        del K, square, rest
    if dp:
        frob, rows = world.sum(frob), world.sum(rows)
    total = rows.sum(1)
    hsic = frob - (2.0 / n) * (rows @ rows.T) + torch.outer(total, total) / n**2
    return _cka_from_hsic(hsic).float()


def _token_chunks(Y: Tensor, work_bytes: int):
    """``Y [E, n, d]`` a block of tokens at a time, in float32 (float64 for float64 input)."""
    E, n, d = Y.shape
    b = _rows_per_chunk(E * d * 4, n, work_bytes)
    return (Y[:, t0 : t0 + b].to(_acc_dtype(Y)) for t0 in range(0, n, b))


def output_cosine_matrix(Y: Tensor, work_bytes: int = WORK_BYTES) -> Tensor:
    """Mean over tokens of the cosine between two experts' outputs on that token (token chunks)."""
    G = _gram_of_chunks(torch.nn.functional.normalize(c, dim=-1) for c in _token_chunks(Y, work_bytes))
    return (G / Y.shape[1]).float()


def output_mse_matrix(Y: Tensor, work_bytes: int = WORK_BYTES) -> Tensor:
    """``mean_{t,d} (y_i(t) − y_j(t))²``, via the Gram of the flattened outputs (token chunks)."""
    G = _gram_of_chunks(_token_chunks(Y, work_bytes))
    sq = G.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * G) / (Y.shape[1] * Y.shape[2])).clamp_min(0).float()


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


def _column_chunks(fused: list[Tensor], work_bytes: int, copy: bool = False):
    """Each ``[E, ...]`` tensor flattened to ``[E, -1]`` and cut into float32 column chunks of at most
    ``work_bytes`` (the chunk's experts' rows together: every expert's entries, none of another's);
    ``copy``: always fresh chunks (the caller writes into them), never views of a float32 tensor."""
    for P in fused:
        P = P.detach().reshape(P.shape[0], -1)
        b = _rows_per_chunk(P.shape[0] * 4, P.shape[1], work_bytes)
        yield from (P[:, c0 : c0 + b].to(torch.float32, copy=copy) for c0 in range(0, P.shape[1], b))


@torch.no_grad()
def fused_gram(fused: list[Tensor], work_bytes: int = WORK_BYTES) -> Tensor:
    """The Gram ``G [E, E]`` (float64) of each expert's entries of the fused ``[E, ...]`` tensors,
    flattened and concatenated: ``Σ`` over column chunks of ``F Fᵀ`` (the order of the entries, the
    layout of the fused tensors, does not change it)."""
    return _gram_of_chunks(_column_chunks(fused, work_bytes))


@torch.no_grad()
def weight_gram(layer, work_bytes: int = WORK_BYTES) -> tuple[Tensor, int]:
    """Gram matrix ``G [E, E]`` of the vectorised expert weights concat(W_gate, W_up, W_down),
    and their length P (:func:`fused_gram` of the fused parameters: only ``work_bytes`` of float32
    copies are alive at a time; the layout, transposed or interleaved, does not change the Gram)."""
    E = layer.num_experts
    fused = [getattr(layer.experts, name).detach().reshape(E, -1) for name in ("gate_up_proj", "down_proj")]
    return fused_gram(fused, work_bytes), sum(P.shape[1] for P in fused)


@torch.no_grad()
def flat_outlier_fractions(fused: list[Tensor], work_bytes: int = WORK_BYTES) -> Tensor:
    """:func:`outlier_fraction` of each expert's flattened entries of the fused ``[E, ...]`` tensors
    (one column, ``μ ± 3σ`` with the unbiased σ), for all experts at once: the mean and variance
    from float64 chunk moments merged exactly (Chan et al.'s pairwise update), then one counting
    pass. The chunks are float32 (a chunk's sums pairwise), the merged moments float64. ``[E]``
    float32, NaN where an expert has fewer than 2 entries."""
    E = fused[0].shape[0]
    count, mean, m2 = 0, torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for F in _column_chunks(fused, work_bytes, copy=True):
        n_b = F.shape[1]
        mean_b = F.mean(1)
        m2_b = F.sub_(mean_b[:, None]).square_().sum(1).double().cpu()
        mean_b = mean_b.double().cpu()
        delta = mean_b - mean
        total = count + n_b
        mean += delta * (n_b / total)
        m2 += m2_b + delta.square() * (count * n_b / total)
        count = total
    if count < 2:
        return torch.full((E,), float("nan"))
    sd = (m2 / (count - 1)).sqrt()
    outside = torch.zeros(E, dtype=torch.float64)
    mu, limit = mean.float()[:, None], (3 * sd).float()[:, None]
    for F in _column_chunks(fused, work_bytes, copy=True):
        outside += (F.sub_(mu.to(F.device)).abs_() > limit.to(F.device)).sum(1).double().cpu()
    return (outside / count).float()


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


@torch.no_grad()
def surrogate_gram(layer, work_bytes: int = WORK_BYTES) -> tuple[Tensor, int]:
    """The Gram ``G [E, E]`` of the flattened surrogate weights ``W_down · (W_gate ⊙ W_up)`` (d×d
    each) and their length d², without holding the ``E`` surrogates: they are built a block of
    output rows at a time for every expert (``[E, b, d]`` within ``work_bytes``) and the block's
    Gram is accumulated in float64. Equals ``flat`` Gram of :func:`surrogate_weights`."""
    E = layer.num_experts
    w0 = layer.expert_weights(0)
    d = w0.down.shape[0]
    device = w0.down.device
    b = _rows_per_chunk(E * d * 4, d, work_bytes)
    S = torch.empty(E, b, d, dtype=torch.float32, device=device)

    def row_blocks():  # the rows r0:r1 of every expert's surrogate
        for r0 in range(0, d, b):
            r1 = min(d, r0 + b)
            for e in range(E):
                w = layer.expert_weights(e)
                torch.matmul(w.down[r0:r1].float(), w.gate.float() * w.up.float(), out=S[e, : r1 - r0])
            yield S[:, : r1 - r0]

    return _gram_of_chunks(row_blocks()), d * d


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


def token_overlap_counts(topk_idx: Tensor, token_ids: Tensor, num_experts: int) -> Tensor:
    """``O[p, q]`` = number of distinct token ids routed to both p and q, ``count(X_p ∩ X_q)`` of
    MC-Suite eq. 10 with ``X_p`` the (vocabulary) tokens routed to p as in eq. 9 (diagonal: each
    expert's distinct token ids)."""
    ids, inverse = torch.unique(token_ids.reshape(-1), return_inverse=True)
    seen = torch.zeros(num_experts, ids.numel(), dtype=torch.float32)  # counts stay exact below 2²⁴
    for j in range(topk_idx.shape[1]):
        seen[topk_idx[:, j].long(), inverse] = 1.0
    return seen @ seen.T


def skip_ratio_median(topk_weights: Tensor) -> float:
    """β of dynamic skipping (Lu et al.): the median over tokens of the ratio the skipping rule
    compares (:mod:`moescope.analysis.model.skipping`), each token's top-k weights sorted
    ``w₁ ≥ … ≥ w_k``: ``w₂ / w₁`` for top-2 (§3.3, App. A.3; the authors' ``dynamic_skipping.py``),
    ``w_k / Σ_{m≤k} w_m`` for k > 2 (App. A.2's ``Σ skipped ≤ β Σ all k``: a token skips at least its
    last expert exactly when its ratio is ≤ β, so about half the tokens skip). The median of an
    even count is the mean of the two middle values, as ``np.median``. NaN for top-1."""
    w = topk_weights.double().sort(dim=-1, descending=True).values
    k = w.shape[1]
    if k < 2:
        return float("nan")
    ratio = w[:, 1] / w[:, 0].clamp_min(1e-30) if k == 2 else w[:, -1] / w.sum(-1).clamp_min(1e-30)
    return float(torch.quantile(ratio, 0.5))


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


def outlier_count(A: Tensor) -> float:
    """Number of entries of ``A [n, d]`` outside ``μ_j ± 3σ_j`` of their column j (MC-Suite EAO)."""
    if A.shape[0] < 2:
        return float("nan")
    A = A.double()
    mu, sd = A.mean(0), A.std(0)
    return float(((A - mu).abs() > 3 * sd).sum())


def unit_norm_sum(A: Tensor) -> float:
    """``Σ_j ‖A[:, j]‖₂`` for ``A [n, d]``: each column's (hidden unit's) L2 norm over the rows
    (tokens), summed over the columns (MC-Suite eq. 13, ``sum(norm_l2(A, dim=0))``)."""
    return float(A.double().norm(dim=0).sum())


def routed_similarity_sum(U: Tensor) -> Tensor:
    """MC-Suite eq. 11 from ``U [E, d]``, each expert's mean unit-normalised routed output
    ``u_p = (1/|A_p|) Σ_{a∈A_p} a/‖a‖`` (NaN rows: never routed). The mean cosine over all pairs
    ``(a_m, a_n) ∈ A_p × A_q`` is ``u_p · u_q``; each expert's value is its sum over the other
    experts q (pairs with an unrouted expert have no pairs and add nothing). ``[E]``, NaN for an
    unrouted expert."""
    U = U.double()
    ok = ~torch.isnan(U).any(-1)
    Z = torch.where(ok[:, None], U, torch.zeros_like(U))
    S = Z @ Z.T
    S.fill_diagonal_(0.0)
    out = S.sum(1).float()
    return torch.where(ok, out, torch.full_like(out, float("nan")))


def mean_offdiag(S: Tensor) -> Tensor:
    """Row means of a square matrix without its diagonal."""
    E = S.shape[0]
    mask = ~torch.eye(E, dtype=torch.bool)
    return (S * mask).sum(1) / max(E - 1, 1)


def spectral_norm(W: Tensor) -> float:
    """``σ₁(W)``, the largest singular value. Small matrices take a full SVD in float64; larger ones
    ARPACK's Lanczos iteration (``scipy.sparse.linalg.svds``, k=1, converged to float32 machine
    precision, fixed start) on the float32 matrix, which costs a few hundred matrix-vector
    products instead of a full SVD (40× less on a 4096×14336 Mixtral expert matrix; 1e-7 relative)."""
    if min(W.shape) <= 64:
        return float(torch.linalg.svdvals(W.double())[0])
    import numpy as np
    from scipy.sparse.linalg import svds

    A = W.detach().float().cpu().numpy()
    return float(svds(A, k=1, return_singular_vectors=False, random_state=np.random.default_rng(0))[0])


def stable_rank(W: Tensor) -> float:
    """``Σ σ_i² / σ_1² = ‖W‖_F² / ‖W‖_2²`` (:func:`spectral_norm` for σ₁)."""
    fro2 = float((W.detach().float() ** 2).sum(dtype=torch.float64))
    return fro2 / max(spectral_norm(W) ** 2, 1e-30)


def stable_ranks(mats: list[Tensor], work_bytes: int = WORK_BYTES) -> Tensor:
    """:func:`stable_rank` of many same-shaped matrices ``[r, c]`` at once (one expert kind of a
    layer): ``‖W‖_F²`` summed in float64, and ``σ₁² = λ_max`` of the smaller-side float32 Gram
    (``W Wᵀ`` or ``Wᵀ W``, ``min(r, c)²``), the Grams built by batched products a chunk of matrices
    at a time and each ``λ_max`` by ARPACK's Lanczos iteration (``eigsh``, fixed start) on the
    in-cache Gram: 4× less time than Lanczos on W itself (:func:`spectral_norm`) on a 768×2048
    matrix, σ₁ within 5e-7 relative of the float64 SVD (the float32 Gram's rounding). Matrices
    with a side ≤ 64 take the float64 SVD. ``[len(mats)]`` float64."""
    from scipy.sparse.linalg import eigsh
    from threadpoolctl import threadpool_limits

    out = torch.empty(len(mats), dtype=torch.float64)
    if not mats:
        return out
    r, c = mats[0].shape
    if min(r, c) <= 64:
        return torch.tensor([stable_rank(W) for W in mats], dtype=torch.float64)
    s = min(r, c)
    per = _rows_per_chunk(s * s * 4 + r * c * 4, len(mats), work_bytes)
    start = np.random.default_rng(0).standard_normal(s).astype(np.float32)
    for i0 in range(0, len(mats), per):
        W = torch.stack([m.detach().float() for m in mats[i0 : i0 + per]])
        fro2 = W.square().sum((1, 2), dtype=torch.float64)
        G = torch.bmm(W, W.transpose(1, 2)) if r <= c else torch.bmm(W.transpose(1, 2), W)
        # one BLAS thread: a 0.6 M multiply-add matvec gains nothing from two, and two OpenBLAS threads
        # beside torch's spinning OpenMP ones made each matvec 20x slower
        with threadpool_limits(limits=1, user_api="blas"):
            for j in range(len(G)):
                lam = eigsh(G[j].cpu().numpy(), k=1, which="LA", return_eigenvectors=False, v0=start)[0]
                out[i0 + j] = float(fro2[j]) / max(float(lam), 1e-30)
        del W, G
    return out


# ---------------------------------------------------------------- HC-SMoE's representation


@torch.no_grad()
def mean_outputs(view, x: Tensor, work_bytes: int = WORK_BYTES) -> Tensor:
    """``[E, d]``: every expert's output averaged over all the tokens ``x [T, d]``, router bypassed
    (HC-SMoE's expert representation, its authors' ``expert-output`` similarity base), a block of
    tokens at a time, accumulated in float64."""
    E, (T, d) = view.num_experts, x.shape
    b = _rows_per_chunk(d * 8, T, work_bytes)
    out = torch.zeros(E, d, dtype=torch.float64)
    for e in range(E):
        for t0 in range(0, T, b):
            out[e] += view.expert_forward(e, x[t0 : t0 + b]).double().sum(0).cpu()
    return (out / max(T, 1)).float()


def euclidean_distance_matrix(V: Tensor) -> Tensor:
    """``‖v_i − v_j‖₂`` between the rows of ``V [E, d]`` (float64 differences, no Gram shortcut, so
    near-equal rows give 0 and not rounding noise)."""
    V = V.double()
    return torch.cdist(V, V, compute_mode="donot_use_mm_for_euclid_dist").float()
