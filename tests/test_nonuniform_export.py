"""Plans whose MoE layers keep different expert counts export to a folder that plain transformers
loads with ``trust_remote_code=True`` (in a process where moescope cannot be imported) and that
moescope loads without it, with the in-memory pruned model's logits, for every family."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.synthetic import TINY_CONFIGS, tiny_model
from moescope.analysis.model.vllm_plugin import SERVED_FAMILIES
from moescope.analysis.pruning.plan import LayerPlan, PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.export import export
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

FAMILIES = sorted(TINY_CONFIGS)
MERGE = (0.3, 0.7)


def uneven_plan(model) -> PruningPlan:
    """First MoE layer: drop expert 1 of every routing group and merge the next two kept ones
    (0.3 · third + 0.7 · first, router rows too); second MoE layer: drop expert 1 of every routing
    group. Any further MoE layer stays as it is. Routing groups keep equal sizes (DeepSeek-V3)."""
    assert len(model.moe_layers) >= 2, f"{model.family.name}: the tiny config needs two MoE layers"
    layers = {}
    for p, l in enumerate(model.moe_layers[:2]):
        view = model.layers[l]
        n_group = view.router_params.n_group
        per = view.num_experts // n_group
        groups, coeffs = [], []
        for g in range(n_group):
            kept = [e for e in range(g * per, (g + 1) * per) if e != g * per + 1]
            if p == 0:
                groups += [[kept[1], kept[0]]] + [[e] for e in kept[2:]]
                coeffs += [list(MERGE)] + [[1.0]] * (len(kept) - 2)
            else:
                groups += [[e] for e in kept]
                coeffs += [[1.0]] * len(kept)
        layers[l] = LayerPlan(groups, coeffs)
    return PruningPlan(model.source, layers, provenance={"strategy": "manual"})


def input_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: the original model, the pruned in-memory model, its logits, the exported folder."""
    root = tmp_path_factory.mktemp("uneven")
    out = {}
    for fam in FAMILIES:
        original = tiny_model(fam)
        model = wrap_model(copy.deepcopy(original), source=fam)
        plan = uneven_plan(model)
        apply(model, plan)
        with torch.no_grad():
            expected = model.hf(input_ids=input_ids()).logits
        # a family moescope's vLLM plugin does not serve exports for transformers only, when asked
        folder = export(model, root / fam, transformers_only=fam not in SERVED_FAMILIES)
        out[fam] = {"original": original, "model": model, "plan": plan, "logits": expected, "folder": folder}
    return out


def test_counts_differ_and_the_folder_says_so(exported):
    for fam, e in exported.items():
        model, folder = e["model"], e["folder"]
        counts = model.num_experts()
        assert len(set(counts.values())) > 1, fam
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["moescope_num_experts_per_layer"] == {str(i): n for i, n in counts.items()}, fam
        assert cfg[model.family.num_experts_key] == max(counts.values())
        cls = cfg["auto_map"]["AutoModelForCausalLM"]
        assert cls == f"modeling_moescope.Moescope{cfg['moescope_moe_layout']['base_class']}", fam
        assert cfg["architectures"] == [cls.split(".")[1]]
        source = (folder / "modeling_moescope.py").read_text()
        assert "moescope." not in source.replace("modeling_moescope", "") and "import moescope" not in source
        card = (folder / "README.md").read_text()
        assert "trust_remote_code=True" in card and "pretrained=PATH,trust_remote_code=True" in card
        for i, n in counts.items():
            assert f"| {i} | {n} |" in card, (fam, i)


def test_weights_are_the_real_per_layer_tensors(exported):
    """No padding: the files hold exactly the pruned model's numbers of values; the router rows
    written are the original rows kept, and 0.3 · row a + 0.7 · row b for the merged expert."""
    for fam, e in exported.items():
        model, folder, original = e["model"], e["folder"], wrap_model(e["original"])
        stored = sum(t.numel() for f in folder.glob("model*.safetensors") for t in load_file(str(f)).values())
        assert stored == sum(t.numel() for t in model.hf.state_dict().values()), fam
        reloaded = load_moe(str(folder))
        for l, lp in e["plan"].layers.items():
            w = original.layers[l].router_weight
            naive = torch.stack([sum(c * w[g] for g, c in zip(gr, co, strict=True))
                                 for gr, co in zip(lp.groups, lp.coefficients, strict=True)])
            torch.testing.assert_close(reloaded.layers[l].router_weight, naive, rtol=0, atol=1e-6)
            assert reloaded.layers[l].num_experts == lp.num_out


def test_moescope_loads_its_export_without_trust_remote_code(exported):
    for fam, e in exported.items():
        loaded = load_moe(str(e["folder"]))  # trust_remote_code=False
        assert loaded.num_experts() == e["model"].num_experts(), fam
        with torch.no_grad():
            got = loaded.hf(input_ids=input_ids()).logits
        torch.testing.assert_close(got, e["logits"], rtol=0, atol=1e-5, msg=fam)
        shapes = load_moe(str(e["folder"]), weights=False)  # meta build from the config alone
        assert shapes.num_experts() == e["model"].num_experts(), fam


CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.extend(json.loads(sys.argv[1]))
    assert importlib.util.find_spec("moescope") is None, "moescope is importable"
    assert importlib.util.find_spec("analysis") is None, "the repo's analysis folder is importable"
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[2]))
    report = {}
    for fam, folder in json.loads(sys.argv[3]).items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            save_file({"logits": model(input_ids=ids).logits.contiguous()}, folder + "/child_logits.safetensors")
        report[fam] = type(model).__module__
    assert not any(name.split(".")[0] == "moescope" for name in sys.modules)
    print(json.dumps(report))
""")


def test_plain_transformers_loads_it_with_trust_remote_code_without_moescope(exported, tmp_path):
    """One fresh ``python -I -S`` process, whose path is the standard library plus the
    site-packages folders (without running their .pth files, so moescope's editable install is
    not importable, which the child asserts), loads every family's folder through auto_map."""
    site_dirs = sorted({str(Path(p)) for p in sys.path if p.rstrip("/").endswith("site-packages")})
    folders = {fam: str(e["folder"]) for fam, e in exported.items()}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(site_dirs), json.dumps(input_ids().tolist()),
         json.dumps(folders)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for fam, e in exported.items():
        assert report[fam].startswith("transformers_modules.") and report[fam].endswith(".modeling_moescope"), fam
        got = load_file(str(e["folder"] / "child_logits.safetensors"))["logits"]
        torch.testing.assert_close(got, e["logits"], rtol=0, atol=1e-5, msg=fam)


def test_without_trust_remote_code_plain_transformers_refuses(exported):
    folder = exported[FAMILIES[0]]["folder"]
    with pytest.raises(RuntimeError, match="mismatched_sizes|size mismatch"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_evened_out_reexport_is_the_plain_class_again(exported, tmp_path):
    """A loaded per-layer export pruned to equal counts saves as the plain family folder."""
    e = exported[FAMILIES[0]]
    model = load_moe(str(e["folder"]))
    n = min(model.num_experts().values())
    for l in model.moe_layers:  # the first n / n_group experts of every routing group
        view = model.layers[l]
        n_group, per = view.router_params.n_group, view.num_experts // view.router_params.n_group
        model.keep(l, [g * per + i for g in range(n_group) for i in range(n // n_group)])
    with torch.no_grad():
        expected = model.hf(input_ids=input_ids()).logits
    out = model.save(tmp_path / "even")
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and not (out / "modeling_moescope.py").exists()
    assert not any(k.startswith("moescope_") for k in cfg)
    assert cfg["architectures"] == [type(e["original"]).__name__]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__module__.startswith("transformers.")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=input_ids()).logits, expected)


def test_bad_per_layer_config_is_one_line(exported, tmp_path):
    folder = exported[FAMILIES[0]]["folder"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moescope_moe_layout"]["base_class"] = "NoSuchForCausalLM"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoescopeError, match="re-export"):
        load_moe(str(bad))


@pytest.mark.slow
def test_lm_eval_cli_scores_the_export_as_moescope_scores_the_pruned_model(demo_dir, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` on a demo export
    with 7/8/6/8 experts gives the perplexity moescope's in-process lm-eval run gives the pruned model."""
    from moescope.analysis.evaluation import LOCAL_TASKS_DIR, run_tasks

    model = load_moe("demo")
    apply(model, PruningPlan.from_drop(model, {0: [3], 2: [1, 5]}))
    assert len(set(model.num_experts().values())) > 1
    task, limit = "moescope_demo_ppl_python", 1
    expected = run_tasks(model, [task], limit=limit, batch_size=1)[task]
    folder = export(model, tmp_path / "demo_uneven")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", task, "--include_path",
         str(LOCAL_TASKS_DIR), "--limit", str(limit), "--batch_size", "1", "--output_path", str(tmp_path / "res")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"][task]
    assert results["word_perplexity,none"] == pytest.approx(expected["word_perplexity"], rel=1e-5)
    assert results["bits_per_byte,none"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)
