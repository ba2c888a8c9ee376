"""Tiny randomly initialised models of every supported family (tests, benchmarks, examples).

Each is built from the family's own transformers config class, so module paths, routing code and
save/load conversions are the real ones; only the sizes are small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moescope.analysis.errors import unknown_name

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


TINY_CONFIGS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
}


def tiny_config(family: str, **overrides):
    """A small config of ``family`` (hidden 32, 8 routed experts, top-2)."""
    try:
        build = TINY_CONFIGS[family]
    except KeyError:
        raise unknown_name("family", family, TINY_CONFIGS) from None
    return build(**overrides)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of ``family``, in eval mode, float32.

    Router weights and biases get a larger random scale than the default init (which is zeros
    for some families) so that routing actually varies between tokens.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("router.bias", "gate_up_proj_bias", "down_proj_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model.eval()


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``family`` as a transformers folder (no tokenizer)."""
    out = Path(out_dir)
    tiny_model(family, seed=seed, **overrides).save_pretrained(out)
    return out
