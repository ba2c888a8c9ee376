"""Enumeration against brute force on every family: each subset's loss (fast scorer) equals
running the structurally pruned transformers block, and exact / greedy / beam choose what a
naive search over those block runs chooses. DeepSeek-V3 only admits subsets that keep its
routing groups equal (2 of each group of 4)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES

from moescope.analysis.model import wrap_model
from moescope.analysis.sensitivity import enumerate_layer
from moescope.analysis.synthetic import tiny_model

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


def allowed(family, C) -> bool:
    return family != "deepseek_v3" or sum(e < 4 for e in C) == 2


def reachable(family, C) -> bool:  # DeepSeek-V3: a balanced 4 (2 + 2) can still be reached
    return family != "deepseek_v3" or min(sum(e < 4 for e in C), sum(e >= 4 for e in C)) >= 2


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

    subsets = [C for C in itertools.combinations(range(8), 4) if allowed(family, C)]
    assert len(subsets) == (36 if family == "deepseek_v3" else 70)
    exact = enumerate_layer(model.layers[l], x, keep=4, method="exact")
    assert len(exact.candidates) == len(subsets)
    for C, got in exact.candidates:
        assert got == pytest.approx(loss(tuple(C)), rel=1e-4, abs=1e-6), C
    assert exact.keep == list(min(subsets, key=loss))
    for method, width in (("greedy", 1), ("beam", 4)):
        beam = [tuple(range(8))]
        for size in range(7, 3, -1):
            nxt = sorted({tuple(e for e in C if e != d) for C in beam for d in C})
            nxt = [C for C in nxt if (allowed(family, C) if size == 4 else reachable(family, C))]
            beam = sorted(nxt, key=loss)[:width]
        r = enumerate_layer(model.layers[l], x, keep=4, method=method)
        assert r.keep == list(beam[0]), method
        assert r.loss == pytest.approx(loss(beam[0]), rel=1e-4, abs=1e-6)
