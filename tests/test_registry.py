"""Adding a strategy is one file: the README's example, registered here, is found by the CLI (its
flags and `moescope strategies --json`) and by the Plan page, and refused requests fail in one
line before any weights are read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from moescope.analysis.model import load_moe
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.run.cli import main
from moescope.analysis.strategies import STRATEGIES

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def toy_strategy():
    """Register the README's 'Extending' example exactly as written, and unregister it after."""
    text = README.read_text(encoding="utf-8").split("## Extending", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README-example", "exec"), {"__name__": "readme_example"})
    assert "router-norm" in STRATEGIES
    yield STRATEGIES["router-norm"]
    del STRATEGIES["router-norm"]


def smallest_router_norms(keep: int) -> dict[int, list[int]]:
    """Computed independently: per layer, the experts with the ``keep`` smallest router-row norms."""
    from moescope.analysis.core.paths import demo_model_dir
    from safetensors.torch import load_file

    weights = load_file(demo_model_dir() / "model.safetensors")
    out = {}
    for name, w in weights.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight", name)
        if m:
            norms = [float(r.double().norm()) for r in w]
            out[int(m.group(1))] = sorted(sorted(range(len(norms)), key=lambda e: (norms[e], e))[:keep])
    return out


def run(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_new_strategy_file_reaches_the_cli(toy_strategy, capsys, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "cache"))
    rc, out, err = run(capsys, "strategies", "--json")
    assert rc == 0, err
    listed = {s["name"]: s for s in json.loads(out)}
    assert {"random", "frequency", "criterion", "enumerate", "merge", "router-guided", "manual", "skip",
            "lottery", "router-norm"} <= set(listed)
    toy = listed["router-norm"]
    assert toy["needs_data"] is False and toy["budget"] is True and toy["merges"] is False
    assert {"name": "largest", "type": "bool", "default": True, "choices": None,
            "help": "keep the largest norms (else the smallest)"} in toy["params"]
    assert [p["name"] for p in toy["params"]] == ["keep", "budget", "with_skip", "largest"]

    path = tmp_path / "plan.json"
    rc, _, err = run(capsys, "plan", "demo", "--strategy", "router-norm", "--keep", "6", "--no-largest",
                     "-o", str(path))
    assert rc == 0, err
    plan = PruningPlan.load(path)
    assert {l: lp.kept() for l, lp in plan.layers.items()} == smallest_router_norms(6)
    assert plan.provenance["strategy"] == "router-norm" and plan.provenance["params"] == {"keep": 6, "largest": False}


@pytest.mark.parametrize("argv, match", [
    (["--strategy", "frequency", "--param", "nonsense=1"],
     "unknown parameter of strategy 'frequency' 'nonsense'. Available: budget, keep, with_skip"),
    (["--strategy", "enumerate", "--keep", "1"], "keep=1 is not possible in layer 0: it must be between top-k (2)"),
    (["--strategy", "lottery", "--budget", "20"], "lottery needs a uniform target"),
    (["--strategy", "enumerate", "--budget", "60"], "budget=60 is not possible: it must be between 8"),
    (["--strategy", "frequency", "--order", "min", "--keep", "6"], "unknown parameter of strategy 'frequency' 'order'"),
    (["--strategy", "criterion", "--keep", "6", "--param", "mode=sideways"], "mode must be one-shot or iterative"),
    (["--strategy", "random", "--keep", "6", "--param", "seed=\"a\""], "parameter seed must be int"),
    (["--strategy", "router-norm", "--keep", "6", "--param", "largest=3"], "parameter largest must be bool"),
])
def test_bad_requests_fail_in_one_line_before_weights_load(toy_strategy, capsys, demo_dir, tmp_path, monkeypatch,
                                                           argv, match):
    from transformers import AutoModelForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the request was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    rc, _, err = run(capsys, "plan", "demo", *argv, "-o", str(tmp_path / "p.json"))
    lines = [line for line in err.splitlines() if line.startswith("moescope:")]
    assert rc == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "p.json").exists()


def test_a_new_strategy_file_reaches_the_plan_page(toy_strategy, demo_dir, tmp_path, monkeypatch):
    from moescope.analysis.core.cache import ENV_VAR
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("app_pages/plan.py").run()
    at.selectbox(key="plan_strategy").select("router-norm").run()
    assert "router-norm" in at.selectbox(key="plan_strategy").options
    assert any(c.value.startswith("Keep the experts whose router rows") for c in at.caption)
    largest = at.checkbox(key="plan_router-norm_largest")
    assert largest.label == "Largest" and largest.value is True  # the declared default
    largest.uncheck().run()
    at.number_input(key="plan_keep").set_value(5).run()
    at.button(key="plan_make").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    plan = at.session_state["plan"]
    assert plan["provenance"]["params"] == {"keep": 5, "largest": False}
    assert {int(l): sorted(g[0] for g in v["groups"]) for l, v in plan["layers"].items()} == smallest_router_norms(5)
    # the loaded demo model agrees with the file-level computation
    model = load_moe("demo")
    norms = model.layers[0].router_weight.double().norm(dim=1)
    assert sorted(torch.argsort(norms)[:5].tolist()) == smallest_router_norms(5)[0]


def test_every_registered_strategy_gets_its_declared_widgets(demo_dir, tmp_path, monkeypatch):
    from moescope.analysis.core.cache import ENV_VAR
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("app_pages/plan.py").run()
    for name, strategy in STRATEGIES.items():
        if strategy.manual:
            assert name not in at.selectbox(key="plan_strategy").options
            continue
        at.selectbox(key="plan_strategy").select(name).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        keys = {w.key for kind in ("selectbox", "checkbox", "number_input") for w in at.get(kind)}
        # every declared parameter that acts with the defaults has its widget; one that acts only with
        # other choices (Param.when) has none until they are made
        defaults = {p.name: p.default for p in strategy.params}
        acting = [p for p in strategy.params if p.when is None or p.when(defaults)]
        declared = {f"plan_{name}_{p.name}" for p in acting if p.type is not dict}
        assert declared <= keys, (name, declared - keys)
        hidden = {f"plan_{name}_{p.name}" for p in strategy.params if p not in acting}
        assert not hidden & keys, (name, hidden & keys)
        assert ("plan_keep" in keys) == strategy.target
