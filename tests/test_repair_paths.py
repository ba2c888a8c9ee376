"""Every fallback and repair branch of the strategies and of merging is reached by an input made
to reach it, and each test first asserts that its input does reach the branch (so a library
update that stops reaching it fails here instead of leaving the branch untested)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from moescope.analysis.model.merging import _split_group, group_experts, ties_merge
from moescope.analysis.strategies.selection import keep_counts


def near_uniform(n: int, spread: float, seed: int = 0) -> torch.Tensor:
    """A symmetric affinity with ones on the diagonal and every other entry in [1 − spread, 1]."""
    A = 1 - spread * torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    A = (A + A.T) / 2
    A.fill_diagonal_(1.0)
    return A


def sklearn_clusters(A: torch.Tensor, r: int, seed: int = 0) -> list[list[int]]:
    from sklearn.cluster import SpectralClustering

    labels = SpectralClustering(n_clusters=r, affinity="precomputed", random_state=seed,
                                assign_labels="discretize").fit_predict(A.numpy())
    return [sorted(np.flatnonzero(labels == k).tolist()) for k in np.unique(labels)]


def test_spectral_grouping_splits_until_the_asked_count_when_clusters_come_back_empty():
    A = near_uniform(128, 1e-3)  # a layer of 128 barely distinct experts
    clusters = sklearn_clusters(A, 64)
    assert len(clusters) < 64, "this input no longer makes scikit-learn leave clusters empty: find another"
    groups = group_experts(A, 64, "spectral_discretize")  # the discretize labels leave clusters empty here
    assert len(groups) == 64
    assert sorted(e for g in groups for e in g) == list(range(128))  # a partition of every expert
    assert groups == sorted(groups) and all(g == sorted(g) for g in groups)
    # the repair only splits: every group lies inside one of scikit-learn's clusters, and each of the
    # missing clusters came from peeling one expert off a cluster (one more group per split)
    owner = {e: i for i, c in enumerate(clusters) for e in c}
    assert all(len({owner[e] for e in g}) == 1 for g in groups)
    untouched = [g for g in groups if g in clusters]
    assert len(untouched) >= len(clusters) - (64 - len(clusters))


def test_a_split_peels_off_the_member_least_alike_to_the_others():
    A = torch.full((5, 5), 0.9, dtype=torch.float64)
    A.fill_diagonal_(1.0)
    A[3, :] = A[:, 3] = 0.2  # expert 3 is unlike the others
    A[3, 3] = 1.0
    assert _split_group(A, [0, 1, 3, 4]) == [[3], [0, 1, 4]]
    # equal affinities everywhere: the higher index leaves
    assert _split_group(torch.ones(5, 5, dtype=torch.float64), [0, 2, 4]) == [[4], [0, 2]]
    assert _split_group(A, [1, 3]) == [[1], [3]]  # a pair becomes two singles


def test_ties_with_coefficients_summing_to_zero_weights_members_equally():
    """Σc = 0 (e.g. every member had zero usage): the weights fall back to 1/m instead of a division by
    zero, and the merge is Σc · (…) = 0."""
    P = torch.tensor([[1.0, -2.0, 3.0], [3.0, 2.0, -1.0]])
    out = ties_merge(P, [0.0, 0.0], density=1.0)
    assert torch.equal(out, torch.zeros(3)) and not out.isnan().any()
    # the same members with coefficients 1, 1: the disjoint mean around the uniform mean (2, 0, 1)
    torch.testing.assert_close(ties_merge(P, [1.0, 1.0], density=1.0), torch.tensor([4.0, 0.0, 2.0]))


def layer(top_k: int, experts: int, group_limited: bool = False):
    return SimpleNamespace(top_k=top_k, num_experts=experts, spec=SimpleNamespace(group_limited=group_limited))


def test_a_budget_without_scores_is_split_in_proportion_to_each_layers_spare_experts():
    """No scores to rank by (e.g. the random strategy): each layer keeps its top-k, and the experts
    beyond Σ top-k go in proportion to each layer's spare experts (E − top-k), rounded down, the
    remainder one each to the layers with most spare."""
    model = SimpleNamespace(layers={0: layer(2, 2), 1: layer(2, 8), 2: layer(1, 5)})
    # Σ top-k = 5; 7 more over spare (0, 6, 4): ⌊7·6/10⌋ = 4, ⌊7·4/10⌋ = 2, one left → layer 1
    assert keep_counts(model, {"budget": 12}) == {0: 2, 1: 7, 2: 3}
    assert keep_counts(model, {"budget": 5}) == {0: 2, 1: 2, 2: 1}
    assert keep_counts(model, {"budget": 15}) == {0: 2, 1: 8, 2: 5}
    for budget in range(5, 16):
        counts = keep_counts(model, {"budget": budget})
        assert sum(counts.values()) == budget and all(
            model.layers[l].top_k <= c <= model.layers[l].num_experts for l, c in counts.items())


def test_the_drop_grid_on_all_calibration_windows_is_the_calibration_batch_itself():
    from moescope.analysis.data import TokenBatch
    from moescope.analysis.strategies.grid import first_rows

    batch = TokenBatch(input_ids=torch.arange(12).reshape(3, 4), domains=("a", "b", "c"), source="s",
                       fingerprint="fp")
    assert first_rows(batch, 3) is batch and first_rows(batch, 16) is batch  # same windows, same key
    two = first_rows(batch, 2)
    assert two.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and two.domains == ("a", "b")
    assert two.fingerprint not in ("fp", first_rows(batch, 1).fingerprint)


def test_activation_matching_on_more_tokens_than_allowed_uses_evenly_strided_ones():
    """More calibration tokens than ``max_tokens``: every ⌈T / max_tokens⌉-th token is used, so the
    permutations equal those computed on exactly those tokens without a limit."""
    from conftest import fresh_tiny
    from moescope.analysis.model.alignment import align_group

    model = fresh_tiny("mixtral")
    view = model.layers[0]
    x = torch.randn(2, 20, view.hidden_size if hasattr(view, "hidden_size") else model.hf.config.hidden_size,
                    generator=torch.Generator().manual_seed(1))
    limited = align_group(view, [0, 3, 5], [0.5, 0.3, 0.2], "activations", x, max_tokens=8)
    step = math.ceil(40 / 8)
    assert step == 5
    strided = align_group(view, [0, 3, 5], [0.5, 0.3, 0.2], "activations", x.reshape(40, -1)[::step])
    assert limited == strided and limited[0] is None and all(isinstance(p, list) for p in limited[1:])
    full = align_group(view, [0, 3, 5], [0.5, 0.3, 0.2], "activations", x)
    assert full[0] is None  # the reference (largest coefficient) is never permuted
    with pytest.raises(Exception, match="needs calibration tokens"):
        align_group(view, [0, 3], [0.5, 0.5], "activations", None)


def test_a_strategy_that_reads_data_refuses_a_context_without_it(tmp_path):
    """merge with weights only still reads routing statistics: without calibration tokens it is one
    MoescopeError (it was an AttributeError from deep inside the analysis)."""
    from conftest import fresh_tiny
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.strategies import StrategyContext, make_plan

    ctx = StrategyContext(fresh_tiny("mixtral"), None, Cache(tmp_path))
    for name, params in [("merge", {"keep": 4, "representation": "weights", "similarity": "cosine"}),
                         ("frequency", {"keep": 4})]:
        with pytest.raises(MoescopeError, match=f"strategy {name} needs calibration tokens"):
            make_plan(name, ctx, params)
    assert make_plan("random", ctx, {"keep": 4}).experts_after(ctx.model) == {0: 4, 1: 4}


def test_a_budget_over_a_model_with_a_dense_layer_between_moe_layers(tmp_path):
    """Enumeration's budget allocation passes over a layer without experts (Qwen2-MoE's tiny model
    has a dense MLP in layer 1): the budget is shared by the MoE layers alone, each keeping the
    best subset enumeration finds at its count."""
    from conftest import fresh_tiny
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import TokenBatch
    from moescope.analysis.measure.sensitivity import enumerate_layer
    from moescope.analysis.strategies import StrategyContext, make_plan

    model = fresh_tiny("qwen2_moe")
    assert model.moe_layers == [0, 2] and model.num_hidden_layers == 3  # layer 1 is dense
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = TokenBatch(input_ids=ids, domains=("s",) * 4, source="synthetic", fingerprint="synthetic-dense")
    plan = make_plan("enumerate", StrategyContext(model, batch, Cache(tmp_path)), {"budget": 11})
    counts = plan.experts_after(model)
    assert set(counts) == {0, 2} and sum(counts.values()) == 11
    from moescope.analysis.measure.capture import LayerStream

    inputs = {l: x for l, x in LayerStream(model, ids).layers() if x is not None}
    assert set(inputs) == {0, 2}
    for l, c in counts.items():
        assert plan.layers[l].kept() == enumerate_layer(model.layers[l], inputs[l], keep=c).keep
