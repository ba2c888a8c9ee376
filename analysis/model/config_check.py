"""One validator for every config value moescope reads, run on the raw ``config.json`` before
transformers or moescope builds anything from it: a bad value is one line naming the key, the
value and what is accepted, never a traceback later (a ZeroDivisionError in routing, a NaN
perplexity, a model of a million layers that never finishes building).

Checked (in the config and in its ``text_config``, when there is one): the model type is a
string; layer, expert, size, head and vocabulary counts are positive integers (expert counts at
least 1, ``0 ≤`` shared experts); 1 ≤ top-k ≤ experts; norm epsilons are positive finite numbers;
``max_position_embeddings`` is positive; no value anywhere is NaN, and none is infinite but an open
bound (``time_step_limit``); rotary ``rope_theta`` / scaling factors, ``routed_scaling_factor`` and
``swiglu_limit`` are positive, ``partial_rotary_factor`` in (0, 1]; ``n_group`` divides the experts
and ``1 ≤ topk_group ≤ n_group``; layer steps (``decoder_sparse_step``) are positive and
``first_k_dense_replace`` within the layers; ``norm_topk_prob`` is a boolean; the layer count is at most :data:`MAX_LAYERS` (a count
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
    _check_finite(raw, "", bad)
    for cfg, prefix in ((raw, ""), (raw.get("text_config"), "text_config.")):
        if isinstance(cfg, dict):
            _check_values(cfg, prefix, bad)
            _check_routing(cfg, prefix, bad)
    _check_own_keys(raw, bad)


# keys whose value may hold infinity by design (a bound that is open: Mamba's (0, inf) time-step clamp)
OPEN_BOUND_KEYS = ("time_step_limit",)
POSITIVE_KEYS = ("rope_theta", "routed_scaling_factor", "swiglu_limit", "factor", "original_max_position_embeddings",
                 "rope_interleave_factor", "scaling_factor")
BOOL_KEYS = ("norm_topk_prob", "tie_word_embeddings")
STEP_KEYS = ("decoder_sparse_step", "moe_layer_freq", "sparse_step")


def _check_finite(value, path: str, bad, depth: int = 0) -> None:
    """NaN anywhere in the config, and infinity outside the keys that mean an open bound, are
    refused naming the key (transformers reads them into rotary tables, router scales, clamps)."""
    if depth > 16:
        return
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value) or path.rsplit(".", 1)[-1].split("[")[0] not in OPEN_BOUND_KEYS:
            raise bad(path or "the config", value, "a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{path}.{k}" if path else str(k), bad, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}[{i}]", bad, depth + 1)


def _positive_values(cfg: dict, prefix: str):
    """(key path, value) of the positive-only numbers, in the config and in its rope settings
    (``rope_parameters`` / ``rope_scaling``, flat or one object per attention type)."""
    for key in POSITIVE_KEYS:
        if key in cfg and cfg[key] is not None:
            yield prefix + key, cfg[key]
    for rope_key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(rope_key)
        if not isinstance(rope, dict):
            continue
        nested = [(f"{rope_key}.{k}", v) for k, v in rope.items() if isinstance(v, dict)] or [(rope_key, rope)]
        for where, params in nested:
            for key in POSITIVE_KEYS:
                if params.get(key) is not None:
                    yield f"{prefix}{where}.{key}", params[key]
            prf = params.get("partial_rotary_factor")
            if prf is not None and (not _is_number(prf) or not 0 < prf <= 1):
                yield f"{prefix}{where}.partial_rotary_factor", ("(0, 1]", prf)


def _check_routing(cfg: dict, prefix: str, bad) -> None:
    """Rotary, router-scale and routing-group values transformers computes with, before it does:
    positive scales, group counts that divide the experts, ``topk_group ≤ n_group``, non-zero layer
    steps, booleans that are booleans."""
    for key, value in _positive_values(cfg, prefix):
        if isinstance(value, tuple):  # a value with its own range
            raise bad(key, value[1], f"a number in {value[0]}")
        if not _is_number(value) or value <= 0:
            raise bad(key, value, "a positive finite number")
    prf = cfg.get("partial_rotary_factor")
    if prf is not None and (not _is_number(prf) or not 0 < prf <= 1):
        raise bad(prefix + "partial_rotary_factor", prf, "a number in (0, 1]")
    for key in BOOL_KEYS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            raise bad(prefix + key, value, "true or false (a JSON boolean, not a string or number)")
    for key in STEP_KEYS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, list) and (not _is_int(value) or value < 1):
            raise bad(prefix + key, value, "a positive whole number (every how many layers one is MoE)")
    layers = cfg.get(LAYERS_KEY)
    first = cfg.get("first_k_dense_replace")
    if first is not None and (not _is_int(first) or first < 0 or (_is_int(layers) and first > layers)):
        top = f" to {layers}" if _is_int(layers) else " or more"
        raise bad(prefix + "first_k_dense_replace", first, f"a whole number from 0{top} (the leading dense layers)")
    n_group, topk_group = cfg.get("n_group"), cfg.get("topk_group")
    if n_group is not None and (not _is_int(n_group) or n_group < 1):
        raise bad(prefix + "n_group", n_group, "a positive whole number (routing groups)")
    if topk_group is not None:
        if not _is_int(topk_group) or topk_group < 1:
            raise bad(prefix + "topk_group", topk_group, "a positive whole number (routing groups chosen per token)")
        if _is_int(n_group) and topk_group > n_group:
            raise bad(prefix + "topk_group", topk_group, f"at most n_group = {n_group} (groups chosen of those there are)")
    experts = next((cfg[k] for k in EXPERT_KEYS if _is_int(cfg.get(k))), None)
    if _is_int(n_group) and experts is not None and experts % n_group:
        raise bad(prefix + "n_group", n_group, f"a divisor of the {experts} routed experts (equal routing groups)")


def _check_values(cfg: dict, prefix: str, bad) -> None:
    layers = cfg.get(LAYERS_KEY)
    if layers is not None and (not _is_int(layers) or not 1 <= layers <= MAX_LAYERS):
        raise bad(prefix + LAYERS_KEY, layers, f"a whole number from 1 to {MAX_LAYERS}")
    for key in SIZE_KEYS + EXPERT_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
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
