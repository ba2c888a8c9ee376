"""One view over every supported MoE family, and exact structural edits.

``load_moe(source)`` returns an :class:`MoEModel`: the transformers model plus, for each MoE
decoder layer ``l``, a :class:`MoELayer` giving the router (weight, bias, score-correction bias),
the routed experts as per-expert weights over transformers 5's fused tensors, the shared
experts, the family's routing rule ``route(hidden) -> (logits, topk_idx, topk_weights)`` and
``expert_forward(e, hidden)`` (one expert on any tokens, router bypassed).

Edits (:meth:`MoEModel.keep`, :meth:`MoEModel.merge`) rewrite the fused tensors and router rows
in place and update the config, so the edited model is still a plain transformers model that
``save`` writes in the hub layout and ``AutoModelForCausalLM.from_pretrained`` reloads.

Shapes: T tokens, d hidden size, E routed experts, I expert intermediate size, k top-k.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moescope.analysis.errors import MoescopeError
from moescope.analysis.families import FamilySpec, family_for, supported_model_types
from moescope.analysis.routing import ROUTING_RULES, RouterParams

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "demo" / "model"
DEMO_UPCYCLED_DIR = REPO_ROOT / "demo" / "model-upcycled"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def demo_model_dir() -> Path:
    """The shipped demo model folder (``MOESCOPE_DEMO_DIR`` overrides it)."""
    return Path(os.environ.get("MOESCOPE_DEMO_DIR", DEMO_MODEL_DIR))


def demo_upcycled_dir() -> Path:
    """The shipped upcycled demo (``MOESCOPE_DEMO_UPCYCLED_DIR`` overrides it): same tokenizer, corpus
    and architecture as the demo, its experts upcycled from one dense FFN per layer."""
    return Path(os.environ.get("MOESCOPE_DEMO_UPCYCLED_DIR", DEMO_UPCYCLED_DIR))


DEMO_SOURCES = {"demo": ("demo_model_dir", ""), "demo-upcycled": ("demo_upcycled_dir", " --upcycle")}


@dataclass
class Routing:
    """The router's decision for T tokens."""

    logits: Tensor  # [T, E] raw router logits (incl. router bias where the family has one)
    topk_idx: Tensor  # [T, k] chosen experts
    topk_weights: Tensor  # [T, k] their mixing weights


@dataclass
class ExpertWeights:
    """One routed expert in the standard orientation: ``down(act(gate x) * (up x))``."""

    gate: Tensor  # [I, d]
    up: Tensor  # [I, d]
    down: Tensor  # [d, I]
    gate_bias: Tensor | None = None  # [I]  (GPT-OSS)
    up_bias: Tensor | None = None  # [I]
    down_bias: Tensor | None = None  # [d]


def _attr_path(obj, path: str):
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
        return getattr(self.block, self.spec.shared_attr) if self.spec.shared_attr else None

    @property
    def shared_gate(self) -> nn.Module | None:
        return getattr(self.block, self.spec.shared_gate_attr) if self.spec.shared_gate_attr else None

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def router_weight(self) -> Tensor:  # [E, d]
        return self.router.weight

    @property
    def router_bias(self) -> Tensor | None:  # [E]
        return getattr(self.router, self.spec.router_bias_attr) if self.spec.router_bias_attr else None

    @property
    def score_bias(self) -> Tensor | None:  # [E]
        return getattr(self.router, self.spec.score_bias_attr) if self.spec.score_bias_attr else None

    @property
    def renormalize(self) -> bool:
        if self.spec.renormalize is not None:
            return self.spec.renormalize
        return bool(getattr(self.router, "norm_topk_prob", getattr(self.model.config, "norm_topk_prob", False)))

    @property
    def router_params(self) -> RouterParams:
        r = self.router
        return RouterParams(
            top_k=self.top_k,
            renormalize=self.renormalize,
            cast_weights_to_logits_dtype=self.spec.cast_weights_to_logits_dtype,
            score_bias=self.score_bias,
            n_group=int(getattr(r, "num_group", 1) or 1),
            topk_group=int(getattr(r, "topk_group", 1) or 1),
            routed_scaling_factor=float(getattr(r, "routed_scaling_factor", 1.0) or 1.0),
            jitter_eps=float(getattr(r, "router_jitter_noise", 0.0) or 0.0),
        )

    # ---- computation -------------------------------------------------------------------------
    def router_logits(self, hidden: Tensor) -> Tensor:
        """``[T, d] -> [T, E]`` router logits (float32 where the family computes them so)."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.router_weight, self.router_bias
        if self.spec.router_float32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
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
        if self.spec.expert_layout == "gpt_oss":
            gate_up = hidden @ t["gate_up_proj"][e] + t["gate_up_proj_bias"][e]
            return ex._apply_gate(gate_up) @ t["down_proj"][e] + t["down_proj_bias"][e]
        gate, up = nn.functional.linear(hidden, t["gate_up_proj"][e]).chunk(2, dim=-1)
        return nn.functional.linear(ex.act_fn(gate) * up, t["down_proj"][e])

    def shared_forward(self, hidden: Tensor) -> Tensor | None:
        """The shared expert(s)' contribution (gated where the family gates it), or None."""
        if self.shared is None:
            return None
        out = self.shared(hidden)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(hidden)) * out
        return out

    def combine(self, hidden: Tensor, routing: Routing) -> Tensor:
        """Mix the routed experts' outputs with the routing weights (no shared experts): ``[T, d]``."""
        out = torch.zeros_like(hidden)
        for e in torch.unique(routing.topk_idx).tolist():
            pos, tok = torch.where(routing.topk_idx.T == e)
            y = self.expert_forward(e, hidden[tok]) * routing.topk_weights[tok, pos, None]
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
        if self.spec.expert_layout == "gpt_oss":
            gu = t["gate_up_proj"][e]  # [d, 2I], gate and up interleaved
            gub = t.get("gate_up_proj_bias")
            return ExpertWeights(
                gate=gu[:, ::2].T, up=gu[:, 1::2].T, down=t["down_proj"][e].T,
                gate_bias=gub[e, ::2] if gub is not None else None,
                up_bias=gub[e, 1::2] if gub is not None else None,
                down_bias=t["down_proj_bias"][e] if t.get("down_proj_bias") is not None else None,
            )
        gate, up = t["gate_up_proj"][e].chunk(2, dim=0)
        return ExpertWeights(gate=gate, up=up, down=t["down_proj"][e])

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
        self.plan = None  # the PruningPlan applied to this model, if any
        self.skip_beta: dict[int, float] = {}  # dynamic-skipping thresholds installed (analysis.skipping)
        self.skip_counter = None
        decoder_layers = _attr_path(hf_model, family.layers_path)
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
        return len(_attr_path(self.hf, self.family.layers_path))

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
            "routing_groups": first.router_params.n_group if self.family.routing == "sigmoid_group_topk" else None,
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
        permutations: list[list[list[int] | None]] | None = None,
        operator: str = "linear",
        density: float | None = None,
    ) -> None:
        """Replace ``layer``'s experts by one expert per group: ``W_new = Σ_i c_i W_{g_i}`` for every
        fused expert tensor (and bias). Router rows (and router / score biases) are merged with the
        same coefficients when ``merge_router``; otherwise each group takes the row of its member
        with the largest coefficient. ``coeffs=None`` means 1 for a group of one and a uniform
        average otherwise. A group of one with coefficient 1 is exactly keeping that expert.
        ``permutations`` aligns members onto their group's reference first and ``operator='ties'``
        combines by sign consensus (:func:`analysis.merging.combine_tensors`)."""
        view = self._layer(layer)
        coeffs = validate_groups(view, groups, coeffs)
        aligned = permutations is not None and any(p is not None for ps in permutations for p in (ps or []))
        if aligned:
            from moescope.analysis.alignment import check_permutations

            check_permutations(view, groups, permutations)
        with torch.no_grad():
            ex = view.experts
            combined = None
            if aligned or operator != "linear":
                from moescope.analysis.merging import combine_tensors

                combined = combine_tensors(view, groups, coeffs, permutations, operator,
                                           0.2 if density is None else density)
            for name in view.expert_param_names():
                old = getattr(ex, name)
                new = _combine_rows(old, groups, coeffs) if combined is None else combined[name].to(old.dtype).contiguous()
                setattr(ex, name, nn.Parameter(new, requires_grad=old.requires_grad))
            router = view.router
            row_coeffs = coeffs if merge_router else _argmax_onehot(coeffs)
            for attr in ("weight", self.family.router_bias_attr, self.family.score_bias_attr):
                if not attr:
                    continue
                old = getattr(router, attr)
                new = _combine_rows(old, groups, row_coeffs)
                if isinstance(old, nn.Parameter):
                    setattr(router, attr, nn.Parameter(new, requires_grad=old.requires_grad))
                else:
                    setattr(router, attr, new)
        self._fingerprint = None
        n = len(groups)
        for module in (view.block, view.router, view.experts):
            if hasattr(module, "num_experts"):
                module.num_experts = n
        if isinstance(view.router, nn.Linear):
            view.router.out_features = n
        self._sync_config()

    def temporary_edit(self, layer: int):
        """Context in which ``layer`` may be edited (keep / merge); on exit its experts, router
        rows, expert counts and config are restored exactly (the same tensor objects)."""
        from contextlib import contextmanager

        @contextmanager
        def _ctx():
            view = self._layer(layer)
            ex, router = view.experts, view.router
            params = {n: getattr(ex, n) for n in view.expert_param_names()}
            router_attrs = {a: getattr(router, a) for a in ("weight", self.family.router_bias_attr,
                                                             self.family.score_bias_attr) if a}
            counts = {m: m.num_experts for m in (view.block, router, ex) if hasattr(m, "num_experts")}
            out_features = getattr(router, "out_features", None)
            cfg_n = getattr(self.config, self.family.num_experts_key)
            fingerprint = self._fingerprint
            try:
                yield view
            finally:
                for n, p in params.items():
                    setattr(ex, n, p)
                for a, t in router_attrs.items():
                    setattr(router, a, t)
                for m, n in counts.items():
                    m.num_experts = n
                if out_features is not None:
                    router.out_features = out_features
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
        """Write a folder that plain ``AutoModelForCausalLM.from_pretrained`` loads (hub layout,
        safetensors) plus the tokenizer when the model has one."""
        out = Path(out_dir)
        counts = self.num_experts()
        if len(set(counts.values())) > 1:
            raise MoescopeError(
                "cannot save as a standard transformers folder: layers keep different expert counts "
                f"({', '.join(f'layer {i}: {n}' for i, n in counts.items())}) but a "
                f"{self.family.name} config holds one '{self.family.num_experts_key}'; "
                "keep the same number of experts in every MoE layer to export"
            )
        prepare_output_dir(out, overwrite)
        if self.skip_beta:
            self.config.moescope_skip_beta = {str(k): v for k, v in self.skip_beta.items()}
        elif hasattr(self.config, "moescope_skip_beta"):
            del self.config.moescope_skip_beta
        self.hf.save_pretrained(out)
        self._save_tokenizer(out)
        return out

    def _save_tokenizer(self, out: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        elif self.source_dir is not None:
            for name in TOKENIZER_FILES:
                if (self.source_dir / name).is_file():
                    shutil.copy2(self.source_dir / name, out / name)


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse (before any expensive work) a path that is a file, or a non-empty folder unless
    ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"output path '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MoescopeError(f"output folder '{out}' is not empty; choose an empty folder or pass --overwrite")
    return out


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty folder unless ``overwrite`` (then empty it)."""
    check_output_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _combine_rows(t: Tensor, groups: list[list[int]], coeffs: list[list[float]]) -> Tensor:
    """Row j of the result is Σ_i coeffs[j][i] · t[groups[j][i]] (computed in float32)."""
    rows = []
    for g, c in zip(groups, coeffs, strict=True):
        if len(g) == 1 and c[0] == 1.0:
            rows.append(t[g[0]].clone())
            continue
        acc = torch.zeros_like(t[0], dtype=torch.float32)
        for e, w in zip(g, c, strict=True):
            acc += float(w) * t[e].float()
        rows.append(acc.to(t.dtype))
    return torch.stack(rows).contiguous()


def _argmax_onehot(coeffs: list[list[float]]) -> list[list[float]]:
    out = []
    for c in coeffs:
        best = max(range(len(c)), key=lambda i: c[i])
        out.append([1.0 if i == best else 0.0 for i in range(len(c))])
    return out


def validate_groups(view: MoELayer, groups, coeffs) -> list[list[float]]:
    """Check a layer's groups (and coefficients) before any tensor is touched; return coefficients.

    Refuses: empty or malformed groups, indices out of range, an expert in two groups, fewer
    output experts than top-k, coefficient lists of the wrong length, and for group-limited
    routers (DeepSeek-V3) output experts that would move between routing groups or leave the
    groups with different sizes (or fewer than 2 each, which the router's top-2 group score needs).
    """
    where = f"layer {view.index}"
    n_old, top_k = view.num_experts, view.top_k
    if not isinstance(groups, list | tuple) or not groups:
        raise MoescopeError(f"{where}: groups must be a non-empty list of lists of expert indices")
    seen: set[int] = set()
    for g in groups:
        if not isinstance(g, list | tuple) or not g:
            raise MoescopeError(f"{where}: every group must be a non-empty list of expert indices, got {g!r}")
        for e in g:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n_old:
                raise MoescopeError(f"{where}: expert index {e!r} is not in 0..{n_old - 1}")
            if e in seen:
                raise MoescopeError(f"{where}: expert {e} appears in more than one group")
            seen.add(e)
    if len(groups) < top_k:
        raise MoescopeError(
            f"{where}: the plan leaves {len(groups)} expert(s) but the model routes every token to "
            f"top-{top_k}; keep at least {top_k} experts in this layer"
        )
    if coeffs is None:
        coeffs = [[1.0 / len(g)] * len(g) for g in groups]
    else:
        if len(coeffs) != len(groups) or any(len(c) != len(g) for c, g in zip(coeffs, groups, strict=False)):
            raise MoescopeError(f"{where}: coefficients must have the same shape as groups ({groups})")
        coeffs = [[float(w) for w in c] for c in coeffs]
    if view.spec.routing == "sigmoid_group_topk":
        _check_routing_groups(view, groups)
    return coeffs


def _check_routing_groups(view: MoELayer, groups: list[list[int]]) -> None:
    n_group = view.router_params.n_group
    old_per_group = view.num_experts // n_group
    where = f"layer {view.index}"
    if len(groups) % n_group:
        raise MoescopeError(
            f"{where}: {len(groups)} experts cannot be split evenly over the router's {n_group} routing "
            f"groups; keep a multiple of {n_group}"
        )
    new_per_group = len(groups) // n_group
    if new_per_group < 2:
        raise MoescopeError(
            f"{where}: the group-limited router scores each routing group by its two best experts; "
            f"keep at least 2 per group ({2 * n_group} in all)"
        )
    for j, g in enumerate(groups):
        homes = {e // old_per_group for e in g}
        if homes != {j // new_per_group}:
            raise MoescopeError(
                f"{where}: output expert {j} (from {g}) would sit in routing group {j // new_per_group} but "
                f"its experts come from group(s) {sorted(homes)}; list groups in routing-group order, "
                f"{new_per_group} per routing group of {old_per_group} experts, without mixing groups"
            )


# ---- loading ---------------------------------------------------------------------------------
def resolve_source(source: str) -> tuple[str, Path | None]:
    """``'demo'`` / ``'demo-upcycled'`` → the shipped folders; an existing path → that folder;
    otherwise a hub id."""
    if source in DEMO_SOURCES:
        getter, flag = DEMO_SOURCES[source]
        path = globals()[getter]()
        if not (path / "config.json").is_file():
            raise MoescopeError(f"the {source} model is missing at '{path}'; run `python demo/train_model.py{flag}` "
                                "to build it")
        return str(path), path
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoescopeError(f"'{source}' is a folder without config.json; expected a transformers model folder")
        return str(path), path
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise MoescopeError(f"model '{source}' not found: give 'demo', 'demo-upcycled', an existing model folder, "
                            "or a hub id (org/name)")
    return source, None


def load_config(source: str, trust_remote_code: bool = False):
    """The model's config (no weights), with a one-line error when it cannot be had."""
    from transformers import AutoConfig

    location, local = resolve_source(source)
    remote_code_msg = (
        f"'{source}' needs custom code from its repository; moescope does not run it unless you pass "
        f"--trust-remote-code (supported without it: {', '.join(supported_model_types())})"
    )
    if local is not None and not trust_remote_code:
        raw = json.loads((local / "config.json").read_text())
        if "auto_map" in raw and raw.get("model_type") not in supported_model_types():
            raise MoescopeError(remote_code_msg)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as err:  # unknown model_type / remote code refused
        msg = str(err).splitlines()[0]
        if "trust_remote_code" in str(err):
            raise MoescopeError(remote_code_msg) from None
        if "model_type" in str(err) or "Unrecognized model" in str(err):
            raise MoescopeError(
                f"unsupported architecture in '{source}': {msg[:200]}; moescope supports the MoE families "
                f"{', '.join(supported_model_types())}"
            ) from None
        raise MoescopeError(f"cannot read the config of '{source}': {msg}") from None
    except OSError as err:
        msg = str(err).splitlines()[0]
        raise MoescopeError(
            f"cannot load '{source}': not a local model folder, and the Hugging Face hub did not provide it ({msg})"
        ) from None


def load_moe(
    source: str = "demo",
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
    weights: bool = True,
    offload_dir: str | Path | None = None,
) -> MoEModel:
    """Load an MoE causal LM (``'demo'``, a local folder or a hub id) and wrap it.

    The architecture is checked from the config before any weight is read: unknown or non-MoE
    architectures are refused with the list of supported families. ``weights=False`` builds the
    model on the meta device from the config alone (shapes, counts and bytes, no download of the
    weights), in the checkpoint's dtype unless ``dtype`` is given. ``offload_dir`` keeps the
    decoder layers on disk there (accelerate), so a model larger than memory can be analysed
    layer by layer; such a model is read-only (edits need the weights in memory).
    """
    from transformers import AutoModelForCausalLM

    location, local = resolve_source(source)
    config = load_config(source, trust_remote_code)
    family = family_for(config)
    if not weights:
        torch_dtype = _parse_dtype(dtype) if dtype is not None else (_config_dtype(config) or torch.float32)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        return MoEModel(hf.eval(), family, source, tokenizer=None, source_dir=local)
    torch_dtype = _parse_dtype(dtype or "float32")
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if offload_dir is not None:
        # decoder layers stay on disk; accelerate loads one module's weights at a time
        prefix = family.layers_path
        home = device if device not in (None, "auto") else "cpu"
        kwargs["device_map"] = {prefix: "disk", **{k: home for k in _non_layer_modules(config, family)}}
        kwargs["offload_folder"] = str(offload_dir)
    releaser = _PeriodicRelease() if offload_dir is not None else None
    try:
        if releaser:
            releaser.start()  # keep the checkpoint's memory-mapped pages from piling up while loading
        hf = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as err:
        raise MoescopeError(f"cannot load the weights of '{source}': {str(err).splitlines()[0]}") from None
    finally:
        if releaser:
            releaser.stop()
    if device not in (None, "auto") and offload_dir is None:
        hf = hf.to(device)
    hf.eval()
    tokenizer = _load_tokenizer(location, trust_remote_code) if load_tokenizer else None
    model = MoEModel(hf, family, source, tokenizer=tokenizer, source_dir=local)
    model.offloaded = offload_dir is not None
    if model.offloaded:
        release_mapped_weights()
    if local is not None:  # unedited weights: the files identify them (cheap, and offload-proof)
        model._fingerprint = folder_fingerprint(local)
    betas = getattr(config, "moescope_skip_beta", None)
    if betas:  # the folder carries dynamic-skipping thresholds: route with them
        from moescope.analysis import skipping

        skipping.install(model, {int(k): float(v) for k, v in betas.items()})
    return model


def release_mapped_weights() -> int:
    """Drop this process's resident pages of memory-mapped ``*.safetensors`` files (Linux).

    accelerate reads offloaded weights through memory maps of the checkpoint that stay open;
    every page it touched would otherwise stay counted in the process's RSS. For a mapping with
    no privately modified page (``Anonymous: 0 kB`` in smaps), ``madvise(MADV_DONTNEED)`` only
    unmaps the pages from this process and a later read faults them back in from the page cache
    or the file, so nothing is lost; a mapping with modified pages is left alone. Returns the
    bytes advised."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    regions, current = [], None
    for line in smaps:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            if len(head) >= 6 and head[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, None]
                regions.append(current)
        elif current is not None and line.startswith("Anonymous:"):
            current[2] = int(line.split()[1])
    total = 0
    for start, end, anonymous in regions:
        if anonymous == 0 and libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
            total += end - start
    return total


class _PeriodicRelease:
    """A daemon thread calling :func:`release_mapped_weights` every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            release_mapped_weights()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        release_mapped_weights()


def _non_layer_modules(config, family: FamilySpec) -> list[str]:
    """Top-level modules besides the decoder layers (embeddings, final norm, rotary, LM head)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = family.layers_path.rsplit(".", 1)[0]
    names = [f"{base}.{n}" for n, _ in _attr_path(skeleton, base).named_children() if n != "layers"]
    names += [n for n, _ in skeleton.named_children() if n != base.split(".")[0]]
    return names


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's config and weight files: names, sizes and an evenly strided
    sample of 4 MB of each weight file's bytes (all bytes of files up to 64 MB)."""
    import hashlib

    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
                continue
            step = size // 4096
            for i in range(4096):
                fh.seek(i * step)
                h.update(fh.read(1024))
    return h.hexdigest()


def _load_tokenizer(location: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None  # transformers 5 would hand back an empty tokenizer instead of failing
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder is fine: everything but text decoding works


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise MoescopeError(f"unknown dtype '{dtype}'; accepted: float32, bfloat16, float16") from None


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return _DTYPES.get(str(value).removeprefix("torch.")) if value else None


def wrap_model(hf_model: nn.Module, source: str = "<in-memory>", tokenizer=None) -> MoEModel:
    """Wrap an already-built transformers model (tests, notebooks)."""
    return MoEModel(hf_model, family_for(hf_model.config), source, tokenizer=tokenizer)
