"""What moescope knows about each MoE family, declared as data.

In transformers 5 every family we support has the same shape:
``model.layers[i].mlp.{gate|router, experts.gate_up_proj [E, 2I, d], experts.down_proj [E, d, I]}``
and differs in a handful of facts: the config key of the routed-expert count, where the router
lives, the routing rule, router / score-correction biases, shared experts and GPT-OSS's transposed,
interleaved, biased experts. One :class:`FamilySpec` per family records those facts; the generic
view in :mod:`analysis.model` reads them. Module paths were checked against tiny models built
from each family's config class (see ``tests/test_families.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moescope.analysis.errors import MoescopeError, unknown_name


@dataclass(frozen=True)
class FamilySpec:
    """The facts about one MoE family that the generic adapter needs.

    Attributes:
        name: moescope's name for the family (used in messages and ``info``).
        model_types: ``config.model_type`` values handled by this spec.
        num_experts_key: config attribute holding the routed-expert count.
        router_attr: attribute of the MoE block holding the router module.
        routing: key of the routing rule in :data:`analysis.routing.ROUTING_RULES`.
        renormalize: whether top-k weights are renormalised to sum to 1; ``None`` means
            "read ``config.norm_topk_prob``".
        router_float32: the router computes its logits in float32 whatever the model dtype.
        cast_weights_to_logits_dtype: top-k weights are cast back to the logits dtype.
        router_bias_attr: router attribute holding an additive logit bias (GPT-OSS).
        score_bias_attr: router attribute holding a selection-only score-correction bias
            (DeepSeek-V3), which changes which experts win but not their weights.
        shared_attr / shared_gate_attr: shared expert(s) and their sigmoid gate, never pruned.
        expert_layout: ``"gate_up"`` (``[E, 2I, d]`` gate then up, ``[E, d, I]``) or
            ``"gpt_oss"`` (``[E, d, 2I]`` interleaved gate/up with biases, ``[E, I, d]``,
            clamped SwiGLU).
        block_returns_tuple: the MoE block's forward returns ``(hidden, router_scores)``.
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_key: str
    router_attr: str
    routing: str
    renormalize: bool | None
    router_float32: bool = False
    cast_weights_to_logits_dtype: bool = False
    router_bias_attr: str | None = None
    score_bias_attr: str | None = None
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    expert_layout: str = "gate_up"
    block_returns_tuple: bool = False
    experts_attr: str = "experts"
    layers_path: str = "model.layers"
    mlp_attr: str = "mlp"

    def describe_routing(self, renormalize: bool) -> str:
        """Human-readable routing rule, as shown by ``moescope info``."""
        if self.routing == "softmax_topk":
            return "softmax → top-k" + (" → renormalise" if renormalize else " (no renormalisation)")
        if self.routing == "sigmoid_group_topk":
            return (
                "sigmoid scores + correction bias → group-limited top-k"
                + (" → renormalise" if renormalize else "")
                + " → × routed scaling factor"
            )
        if self.routing == "topk_softmax":
            return "logits + router bias → top-k → softmax over the k"
        if self.routing == "sparsemixer":
            return "sparsemixer top-2 (inference: masked softmax per pick)"
        return self.routing


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="mixtral",
            model_types=("mixtral",),
            num_experts_key="num_local_experts",
            router_attr="gate",
            routing="softmax_topk",
            renormalize=True,
        ),
        FamilySpec(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            num_experts_key="num_experts",
            router_attr="gate",
            routing="softmax_topk",
            renormalize=None,
            cast_weights_to_logits_dtype=True,
            shared_attr="shared_expert",
            shared_gate_attr="shared_expert_gate",
        ),
        FamilySpec(
            name="qwen3_moe",
            model_types=("qwen3_moe",),
            num_experts_key="num_experts",
            router_attr="gate",
            routing="softmax_topk",
            renormalize=None,
            cast_weights_to_logits_dtype=True,
        ),
        FamilySpec(
            name="olmoe",
            model_types=("olmoe",),
            num_experts_key="num_experts",
            router_attr="gate",
            routing="softmax_topk",
            renormalize=None,
            cast_weights_to_logits_dtype=True,
        ),
        FamilySpec(
            name="deepseek_v3",
            model_types=("deepseek_v3",),
            num_experts_key="n_routed_experts",
            router_attr="gate",
            routing="sigmoid_group_topk",
            renormalize=None,
            router_float32=True,
            score_bias_attr="e_score_correction_bias",
            shared_attr="shared_experts",
        ),
        FamilySpec(
            name="phimoe",
            model_types=("phimoe",),
            num_experts_key="num_local_experts",
            router_attr="router",
            routing="sparsemixer",
            renormalize=False,
        ),
        FamilySpec(
            name="gpt_oss",
            model_types=("gpt_oss",),
            num_experts_key="num_local_experts",
            router_attr="router",
            routing="topk_softmax",
            renormalize=False,
            router_bias_attr="bias",
            expert_layout="gpt_oss",
            block_returns_tuple=True,
        ),
    )
}

_BY_MODEL_TYPE = {mt: spec for spec in FAMILIES.values() for mt in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(config) -> FamilySpec:
    """The spec for a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None) or "?"
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise MoescopeError(
            f"unsupported architecture '{model_type}' ({archs}): moescope supports the MoE families "
            f"{', '.join(supported_model_types())}"
        )
    return spec


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise unknown_name("family", name, FAMILIES) from None
