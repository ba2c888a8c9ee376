"""Every model type the installed transformers offers with an MoE block, and what moescope does
with it: ``supported`` (a :class:`~analysis.families.FamilySpec`, proved exact on a tiny model),
``refused`` (cannot be edited exactly: the reason says why) or ``not yet`` (what is missing).

The list of MoE model types is read from the installed transformers itself (a model type whose
modelling code defines an experts / MoE block / top-k router class), so a newer transformers
shows its new families here as "not yet" until someone adds them. ``moescope families`` prints
it; ``moescope families --markdown`` writes the README's table.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.families import _BY_MODEL_TYPE, FAMILIES, FamilySpec, supported_model_types

# ---- families that cannot be edited exactly (the reason is shown at load and in the catalog)
_CAPACITY = ("capacity-limited top-1 routing (an expert drops the tokens beyond its capacity, in batch "
             "order): a token's output depends on the other tokens in the batch, so no per-token edit is exact")
REFUSED: dict[str, str] = {
    "jetmoe": "mixture of attention heads (MoA): routed query/output projections share the layer's key/value "
              "projections, so attention experts cannot be removed or merged on their own",
    "doge": "product-key retrieval experts (16K one-neuron experts addressed by pairs of router keys): each key "
            "is shared by a whole row or column of experts, so one expert cannot be removed alone",
    "deepseek_v4": "hash-routed layers pick experts from a frozen token-id table (tid2eid): removing an expert "
                   "leaves the tokens hashed to it with no expert, which changes what the table means",
    "switch_transformers": _CAPACITY,
    "nllb-moe": _CAPACITY,
    "vitpose_backbone": "not a routed MoE: each expert is a per-dataset output head chosen by the dataset index",
}

_MULTIMODAL = ("multimodal checkpoint: moescope loads text-only causal LMs; its language model is a "
               "routed-FFN MoE that could be supported")
# ---- MoE model types not supported yet, with what is missing
NOT_YET: dict[str, str] = {
    "dbrx": "experts stored as flat [E·I, d] w1/v1/w2 matrices: a storage form analysis.layouts lacks",
    "longcat_flash": "identity 'zero-computation' experts share the router with the FFN experts: edits must "
                     "keep the two kinds apart",
    "nemotron_h": "non-gated relu² experts (up/down only, optional latent projection): a storage form "
                  "analysis.layouts lacks",
    "openai_privacy_filter": "token classifier, not a causal LM",
    "diffusion_gemma": "diffusion text model, not a causal LM",
    "diffusion_gemma_text": "diffusion text model, not a causal LM",
}
_NOT_YET_DEFAULT = "routed-FFN MoE without a tiny-model proof yet (spec and tiny config missing)"
_SUBMODEL = re.compile(r"(vision|audio|encoder|talker|thinker|code_predictor|mm_model|sam_)")
_MOE_CLASS = re.compile(r"^class \w*(Experts|MoE|Moe|MOE|SparseMoeBlock|TopKRouter|TopkRouter)\w*\(", re.M)


@dataclass(frozen=True)
class CatalogEntry:
    model_type: str
    status: str  # supported | refused | not yet
    family: str | None = None  # moescope family (supported)
    routing: str | None = None
    shared_experts: str | None = None
    expert_layout: str | None = None
    reason: str | None = None  # refused / not yet: why

    def to_json(self) -> dict:
        return asdict(self)


def _describe(spec: FamilySpec) -> dict:
    from moescope.analysis.model.layouts import LAYOUT_DESCRIPTIONS

    renorm = spec.renormalize
    routing = spec.describe_routing(renorm is not False)
    if renorm is None:
        routing = routing.replace(" → renormalise", " → renormalise if norm_topk_prob")
    if spec.param_attrs and dict(spec.param_attrs).get("score_fn"):
        routing += " (sigmoid instead of softmax per expert_selection_fn)"
    if spec.shared_attr is None:
        shared = "none"
    else:
        shared = f"{spec.shared_attr}" + (" (sigmoid-gated)" if spec.shared_gate_attr else "")
        if spec.shared_combine_attr:
            shared += " (sum or average per config)"
    return {"family": spec.name, "routing": routing, "shared_experts": shared,
            "expert_layout": LAYOUT_DESCRIPTIONS.get(spec.expert_layout, spec.expert_layout)}


@functools.lru_cache(maxsize=1)
def transformers_moe_model_types() -> tuple[str, ...]:
    """Model types of the installed transformers whose modelling code defines an MoE block
    (sub-model configs of multimodal models — vision / audio encoders, talkers — are left out)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        folder = root / model_type_to_module_name(model_type)
        if _SUBMODEL.search(model_type) or not folder.is_dir():
            continue
        if any(_MOE_CLASS.search(f.read_text(encoding="utf-8")) for f in folder.glob("modeling_*.py")):
            found.append(model_type)
    return tuple(sorted(found))


def _is_multimodal(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in ("llama4", "qwen3_5_moe")


def entry(model_type: str) -> CatalogEntry:
    """The catalog entry of one model type (any model type: non-MoE ones come back as not yet)."""
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return CatalogEntry(model_type, "supported", **_describe(spec))
    if model_type in REFUSED:
        return CatalogEntry(model_type, "refused", reason=REFUSED[model_type])
    if model_type in NOT_YET:
        return CatalogEntry(model_type, "not yet", reason=NOT_YET[model_type])
    return CatalogEntry(model_type, "not yet", reason=_MULTIMODAL if _is_multimodal(model_type) else _NOT_YET_DEFAULT)


def catalog() -> list[CatalogEntry]:
    """Every MoE model type of the installed transformers plus every supported one, sorted."""
    types = set(transformers_moe_model_types()) | {mt for s in FAMILIES.values() for mt in s.model_types}
    types |= set(REFUSED)
    return [entry(mt) for mt in sorted(types)]


def refusal(model_type: str) -> str | None:
    """Why ``model_type`` cannot be loaded (refused or not yet), or None if it is supported or
    unknown to the catalog."""
    e = entry(model_type)
    if e.status == "supported":
        return None
    if e.status == "refused" or model_type in NOT_YET or model_type in transformers_moe_model_types():
        return f"{e.status}: {e.reason}"
    return None


def markdown(entries: list[CatalogEntry] | None = None) -> str:
    """The README's family table."""
    entries = catalog() if entries is None else entries
    import transformers

    counts = {s: sum(e.status == s for e in entries) for s in ("supported", "refused", "not yet")}
    lines = [
        f"{counts['supported']} model types supported, {counts['refused']} refused, {counts['not yet']} not yet "
        f"(generated by `moescope families --markdown` from transformers {transformers.__version__}).",
        "",
        "| model type | status | routing rule / reason | shared experts | expert layout |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        if e.status == "supported":
            fam = f" (`{e.family}`)" if e.family != e.model_type else ""
            lines.append(f"| `{e.model_type}`{fam} | supported | {e.routing} | {e.shared_experts} | {e.expert_layout} |")
        else:
            lines.append(f"| `{e.model_type}` | {e.status} | {e.reason} | | |")
    return "\n".join(lines) + "\n"


def family_for(config) -> FamilySpec:
    """The spec for a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None) or "?"
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        reason = refusal(model_type)
        if reason:
            raise MoescopeError(f"'{model_type}' ({archs}) is an MoE family moescope does not edit — {reason}")
        raise MoescopeError(
            f"unsupported architecture '{model_type}' ({archs}): moescope supports the MoE families "
            f"{', '.join(supported_model_types())}"
        )
    return spec
