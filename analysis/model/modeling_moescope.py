"""Modelling code for a moescope export whose MoE layers keep different numbers of experts.

A transformers config holds one routed-expert count for the whole model, so a folder whose
layers keep 7, 6, 7, 6 experts cannot be built by the family's own class alone. This module
(copied verbatim into such a folder as ``modeling_moescope.py`` and registered in the config's
``auto_map``) subclasses the family's ``…ForCausalLM`` and, once the parent has built every
layer at the config's count (the largest of the layers), cuts each MoE layer down to its own
count: the router's rows (and router / score-correction biases), the fused expert tensors and
the modules' ``num_experts`` / ``out_features``. ``from_pretrained`` then loads the real
per-layer tensors into the cut shapes. The facts it needs are in the config, written by the
exporter:

* ``moescope_num_experts_per_layer``: ``{"<decoder layer>": count}`` for every MoE layer;
* ``moescope_moe_layout``: ``base_class`` (the family's class in ``transformers``),
  ``layers_path``, ``mlp_attr``, ``router_attr``, ``experts_attr``, ``router_weight`` and
  ``router_tensors`` (paths relative to the router, or to the MoE block after ``block.``; a
  ``[1, E]`` bias is cut along its last dimension) and ``expert_tensors`` (names of the
  per-expert tensors, first dimension = expert).

It imports only ``torch`` and ``transformers`` (never moescope), so loading needs nothing but
``trust_remote_code=True``. moescope uses this same module to load its exports without that flag.
"""

from __future__ import annotations

import transformers
from torch import nn

_CLASSES: dict[str, type] = {}


def _attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _walk(block: nn.Module, router: nn.Module, path: str):
    """(holder, attribute name) of ``path``: relative to ``router``, or to ``block`` after ``block.``."""
    obj, rest = (block, path[len("block."):]) if path.startswith("block.") else (router, path)
    *parents, last = rest.split(".")
    for part in parents:
        obj = getattr(obj, part, None)
        if obj is None:
            return None, last
    return obj, last


def _cut(module: nn.Module, name: str, n: int, where: str, dim: int = 0) -> None:
    """Keep the first ``n`` experts of ``module.<name>`` along ``dim`` (a parameter or a buffer,
    persistence kept)."""
    old = getattr(module, name)
    if old.shape[dim] < n:
        raise ValueError(f"{where}: '{name}' has {old.shape[dim]} experts, the config asks for {n}")
    new = old.detach().narrow(dim, 0, n).clone()
    if name in module._parameters:
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)  # an existing buffer stays a buffer with its persistence


def resize_moe_layers(model: nn.Module, config) -> None:
    """Cut each MoE layer of ``model`` to its count in ``config.moescope_num_experts_per_layer``."""
    counts = getattr(config, "moescope_num_experts_per_layer", None) or {}
    layout = config.moescope_moe_layout
    layers = _attr_path(model, layout["layers_path"])
    weight_path = layout.get("router_weight", "weight")
    for key, n in counts.items():
        n = int(n)
        where = f"layer {key}"
        block = getattr(layers[int(key)], layout["mlp_attr"])
        router = getattr(block, layout["router_attr"])
        experts = getattr(block, layout["experts_attr"])
        for name in layout["expert_tensors"]:
            _cut(experts, name, n, where)
        holders = [block, router, experts]
        for path in layout["router_tensors"]:
            holder, name = _walk(block, router, path)
            tensor = getattr(holder, name, None) if holder is not None else None
            if tensor is None:
                continue
            flat_bias = tensor.dim() == 2 and tensor.shape[0] == 1 and path != weight_path  # [1, E]
            _cut(holder, name, n, where, dim=1 if flat_bias else 0)
            if path == weight_path:
                holders.append(holder)
        for module in dict.fromkeys(holders):
            if hasattr(module, "num_experts"):
                module.num_experts = n
            if isinstance(module, nn.Linear):
                module.out_features = n


def moescope_class(base_name: str) -> type:
    """``Moescope<base_name>``: the family's causal-LM class with per-layer expert counts."""
    if base_name not in _CLASSES:
        base = getattr(transformers, base_name)

        class MoescopeForCausalLM(base):
            def __init__(self, config, *args, **kwargs):
                super().__init__(config, *args, **kwargs)
                resize_moe_layers(self, config)

        MoescopeForCausalLM.__name__ = MoescopeForCausalLM.__qualname__ = f"Moescope{base_name}"
        MoescopeForCausalLM.__doc__ = (f"{base_name} whose MoE layers keep the expert counts listed in "
                                       "config.moescope_num_experts_per_layer.")
        _CLASSES[base_name] = MoescopeForCausalLM
    return _CLASSES[base_name]
