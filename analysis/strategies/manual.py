"""A plan given by hand: a drop set or explicit groups."""

from __future__ import annotations

import json

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan
from moescope.analysis.strategies.base import Param, register


def parse_drop(text: str) -> dict[str, list[int]]:
    """``"0:1,3;2:5"`` → {"0": [1, 3], "2": [5]}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer, _, experts = part.partition(":")
        try:
            out[str(int(layer))] = [int(e) for e in experts.split(",") if e.strip()]
        except ValueError:
            raise MoescopeError(f"--drop expects LAYER:E,E;LAYER:E (e.g. 0:1,3;2:5), got {text!r}") from None
    return out


def parse_json(text: str):
    from moescope.analysis.core.outputs import loads_json

    try:
        return loads_json(text, "--param value", unique_keys=True)
    except json.JSONDecodeError as err:
        raise MoescopeError(f"expected JSON, got {text!r} ({err.msg})") from None


def _check(params, model) -> None:
    if params.get("groups") is None and params.get("drop") is None:
        raise MoescopeError("manual needs drop ({layer: [experts]}) or groups ({layer: [[experts], ...]})")


@register("manual", "A drop set (drop: {layer: [experts]}) or explicit groups (groups: {layer: [[...]]} with "
          "optional coefficients), as given by a person.",
          [Param("drop", dict, None, help="LAYER:E,E;LAYER:E — experts to drop", parse=parse_drop, affects_key=False),
           Param("groups", dict, None, help='JSON {"0": [[0, 5], [1], ...]} — output experts as groups', parse=parse_json,
                 affects_key=False),
           Param("coefficients", dict, None, help="JSON {layer: [[c, ...], ...]} for groups", parse=parse_json,
                 affects_key=False),
           Param("merge_router", bool, True, help="merge router rows of a group (else the dominant expert's row)",
                 affects_key=False)],
          target=False, needs_data=False, merges=True, manual=True, check=_check)
def manual(ctx, params):
    if params.get("groups") is not None:
        layers = {}
        coeffs = params.get("coefficients") or {}
        for key, groups in params["groups"].items():
            l = int(key)
            layers[l] = LayerPlan([[int(e) for e in g] for g in groups], coeffs.get(key) or coeffs.get(l),
                                  params["merge_router"])
        return PruningPlan(ctx.model.source, layers, provenance=ctx.provenance("manual"))
    drop = {int(k): [int(e) for e in v] for k, v in params["drop"].items()}
    return PruningPlan.from_drop(ctx.model, drop, provenance=ctx.provenance("manual"))
