"""moescope's vLLM plugin: serve exports whose MoE layers keep different numbers of experts.

vLLM builds a model from its own class for the config's ``architectures`` entry, and its MoE
classes read one routed-expert count from the config for every layer. A non-uniform moescope
export (:mod:`.nonuniform`) names ``Moescope<Family>ForCausalLM`` and lists each MoE layer's count
in ``config.moescope_num_experts_per_layer``. This module registers those names with vLLM's
``ModelRegistry`` (entry point ``moescope`` in the ``vllm.general_plugins`` group, which vLLM
loads in every process it starts), each as a subclass of vLLM's own class for the family that
builds every decoder layer at its own count: while the parent constructor runs, the family
module's ``make_layers`` is wrapped so that, for decoder layer ``i``, the config's count key reads
that layer's count while the layer is built, and the largest count otherwise. The weights are
loaded by vLLM's own loader into those real shapes: no padding, the memory is the export's.

Families served (:data:`SERVED`, one entry per transformers class; the same table decides at
export time which non-uniform plans are refused, :func:`.nonuniform.check_servable`): Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3 and GPT-OSS. This module imports neither
vLLM nor torch until vLLM asks for a class, and nothing of moescope but the lowest floor.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

COUNTS_KEY = "moescope_num_experts_per_layer"  # nonuniform.COUNTS_KEY is this one
PREFIX = "Moescope"

# transformers class -> (moescope family, vLLM module under vllm.model_executor.models, vLLM class,
# config key of the routed-expert count)
SERVED: dict[str, tuple[str, str, str, str]] = {
    "MixtralForCausalLM": ("mixtral", "mixtral", "MixtralForCausalLM", "num_local_experts"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "num_experts"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts"),
    "OlmoeForCausalLM": ("olmoe", "olmoe", "OlmoeForCausalLM", "num_experts"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", "n_routed_experts"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "deepseek_v2", "DeepseekV3ForCausalLM", "n_routed_experts"),
    "GptOssForCausalLM": ("gpt_oss", "gpt_oss", "GptOssForCausalLM", "num_local_experts"),
}
SERVED_FAMILIES = tuple(v[0] for v in SERVED.values())

_CLASSES: dict[str, type] = {}


def architecture(base_class: str) -> str:
    """The architecture name a non-uniform export of ``base_class`` carries (and vLLM serves
    through this plugin)."""
    return f"{PREFIX}{base_class}"


def register() -> None:
    """vLLM's plugin hook: register every ``Moescope<Family>ForCausalLM`` with ``ModelRegistry``
    (lazily, by ``module:class`` name, so no model code is imported before it is needed)."""
    from vllm import ModelRegistry

    for base in SERVED:
        name = architecture(base)
        ModelRegistry.register_model(name, f"{__name__}:{name}")


def __getattr__(name: str):
    """``Moescope<Family>ForCausalLM`` on first use (the name vLLM's registry imports)."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in SERVED:
        return served_class(name[len(PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layer_counts(config) -> dict[int, int]:
    counts = getattr(config, COUNTS_KEY, None) or {}
    return {int(k): int(v) for k, v in counts.items()}


@contextlib.contextmanager
def per_layer_counts(module, config, key: str, counts: dict[int, int]) -> Iterator[None]:
    """While the block runs, ``module.make_layers`` builds decoder layer ``i`` with
    ``config.<key> = counts[i]`` (layers not in ``counts`` see the config's own value)."""
    original = module.make_layers
    full = getattr(config, key)

    def make_layers(num_hidden_layers, layer_fn, prefix):
        def build(*, prefix):
            n = counts.get(int(prefix.rsplit(".", 1)[1]))
            if n is None:
                return layer_fn(prefix=prefix)
            setattr(config, key, n)
            try:
                return layer_fn(prefix=prefix)
            finally:
                setattr(config, key, full)

        return original(num_hidden_layers, build, prefix)

    module.make_layers = make_layers
    try:
        yield
    finally:
        module.make_layers = original


def _check_built(model, counts: dict[int, int], name: str) -> None:
    """Every counted decoder layer holds routed experts of exactly its count (a vLLM release whose
    class no longer reads the count where this plugin sets it fails here, not with wrong outputs)."""
    layers = model.model.layers
    for i, n in counts.items():
        seen = {m.global_num_experts for m in layers[i].modules()
                if isinstance(getattr(m, "global_num_experts", None), int)}
        if seen and seen != {n}:
            raise RuntimeError(f"{name}: decoder layer {i} was built with {sorted(seen)} experts, the config "
                               f"lists {n}; this vLLM release builds its MoE layers differently from the "
                               "one moescope's plugin was written for")


def served_class(base: str) -> type:
    """vLLM's class for ``base`` with every MoE layer built at the count its config lists."""
    if base in _CLASSES:
        return _CLASSES[base]
    _family, module_name, vllm_class, key = SERVED[base]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    parent = getattr(module, vllm_class)
    name = architecture(base)

    class Served(parent):
        def __init__(self, *, vllm_config, prefix: str = ""):
            config = vllm_config.model_config.hf_config
            counts = layer_counts(config)
            with per_layer_counts(module, config, key, counts):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            if getattr(getattr(self, "model", None), "is_fused_shared_expert_enabled", False) and counts:
                raise RuntimeError(f"{name}: vLLM fused the shared experts into the routed ones (slots after "
                                   f"{key}), which assumes one expert count per model; serve without fused "
                                   "shared experts")
            _check_built(self, counts, name)

    Served.__name__ = Served.__qualname__ = name
    Served.__module__ = __name__
    Served.__doc__ = f"vLLM's {vllm_class} with the per-layer expert counts of config.{COUNTS_KEY}."
    _CLASSES[base] = Served
    return Served
