"""Perplexity, lm-eval tasks and efficiency against their definitions, on the demo model."""

from __future__ import annotations

import math

import pytest
import torch
from by_hand_eval import continuation_items, multiple_choice_metrics
from moescope.analysis import evaluation as E
from moescope.analysis.core.cache import Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import load_texts
from moescope.analysis.model import load_moe


@pytest.fixture(scope="module")
def demo(demo_available):
    if not demo_available:
        pytest.fail("the demo model is missing")
    return load_moe("demo")


def _hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token loss as transformers computes it (labels = inputs)."""
    with torch.no_grad():
        return torch.stack([model.hf(input_ids=row[None], labels=row[None]).loss for row in ids])


def test_perplexity_is_exp_of_the_mean_next_token_loss(demo):
    res = E.perplexity(demo, "demo:all", samples=12, seq_len=64)
    windows = E.perplexity_windows("demo:all", demo.tokenizer, samples=12, seq_len=64)
    losses = _hf_loss(demo, windows.input_ids)
    assert res["value"] == pytest.approx(math.exp(float(losses.mean())), rel=1e-5)
    for domain in set(windows.domains):
        rows = [i for i, d in enumerate(windows.domains) if d == domain]
        assert res["ppl"][domain] == pytest.approx(math.exp(float(losses[rows].mean())), rel=1e-5)
    assert res["tokens"] == {d: 2 * 63 for d in sorted(set(windows.domains))}


def test_sliding_windows_score_every_token_once_with_context(demo):
    L, S, k = 64, 16, 4
    res = E.perplexity(demo, "demo:spanish", samples=k, seq_len=L, stride=S)
    assert res["tokens"] == {"spanish": (L - 1) + (k - 1) * S}
    # by hand: each later window predicts only its last S tokens
    from moescope.analysis.data import token_streams

    stream = token_streams("demo:spanish", demo.tokenizer, split="test")["spanish"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(k):
            ids = stream[i * S : i * S + L][None]
            logp = torch.log_softmax(demo.hf(input_ids=ids).logits[0, :-1].double(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            scored = nll if i == 0 else nll[L - S - 1 :]
            total += float(scored.sum())
            count += scored.numel()
    assert res["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # stride = seq_len is the plain non-overlapping case
    assert E.perplexity(demo, "demo:spanish", samples=2, seq_len=L, stride=L)["value"] == pytest.approx(
        E.perplexity(demo, "demo:spanish", samples=2, seq_len=L)["value"])


def test_perplexity_is_cached_by_model_and_windows(demo, tmp_path):
    cache = Cache(tmp_path / "c")
    a = E.perplexity(demo, "demo:python", samples=2, seq_len=64, cache=cache)
    assert len(cache.entries("perplexity")) == 1
    b = E.perplexity(demo, "demo:python", samples=2, seq_len=64, cache=cache)
    assert a["ppl"] == b["ppl"] and len(cache.entries("perplexity")) == 1
    assert cache.stats.computed("perplexity") == 1 and cache.stats.hits("perplexity") == 1  # b computed nothing
    E.perplexity(demo, "demo:python", samples=2, seq_len=32, cache=cache)
    assert len(cache.entries("perplexity")) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"stride": 100}, "must not exceed seq_len"),
    ({"stride": 16, "sampling": "random"}, "use --sampling first"),
    ({"samples": 0}, "positive integer"),
])
def test_bad_perplexity_settings_are_one_line(demo, kwargs, match):
    with pytest.raises(MoescopeError, match=match):
        E.perplexity(demo, "demo:python", **{"samples": 2, "seq_len": 64, **kwargs})


@pytest.mark.slow
def test_local_multiple_choice_accuracy_matches_a_hand_computation(demo):
    items = continuation_items()
    from moescope.analysis.data import demo_domains

    assert len(items) > 500 and {i["domain"] for i in items} == set(demo_domains())
    assert all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
    # the label is the choice that follows the context in a test document
    text = {d: "\n".join(docs) for d, docs in load_texts("demo:all", split="test").items()}
    assert all(i["context"] + i["choices"][i["label"]] in text[i["domain"]] for i in items)
    n = 12
    seen = []
    res = E.run_tasks(demo, ["moescope_demo_continuation"], limit=n,
                      progress=lambda *a: seen.append(a))["moescope_demo_continuation"]
    want = multiple_choice_metrics(demo.hf, demo.tokenizer, items[:n])
    assert res["samples"] == n
    assert res["acc"] == pytest.approx(want["acc"]) and res["acc_norm"] == pytest.approx(want["acc_norm"])
    # lm-eval's standard error of a mean of 0/1 scores: sample sd / √n = √(p (1 − p) / (n − 1))
    for metric in ("acc", "acc_norm"):
        p = want[metric]
        assert res[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    # lm-eval's own progress over its requests: one loglikelihood request per choice, counted to the end
    counted = [(d, t) for stage, d, t in seen if stage == "lm-eval requests"]
    assert counted[0] == (0, 4 * n) and counted[-1] == (4 * n, 4 * n)
    assert [d for d, _ in counted] == sorted(d for d, _ in counted)


@pytest.mark.slow
def test_unknown_task_names_the_local_ones(demo):
    with pytest.raises(MoescopeError, match="unknown lm-eval task.*moescope_demo_continuation"):
        E.run_tasks(demo, ["no_such_task"])


def test_efficiency_reports_size_and_speed(demo):
    eff = E.efficiency(demo, E.EfficiencyParams(prompt_tokens=32, new_tokens=4, repeats=1, warmup=1))
    counts = demo.parameter_counts()
    assert eff["params_total"] == counts["total"] == 4_396_160 and eff["params_active"] == counts["active"]
    assert eff["weight_bytes"] == 4 * counts["total"]
    # tokens/s as documented: 1 × 32 prompt tokens per prefill, the 3 tokens after the first per decode
    assert eff["prefill_tokens_per_s"] == pytest.approx(32 / eff["prefill_s"])
    assert eff["generate_tokens_per_s"] == pytest.approx(3 / (eff["generate_s"] - eff["prefill_s"]))
    assert eff["generate_s"] > eff["prefill_s"] > 0
    # the process holds the weights while it generates
    assert eff["peak_memory_bytes"] >= eff["memory_before_generate_bytes"] > eff["weight_bytes"]
    with pytest.raises(MoescopeError, match="new_tokens must be at least 2"):
        E.EfficiencyParams(new_tokens=1)
