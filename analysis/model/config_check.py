"""One validator for every config value moescope reads, run on the raw ``config.json`` before
transformers or moescope builds anything from it: a bad value is one line naming the key, the
value and what is accepted, never a traceback later (a ZeroDivisionError in routing, a NaN
perplexity, a model of a million layers that never finishes building).

Checked (in the config and in its ``text_config``, when there is one): the model type is a
string; layer, expert, size, head and vocabulary counts are positive integers (expert counts at
least 1, ``0 ≤`` shared experts); 1 ≤ top-k ≤ experts; norm epsilons are positive finite numbers;
``max_position_embeddings`` is positive; the layer count is at most :data:`MAX_LAYERS` (a count
that cannot make ``info`` hang); the dtype is one moescope computes in; and moescope's own keys
(``moescope_skip_beta``: finite β in [0, 1] for existing layers; ``moescope_num_experts_per_layer``:
a count per existing layer between top-k and the config's expert count; ``moescope_moe_layout``:
an object with the attribute paths of :func:`~moescope.analysis.model.nonuniform.layout`).
"""

from __future__ import annotations

import json
import math
import re

from moescope.analysis.core.errors import MoescopeError

MAX_LAYERS = 1024  # the deepest MoE models have ~100 decoder layers; building 10^6 never ends
LAYERS_KEY = "num_hidden_layers"
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "experts_per_token")
SIZE_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "layer_norm_epsilon")
SHARED_KEYS = ("n_shared_experts", "num_shared_experts")
DTYPES = ("float32", "float16", "bfloat16", "float64")
SKIP_KEY = "moescope_skip_beta"
COUNTS_KEY = "moescope_num_experts_per_layer"
LAYOUT_KEY = "moescope_moe_layout"
LAYOUT_FIELDS = {"base_class": str, "layers_path": str, "mlp_attr": str, "router_attr": str, "experts_attr": str,
                 "router_weight": str, "router_tensors": list, "expert_tensors": list}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _show(v) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:40] + "…"


def check_config(raw: dict, where: str) -> None:
    """Refuse, in one line, the first value of ``raw`` (a parsed ``config.json``) moescope cannot
    use; ``where`` names the file in the message."""
    def bad(key: str, value, accepted: str) -> MoescopeError:
        return MoescopeError(f"{where}: {key} is {_show(value)}; expected {accepted}")

    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise bad("model_type", model_type, "a string such as \"mixtral\"")
    for dkey in ("dtype", "torch_dtype"):
        value = raw.get(dkey)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in DTYPES):
            raise bad(dkey, value, f"one of {', '.join(DTYPES)}")
    for cfg, prefix in ((raw, ""), (raw.get("text_config"), "text_config.")):
        if isinstance(cfg, dict):
            _check_values(cfg, prefix, bad)
    _check_own_keys(raw, bad)


def _check_values(cfg: dict, prefix: str, bad) -> None:
    layers = cfg.get(LAYERS_KEY)
    if layers is not None and (not _is_int(layers) or not 1 <= layers <= MAX_LAYERS):
        raise bad(prefix + LAYERS_KEY, layers, f"a whole number from 1 to {MAX_LAYERS}")
    for key in SIZE_KEYS + EXPERT_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not _is_int(v) or v < 1:
                what = "an expert count" if key in EXPERT_KEYS else "a size"
                raise bad(prefix + key, value, f"a positive whole number ({what})")
    for key in SHARED_KEYS:
        value = cfg.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise bad(prefix + key, value, "a whole number ≥ 0")
    experts = [cfg[k] for k in EXPERT_KEYS if _is_int(cfg.get(k))]
    for key in TOPK_KEYS:
        k = cfg.get(key)
        if k is None:
            continue
        most = min(experts) if experts else None
        if not _is_int(k) or k < 1 or (most is not None and k > most):
            span = f"1 ≤ top-k ≤ the {most} experts" if most is not None else "a positive whole number"
            raise bad(prefix + key, k, span)
    for key in EPS_KEYS:
        value = cfg.get(key)
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            raise bad(prefix + key, value, "a positive finite number")
    value = cfg.get("max_position_embeddings")
    if value is not None and (not _is_int(value) or value < 1):
        raise bad(prefix + "max_position_embeddings", value, "a positive whole number")


def _layer_index(key, layers, what: str, bad) -> int:
    if not isinstance(key, str) or not re.fullmatch(r"0|[1-9][0-9]{0,8}", key):
        raise bad(f"a layer key of {what}", key, "a decoder-layer index written as a plain decimal number")
    if _is_int(layers) and int(key) >= layers:
        raise bad(f"a layer key of {what}", key, f"one of the layers 0..{layers - 1} of the {layers} decoder layers")
    return int(key)


def _check_own_keys(raw: dict, bad) -> None:
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    layers = raw.get(LAYERS_KEY, text.get(LAYERS_KEY))
    betas = raw.get(SKIP_KEY)
    if betas is not None:
        if not isinstance(betas, dict):
            raise bad(SKIP_KEY, betas, "an object {layer: β} with β in [0, 1]")
        for key, beta in betas.items():
            _layer_index(key, layers, SKIP_KEY, bad)
            if not _is_number(beta) or not math.isfinite(beta) or not 0 <= beta <= 1:
                raise bad(f"{SKIP_KEY}[{key}]", beta, "a number β in [0, 1]")
    counts = raw.get(COUNTS_KEY)
    if counts is None:
        if raw.get(LAYOUT_KEY) is not None:
            raise bad(LAYOUT_KEY, raw[LAYOUT_KEY], f"nothing without {COUNTS_KEY} (re-export the folder with moescope)")
        return
    if not isinstance(counts, dict) or not counts:
        raise bad(COUNTS_KEY, counts, "an object {layer: expert count} as moescope exports write it")
    cfgs = [raw, text]
    most = max((c[k] for c in cfgs for k in EXPERT_KEYS if _is_int(c.get(k))), default=None)
    top_k = max((c[k] for c in cfgs for k in TOPK_KEYS if _is_int(c.get(k))), default=1)
    for key, n in counts.items():
        _layer_index(key, layers, COUNTS_KEY, bad)
        if not _is_int(n) or n < top_k or (most is not None and n > most):
            span = f"from top-k {top_k} to the config's {most} experts" if most is not None else f"≥ top-k {top_k}"
            raise bad(f"{COUNTS_KEY}[{key}]", n, f"a whole number {span}")
    layout = raw.get(LAYOUT_KEY)
    if not isinstance(layout, dict):
        raise bad(LAYOUT_KEY, layout, "an object with the MoE attribute paths moescope exports write "
                  "(re-export the folder with moescope)")
    for name, kind in LAYOUT_FIELDS.items():
        value = layout.get(name)
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise bad(f"{LAYOUT_KEY}.{name}", value, f"a {'list of names' if kind is list else 'name'} "
                      "(re-export the folder with moescope)")
