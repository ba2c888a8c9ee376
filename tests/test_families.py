"""Exactness of the family view and of the structural edits, for every supported family.

Each family's tiny model is built once per session (``conftest.fresh_tiny``) and deep-copied per
test. Tests marked with ``DTYPES`` run in float32 and bfloat16: bit-exact claims (keeping every
expert, keep = singleton merge, save/reload) hold in both; comparisons of our own routing code
with the transformers block use a float32 tolerance, or two bfloat16 steps at the output's scale.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, fresh_tiny
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.layouts import ROUTER_OUTPUTS
from transformers import AutoModelForCausalLM

TOL = 1e-5
DTYPES = [torch.float32, torch.bfloat16]


def tol(ref: torch.Tensor) -> float:
    """1e-5 in float32; in bfloat16 two rounding steps at the largest output value."""
    return TOL if ref.dtype == torch.float32 else 2 * 2.0**-7 * float(ref.abs().max())


def hf_block_out(layer, x: torch.Tensor) -> torch.Tensor:
    out = layer.block(x[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(-1, x.shape[-1])


def hf_route(layer, x: torch.Tensor):
    """The transformers router's own (logits, weights, idx) on ``x``."""
    args = (layer.score_bias,) if (layer.spec.score_bias_attr or "").startswith("block.") else ()
    try:
        out = layer.router(x, *args)
    except ValueError:  # AFMoE's router wants [B, T, d]
        out = layer.router(x[None], *args)
    return ROUTER_OUTPUTS[layer.spec.router_returns][0](out, layer.top_k)


def tokens(n=64, d=32, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def input_ids(seed=0) -> torch.Tensor:
    return torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def grouped(model) -> bool:
    """Group-limited router with more than one routing group (DeepSeek-V2/V3, EXAONE, …)."""
    return model.family.group_limited and model.layers[model.moe_layers[0]].router_params.n_group > 1


def keep_set(model, layer=None) -> list[int]:
    """A subset that every family accepts (group-limited routers: 3 of each routing group of 4)."""
    return [0, 1, 3, 4, 6, 7] if grouped(model) else [1, 2, 4, 5, 7]


def dtype_of(model) -> torch.dtype:
    return next(model.hf.parameters()).dtype


@pytest.fixture(params=FAMILIES)
def model(request):
    return fresh_tiny(request.param)


@pytest.fixture(params=[(f, d) for f in FAMILIES for d in DTYPES],
                ids=[f"{f}-{str(d)[6:]}" for f in FAMILIES for d in DTYPES])
def model_any_dtype(request):
    family, dtype = request.param
    return fresh_tiny(family, dtype)


@torch.no_grad()
def test_route_and_expert_forward_reproduce_the_block(model_any_dtype):
    model = model_any_dtype
    for layer in model.layers.values():
        x = tokens(dtype=dtype_of(model))
        ref = hf_block_out(layer, x)
        assert (layer.forward(x) - ref).abs().max() <= tol(ref)
        # the rule picks the same experts as the transformers router itself
        hf_logits, _hf_w, hf_idx = hf_route(layer, x)
        r = layer.route(x)
        assert torch.equal(r.topk_idx.sort(-1).values, hf_idx.reshape(r.topk_idx.shape).sort(-1).values)
        ours, cap = r.logits.float(), layer.router_params.logit_softcap
        if cap:  # Laguna's router reports its soft-capped logits
            ours = torch.tanh(ours / cap) * cap
        assert torch.allclose(ours, hf_logits.reshape(r.logits.shape).float(), atol=tol(r.logits))
        # routing varies between tokens (the tiny models are not degenerate)
        assert len(torch.unique(r.topk_idx)) >= 4


@torch.no_grad()
def test_keep_all_is_identity(model_any_dtype):
    model = model_any_dtype
    ids = input_ids()
    before = logits(model, ids)
    for i, layer in model.layers.items():
        model.keep(i, list(range(layer.num_experts)))
    assert torch.equal(logits(model, ids), before)


def _unaffected_by_removal(model, layer) -> bool:
    """Routers whose weights for the chosen experts do not depend on the experts not chosen."""
    f, p = model.family, layer.router_params
    return (f.routing in ("topk_softmax", "topk_sigmoid")
            or (f.routing == "sigmoid_group_topk" and p.n_group == 1)
            or (f.routing == "softmax_topk" and layer.renormalize and layer.score_bias is None))


@torch.no_grad()
def test_keep_subset_equals_restricted_router(model_any_dtype):
    model = model_any_dtype
    i = model.moe_layers[-1]
    layer = model.layers[i]
    kept = keep_set(model, i)
    x = tokens(seed=1, dtype=dtype_of(model))
    allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
    allowed[kept] = True
    restricted = layer.forward(x, allowed=allowed)
    orig_route = layer.route(x)
    orig_block = hf_block_out(layer, x)
    independent = _unaffected_by_removal(model, layer)
    model.keep(i, kept)
    assert layer.num_experts == len(kept)
    pruned = hf_block_out(layer, x)
    assert (pruned - restricted).abs().max() <= tol(pruned)
    # independent of our routing code: where the router's original picks were all kept and their
    # weights do not depend on the other experts, the pruned transformers block gives the
    # original transformers block's output
    if independent:
        unaffected = torch.isin(orig_route.topk_idx, torch.tensor(kept)).all(-1)
        assert unaffected.sum() >= 3
        assert (pruned[unaffected] - orig_block[unaffected]).abs().max() <= tol(pruned)


@torch.no_grad()
def test_merge_is_coefficient_weighted_sum(model):
    i = model.moe_layers[0]
    layer = model.layers[i]
    names = layer.expert_param_names()
    old = {n: getattr(layer.experts, n).clone() for n in names}
    old_rows = {k: t.clone() for k, t in layer.router_tensors().items()}
    if grouped(model):
        groups, coeffs = [[0, 1], [2], [3], [4], [5, 6], [7]], [[0.7, 0.3], [1.0], [1.0], [1.0], [0.25, 0.75], [1.0]]
    else:
        groups, coeffs = [[0, 1], [2], [3, 4, 5], [6, 7]], [[0.7, 0.3], [1.0], [0.2, 0.3, 0.5], [0.5, 0.5]]
    model.merge(i, groups, coeffs, merge_router=True)
    for n in names:
        new = getattr(layer.experts, n)
        for j, (g, c) in enumerate(zip(groups, coeffs)):
            expected = sum(w * old[n][e] for e, w in zip(g, c))
            assert torch.allclose(new[j], expected, atol=1e-6), (n, j)
    new_rows = layer.router_tensors()
    assert set(new_rows) == set(old_rows)
    for role, old_t in old_rows.items():  # router weight, router bias, score-correction bias
        assert new_rows[role].shape[0] == len(groups)
        for j, (g, c) in enumerate(zip(groups, coeffs)):
            assert torch.allclose(new_rows[role][j], sum(w * old_t[e] for e, w in zip(g, c)), atol=1e-6), role
    assert layer.num_experts == len(groups)


@torch.no_grad()
def test_merge_without_router_merging_takes_the_dominant_row(model):
    i = model.moe_layers[0]
    layer = model.layers[i]
    old_router = layer.router_weight.clone()
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    model.merge(i, groups, [[0.2, 0.8], [0.9, 0.1], [0.5, 0.5], [0.4, 0.6]], merge_router=False)
    for j, e in enumerate([1, 2, 4, 7]):
        assert torch.equal(layer.router_weight[j], old_router[e])


@torch.no_grad()
def test_singleton_groups_with_coefficient_one_equal_keep(model_any_dtype):
    model = model_any_dtype
    i = model.moe_layers[0]
    kept = keep_set(model, i)
    twin = fresh_tiny(model.family.name, dtype_of(model))
    model.keep(i, kept)
    twin.merge(i, [[e] for e in kept], [[1.0] for _ in kept])
    ids = input_ids(1)
    assert torch.equal(logits(model, ids), logits(twin, ids))


def test_config_follows_edits_and_top_k_is_guarded(model):
    for i in model.moe_layers:
        model.keep(i, keep_set(model, i))
    assert getattr(model.config, model.family.num_experts_key) == len(keep_set(model, 0))
    layer = model.layers[model.moe_layers[0]]
    assert layer.top_k <= layer.num_experts
    with pytest.raises(MoescopeError, match="top-2"):
        model.keep(model.moe_layers[0], [0])
    assert layer.num_experts == len(keep_set(model, 0))  # a refused edit changes nothing


@torch.no_grad()
def test_save_reloads_with_identical_logits(model_any_dtype, tmp_path):
    model = model_any_dtype
    groups = [[0, 1], [2], [3, 4], [5]] if grouped(model) else [[0, 1], [2], [3], [4]]
    for i in model.moe_layers:
        model.keep(i, keep_set(model, i))
        model.merge(i, groups, None)  # uniform averages of pairs
    ids = input_ids(2)
    expected = logits(model, ids)
    out = model.save(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype_of(model)).eval()
    cfg_n = getattr(reloaded.config, model.family.num_experts_key)
    assert cfg_n == model.layers[model.moe_layers[0]].num_experts
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_save_uneven_layers_with_per_layer_counts_and_refuse_nonempty_folder(model, tmp_path):
    if len(model.moe_layers) < 2:
        pytest.skip("needs two MoE layers")
    first = model.moe_layers[0]
    model.keep(first, keep_set(model, first))
    out = model.save(tmp_path / "a")  # per-layer counts: moescope's format (tests/test_nonuniform_export.py)
    assert (out / "modeling_moescope.py").is_file()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("keep me")
    for i in model.moe_layers[1:]:
        model.keep(i, keep_set(model, i))
    with pytest.raises(MoescopeError, match="not empty"):
        model.save(tmp_path / "b")
    assert (tmp_path / "b" / "x.txt").read_text() == "keep me"


def test_bad_groups_are_refused_before_any_change(model):
    i = model.moe_layers[0]
    before = model.layers[i].experts.gate_up_proj.clone()
    for groups, match in [([[0, 1], [1, 2]], "more than one group"), ([[0], [99]], "not in 0..7"),
                          ([], "non-empty"), ([[0], []], "non-empty")]:
        with pytest.raises(MoescopeError, match=match):
            model.merge(i, groups)
    with pytest.raises(MoescopeError, match="same shape"):
        model.merge(i, [[0, 1], [2, 3]], [[1.0], [0.5, 0.5]])
    assert torch.equal(model.layers[i].experts.gate_up_proj, before)


def test_deepseek_routing_groups_are_preserved():
    model = fresh_tiny("deepseek_v3")
    i = model.moe_layers[0]
    with pytest.raises(MoescopeError, match="routing group"):
        model.keep(i, [0, 1, 2, 4, 5])  # 5 experts over 2 routing groups
    with pytest.raises(MoescopeError, match="routing group"):
        model.keep(i, [0, 1, 2, 4, 5, 6][::-1])  # groups listed out of routing-group order
    with pytest.raises(MoescopeError, match="at least 2 per group"):
        model.keep(i, [0, 4])
    with pytest.raises(MoescopeError, match="routing group"):
        model.merge(i, [[0, 4], [1], [2], [5]])  # a merge across routing groups
    model.keep(i, [0, 2, 5, 7])
    assert model.layers[i].num_experts == 4 and model.layers[i].router_params.n_group == 2
