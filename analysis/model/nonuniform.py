"""moescope's folder format for models whose MoE layers keep different numbers of experts.

Writing (:func:`finish_config`, called by ``MoEModel.save`` after ``save_pretrained``): a
non-uniform model's ``config.json`` gets the count of every MoE layer, the layout facts the
remote module needs (attribute names from the :class:`FamilySpec`), ``auto_map`` pointing at
``modeling_moescope.Moescope<Family>ForCausalLM`` and the module itself, copied from
:mod:`analysis.modeling_moescope`; the family's count key holds the largest layer's count. A
uniform model's config is the plain family one (no moescope keys, no ``auto_map`` entry).

Serving: vLLM builds such a folder only through moescope's plugin (:mod:`.vllm_plugin`), which
serves the families in ``vllm_plugin.SERVED``; the config says so under :data:`VLLM_KEY` (the
architecture to use with the plugin, and that there is none without it), and
:func:`check_servable` refuses at export time a non-uniform plan of any other family unless the
caller asks for a transformers-only folder.

Reading (:func:`model_class`): moescope recognises its own format and builds the same class from
its own copy of the module, so ``load_moe`` needs no ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import modeling_moescope, vllm_plugin

COUNTS_KEY = vllm_plugin.COUNTS_KEY  # "moescope_num_experts_per_layer"
LAYOUT_KEY = "moescope_moe_layout"
MODULE_NAME = "modeling_moescope"
MODULE_FILE = f"{MODULE_NAME}.py"
VLLM_KEY = "moescope_vllm"  # {"with_plugin": architecture or null, "without_plugin": null, "plugin": how}
VLLM_PLUGIN_NOTE = ("moescope's vLLM plugin: pip install moescope into vLLM's environment "
                    "(entry point 'moescope' in the vllm.general_plugins group)")


def is_uniform(counts: dict[int, int]) -> bool:
    return len(set(counts.values())) <= 1


def base_class_name(hf_model) -> str:
    """The family's own ``transformers`` class of ``hf_model`` (skipping moescope's subclass)."""
    for cls in type(hf_model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    raise MoescopeError(f"{type(hf_model).__name__} is not a transformers class; moescope can export "
                        "per-layer expert counts only for models built from a transformers family class")


def layout(model) -> dict:
    """The attribute paths ``modeling_moescope.resize_moe_layers`` needs (from the FamilySpec):
    router tensors as paths relative to the router, or to the MoE block after ``block.``, exactly
    the tensors :meth:`MoEModel.merge` rewrites."""
    spec = model.family
    first = model.layers[model.moe_layers[0]]
    return {
        "base_class": base_class_name(model.hf),
        "layers_path": spec.layers_path,
        "mlp_attr": spec.mlp_attr,
        "router_attr": spec.router_attr,
        "experts_attr": spec.experts_attr,
        "router_weight": spec.router_weight_attr,
        "router_tensors": [a for a in (spec.router_weight_attr, spec.router_bias_attr, spec.score_bias_attr) if a],
        "expert_tensors": first.expert_param_names(),
    }


def class_name(base: str) -> str:
    return vllm_plugin.architecture(base)


def vllm_servable(base: str) -> bool:
    """Whether moescope's vLLM plugin serves a non-uniform export of transformers class ``base``."""
    return base in vllm_plugin.SERVED


def check_servable(family: str, counts: dict[int, int], transformers_only: bool = False) -> None:
    """Refuse, before anything is written, a non-uniform export that vLLM could not serve: the
    plugin serves the families of ``vllm_plugin.SERVED`` (a layer keeping fewer experts than top-k is
    refused earlier, by the plan's own validation). ``transformers_only`` accepts it anyway, for a
    folder meant for transformers alone."""
    if transformers_only or is_uniform(counts) or family in vllm_plugin.SERVED_FAMILIES:
        return
    per_layer = "/".join(str(n) for _, n in sorted(counts.items()))
    raise MoescopeError(f"this {family} plan keeps different expert counts per layer ({per_layer}); vLLM serves such "
                        f"a folder only through moescope's plugin, which serves {', '.join(vllm_plugin.SERVED_FAMILIES)}: "
                        "keep the same count in every layer (a uniform plan exports to the plain class), or export "
                        "for transformers only (--transformers-only)")


def vllm_config(base: str) -> dict:
    """The :data:`VLLM_KEY` entry of a non-uniform export of ``base``: the architecture vLLM builds
    with moescope's plugin (None where the plugin does not serve the family) and without it (none:
    vLLM's own classes hold one expert count per model)."""
    return {"with_plugin": class_name(base) if vllm_servable(base) else None, "without_plugin": None,
            "plugin": VLLM_PLUGIN_NOTE}


def finish_config(model, out: Path) -> None:
    """Rewrite ``out/config.json`` (just written by ``save_pretrained``) for the model's counts;
    for a non-uniform model also write ``modeling_moescope.py``."""
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    counts = model.num_experts()
    base = base_class_name(model.hf)
    # only moescope's own entry: a base model's auto_map names module files this folder does not
    # carry, and a dangling entry breaks from_pretrained(..., trust_remote_code=True)
    auto_map = {}
    cfg.pop(COUNTS_KEY, None)
    cfg.pop(LAYOUT_KEY, None)
    cfg.pop(VLLM_KEY, None)
    cfg.pop("auto_map", None)
    cfg["architectures"] = [base]
    if not is_uniform(counts):
        cls = class_name(base)
        cfg[model.family.num_experts_key] = max(counts.values())
        cfg[COUNTS_KEY] = {str(i): n for i, n in sorted(counts.items())}
        cfg[LAYOUT_KEY] = layout(model)
        cfg[VLLM_KEY] = vllm_config(base)
        auto_map["AutoModelForCausalLM"] = f"{MODULE_NAME}.{cls}"
        cfg["architectures"] = [cls]
        (out / MODULE_FILE).write_text(module_source(base), encoding="utf-8")
    if auto_map:
        cfg["auto_map"] = auto_map
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def foreign_auto_map(config) -> dict:
    """The entries of ``config.auto_map`` that are not moescope's own (custom code of the base model's
    repository); an export drops them (:func:`finish_config`) and its model card says so."""
    auto_map = getattr(config, "auto_map", None) or {}
    if not isinstance(auto_map, dict):
        return {"auto_map": auto_map}
    return {k: v for k, v in auto_map.items() if not str(v).startswith(f"{MODULE_NAME}.")}


def module_source(base: str) -> str:
    """The remote-code module for ``base``: the template verbatim plus the class the config names."""
    template = Path(modeling_moescope.__file__).read_text(encoding="utf-8")
    return (template.rstrip() + "\n\n\n# The class this folder's config.json names in auto_map.\n"
            f"{class_name(base)} = moescope_class({base!r})\n")


def per_layer_counts(config) -> dict[int, int] | None:
    """The per-layer counts of a moescope export's config, or None for a plain config."""
    counts = getattr(config, COUNTS_KEY, None)
    if not counts:
        return None
    return {int(k): int(v) for k, v in counts.items()}


def model_class(config) -> type | None:
    """The class that builds a moescope per-layer-count folder (None for a plain config)."""
    if per_layer_counts(config) is None:
        return None
    lay = getattr(config, LAYOUT_KEY, None) or {}
    import transformers

    base = lay.get("base_class") if isinstance(lay, dict) else None
    cls = getattr(transformers, base, None) if isinstance(base, str) and base.isidentifier() else None
    config_class = getattr(cls, "config_class", None)
    if cls is None or getattr(config_class, "model_type", None) != config.model_type:
        raise MoescopeError(f"the config lists per-layer expert counts ({COUNTS_KEY}) but its {LAYOUT_KEY} names "
                            f"no transformers class of model type '{config.model_type}' (base_class={base!r}); "
                            "re-export the folder with moescope")
    return modeling_moescope.moescope_class(base)
