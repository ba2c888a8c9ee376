"""Group-and-merge (Zhang et al.) and router-guided merging: grouping experts by similarity and
choosing the merge coefficients of each group, and the operators that combine a group's (aligned)
experts into one.

Grouping N experts into r groups: spectral clustering on the similarity as a precomputed
affinity (scikit-learn, k-means label assignment as MC-SMoE's code; ``spectral_discretize`` the
discretize assignment), greedy merging of the most similar pair of groups (average linkage)
until r remain, or average-linkage agglomerative clustering (scikit-learn; HC-SMoE). Merging a
group: ``max`` keeps its most-used expert, ``uniform`` averages, ``usage`` weights by usage
frequency, ``learned`` fits group-and-merge eq. 6 (``λ Σ α_i θ_i``, ``Σ α = 1``, router rows
``Σ α_i W_i``) by SGD so that the merged layer reproduces the original layer's output
(:func:`learn_coefficients`); ``frequency`` is ``usage`` under the name
MC-SMoE and HC-SMoE give it (frequency-weighted average); ``ties`` weights by usage and combines
with the TIES operator below; ``fix-dom-same`` (HC-SMoE's script) folds every member's neurons onto
the group's dominant expert, :mod:`analysis.model.folding`.

Operators (every fused expert tensor, biases included, after the members were permuted onto the
reference expert, :mod:`analysis.alignment`): ``linear`` is ``W = Σ_i c_i W_i``; ``ties`` is
TIES-style sign-consensus merging (Yadav et al. 2023) of the members' differences from their
weighted mean: with ``w = c / Σc``, ``m = Σ_i w_i W_i`` and ``τ_i = W_i − m``, each ``τ_i`` keeps
its largest-magnitude ``density`` fraction (trim), the elected sign is ``sign(Σ_i w_i τ̂_i)`` (none where that sum is 0 up to rounding), and
the merged difference is the ``w``-weighted mean of the trimmed differences that agree with it
(disjoint mean): ``W = Σc · (m + δ)``. For a group of two, ``τ_1 = w_2 (W_1 − W_2)`` and
``τ_2 = −w_1 (W_1 − W_2)`` are opposite with proportional magnitudes, so the elected mass
``w_1 τ_1 + w_2 τ_2`` is exactly 0 everywhere and no sign wins: TIES of two members *is* the
weighted mean ``Σ c_i W_i``, and :func:`ties_merge` defines it so (computing the mass in floating
point instead elects signs from rounding noise where the weights are skewed). It differs from
``linear`` only for groups of three or more.
"""

from __future__ import annotations

import math

import torch
from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.model.routing import ROUTING_RULES, RouterParams, mix
from torch import Tensor

GROUPINGS = ("spectral", "spectral_discretize", "greedy", "agglomerative")
MERGES = ("max", "uniform", "usage", "frequency", "learned", "ties", "fix-dom-same")
OPERATORS = ("linear", "ties")


DISTANCES = ("mse", "euclidean")  # similarity names that are distances (smaller = more alike)


def is_distance(kind: str) -> bool:
    """Whether a similarity matrix named ``kind`` is a distance (MSE, Euclidean: smaller = more alike)."""
    return any(d in kind for d in DISTANCES)


def affinity(S: Tensor, kind: str) -> Tensor:
    """A symmetric affinity in [0, 1] from a similarity or distance matrix.

    CKA: clamped to [0, 1]; cosine (and router logits, as MC-SMoE maps them): ``(1 + cos) / 2``;
    MSE or Euclidean (distances): ``exp(−dist / median)`` with the median over off-diagonal entries."""
    S = S.double()
    if is_distance(kind):
        off = S[~torch.eye(S.shape[0], dtype=torch.bool)]
        scale = off.median().clamp_min(1e-30)
        A = torch.exp(-S / scale)
    elif "cosine" in kind or kind == "router_logits":
        A = (1 + S) / 2
    else:
        A = S.clamp(0, 1)
    A = (A + A.T) / 2
    A.fill_diagonal_(1.0)
    return A


def group_experts(A: Tensor, r: int, method: str, seed: int = 0, distance: Tensor | None = None) -> list[list[int]]:
    """Partition ``A``'s experts into ``r`` groups (each sorted; groups ordered by first member).

    ``spectral`` is MC-SMoE's call (its ``merging/grouping.py``): scikit-learn's
    ``SpectralClustering(affinity="precomputed", assign_labels="kmeans", random_state=seed)`` on
    ``A``; ``spectral_discretize`` the same with ``assign_labels="discretize"``. ``agglomerative``
    is average linkage (HC-SMoE) on ``distance`` when given (the representation's own distance,
    e.g. Euclidean between mean outputs: average linkage is not invariant to remapping distances),
    else on ``1 − A``. ``greedy`` merges the pair of groups with the highest mean affinity."""
    n = A.shape[0]
    if not 1 <= r <= n:
        raise MoescopeError(f"cannot form {r} groups from {n} experts")
    if method not in GROUPINGS:
        raise unknown_name("grouping", method, GROUPINGS)
    if r == n:
        return [[e] for e in range(n)]
    if method == "greedy":
        groups = [[e] for e in range(n)]
        while len(groups) > r:
            best, pair = -math.inf, (0, 1)
            for i in range(len(groups)):
                for j in range(i + 1, len(groups)):
                    s = float(A[groups[i]][:, groups[j]].mean())
                    if s > best:
                        best, pair = s, (i, j)
            i, j = pair
            groups[i] = sorted(groups[i] + groups[j])
            del groups[j]
        return sorted(groups)
    import numpy as np

    if method in ("spectral", "spectral_discretize"):
        from sklearn.cluster import SpectralClustering

        labels = SpectralClustering(n_clusters=r, affinity="precomputed", random_state=seed,
                                    assign_labels="kmeans" if method == "spectral" else "discretize"
                                    ).fit_predict(A.numpy())
    else:
        from sklearn.cluster import AgglomerativeClustering

        D = (1 - A).clamp_min(0) if distance is None else distance.double().clamp_min(0)
        D = (D + D.T) / 2
        D.fill_diagonal_(0.0)
        labels = AgglomerativeClustering(n_clusters=r, metric="precomputed", linkage="average").fit_predict(
            D.numpy())
    groups = [sorted(np.flatnonzero(labels == k).tolist()) for k in np.unique(labels)]
    groups = [g for g in groups if g]
    # spectral clustering may leave clusters empty (many clusters, or near-uniform affinities such as
    # a model's 128 barely distinct experts): split the largest groups until there are r
    while len(groups) < r:
        g = max(groups, key=lambda g: (len(g), -g[0]))
        groups.remove(g)
        groups.extend(_split_group(A, g))
    if len(groups) != r:
        raise MoescopeError(f"{method} clustering produced {len(groups)} groups instead of {r}; try grouping=greedy")
    return sorted(groups)


def _split_group(A: Tensor, g: list[int]) -> list[list[int]]:
    """Two groups from ``g``: the member least alike to the rest (lowest mean affinity to the
    others; ties: the higher index) on its own, the others together. Deterministic."""
    if len(g) == 2:
        return [[g[0]], [g[1]]]
    sub = A[g][:, g].double()
    mean_to_others = (sub.sum(1) - sub.diagonal()) / (len(g) - 1)
    out = max(range(len(g)), key=lambda i: (-float(mean_to_others[i]), g[i]))
    return [[g[out]], [e for i, e in enumerate(g) if i != out]]


def group_coefficients(groups: list[list[int]], method: str, usage: Tensor) -> list[list[float]]:
    """Coefficients per group for ``max`` / ``uniform`` / ``usage`` (= ``frequency`` = ``ties``);
    ``learned`` starts from uniform."""
    if method not in MERGES:
        raise unknown_name("merge", method, MERGES)
    if method in ("frequency", "ties", "fix-dom-same"):  # fix-dom-same: routed-token shares (its fold refines them)
        method = "usage"
    out = []
    for g in groups:
        u = torch.tensor([float(usage[e]) for e in g], dtype=torch.float64)
        if method == "max":
            best = max(range(len(g)), key=lambda i: (u[i], -g[i]))
            out.append([1.0 if i == best else 0.0 for i in range(len(g))])
        elif method == "usage" and float(u.sum()) > 0:
            out.append((u / u.sum()).tolist())
        else:
            out.append([1.0 / len(g)] * len(g))
    return out


def router_guided_groups(usage: Tensor, logit_similarity: Tensor, r: int) -> list[list[int]]:
    """Merge-then-compress grouping: the r most-used experts lead; every other expert joins the
    leader whose router logits are most similar to its own (cosine over calibration tokens)."""
    E = usage.numel()
    leaders = sorted(sorted(range(E), key=lambda e: (-float(usage[e]), e))[:r])
    groups = {lead: [lead] for lead in leaders}
    for e in range(E):
        if e in groups:
            continue
        lead = max(leaders, key=lambda k: (float(logit_similarity[e, k]), -k))
        groups[lead].append(e)
    # the leader first, so "max"-style readers see the dominant expert at position 0
    return [[lead] + sorted(m for m in groups[lead] if m != lead) for lead in leaders]


# ---------------------------------------------------------------- operators


def ties_merge(P: Tensor, coeffs, density: float = 0.2) -> Tensor:
    """TIES-style merge of the members ``P [m, ...]`` with coefficients ``coeffs [m]`` (see the
    module docstring): trim each member's difference from the weighted mean to its top
    ``density`` fraction by magnitude, elect the sign by weighted mass, average the agreeing
    differences, and scale by ``Σ coeffs``. One or two members: ``Σ c_i P_i`` exactly."""
    if not 0 < density <= 1:
        raise MoescopeError(f"ties density must be in (0, 1], got {density}")
    P = P.float()
    c = torch.as_tensor(coeffs, dtype=torch.float32)
    if P.shape[0] <= 2:  # the elected mass of two members is exactly zero: the weighted mean (module docstring)
        return (c.reshape((-1,) + (1,) * (P.dim() - 1)) * P).sum(0)
    total = c.sum()
    w = c / total if float(total) != 0 else torch.full_like(c, 1 / len(c))
    shape = (-1,) + (1,) * (P.dim() - 1)
    mean = (w.reshape(shape) * P).sum(0)
    tau = (P - mean).reshape(P.shape[0], -1)
    k = max(1, math.ceil(density * tau.shape[1]))
    if k < tau.shape[1]:
        thresh = tau.abs().topk(k, dim=1).values[:, -1:]
        tau = torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))
    wc = w[:, None]
    mass = (wc * tau).sum(0)
    # untrimmed entries sum to exactly 0 (differences from the weighted mean): rounding noise must not elect a sign
    sign = torch.where(mass.abs() <= 1e-6 * (wc * tau.abs()).sum(0), torch.zeros_like(mass), torch.sign(mass))
    agree = (torch.sign(tau) == sign) & (tau != 0)
    num = (wc * tau * agree).sum(0)
    den = (wc * agree).sum(0)
    delta = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return float(total) * (mean + delta.reshape(mean.shape))


def combine_tensors(view, groups: list[list[int]], coeffs: list[list[float]], permutations=None,
                    operator: str = "linear", density: float = 0.2, tensors: dict[str, Tensor] | None = None,
                    folds=None) -> dict[str, Tensor]:
    """The merged layer's fused expert tensors (float32, one output expert per group): members
    permuted onto their reference (``permutations``, see :func:`analysis.alignment.align_group`),
    then combined by ``operator``; a group with ``folds`` (per group, per member) is folded instead
    (:func:`analysis.model.folding.fold_group`). A group of one with coefficient 1 and no
    permutation is that expert exactly, and so is one folded onto itself in place."""
    from moescope.analysis.model.alignment import aligned_tensors

    if operator not in OPERATORS:
        raise unknown_name("merge operator", operator, OPERATORS)
    T = aligned_tensors(view, groups, permutations, tensors)
    folded = {}
    if folds is not None:
        from moescope.analysis.model.folding import fold_group

        folded = {j: fold_group(view, T, g, c, fs) for j, (g, c, fs) in enumerate(zip(groups, coeffs, folds, strict=True))
                  if fs is not None and any(f is not None for f in fs)}
    out = {}
    for name, P in T.items():
        rows = []
        for j, (g, c) in enumerate(zip(groups, coeffs, strict=True)):
            if j in folded:
                rows.append(folded[j][name])
            elif len(g) == 1 or operator == "linear":
                rows.append(sum(float(w) * P[e] for e, w in zip(g, c, strict=True)))
            else:
                rows.append(ties_merge(P[g], c, density))
        out[name] = torch.stack(rows)
    return out


# ---------------------------------------------------------------- learned coefficients


def _merged_tensors(view, groups, coeffs: list[Tensor], tensors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    out = {}
    for name in view.expert_param_names():
        P = (tensors[name] if tensors is not None else getattr(view.experts, name)).detach().float()
        out[name] = torch.stack([(c.reshape(-1, *[1] * (P.dim() - 1)) * P[g]).sum(0) for g, c in zip(groups, coeffs)])
    return out


def _merged_router(view, groups, coeffs: list[Tensor], merge_router: bool):
    rows = {}
    for attr, R in view.router_tensors().items():
        R = R.detach().float()
        merged = []
        for g, c in zip(groups, coeffs):
            if merge_router:
                merged.append((c.reshape(-1, *[1] * (R.dim() - 1)) * R[g]).sum(0))
            else:
                merged.append(R[g[int(torch.argmax(c.detach()))]])
        rows[attr] = torch.stack(merged)
    return rows


def _layer_output(view, x: Tensor, tensors, rows) -> Tensor:
    """The routed part of a (merged) layer on ``x`` with given expert tensors and router rows."""
    logits = torch.nn.functional.linear(x.float(), rows["weight"], rows.get("bias"))
    base = view.router_params
    params = RouterParams(**{**base.__dict__, "score_bias": rows.get("score_bias")})
    idx, w = ROUTING_RULES[view.spec.routing](logits, params, None)
    Y = view.expert_outputs(x.float(), logits, tensors, params)  # [E', T, d]
    return mix(Y, idx, view.mix_weights(w))


def learned_merge_coefficients(beta: list[Tensor], lam: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Group-and-merge eq. 6's parameterisation: per group ``α = softmax(β)`` (so ``Σ α = 1``) and
    one scale ``λ``. Returns (the experts' coefficients ``λ · α``, the router rows' ``α``)."""
    alphas = [torch.softmax(b, 0) for b in beta]
    return [lam[i] * a for i, a in enumerate(alphas)], alphas


def learn_coefficients(view, x: Tensor, groups: list[list[int]], seq_len: int, merge_router: bool = True,
                       epochs: int = 50, lr: float = 1e-3, batch_sequences: int = 1, seed: int = 0,
                       tensors: dict[str, Tensor] | None = None
                       ) -> tuple[list[list[float]], list[list[float]], dict]:
    """The learned merge of group-and-merge (eq. 6, App. A): every group's experts become
    ``θ̂ = λ Σ_i α_i θ_i`` and its router row ``Ŵ = Σ_i α_i W_i`` with ``Σ_i α_i = 1`` (``α =
    softmax(β)``), ``λ`` and ``β`` of every group fitted jointly by plain SGD (learning rate
    ``lr``, 1e-3 in App. A) on ``L = ‖y − F(x; Θ̂, Ŵ)‖`` (Frobenius norm), ``y`` the original
    layer's output. The calibration sequences (``x`` is ``[N · seq_len, d]``) are split 3:1 into
    training and evaluation sequences (App. A); an epoch is one pass over the training sequences in
    a seeded random order, one SGD step per ``batch_sequences`` sequences; ``epochs`` (50 in App. A)
    passes. Starts from ``α`` uniform and ``λ = 1`` (uniform souping). Returns the fitted
    (experts' coefficients ``λ α``, router coefficients ``α``) when they beat the start on the
    evaluation sequences, else uniform souping's; plus the start/end losses. ``tensors`` are the
    members' aligned expert tensors (default: the layer's own)."""
    if x.shape[0] % seq_len:
        raise MoescopeError(f"learned merge: {x.shape[0]} tokens are not whole sequences of {seq_len}")
    n = x.shape[0] // seq_len
    seqs = x.float().reshape(n, seq_len, -1)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    cut = max(1, (3 * n) // 4) if n > 1 else 1
    train, held = seqs[order[:cut]], seqs[order[cut:]]
    with torch.no_grad():
        target = torch.stack([view.combine(s, view.route(s)).float() for s in train])
        target_held = torch.stack([view.combine(s, view.route(s)).float() for s in held]) if len(held) else None
    beta = [torch.zeros(len(gr), requires_grad=True) for gr in groups]
    lam = torch.ones(len(groups), requires_grad=True)
    opt = torch.optim.SGD([*beta, lam], lr=lr)

    def loss_on(xs, ys):
        xs, ys = xs.reshape(-1, xs.shape[-1]), ys.reshape(-1, ys.shape[-1])
        experts, router = learned_merge_coefficients(beta, lam)
        out = _layer_output(view, xs, _merged_tensors(view, groups, experts, tensors),
                            _merged_router(view, groups, router, merge_router))
        return torch.linalg.vector_norm(out - ys)

    with torch.no_grad():
        start = float(loss_on(held, target_held)) if target_held is not None else math.nan
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for b0 in range(0, len(train), batch_sequences):
            idx = perm[b0 : b0 + batch_sequences]
            opt.zero_grad()
            loss_on(train[idx], target[idx]).backward()
            opt.step()
            steps += 1
    with torch.no_grad():
        end = float(loss_on(held, target_held)) if target_held is not None else math.nan
        end_train = float(loss_on(train, target))
        experts, router = learned_merge_coefficients(beta, lam)
    kept = not (end > start)
    info = {"held_loss_start": start, "held_loss_end": end, "train_loss_end": end_train, "kept": kept,
            "steps": steps, "lambda": lam.detach().tolist()}
    if not kept:
        uniform = [[1.0 / len(gr)] * len(gr) for gr in groups]
        return uniform, uniform, info
    return [c.detach().tolist() for c in experts], [c.detach().tolist() for c in router], info
