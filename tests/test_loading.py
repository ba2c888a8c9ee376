"""Loading models: sources, refusals with one clear line, and the info facts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe
from moescope.analysis.model.families import get_family
from moescope.analysis.model.synthetic import save_tiny
from moescope.analysis.run.cli import main
from transformers import AutoModelForCausalLM, LlamaConfig


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("family", FAMILIES)
def test_info_json_on_each_tiny_folder(family, tiny_dirs, capsys):
    rc, out, err = run_cli(capsys, "info", tiny_dirs[family], "--json")
    assert rc == 0, err
    info = json.loads(out)
    model = load_moe(tiny_dirs[family])
    assert info["family"] == family
    assert info["num_hidden_layers"] == model.num_hidden_layers
    assert info["moe_layers"] == model.moe_layers
    assert info["num_experts"] == {str(i): 8 for i in model.moe_layers}
    assert info["top_k"] == 2
    # parameter counts from the config alone equal those of the loaded weights
    total = sum(p.numel() for p in model.hf.parameters())
    experts = sum(p.numel() for layer in model.layers.values() for p in layer.experts.parameters())
    assert info["params"]["total"] == total
    assert info["params"]["experts"] == experts
    assert info["params"]["active"] == total - experts + experts * 2 // 8
    assert info["bytes"] == {"float32": sum(t.numel() * 4 for t in model.hf.state_dict().values())}
    assert "trust-remote-code" not in err
    has_shared = get_family(family).shared_attr is not None  # every tiny config with shared experts uses them
    assert bool(info["shared_experts"]) == has_shared
    rc, text, _ = run_cli(capsys, "info", tiny_dirs[family])
    assert rc == 0 and "top-2" in text and family in text


def test_qwen2_dense_layers_and_deepseek_dense_first_layers(tiny_dirs):
    assert load_moe(tiny_dirs["qwen2_moe"]).moe_layers == [0, 2]  # mlp_only_layers=[1]
    assert load_moe(tiny_dirs["deepseek_v3"]).moe_layers == [1, 2]  # first_k_dense_replace=1


def test_unknown_architecture_is_refused_with_the_supported_list(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    rc, _, err = run_cli(capsys, "info", str(tmp_path / "llama"))
    assert rc == 2
    assert err.count("\n") == 1 and "unsupported architecture 'llama'" in err
    for fam in FAMILIES:
        assert fam in err


def test_supported_family_without_moe_layers_is_refused(tmp_path):
    save_tiny("qwen2_moe", tmp_path / "dense", mlp_only_layers=[0, 1, 2])
    with pytest.raises(MoescopeError, match="no MoE layers"):
        load_moe(str(tmp_path / "dense"))


def test_missing_and_unreachable_sources(tmp_path, capsys):
    for source, match in [
        (str(tmp_path / "nope"), "not found"),
        ("some-org/some-moe-model", "hub did not provide it"),
    ]:
        rc, _, err = run_cli(capsys, "info", source)
        assert rc == 2 and match in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoescopeError, match="without config.json"):
        load_moe(str(tmp_path / "empty"))


def test_remote_code_is_off_unless_asked(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom_moe", "architectures": ["MyCustomMoE"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }))
    with pytest.raises(MoescopeError) as err:
        load_moe(str(folder))
    assert "--trust-remote-code" in str(err.value)


def test_weights_are_loaded_in_the_requested_dtype(tiny_dirs):
    model = load_moe(tiny_dirs["mixtral"], dtype="bfloat16")
    assert next(model.hf.parameters()).dtype == torch.bfloat16
    with pytest.raises(MoescopeError, match="unknown dtype"):
        load_moe(tiny_dirs["mixtral"], dtype="float8")


def test_a_folder_without_tokenizer_files_has_no_tokenizer(tiny_dirs, capsys, tmp_path, monkeypatch):
    model = load_moe(tiny_dirs["mixtral"])
    assert model.tokenizer is None
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    rc = main(["analyze", tiny_dirs["mixtral"], "--samples", "2", "--seq-len", "16"])
    assert rc == 2 and "has no tokenizer files; pass --tokenizer" in capsys.readouterr().err


def test_dashboard_command_keeps_demo_even_beside_a_demo_folder(monkeypatch, tmp_path):
    import os

    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(os, "execv", lambda exe, cmd: seen.setdefault("cmd", cmd))
    # a free port (8501 may hold a dashboard the README started): the port check must pass
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    assert main(["dashboard", "demo", "--port", str(port)]) == 0
    cmd = seen["cmd"]
    assert cmd[-2:] == ["--model", "demo"]
    assert cmd[cmd.index("--server.address") + 1] == "localhost"


def test_device_auto_places_the_model_with_accelerate_and_changes_no_number(tmp_path, monkeypatch):
    """``--device auto`` (accelerate's device map, for several GPUs) on a machine without one puts
    every module on the CPU through the same placement code: analysis, enumeration and perplexity
    give the numbers of a plain CPU load."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.measure.capture import LayerStream
    from moescope.analysis.measure.sensitivity import enumerate_layer, perplexity

    auto, cpu = load_moe("demo", device="auto"), load_moe("demo")
    # without a GPU the map puts everything on the CPU (transformers records a map only when it splits)
    assert set(getattr(auto.hf, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {p.device.type for p in auto.hf.parameters()} == {"cpu"}
    batch = sample_tokens("demo:all", cpu.tokenizer, 2, 64, seed=0)
    params = AnalysisParams(metrics=("routing", "similarity", "activations"))
    a = run_analysis(auto, batch, params, cache=Cache(tmp_path / "a"))
    c = run_analysis(cpu, batch, params, cache=Cache(tmp_path / "c"))
    for name in ("cka_linear", "cosine"):
        torch.testing.assert_close(a.similarity(1, name), c.similarity(1, name))
    torch.testing.assert_close(a.criterion(1, "REAP"), c.criterion(1, "REAP"), equal_nan=True)  # NaN: an unused expert
    xs = [next(h for l, h in LayerStream(m, batch.input_ids).layers() if l == 1) for m in (auto, cpu)]
    assert enumerate_layer(auto.layers[1], xs[0], 4).keep == enumerate_layer(cpu.layers[1], xs[1], 4).keep
    assert perplexity(auto, batch.input_ids) == pytest.approx(perplexity(cpu, batch.input_ids), rel=1e-6)
