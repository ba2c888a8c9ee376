"""Issue 12, hostile inputs: every bad input the CLI can be fed ends in exit status 2, exactly one
line on stderr (``moescope: error: ...``), no traceback and no file written anywhere (the output
path, the work folder, the cache). Also: ``cache ls`` / ``cache clear --damaged`` on damaged
entries, the error line after progress bars, and ``dashboard --trust-remote-code``.

The bad inputs run ``moescope.analysis.run.cli.main`` in this process (a real process each would cost
~8 s of imports per case; the kills in ``test_faults.py`` use real processes). What a real process
would print is collected: fd-level stderr (capfd), Python warnings (recorded and counted as stderr
lines, as an interpreter would print them), and an exception escaping ``main`` (its traceback).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import pytest
from moescope.analysis.core.cache import ENV_VAR, Cache
from moescope.analysis.core.paths import demo_model_dir
from moescope.analysis.run.cli import main
from moescope.analysis.run.report import ProgressBars

DEMO_LAYERS, DEMO_EXPERTS, DEMO_MAX_POS = 4, 8, 512  # demo/model/config.json


# ---- running the CLI as a process would ---------------------------------------------------------
def cli(capfd, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``moescope ARGV`` as a separate process would show them."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            rc = main(list(argv))
        except SystemExit as exit_:  # argparse
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print, then exit 1
            rc, tb = 1, traceback.format_exc()
        else:
            tb = ""
    out, err = capfd.readouterr()
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown) + tb
    return rc, out, err


def files_under(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


def assert_refused(capfd, *argv: str, watch: tuple[Path, ...], says: tuple[str, ...] = ()) -> str:
    """``moescope ARGV`` exits 2 with one clean stderr line (no traceback) and writes no file under
    ``watch``; the line mentions each of ``says`` (case-insensitive). Returns the line."""
    before = files_under(*watch)
    rc, out, err = cli(capfd, *argv)
    lines = err.splitlines()
    assert "Traceback" not in err, f"moescope {' '.join(argv)} printed a traceback:\n{err}"
    assert rc == 2, f"moescope {' '.join(argv)} exited {rc}, expected 2\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("moescope: error: ") and "\x1b" not in lines[0], repr(lines[0])
    for word in says:
        assert word.lower() in lines[0].lower(), f"the error should mention {word!r}: {lines[0]}"
    written = files_under(*watch) - before
    assert not written, f"moescope {' '.join(argv)} wrote {sorted(written)}"
    return lines[0]


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, str(root))
        yield root


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    """Copies of the demo model folder, each broken in one way (tokenizer and config kept)."""
    root = tmp_path_factory.mktemp("bad-models")
    demo = demo_model_dir()
    weights = (demo / "model.safetensors").read_bytes()

    def folder(name: str, config: dict | None = None, weights_file: tuple[str, bytes] | None = None) -> Path:
        d = root / name
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(demo / f, d / f)
        cfg = json.loads((demo / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
        if weights_file is not None:
            (d / weights_file[0]).write_bytes(weights_file[1])
        return d

    import torch
    from safetensors.torch import load_file

    state = load_file(demo / "model.safetensors")
    pickled = root / "state.bin"
    torch.save(state, pickled)
    out = {
        "truncated": folder("truncated", weights_file=("model.safetensors", weights[: len(weights) // 2])),
        "random": folder("random", weights_file=("model.safetensors", os.urandom(4096))),
        "sizes": folder("sizes", config={"intermediate_size": 128},
                        weights_file=("model.safetensors", weights)),  # weights hold 256
        "pickle": folder("pickle", weights_file=("pytorch_model.bin", pickled.read_bytes())),
    }
    pickled.unlink()
    # a pickle whose loading would run code: it would create the file named here
    marker = root / "PAYLOAD-RAN"
    out["payload"] = folder("payload", weights_file=("pytorch_model.bin", pickle.dumps(_Payload(str(marker)))))
    out["payload_marker"] = marker
    empty = root / "empty-config"
    empty.mkdir()
    (empty / "config.json").write_text("")
    out["empty_config"] = empty
    return out


class _Payload:
    """Harmless stand-in for a malicious pickle: unpickling it creates an empty file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plan_file(folder: Path, name: str, layers: dict, base_model: str = "demo") -> Path:
    path = folder / name
    path.write_text(json.dumps({"version": 1, "base_model": base_model, "layers": layers}))  # NaN/Infinity allowed
    return path


def uniform(groups, coefficients=None) -> dict:
    lp = {"groups": groups} if coefficients is None else {"groups": groups, "coefficients": coefficients}
    return {str(l): lp for l in range(DEMO_LAYERS)}


KEEP6 = [[0], [1], [2], [3], [4], [5]]


@pytest.fixture
def work(tmp_path, cache_root) -> tuple[Path, tuple[Path, ...]]:
    """A work folder and the folders no refused command may write to."""
    (tmp_path / "work").mkdir()
    Cache(cache_root)  # its .tmp exists before the snapshot
    return tmp_path / "work", (tmp_path / "work", cache_root)


# ---- broken model folders -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["truncated", "random", "sizes"])
def test_broken_weights_or_config_are_one_line_naming_the_file(capfd, work, bad_models, case):
    folder, watch = work
    line = assert_refused(capfd, "analyze", str(bad_models[case]), "--samples", "2", "--seq-len", "32",
                          "--metrics", "routing", watch=(*watch, bad_models[case]))
    assert str(bad_models[case]) in line or "model.safetensors" in line or "config.json" in line, line
    if case == "sizes":  # the tensors that differ, with both shapes (the config says 128, the weights 256)
        assert "config.json" in line and "[8, 128, 256] in the checkpoint, [8, 128, 128] by the config" in line, line


def test_pickle_only_folder_is_refused_with_how_to_convert(capfd, work, bad_models):
    folder, watch = work
    assert_refused(capfd, "analyze", str(bad_models["pickle"]), "--samples", "2", "--seq-len", "32",
                   "--metrics", "routing", watch=(*watch, bad_models["pickle"]), says=("safetensors",))


def test_pickle_payload_never_runs(capfd, work, bad_models):
    folder, watch = work
    cli(capfd, "info", str(bad_models["payload"]))  # config only: may succeed, must not unpickle
    assert not bad_models["payload_marker"].exists(), "the pickle payload ran"
    assert_refused(capfd, "analyze", str(bad_models["payload"]), "--samples", "2", "--seq-len", "32", "--metrics",
                   "routing", watch=(*watch, bad_models["payload"]), says=("pickle",))
    assert not bad_models["payload_marker"].exists(), "the pickle payload ran"


def test_info_on_an_empty_config_json(capfd, work, bad_models):
    folder, watch = work
    assert_refused(capfd, "info", str(bad_models["empty_config"]), watch=(*watch, bad_models["empty_config"]),
                   says=("config.json",))


# ---- paths --------------------------------------------------------------------------------------
def test_plan_pointing_at_a_folder(capfd, work):
    folder, watch = work
    assert_refused(capfd, "prune", "demo", "--plan", str(folder), "-o", str(folder / "out"), watch=watch)


def test_output_under_an_existing_file(capfd, work):
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    (folder / "file.txt").write_text("not a folder")
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "file.txt" / "out"), watch=watch)


def test_overwrite_refuses_a_folder_moescope_did_not_write(capfd, work):
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    mine = folder / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(mine), "--overwrite", watch=watch)
    assert (mine / "thesis.tex").read_text() == "precious"


# ---- plans --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -5.0], ids=["nan", "inf", "negative"])
def test_merge_coefficients_must_be_finite_and_non_negative(capfd, work, bad):
    folder, watch = work
    groups = [[0, 1], [2], [3], [4], [5], [6, 7]]
    plan = plan_file(folder, "plan.json", uniform(groups, [[bad, 0.5], [1.0], [1.0], [1.0], [1.0], [0.5, 0.5]]))
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("coefficient",))


def test_plan_for_another_model_is_refused_without_force(capfd, work):
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model="mistralai/Mixtral-8x7B-v0.1")
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("Mixtral-8x7B",))


def test_plan_changing_some_layers_is_exported_whole_or_refused_before_loading(capfd, work, bad_models):
    """Layers 0 and 2 keep 6 experts, 1 and 3 keep all 8: either a complete export (the non-uniform
    form) or a refusal that comes from checking the plan against the config, before any weights are
    read (so a folder with broken weights gets the plan's error, not the weights')."""
    folder, watch = work
    partial = plan_file(folder, "plan.json", {"0": {"groups": KEEP6}, "2": {"groups": KEEP6}})
    rc, out, err = cli(capfd, "prune", "demo", "--plan", str(partial), "-o", str(folder / "out"))
    assert "Traceback" not in err, err
    if rc == 0:
        from moescope.analysis.model import load_moe

        exported = load_moe(str(folder / "out"))
        assert exported.num_experts() == {0: 6, 1: DEMO_EXPERTS, 2: 6, 3: DEMO_EXPERTS}
        assert (folder / "out" / "plan.json").is_file()
        return
    assert_refused(capfd, "prune", "demo", "--plan", str(partial), "-o", str(folder / "out"), watch=watch)
    broken = plan_file(folder, "plan-b.json", {"0": {"groups": KEEP6}, "2": {"groups": KEEP6}},
                       base_model=str(bad_models["random"]))
    line = assert_refused(capfd, "prune", str(bad_models["random"]), "--plan", str(broken), "-o",
                          str(folder / "out"), watch=watch)
    assert "model.safetensors" not in line, f"the weights were read before the plan was checked: {line}"


def test_force_applies_another_models_plan_records_it_and_overwrite_replaces_only_moescope_folders(
        capfd, work, tmp_path):
    """--force: exit 0, the override in plan.json's provenance and the card naming the real base;
    a stale temporary sibling of a dead writer is swept; --overwrite replaces that (marked) folder."""
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model="mistralai/Mixtral-8x7B-v0.1")
    out = folder / "out"
    stale = folder / ".out.moescope-tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "config.json").write_text("")
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--force")
    assert rc == 0, err
    saved = json.loads((out / "plan.json").read_text())
    assert saved["base_model"] == "demo"
    assert saved["provenance"]["forced"]["plan_base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert saved["provenance"]["forced"]["applied_to"] == "demo"
    card = (out / "README.md").read_text()
    assert "Base model: `demo`" in card and "Mixtral-8x7B" not in card
    assert sorted(p.name for p in folder.iterdir()) == ["out", "plan.json"]  # the stale sibling is gone
    assert (out / ".moescope-export").is_file()
    (out / "leftover.txt").write_text("from the first export")
    plan = plan_file(folder, "plan.json", uniform([[0], [1], [2], [3]]))
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--overwrite")
    assert rc == 0, err
    assert not (out / "leftover.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["out", "plan.json"]


def test_plan_made_for_other_weights_is_refused_by_fingerprint(capfd, work):
    folder, watch = work
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"version": 1, "base_model": "demo", "layers": uniform(KEEP6),
                                "provenance": {"strategy": "frequency", "model_fingerprint": "0" * 64}}))
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("fingerprint", "--force"))


def test_only_learned_merges_may_have_negative_coefficients():
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.pruning.plan import PruningPlan

    layers = {"0": {"groups": [[0, 1], [2]], "coefficients": [[1.3, -0.2], [1.0]]}}
    learned = PruningPlan.from_json({"version": 1, "base_model": "demo", "layers": layers,
                                     "provenance": {"strategy": "merge", "params": {"merge": "learned"}}})
    assert learned.layers[0].coefficients == [[1.3, -0.2], [1.0]]
    with pytest.raises(MoescopeError, match="-0.2 is negative"):
        PruningPlan.from_json({"version": 1, "base_model": "demo", "layers": layers,
                               "provenance": {"strategy": "merge", "params": {"merge": "uniform"}}})
    with pytest.raises(MoescopeError, match="sum to 0"):
        PruningPlan.from_json({"version": 1, "base_model": "demo",
                               "layers": {"0": {"groups": [[0, 1]], "coefficients": [[0, 0]]}}})


def test_allow_pickle_is_the_only_way_to_load_pickled_weights(capfd, work, bad_models):
    """The pickle-only folder (a plain state dict, no payload) exports with --allow-pickle, as
    safetensors, with the same weights."""
    import torch
    from safetensors.torch import load_file

    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model=str(bad_models["pickle"]))
    rc, _, err = cli(capfd, "prune", str(bad_models["pickle"]), "--plan", str(plan), "-o", str(folder / "out"),
                     "--allow-pickle")
    assert rc == 0, err
    got = load_file(folder / "out" / "model.safetensors")
    want = load_file(demo_model_dir() / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])


# ---- sample / sequence settings -----------------------------------------------------------------
COMMANDS = {
    "analyze": ["analyze", "{model}", "--metrics", "routing"],
    "grid": ["grid", "{model}"],
    "plan": ["plan", "{model}", "--strategy", "frequency", "--keep", "6", "-o", "{work}/plan.json"],
    "eval": ["eval", "{model}", "--ppl", "demo:all", "--no-efficiency"],
    "prune": ["prune", "{model}", "--plan", "{work}/keep6.json", "-o", "{work}/out", "--ppl", "demo:all",
              "--no-efficiency"],
}


def command(name: str, model: str, work: Path, *extra: str) -> list[str]:
    plan_file(work, "keep6.json", uniform(KEEP6), base_model=model)
    return [a.format(model=model, work=work) for a in COMMANDS[name]] + list(extra)


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("setting", [("--samples", "0"), ("--samples", "-3"), ("--seq-len", "0")],
                         ids=["samples0", "samples-3", "seqlen0"])
def test_non_positive_samples_or_seq_len_refused_before_weights_load(capfd, work, bad_models, name, setting):
    """Run against a folder whose weights are random bytes: the refusal must name the setting, not
    the weights, which shows it came before they were read."""
    folder, watch = work
    argv = command(name, str(bad_models["random"]), folder, "--samples", "2", "--seq-len", "32", *setting)
    line = assert_refused(capfd, *argv, watch=(*watch, bad_models["random"]), says=(setting[0].lstrip("-"),))
    assert "safetensors" not in line, line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_seq_len_beyond_max_position_embeddings(capfd, work, name):
    folder, watch = work
    argv = command(name, "demo", folder, "--samples", "2", "--seq-len", str(DEMO_MAX_POS + 88))
    assert_refused(capfd, *argv, watch=watch, says=(str(DEMO_MAX_POS),))


# ---- cache ls / clear --damaged -----------------------------------------------------------------
def _entry(cache: Cache, label: str, n: int):
    import torch

    return cache.put("faulttest", {"n": n}, tensors={"x": torch.arange(1000, dtype=torch.float32) + n},
                     meta={"model_source": "demo"}, label=label)


def test_cache_ls_marks_damaged_entries_and_clear_damaged_removes_only_them(capfd, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    cache = Cache(tmp_path / "c")
    good, short, flipped, garbled, nomanifest = (_entry(cache, name, i) for i, name in
                                                 enumerate(["good", "short", "flipped", "garbled", "nomanifest"]))
    t = short.path / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:-10])  # size differs from the manifest
    t = flipped.path / "tensors.safetensors"
    data = bytearray(t.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only a checksum finds it
    t.write_bytes(bytes(data))
    (garbled.path / "meta.json").write_text("{not json")
    (nomanifest.path / "manifest.json").unlink()

    rc, out, err = cli(capfd, "cache", "ls", "--json")
    assert rc == 0, err
    status = {Path(e["path"]).name: (e["status"], e["problem"]) for e in json.loads(out)}
    assert len(status) == 5  # the garbled one is listed, not silently left out
    assert status[good.path.name] == ("ok", None)
    assert status[flipped.path.name] == ("ok", None)  # quick check: sizes only
    assert status[short.path.name][0] == "damaged" and "bytes" in status[short.path.name][1]
    assert status[garbled.path.name][0] == "damaged" and "meta.json" in status[garbled.path.name][1]
    assert status[nomanifest.path.name][0] == "damaged" and "manifest.json" in status[nomanifest.path.name][1]

    rc, out, err = cli(capfd, "cache", "ls", "--json", "--verify")
    status = {Path(e["path"]).name: (e["status"], e["problem"]) for e in json.loads(out)}
    assert status[flipped.path.name][0] == "damaged" and "sha256" in status[flipped.path.name][1]
    assert status[good.path.name] == ("ok", None)

    rc, out, err = cli(capfd, "cache", "ls")
    assert rc == 0 and out.count("damaged") >= 3 and "cache clear --damaged" in out, out
    assert f"faulttest/{garbled.path.name}: meta.json" in out, out

    rc, out, err = cli(capfd, "cache", "clear", "--damaged")
    assert rc == 0 and "removed 3 damaged cache entries" in out, out
    assert sorted(p.name for p in (cache.root / "faulttest").iterdir() if not p.name.startswith(".")) == sorted(
        [good.path.name, flipped.path.name])
    rc, out, err = cli(capfd, "cache", "clear", "--damaged", "--verify")
    assert rc == 0 and "removed 1 damaged cache entry" in out, out
    assert cache.get("faulttest", {"n": 0}).tensors()["x"][5].item() == 5.0  # the good one is untouched
    assert [e.status for e in cache.inspect()] == ["ok"]


# ---- the error line after progress bars ---------------------------------------------------------
def test_error_after_progress_bars_is_a_clean_line(capfd, monkeypatch):
    """Bars drawn as on a terminal, still open when an error escapes: main() closes them before it
    prints, so nothing of a bar follows the error and the line itself starts clean (on a terminal
    the closed bars leave the cursor at the start of a cleared line)."""
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.run import cli as cli_module

    def failing(args):
        bars = ProgressBars()
        bars.quiet = False  # draw as on a terminal
        bars("layers", 1, 4)
        bars("gradients", 2, 4)  # a second, nested bar: closing it moves the cursor
        raise MoescopeError("boom after the bars")

    build = cli_module.build_parser

    def parser(**kw):
        p = build(**kw)
        p._subparsers._group_actions[0].choices["info"].set_defaults(func=failing)
        return p

    monkeypatch.setattr(cli_module, "build_parser", parser)
    rc, out, err = cli(capfd, "info", "demo")
    assert rc == 2 and "layers" in err and "gradients" in err  # the bars were drawn
    bar_part, _, error_part = err.rpartition("moescope: error: ")
    assert error_part == "boom after the bars\n"  # nothing drawn after the error
    assert bar_part.endswith(("\r", "\n", "\x1b[A")), repr(bar_part[-40:])  # it starts at column 0
    assert ProgressBars.live == []


def test_bars_stay_off_when_stderr_is_not_a_terminal(capfd):
    bars = ProgressBars()
    bars("layers", 1, 4)
    bars.close()
    assert capfd.readouterr().err == ""


# ---- dashboard --trust-remote-code --------------------------------------------------------------
def test_dashboard_trust_remote_code_reaches_the_app(monkeypatch):
    launched = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: launched.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda path: None)
    assert main(["dashboard", "demo", "--trust-remote-code", "--port", "8999"]) == 0
    assert main(["dashboard", "demo", "--port", "8999"]) == 0
    with_flag, without = launched
    app_args = with_flag[with_flag.index("--") + 1:]
    assert app_args == ["--model", "demo", "--trust-remote-code"]
    assert "--trust-remote-code" not in without


def test_dashboard_shows_and_uses_trusted_remote_code(monkeypatch, cache_root):
    from moescope.dashboard import backend
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "demo", "--trust-remote-code"])
    at = AppTest.from_file(app, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("--trust-remote-code" in w.value for w in at.sidebar.warning)
    assert at.session_state["trust_remote_code"] is True and backend.TRUST_REMOTE_CODE is True
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "demo"])
    at = AppTest.from_file(app, default_timeout=120).run()
    assert not at.exception and not at.sidebar.warning
    assert backend.TRUST_REMOTE_CODE is False
