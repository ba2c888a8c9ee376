"""Issue 33's bad input: ``analyze`` states the memory it would hold (``--dry-run``) and refuses, in
one line before any weight is read, a request whose estimate exceeds the memory available, naming
the estimate, its parts, the limit and what to lower. The estimate's terms are counted by hand on
a config whose sizes are known."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.processes import MEMORY_ENV
from moescope.analysis.measure.analyze import AnalysisParams, check_memory, predicted_memory
from moescope.analysis.measure.metrics import WORK_BYTES
from moescope.analysis.model import load_moe
from moescope.analysis.run.cli import main
from transformers import Qwen3MoeConfig

# Qwen3-30B-A3B's dimensions (128 experts, d 2048, I 768, 48 layers), as released
QWEN3_30B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                 num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=128, vocab_size=151936, max_position_embeddings=40960, decoder_sparse_step=1,
                 mlp_only_layers=[], tie_word_embeddings=False)


def config_folder(where: Path, **sizes) -> Path:
    """A model folder holding only ``config.json``: what the estimate reads (no weights)."""
    Qwen3MoeConfig(**sizes).save_pretrained(where)
    return where


def test_the_estimate_counts_each_term_by_hand(tmp_path):
    folder = config_folder(tmp_path / "q", **{**QWEN3_30B, "num_hidden_layers": 2})
    skeleton = load_moe(str(folder), weights=False)
    params = AnalysisParams(similarity_tokens=8192, augment_ratio=0.5)
    got = predicted_memory(skeleton, params, samples=64, seq_len=256, dtype=torch.float32)
    T, d, E, I = 64 * 256, 2048, 128, 768
    assert got["hidden_states"] == 2 * T * d * 4
    assert got["expert_outputs"] == E * int(8192 * 1.5) * d * 4  # n = min(T, 8192) × (1 + augment)
    assert got["gradients"] == 2 * E * 3 * I * d * 4  # two MoE layers of gate, up, down
    assert got["weights"] == skeleton.hf.num_parameters() * 4
    # the Gram pass: n = 12,288 is too many tokens for the float32 copy (12 GiB) or the kept distances
    # (36 GiB) to fit its 2 GiB store, so it holds its 4 mini-batch blocks of 512² and its tiles
    assert got["working"] == 4 * E * 512 * 512 * 4 + WORK_BYTES
    small = predicted_memory(skeleton, AnalysisParams(similarity_tokens=1024), 4, 256, torch.float32)
    assert small["working"] == E * 1024 * d * 4 + E * (1024 * 1023 // 2) * 4 + 4 * E * 512 * 512 * 4 + WORK_BYTES
    bf16 = predicted_memory(skeleton, AnalysisParams(metrics=("routing",)), 64, 256, torch.bfloat16, offloaded=True)
    assert bf16["expert_outputs"] == 0 and bf16["gradients"] == 0 and bf16["hidden_states"] == 2 * T * d * 2
    layer = sum(p.numel() for p in skeleton.hf.model.layers[0].parameters())
    outside = skeleton.hf.num_parameters() - 2 * layer
    assert bf16["weights"] == (outside + layer) * 2  # offloaded: one decoder layer beside embeddings and head


def test_the_refusal_names_the_estimate_the_limit_and_the_similarity_tokens_that_fit():
    predicted = {"weights": 10 * 2**30, "hidden_states": 2**30, "expert_outputs": 8 * 2**30, "gradients": 0,
                 "working": 2**28}
    with pytest.raises(Exception) as err:
        check_memory(predicted, 16 * 2**30, similarity_tokens=8192, n_rows=8192)
    line = str(err.value)
    # 16 GiB − (19.25 GiB − 8 GiB) leaves 4.75 GiB for the outputs, 1 MiB a token: 4,864 tokens fit
    assert line == ("this analysis would hold about 19.2 GiB (weights 10.0 GiB, expert outputs 8.0 GiB, hidden states "
                    "1.0 GiB, working 256.0 MiB), more than the 16.0 GiB of memory available; lower "
                    "--similarity-tokens to 4,864 or fewer, or lower --samples or --seq-len, or keep the weights on "
                    "disk with --offload DIR")
    check_memory(predicted, 20 * 2**30, 8192, 8192)  # enough: no refusal
    check_memory(predicted, None, 8192, 8192)  # unknown: no refusal


def cli(capfd, *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main(list(argv))
    out, err = capfd.readouterr()
    return rc, out, err


def test_analyze_is_refused_before_any_weight_is_read(tmp_path, capfd, monkeypatch):
    """A full-size Qwen3-30B-A3B config without weights: the refusal comes from the config alone (a
    weight read would fail on the missing files first), and nothing is written to the cache."""
    folder = config_folder(tmp_path / "q30b", **QWEN3_30B)
    monkeypatch.setenv(MEMORY_ENV, str(16 * 2**30))
    cache = Path(os.environ["MOESCOPE_CACHE"])
    before = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    rc, out, err = cli(capfd, "analyze", str(folder), "--tokenizer", "demo", "--samples", "8", "--seq-len", "64")
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("moescope: error: this analysis would hold about ") and "16.0 GiB of memory" in lines[0]
    assert "weights" in lines[0] and "--offload DIR" in lines[0]
    assert (sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []) == before


def test_dry_run_prints_the_estimate_and_computes_nothing(tmp_path, capfd, monkeypatch):
    folder = config_folder(tmp_path / "q30b", **QWEN3_30B)
    monkeypatch.setenv(MEMORY_ENV, str(16 * 2**30))
    rc, out, err = cli(capfd, "analyze", str(folder), "--samples", "8", "--seq-len", "64", "--offload",
                       str(tmp_path / "off"), "--dry-run", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["available_bytes"] == 16 * 2**30
    assert got["predicted_bytes"]["expert_outputs"] == 128 * 512 * 2048 * 4  # T = 512 < 8192 tokens
    assert got["total_bytes"] == sum(got["predicted_bytes"].values())


def test_the_predicted_time_counts_each_familys_work_by_hand(tmp_path):
    # multiply-adds of each family on Qwen3-30B-A3B's layer shape (two MoE layers), counted by hand
    # from the stages' definitions (analysis.measure.cost), and the time at the rates given
    from moescope.analysis.measure.cost import analysis_work, predicted_seconds
    from moescope.analysis.measure.gram_pass import pass_costs

    folder = config_folder(tmp_path / "q", **{**QWEN3_30B, "num_hidden_layers": 2})
    skeleton = load_moe(str(folder), weights=False)
    T, n, d, E, I, k, L = 64 * 256, 8192, 2048, 128, 768, 8, 2
    work = analysis_work(skeleton, ("similarity", "weights", "activations", "gradients"), 64, 256, 8192)
    assert work["expert_outputs"] == {"model": L * 3 * n * d * I * E}
    assert work["similarity"]["fp32"] == L * sum(pass_costs(E, n, d).values())
    assert work["similarity"]["model"] == L * 3 * T * d * I * E  # n < T: the mean outputs over all tokens
    assert work["activations"] == {"model": L * 3 * T * k * d * I}
    assert work["weights"]["fp32"] == L * (E * E * 3 * d * I + E * d * d * I + E * E * d * d + 3 * E * I * I * d)
    routed = L * E * 3 * I * d
    active = skeleton.hf.num_parameters() - routed + routed * k // E
    assert work["capture"] == {"model": T * active}
    assert work["gradients"]["model"] == 3 * T * active
    assert "routing" in work and set(work) == {"capture", "routing", "expert_outputs", "similarity", "weights",
                                               "activations", "gradients"}
    rates = {"model": 1e11, "fp32": 5e10, "matvec": 1e9, "elementwise": 1e9}
    secs = predicted_seconds(work, rates)
    assert secs["expert_outputs"] == pytest.approx(L * 3 * n * d * I * E / 1e11)
    assert set(analysis_work(skeleton, ("routing",), 64, 256, 8192)) == {"capture", "routing"}


def test_dry_run_states_the_predicted_time_of_each_family(tmp_path, capfd):
    folder = config_folder(tmp_path / "q", **{**QWEN3_30B, "num_hidden_layers": 2})
    rc, out, err = cli(capfd, "analyze", str(folder), "--samples", "4", "--seq-len", "64", "--metrics",
                       "similarity,weights", "--dry-run", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert set(got["predicted_seconds"]) == {"capture", "routing", "expert_outputs", "similarity", "weights"}
    assert all(v > 0 for v in got["predicted_seconds"].values())
    assert got["total_seconds"] == pytest.approx(sum(got["predicted_seconds"].values()))
    assert set(got["rates_per_second"]) == {"model", "fp32", "matvec", "elementwise"}
    rc, out, err = cli(capfd, "analyze", str(folder), "--samples", "4", "--seq-len", "64", "--dry-run")
    assert rc == 0 and "time (multiply-adds" in out and "similarity" in out and "memory at the peak" in out
