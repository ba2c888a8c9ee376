"""Enumeration against brute force on every family: each subset's loss (fast scorer) equals
running the structurally pruned transformers block, and exact / greedy / beam choose what a
naive search over those block runs chooses. DeepSeek-V3 only admits subsets that keep its
routing groups equal (2 of each group of 4)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import FAMILIES
from moescope.analysis.measure.sensitivity import enumerate_layer
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model

IDS = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(5))


def block_input(model, layer):
    seen = []
    h = model.layers[layer].block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model.hf(input_ids=IDS)
    h.remove()
    return seen[0]


def block_out(block, x):
    y = block(x[None])
    return y[0] if isinstance(y, tuple) else y


def group_counts(view, C) -> list[int] | None:
    """Experts of ``C`` per routing group for group-limited routers (DeepSeek-V2/V3 style), else None."""
    n_group = view.router_params.n_group if view.spec.group_limited else 1
    if not n_group or n_group == 1:
        return None
    per = view.num_experts // n_group
    return [sum(e // per == g for e in C) for g in range(n_group)]


def allowed(view, C) -> bool:  # kept routing groups stay equal
    counts = group_counts(view, C)
    return counts is None or len(set(counts)) == 1


def reachable(view, C) -> bool:  # a balanced 4 (2 per group) can still be reached
    counts = group_counts(view, C)
    return counts is None or min(counts) >= 4 // len(counts)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_subset_and_every_search_match_brute_force(family):
    model = wrap_model(tiny_model(family, seed=2))
    l = model.moe_layers[-1]
    x = block_input(model, l)
    block = model.layers[l].block
    with torch.no_grad():
        full = block_out(block, x)
    memo = {}

    def loss(C):
        if C not in memo:
            if model.can_keep(l, list(C)):
                with torch.no_grad(), model.temporary_edit(l):
                    model.keep(l, list(C))
                    memo[C] = float((block_out(block, x) - full).double().pow(2).sum().sqrt())
            else:  # DeepSeek-V3 on the way down (7, 5 experts): routing groups cannot be equal, masked router
                with torch.no_grad(), model.restricted(l, list(C)):
                    memo[C] = float((block_out(block, x) - full).double().pow(2).sum().sqrt())
        return memo[C]

    view = model.layers[l]
    groups = group_counts(view, range(8))
    subsets = [C for C in itertools.combinations(range(8), 4) if allowed(view, C)]
    # balanced subsets: C(per group, 4 / n_group) ** n_group (36 for two groups of 4); else C(8, 4) = 70
    assert len(subsets) == (math.comb(8 // len(groups), 4 // len(groups)) ** len(groups) if groups else 70)
    exact = enumerate_layer(model.layers[l], x, keep=4, method="exact")
    assert len(exact.candidates) == len(subsets)
    for C, got in exact.candidates:
        assert got == pytest.approx(loss(tuple(C)), rel=1e-4, abs=1e-6), C
    assert exact.keep == list(min(subsets, key=loss))
    for method, width in (("greedy", 1), ("beam", 4)):
        beam = [tuple(range(8))]
        for size in range(7, 3, -1):
            nxt = sorted({tuple(e for e in C if e != d) for C in beam for d in C})
            nxt = [C for C in nxt if (allowed(view, C) if size == 4 else reachable(view, C))]
            beam = sorted(nxt, key=loss)[:width]
        r = enumerate_layer(model.layers[l], x, keep=4, method=method)
        assert r.keep == list(beam[0]), method
        assert r.loss == pytest.approx(loss(beam[0]), rel=1e-4, abs=1e-6)
