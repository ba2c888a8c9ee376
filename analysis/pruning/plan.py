"""The PruningPlan: the JSON contract between choosing experts and editing the model.

For each MoE layer it lists the output experts, each a group of original expert indices with
merge coefficients (a kept expert is a group of one with coefficient 1), whether router rows are
merged, and any dynamic-skipping thresholds. Every strategy, the dashboard's manual picker and the
CLI produce one; :func:`analysis.prune.apply` consumes one; an export stores the one it came from.

```json
{"version": 1, "base_model": "demo",
 "layers": {"0": {"groups": [[0], [1], [2, 5]], "coefficients": [[1.0], [1.0], [0.5, 0.5]], "merge_router": true},
            "3": {"groups": [[0], [2], [4], [6]]}},
 "skip_beta": {"0": 0.42},
 "provenance": {"strategy": "enumerate", "params": {"keep": 4}, "data": "<fingerprint>"}}
```
Layer keys are decoder-layer indices; a layer not listed is left as it is; a group of one with
no coefficients keeps that expert; new experts are numbered in the order of ``groups``.

A merged layer may also carry ``router_coefficients`` (the router rows' own coefficients where they
differ from the experts', as in the learned merge of group-and-merge eq. 6: experts ``λ Σ α_i θ_i``,
router rows ``Σ α_i W_i``), ``permutations`` (per group, per member: ``null`` or a permutation
of the expert's intermediate neurons that aligns it onto the group's reference before combining,
:mod:`analysis.alignment`), ``folds`` (per group, per member: ``null`` or a many-to-one map of the
member's intermediate neurons onto the merged expert's, :mod:`analysis.model.folding`: HC-SMoE's
``fix-dom-same``) and ``operator`` (``linear``, the default, or ``ties`` with ``density``,
:func:`analysis.merging.combine_tensors`).

A fold (``"folds": [null, [null, [2, 0, 0, 1]]]``: group 0 plain, group 1's first member — the
reference — kept in place, its second member's neurons 0…3 sent to neurons 2, 0, 0, 1) makes merged
neuron ``i`` the weighted average of every member neuron sent to ``i``, each weighted by its member's
coefficient (``Σ c_m n_{m,k} / Σ c_m`` over the neurons ``k`` of members ``m`` that map to ``i``; a
member that is ``null`` maps every neuron to itself); gate and up rows and down columns alike, the
same rule for all three (the "same" of ``fix-dom-same``). Every neuron of the merged expert must
receive at least one member neuron; fold weights are non-negative; a group is folded or permuted,
not both, and folds combine linearly (no TIES).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.outputs import loads_json

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    groups: list[list[int]]
    coefficients: list[list[float]] | None = None
    merge_router: bool = True
    permutations: list[list[list[int] | None]] | None = None  # per group, per member; None = identity
    operator: str = "linear"
    density: float | None = None  # ties: fraction of each member's difference kept
    router_coefficients: list[list[float]] | None = None  # router rows' coefficients (default: coefficients)
    folds: list[list[list[int] | None] | None] | None = None  # per group, per member; None = neuron kept in place

    @property
    def num_out(self) -> int:
        return len(self.groups)

    def resolved_coefficients(self) -> list[list[float]]:
        """Coefficients with the defaults filled in: 1 for a group of one, uniform otherwise."""
        if self.coefficients is not None:
            return self.coefficients
        return [[1.0 / len(g)] * len(g) for g in self.groups]

    def is_pure_keep(self) -> bool:
        return all(len(g) == 1 for g in self.groups) and all(
            c == [1.0] for c in (self.coefficients or [[1.0]] * len(self.groups))
        )

    def kept(self) -> list[int]:
        return [e for g in self.groups for e in g]

    def weightless(self, i: int) -> list[int]:
        """Members of group ``i`` that contribute nothing: weight 0 in a plain weighted sum (and in
        the router rows). A group of 1.00 × e + 0.00 × f is expert ``e`` kept and ``f`` dropped,
        and is shown so; under TIES a zero weight still takes part in the sign election."""
        g = self.groups[i]
        c = self.coefficients[i] if self.coefficients is not None else [1.0 / len(g)] * len(g)  # (group i's alone)
        router = self.router_coefficients[i] if self.router_coefficients is not None else c
        if self.operator != "linear" or len(g) < 2 or self.folded(i):
            return []
        return [e for e, w, r in zip(g, c, router) if w == 0 and r == 0]

    def folded(self, i: int | None = None) -> bool:
        """Whether group ``i`` (any group, when ``i`` is None) carries a neuron fold. A folded group
        takes every member's neurons by its fold, so a member of weight 0 can still stand where no
        other neuron lands (:func:`analysis.model.folding.fold_weights`): none is shown as dropped."""
        if self.folds is None:
            return False
        entries = self.folds if i is None else [self.folds[i]]
        return any(fs is not None and any(f is not None for f in fs) for fs in entries)

    def merges(self) -> list[list[int]]:
        """The groups that combine two or more experts with a weight (not counting weightless members)."""
        return [[e for e in g if e not in self.weightless(i)] for i, g in enumerate(self.groups)
                if len(g) - len(self.weightless(i)) > 1]

    def to_json(self) -> dict:
        out: dict = {"groups": [list(g) for g in self.groups]}
        if self.coefficients is not None and not self.is_pure_keep():
            out["coefficients"] = [list(c) for c in self.coefficients]
        if any(len(g) > 1 for g in self.groups):
            out["merge_router"] = self.merge_router
        if self.router_coefficients is not None:
            out["router_coefficients"] = [list(c) for c in self.router_coefficients]
        if self.permutations is not None and any(p is not None for ps in self.permutations for p in (ps or [])):
            out["permutations"] = [None if ps is None else [None if p is None else list(p) for p in ps]
                                   for ps in self.permutations]
        if self.folded():
            out["folds"] = [None if fs is None or all(f is None for f in fs) else
                            [None if f is None else list(f) for f in fs] for fs in self.folds]
        if self.operator != "linear":
            out["operator"] = self.operator
            if self.density is not None:
                out["density"] = self.density
        return out


@dataclass
class PruningPlan:
    base_model: str
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    skip_beta: dict[int, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_keep(cls, base_model: str, keep: dict[int, list[int]], provenance: dict | None = None) -> PruningPlan:
        """Keep exactly these experts per layer (others dropped), in ascending order."""
        return cls(base_model, {int(l): LayerPlan([[int(e)] for e in sorted(ex)]) for l, ex in keep.items()},
                   provenance=provenance or {})

    @classmethod
    def from_drop(cls, model, drop: dict[int, list[int]], provenance: dict | None = None) -> PruningPlan:
        """Drop these experts per layer of ``model``; layers not named are left as they are."""
        keep = {}
        for l, dropped in drop.items():
            if l not in model.layers:
                raise MoescopeError(f"layer {l} is not an MoE layer; MoE layers are {model.moe_layers}")
            bad = [e for e in dropped if not 0 <= int(e) < model.layers[l].num_experts]
            if bad:
                raise MoescopeError(f"layer {l}: expert(s) {bad} not in 0..{model.layers[l].num_experts - 1}")
            keep[l] = [e for e in range(model.layers[l].num_experts) if e not in set(dropped)]
        return cls.from_keep(model.source, keep, provenance)

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": self.version,
            "base_model": self.base_model,
            "layers": {str(l): lp.to_json() for l, lp in sorted(self.layers.items())},
            "skip_beta": {str(l): float(b) for l, b in sorted(self.skip_beta.items())},
            "provenance": self.provenance,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` atomically (a temporary sibling renamed into place; a symlink is
        followed, a folder refused); an error is one line and leaves ``path`` as it was."""
        from moescope.analysis.core.outputs import atomic_write_text

        return atomic_write_text(path, self.dumps() + "\n", what="plan file")

    @classmethod
    def from_json(cls, data, where: str = "plan") -> PruningPlan:
        """Parse and structurally validate a plan (model-independent checks)."""
        if not isinstance(data, dict):
            raise MoescopeError(f"{where}: a plan is a JSON object with 'version', 'base_model' and 'layers'")
        unknown = sorted(set(data) - {"version", "base_model", "layers", "skip_beta", "provenance"})
        if unknown:
            raise MoescopeError(f"{where}: unknown key(s) {unknown}; allowed: version, base_model, layers, "
                                "skip_beta, provenance")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise MoescopeError(f"{where}: plan version {version!r} is not supported (this moescope reads {PLAN_VERSION})")
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, dict):
            raise MoescopeError(f"{where}: 'layers' must be an object keyed by decoder-layer index")
        layers = {}
        for key, raw in layers_raw.items():
            l = _layer_key(key, where)
            if l in layers:
                raise MoescopeError(f"{where}: layer {l} is listed twice; give each layer once")
            if not isinstance(raw, dict) or "groups" not in raw:
                raise MoescopeError(f"{where}: layer {key} must be an object with 'groups'")
            extra = sorted(set(raw) - {"groups", "coefficients", "merge_router", "permutations", "operator",
                                       "density", "router_coefficients", "folds"})
            if extra:
                raise MoescopeError(f"{where}: layer {key} has unknown key(s) {extra}; allowed: groups, "
                                    "coefficients, merge_router, permutations, operator, density, "
                                    "router_coefficients, folds")
            groups = raw["groups"]
            if groups == []:
                raise MoescopeError(f"{where}: layer {key} keeps no experts; every MoE layer keeps at least top-k")
            if (not isinstance(groups, list) or not groups
                    or not all(isinstance(g, list) and g and all(_is_int(e) for e in g) for g in groups)):
                raise MoescopeError(f"{where}: layer {key}: 'groups' must be a non-empty list of non-empty "
                                    f"lists of expert indices, got {json.dumps(groups)[:80]}")
            coeffs = raw.get("coefficients")
            if coeffs is not None:
                if (not isinstance(coeffs, list) or len(coeffs) != len(groups)
                        or any(not isinstance(c, list) or len(c) != len(g) for c, g in zip(coeffs, groups, strict=True))
                        or any(not isinstance(w, int | float) or isinstance(w, bool) for c in coeffs for w in c)):
                    raise MoescopeError(f"{where}: layer {key}: 'coefficients' must have the same shape as 'groups'")
                coeffs = [[_as_float(w, where, key) for w in c] for c in coeffs]
                _check_coefficients(coeffs, groups, where, key, signed_coefficients(data.get("provenance")))
            router_coeffs = raw.get("router_coefficients")
            if router_coeffs is not None:
                if (not isinstance(router_coeffs, list) or len(router_coeffs) != len(groups)
                        or any(not isinstance(c, list) or len(c) != len(g) for c, g in zip(router_coeffs, groups))
                        or any(not isinstance(w, int | float) or isinstance(w, bool) for c in router_coeffs for w in c)):
                    raise MoescopeError(f"{where}: layer {key}: 'router_coefficients' must have the same shape as "
                                        "'groups'")
                router_coeffs = [[_as_float(w, where, key, "router coefficient") for w in c] for c in router_coeffs]
                _check_coefficients(router_coeffs, groups, where, key, signed_coefficients(data.get("provenance")))
            merge_router = raw.get("merge_router", True)
            if not isinstance(merge_router, bool):
                raise MoescopeError(f"{where}: layer {key}: 'merge_router' must be true or false")
            perms = raw.get("permutations")
            if perms is not None and (
                    not isinstance(perms, list) or len(perms) != len(groups)
                    or any(ps is not None and (not isinstance(ps, list) or len(ps) != len(g))
                           for ps, g in zip(perms, groups))
                    or any(p is not None and (not isinstance(p, list) or not all(_is_int(i) for i in p)
                                              or sorted(p) != list(range(len(p))))
                           for ps in perms for p in (ps or []))):
                raise MoescopeError(f"{where}: layer {key}: 'permutations' must list, for each group, null or "
                                    "one entry per member (null or a permutation of 0..I-1)")
            operator = raw.get("operator", "linear")
            if operator not in ("linear", "ties"):
                raise MoescopeError(f"{where}: layer {key}: 'operator' must be linear or ties, got {operator!r}")
            density = raw.get("density")
            if density is not None and (not isinstance(density, int | float) or isinstance(density, bool)
                                        or not 0 < density <= 1):
                raise MoescopeError(f"{where}: layer {key}: 'density' must be a number in (0, 1], got {density!r}")
            folds = raw.get("folds")
            if folds is not None:
                folds = _check_folds(folds, groups, perms, operator, coeffs, where, key)
            layers[l] = LayerPlan([[int(e) for e in g] for g in groups], coeffs, merge_router, perms, operator,
                                  None if density is None else float(density), router_coeffs, folds)
        skip = {}
        skip_raw = data.get("skip_beta") or {}
        if not isinstance(skip_raw, dict):
            raise MoescopeError(f"{where}: 'skip_beta' must be an object {{layer: β}}, got {json.dumps(skip_raw)[:60]}")
        for key, beta in skip_raw.items():
            if not isinstance(beta, int | float) or isinstance(beta, bool) or not 0 <= beta <= 1:
                raise MoescopeError(f"{where}: skip_beta of layer {key} must be a number in [0, 1], got {beta!r}")
            skip[_layer_key(key, where)] = float(beta)
        base = data.get("base_model", "")
        if not isinstance(base, str):
            raise MoescopeError(f"{where}: 'base_model' must be a string")
        prov = data.get("provenance") or {}
        if not isinstance(prov, dict):
            raise MoescopeError(f"{where}: 'provenance' must be an object")
        return cls(base, layers, skip, prov, version)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        try:
            data = loads_json(path.read_text(encoding="utf-8"), f"plan file '{path}'", parse_constant=_keep_constant,
                              unique_keys=True)
        except FileNotFoundError:
            raise MoescopeError(f"plan file '{path}' not found") from None
        except IsADirectoryError:
            raise MoescopeError(f"plan file '{path}' is a folder; give the plan's JSON file (e.g. {path / 'plan.json'})") from None
        except OSError as err:
            raise MoescopeError(f"cannot read plan file '{path}': {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoescopeError(f"plan file '{path}' is not valid JSON ({err})") from None
        return cls.from_json(data, where=str(path))

    # ---- against a model ---------------------------------------------------------------------
    def validate_for(self, model) -> None:
        """Every check that needs the model, before anything is edited: layers exist and are MoE,
        indices are in range, no expert is used twice, at least top-k experts remain, routing
        groups of group-limited routers stay intact."""
        from moescope.analysis.model import validate_groups

        for l, lp in sorted(self.layers.items()):
            if l not in model.layers:
                raise MoescopeError(f"plan names layer {l}, which is not an MoE layer of '{model.source}' "
                                    f"(MoE layers: {model.moe_layers})")
            validate_groups(model.layers[l], lp.groups, lp.coefficients)
            if lp.permutations is not None:
                from moescope.analysis.model.alignment import check_permutations

                check_permutations(model.layers[l], lp.groups, lp.permutations)
            if lp.folded():
                from moescope.analysis.model.folding import check_folds

                check_folds(model.layers[l], lp.groups, lp.folds)
        for l in self.skip_beta:
            if l not in model.layers:
                raise MoescopeError(f"skip_beta names layer {l}, which is not an MoE layer (MoE layers: {model.moe_layers})")
            from moescope.analysis.model.skipping import refuse_top1

            refuse_top1(model.layers[l].top_k, f"skip_beta of layer {l}")

    def check_base(self, source: str, fingerprint: str | None, force: bool = False) -> None:
        """Refuse to apply the plan to a model other than the one it was made for: its
        ``base_model`` names another source (compared as resolved folders) and, where the plan
        records the model's fingerprint (``provenance.model_fingerprint``, strategy plans do),
        the fingerprints differ (the same name with other weights is refused too; another name
        with the same weights is accepted). ``force`` applies it anyway and records the override in
        the provenance (``forced``), with ``base_model`` set to ``source`` so the export's model
        card names the model it really came from."""
        recorded = self.provenance.get("model_fingerprint")
        if recorded and fingerprint:
            mismatch = recorded != fingerprint
        else:
            mismatch = bool(self.base_model) and not same_source(self.base_model, source)
        if not mismatch:
            return
        made_for = f"'{self.base_model}'" + (f" (fingerprint {str(recorded)[:12]})" if recorded else "")
        this = f"'{source}'" + (f" (fingerprint {fingerprint[:12]})" if fingerprint and recorded else "")
        if not force:
            raise MoescopeError(f"the plan was made for {made_for}, not {this}; make a plan for this model, or pass "
                                "--force to apply it anyway (recorded in the plan's provenance)")
        self.provenance["forced"] = {"plan_base_model": self.base_model, "plan_model_fingerprint": recorded,
                                     "applied_to": source, "model_fingerprint": fingerprint}
        self.base_model = source

    def experts_after(self, model) -> dict[int, int]:
        return {l: (self.layers[l].num_out if l in self.layers else v.num_experts) for l, v in model.layers.items()}

    def summary(self) -> str:
        parts = [f"layer {l}: {lp.num_out} experts" + (" (merged)" if lp.merges() else "")
                 for l, lp in sorted(self.layers.items())]
        return "; ".join(parts) or "no layer changed"


def edit_layer(plan: PruningPlan, layer: int, num_experts: int, drop=(), merge=()) -> PruningPlan:
    """A copy of ``plan`` in which ``layer`` (of ``num_experts`` experts) drops the experts in
    ``drop`` and merges each group in ``merge`` into one output expert, keeping every other expert.

    This is how a person edits a plan by hand: overlapping merge groups are joined (selecting the
    pairs 2–5 and 5–7 merges 2, 5 and 7); output experts are numbered by their smallest member; a
    group that was already in the layer keeps its coefficients, a new one is averaged uniformly;
    a layer left with every expert kept alone is removed from the plan. The copy is not validated
    against a model (:meth:`PruningPlan.validate_for` does that, e.g. too few experts left).
    """
    drop = sorted({int(e) for e in drop})
    for e in [*drop, *(x for g in merge for x in g)]:
        if not 0 <= int(e) < num_experts:
            raise MoescopeError(f"layer {layer}: expert {e} is not in 0..{num_experts - 1}")
    parent = list(range(num_experts))

    def find(e: int) -> int:
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    for g in merge:
        g = [int(e) for e in g]
        for e in g[1:]:
            parent[find(e)] = find(g[0])
    both = sorted({e for g in merge for e in g} & set(drop))
    if both:
        raise MoescopeError(f"layer {layer}: expert(s) {both} cannot be both dropped and merged")
    members: dict[int, list[int]] = {}
    for e in range(num_experts):
        if e not in drop:
            members.setdefault(find(e), []).append(e)
    groups = sorted(members.values(), key=lambda g: g[0])
    old = plan.layers.get(int(layer))
    old_coeffs, old_perms, old_folds = {}, {}, {}
    if old is not None and old.coefficients is not None:
        old_coeffs = {tuple(g): c for g, c in zip(old.groups, old.coefficients)}
    if old is not None and old.permutations is not None:
        old_perms = {tuple(g): p for g, p in zip(old.groups, old.permutations)}
    if old is not None and old.folds is not None:
        old_folds = {tuple(g): f for g, f in zip(old.groups, old.folds)}
    layers = dict(plan.layers)
    if not drop and all(len(g) == 1 for g in groups):
        layers.pop(int(layer), None)
    else:
        coeffs = None
        if any(tuple(g) in old_coeffs for g in groups):
            coeffs = [list(old_coeffs.get(tuple(g), [1.0 / len(g)] * len(g))) for g in groups]
        perms = [old_perms.get(tuple(g)) for g in groups] if old_perms else None
        folds = [old_folds.get(tuple(g)) for g in groups] if old_folds else None
        router = None
        if old is not None and old.router_coefficients is not None:  # kept groups keep their router rows' coefficients
            old_router = {tuple(g): c for g, c in zip(old.groups, old.router_coefficients)}
            fallback = coeffs or [[1.0 / len(g)] * len(g) for g in groups]
            router = [list(old_router.get(tuple(g), c)) for g, c in zip(groups, fallback)]
        layers[int(layer)] = LayerPlan(groups, coeffs, old.merge_router if old is not None else True, perms,
                                       old.operator if old is not None else "linear",
                                       old.density if old is not None else None, router, folds)
    provenance = {"strategy": "manual"}
    previous = plan.provenance.get("strategy")
    if previous and previous != "manual":
        provenance["edited_from"] = previous
    elif plan.provenance.get("edited_from"):
        provenance["edited_from"] = plan.provenance["edited_from"]
    return PruningPlan(plan.base_model, layers, dict(plan.skip_beta), provenance, plan.version)


def same_source(a: str, b: str) -> bool:
    """Whether two model sources name the same model: the same folder once resolved ('demo' is the
    shipped folder), or the same hub id."""
    from moescope.analysis.model import resolve_source

    if a == b:
        return True
    try:
        (_, pa), (_, pb) = resolve_source(a), resolve_source(b)
    except MoescopeError:
        return False
    return pa is not None and pb is not None and pa.resolve() == pb.resolve()


def signed_coefficients(provenance) -> bool:
    """Whether the plan's merge operator allows negative coefficients. Moescope's merges are
    weighted averages of the group's rows (non-negative weights, positive sum), except learned
    coefficients (``merge: learned``), which are free and fitted to the layer's output."""
    params = (provenance or {}).get("params") if isinstance(provenance, dict) else None
    return isinstance(params, dict) and params.get("merge") == "learned"


MAX_COEFFICIENT = 1e4  # |coefficient| beyond this scales weights towards overflow (1e38 · w is inf in float32)


def _check_coefficients(coeffs: list[list[float]], groups, where: str, key, signed: bool) -> None:
    for c, g in zip(coeffs, groups, strict=True):
        bad = [w for w in c if not math.isfinite(w)]
        if bad:
            raise MoescopeError(f"{where}: layer {key}, group {g}: merge coefficient {bad[0]} is not a finite number")
        huge = [w for w in c if abs(w) > MAX_COEFFICIENT]
        if huge or sum(abs(w) for w in c) > MAX_COEFFICIENT:
            shown = huge[0] if huge else f"sum {sum(abs(w) for w in c):g}"
            raise MoescopeError(f"{where}: layer {key}, group {g}: merge coefficient {shown} is too large; "
                                f"coefficients are at most {MAX_COEFFICIENT:g} in size (larger ones overflow the "
                                "merged weights)")
        if signed:
            continue
        if any(w < 0 for w in c):
            raise MoescopeError(f"{where}: layer {key}, group {g}: merge coefficient {min(c)} is negative; the "
                                "merge is a weighted average (only learned coefficients may be negative)")
        if sum(c) <= 0:
            raise MoescopeError(f"{where}: layer {key}, group {g}: merge coefficients sum to {sum(c)}; they must "
                                "sum to a positive number")


def _check_folds(folds, groups, perms, operator: str, coeffs, where: str, key) -> list:
    """The model-independent checks of a layer's ``folds`` (see the module docstring); returns them
    with plain ints. The map length against the model's intermediate size is
    :func:`analysis.model.folding.check_folds`'s (:meth:`PruningPlan.validate_for`)."""
    shape = (f"{where}: layer {key}: 'folds' must list, for each group, null or one entry per member: null (the "
             "member's neurons stay where they are) or a list sending each of the member's neurons to a neuron of "
             "the merged expert")
    if (not isinstance(folds, list) or len(folds) != len(groups)
            or any(fs is not None and (not isinstance(fs, list) or len(fs) != len(g)) for fs, g in zip(folds, groups))
            or any(f is not None and (not isinstance(f, list) or not f or not all(_is_int(i) for i in f))
                   for fs in folds for f in (fs or []))):
        raise MoescopeError(shape)
    out = []
    for j, (fs, g) in enumerate(zip(folds, groups)):
        if fs is None or all(f is None for f in fs):
            out.append(None if fs is None else [None] * len(g))
            continue
        where_g = f"{where}: layer {key}, group {g}"
        sizes = {len(f) for f in fs if f is not None}
        if len(sizes) > 1:
            raise MoescopeError(f"{where_g}: the folds have different lengths {sorted(sizes)}; each lists one target "
                                "per intermediate neuron of its member (all members have the same number)")
        size = sizes.pop()
        bad = next((i for f in fs if f is not None for i in f if not 0 <= i < size), None)
        if bad is not None:
            raise MoescopeError(f"{where_g}: fold target {bad} is not a neuron of the merged expert (0..{size - 1})")
        reached = set(range(size)) if any(f is None for f in fs) else {i for f in fs for i in f}
        if len(reached) < size:
            missing = sorted(set(range(size)) - reached)
            raise MoescopeError(f"{where_g}: the fold sends no member neuron to neuron(s) {missing[:5]}"
                                f"{'…' if len(missing) > 5 else ''} of the merged expert; every neuron needs at least "
                                "one (a reference member given as null keeps all of its own)")
        if perms is not None and perms[j] is not None and any(p is not None for p in perms[j]):
            raise MoescopeError(f"{where_g}: the group has both permutations and folds; a fold already places every "
                                "neuron (a permutation is a fold that is one-to-one): give one of them")
        if operator != "linear":
            raise MoescopeError(f"{where_g}: folds combine by weighted averages of the neurons they join; operator "
                                f"{operator} does not apply to a folded group (use operator linear)")
        if coeffs is not None and any(w < 0 for w in coeffs[j]):
            raise MoescopeError(f"{where_g}: fold weight {min(coeffs[j])} is negative; a fold averages the neurons it "
                                "joins with non-negative weights (the members' coefficients)")
        out.append([None if f is None else [int(i) for i in f] for f in fs])
    return out


def _keep_constant(name: str) -> float:
    """JSON's non-standard NaN / Infinity are read (and then refused with the plan's own error)."""
    return float(name)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _layer_key(key, where) -> int:
    """A layer key as written in a plan: a canonical decimal integer in ASCII digits (``"0"``,
    ``"12"``); ``"02"``, ``" 2"``, ``"+2"`` or ``"٣"`` would name a layer ambiguously and are refused."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if not isinstance(key, str) or not re.fullmatch(r"0|[1-9][0-9]{0,8}", key):
        raise MoescopeError(f"{where}: layer key {key!r} is not a decoder-layer index; layer keys are written "
                            "as plain decimal numbers without leading zeros (\"0\", \"3\", \"12\")")
    return int(key)


def _as_float(w, where: str, key, what: str = "merge coefficient") -> float:
    try:
        return float(w)
    except OverflowError:
        raise MoescopeError(f"{where}: layer {key}: {what} {str(w)[:20]}… is too large to be a "
                            "number") from None


# ---- experts no calibration token reached ------------------------------------------------------
UNUSED_KEY = "unused_kept"  # provenance key of :func:`unused_kept`'s finding


def unused_kept(plan: PruningPlan, usage_counts: dict[int, list[float]]) -> dict[str, dict[str, list[int]]]:
    """Where ``plan`` keeps, as an output expert of its own, an expert that no calibration token was
    routed to while it removes (drops, or merges into another) experts that tokens were routed to.

    ``usage_counts``: per MoE layer, the number of calibration tokens routed to each expert.
    Returns ``{layer: {"kept": [unused experts kept alone], "removed": [used experts dropped or
    merged]}}`` for the layers where both lists are non-empty (``{}``: no such layer). A rule that
    keeps a dead expert (MC-Suite's pair rule never picks an unrouted expert, so Max-ECC and
    Max-ETS can keep one) is followed literally; this says so."""
    out = {}
    for l, lp in sorted(plan.layers.items()):
        counts = usage_counts.get(l)
        if counts is None:
            continue
        alone = {g[0] for g in lp.groups if len(g) == 1}
        kept = sorted(e for e in alone if counts[e] == 0)
        removed = sorted(e for e in range(len(counts)) if counts[e] > 0 and e not in alone)
        if kept and removed:
            out[str(l)] = {"kept": kept, "removed": removed}
    return out


def unused_kept_note(plan: PruningPlan) -> str | None:
    """One line saying which experts without calibration tokens ``plan`` keeps while removing used
    ones (from its provenance, :func:`unused_kept`), or None when it keeps none (or was not checked)."""
    found = (plan.provenance or {}).get(UNUSED_KEY) or {}
    if not found:
        return None
    n = sum(len(v["kept"]) for v in found.values())
    kept = "; ".join(f"layer {l}: {', '.join(map(str, v['kept']))}" for l, v in sorted(found.items(), key=lambda t: int(t[0])))
    removed = "; ".join(f"layer {l}: {', '.join(map(str, v['removed']))}"
                        for l, v in sorted(found.items(), key=lambda t: int(t[0])))
    return (f"keeps {n} expert{'s' if n != 1 else ''} that no calibration token reached ({kept}) while it drops "
            f"or merges experts that tokens were routed to ({removed})")


def unused_kept_short(plan: PruningPlan) -> str:
    """The finding of :func:`unused_kept` for a table cell: ``none``, ``2 (L1: 4, 7)``, or ``— (not
    checked)`` for a plan made without calibration tokens (by hand, or before this check existed)."""
    prov = plan.provenance or {}
    if UNUSED_KEY not in prov:
        return "— (not checked)"
    found = prov[UNUSED_KEY] or {}
    if not found:
        return "none"
    n = sum(len(v["kept"]) for v in found.values())
    where = "; ".join(f"L{l}: {', '.join(map(str, v['kept']))}" for l, v in sorted(found.items(), key=lambda t: int(t[0])))
    return f"{n} ({where})"


def recipe_name(provenance: dict | None) -> str:
    """What a plan is called where a person reads it (a status line, a proposed plan name, an
    experiment's label): the preset it was made from (e.g. ``mc-smoe``), else its strategy (e.g.
    ``router-guided``), else ``manual``."""
    prov = provenance or {}
    return str(prov.get("preset") or prov.get("strategy") or "manual")
