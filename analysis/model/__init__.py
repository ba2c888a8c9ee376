"""The model: a family-generic view over an MoE causal LM (:mod:`.view`), its structural edits
(:mod:`.edits`), loading (:mod:`.loading`), offloading (:mod:`.offload`) and output folders
(:mod:`.save`)."""

from moescope.analysis.model.edits import validate_groups
from moescope.analysis.model.loading import folder_fingerprint, load_config, load_moe, resolve_source, wrap_model
from moescope.analysis.model.offload import release_mapped_weights
from moescope.analysis.model.save import (
    MARKER_FILE,
    TOKENIZER_FILES,
    atomic_output_dir,
    check_output_dir,
)
from moescope.analysis.model.view import ExpertWeights, MoELayer, MoEModel, Routing

__all__ = ["MARKER_FILE", "TOKENIZER_FILES", "atomic_output_dir", "ExpertWeights", "MoELayer", "MoEModel", "Routing", "check_output_dir",
           "folder_fingerprint", "load_config", "load_moe", "release_mapped_weights",
           "resolve_source", "validate_groups", "wrap_model"]
