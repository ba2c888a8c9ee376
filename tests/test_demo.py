"""The shipped demo model: loads everywhere offline, prunes exactly, and its experts specialise."""

from __future__ import annotations

import json

import pytest
import torch
from moescope.analysis.data import demo_domains, load_texts, sample_tokens
from moescope.analysis.model import load_moe
from moescope.analysis.run.cli import main
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def demo(demo_available):
    if not demo_available:
        pytest.fail("the demo model is missing: run demo/train_model.py")
    return load_moe("demo")


def test_demo_is_a_plain_transformers_mixtral(demo, demo_dir):
    assert demo.family.name == "mixtral" and demo.moe_layers == list(range(demo.num_hidden_layers))
    assert set(demo.num_experts().values()) == {8} and demo.layers[0].top_k == 2
    hf = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    tok = AutoTokenizer.from_pretrained(demo_dir)
    ids = tok("def parse(self, text):\n    return text.split()", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, demo.hf(input_ids=ids).logits)
    weights = sum(f.stat().st_size for f in demo_dir.iterdir())
    assert weights < 25 * 2**20


def test_tokenizer_round_trips_every_domain(demo):
    tok = demo.tokenizer
    for domain, docs in load_texts("demo:all", split="test").items():
        for doc in docs[:5]:
            assert tok.decode(tok(doc).input_ids) == doc, domain
    assert tok.decode(tok("Grüße, señor! Però così: ß ñ à").input_ids) == "Grüße, señor! Però così: ß ñ à"


def test_pruned_demo_saves_and_reloads_identically(demo_dir, tmp_path):
    model = load_moe("demo")
    for i in model.moe_layers:
        model.keep(i, [0, 1, 2, 3, 5, 7])
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.hf(input_ids=ids).logits
    out = model.save(tmp_path / "pruned")
    assert (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_local_experts == 6
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)


@torch.no_grad()
def test_experts_specialise_by_domain(demo):
    """Usage distributions differ across domains: in some layer, two domains' usage vectors
    are far apart (total variation ≥ 0.25), and most experts are used somewhere."""
    usage = {}
    for domain in demo_domains():
        batch = sample_tokens(f"demo:{domain}", demo.tokenizer, 4, 128, seed=0)
        routed: list = []
        hooks = [layer.router.register_forward_hook(lambda m, a, out, sink=routed: sink.append(out[2]))
                 for layer in demo.layers.values()]
        try:
            demo.hf(input_ids=batch.input_ids)
        finally:
            for h in hooks:
                h.remove()
        usage[domain] = torch.stack([torch.bincount(r.reshape(-1), minlength=8).double() / r.numel()
                                     for r in routed])  # [layers, 8]
    domains = sorted(usage)
    tv = max(0.5 * (usage[a] - usage[b]).abs().sum(-1).max().item()
             for i, a in enumerate(domains) for b in domains[i + 1:])
    assert tv >= 0.25
    overall = torch.stack(list(usage.values())).mean(0)  # [layers, 8]
    assert (overall > 0.02).sum().item() >= 0.75 * overall.numel()


def test_info_demo_json(capsys):
    assert main(["info", "demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mixtral" and info["top_k"] == 2
    assert info["num_experts"] == {str(i): 8 for i in info["moe_layers"]}
    assert info["params"]["active"] < info["params"]["total"]


def test_analyze_demo_cli_then_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    argv = ["analyze", "demo", "--calib", "demo:all", "--samples", "6", "--seq-len", "64", "--json",
            "--export", str(tmp_path / "tables")]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    from moescope.analysis.measure.criteria import CRITERIA

    # every registered criterion (the 16 of MC-Suite, REAP and the named variants) is computed
    assert sorted(first["criteria"]) == sorted(CRITERIA) and len(CRITERIA) >= 17 and "cka_rbf" in first["similarity"]
    assert set(first["exported"]) == {"similarity", "criteria", "routing", "coactivation"}
    for row in first["layers"].values():
        assert row["most_similar_pair"]["metric"] == "cka_linear"
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cache_entry"] == first["cache_entry"]
    assert main(["cache", "ls", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.mark.slow
def test_demo_streams_are_the_corpus_files_as_trained_and_match_the_card(demo):
    from moescope.analysis.data import demo_corpus_dir, token_streams
    from moescope.analysis.evaluation import perplexity_by_domain

    tok = demo.tokenizer
    for domain, stream in token_streams("demo:all", tok, split="test").items():
        text = (demo_corpus_dir() / domain / "test.txt").read_text(encoding="utf-8")
        assert torch.equal(stream, torch.tensor(tok(text, add_special_tokens=False).input_ids)), domain
    card = json.loads((demo.source_dir / "training_log.json").read_text())["test"]["ppl"]
    # the model card's numbers, from the training script's own code, on whole test splits: code, a
    # fortune language and the smallest-perplexity domain (all six would cost ~45 s of the suite)
    for domain in ("python", "german", "spanish"):
        ppl = perplexity_by_domain(demo, f"demo:{domain}", max_tokens=None)
        assert ppl[domain] == pytest.approx(card[domain], rel=0.01), domain
