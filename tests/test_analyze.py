"""The cached analysis pipeline end to end on tiny models."""

from __future__ import annotations

import moescope.analysis.measure.analyze as A
import pandas as pd
import pytest
import torch
from conftest import CORE_FAMILIES as FAMILIES
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.criteria import CRITERIA
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model

PARAMS = A.AnalysisParams(similarity_tokens=128, rbf_batch_tokens=64, rbf_batches=2, chunk_size=4)


def batch(seed=0, n=6, length=32) -> TokenBatch:
    ids = torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(input_ids=ids, domains=("synthetic",) * n, source="synthetic", fingerprint=f"synthetic-{seed}")


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "cache")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_every_metric(family, cache):
    model = wrap_model(tiny_model(family), source=f"tiny-{family}")
    params = A.AnalysisParams(**{**PARAMS.key(), "metrics": A.METRIC_FAMILIES})
    res = A.run_analysis(model, batch(), params, cache=cache)
    assert res.layers == model.moe_layers
    assert set(res.similarity_names()) == set(A.SIMILARITY_NAMES) | set(A.WEIGHT_SIMILARITY_NAMES)
    assert set(res.criteria_names()) == set(CRITERIA)  # all sixteen, REAP and the variants (EAN-mean, …)
    for l in res.layers:
        assert res.similarity(l, "cka_linear").diagonal().sub(1).abs().max() < 1e-5
        assert res.routing(l, "usage").sum().item() == pytest.approx(model.layers[l].top_k)
    assert res.layer_map("EUF").shape == (len(model.moe_layers), 8)


def test_second_run_is_served_from_the_cache(cache, monkeypatch):
    model = wrap_model(tiny_model("mixtral"), source="tiny")
    first = A.run_analysis(model, batch(), PARAMS, cache=cache)
    assert cache.stats.computed("analysis") == 1
    calls = []
    monkeypatch.setattr(A, "analyze_layer", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(A, "gradient_criteria", lambda *a, **k: calls.append(2))
    again = A.run_analysis(model, batch(), PARAMS, cache=cache)
    assert calls == [] and again.entry.path == first.entry.path
    assert cache.stats.computed("analysis") == 1 and cache.stats.hits("analysis") == 1


def test_changed_model_data_or_params_are_new_entries(cache):
    model = wrap_model(tiny_model("mixtral"), source="tiny")
    paths = {A.run_analysis(model, batch(), PARAMS, cache=cache).entry.path}
    paths.add(A.run_analysis(model, batch(seed=1), PARAMS, cache=cache).entry.path)
    paths.add(A.run_analysis(model, batch(), A.AnalysisParams(**{**PARAMS.key(), "seed": 3}), cache=cache).entry.path)
    model.keep(0, [0, 1, 2, 3, 4, 5])
    pruned = A.run_analysis(model, batch(), PARAMS, cache=cache)
    paths.add(pruned.entry.path)
    assert len(paths) == 4 and pruned.num_experts(0) == 6
    assert cache.stats.computed("analysis") == 4 and cache.stats.hits("analysis") == 0


def test_an_interrupted_run_leaves_no_analysis_entry_only_its_finished_layers(cache):
    model = wrap_model(tiny_model("mixtral"), source="tiny")

    def interrupt(stage, done, total):  # after the first layer (per-step progress within a layer goes on)
        if stage == "layers" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.run_analysis(model, batch(), PARAMS, cache=cache, progress=interrupt)
    assert [i.kind for i in cache.entries()] == ["analysis-layer"]  # layer 0, finished before the interrupt
    notes = []
    assert A.run_analysis(model, batch(), PARAMS, cache=cache, note=notes.append).layers == [0, 1]
    assert notes == ["reused 1 finished layer(s) from the cache (layer 0); their decoder layers ran forward only"]
    assert [i.kind for i in cache.entries()] == ["analysis"]


def test_tidy_tables_and_summary(cache, tmp_path):
    model = wrap_model(tiny_model("qwen2_moe"), source="tiny")
    with torch.no_grad():  # make experts 2 and 6 of layer 2 identical: the summary must find them
        model.layers[2].experts.gate_up_proj[6].copy_(model.layers[2].experts.gate_up_proj[2])
        model.layers[2].experts.down_proj[6].copy_(model.layers[2].experts.down_proj[2])
    res = A.run_analysis(model, batch(), PARAMS, cache=cache)
    paths = res.export(tmp_path / "tables")
    sim = pd.read_csv(paths["similarity"])
    assert list(sim.columns) == ["layer", "metric", "expert_i", "expert_j", "value"]
    assert len(sim) == 2 * len(res.similarity_names()) * 64
    crit = pd.read_csv(paths["criteria"])
    assert list(crit.columns) == ["layer", "expert", "criterion", "value"] and "REAP" in set(crit.criterion)
    routing = pd.read_csv(paths["routing"])
    assert routing.groupby("layer").usage.sum().round(6).tolist() == [2.0, 2.0]
    co = pd.read_csv(paths["coactivation"])
    diag = co[co.expert_i == co.expert_j].groupby("layer").tokens.sum()
    assert diag.tolist() == [6 * 32 * 2] * 2
    summary = res.summary()
    assert summary["2"]["most_similar_pair"]["experts"] == [2, 6]
    assert summary["2"]["most_similar_pair"]["value"] == pytest.approx(1.0, abs=1e-5)
    usage = res.routing(0, "usage")
    assert summary["0"]["least_used_expert"]["expert"] == int(torch.argmin(usage))


def test_bad_parameters_are_refused_up_front():
    with pytest.raises(MoescopeError, match="Did you mean 'similarity'"):
        A.AnalysisParams(metrics=("similarty",))
    with pytest.raises(MoescopeError, match="augment_ratio"):
        A.AnalysisParams(augment_ratio=-1)


def test_offloaded_layers_give_the_same_analysis_and_refuse_edits(tiny_dirs, tmp_path):
    from moescope.analysis.model import load_moe

    in_memory = load_moe(tiny_dirs["qwen2_moe"])
    offloaded = load_moe(tiny_dirs["qwen2_moe"], offload_dir=tmp_path / "offload")
    assert offloaded.layers[0].experts.gate_up_proj.device.type == "meta"
    assert offloaded.fingerprint() == in_memory.fingerprint()
    with pytest.raises(MoescopeError, match="backward pass"):
        A.run_analysis(offloaded, batch(), PARAMS, cache=Cache(tmp_path / "c0"))
    forward_only = A.AnalysisParams(**{**PARAMS.key(), "metrics": A.FORWARD_METRICS})
    a = A.run_analysis(in_memory, batch(), forward_only, cache=Cache(tmp_path / "c1"))
    b = A.run_analysis(offloaded, batch(), forward_only, cache=Cache(tmp_path / "c2"))
    for name in a.similarity_names():
        assert torch.allclose(a.similarity(2, name), b.similarity(2, name), atol=1e-6), name
    for name in a.criteria_names():
        assert torch.allclose(a.criterion(2, name), b.criterion(2, name), atol=1e-6, equal_nan=True), name
    with pytest.raises(MoescopeError, match="read-only"):
        offloaded.keep(0, [0, 1, 2])
