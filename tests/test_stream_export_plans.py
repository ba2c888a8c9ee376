"""Issue 31: the streamed export (analysis/model/stream_export.py) writes, byte for byte, what
load_moe → apply → export writes for every plan shape, not only the three of
tests/test_stream_export.py: plans generated from a fixed seed on every family's tiny model, with
groups in any order, merges with and without ``merge_router``, ``router_coefficients``,
coefficients (a lone expert scaled too), TIES, permutations, neuron folds (HC-SMoE's fix-dom-same) and a
different expert count per layer.
Then the three faults once planted in the streamed path and missed, as named regressions, each
checked against the source's own bytes (not only against the in-memory path)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from moescope.analysis.model import load_moe
from moescope.analysis.model.alignment import intermediate_size
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run.export import stream_export
from test_stream_export import assert_same_folder, in_memory, tensors

SEEDS = (11, 12, 13)  # three generated plans per family (fixed: the suite is reproducible)


def _split(items: list[int], parts: int, rng: random.Random) -> list[list[int]]:
    """``items`` cut into ``parts`` non-empty runs at random places."""
    cuts = sorted(rng.sample(range(1, len(items)), parts - 1))
    return [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)], strict=True)]


def generated_plan(source: str, seed: int) -> PruningPlan:
    """A random plan the model accepts: a random subset of MoE layers edited, each with its own
    number of output experts; each routing group's experts shuffled, some dropped, the rest cut
    into groups listed in a shuffled order; coefficients, router coefficients, ``merge_router``,
    TIES and permutations each drawn per layer; folds (drawn from their own generator, so the other
    draws are those of the plans before folds existed) in a linear layer without permutations:
    one member of each merged group kept in place, the others sent to random neurons."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    fold_rng, fold_gen = random.Random(seed + 1), torch.Generator().manual_seed(seed + 1)
    skeleton = load_moe(source, weights=False)
    layers = skeleton.moe_layers
    spec = {}
    for l in sorted(rng.sample(layers, rng.randint(1, len(layers)))):
        view = skeleton.layers[l]
        n, top_k = view.num_experts, view.top_k
        n_group = view.router_params.n_group if skeleton.family.group_limited else 1
        per = n // n_group
        k = rng.randint(max(2 if n_group > 1 else 1, -(-top_k // n_group)), per)  # outputs per routing group
        groups: list[list[int]] = []
        for r in range(n_group):
            members = list(range(r * per, (r + 1) * per))
            rng.shuffle(members)
            parts = _split(members[: rng.randint(k, per)], k, rng)
            rng.shuffle(parts)  # plan order, not sorted order
            groups += parts
        layer: dict = {"groups": groups}
        if rng.random() < 0.7:
            layer["coefficients"] = [[1.0] if len(g) == 1 and rng.random() < 0.7 else
                                     [round(rng.uniform(0.1, 1.0), 3) for _ in g] for g in groups]
        if rng.random() < 0.5:
            layer["router_coefficients"] = [[round(rng.uniform(0.1, 1.0), 3) for _ in g] for g in groups]
        layer["merge_router"] = rng.random() < 0.5
        if rng.random() < 0.3:
            layer["operator"] = "ties"
            layer["density"] = rng.choice([0.2, 0.5, 1.0])
        if rng.random() < 0.4 and any(len(g) > 1 for g in groups):
            I = intermediate_size(view)
            layer["permutations"] = [None if len(g) == 1 else
                                     [None, *(torch.randperm(I, generator=gen).tolist() for _ in g[1:])]
                                     for g in groups]
        if (layer.get("operator") != "ties" and "permutations" not in layer and any(len(g) > 1 for g in groups)
                and fold_rng.random() < 0.5):
            I = intermediate_size(view)
            folds = []
            for g in groups:
                if len(g) == 1:
                    folds.append(None)
                    continue
                ref = fold_rng.randrange(len(g))
                folds.append([None if i == ref else torch.randint(0, I, (I,), generator=fold_gen).tolist()
                              for i in range(len(g))])
            layer["folds"] = folds
        spec[str(l)] = layer
    plan = PruningPlan.from_json({"version": 1, "base_model": source, "layers": spec})
    plan.validate_for(skeleton)
    return plan


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generated_plans_stream_as_in_memory(tiny_dirs, tmp_path, family, seed):
    from moescope.analysis.model.vllm_plugin import SERVED_FAMILIES

    source = tiny_dirs[family]
    plan = generated_plan(source, seed + 100 * FAMILIES.index(family))
    only = family not in SERVED_FAMILIES
    assert_same_folder(in_memory(source, plan, tmp_path / "mem", only),
                       stream_export(source, tmp_path / "stream", plan, transformers_only=only))


def test_the_generator_covers_every_plan_shape(tiny_dirs):
    """The generated plans hold each shape the property test claims: groups out of sorted order,
    merges with and without merge_router, router coefficients, TIES, permutations, folds, a lone expert
    scaled, layers left with different expert counts."""
    seen = set()
    for family in FAMILIES:
        for seed in SEEDS:
            plan = generated_plan(tiny_dirs[family], seed + 100 * FAMILIES.index(family))
            counts = {lp.num_out for lp in plan.layers.values()}
            seen.add("nonuniform") if len(counts) > 1 else None
            for lp in plan.layers.values():
                merged = any(len(g) > 1 for g in lp.groups)
                if [g[0] for g in lp.groups] != sorted(g[0] for g in lp.groups):
                    seen.add("unordered")
                if merged:
                    seen.add("merge_router" if lp.merge_router else "no_merge_router")
                if merged and lp.router_coefficients is not None:
                    seen.add("router_coefficients")
                if merged and lp.operator == "ties":
                    seen.add("ties")
                if lp.permutations is not None:
                    seen.add("permutations")
                if lp.folded():
                    seen.add("folds")
                if lp.coefficients and any(len(g) == 1 and c[0] != 1.0 for g, c in zip(lp.groups, lp.coefficients)):
                    seen.add("scaled_single")
    assert seen == {"nonuniform", "unordered", "merge_router", "no_merge_router", "router_coefficients", "ties",
                    "permutations", "folds", "scaled_single"}


# ---- the three planted faults that went through, as named regressions ----------------------------
def _plan(source: str, layer: int, **spec) -> PruningPlan:
    plan = PruningPlan.from_json({"version": 1, "base_model": source, "layers": {str(layer): spec}})
    plan.validate_for(load_moe(source, weights=False))
    return plan


def test_router_coefficients_reach_the_streamed_router(tiny_dirs, tmp_path):
    """DeepSeek-V3 with a learned merge's router rows (group-and-merge eq. 6: experts λ·Σα·θ, router
    rows Σα·W): the streamed router weight and score-correction bias are Σα·row, not the experts'
    coefficients, and equal the in-memory export's."""
    source = tiny_dirs["deepseek_v3"]
    skeleton = load_moe(source, weights=False)
    layer = skeleton.moe_layers[0]
    n = skeleton.layers[layer].num_experts
    n_group = skeleton.layers[layer].router_params.n_group
    per = n // n_group
    groups, coeffs, rows = [], [], []
    for r in range(n_group):  # merge the first two of each routing group, keep the rest
        b = r * per
        groups += [[b, b + 1]] + [[e] for e in range(b + 2, b + per)]
        coeffs += [[0.9, 0.3]] + [[1.0]] * (per - 2)
        rows += [[0.25, 0.75]] + [[1.0]] * (per - 2)
    plan = _plan(source, layer, groups=groups, coefficients=coeffs, router_coefficients=rows)
    out = tensors(stream_export(source, tmp_path / "s", plan))
    src = tensors(Path(source))
    pre = f"model.layers.{layer}.mlp"
    for name in (f"{pre}.gate.weight", f"{pre}.gate.e_score_correction_bias"):
        want = 0.25 * src[name][0] + 0.75 * src[name][1]
        torch.testing.assert_close(out[name][0], want, rtol=0, atol=1e-6)
        assert not torch.allclose(out[name][0], 0.9 * src[name][0] + 0.3 * src[name][1])
    assert_same_folder(in_memory(source, plan, tmp_path / "mem"), tmp_path / "s")


def test_kept_experts_are_numbered_in_plan_order(tiny_dirs, tmp_path):
    """Groups ``[[3], [1], [2], [0], …]``: output expert 0 is source expert 3 and output 3 is
    source 0 (a streamed copy numbered in sorted order would swap them), router rows likewise."""
    source = tiny_dirs["mixtral"]
    layer = load_moe(source, weights=False).moe_layers[0]
    n = load_moe(source, weights=False).layers[layer].num_experts
    order = [3, 1, 2, 0, *range(4, n)]
    plan = _plan(source, layer, groups=[[e] for e in order])
    out = tensors(stream_export(source, tmp_path / "s", plan))
    src = tensors(Path(source))
    pre = f"model.layers.{layer}.block_sparse_moe"
    for j, e in enumerate(order):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(out[f"{pre}.experts.{j}.{w}.weight"], src[f"{pre}.experts.{e}.{w}.weight"]), (j, w)
    assert torch.equal(out[f"{pre}.gate.weight"], src[f"{pre}.gate.weight"][order])
    assert not torch.equal(out[f"{pre}.experts.0.w1.weight"], src[f"{pre}.experts.0.w1.weight"])
    assert_same_folder(in_memory(source, plan, tmp_path / "mem"), tmp_path / "s")


def test_merge_router_false_keeps_the_largest_members_row(tiny_dirs, tmp_path):
    """``merge_router: false``: a merged group's router row is its largest-coefficient member's row
    (here the second member, 0.7 > 0.3), not the weighted sum, and equals the in-memory export's."""
    source = tiny_dirs["qwen3_moe"]
    layer = load_moe(source, weights=False).moe_layers[0]
    n = load_moe(source, weights=False).layers[layer].num_experts
    plan = _plan(source, layer, groups=[[0, 1], *([e] for e in range(2, n))],
                 coefficients=[[0.3, 0.7], *([1.0] for _ in range(2, n))], merge_router=False)
    out = tensors(stream_export(source, tmp_path / "s", plan))
    src = tensors(Path(source))
    gate = f"model.layers.{layer}.mlp.gate.weight"
    assert torch.equal(out[gate][0], src[gate][1])
    assert torch.equal(out[gate][1:], src[gate][2:])
    assert_same_folder(in_memory(source, plan, tmp_path / "mem"), tmp_path / "s")
