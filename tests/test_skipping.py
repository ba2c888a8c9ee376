"""Dynamic skipping: the rule, the routing patch, and its round trip through a saved folder."""

from __future__ import annotations

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe, skipping, wrap_model
from moescope.analysis.model.synthetic import tiny_model


def test_skip_rule_by_hand():
    w = torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.2, 0.8]])  # w2/w1 = 3/7, 9/11, 1/4
    assert skipping.skip_mask(w, 0.5).tolist() == [[False, True], [False, False], [True, False]]
    w3 = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    # β=0.2 against all three (App. A.2): row 0 keeps {0.6, 0.3} (0.1 ≤ 0.2·1.0, but 0.4 > 0.2);
    # row 1 keeps all (0.25 > 0.2·1.0)
    assert skipping.skip_mask(w3, 0.2).tolist() == [[False, False, True], [False, False, False]]
    assert not skipping.skip_mask(w3, 0.0).any()  # β = 0 never skips a non-zero weight
    assert skipping.skip_mask(w3, 10.0).sum(-1).tolist() == [2, 2]  # only the top expert left


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_patched_block_equals_dropping_the_skipped_terms(family):
    model = wrap_model(tiny_model(family))
    layer = model.layers[model.moe_layers[0]]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    beta = 0.4
    with torch.no_grad():
        r = layer.route(x)
        skip = skipping.skip_mask(r.topk_weights, beta)
        r.topk_weights = skipping.renormalized(r.topk_weights, skip)  # the kept weights share the whole mass
        want = layer.combine(x, r)
        counter = skipping.install(model, {layer.index: beta})
        got = layer.block(x[None])
        got = (got[0] if isinstance(got, tuple) else got)[0]
    assert (got - want).abs().max() <= 1e-5
    assert counter.skipped == int(skip.sum()) and 0 < counter.fraction < 1
    skipping.remove(model)
    with torch.no_grad():
        plain = layer.block(x[None])
    assert counter.skipped == int(skip.sum())  # no longer counting
    del plain


def test_top1_routers_are_refused_in_one_line():
    model = wrap_model(tiny_model("mixtral", num_experts_per_tok=1))
    with pytest.raises(MoescopeError, match="at least 2 experts per token; this one selects 1"):
        skipping.install(model, {model.moe_layers[0]: 0.5})
    with pytest.raises(MoescopeError, match="nothing to skip"):
        skipping.skip_mask(torch.ones(3, 1), 0.5)


def test_betas_travel_with_a_saved_folder(tmp_path):
    model = wrap_model(tiny_model("mixtral"))
    skipping.install(model, {0: 0.3, 1: 0.5})
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.hf(input_ids=ids).logits
    model.save(tmp_path / "m")
    again = load_moe(str(tmp_path / "m"))
    assert again.skip_beta == {0: 0.3, 1: 0.5}
    with torch.no_grad():
        assert torch.equal(again.hf(input_ids=ids).logits, want)
    assert again.skip_counter.fraction > 0
