"""Storage forms of routed experts, and where a family keeps its router tensors.

transformers 5 fuses each block's experts into 3-D tensors whose first axis is the expert, so
keeping or merging experts is a row operation on every fused tensor whatever the form; only
running one expert and reading its gate / up / down matrices depend on the form:

=========  ==========================================  ==========================================
layout     fused tensors                               one expert ``e`` on ``x [T, d]``
=========  ==========================================  ==========================================
gate_up    ``gate_up_proj [E, 2I, d]`` (gate then up),  ``down · (act(gate x) ⊙ up x)``
           ``down_proj [E, d, I]``                     (Mixtral, Qwen, DeepSeek, GLM, … most)
llama4     ``gate_up_proj [E, d, 2I]``, ``down_proj``   the same, transposed (Llama 4)
           ``[E, I, d]``
gpt_oss    ``gate_up_proj [E, d, 2I]`` gate/up          clamped SwiGLU with biases (GPT-OSS)
           interleaved + bias ``[E, 2I]``,
           ``down_proj [E, I, d]`` + bias ``[E, d]``
=========  ==========================================  ==========================================

Every form is a SwiGLU over I intermediate neurons, so permuting those neurons (the gate and up
rows, their biases, and the matching down columns) leaves the expert's function unchanged;
:attr:`Layout.neurons` says, per fused tensor, which axis of one expert's slice holds them and
how (:mod:`analysis.alignment` uses it to align experts before merging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ExpertWeights:
    """One routed expert in the standard orientation: ``down(act(gate x) * (up x))``."""

    gate: Tensor  # [I, d]
    up: Tensor  # [I, d]
    down: Tensor  # [d, I]
    gate_bias: Tensor | None = None  # [I]  (GPT-OSS)
    up_bias: Tensor | None = None  # [I]
    down_bias: Tensor | None = None  # [d]


@dataclass(frozen=True)
class Layout:
    """How to run and read one expert of a fused experts module ``ex`` from tensors ``t``
    (its parameters, or same-shaped replacements such as merged candidates or gradients)."""

    forward: Callable[[nn.Module, dict, int, Tensor], Tensor]
    weights: Callable[[dict, int], ExpertWeights]
    # expert e's intermediate activations on x [T, d]: the [T, I] vector its down projection reads
    intermediate: Callable[[nn.Module, dict, int, Tensor], Tensor]
    # fused tensor name -> (axis of one expert's slice, form): "halves" (2I: gate neurons then up
    # neurons), "interleaved" (2I: gate 2i, up 2i+1) or "plain" (I); tensors not listed (an output
    # bias) do not depend on the neuron order
    neurons: dict[str, tuple[int, str]]


def _gate_up_intermediate(ex, t, e, x):
    gate, up = nn.functional.linear(x, t["gate_up_proj"][e]).chunk(2, dim=-1)
    return ex.act_fn(gate) * up


def _gate_up_forward(ex, t, e, x):
    return nn.functional.linear(_gate_up_intermediate(ex, t, e, x), t["down_proj"][e])


def _gate_up_weights(t, e):
    gate, up = t["gate_up_proj"][e].chunk(2, dim=0)
    return ExpertWeights(gate=gate, up=up, down=t["down_proj"][e])


def _llama4_intermediate(ex, t, e, x):
    gate, up = (x @ t["gate_up_proj"][e]).chunk(2, dim=-1)
    return up * ex.act_fn(gate)


def _llama4_forward(ex, t, e, x):
    return _llama4_intermediate(ex, t, e, x) @ t["down_proj"][e]


def _llama4_weights(t, e):
    gate, up = t["gate_up_proj"][e].chunk(2, dim=-1)  # [d, I] each
    return ExpertWeights(gate=gate.T, up=up.T, down=t["down_proj"][e].T)


def _gpt_oss_intermediate(ex, t, e, x):
    return ex._apply_gate(x @ t["gate_up_proj"][e] + t["gate_up_proj_bias"][e])


def _gpt_oss_forward(ex, t, e, x):
    return _gpt_oss_intermediate(ex, t, e, x) @ t["down_proj"][e] + t["down_proj_bias"][e]


def _gpt_oss_weights(t, e):
    gu = t["gate_up_proj"][e]  # [d, 2I], gate and up interleaved
    gub = t.get("gate_up_proj_bias")
    return ExpertWeights(
        gate=gu[:, ::2].T, up=gu[:, 1::2].T, down=t["down_proj"][e].T,
        gate_bias=gub[e, ::2] if gub is not None else None,
        up_bias=gub[e, 1::2] if gub is not None else None,
        down_bias=t["down_proj_bias"][e] if t.get("down_proj_bias") is not None else None,
    )


LAYOUTS: dict[str, Layout] = {
    "gate_up": Layout(_gate_up_forward, _gate_up_weights, _gate_up_intermediate,
                      {"gate_up_proj": (0, "halves"), "down_proj": (1, "plain")}),
    "llama4": Layout(_llama4_forward, _llama4_weights, _llama4_intermediate,
                     {"gate_up_proj": (1, "halves"), "down_proj": (0, "plain")}),
    "gpt_oss": Layout(_gpt_oss_forward, _gpt_oss_weights, _gpt_oss_intermediate,
                      {"gate_up_proj": (1, "interleaved"), "gate_up_proj_bias": (0, "interleaved"),
                       "down_proj": (0, "plain")}),
}

LAYOUT_DESCRIPTIONS = {
    "gate_up": "fused gate_up [E,2I,d] + down [E,d,I]",
    "llama4": "fused, transposed: gate_up [E,d,2I] + down [E,I,d]",
    "gpt_oss": "fused, transposed, gate/up interleaved, biased, clamped SwiGLU",
}


# ---- router tensors addressed by dotted paths ------------------------------------------------
def resolve(block: nn.Module, router: nn.Module, path: str, config=None):
    """The object at ``path``: relative to ``router``, or to ``block`` after a ``block.`` prefix,
    or a config value after ``config.``; ``None`` where an attribute is missing."""
    if path.startswith("config."):
        return getattr(config, path[len("config."):], None)
    obj, rest = (block, path[len("block."):]) if path.startswith("block.") else (router, path)
    for part in rest.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def assign(block: nn.Module, router: nn.Module, path: str, value) -> None:
    """Set the attribute at ``path`` (as in :func:`resolve`) to ``value``."""
    obj, rest = (block, path[len("block."):]) if path.startswith("block.") else (router, path)
    *parents, last = rest.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def owner(block: nn.Module, router: nn.Module, path: str) -> nn.Module:
    """The module that holds the attribute at ``path``."""
    obj, rest = (block, path[len("block."):]) if path.startswith("block.") else (router, path)
    for part in rest.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


# ---- what a family's router module returns ---------------------------------------------------
def _unpack_triple(out, top_k):
    logits, weights, idx = out
    return logits, weights, idx


def _pack_triple(out, logits, weights, idx):
    return logits, weights, idx


def _unpack_dense(out, top_k):
    scores, logits = out  # [T, E]: the chosen experts' weights, 0 elsewhere (Llama 4)
    weights, idx = torch.topk(scores, top_k, dim=-1)
    return logits, weights, idx


def _pack_dense(out, logits, weights, idx):
    scores = torch.zeros_like(out[0]).scatter(1, idx, weights.to(out[0].dtype))
    return scores, logits


# router forward output ⇄ (logits [T, E], weights [T, k], idx [T, k]); a weight set to 0 drops
# that expert's contribution in every form (Llama 4 scales the expert input by it: E(0) = 0)
ROUTER_OUTPUTS = {
    "logits_weights_idx": (_unpack_triple, _pack_triple),
    "scores_logits": (_unpack_dense, _pack_dense),
}
