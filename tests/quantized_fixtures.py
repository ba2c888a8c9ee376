"""Tiny checkpoints written in the layouts quantized MoE models are published in, and their
dequantized twins (the same weights, every quantized one replaced by its float32 value).

What each layout holds, as the released repositories have it:

* ``deepseek_v3_fp8`` (deepseek-ai/DeepSeek-V3): every Linear of attention and MLP (dense layers,
  routed and shared experts) as ``weight`` float8_e4m3fn + ``weight_scale_inv`` float32 per 128×128
  block; embeddings, norms, lm_head, the router ``mlp.gate.weight`` (bf16) and its
  ``e_score_correction_bias`` (float32) unquantized; ``quantization_config`` =
  ``{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}``.
* ``qwen3_moe_fp8`` (Qwen/Qwen3-30B-A3B-FP8): the same with ``weight_scale_inv`` in bf16 and a
  ``modules_to_not_convert`` list naming lm_head, the embeddings, each layer's norms and router.
* ``gpt_oss_mxfp4`` (openai/gpt-oss-20b): the experts' ``gate_up_proj_blocks`` /
  ``down_proj_blocks`` (uint8 [E, out, in/32, 16]) and ``*_scales`` (uint8 E8M0 [E, out, in/32]),
  biases, attention, router and embeddings in bf16; ``quantization_config`` =
  ``{"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
  "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}``.
* ``qwen3_moe_ct_fp8`` / ``mixtral_ct_fp8`` (llm-compressor ``FP8_DYNAMIC``): every Linear but
  lm_head and the routers as float8 ``weight`` + ``weight_scale`` [out, 1] (bf16), format
  ``float-quantized``, channel strategy, dynamic per-token activations, ``ignore`` naming lm_head
  and each router.
* ``qwen3_moe_ct_w4a16`` (llm-compressor ``W4A16``): ``weight_packed`` int32 [out, in/8],
  ``weight_scale`` bf16 [out, in/128], ``weight_shape`` int64 [2]; format ``pack-quantized``,
  group strategy, group_size 128, symmetric.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from moescope.analysis.model.quantization import Scheme, scheme_of
from moescope.analysis.model.synthetic import tiny_model
from safetensors.torch import load_file, save_file

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _ct_config(fmt: str, ignore: list[str]) -> dict:
    if fmt == "float-quantized":
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                   "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": True,
                   "type": "float"}
        acts = {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None, "num_bits": 8,
                "observer": None, "observer_kwargs": {}, "strategy": "token", "symmetric": True, "type": "float"}
    else:
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 128, "num_bits": 4,
                   "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int"}
        acts = None
    return {"config_groups": {"group_0": {"format": fmt, "input_activations": acts, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": fmt, "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": "0.12.2"}


LAYOUTS = {
    # family, tiny-config overrides (dimensions the 128 block divides, or shorter than one block)
    "deepseek_v3_fp8": ("deepseek_v3", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                            q_lora_rank=128, kv_lora_rank=96, qk_rope_head_dim=32,
                                            qk_nope_head_dim=32, v_head_dim=32, head_dim=32,
                                            num_attention_heads=4, num_key_value_heads=4)),
    "qwen3_moe_fp8": ("qwen3_moe", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                        head_dim=64)),
    "gpt_oss_mxfp4": ("gpt_oss", dict(hidden_size=64, intermediate_size=64, head_dim=16)),
    "qwen3_moe_ct_fp8": ("qwen3_moe", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                           head_dim=64)),
    "mixtral_ct_fp8": ("mixtral", dict(hidden_size=256, intermediate_size=128, head_dim=64)),
    "qwen3_moe_ct_w4a16": ("qwen3_moe", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                             head_dim=64)),
}


def _is_linear(name: str, t: torch.Tensor, layout: str) -> bool:
    if t.dim() != 2 or not name.endswith(".weight") or "layernorm" in name or "norm" in name.rpartition(".")[0][-6:]:
        return False
    if any(p in name for p in ("embed_tokens", "lm_head", "mlp.gate.weight", "block_sparse_moe.gate.weight")):
        return False
    return name.endswith(("proj.weight", "proj_with_mqa.weight", ".w1.weight", ".w2.weight", ".w3.weight"))


def _config(layout: str, raw: dict, names: list[str]) -> dict:
    layers = raw["num_hidden_layers"]
    if layout in ("deepseek_v3_fp8", "demo_fp8"):
        return dict(FP8_CONFIG)
    if layout == "qwen3_moe_fp8":
        skip = ["lm_head", "model.embed_tokens"]
        for l in range(layers):
            skip += [f"model.layers.{l}.{m}" for m in ("input_layernorm", "post_attention_layernorm",
                                                         "self_attn.q_norm", "self_attn.k_norm", "mlp.gate")]
        return {**FP8_CONFIG, "modules_to_not_convert": skip}
    if layout == "gpt_oss_mxfp4":
        return {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
    router = "mlp.gate"
    ignore = ["lm_head"] + [f"model.layers.{l}.{router}" for l in range(layers)]
    return _ct_config("pack-quantized" if layout.endswith("w4a16") else "float-quantized", ignore)


def publish(layout: str, out: Path, seed: int = 0, source: Path | None = None, **overrides) -> tuple[Path, Path]:
    """Write ``layout`` into ``out/quantized`` and its dequantized twin (float32) into
    ``out/twin``; returns both folders. ``source``: quantize this model folder (its other files,
    the tokenizer among them, copied) instead of a tiny random model (``layout`` then only names
    the scheme: ``*_fp8``, ``*_mxfp4``, ``*_ct_fp8``, ``*_ct_w4a16``)."""
    bf16 = out / "bf16"
    if source is not None:
        shutil.copytree(source, bf16, ignore=shutil.ignore_patterns("README.md", "*.json.lock"))
    else:
        family, sizes = LAYOUTS[layout]
        tiny_model(family, seed=seed, dtype=torch.bfloat16, **{**sizes, **overrides}).save_pretrained(bf16)
    raw = json.loads((bf16 / "config.json").read_text())
    sd = load_file(bf16 / "model.safetensors")
    qcfg = _config(layout, raw, list(sd))
    scheme: Scheme = scheme_of({"quantization_config": qcfg}, "fixture")
    stored: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if layout == "gpt_oss_mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored.update(scheme.quantize(name, t.float()))
        elif layout != "gpt_oss_mxfp4" and _is_linear(name, t, layout):
            like = {name[: -len(".weight")] + s: torch.bfloat16 for s in (".weight_scale_inv", ".weight_scale")}
            if layout in ("deepseek_v3_fp8", "demo_fp8"):  # float32 scales, as DeepSeek-V3 stores them
                like = {}
            stored.update(scheme.quantize(name, t.float(), like=like))
        else:
            stored[name] = t
    qdir, twin = out / "quantized", out / "twin"
    for d in (qdir, twin):
        d.mkdir(parents=True)
        for f in bf16.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, d / f.name)
    save_file(stored, qdir / "model.safetensors", metadata={"format": "pt"})
    (qdir / "config.json").write_text(json.dumps({**raw, "quantization_config": qcfg}, indent=2))
    deq = scheme.dequantize(stored)
    save_file({k: (v.float() if v.is_floating_point() else v) for k, v in deq.items()}, twin / "model.safetensors",
              metadata={"format": "pt"})
    (twin / "config.json").write_text(json.dumps({**raw, "dtype": "float32"}, indent=2))
    shutil.rmtree(bf16)
    return qdir, twin
