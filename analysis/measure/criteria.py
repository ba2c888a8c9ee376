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
    compute: Callable[..., Tensor]  # LayerStats (or GradientStats for gradients) -> [E]
    drop: str = "min"  # the end dropped by default: "min" (smallest values first) or "max"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric families an analysis needs for this criterion (routing always)."""
        return ("routing",) if self.family == "routing" else ("routing", self.family)


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, description: str, family: str, drop: str = "min"):
    """Register the decorated ``compute(stats) -> Tensor [E]`` as criterion ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"criterion {name}: family must be one of {FAMILIES}, got {family!r}")
    if drop not in ("min", "max"):
        raise ValueError(f"criterion {name}: drop must be min or max, got {drop!r}")

    def register(fn):
        CRITERIA[name] = Criterion(name, description, family, fn, drop)
        return fn

    return register


def get_criterion(name: str) -> Criterion:
    """The criterion ``name`` (case-insensitive), or a one-line error listing them."""
    key = str(name).upper()
    if key not in CRITERIA:
        raise unknown_name("criterion", str(name) or "(none)", CRITERIA)
    return CRITERIA[key]


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
        """Per expert on its routed tokens: mean output norm (EAN), mean gate weight × norm (REAP),
        output entropy (EAE), outlier fraction (EAO), input token similarity (ETS); NaN for an
        expert no token was routed to."""
        r, E = self.routing, self.E
        eae, eao, ean, reap, ets = (torch.full((E,), float("nan")) for _ in range(5))
        for e in range(E):
            hit = r.topk_idx == e
            tok = hit.any(-1)
            if int(tok.sum()) == 0:
                continue
            xe = self.x[tok]
            ye = self.view.expert_forward(e, xe).float()
            we = (r.topk_weights.float() * hit).sum(-1)[tok]
            norms = ye.norm(dim=-1)
            ean[e] = norms.mean()
            reap[e] = (we * norms).mean()
            eae[e] = M.gaussian_entropy(ye)
            eao[e] = M.outlier_fraction(ye)
            ets[e] = M.mean_pairwise_cosine(xe)
        return {"EAE": eae, "EAO": eao, "EAN": ean, "REAP": reap, "ETS": ets}

    @cached_property
    def weight_gram(self) -> tuple[Tensor, int]:
        return M.weight_gram(self.view)

    @cached_property
    def output_cosine(self) -> Tensor:
        """``[E, E]`` mean per-token output cosine on the token sample (the ``cosine`` similarity)."""
        return M.output_cosine_matrix(self.Y)


# ---- routing
@criterion("EUF", "usage frequency: fraction of calibration tokens routed to it", "routing")
def _euf(s: LayerStats) -> Tensor:
    return (s.counts / s.T).float()


@criterion("ECC", "co-activation: tokens routed to it together with another expert, per token", "routing")
def _ecc(s: LayerStats) -> Tensor:
    return ((s.coact.sum(1) - s.coact.diagonal()) / s.T).float()


@criterion("EVC", "vocabulary coverage: distinct token ids routed to it / distinct token ids in the batch", "routing")
def _evc(s: LayerStats) -> Tensor:
    return (s.vocab_coverage / max(torch.unique(s.token_ids).numel(), 1)).float()


@criterion("RWN", "router weight norm: ‖router row‖₂", "routing")
def _rwn(s: LayerStats) -> Tensor:
    return s.view.router_weight.float().norm(dim=1).cpu()


# ---- weights
@criterion("EWS", "expert weight similarity: mean cosine of its vectorised weights with the layer's other experts",
           "weights", drop="max")
def _ews(s: LayerStats) -> Tensor:
    return M.mean_offdiag(M.gram_cosine(s.weight_gram[0]))


@criterion("WSR", "weight stable rank: mean over W_gate, W_up, W_down of Σσ²/σ₁²", "weights")
def _wsr(s: LayerStats) -> Tensor:
    wsr = []
    for e in range(s.E):
        ew = s.view.expert_weights(e)
        wsr.append(sum(M.stable_rank(t) for t in (ew.gate, ew.up, ew.down)) / 3)
    return torch.tensor(wsr, dtype=torch.float32)


@criterion("EWN", "expert weight norm: ‖concat(W_gate, W_up, W_down)‖_F", "weights")
def _ewn(s: LayerStats) -> Tensor:
    return s.weight_gram[0].diagonal().sqrt().float()


# ---- activations
@criterion("ETS", "input token similarity: mean pairwise cosine of the hidden states routed to it", "activations")
def _ets(s: LayerStats) -> Tensor:
    return s.routed["ETS"]


@criterion("EAS", "activation similarity: mean output cosine with the layer's other experts (same tokens)",
           "activations", drop="max")
def _eas(s: LayerStats) -> Tensor:
    return M.mean_offdiag(s.output_cosine)


@criterion("EAE", "activation entropy: Σ_j log σ_j of its outputs over hidden dimensions, on its routed tokens",
           "activations")
def _eae(s: LayerStats) -> Tensor:
    return s.routed["EAE"]


@criterion("EAO", "activation outliers: fraction of its output entries outside μ ± 3σ, on its routed tokens",
           "activations")
def _eao(s: LayerStats) -> Tensor:
    return s.routed["EAO"]


@criterion("EAN", "activation norm: mean ‖output‖₂ on its routed tokens", "activations")
def _ean(s: LayerStats) -> Tensor:
    return s.routed["EAN"]


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
    def vectors(self) -> Tensor:  # [E, P] each expert's flattened gradient
        return torch.stack([torch.cat([g.gate.reshape(-1), g.up.reshape(-1), g.down.reshape(-1)]).float().cpu()
                            for g in self.per_expert])


@criterion("EGS", "gradient similarity: mean cosine of its weight gradient with the other experts'", "gradients",
           drop="max")
def _egs(s: GradientStats) -> Tensor:
    return M.mean_offdiag(M.flat_cosine_matrix(s.vectors))


@criterion("EGE", "gradient entropy: Σ_j log σ_j of its W_down gradient over hidden dimensions", "gradients")
def _ege(s: GradientStats) -> Tensor:
    # rows: I samples, cols: d dims
    return torch.tensor([M.gaussian_entropy(g.down.float().T.cpu()) for g in s.per_expert], dtype=torch.float32)


@criterion("EGO", "gradient outliers: fraction of its gradient entries outside μ ± 3σ", "gradients")
def _ego(s: GradientStats) -> Tensor:
    return torch.tensor([M.outlier_fraction(v[:, None]) for v in s.vectors], dtype=torch.float32)


@criterion("EGN", "gradient norm: ‖∇ concat(W_gate, W_up, W_down)‖_F of the next-token loss", "gradients")
def _egn(s: GradientStats) -> Tensor:
    return s.vectors.norm(dim=1)


def criterion_scores(res, name: str, order: str) -> dict[int, Tensor]:
    """Keep-scores (higher = keep) for dropping by ``order`` of criterion ``name`` in a stored
    analysis ``res``: ``min`` drops the experts with the smallest values, ``max`` the largest. An
    expert with no value (never routed) is dropped first."""
    out = {}
    for l in res.layers:
        v = res.criterion(l, name).double()
        s = v if order == "min" else -v
        out[l] = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    return out
