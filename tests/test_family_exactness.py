"""Every family × {float32, bfloat16}: the view, keep, merge (router rows and every bias),
dynamic skipping and save/reload, each against a reference derived here, not by moescope.

Why exact comparisons work in bfloat16: transformers' eager experts loop and moescope's view do
the same operations in the same order, so they agree bit for bit. Routing is compared bit for bit
*and by dtype* with the family's own router (DeepSeek-V3 routes in float32, Mixtral keeps float32
top-k weights, Qwen/OLMoE cast them back to bfloat16): a wrong cast changes a weight by up to one
bfloat16 step (~0.4 %), which is as large as the rounding noise between transformers' own
``eager`` and ``grouped_mm`` experts, so only a bit-exact comparison can tell it apart.
The default ``grouped_mm`` experts sum the top-k terms in float32 before one rounding where the
eager loop rounds every term; against it the view is held to 2⁻⁶ of each token's scale.

These references call each family's own router and experts modules with the signatures of the
seven original families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, PhiMoE, GPT-OSS). The
families added since have their view / keep / merge / skipping / save proofs, in both dtypes, in
``test_families.py`` and ``test_families_catalog.py``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from moescope.analysis.model import load_moe, skipping, wrap_model
from transformers import AutoModelForCausalLM

FAMILIES = ["deepseek_v3", "gpt_oss", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CASES = [(f, d) for f in FAMILIES for d in DTYPES]
IDS = [f"{f}-{d}" for f, d in CASES]
GROUPED_MM_ROW_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-6}


@pytest.fixture(scope="session")
def loaded(tiny_dirs) -> dict[tuple[str, str], object]:
    """Each tiny family loaded once per dtype through ``load_moe`` (as a user loads it)."""
    return {(f, d): load_moe(tiny_dirs[f], dtype=d, load_tokenizer=False) for f, d in CASES}


@pytest.fixture(params=CASES, ids=IDS)
def case(request, loaded):
    """A private copy (tests edit it) of one family in one dtype."""
    fam, dt = request.param
    return wrap_model(copy.deepcopy(loaded[(fam, dt)].hf), source=f"tiny-{fam}"), DTYPES[dt]


def tokens(dtype, n=48, seed=0) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def input_ids(seed=0) -> torch.Tensor:
    return torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def block_out(layer, x):
    out = layer.block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


@contextmanager
def experts_impl(model, impl: str):
    before = model.hf.get_experts_implementation()
    model.hf.set_experts_implementation(impl)
    try:
        yield
    finally:
        model.hf.set_experts_implementation(before)


def hf_expert(layer, e: int, x):
    """Expert ``e`` as transformers' own experts module computes it (every token routed to e, weight 1)."""
    n = x.shape[0]
    return layer.experts(x, torch.full((n, 1), e), torch.ones(n, 1, dtype=x.dtype))


def shared_out(layer, x):
    if layer.shared is None:
        return torch.zeros_like(x)
    out = layer.shared(x)
    return torch.sigmoid(layer.shared_gate(x)) * out if layer.shared_gate is not None else out


def assert_row_close(got, ref, tol):
    scale = ref.float().abs().amax(-1, keepdim=True)
    err = ((got.float() - ref.float()).abs() / scale).max().item()
    assert err <= tol, f"max row-relative error {err:.3g} > {tol:.3g}"


# ---- the view ------------------------------------------------------------------------------
@torch.no_grad()
def test_view_reproduces_the_block_bit_for_bit(case):
    model, dtype = case
    for layer in model.layers.values():
        x = tokens(dtype)
        hf_logits, hf_w, hf_idx = layer.router(x)
        r = layer.route(x)
        for ours, theirs in ((r.logits, hf_logits), (r.topk_idx, hf_idx), (r.topk_weights, hf_w)):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        assert len(torch.unique(r.topk_idx)) >= 6  # routing varies
        y = [hf_expert(layer, e, x) for e in range(layer.num_experts)]
        for e in range(layer.num_experts):
            assert torch.equal(layer.expert_forward(e, x), y[e]), e
        with experts_impl(model, "eager"):
            ref = block_out(layer, x)
        assert ref.dtype == dtype
        assert torch.equal(layer.forward(x), ref)
        # the mix, independently: Σ_k w_k · expert_{idx_k}(x) + shared, in float64
        y = torch.stack(y).double()
        t = torch.arange(x.shape[0])
        naive = shared_out(layer, x).double() + sum(
            hf_w[:, k, None].double() * y[hf_idx[:, k], t] for k in range(hf_idx.shape[1]))
        assert_row_close(ref, naive, 2**-7 if dtype == torch.bfloat16 else 1e-6)
        # transformers' default experts (grouped_mm) round once after summing the top-k terms
        assert model.hf.get_experts_implementation()[""] != "eager"
        assert_row_close(layer.forward(x), block_out(layer, x), GROUPED_MM_ROW_TOL[dtype])


# ---- keep ----------------------------------------------------------------------------------
def kept_experts(model) -> list[int]:
    """A subset every family accepts (DeepSeek-V3: 3 of each routing group of 4)."""
    return [0, 1, 3, 4, 6, 7] if model.family.name == "deepseek_v3" else [1, 2, 4, 5, 7]


class _LogitMaskF:
    """``torch.nn.functional`` whose ``linear`` adds a 0/-inf mask to router-logit-shaped outputs."""

    def __init__(self, mask):
        self.mask = mask

    def linear(self, *args, **kwargs):
        out = torch.nn.functional.linear(*args, **kwargs)
        return out + self.mask.to(out.dtype) if out.shape[-1] == self.mask.shape[0] else out

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)


@contextmanager
def dropped_logits_masked(layer, dropped: list[int], monkeypatch):
    """The original transformers block with the dropped experts' router logits at -inf, per rule:
    softmax families get -inf added to the logits the router computes, PhiMoE (an ``nn.Linear``
    router) a -inf bias, GPT-OSS -inf on its router bias, DeepSeek-V3 -inf on the
    score-correction bias (its selection score; a masked logit would still score σ(-inf)+b = b)."""
    import sys

    mask = torch.zeros(layer.num_experts)
    mask[dropped] = float("-inf")
    router = layer.router
    name = layer.spec.name
    if name == "deepseek_v3":
        saved = router.e_score_correction_bias.clone()
        router.e_score_correction_bias.add_(mask.to(saved.dtype))
    elif name == "gpt_oss":
        saved = router.bias.detach().clone()
        router.bias.data.add_(mask.to(saved.dtype))
    elif name == "phimoe":
        router.bias = torch.nn.Parameter(mask.to(router.weight.dtype), requires_grad=False)
    else:
        monkeypatch.setattr(sys.modules[type(router).__module__], "F", _LogitMaskF(mask))
    try:
        yield
    finally:
        if name == "deepseek_v3":
            router.e_score_correction_bias.copy_(saved)
        elif name == "gpt_oss":
            router.bias.data.copy_(saved)
        elif name == "phimoe":
            router.bias = None
        else:
            monkeypatch.undo()


@torch.no_grad()
def test_keep_all_is_the_identity(case):
    model, _ = case
    ids = input_ids()
    before = model.hf(input_ids=ids).logits
    for i, layer in model.layers.items():
        model.keep(i, list(range(layer.num_experts)))
    assert torch.equal(model.hf(input_ids=ids).logits, before)


@torch.no_grad()
def test_keep_subset_equals_the_block_with_dropped_logits_masked(case, monkeypatch):
    model, dtype = case
    kept = kept_experts(model)
    for i, layer in model.layers.items():
        dropped = [e for e in range(layer.num_experts) if e not in kept]
        x = tokens(dtype, seed=i)
        with experts_impl(model, "eager"):
            with dropped_logits_masked(layer, dropped, monkeypatch):
                want = block_out(layer, x)
                _, _, idx = layer.router(x)
            assert not torch.isin(idx, torch.tensor(dropped)).any()  # the mask did take effect
            assert not torch.equal(want, block_out(layer, x))  # and dropping changes the output
            model.keep(i, kept)
            got = block_out(layer, x)
        assert layer.num_experts == len(kept)
        assert got.dtype == dtype
        # softmax over 5 logits vs 8 with -inf: float32 sums in another order (bfloat16: then rounded)
        assert_row_close(got, want, 2**-8 if dtype == torch.bfloat16 else 1e-6)


# ---- merge ---------------------------------------------------------------------------------
def merge_case(model):
    if model.family.name == "deepseek_v3":  # groups stay inside routing groups {0..3}, {4..7}
        return [[0, 1], [2], [3], [4], [5, 6], [7]], [[0.7, 0.3], [1.0], [1.0], [1.0], [0.25, 0.75], [1.0]]
    return [[0, 1], [2], [3, 4, 5], [6, 7]], [[0.7, 0.3], [1.0], [0.2, 0.3, 0.5], [0.6, 0.65]]


def router_tensors(layer) -> dict[str, torch.Tensor]:
    out = {"weight": layer.router_weight}
    if layer.router_bias is not None:
        out["bias"] = layer.router_bias
    if layer.score_bias is not None:
        out["score_bias"] = layer.score_bias
    return {k: v.detach().clone() for k, v in out.items()}


def weighted(old: torch.Tensor, groups, coeffs) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i c_i · old[g_i] per group in float64 (and Σ_i |c_i · old[g_i]|, the scale of its rounding)."""
    value = torch.stack([sum(c * old[e].double() for e, c in zip(g, cs)) for g, cs in zip(groups, coeffs)])
    scale = torch.stack([sum(abs(c) * old[e].double().abs() for e, c in zip(g, cs)) for g, cs in zip(groups, coeffs)])
    return value, scale


def assert_weighted_sum(new: torch.Tensor, old: torch.Tensor, groups, coeffs, what: str):
    """``new`` is the coefficient-weighted sum of ``old``'s rows, up to the last bit of the stored
    dtype (moescope accumulates in float32; this reference in float64)."""
    value, scale = weighted(old, groups, coeffs)
    assert new.dtype == old.dtype and new.shape == value.shape, what
    step = 2**-7 if new.dtype == torch.bfloat16 else 2**-21
    err = (new.double() - value).abs() - step * scale
    assert (err <= 0).all(), f"{what}: off by up to {float(err.max()):.3g} beyond rounding"


@pytest.mark.parametrize("merge_router", [True, False])
@torch.no_grad()
def test_merge_combines_experts_router_rows_and_biases(case, merge_router):
    model, dtype = case
    i = model.moe_layers[0]
    layer = model.layers[i]
    groups, coeffs = merge_case(model)
    names = layer.expert_param_names()
    if model.family.name == "gpt_oss":
        assert set(names) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    old = {n: getattr(layer.experts, n).detach().clone() for n in names}
    old_router = router_tensors(layer)
    assert {"bias": "gpt_oss", "score_bias": "deepseek_v3"}.keys() & old_router.keys() == (
        {"bias"} if model.family.name == "gpt_oss" else {"score_bias"} if model.family.name == "deepseek_v3" else set())
    model.merge(i, groups, coeffs, merge_router=merge_router)
    assert layer.num_experts == len(groups)
    for n in names:  # experts are always merged with the coefficients
        assert_weighted_sum(getattr(layer.experts, n), old[n], groups, coeffs, n)
    # documented: router rows / biases merged with the coefficients, or (merge_router=False) each
    # group takes its largest-coefficient member's row
    dominant = [[1.0 if j == max(range(len(c)), key=c.__getitem__) else 0.0 for j in range(len(c))] for c in coeffs]
    row_coeffs = coeffs if merge_router else dominant
    for key, new in router_tensors(layer).items():
        assert_weighted_sum(new, old_router[key], groups, row_coeffs, f"router {key}")
        if key == "score_bias":  # stays float32 in a bfloat16 model, as transformers keeps it
            assert new.dtype == torch.float32


# ---- dynamic skipping ----------------------------------------------------------------------
def _poison_freed_memory():
    """Leave NaN in freshly freed heap blocks, so a kernel output that is never written reads NaN."""
    for n in (48 * 2 * 96, 48 * 2 * 48, 48 * 2 * 32, 48 * 64, 4096, 1024):
        t = torch.full((n,), float("nan"))
        del t


def skipped_by_hand(weights: torch.Tensor, beta: float) -> list[list[bool]]:
    """The skipping rule token by token (Lu et al.): sort the top-k weights w₁ ≥ … ≥ w_k; top-2 skips
    the second when w₂ < β w₁ (§3.3), top-k keeps the fewest leading i with Σ_{m>i} w_m ≤ β Σ_{m≤k} w_m
    (App. A.2); the rest are skipped."""
    out = []
    for row in weights.double().tolist():
        order = sorted(range(len(row)), key=lambda k: -row[k])
        keep = len(row)
        if len(row) == 2:
            keep = 1 if row[order[1]] < beta * row[order[0]] else 2
        else:
            for j in range(1, len(row) + 1):
                if sum(row[k] for k in order[j:]) <= beta * sum(row):
                    keep = j
                    break
        skip = [False] * len(row)
        for k in order[keep:]:
            skip[k] = True
        out.append(skip)
    return out


@torch.no_grad()
def test_skipping_matches_the_rule_by_hand_and_undoes_exactly(case):
    model, dtype = case
    layers = list(model.layers.values())
    xs = {layer.index: tokens(dtype, seed=10 + layer.index) for layer in layers}
    original = {layer.index: block_out(layer, xs[layer.index]) for layer in layers}
    routed = {layer.index: layer.router(xs[layer.index]) for layer in layers}
    # β per layer: between the two middle ratios w_low / w_high, so half the tokens skip their
    # second expert and no token sits on the boundary (where float32 and float64 may disagree)
    betas = {}
    for l, (_, w, _) in routed.items():
        ratios = (w.double().min(-1).values / w.double().max(-1).values).sort().values
        betas[l] = float(ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2

    skipping.install(model, {l: 0.0 for l in betas})  # β = 0 never skips a non-zero weight
    for layer in layers:
        assert torch.equal(block_out(layer, xs[layer.index]), original[layer.index])
    assert model.skip_counter.skipped == 0

    counter = skipping.install(model, betas)
    expected_skips = 0
    for layer in layers:
        l, x = layer.index, xs[layer.index]
        _, w, idx = routed[l]
        skip = torch.tensor(skipped_by_hand(w, betas[l]))
        expected_skips += int(skip.sum())
        assert 0 < skip.sum() < skip.numel()
        t = torch.arange(x.shape[0])
        y = torch.stack([hf_expert(layer, e, x).double() for e in range(layer.num_experts)])
        wd = w.double()
        kept_w = wd * ~skip
        kept_w = kept_w * wd.sum(-1, keepdim=True) / kept_w.sum(-1, keepdim=True)  # renormalised to the k's sum
        want = shared_out(layer, x).double() + sum(
            kept_w[:, k, None] * y[idx[:, k], t] for k in range(idx.shape[1]))
        for _ in range(3):  # skipped slots must not read unwritten memory (NaN × 0 = NaN)
            _poison_freed_memory()
            got = block_out(layer, x)
            assert torch.isfinite(got).all(), "skipping produced NaN/inf"
            assert_row_close(got, want, 2**-7 if dtype == torch.bfloat16 else 1e-6)
    assert counter.skipped == 3 * expected_skips

    skipping.remove(model)
    assert model.skip_beta == {}
    for layer in layers:
        assert torch.equal(block_out(layer, xs[layer.index]), original[layer.index])
    assert counter.skipped == 3 * expected_skips  # the removed patch no longer counts


# ---- save / reload -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bfloat16_save_reloads_with_identical_logits(family, loaded, tmp_path):
    model = wrap_model(copy.deepcopy(loaded[(family, "bfloat16")].hf), source=f"tiny-{family}")
    kept = kept_experts(model)
    groups = [[0, 1], [2], [3, 4], [5]] if family == "deepseek_v3" else [[0, 1], [2], [3], [4]]
    for i in model.moe_layers:
        model.keep(i, kept)
        model.merge(i, groups, [[0.6, 0.4] if len(g) == 2 else [1.0] for g in groups])
    ids = input_ids(2)
    expected = model.hf(input_ids=ids).logits
    assert expected.dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(model.save(tmp_path / "m"), dtype=torch.bfloat16).eval()
    assert getattr(reloaded.config, model.family.num_experts_key) == len(groups)
    for name, t in model.hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
