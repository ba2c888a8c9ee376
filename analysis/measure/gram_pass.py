"""Every output similarity of a layer from one pass over its experts' token Grams.

``Y [E, n, d]`` holds every expert's output on the same n tokens. Linear CKA, RBF CKA (the exact
full-batch estimate with each expert's median-distance bandwidth), the mini-batch RBF CKA, the
per-token cosine and the output MSE all read the same few products; computed one by one (the
reference functions of :mod:`~moescope.analysis.measure.metrics`) they build the E token Grams
``K_e = Y_e Y_eᵀ`` three times. Here the Grams are built once, tile by tile over the upper triangle
(``K`` is symmetric), as one batched product for all experts per tile, and every measure reads what
it needs off the tile while it is alive:

* **linear CKA**: the Grams of the centred outputs, whose Frobenius products
  ``⟨K_i, K_j⟩ = ‖Y_iᶜᵀ Y_jᶜ‖_F²`` are the HSIC values (one ``[E, t²] @ [t², E]`` product per tile);
* **distances** ``‖y_s − y_t‖² = K_ss + K_tt − 2K_st`` (centring does not move them): the RBF
  bandwidths need their exact median per expert, and the mini-batch RBF CKA reads the blocks of
  its token subsets off the same tiles;
* **RBF CKA** needs the bandwidths before its kernel exists, so its Frobenius products and row
  sums are a second step. When every expert's ``n(n − 1)/2`` distances fit in ``store_bytes``
  they are kept from the first step and the second reads them back (no second product); otherwise
  the tiles are built again, and the median is found in the first step by *selection over blocks*:
  a pilot interval from the mini-batch subsets' distances, a count of the distances below it and
  the ones inside it kept, so the exact lower median is a selection among those few (an expert whose
  median falls outside its interval, which the counts show, takes the exact all-pairs selection of
  :func:`~moescope.analysis.measure.metrics.rbf_bandwidths`).

Working precision: the products run in float32 (float64 for float64 outputs), each tile's
Frobenius products are summed in float64, and the RBF kernel is shifted by a per-expert constant
before its products (HSIC is invariant to adding a constant to K: ``H 1 = 0``), so the float32
products see its fluctuations, not its mean. The multiply-adds of each step are in
:func:`pass_costs`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from moescope.analysis.measure import metrics as M
from torch import Tensor

STORE_BYTES = 2 * 2**30  # distances kept between the two RBF steps when all of them fit
PILOT_SPREAD = 0.02  # the pilot interval: the pilot's quantiles 0.5 ± this (widened by its own spread)
NAMES = ("cka_linear", "cka_rbf", "cka_rbf_minibatch", "cosine", "mse")


def tile_size(E: int, n: int, d: int, work_bytes: int = M.WORK_BYTES, operands: bool = True) -> int:
    """Tokens per side of a tile: three ``[E, t, t]`` float32 tiles (and, with ``operands``, the
    two ``[E, t, d]`` operands converted per tile) within ``work_bytes``, at least 64 (a product too
    thin to run at GEMM speed), at most n."""
    t = 512
    while t > 64 and (2 * E * t * d * operands + 3 * E * t * t) * 4 > work_bytes:
        t //= 2
    return max(1, min(n, t))


def converts_whole(E: int, n: int, d: int, store_bytes: int = STORE_BYTES) -> bool:
    """Whether the centred outputs are converted to float32 once (they fit in ``store_bytes``) or
    a block at a time."""
    return E * n * d * 4 <= store_bytes


def stores_distances(E: int, n: int, store_bytes: int = STORE_BYTES) -> bool:
    """Whether the RBF step reads the distances back (one product pass) or builds the tiles again."""
    return E * (n * (n - 1) // 2) * 4 <= store_bytes


def pass_costs(E: int, n: int, d: int, store_bytes: int = STORE_BYTES) -> dict[str, float]:
    """Multiply-adds of each step of :func:`output_similarities` (tiles of the upper triangle, the
    diagonal tiles whole, counted as ``n²/2``): the Gram tiles ``E n² d / 2`` (twice when the
    distances do not fit in ``store_bytes``), the linear and the RBF Frobenius products
    ``E² n² / 2`` each, and the per-token products cosine and MSE share ``E² n d``."""
    grams = E * n * n * d / 2
    return {
        "grams": grams * (1 if stores_distances(E, n, store_bytes) else 2),
        "linear_frobenius": E * E * n * n / 2,
        "rbf_frobenius": E * E * n * n / 2,
        "token_products": E * E * n * d,
    }


def pass_memory(E: int, n: int, d: int, batch_tokens: int = 512, n_batches: int = 4,
                work_bytes: int = M.WORK_BYTES, store_bytes: int = STORE_BYTES) -> int:
    """Bytes :func:`output_similarities` holds besides ``Y``: the float32 centred copy when it fits
    ``store_bytes``, the kept distances when they fit, the mini-batch blocks, the tiles."""
    b = min(batch_tokens, n)
    blocks = (1 if b == n else n_batches) * E * b * b * 4
    whole = E * n * d * 4 if converts_whole(E, n, d, store_bytes) else 0
    kept = E * (n * (n - 1) // 2) * 4 if stores_distances(E, n, store_bytes) else 0
    return whole + kept + blocks + work_bytes


class _Tiles:
    """The upper-triangle tiles ``(r0, r1, c0, c1)`` of an n×n matrix, row block by row block, and
    the centred float operands of each block: views of ``whole`` (the centred outputs converted
    once) when given, else converted a block at a time (the row block's kept while its tiles run)."""

    def __init__(self, Y: Tensor, mean: Tensor, t: int, whole: Tensor | None):
        self.Y, self.mean, self.t, self.whole = Y, mean, t, whole
        self.acc = M._acc_dtype(Y)
        self.n = Y.shape[1]
        if whole is not None:
            self.sq = torch.linalg.vector_norm(whole, dim=-1).square_()

    def block(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Centred outputs of tokens r0..r1 ``[E, w, d]`` and their squared norms ``[E, w]``."""
        if self.whole is not None:
            return self.whole[:, r0:r1], self.sq[:, r0:r1]
        A = self.Y[:, r0:r1].to(self.acc, copy=True).sub_(self.mean[:, None, :])
        return A, torch.linalg.vector_norm(A, dim=-1).square_()

    def bounds(self):
        n, t = self.n, self.t
        for r0 in range(0, n, t):
            for c0 in range(r0, n, t):
                yield r0, min(n, r0 + t), c0, min(n, c0 + t)

    def __iter__(self):
        A = sa = None
        for r0, r1, c0, c1 in self.bounds():
            if c0 == r0:
                A, sa = self.block(r0, r1)
            B, sb = (A, sa) if c0 == r0 else self.block(c0, c1)
            yield r0, r1, c0, c1, A, sa, B, sb


class _Buffers:
    """One reusable ``[E, w, c]`` float tile per shape: a fresh multi-megabyte tensor per tile costs
    its page faults every time (the allocator hands large blocks back to the system)."""

    def __init__(self):
        self.held: dict[tuple, Tensor] = {}

    def __call__(self, E: int, w: int, c: int, dtype: torch.dtype, device) -> Tensor:
        key = (E, w, c, dtype, str(device))
        if key not in self.held:
            self.held[key] = torch.empty(E, w, c, dtype=dtype, device=device)
        return self.held[key]

    def gram(self, A: Tensor, B: Tensor) -> Tensor:
        """``A Bᵀ`` per expert into a held tile."""
        return torch.bmm(A, B.transpose(1, 2), out=self(A.shape[0], A.shape[1], B.shape[1], A.dtype, A.device))


def _tile_distances(G: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """Squared distances from a Gram tile, in place: ``K_ss + K_tt − 2 K_st``, clamped at 0."""
    return G.mul_(-2).add_(sa[:, :, None]).add_(sb[:, None, :]).clamp_min_(0)


def _frobenius(F: Tensor) -> Tensor:
    """``F Fᵀ`` of a tile flattened to ``[E, -1]``, summed in float64."""
    F = F.reshape(F.shape[0], -1)
    return (F @ F.T).double()


class _Subsets:
    """The mini-batch token subsets' distance blocks ``[E, b, b]``, filled from the tiles. Each
    subset's tokens are taken in increasing order (the RBF CKA of a block does not depend on the
    order of its tokens), so the subset's tokens inside a tile are a contiguous range of its block."""

    def __init__(self, subsets: list[Tensor], E: int, n: int, acc: torch.dtype, device):
        self.subsets = [s.sort().values for s in subsets]
        # every entry is written by the tiles (each pair of a subset lies in one tile or its mirror)
        self.blocks = [torch.empty(E, len(s), len(s), dtype=acc, device=device) for s in self.subsets]

    def _inside(self, s: Tensor, a: int, b: int) -> tuple[int, int]:
        return int(torch.searchsorted(s, a)), int(torch.searchsorted(s, b))

    def take(self, d2: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        for s, blk in zip(self.subsets, self.blocks):
            p0, p1 = self._inside(s, r0, r1)
            q0, q1 = self._inside(s, c0, c1)
            if p0 == p1 or q0 == q1:
                continue
            part = d2.index_select(1, (s[p0:p1] - r0).to(d2.device)).index_select(2, (s[q0:q1] - c0).to(d2.device))
            blk[:, p0:p1, q0:q1] = part
            if c0 != r0:
                blk[:, q0:q1, p0:p1] = part.transpose(1, 2)

    def rbf_cka(self) -> Tensor:
        total = torch.zeros(self.blocks[0].shape[0], self.blocks[0].shape[0], dtype=torch.float64)
        for blk in self.blocks:
            blk.diagonal(dim1=1, dim2=2).zero_()
            total += M._rbf_cka_of_distances(blk)
        return (total / len(self.blocks)).float()


class _MedianBySelection:
    """The exact lower median of each expert's strictly-upper distances, without holding them all:
    a count below the pilot interval ``[lo, hi]`` and the values inside it, per expert."""

    def __init__(self, lo: Tensor, hi: Tensor, total: int):
        self.lo, self.hi, self.total = lo, hi, total
        self.below = torch.zeros(len(lo), dtype=torch.long)
        self.inside: list[list[Tensor]] = [[] for _ in range(len(lo))]

    def take(self, d2: Tensor, upper: Tensor | None) -> None:
        lo, hi = self.lo[:, None, None], self.hi[:, None, None]
        below, keep = d2 < lo, (d2 >= lo).logical_and_(d2 <= hi)
        if upper is not None:  # a diagonal tile: its strictly-upper pairs only
            below.logical_and_(upper[None])
            keep.logical_and_(upper[None])
        self.below += below.sum((1, 2)).cpu()
        counts = keep.sum((1, 2)).cpu().tolist()
        for e, part in enumerate(torch.split(d2[keep].cpu(), counts)):
            if len(part):
                self.inside[e].append(part)

    def medians(self) -> tuple[Tensor, list[int]]:
        """Squared-distance medians ``[E]`` (float64) and the experts whose median the interval missed."""
        k = (self.total - 1) // 2  # the lower median's rank among all pairs
        out = torch.zeros(len(self.lo), dtype=torch.float64)
        missed = []
        for e in range(len(self.lo)):
            j = k - int(self.below[e])
            vals = torch.cat(self.inside[e]) if self.inside[e] else torch.empty(0)
            if 0 <= j < len(vals):
                a = vals.numpy()
                out[e] = float(np.partition(a, j)[j])
            else:
                missed.append(e)
        return out, missed


@torch.no_grad()
def output_similarities(Y: Tensor, batch_tokens: int = 512, n_batches: int = 4, seed: int = 0,
                        work_bytes: int = M.WORK_BYTES, store_bytes: int = STORE_BYTES, rbf: Tensor | None = None,
                        progress=None, timings: dict | None = None) -> dict[str, Tensor]:
    """``cka_linear``, ``cka_rbf``, ``cka_rbf_minibatch``, ``cosine``, ``mse`` (each ``[E, E]``
    float32) and ``mean`` (``[E, d]``, every expert's mean output, float32) of ``Y [E, n, d]``:
    the same values as :func:`~moescope.analysis.measure.metrics.linear_cka_matrix`,
    :func:`~moescope.analysis.measure.metrics.rbf_cka_matrix`,
    :func:`~moescope.analysis.measure.metrics.rbf_cka_minibatch_matrix` (same subsets for the same
    seed), :func:`~moescope.analysis.measure.metrics.output_cosine_matrix` and
    :func:`~moescope.analysis.measure.metrics.output_mse_matrix`, from one pass over the Gram tiles
    (module docstring). ``rbf``: the RBF CKA when already computed (spread over ranks), which skips
    its steps. ``progress(done, total)``: called after each tile. ``timings``: filled with the
    seconds of each step (``token_products``, ``tiles`` (the first pass: Grams, linear CKA,
    distances), ``bandwidths``, ``rbf``, ``minibatch``)."""
    tm = timings if timings is not None else {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        tm[name] = tm.get(name, 0.0) + now - clock[0]
        clock[0] = now

    E, n, d = Y.shape
    acc = M._acc_dtype(Y)
    dev = Y.device
    whole = Y.to(acc, copy=True) if converts_whole(E, n, d, store_bytes) else None
    # the mean and the per-token products read the outputs as they are (before centring)
    mean = torch.zeros(E, d, dtype=torch.float64, device=dev)
    chunks = [whole] if whole is not None else M._token_chunks(Y, work_bytes)
    for chunk in chunks:
        mean += chunk.sum(1).double()  # float32 sums within a chunk (pairwise), float64 across chunks
    mean /= max(n, 1)
    out = {"mean": mean.float().cpu()}
    out["cosine"], out["mse"] = _token_products(Y, whole, work_bytes)
    lap("token_products")
    meanf = mean.to(acc)
    if whole is not None:
        whole.sub_(meanf[:, None, :])
    t = tile_size(E, n, d, work_bytes, operands=whole is None)
    tiles = _Tiles(Y, meanf, t, whole)
    n_blocks = math.ceil(n / t)
    n_tiles = n_blocks * (n_blocks + 1) // 2
    want_rbf = rbf is None and n >= 2
    store = want_rbf and stores_distances(E, n, store_bytes)
    subsets = _Subsets(M._rbf_batches(n, batch_tokens, n_batches, seed), E, n, acc, dev)
    steps = n_tiles * (1 + (want_rbf and not store))
    done = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], steps)

    pairs = n * (n - 1) // 2
    upper_full = torch.ones(t, t, dtype=torch.bool, device=dev).triu_(1)
    selector = None
    stored = torch.empty(E, pairs, dtype=acc, device=dev) if store else None
    at = 0  # where the next tile's pairs go in ``stored``
    if want_rbf and not store:
        selector = _pilot_interval(Y, meanf, subsets, pairs)

    frob_linear = torch.zeros(E, E, dtype=torch.float64, device=dev)
    buffers = _Buffers()
    for r0, r1, c0, c1, A, sa, B, sb in tiles:
        G = buffers.gram(A, B)  # [E, w, c]: the centred Gram tile of every expert
        twice = 1.0 if c0 == r0 else 2.0  # an off-diagonal tile stands for its mirror image too
        frob_linear += twice * _frobenius(G)
        d2 = _tile_distances(G, sa, sb)
        diag = c0 == r0
        if diag:
            d2.diagonal(dim1=1, dim2=2).zero_()
        subsets.take(d2, r0, r1, c0, c1)
        upper = upper_full[: r1 - r0, : c1 - c0] if diag else None
        if store:
            part = d2[:, upper] if diag else d2.reshape(E, -1)
            stored[:, at : at + part.shape[1]] = part
            at += part.shape[1]
        elif selector is not None:
            selector.take(d2, upper)
        del G, d2
        step()
    out["cka_linear"] = M._cka_from_hsic(frob_linear.cpu()).float()
    lap("tiles")

    if want_rbf:
        if store:
            sigma2 = _stored_medians(stored, seed)
        else:
            sigma2, missed = selector.medians()
            for e in missed:  # the pilot interval missed: the exact selection over all of this expert's pairs
                sigma2[e] = float(M.rbf_bandwidths(Y[e : e + 1], work_bytes)[0])
        sigma2 = sigma2.clamp_min(1e-12)
        lap("bandwidths")
        out["cka_rbf"] = _rbf_step(tiles, stored if store else None, sigma2.to(dev, acc), subsets, upper_full, n,
                                   step, buffers)
    else:
        out["cka_rbf"] = rbf.float() if rbf is not None else torch.ones(E, E)
    del stored
    lap("rbf")
    out["cka_rbf_minibatch"] = subsets.rbf_cka()  # last: it overwrites the subsets' distances
    lap("minibatch")
    return out


def _token_products(Y: Tensor, whole: Tensor | None, work_bytes: int) -> tuple[Tensor, Tensor]:
    """The cosine and MSE matrices from the per-token products ``P_t(i, j) = y_i(t)·y_j(t)``, one
    batched ``[c, E, d] @ [c, d, E]`` product per chunk of c tokens: ``Σ_t P_t`` is the Gram of the
    flattened outputs (the MSE's) and ``mean_t P_t(i, j) / (‖y_i(t)‖ ‖y_j(t)‖)`` the mean cosine,
    so one product serves both (``E² n d`` multiply-adds)."""
    E, n, d = Y.shape
    acc = M._acc_dtype(Y)
    c = M._rows_per_chunk(E * d * 4 * 2, n, work_bytes)
    gram = torch.zeros(E, E, dtype=torch.float64)
    cos = torch.zeros(E, E, dtype=torch.float64)
    for t0 in range(0, n, c):
        X = (whole[:, t0 : t0 + c] if whole is not None else Y[:, t0 : t0 + c].to(acc)).transpose(0, 1)  # [c, E, d]
        P = torch.bmm(X, X.transpose(1, 2))  # [c, E, E]
        gram += P.sum(0).double().cpu()
        norms = torch.linalg.vector_norm(X, dim=-1).clamp_min_(1e-12)  # as F.normalize's eps
        cos += P.div_(norms[:, :, None]).div_(norms[:, None, :]).sum(0).double().cpu()
        del X, P
    sq = gram.diagonal()
    mse = ((sq[:, None] + sq[None, :] - 2 * gram) / (n * d)).clamp_min(0).float()
    return (cos / n).float(), mse


def _pilot_interval(Y: Tensor, mean: Tensor, subsets: _Subsets, pairs: int) -> _MedianBySelection:
    """The interval each expert's median distance is searched in: the quantiles ``0.5 ± δ`` of the
    distances within the mini-batch token subsets (computed here, before the pass), δ the larger of
    :data:`PILOT_SPREAD` and three standard errors of a quantile of the pilot's token count."""
    acc = mean.dtype
    vals = []
    for idx in subsets.subsets:
        X = Y[:, idx.to(Y.device)].to(acc).sub_(mean[:, None, :])
        d2 = torch.cdist(X, X).pow_(2)
        iu = torch.triu_indices(len(idx), len(idx), 1, device=d2.device)
        vals.append(d2[:, iu[0], iu[1]].float().cpu())
    lo, hi = _median_interval(torch.cat(vals, 1), sum(len(idx) for idx in subsets.subsets))
    return _MedianBySelection(lo.to(Y.device, acc), hi.to(Y.device, acc), pairs)


def _median_interval(sample: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Per row of ``sample [E, m]``, the quantiles ``0.5 ± δ``: δ the larger of
    :data:`PILOT_SPREAD` and three standard errors of a quantile estimated from ``count`` draws."""
    delta = max(PILOT_SPREAD, 3 * 0.5 / math.sqrt(max(count, 1)))
    q = torch.tensor([max(0.0, 0.5 - delta), min(1.0, 0.5 + delta)], dtype=sample.dtype, device=sample.device)
    lo, hi = torch.quantile(sample, q, dim=1)
    return lo, hi


def _stored_medians(stored: Tensor, seed: int, sample: int = 8192) -> Tensor:
    """Each expert's lower median over its kept distances ``stored [E, P]``, by selection among the
    few inside an interval (:func:`_median_interval` of a seeded sample of ``sample`` pairs): one
    counting pass per row gives the rank below it, numpy's introselect the element among the values
    inside; an expert whose median the interval misses takes the selection over all its pairs.
    (Row by row rather than through :class:`_MedianBySelection`'s masks over all experts at once:
    1.6× faster on the kept distances.) Float64 ``[E]``."""
    E, P = stored.shape
    k = (P - 1) // 2
    out = torch.zeros(E, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, P, (min(sample, P),), generator=g).to(stored.device)
    lo, hi = _median_interval(stored[:, pick], len(pick))
    for e in range(E):
        row = stored[e]
        below = int((row < lo[e]).sum())
        inside = row[(row >= lo[e]) & (row <= hi[e])].cpu().numpy()
        j = k - below
        a, j = (inside, j) if 0 <= j < len(inside) else (row.cpu().numpy(), k)
        out[e] = float(np.partition(a, j)[j])
    return out


def _rbf_step(tiles: _Tiles, stored: Tensor | None, sigma2: Tensor, subsets: _Subsets, upper_full: Tensor,
              n: int, step, buffers: _Buffers) -> Tensor:
    """RBF CKA from each expert's kernel ``K = exp(−d² / 2σ²)``, shifted by its mean on the
    mini-batch subsets: ``HSIC = ⟨K_i, K_j⟩ − (2/n) r_i·r_j + g_i g_j / n²`` (``r`` the row sums, ``g``
    the total), the Frobenius products and row sums summed in float64 over the kept distances (each
    pair stands for (s, t) and (t, s); the diagonal adds ``K_ss = 1``) or over the tiles built again."""
    dev = sigma2.device
    E = len(sigma2)
    scale = -1.0 / (2 * sigma2)
    # any constant is exact; one near K's mean keeps the float32 products on its fluctuations (a corner
    # of each mini-batch block is plenty: random tokens)
    shift = torch.stack([torch.exp(blk[:, :64, :64] * scale[:, None, None]).mean((1, 2))
                         for blk in subsets.blocks]).mean(0)
    frob = torch.zeros(E, E, dtype=torch.float64, device=dev)
    rows = torch.zeros(E, n, dtype=torch.float64, device=dev)
    if stored is not None:
        at = 0
        for r0, r1, c0, c1 in tiles.bounds():
            w, c = r1 - r0, c1 - c0
            diag = c0 == r0
            m = w * (w - 1) // 2 if diag else w * c
            flat = stored[:, at : at + m]
            at += m
            K = buffers(E, m, 1, flat.dtype, dev)[:, :, 0] if diag else buffers(E, w, c, flat.dtype, dev)
            torch.mul(flat if diag else flat.reshape(E, w, c), scale[:, None] if diag else scale[:, None, None], out=K)
            K.exp_().sub_(shift[:, None] if diag else shift[:, None, None])
            frob += 2.0 * _frobenius(K)  # each kept pair stands for (s, t) and (t, s)
            if diag:  # the strictly-upper pairs of a diagonal tile: row s gets K[s, t], row t gets it too
                s_idx, t_idx = upper_full[:w, :w].nonzero(as_tuple=True)
                part = torch.zeros(E, w, dtype=K.dtype, device=dev)
                part.index_add_(1, s_idx, K).index_add_(1, t_idx, K)
                rows[:, r0:r1] += part.double()
            else:
                rows[:, r0:r1] += K.sum(2).double()
                rows[:, c0:c1] += K.sum(1).double()
            del K
        one = (1.0 - shift).double()  # the diagonal: K_ss = exp(0) = 1, shifted
        frob += n * torch.outer(one, one)
        rows += one[:, None]
    else:
        for r0, r1, c0, c1, A, sa, B, sb in tiles:
            diag = c0 == r0
            d2 = _tile_distances(buffers.gram(A, B), sa, sb)
            if diag:
                d2.diagonal(dim1=1, dim2=2).zero_()
            K = d2.mul_(scale[:, None, None]).exp_().sub_(shift[:, None, None])
            frob += (1.0 if diag else 2.0) * _frobenius(K)
            rows[:, r0:r1] += K.sum(2).double()  # float32 sums of one tile's row, float64 across tiles
            if not diag:
                rows[:, c0:c1] += K.sum(1).double()
            del d2, K
            step()
    total = rows.sum(1)
    hsic = frob - (2.0 / n) * (rows @ rows.T) + torch.outer(total, total) / n**2
    return M._cka_from_hsic(hsic.cpu()).float()
