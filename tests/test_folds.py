"""The plan's neuron folds (issue #35: HC-SMoE's ``fix-dom-same`` needs a many-to-one map of each
group member's intermediate neurons onto the merged expert's; ``analysis/model/folding.py``), each
answer worked out by hand in its docstring: the fold's arithmetic, a fold that sends every neuron to
itself reproducing the unmerged expert (and a one-to-one fold the permutation it inverts), the JSON
contract (old plans unchanged, bad folds refused in one line), and the streamed export of a folded
group with biased, interleaved experts. The rule that chooses a fold is tests/test_fix_dom_same.py's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply

IDS = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def mixtral(seed: int = 0, **overrides):
    return wrap_model(tiny_model("mixtral", seed=seed, **overrides), source=f"tiny-mixtral-{seed}")


def plan_of(layer: dict, base: str = "tiny") -> PruningPlan:
    return PruningPlan.from_json({"version": 1, "base_model": base, "layers": {"0": layer}})


def keep_rest(groups: list[list[int]], n: int = 8) -> list[list[int]]:
    used = {e for g in groups for e in g}
    return groups + [[e] for e in range(n) if e not in used]


# ---------------------------------------------------------------- the fold's arithmetic by hand


def _labelled(model) -> None:
    """Experts 0 and 1 of layer 0 (I = 3) with one number per neuron: expert 0's neuron k has gate row
    (k+1)·e₀, up row (k+1)·e₁, down column (k+1)·e₂; expert 1's the same with 10+k."""
    ex = model.layers[0].experts
    with torch.no_grad():
        for e, base in ((0, 1.0), (1, 10.0)):
            ex.gate_up_proj[e].zero_()
            ex.down_proj[e].zero_()
            for k in range(3):
                ex.gate_up_proj[e, k, 0] = base + k
                ex.gate_up_proj[e, 3 + k, 1] = base + k
                ex.down_proj[e, 2, k] = base + k


def test_a_fold_averages_each_neuron_with_the_member_neurons_sent_to_it_by_hand():
    """Group [0, 1], coefficients .75 / .25, expert 1's neurons sent to [0, 0, 2] (expert 0 in place):
    merged neuron 0 = (.75·1 + .25·10 + .25·11) / (.75 + .25 + .25) = 6 / 1.25 = 4.8; neuron 1 is
    expert 0's alone, 2; neuron 2 = (.75·3 + .25·12) / 1 = 5.25 — in the gate row, the up row and the
    down column alike. The router row is .75·R₀ + .25·R₁. With coefficients 0 / 1 neuron 1 gets no
    weight at all and stays expert 0's (the plain mean of what reaches it); neuron 0 = (10 + 11) / 2."""
    model = mixtral(intermediate_size=3)
    _labelled(model)
    router = model.layers[0].router_weight.detach().clone()
    for coeffs, want in (([0.75, 0.25], [4.8, 2.0, 5.25]), ([0.0, 1.0], [10.5, 2.0, 12.0])):
        m = apply(copy.deepcopy(model), plan_of({"groups": keep_rest([[0, 1]]),
                                                 "coefficients": [coeffs] + [[1.0]] * 6,
                                                 "folds": [[None, [0, 0, 2]]] + [None] * 6}))
        ex = m.layers[0].experts
        got = {"gate": ex.gate_up_proj[0, :3, 0], "up": ex.gate_up_proj[0, 3:, 1], "down": ex.down_proj[0, 2, :]}
        for part, t in got.items():
            assert t.tolist() == pytest.approx(want, abs=1e-6), (coeffs, part)
        rows = ex.gate_up_proj.detach()[0, :3]
        assert float(rows.abs().sum() - rows[:, 0].abs().sum()) == 0  # nothing else in the gate rows
        torch.testing.assert_close(m.layers[0].router_weight[0], coeffs[0] * router[0] + coeffs[1] * router[1])
        torch.testing.assert_close(ex.gate_up_proj[1:], model.layers[0].experts.gate_up_proj[2:])  # kept as they were


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(IDS).logits


def test_a_fold_sending_every_neuron_to_itself_is_the_unmerged_expert():
    """Every expert kept, each with an explicit fold onto itself (weight 1): the layer, and the
    model's logits, are exactly the original's. A pair folded in place is the plain weighted average
    (coefficients over their sum), and a one-to-one fold is the permutation it inverts: both as the
    linear / aligned merges compute them."""
    model = mixtral(seed=2)
    I = model.layers[0].experts.down_proj.shape[2]
    same = apply(copy.deepcopy(model), plan_of({"groups": [[e] for e in range(8)],
                                                "folds": [[list(range(I))] for _ in range(8)]}))
    assert torch.equal(logits(same), logits(model))
    assert torch.equal(same.layers[0].experts.gate_up_proj, model.layers[0].experts.gate_up_proj)

    groups, coeffs = keep_rest([[1, 5]]), [[0.6, 0.4]] + [[1.0]] * 6
    folded = apply(copy.deepcopy(model), plan_of({"groups": groups, "coefficients": coeffs,
                                                  "folds": [[list(range(I)), None]] + [None] * 6}))
    linear = apply(copy.deepcopy(model), plan_of({"groups": groups, "coefficients": coeffs}))
    torch.testing.assert_close(logits(folded), logits(linear), atol=1e-5, rtol=1e-5)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(3))
    fold = torch.empty(I, dtype=torch.long)
    fold[perm] = torch.arange(I)  # "new neuron i is old perm[i]": old neuron perm[i] goes to i
    folded = apply(copy.deepcopy(model), plan_of({"groups": groups, "coefficients": coeffs,
                                                  "folds": [[None, fold.tolist()]] + [None] * 6}))
    aligned = apply(copy.deepcopy(model), plan_of({"groups": groups, "coefficients": coeffs,
                                                   "permutations": [[None, perm.tolist()]] + [None] * 6}))
    torch.testing.assert_close(folded.layers[0].experts.gate_up_proj, aligned.layers[0].experts.gate_up_proj,
                               atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- the plan's JSON


def test_old_plans_load_unchanged_and_folds_round_trip():
    old = {"version": 1, "base_model": "m", "layers": {"0": {"groups": [[0], [1, 2]], "coefficients": [[1.0], [0.5, 0.5]],
                                                             "merge_router": True}}, "skip_beta": {}, "provenance": {}}
    plan = PruningPlan.from_json(old)
    assert plan.layers[0].folds is None and not plan.layers[0].folded()
    assert plan.to_json() == old
    folded = json.loads(json.dumps({**old, "layers": {"0": {**old["layers"]["0"],
                                                            "folds": [None, [None, [1, 1, 0]]]}}}))
    plan = PruningPlan.from_json(folded)
    assert plan.layers[0].folded() and plan.layers[0].folded(1) and not plan.layers[0].folded(0)
    assert plan.to_json() == folded and PruningPlan.from_json(json.loads(plan.dumps())).to_json() == folded
    assert plan.layers[0].weightless(1) == []  # a weight-0 member of a fold may still stand where nothing else lands
    # all-null folds are no folds: written as such
    assert "folds" not in PruningPlan.from_json({**old, "layers": {"0": {**old["layers"]["0"],
                                                                        "folds": [None, [None, None]]}}}).to_json()["layers"]["0"]


BAD_FOLDS = [
    ({"folds": [None]}, r"'folds' must list, for each group, null or one entry per member"),
    ({"folds": [None, [None, [0, 1], [0]]]}, r"'folds' must list"),
    ({"folds": [None, [None, []]]}, r"'folds' must list"),
    ({"folds": [None, [None, [0, True, 1]]]}, r"'folds' must list"),
    ({"folds": [None, [[0, 1, 2], [0, 1]]]}, r", group \[1, 2\]: the folds have different lengths \[2, 3\]"),
    ({"folds": [None, [None, [0, 3, 1]]]}, r", group \[1, 2\]: fold target 3 is not a neuron of the merged expert "
                                           r"\(0..2\)"),
    ({"folds": [None, [[0, 0, 1], [1, 1, 0]]]}, r", group \[1, 2\]: the fold sends no member neuron to neuron\(s\) "
                                                r"\[2\] of the merged expert"),
    ({"folds": [None, [None, [0, 0, 1]]], "permutations": [None, [None, [2, 0, 1]]]},
     r", group \[1, 2\]: the group has both permutations and folds"),
    ({"folds": [None, [None, [0, 0, 1]]], "operator": "ties"},
     r", group \[1, 2\]: folds combine by weighted averages .* operator ties does not apply to a folded group"),
]


@pytest.mark.parametrize("extra,message", BAD_FOLDS)
def test_a_bad_fold_is_refused_in_one_line(extra, message):
    layer = {"groups": [[0], [1, 2]], **extra}
    with pytest.raises(MoescopeError, match=r"^plan: layer 0:? ?" + message) as err:
        PruningPlan.from_json({"version": 1, "base_model": "m", "layers": {"0": layer}})
    assert "\n" not in str(err.value)


def test_negative_fold_weights_and_a_wrong_length_against_the_model_are_refused():
    """A learned merge's plan may carry negative coefficients, a fold may not; a fold whose map does
    not list one target per intermediate neuron of the model's experts is refused by validate_for."""
    with pytest.raises(MoescopeError, match=r"group \[1, 2\]: fold weight -0.5 is negative"):
        PruningPlan.from_json({"version": 1, "base_model": "m", "provenance": {"params": {"merge": "learned"}},
                               "layers": {"0": {"groups": [[0], [1, 2]], "coefficients": [[1.0], [1.5, -0.5]],
                                                "folds": [None, [None, [0, 0, 1]]]}}})
    model = mixtral()
    plan = plan_of({"groups": keep_rest([[1, 2]]), "folds": [[None, [0, 0, 1]]] + [None] * 6})
    with pytest.raises(MoescopeError, match=r"^layer 0: the fold of expert 2 does not send each of its 48 intermediate "
                                            r"neurons to one of the merged expert's 48 \(0..47\); it lists 3$"):
        plan.validate_for(model)


def test_streamed_fold_export_is_the_in_memory_one_with_biased_experts(tiny_dirs, tmp_path):
    """GPT-OSS (gate/up interleaved, biases): a folded group streams byte for byte as the in-memory
    export; the merged gate/up bias follows its neurons and the down bias is Σ c·b / Σ c."""
    from moescope.analysis.run.export import stream_export
    from safetensors.torch import load_file
    from test_stream_export import assert_same_folder, in_memory, tensors

    source = tiny_dirs["gpt_oss"]
    skeleton = load_moe(source, weights=False)
    I = skeleton.layers[0].experts.down_proj.shape[1]
    fold = torch.randint(0, I, (I,), generator=torch.Generator().manual_seed(5)).tolist()
    plan = PruningPlan.from_json({"version": 1, "base_model": source, "layers": {"0": {
        "groups": keep_rest([[3, 1]]), "coefficients": [[0.3, 0.9]] + [[1.0]] * 6,
        "folds": [[fold, None]] + [None] * 6}}})
    plan.validate_for(skeleton)
    mem = in_memory(source, plan, tmp_path / "mem")
    streamed = stream_export(source, tmp_path / "stream", plan)
    assert_same_folder(mem, streamed)
    src = {k: v for f in sorted(Path(source).glob("*.safetensors")) for k, v in load_file(f).items()}
    out = tensors(streamed)
    name = "model.layers.0.mlp.experts.down_proj_bias"
    torch.testing.assert_close(out[name][0], (0.3 * src[name][3] + 0.9 * src[name][1]) / 1.2)
