"""How much each expert matters: the single-expert-drop perplexity grid and subset enumeration.

Drop grid (layer × expert): the perplexity of the model with that one expert removed (its
router row gone, the family's renormalisation applied). Computed the smart way: the layers are
walked in order keeping the hidden states at layer l, and each cell of layer l runs only layers
l..L from them, so the layers before l are never recomputed.

Enumeration (Lu et al., "Not All Experts are Equal"): for a layer, the reconstruction loss
``‖F'(x, C) − F(x)‖_F`` of keeping subset C, on cached inputs x of that layer. Every expert's
output is computed once per token; each subset is scored by re-routing among C and re-weighting
those outputs (shared experts cancel), accumulating over token chunks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure.capture import LayerStream, nll, token_nll
from moescope.analysis.model.routing import ROUTING_RULES, mix
from torch import Tensor

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------- perplexity and the drop grid


def _stream_ppl(stream: LayerStream) -> float:
    return math.exp(float(_token_nll(stream).mean()))


@torch.no_grad()
def perplexity(model, input_ids: Tensor, chunk_size: int = 8) -> float:
    """``exp`` of the mean next-token loss over every predicted token of the windows ``[N, L]``."""
    return _stream_ppl(LayerStream(model, input_ids, chunk_size=chunk_size))


@torch.no_grad()
def window_losses(model, input_ids: Tensor, chunk_size: int = 8) -> list[float]:
    """The next-token loss sum of each window of ``input_ids [N, L]`` (``L − 1`` predicted tokens
    each): what a paired comparison of two models on these windows reads; ``exp(Σ / (N·(L−1)))`` is
    :func:`perplexity`."""
    losses = _token_nll(LayerStream(model, input_ids, chunk_size=chunk_size))
    return [float(x) for x in losses.reshape(input_ids.shape[0], -1).sum(dim=1)]


@dataclass
class DropGrid:
    baseline: float
    layers: list[int]
    ppl: list[list[float]]  # per MoE layer, per expert

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "layers": self.layers, "ppl": self.ppl}

    def delta(self) -> list[list[float]]:
        return [[p - self.baseline for p in row] for row in self.ppl]


def _token_nll(stream: LayerStream, where: Tensor | None = None) -> Tensor:
    """Run the stream's remaining layers; next-token NLL of every predicted token ``[N, L-1]``,
    or, with ``where [N, L-1]`` (bool), only of those predictions (a flat vector, in row-major
    order): the LM head and the vocabulary log-sum-exp run only on those positions."""
    for _ in stream.layers(capture_moe_input=False):
        pass
    out = []
    for c, h in enumerate(stream.hidden):
        ids = stream.input_ids[c * stream.chunk_size : (c + 1) * stream.chunk_size].to(h.device)
        if where is None:
            out.append(token_nll(stream.logits(h), ids).double().cpu())
            continue
        sel = where[c * stream.chunk_size : (c + 1) * stream.chunk_size].to(h.device)
        # only the selected predictions: the hidden state at position t predicts token t + 1
        out.append(nll(stream.logits(h[:, :-1][sel]), ids[:, 1:][sel]).double().cpu())
    return torch.cat(out)


def _routing_changed(a, b, rtol: float = 1e-6) -> Tensor:
    """``[T]`` bool: tokens whose chosen experts or mixing weights differ between two routings."""
    ia, order_a = a.topk_idx.sort(-1)
    ib, order_b = b.topk_idx.sort(-1)
    wa = a.topk_weights.float().gather(-1, order_a)
    wb = b.topk_weights.float().gather(-1, order_b)
    same = (ia == ib).all(-1) & ((wa - wb).abs() <= rtol * wa.abs().clamp_min(1e-30)).all(-1)
    return ~same


@torch.no_grad()
def drop_grid(model, input_ids: Tensor, chunk_size: int = 8, progress: Progress | None = None,
              stored_row: Callable[[int], list[float] | None] | None = None,
              on_row: Callable[[int, list[float]], None] | None = None) -> DropGrid:
    """Single-expert-drop perplexity for every (MoE layer, expert), plus the unpruned baseline.

    Work is reused four ways, all exact: the layers before l run once for the whole row of
    cells; layer l's attention and MoE block run once, and a cell recomputes the block's output
    only for the tokens whose routing removing the expert changes (experts or weights; with a
    renormalising top-k router these are the tokens that selected it, with an unrenormalised
    softmax every token), by the family's routing among the remaining experts
    (:meth:`MoELayer.forward` with the expert masked, equal to the pruned block); only the
    sequences holding such a token go through the later layers (with causal attention the others
    cannot change), and every token before a sequence's first affected position keeps its
    baseline loss.

    Resumable: ``stored_row(l)`` returns a row finished by an earlier run (its cells are not
    computed again) and ``on_row(l, row)`` is told each new row as soon as it is done. Under
    torchrun the cells of a row are dealt round-robin over the ranks (every rank walks the layers
    on all sequences: a cell needs them all) and each row is summed over the ranks (a cell's
    perplexity comes from one rank, the others add 0.0), so every rank holds the one-process grid
    to the last bit.
    """
    from moescope.analysis.core.distributed import current

    world = current()
    stream = LayerStream(model, input_ids, chunk_size=chunk_size)
    base_nll = _token_nll(stream.clone())  # [N, L-1]
    base_total, count = float(base_nll.sum()), base_nll.numel()
    baseline = math.exp(base_total / count)
    cells = sum(v.num_experts for v in model.layers.values())
    done = 0
    grid: list[list[float]] = []
    N, L = input_ids.shape
    positions = torch.arange(L - 1)
    for l in range(model.num_hidden_layers):
        if l not in model.layers:
            stream.step(capture_moe_input=False)
            continue
        view = model.layers[l]
        E = view.num_experts
        kept = stored_row(l) if stored_row else None
        if world.distributed:  # the main rank's cache decides for every rank
            world.doing(f"agreeing on grid row {l}")
            kept = [float(v) for v in world.texts(" ".join(map(repr, kept)) if world.is_main and kept else "")[0].split()] or None
        if kept is not None:
            stream.step(capture_moe_input=False)
            done += E
            if progress:
                progress("cells", done, cells)
            grid.append(kept)
            continue
        inputs, residuals, outputs = stream.step_split()  # layer l once, its block output kept
        X, R, Y = torch.cat(inputs), torch.cat(residuals), torch.cat(outputs)  # [N, L, d]
        flat = X.reshape(-1, X.shape[-1])
        full = view.route(flat)
        row = []
        for e in range(E):
            if not world.mine(done):  # another rank's cell
                row.append(0.0)
                done += 1
                continue
            allowed = torch.ones(E, dtype=torch.bool)
            allowed[e] = False
            hit = _routing_changed(full, view.route(flat, allowed=allowed)).reshape(N, L).cpu()
            rows = hit.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:  # no token's routing depends on e: dropping it changes nothing
                row.append(baseline)
            else:
                first = hit[rows].float().argmax(-1)  # first affected position per sequence
                dev_rows = rows.to(X.device)
                y = Y[dev_rows].clone()
                moved = hit[rows].to(X.device)  # the re-routed tokens: only their block output changes
                y[moved] = view.forward(X[dev_rows][moved], allowed=allowed.to(X.device)).to(y.dtype)
                sub = LayerStream(model, input_ids[rows], chunk_size=chunk_size)
                for c in range(len(sub.hidden)):
                    part = slice(c * chunk_size, (c + 1) * chunk_size)
                    sub.hidden[c] = R[dev_rows[part]] + y[part]
                sub.layer = l + 1
                if l == model.num_hidden_layers - 1:  # no attention after: only re-routed tokens change
                    changed = hit[rows][:, :-1]
                else:  # causal attention: everything from a sequence's first affected token on
                    changed = positions[None, :] >= first[:, None]
                nll = _token_nll(sub, where=changed)
                total = base_total - float(base_nll[rows][changed].sum()) + float(nll.sum())
                row.append(math.exp(total / count))
            done += 1
            if progress:
                progress("cells", done, cells)
        if world.distributed:
            world.doing(f"summing grid row {l}")
            row = world.sum(torch.tensor(row, dtype=torch.float64)).tolist()
        if on_row:
            on_row(l, row)
        grid.append(row)
    return DropGrid(baseline=baseline, layers=model.moe_layers, ppl=grid)


# ---------------------------------------------------------------- enumeration


class SubsetScorer:
    """Scores kept subsets of one layer by reconstruction loss on cached inputs ``x [T, d]``.

    Per token chunk it computes the router logits, every expert's output ``Y [E, t, d]`` once, the
    original routing, and from them each token's Gram of expert outputs ``G_t = Y_t Y_tᵀ [E, E]``.
    A subset C is scored by routing among C (the family's rule with the others masked): with
    ``Δ_t = w'_t(C) − w_t`` the change of the token's mixing weights (non-zero on at most 2k
    experts), ``‖F'(x_t, C) − F(x_t)‖² = Δ_tᵀ G_t Δ_t``, read off the 2k×2k entries of ``G_t`` it
    touches instead of mixing d-wide outputs. No expert is re-run per subset, and many subsets are
    routed in one batched call. Where the routing rule makes removing an unchosen expert a no-op
    for a token (:func:`~moescope.analysis.model.routing.unchosen_removal_is_local`),
    :meth:`losses_after_drop` scores the children ``C − {j}`` of a subset by re-scoring only the
    tokens that chose ``j`` (k rows per token instead of |C|). Chunks (``[t, E, E]`` Grams) are kept
    in memory up to ``max_bytes`` and recomputed per call beyond that.

    ``batch_tokens``: the loss is the sum over consecutive blocks of that many tokens of each
    block's Frobenius norm, ``Σ_b ‖F'(x_b, C) − F(x_b)‖_F`` — what the enumeration authors' code
    minimises (``Expert_Sparsity/model/wrapper.py`` ``enumerate``: one norm per cached forward
    batch, summed) — instead of eq. 3's one norm over all tokens (None, the default).
    """

    def __init__(self, view, x: Tensor, chunk_tokens: int = 4096, max_bytes: int = 2 * 2**30,
                 work_bytes: int = 512 * 2**20, batch_tokens: int | None = None):
        from moescope.analysis.model.routing import unchosen_removal_is_local

        self.view = view
        self.x = x
        E, T, d = view.num_experts, x.shape[0], x.shape[-1]
        # a chunk's expert outputs [E, t, d] and Grams [t, E, E] in float32 within work_bytes
        self.chunk = max(1, min(chunk_tokens, work_bytes // (4 * E * max(d, E))))
        self.work_elems = work_bytes // 16  # elements of one batch of routed rows (several live tensors)
        self.rule = ROUTING_RULES[view.spec.routing]
        self.params = view.router_params
        self.local = unchosen_removal_is_local(view.spec.routing, self.params)
        self.keep_in_memory = T * E * E * 4 <= max_bytes
        self._chunks: list | None = None
        self.batch_tokens = batch_tokens

    def _compute_chunk(self, xc: Tensor):
        view = self.view
        logits = view.router_logits(xc)
        Y = view.expert_outputs(xc, logits).float()  # [E, t, d]
        idx, w = self.rule(logits, self.params, None)
        Yt = Y.transpose(0, 1)  # [t, E, d]
        G = torch.bmm(Yt, Yt.transpose(1, 2))  # [t, E, E]
        mw = view.mix_weights(w).float()
        sq = mix(Y, idx, mw).double().pow(2).sum()
        return logits, G, idx, mw, sq

    def _iter_chunks(self):
        if self._chunks is not None:
            yield from self._chunks
            return
        chunks = []
        for i in range(0, self.x.shape[0], self.chunk):
            c = self._compute_chunk(self.x[i : i + self.chunk])
            if self.keep_in_memory:
                chunks.append(c)
            yield c
        if self.keep_in_memory:
            self._chunks = chunks

    @torch.no_grad()
    def reference_norm(self) -> float:
        """``‖F(x)‖_F``, the original routed output's norm (to compare losses across layers)."""
        return math.sqrt(float(sum(c[4] for c in self._iter_chunks())))

    def _row_losses(self, chunk, tok: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """``Δᵀ G Δ`` per row (float64) and the experts chosen: token ``tok[r]`` of the chunk routed
        among ``allowed[r] [E]``."""
        logits, G, idx0, mw0, _ = chunk
        E = G.shape[-1]
        idx, w = self.rule(logits[tok], self.params, allowed)
        mw = self.view.mix_weights(w).float()
        i0, w0 = idx0[tok], mw0[tok]
        k = idx.shape[1]
        D = torch.zeros(tok.shape[0], E, dtype=torch.float32, device=G.device)
        D.scatter_add_(1, idx, mw).scatter_add_(1, i0, -w0)  # Δ, exact where an expert is in both
        p = torch.cat([idx, i0], 1)  # the ≤ 2k experts Δ touches
        c = D.gather(1, p)
        c[:, k:] *= ~(i0[:, :, None] == idx[:, None, :]).any(-1)  # count a shared expert once
        flat = (tok * (E * E))[:, None, None] + p[:, :, None] * E + p[:, None, :]
        Gp = G.reshape(-1).take(flat)  # [rows, k+k0, k+k0]
        return torch.einsum("rij,ri,rj->r", Gp, c, c).double().clamp_min(0), idx

    def _routed_rows(self, chunk, tok: Tensor, masks: Tensor, owner: Tensor,
                     off: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`_row_losses` over many rows, a working set at a time: row ``r`` is token
        ``tok[r]`` routed among ``masks[owner[r]]``, with expert ``off[r]`` also removed if given."""
        E, k = self.view.num_experts, self.view.top_k
        per = max(1, self.work_elems // max(E, 4 * k * k))
        parts = []
        for r0 in range(0, tok.shape[0], per):
            allowed = masks[owner[r0 : r0 + per]].clone()
            if off is not None:
                allowed[torch.arange(allowed.shape[0], device=allowed.device), off[r0 : r0 + per]] = False
            parts.append(self._row_losses(chunk, tok[r0 : r0 + per], allowed))
        return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])

    @torch.no_grad()
    def losses(self, subsets: list[tuple[int, ...]]) -> Tensor:
        """``‖F'(x, C) − F(x)‖_F`` for every subset C (float64, same order)."""
        E = self.view.num_experts
        masks = torch.zeros(len(subsets), E, dtype=torch.bool)
        for s, C in enumerate(subsets):
            masks[s, list(C)] = True
        per = self.batch_tokens or self.x.shape[0]
        n_blocks = max(1, -(-self.x.shape[0] // per))
        sq = torch.zeros(len(subsets), n_blocks, dtype=torch.float64)  # squared loss per subset and block
        start = 0
        for chunk in self._iter_chunks():
            t, dev = chunk[0].shape[0], chunk[0].device
            tok = torch.arange(t, device=dev).repeat(len(subsets))
            owner = torch.arange(len(subsets), device=dev).repeat_interleave(t)
            rows, _ = self._routed_rows(chunk, tok, masks.to(dev), owner)
            block = (torch.arange(start, start + t) // per).repeat(len(subsets))
            sq.index_put_((torch.arange(len(subsets)).repeat_interleave(t), block), rows.cpu(), accumulate=True)
            start += t
        return sq.sqrt().sum(1)

    @torch.no_grad()
    def losses_after_drop(self, parents: list[tuple[int, ...]],
                          wanted: Callable[[tuple[int, ...]], bool] | None = None) -> dict[tuple[int, ...], float]:
        """The loss of every child ``C − {j}`` of the ``parents`` that ``wanted`` accepts (default:
        all), as ``{child: loss}``. Where removal of an unchosen expert is local to the tokens that
        chose it, a child's squared loss is the parent's minus, over the tokens that chose ``j``,
        their loss under C plus their loss under ``C − {j}``: only those tokens are routed again.
        (With low-precision router logits a token whose k-th and (k+1)-th scores tie may flip
        between them when any expert is masked, as topk breaks ties by position; here such a token
        keeps its routing, as it would in the pruned model if the tie were broken the same way.)"""
        if not self.local or self.batch_tokens is not None:  # per-block norms do not subtract: score children
            children = sorted({tuple(c for c in C if c != j) for C in parents for j in C})
            children = [C for C in children if wanted is None or wanted(C)]
            return dict(zip(children, self.losses(children).tolist()))
        E, P = self.view.num_experts, len(parents)
        masks = torch.zeros(P, E, dtype=torch.bool)
        for p, C in enumerate(parents):
            masks[p, list(C)] = True
        sq = torch.zeros(P * E, dtype=torch.float64)  # squared loss of parent p without j at p·E + j
        for chunk in self._iter_chunks():
            t, dev = chunk[0].shape[0], chunk[0].device
            m = masks.to(dev)
            par = torch.arange(P, device=dev).repeat_interleave(t)  # rows: (parent, token)
            tok = torch.arange(t, device=dev).repeat(P)
            base, chosen = self._routed_rows(chunk, tok, m, par)
            sq += base.reshape(P, t).sum(1).cpu().repeat_interleave(E)
            k = chosen.shape[1]
            row = torch.arange(P * t, device=dev).repeat_interleave(k)  # one per (parent, token, chosen j)
            j = chosen.reshape(-1)
            after, _ = self._routed_rows(chunk, tok[row], m, par[row], off=j)
            sq.index_add_(0, (par[row] * E + j).cpu(), (after - base[row]).cpu())
        out: dict[tuple[int, ...], float] = {}
        for p, C in enumerate(parents):
            for j in C:
                child = tuple(c for c in C if c != j)
                if child not in out and (wanted is None or wanted(child)):
                    out[child] = math.sqrt(max(float(sq[p * E + j]), 0.0))
        return out


@dataclass
class EnumerationResult:
    layer: int
    keep: list[int]  # the chosen subset (ascending)
    loss: float
    method: str  # exact | greedy | beam
    candidates: list[tuple[list[int], float]]  # scored subsets, best first (exact: all of them)


ENUMERATION_METHODS = ("auto", "exact", "greedy", "beam")


def enumerate_layer(view, x: Tensor, keep: int, method: str = "auto", max_subsets: int = 5000,
                    beam_width: int = 4, chunk_tokens: int = 4096,
                    scorer: SubsetScorer | None = None, batch_tokens: int | None = None) -> EnumerationResult:
    """Choose ``keep`` experts of a layer minimising the reconstruction loss.

    ``method``: ``exact`` scores all C(E, keep) subsets; ``greedy`` removes, one at a time, the
    expert whose removal costs least; ``beam`` keeps the ``beam_width`` best subsets at each size;
    ``auto`` is exact when C(E, keep) ≤ ``max_subsets``, otherwise beam. ``scorer``: a
    :class:`SubsetScorer` of the same layer and inputs to reuse (its expert outputs are kept).
    ``batch_tokens``: the authors' objective, a sum of per-block norms (:class:`SubsetScorer`).
    """
    E = view.num_experts
    if not view.top_k <= keep <= E:
        raise MoescopeError(f"layer {view.index}: keep must be between top-k ({view.top_k}) and {E}, got {keep}")
    n_subsets = math.comb(E, keep)
    if method == "auto":
        method = "exact" if n_subsets <= max_subsets else "beam"
    if method not in ("exact", "greedy", "beam"):
        raise MoescopeError(f"unknown enumeration method '{method}'; accepted: auto, exact, greedy, beam")
    scorer = scorer or SubsetScorer(view, x, chunk_tokens=chunk_tokens, batch_tokens=batch_tokens)
    groups_ok = _routing_group_filter(view)
    reachable = _routing_group_filter(view, keep)
    if method == "exact":
        if n_subsets > max_subsets:
            raise MoescopeError(f"layer {view.index}: C({E}, {keep}) = {n_subsets} subsets exceeds max_subsets "
                                f"{max_subsets}; use method greedy or beam, or raise the limit")
        subsets = [C for C in itertools.combinations(range(E), keep) if groups_ok(C)]
        losses = shared_losses(scorer, subsets)
        order = torch.argsort(losses)
        cands = [(list(subsets[i]), float(losses[i])) for i in order]
        return EnumerationResult(view.index, cands[0][0], cands[0][1], "exact", cands)
    width = 1 if method == "greedy" else beam_width
    beam: list[tuple[int, ...]] = [tuple(range(E))]
    scored: list[tuple[tuple[int, ...], float]] = []
    for size in range(E - 1, keep - 1, -1):
        # group-limited routers: never leave a routing group with fewer than its final share
        scored = _best_children(scorer, beam, width, groups_ok if size == keep else reachable)
        if not scored:
            raise MoescopeError(f"layer {view.index}: no subset of {keep} experts keeps the routing groups "
                                "balanced along this search; use method exact")
        beam = [C for C, _ in scored]
    scored = [(list(C), loss) for C, loss in scored]
    return EnumerationResult(view.index, scored[0][0], scored[0][1], method, scored)


def shared_losses(scorer: SubsetScorer, subsets: list[tuple[int, ...]]) -> Tensor:
    """``scorer.losses(subsets)``; under torchrun each rank scores every ``size``-th subset (every
    rank holds the layer's inputs) and the losses are summed over the ranks (each subset's from
    the one rank that scored it, 0.0 from the others), so every rank holds them all."""
    from moescope.analysis.core.distributed import current

    world = current()
    if not world.distributed:
        return scorer.losses(subsets)
    mine = [i for i in range(len(subsets)) if world.mine(i)]
    part = scorer.losses([subsets[i] for i in mine]) if mine else torch.zeros(0, dtype=torch.float64)
    full = torch.zeros(len(subsets), dtype=torch.float64)
    full[mine] = part.double().cpu()
    world.doing(f"summing subset losses of layer {scorer.view.index}")
    return world.sum(full).to(part.dtype)


def _best_children(scorer: SubsetScorer, beam: list[tuple[int, ...]], width: int,
                   wanted: Callable[[tuple[int, ...]], bool] | None = None) -> list[tuple[tuple[int, ...], float]]:
    """One step of greedy / beam search: the ``width`` children ``C − {j}`` of the ``beam`` with the
    smallest losses, best first (ties: the child first in sorted order)."""
    losses_of = scorer.losses_after_drop(beam, wanted)
    children = sorted(losses_of)
    losses = torch.tensor([losses_of[C] for C in children], dtype=torch.float64)
    return [(children[i], float(losses[i])) for i in torch.argsort(losses)[:width]]


def loss_curve(view, x: Tensor, min_keep: int | None = None, method: str = "auto", max_subsets: int = 5000,
               beam_width: int = 4, chunk_tokens: int = 4096,
               batch_tokens: int | None = None) -> tuple[dict[int, EnumerationResult], float]:
    """The best subset of every size from ``min_keep`` (default: top-k) to all ``E`` experts, and
    ``‖F(x)‖_F`` (to make losses of different layers comparable): ``{size: EnumerationResult}``.
    Sizes with at most ``max_subsets`` subsets are searched exactly (``auto``/``exact``); the
    others by one greedy/beam pass from ``E`` down, which visits every size on the way."""
    E = view.num_experts
    min_keep = view.top_k if min_keep is None else min_keep
    scorer = SubsetScorer(view, x, chunk_tokens=chunk_tokens, batch_tokens=batch_tokens)
    out = {E: EnumerationResult(view.index, list(range(E)), 0.0, "exact", [(list(range(E)), 0.0)])}
    sizes = range(min_keep, E)
    exact = [k for k in sizes if method == "exact" or (method == "auto" and math.comb(E, k) <= max_subsets)]
    for k in exact:
        out[k] = enumerate_layer(view, x, k, "exact", max_subsets=max_subsets, scorer=scorer)
    rest = [k for k in sizes if k not in out]
    if rest:
        width = 1 if method == "greedy" else beam_width
        beam: list[tuple[int, ...]] = [tuple(range(E))]
        for size in range(E - 1, min(rest) - 1, -1):
            best = _best_children(scorer, beam, width)
            beam = [C for C, _ in best]
            if size in rest:
                scored = [(list(C), loss) for C, loss in best]
                out[size] = EnumerationResult(view.index, scored[0][0], scored[0][1],
                                              "greedy" if width == 1 else "beam", scored)
    return out, scorer.reference_norm()


def allocate_greedy(costs: dict[int, dict[int, float]], budget: int, floor: dict[int, int]) -> dict[int, int]:
    """Experts per layer for a global ``budget``: start from every layer full and remove one expert
    at a time from the layer whose next removal raises its cost least (``costs[l][k]``: the cost
    of keeping ``k``; never below ``floor[l]``; ties: the lower layer index)."""
    counts = {l: max(c) for l, c in costs.items()}
    if not sum(floor.values()) <= budget <= sum(counts.values()):
        raise MoescopeError(f"budget={budget} is not possible: it must be between {sum(floor.values())} and "
                            f"{sum(counts.values())}")
    while sum(counts.values()) > budget:
        step = min((costs[l][counts[l] - 1] - costs[l][counts[l]], l) for l in counts if counts[l] > floor[l])
        counts[step[1]] -= 1
    return counts


def _routing_group_filter(view, keep: int | None = None) -> Callable[[tuple[int, ...]], bool]:
    """For group-limited routers only subsets that keep every routing group the same size (≥ 2);
    with ``keep``, subsets from which such a subset of ``keep`` experts can still be reached
    (every routing group keeps at least ``keep / n_group``)."""
    if not view.spec.group_limited or view.router_params.n_group == 1:
        return lambda C: True
    n_group = view.router_params.n_group
    per = view.num_experts // n_group

    def ok(C):
        counts = [0] * n_group
        for e in C:
            counts[e // per] += 1
        if keep is not None:
            return min(counts) >= max(2, keep // n_group)
        return len(set(counts)) == 1 and counts[0] >= 2

    return ok


def naive_subset_loss(model, layer: int, x: Tensor, keep: list[int]) -> float:
    """Reference for tests and benchmarks: prune a copy of the block to ``keep`` and run it."""
    view = model.layers[layer]
    with torch.no_grad():
        full = view.block(x[None])
        full = full[0] if isinstance(full, tuple) else full
        with model.temporary_edit(layer):
            model.keep(layer, sorted(keep))
            pruned = view.block(x[None])
            pruned = pruned[0] if isinstance(pruned, tuple) else pruned
    return float((pruned - full).double().pow(2).sum().sqrt())


GRID_VERSION = 1


def cached_drop_grid(model, batch, cache=None, chunk_size: int = 8, progress: Progress | None = None,
                     note: Callable[[str], None] | None = None) -> DropGrid:
    """:func:`drop_grid` on an evaluation ``batch`` (a TokenBatch), stored in the cache. Each
    finished row (MoE layer) is its own ``dropgrid-row`` entry until the whole grid is stored, so
    an interrupted grid continues where it stopped (``note`` is told which rows it reuses).
    Under torchrun the cells are spread over the ranks (:func:`drop_grid`)."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.distributed import current, get_or_compute_meta

    cache = cache or Cache()
    parts = _grid_parts(model, batch)
    label = f"{model.source.split('/')[-1]}-{batch.source}"
    world = current()
    if world.distributed:
        world.check_shards(sum(v.num_experts for v in model.layers.values()), "drop-grid cells")
        world.agree(model=parts["model"], dtype=parts["dtype"], data=parts["data"])
    reused = []

    def stored_row(l: int):  # a row an interrupted run finished
        entry = cache.get("dropgrid-row", {**parts, "layer": l}) if world.is_main else None
        if entry is not None:
            reused.append(l)
        return entry.meta["row"] if entry is not None else None

    def on_row(l: int, row: list[float]):
        if world.is_main:
            cache.put("dropgrid-row", {**parts, "layer": l}, meta={"row": row, "model": parts["model"],
                                                                  "model_source": model.source,
                                                                  "data": batch.describe()}, label=f"{label}-L{l}")

    def compute():
        g = drop_grid(model, batch.input_ids, chunk_size=chunk_size, progress=progress, stored_row=stored_row,
                      on_row=on_row)
        if reused and note:
            note(f"reused {len(reused)} finished grid row(s) from the cache (layers {', '.join(map(str, reused))})")
        return {"meta": {**g.to_json(), "model": parts["model"], "model_source": model.source,
                         "data": batch.describe()}}

    meta = get_or_compute_meta(cache, "dropgrid", parts, compute, label=label)
    if world.is_main:  # the whole grid is stored: its row checkpoints are no longer needed
        from moescope.analysis.core.cache import cache_key

        for l in model.layers:
            cache.remove("dropgrid-row", cache_key("dropgrid-row", {**parts, "layer": l}))
    return _grid_from_meta(meta)


def lookup_drop_grid(model, batch, cache=None) -> DropGrid | None:
    """The stored grid :func:`cached_drop_grid` would return, or None (never computes)."""
    from moescope.analysis.core.cache import lookup

    return lookup("dropgrid", _grid_parts(model, batch), lambda entry: _grid_from_meta(entry.meta), cache)


def _grid_parts(model, batch) -> dict:
    return {"model": model.fingerprint(), "dtype": str(next(model.hf.parameters()).dtype),
            "data": batch.fingerprint, "version": GRID_VERSION}


def _grid_from_meta(m: dict) -> DropGrid:
    return DropGrid(baseline=float(m["baseline"]), layers=[int(x) for x in m["layers"]],
                    ppl=[[float(v) for v in row] for row in m["ppl"]])
