"""The per-expert criteria (MC-Suite's sixteen and REAP), each declared once.

A :class:`Criterion` carries its description, the metric family it needs (``routing``,
``weights``, ``activations``, ``gradients``: what :class:`~moescope.analysis.measure.analyze.AnalysisParams`
must compute), its compute function and the end that is dropped by default (``min``: the experts
with the smallest values go first). :func:`moescope.analysis.measure.analyze.analyze_layer` loops over
:data:`CRITERIA`; strategies and the dashboard read it. Adding a criterion is one decorated
function here (or in any module imported before the analysis runs)::

    @criterion("EXN", "expert x norm: ...", family="activations")
    def _exn(s: LayerStats) -> Tensor:  # [E]
        ...

A *pair* criterion (``pair=True``: MC-Suite's ECC eq. 8 and ETS eq. 10) computes an E×E matrix;
the analysis stores it (``AnalysisResult.pair``) and, as the per-expert map value, the round in which
the pair rule (:func:`pair_drop_order`) drops each expert at the criterion's default end. Names
carrying a paper's acronym follow its equation; moescope's own variants carry a suffix
(``EAN-mean``, ``EAO-frac``, ``EAS-output``, ``ECC-rowsum``, ``ETS-cosine``).

Forward criteria receive a :class:`LayerStats` (one MoE layer's routing, expert outputs and
weights, each computed once on first use); gradient criteria a :class:`GradientStats`.
Shapes: E experts, T tokens, d hidden size, k top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from moescope.analysis.core.errors import unknown_name
from moescope.analysis.measure import metrics as M
from torch import Tensor

FAMILIES = ("routing", "weights", "activations", "gradients")


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    family: str  # the metric family the analysis must compute for it
    compute: Callable[..., Tensor]  # LayerStats (or GradientStats for gradients) -> [E] ([E, E] for a pair criterion)
    drop: str = "min"  # the end dropped by default: "min" (smallest values first) or "max"
    pair: bool = False  # a pair criterion: compute gives an E×E matrix, the strategy picks a pair first

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric families an analysis needs for this criterion (routing always)."""
        return ("routing",) if self.family == "routing" else ("routing", self.family)


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, description: str, family: str, drop: str = "min", pair: bool = False):
    """Register the decorated ``compute(stats) -> Tensor [E]`` as criterion ``name``; with ``pair``,
    ``compute`` gives the ``[E, E]`` pair matrix and dropping follows :func:`pair_drop_order`."""
    if family not in FAMILIES:
        raise ValueError(f"criterion {name}: family must be one of {FAMILIES}, got {family!r}")
    if drop not in ("min", "max"):
        raise ValueError(f"criterion {name}: drop must be min or max, got {drop!r}")

    def register(fn):
        CRITERIA[name] = Criterion(name, description, family, fn, drop, pair)
        return fn

    return register


def get_criterion(name: str) -> Criterion:
    """The criterion ``name`` (case-insensitive), or a one-line error listing them."""
    key = canonical_name(name)
    if key not in CRITERIA:
        raise unknown_name("criterion", str(name) or "(none)", CRITERIA)
    return CRITERIA[key]


def canonical_name(name) -> str:
    """``name`` as registered (``ean-mean`` → ``EAN-mean``), or as given when no criterion matches."""
    by_upper = {n.upper(): n for n in CRITERIA}
    return by_upper.get(str(name).upper(), str(name))


# ---------------------------------------------------------------- what forward criteria read


class LayerStats:
    """One MoE layer on its calibration input ``x [T, d]``: the routing, every expert's outputs on
    a token sample ``Y [E, n, d]`` (router bypassed), and each expert's outputs on the tokens
    routed to it, each computed once when first read."""

    def __init__(self, view, x: Tensor, token_ids: Tensor, routing, counts: Tensor, coact: Tensor,
                 vocab_coverage: Tensor, Y: Tensor | None = None):
        self.view, self.x, self.token_ids, self.routing = view, x, token_ids, routing
        self.counts, self.coact, self.vocab_coverage, self.Y = counts, coact, vocab_coverage, Y
        self.E, self.T = view.num_experts, x.shape[0]

    @cached_property
    def routed(self) -> dict[str, Tensor]:
        """Per expert p on its routed tokens, from ``A_p [|X_p|, d]`` (the expert's output on each
        token routed to it, before the gate weight — MC-Suite §2.1 calls these outputs the
        "intermediate activations" A): EAN, EAN-mean, REAP, EAE, EAO, EAO-frac, ETS-cosine, and
        ``EAS-mean [E, d]`` (the mean of the unit-normalised rows, for eq. 11). NaN for an expert no
        token was routed to."""
        r, E = self.routing, self.E
        names = ("EAE", "EAO", "EAO-frac", "EAN", "EAN-mean", "REAP", "ETS-cosine")
        out = {n: torch.full((E,), float("nan")) for n in names}
        d = self.x.shape[1]
        mean_dir = torch.full((E, d), float("nan"), dtype=torch.float64)
        for e in range(E):
            hit = r.topk_idx == e
            tok = hit.any(-1)
            if int(tok.sum()) == 0:
                continue
            xe = self.x[tok]
            A = self.view.expert_forward(e, xe).float()  # A_p: rows = routed tokens, columns = hidden units
            we = (r.topk_weights.float() * hit).sum(-1)[tok]
            norms = A.norm(dim=-1)
            out["EAN"][e] = M.unit_norm_sum(A)
            out["EAN-mean"][e] = norms.mean()
            out["REAP"][e] = (we * norms).mean()
            out["EAE"][e] = M.gaussian_entropy(A)
            out["EAO"][e] = M.outlier_count(A)
            out["EAO-frac"][e] = M.outlier_fraction(A)
            out["ETS-cosine"][e] = M.mean_pairwise_cosine(xe)
            mean_dir[e] = torch.nn.functional.normalize(A.double(), dim=-1).mean(0).cpu()
        out["EAS-mean"] = mean_dir
        return out

    @cached_property
    def weight_gram(self) -> tuple[Tensor, int]:
        return M.weight_gram(self.view)

    @cached_property
    def output_cosine(self) -> Tensor:
        """``[E, E]`` mean per-token output cosine on the token sample (the ``cosine`` similarity)."""
        return M.output_cosine_matrix(self.Y)


# ---- routing
@criterion("EUF", "usage frequency: fraction of calibration tokens routed to it (eq. 7)", "routing")
def _euf(s: LayerStats) -> Tensor:
    return (s.counts / s.T).float()


@criterion("ECC", "co-activation pairs: tokens that selected both experts of a pair (eq. 8); the pair with the "
           "max (or min) count is picked and its lower-usage member dropped", "routing", drop="max", pair=True)
def _ecc(s: LayerStats) -> Tensor:
    return s.coact.float()


@criterion("ECC-rowsum", "co-activation row sum: tokens routed to it together with another expert, per token "
           "(= usage × (k − 1); moescope's per-expert reading of Fig. 10)", "routing", drop="max")
def _ecc_rowsum(s: LayerStats) -> Tensor:
    return ((s.coact.sum(1) - s.coact.diagonal()) / s.T).float()


@criterion("EVC", "vocabulary coverage: distinct token ids routed to it / distinct token ids in the batch (eq. 9)",
           "routing")
def _evc(s: LayerStats) -> Tensor:
    return (s.vocab_coverage / max(torch.unique(s.token_ids).numel(), 1)).float()


@criterion("ETS", "input token overlap pairs: distinct token ids routed to both experts of a pair, "
           "count(X_p ∩ X_q) (eq. 10); the pair with the max (or min) overlap is picked and its lower-usage "
           "member dropped", "routing", drop="max", pair=True)
def _ets(s: LayerStats) -> Tensor:
    return M.token_overlap_counts(s.routing.topk_idx.cpu(), s.token_ids.cpu(), s.E).float()


@criterion("RWN", "router weight norm: ‖router row‖₂ (eq. 4)", "routing", drop="max")
def _rwn(s: LayerStats) -> Tensor:
    return s.view.router_weight.float().norm(dim=1).cpu()


# ---- weights
@criterion("EWS", "expert weight similarity: mean cosine of its vectorised weights with the layer's other experts "
           "(eq. 3)", "weights", drop="max")
def _ews(s: LayerStats) -> Tensor:
    return M.mean_offdiag(M.gram_cosine(s.weight_gram[0]))


@criterion("WSR", "weight stable rank: mean over W_gate, W_up, W_down of Σσ²/σ₁² (eq. 5)", "weights", drop="max")
def _wsr(s: LayerStats) -> Tensor:
    ws = [s.view.expert_weights(e) for e in range(s.E)]
    kinds = [M.stable_ranks([getattr(w, kind) for w in ws]) for kind in ("gate", "up", "down")]
    return (sum(kinds) / 3).float()


@criterion("EWN", "expert weight norm: ‖concat(W_gate, W_up, W_down)‖_F (eq. 6)", "weights")
def _ewn(s: LayerStats) -> Tensor:
    return s.weight_gram[0].diagonal().sqrt().float()


# ---- activations
@criterion("ETS-cosine", "input hidden-state similarity: mean pairwise cosine of the hidden states routed to it "
           "(moescope's variant, not eq. 10)", "activations", drop="max")
def _ets_cosine(s: LayerStats) -> Tensor:
    return s.routed["ETS-cosine"]


@criterion("EAS", "activation similarity: Σ over the other experts q of the mean cosine over all pairs of its "
           "routed outputs and q's routed outputs (eq. 11)", "activations", drop="max")
def _eas(s: LayerStats) -> Tensor:
    return M.routed_similarity_sum(s.routed["EAS-mean"])


@criterion("EAS-output", "output similarity: mean output cosine with the layer's other experts on the same tokens, "
           "router bypassed (moescope's variant, not eq. 11)", "activations", drop="max")
def _eas_output(s: LayerStats) -> Tensor:
    return M.mean_offdiag(s.output_cosine)


@criterion("EAE", "activation entropy: Σ_j log σ_j of its outputs over hidden dimensions, on its routed tokens "
           "(eq. 12)", "activations")
def _eae(s: LayerStats) -> Tensor:
    return s.routed["EAE"]


@criterion("EAO", "activation outliers: number of its output entries outside μ_j ± 3σ_j of their hidden unit, on "
           "its routed tokens (§2.4 ③)", "activations")
def _eao(s: LayerStats) -> Tensor:
    return s.routed["EAO"]


@criterion("EAO-frac", "activation outlier fraction: EAO divided by the number of entries (moescope's variant)",
           "activations")
def _eao_frac(s: LayerStats) -> Tensor:
    return s.routed["EAO-frac"]


@criterion("EAN", "activation norm: Σ_j ‖A_p[:, j]‖₂, each hidden unit's norm over its routed tokens, summed "
           "(eq. 13)", "activations")
def _ean(s: LayerStats) -> Tensor:
    return s.routed["EAN"]


@criterion("EAN-mean", "mean activation norm: mean ‖output‖₂ on its routed tokens (moescope's variant, not eq. 13)",
           "activations")
def _ean_mean(s: LayerStats) -> Tensor:
    return s.routed["EAN-mean"]


@criterion("REAP", "router-weighted activation: mean over routed tokens of gate weight × ‖output‖₂", "activations")
def _reap(s: LayerStats) -> Tensor:
    return s.routed["REAP"]


# ---------------------------------------------------------------- gradients


class GradientStats:
    """One MoE layer's gradients of the calibration loss with respect to its experts' fused weights."""

    def __init__(self, view, grads: dict[str, Tensor]):
        self.view, self.grads, self.E = view, grads, view.num_experts

    @cached_property
    def per_expert(self) -> list:
        return [self.view.expert_weights(e, self.grads) for e in range(self.E)]

    @cached_property
    def fused(self) -> list[Tensor]:  # the fused [E, ...] gradients: every expert's W_gate, W_up, W_down entries
        return [self.grads[n] for n in ("gate_up_proj", "down_proj")]

    @cached_property
    def gram(self) -> Tensor:  # [E, E] Gram of each expert's flattened gradient (float64)
        return M.fused_gram(self.fused)


@criterion("EGS", "gradient similarity: mean cosine of its weight gradient with the other experts'", "gradients",
           drop="max")
def _egs(s: GradientStats) -> Tensor:
    return M.mean_offdiag(M.gram_cosine(s.gram))


@criterion("EGE", "gradient entropy: Σ_j log σ_j of its W_down gradient over hidden dimensions", "gradients")
def _ege(s: GradientStats) -> Tensor:
    # rows: I samples, cols: d dims
    return torch.tensor([M.gaussian_entropy(g.down.float().T.cpu()) for g in s.per_expert], dtype=torch.float32)


@criterion("EGO", "gradient outliers: fraction of its gradient entries outside μ ± 3σ", "gradients")
def _ego(s: GradientStats) -> Tensor:
    return M.flat_outlier_fractions(s.fused)


@criterion("EGN", "gradient norm: ‖∇ concat(W_gate, W_up, W_down)‖_F of the next-token loss", "gradients")
def _egn(s: GradientStats) -> Tensor:
    return s.gram.diagonal().sqrt().float()


def pair_drop_order(P: Tensor, usage: Tensor, order: str) -> list[int]:
    """The order in which MC-Suite's pair rule (ECC eq. 8, ETS eq. 10) drops a layer's experts: among
    the experts still there, pick the pair (p ≠ q) with the ``min`` or ``max`` value of ``P [E, E]``,
    drop its member with the lower ``usage`` (calibration tokens routed), and repeat on the experts
    left, until one remains (it comes last). Ties: the first pair in (p, q) order; equal usage drops
    the higher index."""
    E = P.shape[0]
    P = P.double().cpu()
    upper = torch.ones(E, E, dtype=torch.bool).triu(1)  # each pair once, p < q
    alive = torch.ones(E, dtype=torch.bool)
    worst = float("inf") if order == "min" else float("-inf")
    out = []
    for _ in range(E - 1):
        valid = upper & alive[:, None] & alive[None, :]
        A = torch.where(valid, P, torch.full_like(P, worst)).reshape(-1)
        flat = int(A.argmin() if order == "min" else A.argmax())  # the first such pair in (p, q) order
        p, q = divmod(flat, E)
        drop = p if float(usage[p]) < float(usage[q]) else q
        out.append(drop)
        alive[drop] = False
    return out + alive.nonzero().flatten().tolist()


def pair_drop_position(P: Tensor, usage: Tensor, order: str) -> Tensor:
    """``[E]`` the round (1 = first) in which :func:`pair_drop_order` drops each expert; the survivor gets E."""
    pos = torch.empty(P.shape[0])
    for r, e in enumerate(pair_drop_order(P, usage, order)):
        pos[e] = r + 1
    return pos


def criterion_scores(res, name: str, order: str) -> dict[int, Tensor]:
    """Keep-scores (higher = keep) for dropping by ``order`` of criterion ``name`` in a stored
    analysis ``res``: ``min`` drops the experts with the smallest values, ``max`` the largest. An
    expert with no value (never routed) is dropped first. A pair criterion (ECC, ETS) scores each
    expert by its place in :func:`pair_drop_order` on the stored pair matrix (dropped first =
    lowest), so keeping the top scores is dropping pair by pair."""
    c = get_criterion(name)
    out = {}
    for l in res.layers:
        if c.pair:
            order_l = pair_drop_order(res.pair(l, c.name), res.routing(l, "usage_count"), order)
            s = torch.empty(len(order_l), dtype=torch.float64)
            for r, e in enumerate(order_l):
                s[e] = r
            out[l] = s
            continue
        v = res.criterion(l, c.name).double()
        s = v if order == "min" else -v
        out[l] = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    return out
