"""The model floor: a family-generic view over an MoE causal LM (:mod:`.view`), its structural edits
(:mod:`.edits`), loading (:mod:`.loading`), offloading (:mod:`.offload`) and output folders
(:mod:`.save`), plus the family facts, routing rules, merging arithmetic and export format.

The names below are imported on first use (PEP 562), so light modules of this floor
(``families``, ``family_catalog``, ``model_info``, ``paths``-like readers) start without torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "validate_groups": "edits",
    "files_fingerprint": "loading", "folder_fingerprint": "loading", "load_config": "loading", "load_moe": "loading",
    "resolve_source": "loading", "wrap_model": "loading",
    "release_mapped_weights": "offload",
    "MARKER_FILE": "save", "TOKENIZER_FILES": "save", "atomic_output_dir": "save", "check_output_dir": "save",
    "ExpertWeights": "view", "MoELayer": "view", "MoEModel": "view", "Routing": "view",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
