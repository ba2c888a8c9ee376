"""The arithmetic and the checks of structural edits: which groups a layer accepts, and how rows of
fused expert tensors and router rows are combined. :class:`~.view.MoEModel` applies them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from moescope.analysis.core.errors import MoescopeError
from torch import Tensor

if TYPE_CHECKING:
    from moescope.analysis.model.view import MoELayer


def combine_rows(t: Tensor, groups: list[list[int]], coeffs: list[list[float]]) -> Tensor:
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


def onehot_of_largest(coeffs: list[list[float]]) -> list[list[float]]:
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
    if view.spec.group_limited and view.router_params.n_group > 1:
        check_routing_groups(view, groups)
    return coeffs


def check_routing_groups(view: MoELayer, groups: list[list[int]]) -> None:
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

