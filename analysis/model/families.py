"""What moescope knows about each MoE family, declared as data.

In transformers 5 every family we support has the same shape:
``model.layers[i].mlp.{gate|router, experts.gate_up_proj [E, 2I, d], experts.down_proj [E, d, I]}``
and differs in a handful of facts: the config key of the routed-expert count, where the router
lives, the routing rule, router / score-correction biases, shared experts and the expert storage
form (see :mod:`analysis.layouts`). One :class:`FamilySpec` per family records those facts; the generic
view in :mod:`analysis.model` reads them. Module paths were checked against tiny models built
from each family's config class (see ``tests/test_families.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moescope.analysis.core.errors import unknown_name


@dataclass(frozen=True)
class FamilySpec:
    """The facts about one MoE family that the generic adapter needs.

    Attributes:
        name: moescope's name for the family (used in messages and ``info``).
        model_types: ``config.model_type`` values handled by this spec.
        num_experts_key: config attribute holding the routed-expert count.
        router_attr: attribute of the MoE block holding the router module (``top_k`` is read there).
        routing: key of the routing rule in :data:`analysis.routing.ROUTING_RULES`.
        renormalize: whether top-k weights are renormalised to sum to 1; ``None`` means
            "read ``norm_topk_prob`` off the router, else off the config".
        router_float32: the router computes its logits in float32 whatever the model dtype.
        cast_weights_to_logits_dtype: top-k weights are cast back to the logits dtype.
        router_weight_attr: where the ``[E, d]`` router weight sits, relative to the router.
        router_bias_attr: additive logit bias ``[E]`` (GPT-OSS), relative to the router.
        score_bias_attr: selection-only score-correction bias ``[E]`` (DeepSeek-V3), which changes
            which experts win but not their weights, relative to the router.
            Paths are dotted; a leading ``block.`` resolves from the MoE block instead (AFMoE,
            MiniMax-M2, Hunyuan V3 and LFM2 keep the bias on the block).
        param_attrs: ``(RouterParams field, path)`` pairs for router parameters stored under
            another name (``route_scale``, ``router_scaling_factor``, …); paths as above, or
            ``config.<key>``. Unlisted fields are read from the router's usual attribute names.
        shared_attr / shared_gate_attr: shared expert(s) and their sigmoid gate, never pruned.
        shared_combine_attr: block attribute saying how shared and routed outputs combine:
            ``"sum"`` or ``"average"`` (Cohere 2 halves both).
        expert_layout: storage form of the routed experts, a key of
            :data:`analysis.layouts.LAYOUTS`.
        scores_on_input: the routing weights scale each expert's input rather than its output
            (Llama 4: ``E(w·x)``).
        block_returns_tuple: the MoE block's forward returns ``(hidden, router_scores)``.
        router_returns: what the router module's forward returns, a key of
            :data:`analysis.layouts.ROUTER_OUTPUTS` (``(logits, weights, idx)`` for all but Llama 4).
        mlp_attr: attribute of a decoder layer holding its MoE block (dense layers lack experts).
        final_norm_attr: the decoder's final norm (``norm``; Jamba ``final_layernorm``, LFM2
            ``embedding_norm``).
        logit_multiplier_key / logit_divisor_key: config keys the causal-LM head multiplies /
            divides its logits by (Cohere ``logit_scale``, Granite ``logits_scaling``).
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_key: str
    router_attr: str
    routing: str
    renormalize: bool | None
    router_float32: bool = False
    cast_weights_to_logits_dtype: bool = False
    router_weight_attr: str = "weight"
    router_bias_attr: str | None = None
    score_bias_attr: str | None = None
    param_attrs: tuple[tuple[str, str], ...] = ()
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    shared_combine_attr: str | None = None
    expert_layout: str = "gate_up"
    scores_on_input: bool = False
    block_returns_tuple: bool = False
    router_returns: str = "logits_weights_idx"
    experts_attr: str = "experts"
    layers_path: str = "model.layers"
    mlp_attr: str = "mlp"
    final_norm_attr: str = "norm"
    logit_multiplier_key: str | None = None
    logit_divisor_key: str | None = None

    def scale_logits(self, logits, config):
        """The LM head's output as the family's causal LM returns it."""
        if self.logit_multiplier_key:
            logits = logits * getattr(config, self.logit_multiplier_key)
        if self.logit_divisor_key:
            logits = logits / getattr(config, self.logit_divisor_key)
        return logits

    @property
    def group_limited(self) -> bool:
        """The router picks experts within routing groups that edits must keep equal in size."""
        from moescope.analysis.model.routing import GROUP_LIMITED_RULES

        return self.routing in GROUP_LIMITED_RULES

    def describe_routing(self, renormalize: bool) -> str:
        """Human-readable routing rule, as shown by ``moescope info`` and ``moescope families``."""
        renorm = " → renormalise" if renormalize else ""
        if self.routing == "softmax_topk":
            bias = " (chosen on p + selection bias)" if self.score_bias_attr else ""
            return "softmax → top-k" + bias + (renorm or " (no renormalisation)")
        if self.routing == "softmax_group_topk":
            return "softmax → group-limited top-k (group max)" + renorm + " → × routed scaling factor"
        if self.routing == "sigmoid_group_topk":
            return (
                "sigmoid scores" + (" + correction bias" if self.score_bias_attr else "")
                + " → group-limited top-k" + renorm + " → × routed scaling factor"
            )
        if self.routing == "topk_softmax":
            bias = " + router bias" if self.router_bias_attr else ""
            return f"logits{bias} → top-k → softmax over the k"
        if self.routing == "topk_sigmoid":
            return "logits → top-k → sigmoid of the k" + (" × expert input" if self.scores_on_input else "")
        if self.routing == "sparsemixer":
            return "sparsemixer top-2 (inference: masked softmax per pick)"
        return self.routing


def _spec(name, num_experts_key, router_attr, routing, renormalize, **kw) -> FamilySpec:
    return FamilySpec(name=name, model_types=kw.pop("model_types", (name,)), num_experts_key=num_experts_key,
                      router_attr=router_attr, routing=routing, renormalize=renormalize, **kw)


# DeepSeek-V3's router (sigmoid + score-correction bias + group-limited top-k, float32) and block
# (``gate``, ``experts``, ungated ``shared_experts``) are reused verbatim by many families.
_DSV3 = dict(router_float32=True, score_bias_attr="e_score_correction_bias", shared_attr="shared_experts")

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        _spec("mixtral", "num_local_experts", "gate", "softmax_topk", True),
        _spec("qwen2_moe", "num_experts", "gate", "softmax_topk", None, cast_weights_to_logits_dtype=True,
              shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
        _spec("qwen3_moe", "num_experts", "gate", "softmax_topk", None, cast_weights_to_logits_dtype=True),
        _spec("olmoe", "num_experts", "gate", "softmax_topk", None, cast_weights_to_logits_dtype=True),
        _spec("deepseek_v3", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("phimoe", "num_local_experts", "router", "sparsemixer", False),
        _spec("gpt_oss", "num_local_experts", "router", "topk_softmax", False, router_bias_attr="bias",
              expert_layout="gpt_oss", block_returns_tuple=True),
        # ---- DeepSeek-V3 router and block under other names
        _spec("glm4_moe", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("glm4_moe_lite", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("deepseek_v32", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("dots1", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("solar_open", "n_routed_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("exaone_moe", "num_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("kimi_linear", "num_experts", "gate", "sigmoid_group_topk", None, **_DSV3),
        _spec("mimo_v2_flash", "n_routed_experts", "gate", "sigmoid_group_topk", None,
              **{**_DSV3, "shared_attr": None}),
        # ---- other sigmoid routers
        _spec("minimax_m2", "num_local_experts", "gate", "sigmoid_group_topk", True,
              score_bias_attr="block.e_score_correction_bias"),
        _spec("hy_v3", "num_experts", "gate", "sigmoid_group_topk", True, router_float32=True,
              score_bias_attr="block.e_score_correction_bias", shared_attr="shared_experts",
              param_attrs=(("routed_scaling_factor", "router_scaling_factor"),)),
        _spec("afmoe", "num_experts", "router", "sigmoid_group_topk", True, router_weight_attr="gate.weight",
              score_bias_attr="block.expert_bias", shared_attr="shared_experts",
              param_attrs=(("routed_scaling_factor", "route_scale"),)),
        _spec("laguna", "num_experts", "gate", "sigmoid_group_topk", True,
              score_bias_attr="e_score_correction_bias", shared_attr="shared_experts",
              param_attrs=(("routed_scaling_factor", "block.routed_scaling_factor"),
                           ("logit_softcap", "router_logit_softcapping"))),
        _spec("lfm2_moe", "num_experts", "gate", "sigmoid_group_topk", None, score_bias_attr="block.expert_bias",
              mlp_attr="feed_forward", final_norm_attr="embedding_norm"),
        # ---- softmax routers
        _spec("deepseek_v2", "n_routed_experts", "gate", "softmax_group_topk", False, router_float32=True,
              shared_attr="shared_experts", param_attrs=(("topk_method", "topk_method"),)),
        _spec("qwen3_next", "num_experts", "gate", "softmax_topk", None, cast_weights_to_logits_dtype=True,
              shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
        _spec("qwen3_5_moe", "num_experts", "gate", "softmax_topk", True, cast_weights_to_logits_dtype=True,
              shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
              model_types=("qwen3_5_moe", "qwen3_5_moe_text")),
        _spec("flex_olmo", "num_experts", "gate", "softmax_topk", None, cast_weights_to_logits_dtype=True),
        _spec("minimax", "num_local_experts", "gate", "softmax_topk", True),
        _spec("jamba", "num_experts", "router", "softmax_topk", False, cast_weights_to_logits_dtype=True,
              mlp_attr="feed_forward", final_norm_attr="final_layernorm"),
        _spec("hunyuan_v1_moe", "num_experts", "gate", "softmax_topk", True, router_weight_attr="wg.weight",
              cast_weights_to_logits_dtype=True, shared_attr="shared_mlp"),
        _spec("ernie4_5_moe", "moe_num_experts", "gate", "softmax_topk", True, router_float32=True,
              cast_weights_to_logits_dtype=True, score_bias_attr="moe_statics.e_score_correction_bias",
              shared_attr="shared_experts"),
        # ---- top-k of the logits first
        _spec("granitemoe", "num_local_experts", "router", "topk_softmax", False, cast_weights_to_logits_dtype=True,
              mlp_attr="block_sparse_moe", logit_divisor_key="logits_scaling"),
        _spec("granitemoeshared", "num_local_experts", "router", "topk_softmax", False,
              cast_weights_to_logits_dtype=True, mlp_attr="block_sparse_moe", logit_divisor_key="logits_scaling"),
        _spec("granitemoehybrid", "num_local_experts", "router", "topk_softmax", False,
              cast_weights_to_logits_dtype=True, mlp_attr="block_sparse_moe", logit_divisor_key="logits_scaling"),
        _spec("cohere2_moe", "num_experts", "gate", "topk_softmax", None, cast_weights_to_logits_dtype=True,
              shared_attr="shared_experts", shared_combine_attr="shared_expert_combination_strategy",
              param_attrs=(("score_fn", "expert_selection_fn"),), logit_multiplier_key="logit_scale"),
        _spec("llama4_text", "num_local_experts", "router", "topk_sigmoid", False, expert_layout="llama4",
              scores_on_input=True, shared_attr="shared_expert", block_returns_tuple=True,
              router_returns="scores_logits", model_types=("llama4_text", "llama4"),
              mlp_attr="feed_forward"),
    )
}

_BY_MODEL_TYPE = {mt: spec for spec in FAMILIES.values() for mt in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise unknown_name("family", name, FAMILIES) from None
