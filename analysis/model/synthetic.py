"""Tiny randomly initialised models of every supported family (tests, benchmarks, examples).

Each is built from the family's own transformers config class, so module paths, routing code and
save/load conversions are the real ones; only the sizes are small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from moescope.analysis.core.errors import unknown_name

_COMMON = dict(
    vocab_size=256,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def _mixtral(**kw):
    from transformers import MixtralConfig

    return MixtralConfig(**{**_COMMON, "intermediate_size": 48, "num_hidden_layers": 2,
                            "num_local_experts": 8, "num_experts_per_tok": 2, **kw})


def _qwen2_moe(**kw):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**_COMMON, "intermediate_size": 64, "moe_intermediate_size": 24,
                             "shared_expert_intermediate_size": 40, "num_hidden_layers": 3,
                             "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False,
                             "mlp_only_layers": [1], "decoder_sparse_step": 1, **kw})


def _qwen3_moe(**kw):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**_COMMON, "intermediate_size": 64, "moe_intermediate_size": 24,
                             "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
                             "norm_topk_prob": True, "head_dim": 8, **kw})


def _olmoe(**kw):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**_COMMON, "intermediate_size": 24, "num_hidden_layers": 2,
                          "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False, **kw})


def _deepseek_v3(**kw):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4, "intermediate_size": 64,
                               "moe_intermediate_size": 16, "num_hidden_layers": 3,
                               "first_k_dense_replace": 1, "n_routed_experts": 8, "n_shared_experts": 1,
                               "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                               "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                               "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                               "qk_nope_head_dim": 4, "v_head_dim": 8, "head_dim": 4, **kw})


def _phimoe(**kw):
    from transformers import PhimoeConfig

    return PhimoeConfig(**{**_COMMON, "intermediate_size": 24, "num_hidden_layers": 2,
                           "num_local_experts": 8, "num_experts_per_tok": 2, **kw})


def _gpt_oss(**kw):
    from transformers import GptOssConfig

    return GptOssConfig(**{**_COMMON, "intermediate_size": 24, "num_hidden_layers": 2, "head_dim": 8,
                           "num_local_experts": 8, "num_experts_per_tok": 2,
                           "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}, **kw})


def _cfg(class_name: str, layers: int = 2, _over: dict | None = None, **defaults):
    """A config of transformers' ``class_name`` with moescope's small common sizes, ``defaults``
    and the caller's overrides ``_over`` (which win)."""
    import transformers

    return getattr(transformers, class_name)(**{**_COMMON, "num_hidden_layers": layers, **defaults, **(_over or {})})


def _types(pattern: list[str], layers: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(layers)]


_DS_ATTN = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                v_head_dim=8, head_dim=4)  # DeepSeek-style multi-head latent attention, tiny


def _glm_like(class_name: str, layers: int = 3, dense_first: bool = True, _over: dict | None = None, **kw):
    """DeepSeek-V3-style families: sigmoid router with score-correction bias, one shared expert."""
    base = dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True)
    if dense_first:
        base["mlp_layer_types"] = ["dense"] + ["sparse"] * (layers - 1)
    return _cfg(class_name, layers, _over, **{**base, **kw})


def _glm4_moe(**kw):
    return _glm_like("Glm4MoeConfig", head_dim=8, first_k_dense_replace=1, _over=kw)


def _glm4_moe_lite(**kw):
    return _glm_like("Glm4MoeLiteConfig", **_DS_ATTN, first_k_dense_replace=1, _over=kw)


def _solar_open(**kw):
    return _glm_like("SolarOpenConfig", dense_first=False, head_dim=8, first_k_dense_replace=1, _over=kw)


def _dots1(**kw):
    return _glm_like("Dots1Config", dense_first=False, head_dim=8, first_k_dense_replace=1, _over=kw)


def _deepseek_v32(**kw):
    return _glm_like("DeepseekV32Config", dense_first=False, **_DS_ATTN, first_k_dense_replace=1, n_group=2,
                     topk_group=1, index_topk=8, index_head_dim=8, index_n_heads=2, _over=kw)


def _mimo_v2_flash(**kw):
    return _glm_like("MiMoV2FlashConfig", head_dim=8, v_head_dim=8,
                     layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=16,
                     _over=kw)


def _exaone_moe(**kw):
    return _cfg("ExaoneMoeConfig", 3, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                num_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                norm_topk_prob=True, head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"],
                layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16,
                first_k_dense_replace=1, _over=kw)


def _kimi_linear(**kw):
    return _cfg("KimiLinearConfig", 3, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                num_shared_experts=1, num_experts_per_token=2, num_expert_group=1, topk_group=1,
                routed_scaling_factor=2.0, moe_renormalize=True, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=8, linear_head_dim=8,
                linear_num_heads=4, mlp_layer_types=["dense", "sparse", "sparse"],
                layer_types=["linear_attention", "full_attention", "linear_attention"], _over=kw)


def _deepseek_v2(**kw):
    return _cfg("DeepseekV2Config", 3, **_DS_ATTN, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5, _over=kw)


def _qwen3_next(**kw):
    return _cfg("Qwen3NextConfig", 3, intermediate_size=64, moe_intermediate_size=16,
                shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                linear_num_value_heads=4, mlp_only_layers=[1], decoder_sparse_step=1,
                layer_types=["linear_attention", "full_attention", "linear_attention"], _over=kw)


def _qwen3_5_moe(**kw):
    return _cfg("Qwen3_5MoeTextConfig", 2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                num_experts=8, num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"], _over=kw)


def _flex_olmo(**kw):
    return _cfg("FlexOlmoConfig", intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                _over=kw)


def _jamba(**kw):
    return _cfg("JambaConfig", 4, intermediate_size=24, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
                expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=4, mamba_d_conv=2,
                mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, _over=kw)


def _minimax(**kw):
    return _cfg("MiniMaxConfig", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                layer_types=["linear_attention", "full_attention"], block_size=8, _over=kw)


def _minimax_m2(**kw):
    return _cfg("MiniMaxM2Config", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                _over=kw)


_GRANITE_SCALES = dict(embedding_multiplier=4.0, logits_scaling=2.0, residual_multiplier=0.5)


def _granitemoe(**kw):
    return _cfg("GraniteMoeConfig", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                **_GRANITE_SCALES, _over=kw)


def _granitemoeshared(**kw):
    return _cfg("GraniteMoeSharedConfig", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                shared_intermediate_size=32, **_GRANITE_SCALES, _over=kw)


def _granitemoehybrid(**kw):
    return _cfg("GraniteMoeHybridConfig", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                shared_intermediate_size=32, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16, **_GRANITE_SCALES, _over=kw)


def _hunyuan_v1_moe(**kw):
    return _cfg("HunYuanMoEV1Config", intermediate_size=24, num_experts=8, moe_topk=2, head_dim=8, _over=kw)


def _ernie4_5_moe(**kw):
    return _cfg("Ernie4_5_MoeConfig", 3, intermediate_size=64, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
                moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
                _over=kw)


def _afmoe(**kw):
    return _cfg("AfmoeConfig", 3, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, route_scale=1.5, head_dim=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16,
                global_attn_every_n_layers=2, _over=kw)


def _hy_v3(**kw):
    return _cfg("HYV3Config", 3, intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                num_shared_experts=1, router_scaling_factor=2.5, head_dim=8,
                mlp_layer_types=["dense", "sparse", "sparse"], _over=kw)


def _laguna(**kw):
    return _cfg("LagunaConfig", 3, intermediate_size=64, moe_intermediate_size=16,
                shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8,
                num_attention_heads_per_layer=[4, 4, 4], layer_types=["full_attention"] * 3,
                mlp_layer_types=["dense", "sparse", "sparse"], moe_routed_scaling_factor=1.5,
                moe_router_logit_softcapping=2.0, _over=kw)


def _lfm2_moe(**kw):
    return _cfg("Lfm2MoeConfig", 3, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                layer_types=["conv", "full_attention", "conv"], _over=kw)


def _cohere2_moe(**kw):
    return _cfg("Cohere2MoeConfig", intermediate_size=24, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                shared_expert_combination_strategy="average", expert_selection_fn="softmax", head_dim=8,
                layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"],
                sliding_window=16, _over=kw)


def _llama4_text(**kw):
    return _cfg("Llama4TextConfig", 3, intermediate_size=24, intermediate_size_mlp=48, num_local_experts=8,
                num_experts_per_tok=2, moe_layers=[0, 2], head_dim=8, attention_chunk_size=16,
                layer_types=["chunked_attention", "full_attention", "chunked_attention"], no_rope_layers=[1, 0, 1],
                _over=kw)


TINY_CONFIGS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
    "glm4_moe": _glm4_moe,
    "glm4_moe_lite": _glm4_moe_lite,
    "solar_open": _solar_open,
    "dots1": _dots1,
    "deepseek_v32": _deepseek_v32,
    "mimo_v2_flash": _mimo_v2_flash,
    "exaone_moe": _exaone_moe,
    "kimi_linear": _kimi_linear,
    "deepseek_v2": _deepseek_v2,
    "qwen3_next": _qwen3_next,
    "qwen3_5_moe": _qwen3_5_moe,
    "flex_olmo": _flex_olmo,
    "jamba": _jamba,
    "minimax": _minimax,
    "minimax_m2": _minimax_m2,
    "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoeshared,
    "granitemoehybrid": _granitemoehybrid,
    "hunyuan_v1_moe": _hunyuan_v1_moe,
    "ernie4_5_moe": _ernie4_5_moe,
    "afmoe": _afmoe,
    "hy_v3": _hy_v3,
    "laguna": _laguna,
    "lfm2_moe": _lfm2_moe,
    "cohere2_moe": _cohere2_moe,
    "llama4_text": _llama4_text,
}


def tiny_config(family: str, **overrides):
    """A small config of ``family`` (hidden 32, 8 routed experts, top-2)."""
    try:
        build = TINY_CONFIGS[family]
    except KeyError:
        raise unknown_name("family", family, TINY_CONFIGS) from None
    return build(**overrides)


_SCORE_BIASES = ("e_score_correction_bias", "expert_bias")  # selection-only router biases (buffers or parameters)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM of ``family``, in eval mode, in ``dtype`` (modules the
    family keeps in float32, such as score-correction biases, stay float32 as when loading).

    Router weights and biases get a larger random scale than the default init (which is zeros
    for some families) so that routing actually varies between tokens.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "wg.weight")) and p.dim() == 2:
                p.copy_(torch.randn(tuple(p.shape), generator=g) * 0.5)
            elif name.endswith(("router.bias", "gate_up_proj_bias", "down_proj_bias")):
                p.copy_(torch.randn(tuple(p.shape), generator=g) * 0.1)
            elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.copy_(torch.randn(tuple(p.shape), generator=g) * 0.2)
            elif name.endswith(_SCORE_BIASES):
                p.copy_(torch.randn(tuple(p.shape), generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith(_SCORE_BIASES):
                b.copy_(torch.randn(tuple(b.shape), generator=g) * 0.05)
    return model.eval()


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``family`` as a transformers folder (no tokenizer)."""
    out = Path(out_dir)
    tiny_model(family, seed=seed, **overrides).save_pretrained(out)
    return out
