"""HC-SMoE's ``fix-dom-same`` merge and the plan's neuron folds (issue #35), each answer worked out by
hand in its docstring or computed from the authors' own formulation:

- ``hcsmoe/merging/grouping_mixtral.py`` ``_merge_moe_experts_with_dominant_same_rule`` (as
  ``scripts/mixtral/run.sh`` runs it: ``--mode all --ingredient act+weight``): each member neuron goes
  to the dominant neuron of largest ``corr(activations) + corr(weights)``; the merge is the matrix
  ``P [I, I·m]`` (``P[i, i] = c_dom``, ``P[i, I·j + k] = c_j`` where member j's neuron k goes to i,
  rows normalised to sum 1) applied to the stacked gate, up and down weights alike;
- ``merge_by_groups_within_and_across_models`` (the group's data: each member's routed tokens scaled
  by the softmax router probability; ``input_weight``: routed-token counts over the group's total);
- ``hcsmoe/merging/clustering.py`` ``hierarchical_clustering`` (the dominant: the member nearest the
  cluster's centre);

and a saved folded model reloads with the same logits (the fold's own contract is
tests/test_folds.py's). Through the CLI: the preset's notes come before any weights load, and the
two presets plan the same groups, folded and not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.measure.capture import LayerStream
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.folding import centroid_member, fix_dom_same
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.strategies import StrategyContext, make_plan
from moescope.analysis.strategies.presets import make_preset_plan

FAST = AnalysisParams(similarity_tokens=128, rbf_batch_tokens=48, rbf_batches=1, chunk_size=4)
IDS = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))
BATCH = TokenBatch(input_ids=IDS, domains=("s",) * 8, source="synthetic", fingerprint="synthetic-fold")


def mixtral(seed: int = 0, **overrides):
    return wrap_model(tiny_model("mixtral", seed=seed, **overrides), source=f"tiny-mixtral-{seed}")


def layer_input(model, layer: int = 0) -> torch.Tensor:
    return next(x for l, x in LayerStream(model, IDS).layers() if l == layer)


def plan_of(layer: dict, base: str = "tiny") -> PruningPlan:
    return PruningPlan.from_json({"version": 1, "base_model": base, "layers": {"0": layer}})


def keep_rest(groups: list[list[int]], n: int = 8) -> list[list[int]]:
    used = {e for g in groups for e in g}
    return groups + [[e] for e in range(n) if e not in used]


def test_fix_dom_same_sends_each_copied_neuron_to_the_dominant_neuron_it_copies():
    """Expert 5's neurons (layer 0, I = 8) made copies of expert 2's neurons 3, 3, 0, 5, 1, 1, 7, 2: each
    copy correlates perfectly with its original, in the activations and in the weights (2 is the
    most ``corr + corr`` can be), so fix-dom-same onto expert 2 sends expert 5's neurons to
    [3, 3, 0, 5, 1, 1, 7, 2]. The coefficients are the members' routed-token counts (their top-2 of the
    router's softmax, counted by hand) over the pair's total. Folding copies onto their originals
    changes nothing: the merged expert is expert 2."""
    model = mixtral(seed=1, intermediate_size=8)
    src = [3, 3, 0, 5, 1, 1, 7, 2]
    ex = model.layers[0].experts
    with torch.no_grad():
        for k, i in enumerate(src):
            ex.gate_up_proj[5, k] = ex.gate_up_proj[2, i]
            ex.gate_up_proj[5, 8 + k] = ex.gate_up_proj[2, 8 + i]
            ex.down_proj[5, :, k] = ex.down_proj[2, :, i]
    x = layer_input(model)
    view = model.layers[0]
    folds, coeffs = fix_dom_same(view, [2, 5], 0, x)
    assert folds == [None, src]
    top2 = torch.topk(torch.softmax(view.router_logits(x).float(), -1), 2, dim=-1).indices
    n2, n5 = int((top2 == 2).any(-1).sum()), int((top2 == 5).any(-1).sum())
    assert n2 > 0 and n5 > 0 and coeffs == [n2 / (n2 + n5), n5 / (n2 + n5)]
    merged = apply(copy.deepcopy(model), plan_of({"groups": keep_rest([[2, 5]]), "coefficients": [coeffs] + [[1.0]] * 6,
                                                  "folds": [folds] + [None] * 6}))
    torch.testing.assert_close(merged.layers[0].experts.gate_up_proj[0], ex.gate_up_proj[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.layers[0].experts.down_proj[0], ex.down_proj[2], atol=1e-6, rtol=0)


def _authors_fold(view, group: list[int], dom: int, x: torch.Tensor):
    """The fold and merged expert as the authors' code computes them, written out independently:
    group data, numpy's Pearson correlation, argmax over the dominant's neurons, the matrix P."""
    logits = x.double() @ view.router_weight.detach().double().T
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, view.top_k, dim=-1).indices
    rows, counts = [], []
    for e in group:
        tok = (top == e).any(-1)
        rows.append(x[tok].double() * probs[tok, e, None])
        counts.append(int(tok.sum()))
    X = torch.cat(rows)
    gu = view.experts.gate_up_proj.detach().double()
    dn = view.experts.down_proj.detach().double()
    I = dn.shape[2]

    def act(e):
        return torch.nn.functional.silu(X @ gu[e, :I].T) * (X @ gu[e, I:].T)

    def wfeat(e):  # [W1ᵀ; W2; W3ᵀ]: 3d entries per neuron (a column)
        return torch.cat([gu[e, :I].T, dn[e], gu[e, I:].T])

    def corr(a, b):
        c = np.corrcoef(a.numpy(), b.numpy(), rowvar=False)
        return torch.from_numpy(c[: a.shape[1], a.shape[1]:])

    d = group[dom]
    maps = {}
    for e in group:
        if e != d:
            maps[e] = torch.argmax(corr(act(d), act(e)) + corr(wfeat(d), wfeat(e)), dim=0).tolist()
    order = [d] + [e for e in group if e != d]
    c = {e: n / sum(counts) for e, n in zip(group, counts)}
    P = torch.zeros(I, I * len(order), dtype=torch.float64)
    P[torch.arange(I), torch.arange(I)] = c[d]
    for j, e in enumerate(order[1:], start=1):
        for k, i in enumerate(maps[e]):
            P[i, I * j + k] = c[e]
    P = P / P.sum(1, keepdim=True)
    W1 = torch.cat([gu[e, :I] for e in order])
    W3 = torch.cat([gu[e, I:] for e in order])
    W2 = torch.cat([dn[e] for e in order], dim=1)
    return maps, [c[e] for e in group], (P @ W1, P @ W3, (P @ W2.T).T)


@pytest.mark.parametrize("group,dom", [([1, 3, 6], 1), ([0, 2, 4, 7], 3)])
def test_fix_dom_same_and_its_merge_are_the_authors_matrix_form(group, dom):
    """On a random tiny Mixtral (I = 48), moescope's fold of ``group`` onto ``group[dom]`` and the
    expert the plan makes from it equal the authors' formulation computed independently above."""
    model = mixtral(seed=1)
    x = layer_input(model)
    view = model.layers[0]
    folds, coeffs = fix_dom_same(view, group, dom, x)
    maps, want_coeffs, (W1, W3, W2) = _authors_fold(view, group, dom, x)
    assert coeffs == pytest.approx(want_coeffs, abs=1e-12)
    assert folds == [None if e == group[dom] else maps[e] for e in group]
    assert any(len(set(f)) < len(f) for f in folds if f is not None)  # many-to-one indeed
    merged = apply(copy.deepcopy(model), plan_of({"groups": keep_rest([group]),
                                                  "coefficients": [coeffs] + [[1.0]] * (8 - len(group)),
                                                  "folds": [folds] + [None] * (8 - len(group))}))
    ex = merged.layers[0].experts
    I = W1.shape[0]
    for got, want in ((ex.gate_up_proj[0, :I], W1), (ex.gate_up_proj[0, I:], W3), (ex.down_proj[0], W2)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- a folded model saved and reloaded


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(IDS).logits


def test_a_saved_folded_model_reloads_with_identical_logits(tmp_path):
    """HC-SMoE's fold of two groups, applied, saved and loaded again: the same logits, bit for bit,
    and the saved plan keeps the folds."""
    from moescope.analysis.run.export import export

    model = mixtral(seed=1)
    layers = {}
    for l in (0, 1):
        x = layer_input(model, l)
        groups = [[0, 3, 5], [1, 6], [2], [4], [7]]
        coeffs, folds = [], []
        for g in groups:
            f, c = fix_dom_same(model.layers[l], g, len(g) - 1, x) if len(g) > 1 else (None, [1.0])
            folds.append(f)
            coeffs.append(c)
        layers[str(l)] = {"groups": groups, "coefficients": coeffs, "folds": folds}
    plan = PruningPlan.from_json({"version": 1, "base_model": model.source, "layers": layers})
    pruned = apply(copy.deepcopy(model), plan)
    out = export(pruned, tmp_path / "folded", plan=plan)
    again = load_moe(str(out), load_tokenizer=False)
    assert torch.equal(logits(again), logits(pruned))
    assert not torch.allclose(logits(pruned), logits(model))
    assert PruningPlan.load(out / "plan.json").layers[1].folds == plan.layers[1].folds
    assert "Folded groups (HC-SMoE's fix-dom-same)" in (out / "README.md").read_text()


# ---------------------------------------------------------------- the strategy and the presets


def test_hc_smoe_preset_folds_each_group_onto_the_member_nearest_its_centre(tmp_path):
    """``hc-smoe`` (keep 3 on a tiny Mixtral): groups by average linkage on the mean outputs (as
    ``hc-smoe-freq``); in each merged group the dominant — the member whose mean output is nearest
    the group's mean, computed here from the outputs themselves (``clustering.py``) — is kept in place
    (its fold null) and the others folded as ``fix_dom_same`` does onto it, with routed-token weights."""
    model = mixtral()
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    plan = make_preset_plan("hc-smoe", ctx, {"keep": 3})
    freq = make_preset_plan("hc-smoe-freq", ctx, {"keep": 3})
    assert plan.provenance["preset"] == "hc-smoe" and plan.provenance["params"]["merge"] == "fix-dom-same"
    assert all(not lp.folded() for lp in freq.layers.values())
    folded = 0
    for l, x in LayerStream(model, IDS).layers():
        if x is None:
            continue
        view, lp = model.layers[l], plan.layers[l]
        assert lp.groups == freq.layers[l].groups
        with torch.no_grad():
            means = torch.stack([view.expert_forward(e, x).double().mean(0) for e in range(view.num_experts)])
        for j, g in enumerate(lp.groups):
            if len(g) == 1:
                assert lp.folds[j] is None and lp.coefficients[j] == [1.0]
                continue
            centre = means[g].mean(0)
            dom = int(torch.argmin((means[g] - centre).norm(dim=1)))
            assert dom == centroid_member(torch.cdist(means, means), g)
            want_folds, want_coeffs = fix_dom_same(view, g, dom, x)
            assert lp.folds[j] == want_folds and lp.folds[j][dom] is None
            assert lp.coefficients[j] == pytest.approx(want_coeffs)
            folded += 1
    assert folded


def test_fix_dom_same_in_router_guided_folds_onto_the_leader_and_needs_align_none(tmp_path):
    """MC-SMoE's grouping with fix-dom-same: the dominant is each group's leader (its most-used
    member, first in the group); an alignment with it is refused in one line, before any work."""
    model = mixtral()
    ctx = StrategyContext(model, BATCH, Cache(tmp_path / "c"), FAST)
    plan = make_plan("router-guided", ctx, {"keep": 4, "merge": "fix-dom-same", "align": "none"})
    merged = [(lp, j) for lp in plan.layers.values() for j, g in enumerate(lp.groups) if len(g) > 1]
    assert merged and all(lp.folds[j][0] is None and all(f is not None for f in lp.folds[j][1:]) for lp, j in merged)
    with pytest.raises(MoescopeError, match=r"^merge=fix-dom-same folds each member's neurons onto the dominant expert "
                                            r"itself.*give align=none, not align=activations$"):
        make_plan("router-guided", ctx, {"keep": 4, "merge": "fix-dom-same"})


# ---------------------------------------------------------------- through the CLI


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


def test_cli_hc_smoe_notes_come_before_any_weights(capsys, tmp_path, monkeypatch, weights_refused):
    """``plan demo --preset hc-smoe``: the paper's length capped at the demo's 512 positions and the
    headline target are said before any weights load (the fixture makes loading them fail)."""
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "demo", "--preset", "hc-smoe", "-o", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "note: preset hc-smoe: the paper's 2048-token calibration sequences exceed the model's 512 positions; using 512",
        "note: preset hc-smoe: no target given, so the paper's headline: keep 4 of 8 experts per layer "
        "(scripts/mixtral/run.sh: num_average_groups=4 of Mixtral's 8)",
        "moescope: error: <the weights would load here>"]


def test_cli_plans_hc_smoe_with_folds_and_hc_smoe_freq_without(capsys, tmp_path, monkeypatch):
    from moescope.analysis.run.cli import main

    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    got = {}
    for preset in ("hc-smoe", "hc-smoe-freq"):
        out = tmp_path / f"{preset}.json"
        assert main(["plan", "demo", "--preset", preset, "--keep", "6", "--samples", "4", "--seq-len", "64",
                     "-o", str(out)]) == 0
        got[preset] = PruningPlan.load(out)
    capsys.readouterr()
    assert all(lp.folded() for lp in got["hc-smoe"].layers.values())
    assert not any(lp.folded() for lp in got["hc-smoe-freq"].layers.values())
    assert ({l: lp.groups for l, lp in got["hc-smoe"].layers.items()}
            == {l: lp.groups for l, lp in got["hc-smoe-freq"].layers.items()})
    assert main(["strategies"]) == 0
    text = capsys.readouterr().out
    assert "fix-dom-same" in text and "preset hc-smoe-freq: --representation mean_output" in text
