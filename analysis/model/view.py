"""One view over every supported MoE family, and exact structural edits.

An :class:`MoEModel` is the transformers model plus, for each MoE decoder layer ``l``, a
:class:`MoELayer` giving the router (weight, bias, score-correction bias), the routed experts as
per-expert weights over transformers 5's fused tensors, the shared experts, the family's routing
rule ``route(hidden) -> (logits, topk_idx, topk_weights)`` and ``expert_forward(e, hidden)`` (one
expert on any tokens, router bypassed). Loading lives in :mod:`.loading`, the group checks and row
arithmetic of the edits in :mod:`.edits`, output folders in :mod:`.save`.

Edits (:meth:`MoEModel.keep`, :meth:`MoEModel.merge`) rewrite the fused tensors and router rows
in place and update the config, so the edited model is still a plain transformers model that
``save`` writes in the hub layout and ``AutoModelForCausalLM.from_pretrained`` reloads (layers left
with different expert counts are saved in moescope's per-layer format, :mod:`analysis.nonuniform`,
which ``load_moe`` reads as is and plain transformers with ``trust_remote_code=True``). Every
method that changes the model says so in its name (keep, merge, temporary_edit, restricted).

The view and the edit methods that must keep its invariants are one job, hence the file's length.

Shapes: T tokens, d hidden size, E routed experts, I expert intermediate size, k top-k.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.dtypes import cast_for_writing
from moescope.analysis.model.edits import combine_rows, onehot_of_largest, validate_groups
from moescope.analysis.model.families import FamilySpec
from moescope.analysis.model.layouts import LAYOUTS, ExpertWeights, assign, owner, resolve
from moescope.analysis.model.routing import ROUTING_RULES, RouterParams
from moescope.analysis.model.save import TOKENIZER_FILES, atomic_output_dir
from torch import Tensor, nn


@dataclass
class Routing:
    """The router's decision for T tokens."""

    logits: Tensor  # [T, E] raw router logits (incl. router bias where the family has one)
    topk_idx: Tensor  # [T, k] chosen experts
    topk_weights: Tensor  # [T, k] their mixing weights


def attr_path(obj, path: str):
    """``getattr`` along a dotted ``path`` (``"model.layers"``)."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class MoELayer:
    """A live view of one MoE block: reads always reflect the current (possibly edited) tensors."""

    def __init__(self, model: MoEModel, index: int, block: nn.Module):
        self.model = model
        self.index = index
        self.block = block
        self.spec: FamilySpec = model.family

    # ---- parts -------------------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.spec.router_attr)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.spec.experts_attr)

    @property
    def shared(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_attr, None) if self.spec.shared_attr else None

    @property
    def shared_gate(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_gate_attr, None) if self.spec.shared_gate_attr else None

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def _router_path(self, path: str | None):
        return resolve(self.block, self.router, path, self.model.config) if path else None

    @property
    def router_weight(self) -> Tensor:  # [E, d]
        return self._router_path(self.spec.router_weight_attr)

    @property
    def router_bias(self) -> Tensor | None:  # [E]
        return self._router_path(self.spec.router_bias_attr)

    @property
    def score_bias(self) -> Tensor | None:  # [E] (ERNIE stores it as [1, E])
        return self._router_path(self.spec.score_bias_attr)

    def router_tensors(self) -> dict[str, Tensor]:
        """The router's per-expert tensors by role: ``weight [E, d]``, and where the family has
        them ``bias [E]`` and ``score_bias [E]`` (flattened)."""
        out = {"weight": self.router_weight}
        for role, t in (("bias", self.router_bias), ("score_bias", self.score_bias)):
            if t is not None:
                out[role] = t.reshape(-1)
        return out

    @property
    def shared_scale(self) -> float:
        """1, or ½ where the family averages shared and routed outputs (Cohere 2)."""
        attr = self.spec.shared_combine_attr
        if attr and self.shared is not None and getattr(self.block, attr, "sum") == "average":
            return 0.5
        return 1.0

    @property
    def renormalize(self) -> bool:
        if self.spec.renormalize is not None:
            return self.spec.renormalize
        return bool(getattr(self.router, "norm_topk_prob", getattr(self.model.config, "norm_topk_prob", False)))

    @property
    def router_params(self) -> RouterParams:
        r = self.router
        extra = {f: self._router_path(path) for f, path in self.spec.param_attrs}
        extra = {f: v for f, v in extra.items() if v is not None}
        params = RouterParams(**{
            "top_k": self.top_k,
            "renormalize": self.renormalize,
            "cast_weights_to_logits_dtype": self.spec.cast_weights_to_logits_dtype,
            "score_bias": self.score_bias,
            "n_group": int(getattr(r, "num_group", 1) or 1),
            "topk_group": int(getattr(r, "topk_group", 1) or 1),
            "routed_scaling_factor": float(getattr(r, "routed_scaling_factor", 1.0) or 1.0),
            "jitter_eps": float(getattr(r, "router_jitter_noise", 0.0) or 0.0),
            **extra,
        })
        if self.shared_scale != 1.0:  # (routed + shared) / 2 = ½·routed + ½·shared
            from dataclasses import replace

            params = replace(params, routed_scaling_factor=params.routed_scaling_factor * self.shared_scale)
        return params

    # ---- computation -------------------------------------------------------------------------
    def router_logits(self, hidden: Tensor) -> Tensor:
        """``[T, d] -> [T, E]`` router logits (float32 where the family computes them so)."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.router_weight, self.router_bias
        if self.spec.router_float32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        elif hidden.dtype != weight.dtype:  # a router kept in its own dtype (Hunyuan's float32 wg)
            hidden = hidden.to(weight.dtype)
        return nn.functional.linear(hidden, weight, bias)

    def route(self, hidden: Tensor, allowed: Tensor | None = None) -> Routing:
        """The family's routing rule on ``hidden [T, d]``; ``allowed [E]`` restricts the choice."""
        logits = self.router_logits(hidden)
        idx, weights = ROUTING_RULES[self.spec.routing](logits, self.router_params, allowed)
        return Routing(logits=logits, topk_idx=idx, topk_weights=weights)

    def expert_forward(self, e: int, hidden: Tensor, tensors: dict[str, Tensor] | None = None) -> Tensor:
        """Expert ``e`` on ``hidden [T, d]`` with the router bypassed (weight 1): ``[T, d]``.

        ``tensors`` replaces the fused expert parameters by same-layout tensors (e.g. merged
        candidates that carry gradients)."""
        ex = self.experts
        t = tensors if tensors is not None else ex._parameters
        return LAYOUTS[self.spec.expert_layout].forward(ex, t, e, hidden)

    def expert_outputs(self, hidden: Tensor, logits: Tensor | None = None, tensors: dict[str, Tensor] | None = None,
                       params: RouterParams | None = None) -> Tensor:
        """Every expert on every token, ``[E, T, d]``, ready for :func:`analysis.routing.mix` with
        :meth:`mix_weights`. Where the family scales the expert input (Llama 4), an expert's weight
        depends on its own logit only (no renormalisation), so expert ``e`` runs on ``w_e(x)·x`` and
        mixes with weight 1; ``logits`` / ``params`` (default: this router's) give ``w_e``."""
        n = (tensors or self.experts._parameters)["gate_up_proj"].shape[0]
        if not self.spec.scores_on_input:
            return torch.stack([self.expert_forward(e, hidden, tensors) for e in range(n)])
        from dataclasses import replace

        logits = self.router_logits(hidden) if logits is None else logits
        idx, w = ROUTING_RULES[self.spec.routing](logits, replace(params or self.router_params, top_k=n), None)
        W = torch.zeros_like(w).scatter(1, idx, w).to(hidden.dtype)  # [T, E] every expert's own weight
        return torch.stack([self.expert_forward(e, hidden * W[:, e, None], tensors) for e in range(n)])

    def mix_weights(self, weights: Tensor) -> Tensor:
        """The weights that mix :meth:`expert_outputs`: the routing weights, or 1 for the chosen
        experts where the weights already scaled the inputs."""
        return torch.ones_like(weights) if self.spec.scores_on_input else weights

    def shared_forward(self, hidden: Tensor) -> Tensor | None:
        """The shared expert(s)' contribution (gated where the family gates it), or None."""
        if self.shared is None:
            return None
        out = self.shared(hidden)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(hidden)) * out
        return out if self.shared_scale == 1.0 else out * self.shared_scale

    def combine(self, hidden: Tensor, routing: Routing) -> Tensor:
        """Mix the routed experts' outputs with the routing weights (no shared experts): ``[T, d]``.
        Where the family scales the expert input instead (Llama 4), ``Σ E(w·x)``."""
        out = torch.zeros_like(hidden)
        for e in torch.unique(routing.topk_idx).tolist():
            pos, tok = torch.where(routing.topk_idx.T == e)
            w = routing.topk_weights[tok, pos, None]
            if self.spec.scores_on_input:
                y = self.expert_forward(e, hidden[tok] * w.to(hidden.dtype))
            else:
                y = self.expert_forward(e, hidden[tok]) * w
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def forward(self, hidden: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``route`` + ``expert_forward`` + shared experts, recombined: the block's output ``[T, d]``."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        out = self.combine(hidden, self.route(hidden, allowed))
        shared = self.shared_forward(hidden)
        return out if shared is None else out + shared

    def expert_weights(self, e: int, tensors: dict[str, Tensor] | None = None) -> ExpertWeights:
        """Expert ``e``'s weights in the standard orientation (views, not copies).

        ``tensors`` maps fused parameter names to same-shaped tensors to read instead of the
        parameters themselves (e.g. their gradients)."""
        ex = self.experts
        t = tensors if tensors is not None else dict(ex.named_parameters(recurse=False))
        return LAYOUTS[self.spec.expert_layout].weights(t, e)

    def expert_param_names(self) -> list[str]:
        """Names of the fused per-expert parameters of this block's experts module."""
        return [n for n, p in self.experts.named_parameters(recurse=False) if p.dim() >= 1]


class MoEModel:
    """A transformers MoE causal LM plus the family view and the structural edits."""

    def __init__(self, hf_model: nn.Module, family: FamilySpec, source: str, tokenizer=None, source_dir=None):
        self.hf = hf_model
        self.family = family
        self.source = source
        self.tokenizer = tokenizer
        self.source_dir = Path(source_dir) if source_dir else None
        self._fingerprint: str | None = None
        self.offloaded = False
        self.skip_beta: dict[int, float] = {}  # dynamic-skipping thresholds installed (analysis.skipping)
        self.skip_counter = None
        # the dtype the checkpoint declares (config.dtype), recorded by load_moe before the weights are
        # cast to the working dtype: an export writes it back unless another is asked for
        self.checkpoint_dtype: torch.dtype | None = None
        decoder_layers = attr_path(hf_model, family.layers_path)
        self.layers: dict[int, MoELayer] = {}
        for i, layer in enumerate(decoder_layers):
            block = getattr(layer, family.mlp_attr, None)
            experts = getattr(block, family.experts_attr, None) if block is not None else None
            if experts is not None and hasattr(experts, "gate_up_proj"):
                self.layers[i] = MoELayer(self, i, block)
        if not self.layers:
            raise MoescopeError(
                f"'{source}' is a {family.name} model with no MoE layers (all decoder MLPs are dense); "
                "moescope needs routed experts"
            )

    # ---- facts -------------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    @property
    def num_hidden_layers(self) -> int:
        return len(attr_path(self.hf, self.family.layers_path))

    def num_experts(self) -> dict[int, int]:
        return {i: layer.num_experts for i, layer in self.layers.items()}

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters, routed-``experts`` parameters, and ``active`` per token
        (everything but the routed experts, plus k of each layer's E experts)."""
        total = sum(p.numel() for p in self.hf.parameters())
        experts = active_experts = 0
        for layer in self.layers.values():
            n = sum(p.numel() for p in layer.experts.parameters())
            experts += n
            active_experts += n * layer.top_k // layer.num_experts
        return {"total": total, "experts": experts, "active": total - experts + active_experts}

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        persistent = [
            b for m in self.hf.modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set
        ]
        for t in list(self.hf.parameters()) + persistent:
            key = str(t.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
        return out

    def info(self) -> dict:
        """The facts ``moescope info`` prints (JSON-serialisable)."""
        first = self.layers[self.moe_layers[0]]
        shared = []
        for i, layer in self.layers.items():
            if layer.shared is not None:
                shared.append(
                    {
                        "layer": i,
                        "params": sum(p.numel() for p in layer.shared.parameters()),
                        "gated": layer.shared_gate is not None,
                    }
                )
        return {
            "source": self.source,
            "family": self.family.name,
            "model_type": self.config.model_type,
            "architectures": list(getattr(self.config, "architectures", None) or []),
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": int(self.config.hidden_size),
            "moe_layers": self.moe_layers,
            "dense_layers": [i for i in range(self.num_hidden_layers) if i not in self.layers],
            "num_experts": {str(i): n for i, n in self.num_experts().items()},
            "top_k": first.top_k,
            "routing": self.family.describe_routing(first.renormalize),
            "routing_groups": first.router_params.n_group if self.family.group_limited else None,
            "shared_experts": shared,
            "params": self.parameter_counts(),
            "bytes": self.bytes_by_dtype(),
        }

    def fingerprint(self) -> str:
        """sha256 of the config and the weights: every tensor's name, shape and dtype, and its
        bytes (all of them for tensors up to 4M elements, an evenly strided sample of 4M elements
        of larger ones, so a 100 GB model is fingerprinted in seconds while any edit, finetune
        or reload of other weights changes the hash). Cached until the next edit."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            cfg = self.config.to_dict()
            for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
                cfg.pop(k, None)
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, t in self.hf.state_dict().items():
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
                if t.device.type == "meta":
                    continue
                flat = t.detach().reshape(-1)
                if flat.numel() > 4_000_000:
                    flat = flat[:: flat.numel() // 4_000_000]
                h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def weights_changed(self) -> None:
        """Forget the cached fingerprint: call after changing weights outside the edit methods
        (finetuning, loading trained tensors)."""
        self._fingerprint = None

    # ---- edits -------------------------------------------------------------------------------
    def keep(self, layer: int, experts: list[int]) -> None:
        """Keep only ``experts`` of ``layer`` (new expert j is old ``experts[j]``)."""
        self.merge(layer, [[int(e)] for e in experts], None)

    def merge(
        self,
        layer: int,
        groups: list[list[int]],
        coeffs: list[list[float]] | None = None,
        merge_router: bool = True,
        permutations: list[list[list[int] | None] | None] | None = None,
        operator: str = "linear",
        density: float | None = None,
        router_coeffs: list[list[float]] | None = None,
        folds: list[list[list[int] | None] | None] | None = None,
    ) -> None:
        """Replace ``layer``'s experts by one expert per group: ``W_new = Σ_i c_i W_{g_i}`` for every
        fused expert tensor (and bias). Router rows (and router / score biases) are merged with the
        same coefficients when ``merge_router``; otherwise each group takes the row of its member
        with the largest coefficient. ``coeffs=None`` means 1 for a group of one and a uniform
        average otherwise. A group of one with coefficient 1 is exactly keeping that expert.
        ``permutations`` (per group, per member: None or a permutation of the I intermediate
        neurons) aligns members onto their group's reference first, and ``operator='ties'``
        combines by sign consensus with ``density`` (:func:`analysis.merging.combine_tensors`).
        ``router_coeffs`` are the router rows' own coefficients when they differ from the experts'
        (the learned merge of group-and-merge eq. 6 scales the experts by λ, not the router rows).
        ``folds`` (per group, per member: None or a many-to-one map of the member's neurons) folds a
        group's members neuron by neuron instead (:mod:`analysis.model.folding`)."""
        view = self._layer(layer)
        coeffs = validate_groups(view, groups, coeffs)
        router_coeffs = coeffs if router_coeffs is None else validate_groups(view, groups, router_coeffs)
        aligned = permutations is not None and any(p is not None for ps in permutations for p in (ps or []))
        if aligned:
            from moescope.analysis.model.alignment import check_permutations

            check_permutations(view, groups, permutations)
        folded = folds is not None and any(f is not None for fs in folds for f in (fs or []))
        if folded:
            from moescope.analysis.model.folding import check_folds

            check_folds(view, groups, folds)
        with torch.no_grad():
            ex = view.experts
            combined = None
            if aligned or folded or operator != "linear":
                from moescope.analysis.model.merging import combine_tensors

                combined = combine_tensors(view, groups, coeffs, permutations, operator,
                                           0.2 if density is None else density, folds=folds if folded else None)
            for name in view.expert_param_names():
                old = getattr(ex, name)
                new = combine_rows(old, groups, coeffs) if combined is None else combined[name].to(old.dtype).contiguous()
                setattr(ex, name, nn.Parameter(new, requires_grad=old.requires_grad))
            router = view.router
            row_coeffs = router_coeffs if merge_router else onehot_of_largest(router_coeffs)
            for attr in self._router_paths():
                old = resolve(view.block, router, attr)
                if old is None:
                    continue
                if old.dim() == 2 and old.shape[0] == 1 and attr != self.family.router_weight_attr:
                    new = combine_rows(old[0], groups, row_coeffs)[None]  # [1, E] bias (ERNIE)
                else:
                    new = combine_rows(old, groups, row_coeffs)
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                assign(view.block, router, attr, new)
        self._fingerprint = None
        n = len(groups)
        for module in self._count_holders(view):
            if hasattr(module, "num_experts"):
                module.num_experts = n
            if isinstance(module, nn.Linear):
                module.out_features = n
        self._sync_config()

    def _router_paths(self) -> list[str]:
        f = self.family
        return [a for a in (f.router_weight_attr, f.router_bias_attr, f.score_bias_attr) if a]

    def _count_holders(self, view: MoELayer) -> list[nn.Module]:
        """Modules that record the expert count (``num_experts`` / a router Linear's out_features)."""
        return list(dict.fromkeys(
            [view.block, view.router, view.experts, owner(view.block, view.router, self.family.router_weight_attr)]
        ))

    def temporary_edit(self, layer: int):
        """Context in which ``layer`` may be edited (keep / merge); on exit its experts, router
        rows, expert counts and config are restored exactly (the same tensor objects)."""
        from contextlib import contextmanager

        @contextmanager
        def _ctx():
            view = self._layer(layer)
            ex, router = view.experts, view.router
            params = {n: getattr(ex, n) for n in view.expert_param_names()}
            router_attrs = {a: resolve(view.block, router, a) for a in self._router_paths()}
            holders = self._count_holders(view)
            counts = {m: m.num_experts for m in holders if hasattr(m, "num_experts")}
            out_features = {m: m.out_features for m in holders if isinstance(m, nn.Linear)}
            cfg_n = getattr(self.config, self.family.num_experts_key)
            fingerprint = self._fingerprint
            try:
                yield view
            finally:
                for n, p in params.items():
                    setattr(ex, n, p)
                for a, t in router_attrs.items():
                    if t is not None:
                        assign(view.block, router, a, t)
                for m, n in counts.items():
                    m.num_experts = n
                for m, n in out_features.items():
                    m.out_features = n
                setattr(self.config, self.family.num_experts_key, cfg_n)
                self._fingerprint = fingerprint

        return _ctx()

    def restricted(self, layer: int, allowed: list[int]):
        """Context in which ``layer``'s block routes only among ``allowed`` experts (the family's
        rule with the others masked), with no structural change. For families where removing an
        expert is structurally impossible (DeepSeek-V3 routing groups) this is how a drop is
        evaluated; for the others it equals ``keep`` (tests prove it)."""
        from contextlib import contextmanager

        view = self._layer(layer)
        mask = torch.zeros(view.num_experts, dtype=torch.bool)
        mask[list(allowed)] = True

        @contextmanager
        def _ctx():
            original = view.block.forward

            def forward(hidden_states, *args, **kwargs):
                out = view.forward(hidden_states.reshape(-1, hidden_states.shape[-1]), allowed=mask)
                out = out.reshape(hidden_states.shape)
                return (out, None) if self.family.block_returns_tuple else out

            view.block.forward = forward
            try:
                yield view
            finally:
                view.block.forward = original

        return _ctx()

    def can_keep(self, layer: int, experts: list[int]) -> bool:
        try:
            validate_groups(self._layer(layer), [[e] for e in experts], None)
            return True
        except MoescopeError:
            return False

    def materialized(self, module: nn.Module):
        """Context in which ``module``'s offloaded weights (if any) are loaded on its execution
        device, so the view can read them directly; a no-op for a model held in memory."""
        from contextlib import ExitStack

        stack = ExitStack()
        if self.offloaded:
            from accelerate.utils import align_module_device

            for sub in module.modules():
                if hasattr(sub, "_hf_hook"):
                    stack.enter_context(align_module_device(sub))
        return stack

    def _layer(self, layer: int) -> MoELayer:
        if self.offloaded:
            raise MoescopeError("this model was loaded with its layers offloaded to disk and is read-only; "
                                "load it without offloading to prune or merge")
        if layer not in self.layers:
            raise MoescopeError(f"layer {layer} is not an MoE layer; MoE layers are {self.moe_layers}")
        return self.layers[layer]

    def _sync_config(self) -> None:
        counts = set(self.num_experts().values())
        if len(counts) == 1:
            setattr(self.config, self.family.num_experts_key, counts.pop())

    # ---- saving ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a folder that ``AutoModelForCausalLM.from_pretrained`` loads (hub layout,
        safetensors) plus the tokenizer when the model has one. Layers keeping different expert
        counts are saved at their real sizes with moescope's per-layer format
        (:mod:`analysis.nonuniform`): loading needs ``trust_remote_code=True`` outside moescope."""
        with atomic_output_dir(out_dir, overwrite) as tmp:
            self.write_files(tmp)
        return Path(out_dir)

    def write_files(self, out: Path) -> None:
        """The files of :meth:`save`, written into the existing folder ``out`` as they are (no
        checks, not atomic: :meth:`save` and :func:`analysis.export.export` write into a temporary
        folder that is renamed into place)."""
        self._store_skip_beta()
        self.hf.save_pretrained(out)
        self._finish_folder(out)

    def cast_for_export(self, dtype: torch.dtype | None = None) -> torch.dtype | None:
        """Cast the saved weights (parameters and persistent buffers) to what an export writes:
        ``dtype`` when given, else the checkpoint's own :attr:`checkpoint_dtype` (a bfloat16 model
        analysed in float32 is written in bfloat16 again, never larger than it came). Tensors that
        transformers' ``from_pretrained`` keeps in float32 at that dtype (the class's keep-in-fp32
        modules, e.g. DeepSeek-V3's router and score-correction bias) stay float32, so the folder
        is what loading the checkpoint in its own dtype and pruning it would hold. Returns the dtype
        cast to (None: nothing to cast to, the weights stay as they are)."""
        target = dtype or self.checkpoint_dtype
        if target is None:
            return None
        plan = getattr(self.hf, "_get_dtype_plan", None)
        keep32 = tuple(plan(target)) if callable(plan) else ()
        cast = []  # every cast checked before any is applied: a refused one leaves the model as it was
        for name, t in self.hf.state_dict(keep_vars=True).items():
            if t.is_floating_point() and t.device.type != "meta":
                want = torch.float32 if any(k in name for k in keep32) else target
                if t.dtype != want:
                    cast.append((t, cast_for_writing(t.data, want, name)))
        for t, new in cast:
            t.data = new
        return target

    def write_config_files(self, out: Path, dtype: torch.dtype) -> None:
        """The files of :meth:`write_files` but the weights, for weights written otherwise
        (:mod:`analysis.model.stream_export`): the config as ``save_pretrained`` writes it for a
        model in ``dtype`` (dtype, architectures, generation config), then as :meth:`write_files`."""
        self._store_skip_beta()
        hf = self.hf
        hf.config.dtype = str(dtype).split(".")[1]
        hf.config.architectures = [type(hf).__name__.removeprefix("FSDP")]
        hf.config.save_pretrained(out)
        if hf.can_generate():
            hf.generation_config.save_pretrained(out)
        self._finish_folder(out)

    def _store_skip_beta(self) -> None:
        if self.skip_beta:
            self.config.moescope_skip_beta = {str(k): v for k, v in self.skip_beta.items()}
        elif hasattr(self.config, "moescope_skip_beta"):
            del self.config.moescope_skip_beta

    def _finish_folder(self, out: Path) -> None:
        from moescope.analysis.model import nonuniform

        nonuniform.finish_config(self, out)
        self._save_tokenizer(out)

    def _save_tokenizer(self, out: Path) -> None:
        from moescope.analysis.core.outputs import write_error

        try:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out)
            elif self.source_dir is not None:
                for name in TOKENIZER_FILES:
                    if (self.source_dir / name).is_file():
                        shutil.copy2(self.source_dir / name, out / name)
            drop_tokenizer_auto_map(out)
        except OSError as err:  # a full disk: say which files (transformers' error may name none)
            raise write_error(err, "the tokenizer files (tokenizer.json, tokenizer_config.json) of the export") from None


def drop_tokenizer_auto_map(folder: Path) -> dict:
    """Remove ``auto_map`` from ``folder/tokenizer_config.json``: it names tokenizer code of the base
    model's repository that an export does not carry (``AutoTokenizer(…, trust_remote_code=True)``
    would look for the module file and fail), as the config's foreign ``auto_map`` is removed.
    Returns what was removed."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or "auto_map" not in data:
        return {}
    dropped = data.pop("auto_map")
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dropped if isinstance(dropped, dict) else {"auto_map": dropped}
