"""grid / plan / prune from the command line, on the demo model and a tokenizer-less folder."""

from __future__ import annotations

import json

import pytest
import torch
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run.cli import main
from transformers import AutoModelForCausalLM


def run(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))


def test_grid_json_has_baseline_and_a_row_per_layer(capsys, demo_dir):
    rc, out, err = run(capsys, "grid", "demo", "--eval", "demo:python", "--samples", "2", "--seq-len", "64", "--json")
    assert rc == 0, err
    grid = json.loads(out)
    assert grid["layers"] == [0, 1, 2, 3] and [len(r) for r in grid["ppl"]] == [8, 8, 8, 8]
    assert grid["baseline"] > 1 and all(p > 0 for r in grid["ppl"] for p in r)
    rc, out2, _ = run(capsys, "grid", "demo", "--eval", "demo:python", "--samples", "2", "--seq-len", "64", "--json")
    assert json.loads(out2)["ppl"] == grid["ppl"]  # served from the cache


def test_plan_then_prune_then_reload(capsys, demo_dir, tmp_path):
    plan_path = tmp_path / "plan.json"
    rc, out, err = run(capsys, "plan", "demo", "--strategy", "enumerate", "--keep", "6", "--samples", "4",
                       "--seq-len", "64", "-o", str(plan_path), "--json")
    assert rc == 0, err
    plan = PruningPlan.load(plan_path)
    assert plan.provenance["strategy"] == "enumerate:layer-wise" and len(plan.layers) == 4
    out_dir = tmp_path / "pruned"
    rc, out, err = run(capsys, "prune", "demo", "--plan", str(plan_path), "-o", str(out_dir), "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["experts"] == {str(i): 6 for i in range(4)}
    assert result["params_after"]["total"] < result["params_before"]["total"]
    assert (out_dir / "plan.json").is_file() and (out_dir / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.num_local_experts == 6
    # a non-empty output folder is refused in one line, and nothing in it is touched
    rc, _, err = run(capsys, "prune", "demo", "--plan", str(plan_path), "-o", str(out_dir))
    assert rc == 2 and "not empty" in err and "Traceback" not in err
    assert (out_dir / "plan.json").is_file()


def test_manual_plan_and_a_folder_without_tokenizer(capsys, tiny_dirs, tmp_path):
    plan_path = tmp_path / "manual.json"
    rc, _, err = run(capsys, "plan", tiny_dirs["mixtral"], "--strategy", "manual", "--drop", "0:1,3;1:2,7",
                     "-o", str(plan_path))
    assert rc == 0, err
    rc, _, err = run(capsys, "plan", tiny_dirs["mixtral"], "--strategy", "manual", "--drop", "0:1,3;1:2,7,0",
                     "-o", str(plan_path))
    assert rc == 0
    rc, _, err = run(capsys, "prune", tiny_dirs["mixtral"], "--plan", str(plan_path), "-o", str(tmp_path / "out2"))
    assert rc == 0, err  # 6 and 5 experts: per-layer counts, loaded with trust_remote_code=True
    uneven = AutoModelForCausalLM.from_pretrained(tmp_path / "out2", trust_remote_code=True)
    assert [layer.mlp.experts.num_experts for layer in uneven.model.layers] == [6, 5]
    rc, _, err = run(capsys, "plan", tiny_dirs["mixtral"], "--strategy", "manual", "--drop", "0:1,3;1:2,7",
                     "-o", str(plan_path))
    rc, _, err = run(capsys, "prune", tiny_dirs["mixtral"], "--plan", str(plan_path), "-o", str(tmp_path / "out3"))
    assert rc == 0, err
    assert not (tmp_path / "out3" / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out3")
    assert reloaded.config.num_local_experts == 6
    with torch.no_grad():
        reloaded(input_ids=torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("argv, match", [
    (["plan", "demo", "--strategy", "nope", "-o", "x.json"], "unknown strategy 'nope'"),
    (["plan", "demo", "--strategy", "frequency", "--keep", "1", "-o", "x.json", "--samples", "2", "--seq-len", "32"],
     "between top-k"),
    (["plan", "demo", "--strategy", "manual", "--drop", "zero:1", "-o", "x.json"], "--drop expects"),
    (["prune", "demo", "--plan", "missing.json", "-o", "out"], "not found"),
    (["grid", "demo", "--eval", "demo:klingon"], "unknown"),
])
def test_cli_mistakes_are_one_line(capsys, argv, match, demo_dir):
    rc, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("moescope:")]
    assert rc == 2 and len(errors) == 1 and match in errors[0] and "Traceback" not in err, err
