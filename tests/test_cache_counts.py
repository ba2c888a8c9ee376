"""Every cached computation is observably served from the cache: the second call counts a hit and
computes nothing (``Cache.stats``), and a changed input computes again. A spy around the real
function that does the work (it still runs it) also checks that no call site does that work
outside ``compute()``, where the counters could not see it."""

from __future__ import annotations

import importlib

import moescope.analysis.measure.analyze as A
import moescope.analysis.measure.capture as capture
import moescope.analysis.measure.sensitivity as S
import pytest
import torch
from moescope.analysis import evaluation as E
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.paths import demo_model_dir
from moescope.analysis.data import TokenBatch
from moescope.analysis.measure.analyze import AnalysisParams, lookup_analysis, run_analysis
from moescope.analysis.measure.explore import lookup_routing_trace, routing_trace
from moescope.analysis.measure.sensitivity import cached_drop_grid, lookup_drop_grid
from moescope.analysis.model import wrap_model
from moescope.analysis.model.synthetic import tiny_model
from transformers import AutoTokenizer

# the modules that hold the work (the package re-exports a function named like its perplexity module)
P = importlib.import_module("moescope.analysis.evaluation.perplexity")
T = importlib.import_module("moescope.analysis.evaluation.tasks")

PARAMS = AnalysisParams(metrics=("routing", "weights"), chunk_size=4)


def batch(seed=0, n=3, length=16) -> TokenBatch:
    ids = torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(input_ids=ids, domains=("synthetic",) * n, source="synthetic", fingerprint=f"synthetic-{seed}")


@pytest.fixture(scope="module")
def tiny():
    return wrap_model(tiny_model("mixtral"), source="tiny")


@pytest.fixture(scope="module")
def tiny_text(demo_available):
    """A tiny Mixtral with the demo tokenizer's vocabulary, so text sources and lm-eval work on it."""
    if not demo_available:
        pytest.fail(f"the demo model (its tokenizer) is missing at {demo_model_dir()}")
    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    return wrap_model(tiny_model("mixtral", vocab_size=len(tok)), source="tiny-text", tokenizer=tok)


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "cache")


def spy(monkeypatch, module, name) -> list:
    """Count the calls of ``module.name`` (which still runs)."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_cached_analysis_computes_nothing(tiny, cache, monkeypatch):
    work = spy(monkeypatch, A, "analyze_layer")
    assert lookup_analysis(tiny, batch(), PARAMS, cache) is None
    first = run_analysis(tiny, batch(), PARAMS, cache=cache)
    # each finished layer is first its own checkpoint entry (resumable), removed once the whole is stored
    assert cache.stats.by_kind() == {"analysis": {"hits": 0, "misses": 2, "computed": 1, "stored": 1},
                                     "analysis-layer": {"hits": 0, "misses": 2, "computed": 0, "stored": 2}}
    assert cache.entries("analysis-layer") == []
    cache.stats.reset()
    again = run_analysis(tiny, batch(), PARAMS, cache=cache)
    assert lookup_analysis(tiny, batch(), PARAMS, cache).entry.path == first.entry.path
    assert cache.stats.by_kind() == {"analysis": {"hits": 2, "misses": 0, "computed": 0, "stored": 0}}
    assert again.entry.path == first.entry.path and len(work) == len(tiny.moe_layers)
    run_analysis(tiny, batch(seed=1), PARAMS, cache=cache)  # other data: computed
    assert cache.stats.computed("analysis") == 1 and len(work) == 2 * len(tiny.moe_layers)


def test_a_cached_routing_trace_computes_nothing(tiny, cache, monkeypatch):
    work = spy(monkeypatch, capture, "LayerStream")
    assert lookup_routing_trace(tiny, batch(), cache) is None
    routing_trace(tiny, batch(), cache)
    assert (cache.stats.computed("routing"), cache.stats.stored("routing")) == (1, 1)
    cache.stats.reset()
    trace = routing_trace(tiny, batch(), cache)
    assert lookup_routing_trace(tiny, batch(), cache) is not None
    assert cache.stats.by_kind() == {"routing": {"hits": 2, "misses": 0, "computed": 0, "stored": 0}}
    assert trace.layers == tiny.moe_layers and len(work) == 1


def test_a_cached_drop_grid_computes_nothing(tiny, cache, monkeypatch):
    work = spy(monkeypatch, S, "drop_grid")
    assert lookup_drop_grid(tiny, batch(), cache) is None
    grid = cached_drop_grid(tiny, batch(), cache, chunk_size=2)
    assert cache.stats.computed("dropgrid") == 1
    cache.stats.reset()
    again = cached_drop_grid(tiny, batch(), cache, chunk_size=2)
    assert lookup_drop_grid(tiny, batch(), cache).ppl == grid.ppl
    assert cache.stats.by_kind() == {"dropgrid": {"hits": 2, "misses": 0, "computed": 0, "stored": 0}}
    assert again.ppl == grid.ppl and len(again.ppl) == 2 and len(again.ppl[0]) == 8 and len(work) == 1


def test_a_cached_perplexity_computes_nothing(tiny_text, cache, monkeypatch):
    work = spy(monkeypatch, P, "window_perplexity")
    a = E.perplexity(tiny_text, "demo:python", samples=2, seq_len=32, cache=cache)
    assert cache.stats.by_kind() == {"perplexity": {"hits": 0, "misses": 1, "computed": 1, "stored": 1}}
    b = E.perplexity(tiny_text, "demo:python", samples=2, seq_len=32, cache=cache)
    assert cache.stats.by_kind() == {"perplexity": {"hits": 1, "misses": 1, "computed": 1, "stored": 1}}
    assert b["ppl"] == a["ppl"] and len(work) == 1
    E.perplexity(tiny_text, "demo:python", samples=2, seq_len=24, cache=cache)  # other windows
    E.perplexity(tiny_text, "demo:spanish", samples=2, seq_len=32, cache=cache)  # other data
    assert cache.stats.computed("perplexity") == 3 == len(work)


def test_cached_lm_eval_results_compute_nothing(tiny_text, cache, monkeypatch):
    work = spy(monkeypatch, T, "run_tasks_with_docs")
    task = ["moescope_demo_ppl_spanish"]
    a = E.cached_tasks(tiny_text, task, limit=2, cache=cache)
    assert cache.stats.by_kind() == {"lm_eval": {"hits": 0, "misses": 1, "computed": 1, "stored": 1}}
    b = E.cached_tasks(tiny_text, task, limit=2, cache=cache)
    assert cache.stats.by_kind() == {"lm_eval": {"hits": 1, "misses": 1, "computed": 1, "stored": 1}}
    assert a == b and a[task[0]]["samples"] == 2
    assert len(work) == 1  # lm-eval ran once
