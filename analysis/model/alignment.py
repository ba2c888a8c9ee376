"""Aligning experts before merging them: permutations of their intermediate neurons.

A SwiGLU expert ``y = W_down (act(W_gate x) ⊙ W_up x)`` computes the same function when its I
intermediate neurons are permuted, i.e. the rows of ``W_gate`` / ``W_up`` (and their biases)
and the matching columns of ``W_down`` are reordered together. Experts trained from different
initialisations therefore agree at best up to such a permutation, and averaging their raw
tensors mixes unrelated neurons. Before a group is combined, every member is permuted onto the
group's reference expert (MC-SMoE ``merging/permutation.py``, REAP ``permute.py``):

* ``weights`` — weight matching: neuron i of expert e is described by the vector
  ``[W_gate[i], W_up[i], W_down[:, i], b_gate[i], b_up[i]]``; the permutation maximises
  ``Σ_i ⟨v_ref[i], v_e[π(i)]⟩`` (a linear assignment).
* ``activations`` — activation matching: the intermediate activations
  ``h_e = act(W_gate x + b_gate) ⊙ (W_up x + b_up)`` ``[T, I]`` of both experts on the same
  calibration tokens (router bypassed) are standardised per neuron; the permutation maximises
  the summed Pearson correlation ``Σ_i corr(h_ref[:, i], h_e[:, π(i)])``.

A permutation ``perm`` (LongTensor ``[I]``) is read "new neuron i is old neuron ``perm[i]``".
Where the neurons sit in each fused tensor is the storage form's business
(:attr:`analysis.layouts.Layout.neurons`), so one code path serves every layout (``gate_up``,
Llama 4's transposed ``llama4``, GPT-OSS's interleaved and biased ``gpt_oss``). An experts module
holding a per-expert tensor its layout does not place is refused (:func:`check_alignable`):
moescope would not know how to permute it.
"""

from __future__ import annotations

import torch
from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.model.layouts import LAYOUTS
from torch import Tensor

ALIGNMENTS = ("none", "weights", "activations", "routed-activations")
OUTPUT_SIDE = ("down_proj_bias",)  # per-expert tensors that do not depend on the neuron order


def _layout(view):
    return LAYOUTS[view.spec.expert_layout]


def check_alignable(view) -> None:
    """Refuse a layer whose experts hold per-expert tensors the layout does not place."""
    neurons = _layout(view).neurons
    unknown = [n for n in view.expert_param_names() if n not in neurons and n not in OUTPUT_SIDE]
    if unknown:
        raise MoescopeError(
            f"layer {view.index}: {view.spec.name} experts hold {unknown}, which the '{view.spec.expert_layout}' "
            "layout does not place on the intermediate-neuron axis, so their neurons cannot be permuted exactly; "
            "merge with align=none")


def intermediate_size(view) -> int:
    """I, the number of intermediate neurons of each routed expert of ``view``."""
    axis, _ = _layout(view).neurons["down_proj"]
    return int(view.experts.down_proj.shape[1 + axis])


def _index(perm: Tensor, form: str) -> Tensor:
    """Indices along a neuron axis of the given form that apply ``perm``."""
    if form == "interleaved":  # gate 2i, up 2i+1
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    if form == "halves":  # gate neurons, then up neurons
        return torch.cat([perm, perm + perm.numel()])
    return perm


def permute_expert(view, tensors: dict[str, Tensor], e: int, perm: Tensor) -> dict[str, Tensor]:
    """A copy of the fused expert ``tensors`` (name → ``[E, ...]``, the experts module's layout)
    in which expert ``e``'s intermediate neurons are permuted by ``perm``; the other experts and
    every other tensor are shared, not copied."""
    neurons = _layout(view).neurons
    perm = torch.as_tensor(perm, dtype=torch.long)
    out = dict(tensors)
    for name, t in tensors.items():
        if name not in neurons:  # output side (check_alignable refuses anything else)
            continue
        axis, form = neurons[name]
        t = t.clone()
        t[e] = t[e].index_select(axis, _index(perm, form).to(t.device))
        out[name] = t
    return out


def permute_expert_in_place(view, e: int, perm: Tensor) -> None:
    """Permute expert ``e`` of the live model (its function is unchanged)."""
    check_alignable(view)
    params = dict(view.experts.named_parameters(recurse=False))
    new = permute_expert(view, {n: p.detach() for n, p in params.items()}, e, perm)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(new[n])
    view.model.weights_changed()


def neuron_features(view, e: int, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """``[I, 3d (+2)]``: per intermediate neuron, its gate row, up row, down column (and the
    gate/up biases where the family has them)."""
    w = view.expert_weights(e, tensors)
    parts = [w.gate.detach().float(), w.up.detach().float(), w.down.detach().float().T]
    parts += [b.detach().float()[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat(parts, dim=1)


def intermediate_activations(view, e: int, x: Tensor, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """``[T, I]``: expert ``e``'s intermediate activations on ``x [T, d]`` (router bypassed),
    the vector its down projection reads."""
    ex = view.experts
    t = tensors if tensors is not None else ex._parameters
    x = x.reshape(-1, x.shape[-1]).to(t["gate_up_proj"].dtype)
    with torch.no_grad():
        return _layout(view).intermediate(ex, t, e, x).float()


def _assign(score: Tensor) -> Tensor:
    """The permutation π maximising ``Σ_i score[i, π(i)]`` (scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def weight_matching(view, ref: int, e: int, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """The permutation of expert ``e`` that best matches ``ref`` neuron by neuron (inner products
    of the concatenated weight vectors)."""
    a, b = neuron_features(view, ref, tensors), neuron_features(view, e, tensors)
    return _assign(a @ b.T)


def _standardise(h: Tensor) -> Tensor:
    h = h.double() - h.double().mean(0)
    return h / h.norm(dim=0).clamp_min(1e-12)


def activation_correlation(view, ref: int, e: int, x: Tensor, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """``[I, I]`` Pearson correlation between ``ref``'s neuron i and ``e``'s neuron j on ``x``."""
    a = _standardise(intermediate_activations(view, ref, x, tensors))
    b = _standardise(intermediate_activations(view, e, x, tensors))
    return a.T @ b


def activation_matching(view, ref: int, e: int, x: Tensor, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """The permutation of expert ``e`` whose intermediate activations correlate best with ``ref``'s
    on the calibration tokens ``x``."""
    return _assign(activation_correlation(view, ref, e, x, tensors))


def reference_position(coeffs: list[float]) -> int:
    """The group's reference member: the largest coefficient (the first of equals)."""
    return max(range(len(coeffs)), key=lambda i: (coeffs[i], -i))


def routed_pair_tokens(view, ref: int, e: int, x: Tensor) -> Tensor:
    """MC-SMoE's tokens for matching ``e`` onto ``ref`` (``permutation.py``: "gathered from tokens
    routed to both reference_mlp and target_mlp"): the rows of ``x`` routed to ``ref`` followed by those
    routed to ``e`` (a token routed to both appears twice, as the authors' concatenation has it)."""
    idx = view.route(x).topk_idx
    return torch.cat([x[(idx == ref).any(-1)], x[(idx == e).any(-1)]])


def align_group(view, group: list[int], coeffs: list[float], method: str, x: Tensor | None = None,
                max_tokens: int = 8192) -> list[list[int] | None]:
    """One permutation per member of ``group`` (None for the reference and with ``none``) that maps
    it onto the reference expert. ``activations`` needs ``x [T, d]`` (the layer's calibration
    inputs; at most ``max_tokens`` of them, evenly strided, are used), every member seeing the same
    tokens; ``routed-activations`` matches each member on the tokens routed to it or to the reference
    (:func:`routed_pair_tokens`; MC-SMoE's), the identity where fewer than two such tokens exist."""
    if method not in ALIGNMENTS:
        raise unknown_name("alignment", method, ALIGNMENTS)
    if method == "none" or len(group) == 1:
        return [None] * len(group)
    check_alignable(view)
    ref = group[reference_position(coeffs)]
    if method in ("activations", "routed-activations"):
        if x is None:
            raise MoescopeError(f"align={method} needs calibration tokens; use align=weights without them")
        x = x.reshape(-1, x.shape[-1])
        if method == "activations" and x.shape[0] > max_tokens:
            x = x[:: -(-x.shape[0] // max_tokens)]
    out: list[list[int] | None] = []
    for e in group:
        if e == ref:
            out.append(None)
            continue
        if method == "weights":
            perm = weight_matching(view, ref, e)
        elif method == "activations":
            perm = activation_matching(view, ref, e, x)
        else:
            xe = routed_pair_tokens(view, ref, e, x)
            if xe.shape[0] > max_tokens:
                xe = xe[:: -(-xe.shape[0] // max_tokens)]
            perm = activation_matching(view, ref, e, xe) if xe.shape[0] >= 2 else torch.arange(intermediate_size(view))
        out.append(perm.tolist())
    return out


def aligned_tensors(view, groups: list[list[int]], permutations, tensors: dict[str, Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """The fused expert tensors (float32 copies) with every group member permuted as
    ``permutations`` says (``None`` anywhere = identity)."""
    base = tensors if tensors is not None else {n: p.detach() for n, p in view.experts.named_parameters(recurse=False)}
    out = {n: t.float() for n, t in base.items()}
    if not permutations:
        return out
    for g, perms in zip(groups, permutations, strict=True):
        for e, perm in zip(g, perms or [None] * len(g), strict=True):
            if perm is not None:
                out = permute_expert(view, out, e, torch.as_tensor(perm))
    return out


def check_permutations(view, groups: list[list[int]], permutations) -> None:
    """Refuse permutations whose shape does not follow ``groups`` or that are not permutations of
    the layer's I intermediate neurons."""
    where = f"layer {view.index}"
    if permutations is None:
        return
    if len(permutations) != len(groups):
        raise MoescopeError(f"{where}: 'permutations' has {len(permutations)} entries for {len(groups)} groups")
    if any(p is not None for ps in permutations for p in (ps or [])):
        check_alignable(view)
    I = intermediate_size(view)
    for g, perms in zip(groups, permutations):
        if perms is None:
            continue
        if len(perms) != len(g):
            raise MoescopeError(f"{where}: group {g} has {len(g)} members but {len(perms)} permutations")
        for e, p in zip(g, perms):
            if p is not None and sorted(p) != list(range(I)):
                raise MoescopeError(f"{where}: the permutation of expert {e} is not a permutation of its "
                                    f"{I} intermediate neurons (0..{I - 1})")
