"""Named plans kept in the cache, and the predicted cost of a plan, against the backend."""

from __future__ import annotations

import pytest
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.measure.sensitivity import DropGrid, perplexity
from moescope.analysis.model import load_moe
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.named_plans import (
    delete_plan,
    grid_delta_sum,
    list_plans,
    predict_cost,
    proxy_batch,
    rename_plan,
    save_plan,
    unique_name,
)


def keep_plan(drop: dict[int, list[int]]) -> PruningPlan:
    return PruningPlan.from_keep("demo", {l: [e for e in range(8) if e not in drop.get(l, [])] for l in range(4)})


def test_named_plans_survive_a_new_cache_object_and_rename_delete(tmp_path):
    root = tmp_path / "cache"
    a, b = keep_plan({0: [1]}), keep_plan({2: [3, 4]})
    save_plan("drop one", a, "demo", Cache(root))
    save_plan("drop two", b, "demo", Cache(root))
    save_plan("elsewhere", a, "other-model", Cache(root))
    plans = list_plans("demo", Cache(root))  # a fresh Cache: as after a restart
    assert list(plans) == ["drop one", "drop two"] and plans["drop two"].to_json() == b.to_json()
    save_plan("drop one", b, "demo", Cache(root))  # a newer revision wins
    assert list_plans("demo", Cache(root))["drop one"].to_json() == b.to_json()
    rename_plan("drop one", "renamed", "demo", Cache(root))
    assert list(list_plans("demo", Cache(root))) == ["drop two", "renamed"]
    with pytest.raises(MoescopeError, match="exists already"):
        rename_plan("renamed", "drop two", "demo", Cache(root))
    with pytest.raises(MoescopeError, match="no plan named"):
        rename_plan("nope", "x", "demo", Cache(root))
    assert delete_plan("renamed", "demo", Cache(root)) == 1 and list(list_plans("demo", Cache(root))) == ["drop two"]
    with pytest.raises(MoescopeError, match="printable"):
        save_plan("  ", a, "demo", Cache(root))
    assert unique_name("drop two", {"drop two", "drop two 2"}) == "drop two 3"
    assert list(list_plans("other-model", Cache(root))) == ["elsewhere"]


def test_predicted_cost_is_the_pruned_models_size_and_proxy_perplexity(tmp_path):
    model = load_moe("demo")
    batch = proxy_batch(model)
    assert batch.input_ids.shape == (8, 128)
    plan = keep_plan({0: [1], 3: [0, 7]})
    cost = predict_cost(model, plan, batch, cache=Cache(tmp_path))
    fresh = apply(load_moe("demo"), plan)
    assert cost.experts_before == 32 and cost.experts_after == 29
    assert cost.params_after == fresh.parameter_counts()["total"]
    assert cost.bytes_after == sum(fresh.bytes_by_dtype().values())
    assert cost.proxy_ppl_after == pytest.approx(perplexity(fresh, batch.input_ids), rel=1e-6)
    assert cost.proxy_ppl_before == pytest.approx(perplexity(load_moe("demo"), batch.input_ids), rel=1e-6)
    assert model.num_experts() == {0: 8, 1: 8, 2: 8, 3: 8}  # the loaded model is restored
    again = predict_cost(model, plan, batch, cache=Cache(tmp_path))  # cached
    assert again.proxy_ppl_after == cost.proxy_ppl_after and again.seconds == cost.seconds
    grid = DropGrid(baseline=10.0, layers=[0, 1, 2, 3], ppl=[[10.0 + 0.1 * e for e in range(8)]] * 4)
    assert grid_delta_sum(plan, grid) == pytest.approx(0.1 + 0.0 + 0.7)
    merge = PruningPlan.from_json({"version": 1, "base_model": "demo",
                                   "layers": {"0": {"groups": [[0, 1], [2], [3], [4], [5], [6], [7]]}}})
    assert grid_delta_sum(merge, grid) is None
    m = predict_cost(model, merge, batch, cache=Cache(tmp_path))
    assert m.experts_after == 31 and m.proxy_ppl_after == pytest.approx(
        perplexity(apply(load_moe("demo"), merge), batch.input_ids), rel=1e-6)


def test_the_proxy_windows_are_the_first_windows_of_the_test_split():
    """The batch the test above takes its expected numbers from is itself checked against an
    independent statement: by fingerprint, it is sample_tokens' first 8 × 128 windows of demo:all's
    test split (not validation); and by content, every row's text comes from the demo corpus'
    test.txt files and from none of the validation.txt files."""
    from types import SimpleNamespace

    from moescope.analysis.core.paths import demo_model_dir
    from moescope.analysis.data import sample_tokens, separator_id
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    batch = proxy_batch(SimpleNamespace(tokenizer=tok))
    assert batch.input_ids.shape == (8, 128) and batch.split == "test" and batch.sampling == "first"
    test = sample_tokens("demo:all", tok, 8, 128, sampling="first", split="test")
    validation = sample_tokens("demo:all", tok, 8, 128, sampling="first", split="validation")
    assert batch.fingerprint == test.fingerprint != validation.fingerprint
    corpus = demo_model_dir().parent / "corpus"
    sep = separator_id(tok)
    for row, domain in zip(batch.input_ids.tolist(), batch.domains):
        test_text = (corpus / domain / "test.txt").read_text(encoding="utf-8")
        validation_text = (corpus / domain / "validation.txt").read_text(encoding="utf-8")
        pieces = [[]]
        for t in row:
            pieces.append([]) if t == sep else pieces[-1].append(t)
        # whole tokens inside a document (the edge tokens may be parts of a character)
        texts = [tok.decode(p[2:-2]).strip() for p in pieces if len(p) > 12]
        assert texts, f"a proxy row of {domain} holds no document text"
        for text in texts:
            assert text in test_text and text not in validation_text, (domain, text[:60])
