"""Dynamic expert skipping (Lu et al., "Not All Experts are Equal").

At inference a token drops its lower-weighted selected experts when their routing weight is
small against what it keeps: with the top-k weights sorted ``w₁ ≥ … ≥ w_k``, the token keeps the
fewest leading experts ``j`` such that ``Σ_{i>j} w_i ≤ β · Σ_{i≤j} w_i`` (for top-2: skip the second
expert when ``w₂ ≤ β·w₁``). The kept experts keep their weights (the skipped terms are simply not
computed). β per layer is calibrated as the median of ``w₂ / w₁`` over calibration tokens
(:func:`analysis.metrics.skip_ratio_median`).

The thresholds travel with a saved model as ``config.moescope_skip_beta`` ({layer: β}); plain
``from_pretrained`` ignores that field (the model then routes as usual), and
:func:`analysis.model.load_moe` installs the routing patch when it finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moescope.analysis.model.layouts import ROUTER_OUTPUTS
from torch import Tensor

CONFIG_KEY = "moescope_skip_beta"


def skip_mask(weights: Tensor, beta: float) -> Tensor:
    """``[T, k]`` bool: which selected experts each token skips under threshold ``beta``."""
    w, order = weights.float().sort(dim=-1, descending=True)
    kept_mass = w.cumsum(-1)  # Σ_{i≤j}
    skipped_mass = w.sum(-1, keepdim=True) - kept_mass  # Σ_{i>j}
    ok = skipped_mass <= beta * kept_mass  # prefix j is enough
    # first j (0-based) where ok holds; the token keeps experts 0..j of the sorted order
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full_like(ok[:, 0], w.shape[1] - 1, dtype=torch.long))
    ranks = torch.arange(w.shape[1], device=w.device).expand_as(w)
    skip_sorted = ranks > first[:, None]
    return torch.zeros_like(skip_sorted).scatter(1, order, skip_sorted)


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
            weights = weights.masked_fill(skip, 0.0)
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
    """β per MoE layer: the median ``w₂ / w₁`` over the calibration tokens of a stored analysis."""
    return {l: float(analysis_result.scalars(l)["beta"]) for l in analysis_result.layers}
