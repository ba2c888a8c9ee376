"""Presets as their authors ran them, and plans that keep experts no calibration token reached.

Each test takes its expected answer from the authors' code path or from a case worked out by hand in
its docstring: MC-SMoE's global group allocation (``msmoe-merging-mixtral.py`` →
``grouping_mixtral.py: _assign_num_groups_per_layer``), the enumeration authors' per-batch objective
(``Expert_Sparsity/model/wrapper.py``), and the unused-expert flag (MC-Suite's pair rule never picks an
unrouted expert, so Max-ECC can keep one).
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.measure.sensitivity import SubsetScorer, naive_subset_loss
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import (
    UNUSED_KEY,
    PruningPlan,
    unused_kept,
    unused_kept_note,
    unused_kept_short,
)
from moescope.analysis.run.export import model_card
from moescope.analysis.strategies import StrategyContext, make_plan
from moescope.analysis.strategies.selection import usage_threshold_counts
from test_strategy_values import CLASSES, IDS, class_logits, controlled, ctx_for, kept

# ---------------------------------------------------------------- experts without calibration tokens


def test_unused_kept_names_dead_experts_kept_alone_while_used_ones_go():
    """Layer 0: expert 1 got no token and is kept alone, 0 and 4 (used) are dropped, 2 and 5 merged:
    flagged. Layer 3: expert 6 (unused) is dropped: nothing to say. Layer 5: an unused expert kept,
    but no used expert removed (keep-all): nothing to say either."""
    plan = PruningPlan.from_json({"version": 1, "base_model": "m", "layers": {
        "0": {"groups": [[1], [2, 5], [3], [6], [7]]},
        "3": {"groups": [[0], [1], [2], [3], [4], [5], [7]]},
        "5": {"groups": [[e] for e in range(8)]}}})
    counts = {0: [3, 0, 5, 1, 2, 9, 4, 4], 3: [1, 1, 1, 1, 1, 1, 0, 1], 5: [0, 1, 1, 1, 1, 1, 1, 1]}
    assert unused_kept(plan, counts) == {"0": {"kept": [1], "removed": [0, 2, 4, 5]}}
    plan.provenance[UNUSED_KEY] = unused_kept(plan, counts)
    assert unused_kept_note(plan) == ("keeps 1 expert that no calibration token reached (layer 0: 1) while it drops "
                                      "or merges experts that tokens were routed to (layer 0: 0, 2, 4, 5)")
    assert unused_kept_short(plan) == "1 (L0: 1)"
    plan.provenance[UNUSED_KEY] = {}
    assert unused_kept_note(plan) is None and unused_kept_short(plan) == "none"
    del plan.provenance[UNUSED_KEY]
    assert unused_kept_short(plan) == "— (not checked)"


def test_max_ecc_keeps_the_unrouted_expert_and_the_plan_says_so(tmp_path):
    """The table model of tests/test_strategy_values.py routes no token to expert 1 (usage 0:21, 1:0,
    2:31, 3:10, 4:18, 5:15, 6:8, 7:25). One-shot Max-ECC at keep 5 keeps [1, 2, 3, 6, 7] (eq. 8's pair
    rule, worked out in test_paper_fidelity_mcsuite.py): expert 1 stays, used 0, 4, 5 go. Min-EUF
    drops expert 1 first and keeps no dead expert."""
    ctx = ctx_for(controlled([class_logits(r, g) for _, r, g in CLASSES]), IDS, tmp_path)
    plan = make_plan("criterion", ctx, {"keep": 5, "criterion": "ECC", "order": "max"})
    assert kept(plan) == [1, 2, 3, 6, 7]
    assert plan.provenance[UNUSED_KEY] == {"0": {"kept": [1], "removed": [0, 4, 5]}}
    assert "layer 0: 1)" in unused_kept_note(plan)
    euf = make_plan("criterion", ctx, {"keep": 5, "criterion": "EUF", "order": "min"})
    assert 1 not in kept(euf) and euf.provenance[UNUSED_KEY] == {}
    # the flag survives the plan's JSON round trip (what the Plan page, the cost table and the card read)
    again = PruningPlan.from_json(json.loads(plan.dumps()))
    assert unused_kept_short(again) == "1 (L0: 1)"
    card = model_card(ctx.model, again)
    assert ("**Warning:** the plan keeps 1 expert that no calibration token reached (layer 0: 1) while it drops or "
            "merges experts that tokens were routed to (layer 0: 0, 4, 5)") in card
    assert "Warning" not in model_card(ctx.model, euf)


# ---------------------------------------------------------------- MC-SMoE's global group allocation


def _layers(top_k: int, n: int = 2):
    return SimpleNamespace(layers={l: SimpleNamespace(top_k=top_k, num_experts=4) for l in range(n)})


def test_usage_threshold_allocation_follows_the_authors_rule_on_a_hand_made_table():
    """grouping_mixtral.py ``_assign_num_groups_per_layer``: per layer usage / Σ usage, the most-used set
    to 1; all values sorted descending; threshold = sorted[total]; a layer gets its experts strictly
    above it. Layer 0 counts (50, 30, 15, 5) → (1, .3, .15, .05); layer 1 (10, 10, 40, 40) → (.1, .1, 1, .4)
    (argmax: the first of the two 40s). Sorted: 1, 1, .4, .3, .15, .1, .1, .05.
    total 4 → threshold .15 → 2 + 2; total 5 → .1 → 3 + 2; total 6 → .1 again (the two .1s tie) → 3 + 2,
    one short of 6; total 2 → .4 → 1 + 1; all 8 → position 7 (.05) → 3 + 4; total 1 → threshold 1:
    refused (fewer groups than layers). With top-k 2, total 3 (threshold .3 → 1 + 2) leaves layer 0 below
    top-k: refused."""
    counts = {0: torch.tensor([50.0, 30, 15, 5]), 1: torch.tensor([10.0, 10, 40, 40])}
    alloc = {total: usage_threshold_counts(_layers(1), counts, total) for total in (2, 4, 5, 6, 8)}
    assert alloc == {2: {0: 1, 1: 1}, 4: {0: 2, 1: 2}, 5: {0: 3, 1: 2}, 6: {0: 3, 1: 2}, 8: {0: 3, 1: 4}}
    with pytest.raises(MoescopeError, match=r"^usage-threshold allocation: 1 groups cannot give each of the 2 MoE "
                                            r"layers one .*; ask for more$"):
        usage_threshold_counts(_layers(1), counts, 1)
    with pytest.raises(MoescopeError, match=r"^usage-threshold allocation leaves layer 0 1 group\(s\), fewer than "
                                            r"its top-k \(2\)"):
        usage_threshold_counts(_layers(2), counts, 3)


def test_mc_smoe_preset_is_the_mixtral_script_unaligned_with_global_allocation(capsys, tmp_path, monkeypatch):
    """The `mc-smoe` preset on `demo` with 64×256 calibration tokens: the usage threshold spreads
    keep 4 × 4 layers = 16 groups as 6/3/3/4 and keep 6 as 8/5/6/5 (measured from outside with the
    authors' rule on the same tokens); no member is permuted (the script merges raw weights)."""
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    got = {}
    for keep in (4, 6):
        out = tmp_path / f"mc{keep}.json"
        assert main(["plan", "demo", "--preset", "mc-smoe", "--keep", str(keep), "--samples", "64", "--seq-len", "256",
                     "-o", str(out)]) == 0
        plan = PruningPlan.load(out)
        got[keep] = [plan.layers[l].num_out if l in plan.layers else 8 for l in range(4)]
        assert plan.provenance["groups_per_layer"] == {str(l): c for l, c in enumerate(got[keep])}
        assert all(lp.permutations is None for lp in plan.layers.values())
    assert got == {4: [6, 3, 3, 4], 6: [8, 5, 6, 5]}
    assert capsys.readouterr().err == ""  # a target was given: no headline note; the demo's context fits 256


@pytest.fixture
def weights_refused(monkeypatch):
    """Loading any weights fails with a line of its own: what the CLI prints before it came first."""
    import moescope.analysis.model as model_pkg

    real = model_pkg.load_moe

    def load(*args, weights: bool = True, **kw):
        if weights:
            raise MoescopeError("<the weights would load here>")
        return real(*args, weights=weights, **kw)

    monkeypatch.setattr(model_pkg, "load_moe", load)


def test_cli_mc_smoe_target_below_every_layers_top_k_is_refused_before_any_weights(capsys, tmp_path, monkeypatch,
                                                                                   weights_refused):
    """``--preset mc-smoe --budget 7`` (fewer groups than the 4 layers' top-2 summed) and ``--keep 1``
    cannot give every layer its top-k whatever the usage: refused from the config, in one line,
    exit 2, the weights never read (the fixture makes loading them fail)."""
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x.json"
    for flag, value, line in (
            ("--budget", "7", "preset mc-smoe: budget=7 is not possible: it must be between 8 (top-k in every layer) "
                              "and 32"),
            ("--keep", "1", "preset mc-smoe: keep=1 is not possible in layer 0: it must be between top-k (2) and the "
                            "layer's 8 experts")):
        assert main(["plan", "demo", "--preset", "mc-smoe", flag, value, "-o", str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"moescope: error: {line}"]
    assert not out.exists()


def test_cli_mc_smoe_threshold_below_top_k_is_refused_after_routing_before_any_merge(capsys, tmp_path, monkeypatch):
    """``--preset mc-smoe --keep 2``: 8 groups for 4 top-2 layers could work only if the usage gave
    every layer exactly 2; on these 4×64 demo tokens the threshold leaves layer 0 one group. That is
    known only from the routing pass: refused then, one line, exit 2, no plan written (and no merge:
    the refusal comes before merge_plan is reached)."""
    import moescope.analysis.strategies.merge as merge_mod
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))

    def no_merge(*a, **k):
        raise AssertionError("a merge was started")

    monkeypatch.setattr(merge_mod, "merge_plan", no_merge)
    out = tmp_path / "mc.json"
    assert main(["plan", "demo", "--preset", "mc-smoe", "--keep", "2", "--samples", "4", "--seq-len", "64",
                 "-o", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "moescope: error: usage-threshold allocation leaves layer 0 1 group(s), fewer than its top-k (2), on this "
        "calibration data's usage; ask for more groups (a larger keep or budget)"]
    assert not out.exists()


# ---------------------------------------------------------------- the enumeration authors' objective


def test_per_batch_objective_is_the_authors_sum_of_batch_norms_and_can_pick_another_subset(tmp_path):
    """Lu et al. eq. 3 minimises one Frobenius norm over all calibration tokens; the authors'
    ``model/wrapper.py`` ``enumerate`` sums, over the cached forward batches, each batch's norm. On a
    tiny Mixtral (seed 1, 4 sequences of 24 tokens, one sequence per batch) layer 0 at keep 4 the two
    objectives, each computed naively by running the pruned block, pick different subsets:
    eq. 3 keeps [1, 4, 5, 7], the per-batch sum [2, 4, 5, 7]; the strategy follows each."""
    model = wrap_model(tiny_model("mixtral", seed=1), source="tiny-seed1")
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    x = next(x for l, x in LayerStream(model, ids).layers() if l == 0)
    subsets = list(itertools.combinations(range(8), 4))
    eq3 = {C: naive_subset_loss(model, 0, x, list(C)) for C in subsets}
    per_batch = {C: sum(naive_subset_loss(model, 0, x[b * 24:(b + 1) * 24], list(C)) for b in range(4)) for C in subsets}
    assert min(eq3, key=eq3.get) == (1, 4, 5, 7) and min(per_batch, key=per_batch.get) == (2, 4, 5, 7)
    fast = SubsetScorer(model.layers[0], x, chunk_tokens=37, batch_tokens=24).losses(subsets)  # chunks cross batches
    for s in (0, 17, 42, 69):
        assert fast[s].item() == pytest.approx(per_batch[subsets[s]], rel=1e-4)

    batch = TokenBatch(input_ids=ids, domains=("s",) * 4, source="s", fingerprint="seed1-ids")
    ctx = StrategyContext(model, batch, Cache(tmp_path / "cache"))
    assert make_plan("enumerate", ctx, {"keep": 4}).layers[0].kept() == [1, 4, 5, 7]
    plan = make_plan("enumerate", ctx, {"keep": 4, "objective": "per-batch", "objective_batch": 1})
    assert plan.layers[0].kept() == [2, 4, 5, 7]


def test_with_skip_calibrates_beta_on_the_pruned_model_as_the_authors_pipeline_does(tmp_path):
    """The authors' ``method/dynamic_skipping.py`` sets β per layer to ``np.median`` of w₂/w₁ over the
    tokens of the model it is run on, and writes it into that model's config: combined with pruning,
    that is the pruned model. So β here is the median over the calibration tokens of the pruned
    model's own routing (about half its tokens skip), computed below by running the pruned copy; the
    original router's median (what moescope took before) differs; the shared model is left as it was."""
    import copy

    import numpy as np
    from moescope.analysis.pruning.prune import apply

    model = wrap_model(tiny_model("mixtral", seed=1), source="tiny-seed1")
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    before = model.fingerprint()
    ctx = StrategyContext(model, TokenBatch(input_ids=ids, domains=("s",) * 4, source="s", fingerprint="seed1-ids"),
                          Cache(tmp_path / "cache"))
    plan = make_plan("enumerate", ctx, {"keep": 4, "with_skip": True})
    assert model.fingerprint() == before

    def medians(m):
        out = {}
        for l, x in LayerStream(m, ids).layers():
            if x is not None:
                w = m.layers[l].route(x).topk_weights.double().sort(-1, descending=True).values
                out[l] = float(np.median((w[:, 1] / w[:, 0]).detach().numpy()))
        return out

    pruned = apply(copy.deepcopy(model), PruningPlan.from_json({**plan.to_json(), "skip_beta": {}}))
    want = medians(pruned)
    assert plan.skip_beta == pytest.approx(want, abs=1e-6)
    original = medians(model)
    assert any(abs(original[l] - want[l]) > 1e-3 for l in want)


# ---------------------------------------------------------------- each paper's calibration length and target


def test_a_preset_without_a_target_takes_its_papers_headline_and_length_capped_at_the_context(capsys, tmp_path,
                                                                                              monkeypatch):
    """`moescope plan demo --preset min-euf -o x.json`: MC-Suite's 2048-token sequences (App. C) do not fit
    the demo's 512 positions, so 512 with a note; no --keep or --budget, so the paper's 50 % (Tables 4
    and 7): 4 of 8 per layer, with a note. Both notes come before any weights load, one line each."""
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x.json"
    assert main(["plan", "demo", "--preset", "min-euf", "--samples", "4", "-o", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "note: preset min-euf: the paper's 2048-token calibration sequences exceed the model's 512 positions; "
        "using 512",
        "note: preset min-euf: no target given, so the paper's headline: keep 4 of 8 experts per layer (Tables 4 "
        "and 7: 50 % expert sparsity (4 of 8 per layer))"]
    plan = PruningPlan.load(out)
    assert {l: lp.num_out for l, lp in plan.layers.items()} == {0: 4, 1: 4, 2: 4, 3: 4}
    assert "4×512 tokens" in plan.provenance["data_description"]
    # a length given wins, silently; a preset whose paper states none keeps moescope's 256
    assert main(["plan", "demo", "--preset", "min-euf", "--samples", "2", "--seq-len", "64", "--keep", "6",
                 "-o", str(out)]) == 0
    assert capsys.readouterr().err == "" and "2×64 tokens" in PruningPlan.load(out).provenance["data_description"]
    assert main(["plan", "demo", "--preset", "gam-model", "-o", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "note: preset gam-model: no target given, so the paper's headline: keep 6 of 8 experts per layer (§4.2: "
        "Mixtral's 8 experts pruned to 6 and to 4 per layer (6 first))"]


def test_every_preset_states_its_calibration_and_target_in_the_listing(capsys):
    from moescope.analysis.run.cli import main
    from moescope.analysis.strategies.presets import PRESETS

    assert main(["strategies", "--json"]) == 0
    listed = {p["name"]: p for s in json.loads(capsys.readouterr().out) for p in s["presets"]}
    assert set(listed) == set(PRESETS)
    assert all(p["keep_fraction"] for p in listed.values())  # every preset plans without a target given
    assert {n: (p["calib_samples"], p["calib_seq_len"]) for n, p in listed.items()
            if n in ("enumerate", "hc-smoe", "min-ean", "mc-smoe")} == {
        "enumerate": (128, 2048), "hc-smoe": (32, 2048), "min-ean": (256, 2048), "mc-smoe": (None, 512)}
    assert main(["strategies"]) == 0
    assert ("preset hc-smoe: --representation mean_output --similarity euclidean --grouping agglomerative --merge "
            "fix-dom-same --merge-router --align none --augment none --samples 32 --seq-len 2048") in capsys.readouterr().out


# ---------------------------------------------------------------- MC-SMoE's activation matching tokens


def test_routed_activation_matching_uses_the_tokens_routed_to_the_member_or_the_reference():
    """MC-SMoE ``permutation.py`` (``compute_switch_permutation_by_activation_matching``): the hidden
    states "gathered from tokens routed to both reference_mlp and target_mlp" — the reference's routed
    tokens followed by the member's — then the Pearson correlation of the intermediate activations and
    a linear assignment. Here the routed rows are picked by hand from the top-2 of the router's
    logits, and the permutation found on them is the one ``routed-activations`` gives; on a tiny
    Mixtral it differs from matching on all tokens for at least one member."""
    from moescope.analysis.model.alignment import activation_matching, align_group

    model = wrap_model(tiny_model("mixtral", seed=1), source="tiny-seed1")
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    x = next(x for l, x in LayerStream(model, ids).layers() if l == 0)
    view = model.layers[0]
    top2 = torch.topk(view.router_logits(x), 2, dim=-1).indices
    group, coeffs = [2, 4, 5, 7], [0.4, 0.3, 0.2, 0.1]  # reference: expert 2, the largest coefficient
    got = align_group(view, group, coeffs, "routed-activations", x)
    shared = align_group(view, group, coeffs, "activations", x)
    assert got[0] is None
    for e, perm in zip(group[1:], got[1:]):
        rows = torch.cat([x[(top2 == 2).any(-1)], x[(top2 == e).any(-1)]])
        assert perm == activation_matching(view, 2, e, rows).tolist()
    assert got != shared
