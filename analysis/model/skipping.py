"""Dynamic expert skipping (Lu et al., "Not All Experts are Equal", §3.3 and App. A.2; the
authors' ``model/wrapper.py``, ``DynamicSkippingMixtralSparseMoeBlockWrapper``).

At inference a token drops some of its lower-weighted selected experts, and the experts it keeps
share the whole routing weight. With the token's top-k weights sorted ``w₁ ≥ … ≥ w_k``:

- **top-2** (§3.3, the authors' code): the second expert is skipped when ``w₂ < β · w₁``;
- **top-k, k > 2** (App. A.2): the token keeps the top ``i*`` experts,
  ``i* = min i ∈ {1, …, k}`` with ``Σ_{m>i} w_m ≤ β · Σ_{m≤k} w_m`` — the candidates for skipping are
  the tail of the sorted selection (never the first expert), and several can go at once.

(A.2 derives the top-2 form from the general one with β₂ = β/(1 − β), "a little abuse of notation";
each layer's β is read in the form of its own top-k.) The kept weights are then rescaled to sum to
what all k selected weights summed to (``w_m · Σ_{m≤k} w / Σ_{kept} w``): for a router that
renormalises its top-k (Mixtral) this is the authors' ``routing_weights /= routing_weights.sum()``
after zeroing the skipped weight, A.2's ``ẑ = Σ_{m≤i} w_m f_m / Σ_{m≤i} w_m``; for a router whose
top-k weights do not sum to 1 (no renormalisation, a routed scaling factor) it keeps the layer's
output scale, which the paper (Mixtral only) does not discuss.

β per layer is calibrated as the median over calibration tokens of the ratio the rule compares
(:func:`moescope.analysis.measure.metrics.skip_ratio_median`): ``w₂ / w₁`` for top-2 (the paper's
and the authors' ``dynamic_skipping.py``, ``np.median``), ``w_k / Σ_{m≤k} w_m`` for k > 2 — so that,
as App. A.3 intends, about half the tokens skip (at least their last) expert. A top-1 router has
nothing to skip and is refused.

The thresholds travel with a saved model as ``config.moescope_skip_beta`` ({layer: β}); plain
``from_pretrained`` ignores that field (the model then routes as usual), and
:func:`analysis.model.load_moe` installs the routing patch when it finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.layouts import ROUTER_OUTPUTS
from torch import Tensor

CONFIG_KEY = "moescope_skip_beta"


def refuse_top1(top_k: int, where: str) -> None:
    """One-line refusal of dynamic skipping on a top-1 router (nothing to skip)."""
    if int(top_k) < 2:
        raise MoescopeError(f"{where}: dynamic skipping needs a router that selects at least 2 experts per token; "
                            f"this one selects {int(top_k)} (nothing to skip)")


def skip_mask(weights: Tensor, beta: float) -> Tensor:
    """``[T, k]`` bool: which selected experts each token skips under threshold ``beta`` — for
    k = 2 the second when ``w₂ < β·w₁`` (§3.3), for k > 2 all but the top ``i*`` (App. A.2, see the
    module docstring). A top-1 selection is refused."""
    k = weights.shape[-1]
    refuse_top1(k, "skip_mask")
    w, order = weights.float().sort(dim=-1, descending=True)
    if k == 2:
        skip_sorted = torch.stack([torch.zeros_like(w[:, 0], dtype=torch.bool), w[:, 1] < beta * w[:, 0]], -1)
    else:
        total = w.sum(-1, keepdim=True)
        tail = total - w.cumsum(-1)  # Σ_{m>i} for i = 1..k (the last is 0: i = k always qualifies)
        ok = tail <= beta * total
        first = ok.float().argmax(-1)  # 0-based i*−1: the first i that satisfies the rule
        ranks = torch.arange(k, device=w.device).expand_as(w)
        skip_sorted = ranks > first[:, None]
    return torch.zeros_like(skip_sorted).scatter(1, order, skip_sorted)


def renormalized(weights: Tensor, skip: Tensor) -> Tensor:
    """The top-k ``weights`` with the ``skip``ped ones zeroed and the kept ones rescaled to the sum
    of all k (computed in float32, returned in the weights' dtype)."""
    w = weights.float()
    kept = w.masked_fill(skip, 0.0)
    scale = w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-30)
    return (kept * scale).to(weights.dtype)


@dataclass
class SkipCounter:
    calls: int = 0  # selected (token, expert) pairs
    skipped: int = 0
    per_layer: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.skipped / self.calls if self.calls else 0.0


def install(model, betas: dict[int, float]) -> SkipCounter:
    """Patch the routers of ``model`` (an MoEModel) so tokens skip experts by ``betas``; returns the
    counter of expert calls skipped. Calling it again replaces earlier patches."""
    for l in betas:
        refuse_top1(model.layers[int(l)].top_k, f"layer {int(l)}")
    remove(model)
    counter = SkipCounter()
    for l, beta in betas.items():
        view = model.layers[int(l)]
        router = view.router
        original = router.forward
        sentinel_ok = view.spec.expert_layout == "gate_up"  # GPT-OSS / Llama 4 experts have no "skip" index
        unpack, pack = ROUTER_OUTPUTS[view.spec.router_returns]

        def forward(hidden_states, *args, _orig=original, _beta=float(beta), _view=view, _l=int(l),
                    _sentinel=sentinel_ok, _unpack=unpack, _pack=pack, **kwargs):
            out = _orig(hidden_states, *args, **kwargs)
            logits, weights, idx = _unpack(out, _view.top_k)
            skip = skip_mask(weights, _beta)
            n = int(skip.numel())
            s = int(skip.sum())
            counter.calls += n
            counter.skipped += s
            c = counter.per_layer.setdefault(_l, [0, 0])
            c[0] += n
            c[1] += s
            weights = renormalized(weights, skip)
            if _sentinel:
                idx = idx.masked_fill(skip, _view.num_experts)  # transformers' experts loop skips this index
            return _pack(out, logits, weights, idx)

        router.forward = forward
        router._moescope_skip = original
        experts = view.experts
        if sentinel_ok and hasattr(experts, "_is_expert_parallel"):
            # transformers' grouped_mm / batched_mm experts (the default) leave the output rows of an
            # out-of-range index unwritten (garbage × weight 0 can be NaN) unless told, by this flag,
            # that such indices are sentinels to mask; the eager loop skips them either way
            experts._moescope_skip_ep = experts._is_expert_parallel
            experts._is_expert_parallel = True
    model.skip_beta = {int(k): float(v) for k, v in betas.items()}
    model.skip_counter = counter
    return counter


def remove(model) -> None:
    for view in model.layers.values():
        original = getattr(view.router, "_moescope_skip", None)
        if original is not None:
            view.router.forward = original
            del view.router._moescope_skip
        if hasattr(view.experts, "_moescope_skip_ep"):
            view.experts._is_expert_parallel = view.experts._moescope_skip_ep
            del view.experts._moescope_skip_ep
    model.skip_beta = {}


def calibrate(analysis_result) -> dict[int, float]:
    """β per MoE layer from a stored analysis: the median over its calibration tokens of the ratio
    the rule compares (``w₂ / w₁`` for top-2, ``w_k / Σ w`` for k > 2). A top-1 layer is refused."""
    for l in analysis_result.layers:
        refuse_top1(int(analysis_result.meta["layers"][str(l)]["top_k"]), f"layer {l}")
    return {l: float(analysis_result.scalars(l)["beta"]) for l in analysis_result.layers}
