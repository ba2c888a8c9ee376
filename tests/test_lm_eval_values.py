"""The offline lm-eval perplexity tasks give the numbers their definitions give, computed by hand
(tests/by_hand_eval.py) on the demo model: a document longer than the model's 512 positions (so
the rolling windows matter), non-ASCII text (bytes are not characters) and an indented document
(words are counted without an empty one at the start)."""

from __future__ import annotations

import pytest
from by_hand_eval import perplexity_metrics, words
from moescope.analysis import evaluation as E
from moescope.analysis.data import load_texts
from moescope.analysis.model import load_moe


@pytest.fixture(scope="module")
def demo(demo_available):
    if not demo_available:
        pytest.fail("the demo model is missing")
    return load_moe("demo")


def test_perplexity_tasks_match_a_rolling_loglikelihood_by_hand(demo):
    limit = 2
    docs = {d: load_texts(f"demo:{d}", split="test")[d][:limit] for d in ("docs", "quotes_en")}
    # what the items exercise: a document over 512 tokens with multi-byte characters, an indented one
    tok = demo.tokenizer
    assert len(tok(docs["docs"][1])["input_ids"]) > 3 * 512
    assert len(docs["docs"][1].encode()) > len(docs["docs"][1])
    assert docs["quotes_en"][1].startswith("\t") and words(docs["quotes_en"][1]) == len(docs["quotes_en"][1].split())
    res = E.run_tasks(demo, ["moescope_demo_ppl_docs", "moescope_demo_ppl_quotes_en"], limit=limit)
    for domain, texts in docs.items():
        got = res[f"moescope_demo_ppl_{domain}"]
        want = perplexity_metrics(demo.hf, tok, texts)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert got[metric] == pytest.approx(want[metric], rel=2e-5), (domain, metric)
