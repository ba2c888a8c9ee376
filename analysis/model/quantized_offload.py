"""A quantized checkpoint analysed layer by layer, dequantized as each decoder layer is used.

``load_moe(QUANTIZED, offload_dir=...)`` of a checkpoint in a scheme of
:mod:`analysis.model.quantization` builds the model on the meta device and keeps its decoder
layers there: accelerate's hooks (the same ones ``--offload`` uses) ask :class:`DequantizedLayers`
for a layer's tensors when the layer runs, and it reads that layer's stored tensors from the
safetensors, dequantizes them with the scheme's rule and brings them into transformers' in-memory
form with transformers' own load conversions (:class:`analysis.model.stream_export.Conversions`).
Only one decoder layer's dequantized tensors are held at a time, and nothing is written to disk
(accelerate's own offload would write a dequantized copy of every layer, four times the FP8 bytes
in float32). Embeddings, final norm and LM head are loaded into memory the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch


class DequantizedLayers(Mapping):
    """In-memory tensor name → its value, dequantized from the checkpoint in ``folder``; a decoder
    layer's tensors are computed together on first use and kept until another layer is asked for."""

    def __init__(self, folder: Path, hf, scheme, layers_path: str, dtype: torch.dtype):
        from moescope.analysis.model.stream_export import Conversions, source_tensors

        self.tensors = source_tensors(folder)
        self.scheme = scheme
        self.conv = Conversions(hf, list(self.tensors), dtype)
        for key in self.tensors:
            own = scheme.owner(key)
            if own is not None:
                self.conv.targets[key] = self.conv.target(own)
        self.dtype = dtype
        self.layer_re = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
        self.groups: dict[int | None, list[str]] = {}
        self.names: set[str] = set()
        meta = self.conv.meta
        for key, (name, _) in self.conv.targets.items():
            if name not in meta:
                continue  # a key the model does not have (loading drops it too)
            m = self.layer_re.match(name)
            self.groups.setdefault(int(m[1]) if m else None, []).append(key)
            self.names.add(name)
        self._held: tuple[int | None, dict[str, torch.Tensor]] | None = None

    def _group(self, name: str) -> int | None:
        m = self.layer_re.match(name)
        return int(m[1]) if m else None

    def __getitem__(self, name: str) -> torch.Tensor:
        from moescope.analysis.model.stream_export import read_tensor

        group = self._group(name)
        if self._held is None or self._held[0] != group:
            self._held = None  # release the previous layer first
            stored = {k: read_tensor(self.tensors[k]) for k in self.groups.get(group, [])}
            values = self.conv.forward(self.scheme.dequantize(stored))
            self._held = (group, values)
        values = self._held[1]
        if name not in values:
            raise KeyError(name)
        return values[name]

    def direct(self, name: str) -> torch.Tensor | None:
        """An unquantized tensor stored under its own name (a buffer), read alone."""
        from moescope.analysis.model.stream_export import read_tensor

        for key in self.groups.get(self._group(name), []):
            if self.conv.targets[key][0] == name and self.scheme.owner(key) is None \
                    and not self.scheme.is_quantized_key(key, self.tensors[key].dtype):
                return read_tensor(self.tensors[key])
        return None

    def __iter__(self):
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _non_persistent(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "_non_persistent_buffers_set", None))


def load(folder: Path, config, family, dtype: torch.dtype, scheme):
    """The causal LM of the quantized checkpoint ``folder`` with its decoder layers dequantized
    on use (see the module's docstring); embeddings, norms and head in memory."""
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import set_module_tensor_to_device
    from moescope.analysis.model.view import attr_path
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = DequantizedLayers(folder, hf, scheme, family.layers_path, dtype)
    layers = attr_path(hf, family.layers_path)
    persistent = hf.state_dict()
    for name in persistent:  # everything outside the decoder layers, in memory
        if weights._group(name) is None:
            value = weights[name] if name in weights.names else None
            if value is not None:
                set_module_tensor_to_device(hf, name, "cpu", value=value.to(persistent[name].dtype))
    for i, layer in enumerate(layers):  # persistent buffers of the layers (score-correction biases): small
        prefix = f"{family.layers_path}.{i}."
        for bname, _ in layer.named_buffers():
            full = prefix + bname
            value = weights.direct(full) if full in persistent else None
            if value is not None:
                set_module_tensor_to_device(hf, full, "cpu", value=value.to(persistent[full].dtype))
    hf.tie_weights()
    for module in hf.modules():  # rotary tables and other buffers no checkpoint holds
        if _non_persistent(module) and any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            hf._init_weights(module)
    for i, layer in enumerate(layers):
        attach_align_device_hook(layer, execution_device=torch.device("cpu"), offload=True, weights_map=weights,
                                 module_name=f"{family.layers_path}.{i}")
    return hf.eval()
