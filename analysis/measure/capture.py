"""Run a model one decoder layer at a time over a token batch.

The whole batch's hidden states move through layer ``l`` (in chunks of sequences), the MoE
block's input of that layer is handed to the caller, and the outputs become layer ``l+1``'s input;
only one layer's activations are alive at once. Nothing here knows a family's layer signature:
the per-layer keyword arguments (attention masks per layer type, rotary embeddings, position
ids) are recorded from the model's own forward with every decoder layer swapped for a recorder
that returns its input unchanged, so no layer's attention or experts run during that pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from moescope.analysis.model.view import MoEModel, attr_path
from torch import Tensor, nn


class _Recorder(nn.Module):
    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, dict(kwargs)))
        return hidden_states


def _decoder(model: MoEModel) -> nn.Module:
    """The ``model.model`` part that owns ``embed_tokens``, ``layers`` and ``norm``."""
    path = model.family.layers_path.rsplit(".", 1)[0]
    return attr_path(model.hf, path)


@torch.no_grad()
def record_layer_kwargs(model: MoEModel, input_ids: Tensor) -> tuple[Tensor, list[dict]]:
    """The first decoder layer's input ``[B, L, d]`` (embeddings, scaled where the family scales
    them, as Granite does) and the keyword arguments each decoder layer gets."""
    decoder = _decoder(model)
    real_layers = decoder.layers
    sink: list[dict] = []
    decoder.layers = nn.ModuleList([_Recorder(sink) for _ in real_layers])
    try:
        decoder(input_ids=input_ids, use_cache=False)
    finally:
        decoder.layers = real_layers
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")} for _, kw in sink]
    return sink[0][0], kwargs


@dataclass
class LayerStream:
    """Hidden states of a token batch at the current layer, in chunks of sequences."""

    model: MoEModel
    input_ids: Tensor  # [N, L]
    chunk_size: int = 8
    hidden: list[Tensor] = field(default_factory=list)  # per chunk [B, L, d]
    kwargs: list[list[dict]] = field(default_factory=list)  # per chunk, per layer
    layer: int = 0  # index of the next layer to run

    def __post_init__(self):
        self.device = next(self.model.hf.parameters()).device
        for start in range(0, self.input_ids.shape[0], self.chunk_size):
            ids = self.input_ids[start : start + self.chunk_size].to(self.device)
            h, kw = record_layer_kwargs(self.model, ids)
            self.hidden.append(h)
            self.kwargs.append(kw)

    @property
    def token_ids(self) -> Tensor:  # [T] in the order of the flattened hidden states
        return self.input_ids.reshape(-1)

    def clone(self) -> LayerStream:
        """A copy that can run further layers without touching this stream's hidden states."""
        other = LayerStream.__new__(LayerStream)
        other.model, other.input_ids, other.chunk_size = self.model, self.input_ids, self.chunk_size
        other.device, other.layer, other.kwargs = self.device, self.layer, self.kwargs
        other.hidden = [h.clone() for h in self.hidden]
        return other

    @torch.no_grad()
    def step(self, capture_moe_input: bool = True) -> Tensor | None:
        """Run the next decoder layer on every chunk; return that layer's MoE-block input
        ``[T, d]`` (concatenated over chunks) when it is an MoE layer and capture is asked."""
        l = self.layer
        layer = attr_path(self.model.hf, self.model.family.layers_path)[l]
        captured: list[Tensor] = []
        handle = None
        if capture_moe_input and l in self.model.layers:
            block = self.model.layers[l].block

            def grab(_module, args):
                captured.append(args[0].reshape(-1, args[0].shape[-1]).detach())

            handle = block.register_forward_pre_hook(grab)
        try:
            for c, h in enumerate(self.hidden):
                out = layer(h, **self.kwargs[c][l])
                self.hidden[c] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        self.layer += 1
        if getattr(self.model, "offloaded", False):
            from moescope.analysis.model import release_mapped_weights

            release_mapped_weights()  # the layer's weights were read through memory maps
        return torch.cat(captured) if captured else None

    @torch.no_grad()
    def step_split(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Run the next decoder layer (an MoE layer) and return, per chunk, its MoE block input
        ``[B, L, d]``, the residual stream the block's output is added to (the layer output
        minus the block output) and the block's output, so the block alone can be re-run with
        other experts: ``layer output = residual + block(input)``."""
        l = self.layer
        block = self.model.layers[l].block
        seen: list[tuple[Tensor, Tensor]] = []

        def grab(_module, args, out):
            seen.append((args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach()))

        handle = block.register_forward_hook(grab)
        try:
            self.step(capture_moe_input=False)
        finally:
            handle.remove()
        inputs = [x for x, _ in seen]
        outputs = [y.reshape(h.shape) for h, (_, y) in zip(self.hidden, seen)]
        residuals = [h - y for h, y in zip(self.hidden, outputs)]
        return inputs, residuals, outputs

    def layers(self, capture_moe_input: bool = True) -> Iterator[tuple[int, Tensor | None]]:
        """Run all remaining layers, yielding ``(layer index, MoE input or None)`` after each."""
        n = len(attr_path(self.model.hf, self.model.family.layers_path))
        while self.layer < n:
            l = self.layer
            yield l, self.step(capture_moe_input)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and LM head on hidden states taken after the last layer (and the family's
        logit scaling, as Cohere and Granite apply it)."""
        spec = self.model.family
        norm = getattr(_decoder(self.model), spec.final_norm_attr)
        return spec.scale_logits(self.model.hf.get_output_embeddings()(norm(hidden)), self.model.config)

    @torch.no_grad()
    def logits_per_chunk(self) -> Iterator[Tensor]:
        """Logits of every chunk's current hidden states (after the last layer)."""
        for h in self.hidden:
            yield self.logits(h)


def nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood (nats) of ``targets [...]`` under ``logits [..., V]``:
    ``logsumexp(z) − z[y]`` in float32 (the log-softmax itself is never materialised)."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets.to(z.device).unsqueeze(-1)).squeeze(-1)


def token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token NLL of every predicted token of ``input_ids [B, L]``: ``[B, L-1]``."""
    return nll(logits[:, :-1], input_ids[:, 1:])


def next_token_nll(logits: Tensor, input_ids: Tensor) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over every predicted token, and their count."""
    nll = token_nll(logits, input_ids)
    return float(nll.sum()), int(nll.numel())
