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
            rc, tb = (exit_.code if isinstance(exit_.code, int) else 1), ""
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
    # issue 31: a file put into moescope's folder since is not moescope's; --overwrite never deletes it
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--overwrite",
                   watch=(watch[1], out), says=("leftover.txt",))
    assert (out / "leftover.txt").read_text() == "from the first export"
    (out / "leftover.txt").unlink()
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--overwrite")
    assert rc == 0, err
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
    import socket

    with socket.socket() as s:  # a free port: a fixed one may be taken by a dashboard already running
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    assert main(["dashboard", "demo", "--trust-remote-code", "--port", port]) == 0
    assert main(["dashboard", "demo", "--port", port]) == 0
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


# =================================================================================================
# Issue 27: nothing a user makes is ever deleted, no exception escapes as a traceback, no NaN is
# exported as a result. Every input of the issue runs through main(): exit status, exactly one
# stderr line, nothing written or lost.
# =================================================================================================
import contextlib  # noqa: E402
import errno  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

DEMO_CONFIG = json.loads((demo_model_dir() / "config.json").read_text())


def config_folder(root: Path, name: str, weights: bool = False, **patch) -> Path:
    """A copy of the demo folder whose config.json carries ``patch`` (weights linked when asked)."""
    d = root / name
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, d / f)
    if weights:
        (d / "model.safetensors").symlink_to(demo_model_dir() / "model.safetensors")
    (d / "config.json").write_text(json.dumps({**DEMO_CONFIG, **patch}))
    return d


CONFIG_CASES = {  # id: (config values, words the one line must say)
    "layers-1e6": ({"num_hidden_layers": 1_000_000}, ("num_hidden_layers", "1024")),
    "layers-0": ({"num_hidden_layers": 0}, ("num_hidden_layers",)),
    "experts-0": ({"num_local_experts": 0}, ("num_local_experts",)),
    "hidden-neg": ({"hidden_size": -1}, ("hidden_size",)),
    "model-type-list": ({"model_type": ["mixtral"]}, ("model_type",)),
    "dtype-int8": ({"dtype": "int8", "torch_dtype": "int8"}, ("int8",)),
    "eps-nan": ({"rms_norm_eps": math.nan}, ("rms_norm_eps",)),
    "eps-zero": ({"rms_norm_eps": 0}, ("rms_norm_eps",)),
    "topk-10-of-8": ({"num_experts_per_tok": 10}, ("num_experts_per_tok", "8 experts")),
    "topk-0": ({"num_experts_per_tok": 0}, ("num_experts_per_tok",)),
    "max-pos-neg": ({"max_position_embeddings": -5}, ("max_position_embeddings",)),
    "max-pos-0": ({"max_position_embeddings": 0}, ("max_position_embeddings",)),
    "beta-5": ({"moescope_skip_beta": {"0": 5.0}}, ("moescope_skip_beta", "[0, 1]")),
    "beta-text": ({"moescope_skip_beta": "abc"}, ("moescope_skip_beta",)),
    "beta-layer-99": ({"moescope_skip_beta": {"99": 0.5}}, ("moescope_skip_beta", "99")),
    "beta-nan": ({"moescope_skip_beta": {"0": math.nan}}, ("moescope_skip_beta",)),
    "counts-text": ({"moescope_num_experts_per_layer": "x"}, ("moescope_num_experts_per_layer",)),
    "counts-list": ({"moescope_num_experts_per_layer": [6, 6, 6, 6]}, ("moescope_num_experts_per_layer",)),
    "counts-0": ({"moescope_num_experts_per_layer": {"0": 0}}, ("moescope_num_experts_per_layer",)),
    "counts-60": ({"moescope_num_experts_per_layer": {"0": 60}}, ("moescope_num_experts_per_layer", "60")),
    "layout-text": ({"moescope_num_experts_per_layer": {"0": 6}, "moescope_moe_layout": "x"},
                    ("moescope_moe_layout",)),
    "layout-missing": ({"moescope_num_experts_per_layer": {"0": 6}}, ("moescope_moe_layout",)),
    # issue 31: values transformers computes with, and types it reads without checking
    "rope-theta-nan": ({"rope_parameters": {"rope_type": "default", "rope_theta": math.nan}},
                       ("rope_parameters.rope_theta", "nan")),
    "rope-theta-neg": ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
                       ("rope_parameters.rope_theta", "positive")),
    "routed-scaling-nan": ({"routed_scaling_factor": math.nan}, ("routed_scaling_factor",)),
    "swiglu-limit-nan": ({"swiglu_limit": math.nan}, ("swiglu_limit",)),
    "swiglu-limit-inf": ({"swiglu_limit": math.inf}, ("swiglu_limit", "finite")),
    "topk-group-5-of-2": ({"n_group": 2, "topk_group": 5}, ("topk_group", "n_group = 2")),
    "n-group-0": ({"n_group": 0}, ("n_group",)),
    "n-group-3-of-8": ({"n_group": 3}, ("n_group", "divisor")),
    "sparse-step-0": ({"decoder_sparse_step": 0}, ("decoder_sparse_step",)),
    "experts-list": ({"num_local_experts": [8, 8]}, ("num_local_experts", "[8, 8]")),
    "norm-topk-text": ({"norm_topk_prob": "false"}, ("norm_topk_prob", "boolean")),
    "first-dense-minus-1": ({"first_k_dense_replace": -1}, ("first_k_dense_replace",)),
}


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-configs")
    return {name: config_folder(root, name, **patch) for name, (patch, _) in CONFIG_CASES.items()}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_every_config_value_is_validated_in_one_line(capfd, work, bad_configs, case):
    """``info`` refuses each broken config in one line naming the key (a million layers is refused at
    once instead of building for minutes; top-k 10 of 8 experts is not reported as 5 M active of 4 M)."""
    folder, watch = work
    assert_refused(capfd, "info", str(bad_configs[case]), watch=(*watch, bad_configs[case]),
                   says=CONFIG_CASES[case][1])


def test_layout_naming_another_class_is_refused(capfd, work, tmp_path):
    """A per-layer export whose layout names a transformers class of another model type."""
    folder, watch = work
    layout = {"base_class": "Qwen2MoeForCausalLM", "layers_path": "model.layers", "mlp_attr": "mlp",
              "router_attr": "gate", "experts_attr": "experts", "router_weight": "weight",
              "router_tensors": ["weight"], "expert_tensors": ["gate_up_proj", "down_proj"]}
    d = config_folder(tmp_path, "other-base", moescope_num_experts_per_layer={"0": 6, "1": 8, "2": 8, "3": 8},
                      moescope_moe_layout=layout)
    assert_refused(capfd, "info", str(d), watch=(*watch, d), says=("base_class",))


def test_eval_on_zero_layers_prints_one_line_and_nothing_else(capfd, work, tmp_path):
    folder, watch = work
    d = config_folder(tmp_path, "zero-layers", weights=True, num_hidden_layers=0)
    assert_refused(capfd, "eval", str(d), "--no-efficiency", "--samples", "2", "--seq-len", "32",
                   watch=(*watch, d), says=("num_hidden_layers",))


def test_nan_eps_is_refused_before_any_experiment_is_stored(capfd, work, tmp_path):
    folder, watch = work
    d = config_folder(tmp_path, "nan-eps", weights=True, rms_norm_eps=math.nan)
    assert_refused(capfd, "eval", str(d), "--no-efficiency", "--samples", "2", "--seq-len", "32",
                   watch=(*watch, d), says=("rms_norm_eps",))


# ---- plans: layer keys, depth, types ---------------------------------------------------------------
def raw_plan(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


PLAN_TEXTS = {
    "leading-zero": ('{"version": 1, "base_model": "demo", "layers": {"02": {"groups": [[0],[1],[2],[3],[4],[5]]}}}',
                     ("'02'",)),
    "arabic-indic": ('{"version": 1, "base_model": "demo", "layers": {"\\u0663": {"groups": [[0],[1],[2],[3],[4],[5]]}}}',
                     ("layer key",)),
    "duplicate": ('{"version": 1, "base_model": "demo", "layers": {"2": {"groups": [[0],[1],[2],[3],[4],[5]]}, '
                  '"2": {"groups": [[0],[1],[2],[3]]}}}', ("twice",)),
    "deep": ('{"version": 1, "base_model": "demo", "layers": ' + "[" * 50_000 + "]" * 50_000 + "}", ("nested",)),
    "skip-beta-list": ('{"version": 1, "base_model": "demo", "layers": {}, "skip_beta": [0.5]}', ("skip_beta",)),
    "huge-int-coefficient": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],[4],'
                             '[5],[6]], "coefficients": [[1' + "0" * 400 + ', 1],[1],[1],[1],[1],[1]]}}}',
                             ("coefficient",)),
    "coefficients-text": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],[4],'
                          '[5],[6]], "coefficients": "abc"}}}', ("coefficients",)),
    "coefficients-mistyped": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],[4],'
                              '[5],[6]], "coefficients": [[0.5, "x"],[1],[1],[1],[1],[1]]}}}', ("coefficients",)),
    "coefficients-short": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],[4],'
                           '[5],[6]], "coefficients": [[0.5],[1]]}}}', ("coefficients",)),
    # issue 31: a 400-digit router coefficient (was an OverflowError), coefficients that overflow the weights
    "huge-int-router-coefficient": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],'
                                    '[4],[5],[6]], "router_coefficients": [[1' + "0" * 400 + ', 1],[1],[1],[1],[1],'
                                    '[1]]}}}', ("router coefficient", "too large")),
    "coefficients-1e38": ('{"version": 1, "base_model": "demo", "layers": {"0": {"groups": [[0, 1],[2],[3],[4],'
                          '[5],[6]], "coefficients": [[1e38, 1e38],[1],[1],[1],[1],[1]]}}}', ("1e+38", "too large")),
}


@pytest.mark.parametrize("case", sorted(PLAN_TEXTS))
def test_plan_files_are_parsed_strictly(capfd, work, case):
    folder, watch = work
    plan = raw_plan(folder, "plan.json", PLAN_TEXTS[case][0])
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=PLAN_TEXTS[case][1])


def test_deep_json_in_param_and_in_a_jsonl_source(capfd, work):
    folder, watch = work
    deep = "[" * 50_000 + "]" * 50_000
    assert_refused(capfd, "plan", "demo", "--strategy", "manual", "--param", f"groups={deep}", "-o",
                   str(folder / "plan.json"), watch=watch, says=("nested",))
    data = folder / "deep.jsonl"
    data.write_text('{"text": "hello there"}\n' + '{"text": ' + deep + "}\n")
    watch_data = {str(data)}
    assert_refused(capfd, "analyze", "demo", "--calib", f"file:{data}", "--samples", "2", "--seq-len", "32",
                   "--metrics", "routing", watch=watch, says=("nested",))
    assert {str(p) for p in folder.iterdir() if p.is_file()} >= watch_data


# ---- strategy parameters: validated by type -------------------------------------------------------
def test_every_float_parameter_of_every_strategy_must_be_finite_and_in_range():
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.strategies import STRATEGIES

    floats = [(s.name, p) for s in STRATEGIES.values() for p in s.all_params() if p.type is float]
    assert {(s, p.name) for s, p in floats} >= {("lottery", "lr"), ("merge", "lr"), ("merge", "density")}
    for strategy, p in floats:
        for bad in (math.nan, math.inf, -math.inf, 10**400):
            with pytest.raises(MoescopeError, match="finite"):
                p.coerce(bad, strategy)
        if p.minimum is not None:
            with pytest.raises(MoescopeError, match="at least"):
                p.coerce(p.minimum - 1.0, strategy)
        if p.maximum is not None:
            with pytest.raises(MoescopeError, match="at most"):
                p.coerce(p.maximum + 1.0, strategy)
    density = next(p for s, p in floats if p.name == "density")
    assert density.coerce(0.5, "merge") == 0.5


@pytest.mark.parametrize("argv", [
    ["--strategy", "lottery", "--keep", "6", "--lr", "inf"],
    ["--strategy", "lottery", "--keep", "6", "--param", "lr=NaN"],
    ["--strategy", "merge", "--keep", "6", "--param", "lr=nan"],
    ["--strategy", "merge", "--keep", "6", "--param", "lr=Infinity"],
    ["--strategy", "merge", "--keep", "6", "--param", "density=1e400"],
    ["--strategy", "lottery", "--keep", "6", "--lr", "1e38"],
], ids=["lottery-lr-inf", "lottery-lr-NaN", "merge-lr-nan", "merge-lr-Infinity", "merge-density-1e400",
        "lottery-lr-1e38"])
def test_non_finite_strategy_parameters_are_refused_before_any_work(capfd, work, argv):
    folder, watch = work
    assert_refused(capfd, "plan", "demo", *argv, "--samples", "2", "--seq-len", "32", "-o", str(folder / "p.json"),
                   watch=watch)


def test_non_finite_weights_are_never_exported_or_stored(capfd, work, tmp_path):
    """A NaN in an expert the plan merges: prune without evaluation (streamed) refuses to export it,
    prune with evaluation refuses it before building the model's results; nothing is written and no
    experiment is stored. (Coefficients that would overflow the weights, such as learned ones of
    1e300, are refused with the plan itself.)"""
    from safetensors.torch import load_file, save_file

    folder, watch = work
    base = config_folder(tmp_path, "nan-expert")
    state = load_file(demo_model_dir() / "model.safetensors")
    state["model.layers.0.block_sparse_moe.experts.1.w1.weight"][3, 4] = math.nan
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_file(folder, "plan.json", uniform([[0, 1], [2], [3], [4], [5], [6]]), base_model=str(base))
    assert_refused(capfd, "prune", str(base), "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("non-finite",))
    cache = Cache(watch[1])
    records = len(cache.entries("experiment"))
    assert_refused(capfd, "prune", str(base), "--plan", str(plan), "-o", str(folder / "out"), "--ppl", "demo:all",
                   "--samples", "2", "--seq-len", "32", "--no-efficiency", watch=(folder,), says=("non-finite",))
    assert len(cache.entries("experiment")) == records
    stored = [cache.get_by_key("perplexity", e.key).meta["ppl"] for e in cache.entries("perplexity")]
    assert all(math.isfinite(v) for ppl in stored for v in ppl.values()), stored
    learned = folder / "learned.json"
    learned.write_text(json.dumps({"version": 1, "base_model": "demo",
                                   "layers": uniform([[0, 1], [2], [3], [4], [5], [6]],
                                                     [[1e300, 1e300], [1], [1], [1], [1], [1]]),
                                   "provenance": {"strategy": "merge", "params": {"merge": "learned"}}}))
    assert_refused(capfd, "prune", "demo", "--plan", str(learned), "-o", str(folder / "out"), watch=watch,
                   says=("1e+300", "too large"))


def test_a_stored_nan_finetune_is_never_applied_or_exported(capfd, work):
    """Case 4: a lottery finetune that came out NaN (stored by an earlier moescope) is refused when
    a plan names it: nothing exported."""
    import torch
    from moescope.analysis.pruning.prune import FINETUNED_KIND

    folder, watch = work
    cache = Cache(watch[1])
    entry = cache.put(FINETUNED_KIND, {"test": "nan-finetune"},
                      tensors={"L0.experts.gate_up_proj": torch.full((2, 2), math.nan)}, meta={"model_source": "demo"})
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"version": 1, "base_model": "demo", "layers": uniform(KEEP6),
                                "provenance": {"strategy": "lottery", "finetuned": True, "weights": entry.key}}))
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("non-finite",))


# ---- eval / dashboard settings ----------------------------------------------------------------------
@pytest.mark.parametrize("argv,says", [
    (["eval", "demo", "--device", "cuda:7"], ("--device",)),
    (["eval", "demo", "--device", "tpu"], ("--device",)),
    (["eval", "demo", "--tasks", "moescope_demo_continuation", "--limit", "nan"], ("--limit",)),
    (["eval", "demo", "--tasks", "moescope_demo_continuation", "--num-fewshot", "-1"], ("--num-fewshot",)),
    (["dashboard", "demo", "--port", "70000"], ("--port",)),
    (["dashboard", "demo", "--address", ""], ("--address",)),
], ids=["cuda-missing", "no-such-device", "limit-nan", "fewshot-neg", "port-70000", "address-empty"])
def test_settings_are_refused_in_one_line(capfd, work, monkeypatch, argv, says):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("the dashboard started"))
    folder, watch = work
    assert_refused(capfd, *argv, watch=watch, says=says)


def test_dashboard_on_a_busy_port_suggests_another(capfd, work, monkeypatch):
    import socket

    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("the dashboard started"))
    folder, watch = work
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = assert_refused(capfd, "dashboard", "demo", "--address", "127.0.0.1", "--port", str(port),
                              watch=watch, says=("in use", "--port"))
    assert str(port) in line


# ---- the boundary: unexpected exceptions, --debug, closed pipes --------------------------------------
def test_any_exception_is_one_line_and_debug_shows_the_traceback(capfd, monkeypatch):
    from moescope.analysis.run import commands

    def boom(args):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(commands, "cmd_families", boom)
    from moescope.analysis.run import cli as cli_module

    monkeypatch.setattr(cli_module, "cmd_families", boom)
    rc, out, err = cli(capfd, "families")
    assert rc == 2 and err.splitlines() == [
        "moescope: error: RecursionError: maximum recursion depth exceeded (run again with --debug for the traceback)"]
    rc, out, err = cli(capfd, "families", "--debug")
    assert rc == 2 and "Traceback" in err and err.splitlines()[-1] == (
        "moescope: error: RecursionError: maximum recursion depth exceeded")


@pytest.mark.parametrize("argv", [["families"], ["info", "demo", "--json"], ["strategies", "--json"]])
def test_a_closed_stdout_ends_quietly(tmp_path, argv):
    """``moescope families | head``: the reader is gone; no traceback, the status of SIGPIPE."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "MOESCOPE_CACHE": str(tmp_path / "cache")}
    code = f"import sys; from moescope.analysis.run.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=300)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr[-2000:])


def test_unreachable_hub_is_one_line_quickly(capfd, work, monkeypatch):
    """No network: one probe of at most a few seconds, then the local hub cache only — not five
    retries with backoff (~25 s, 12 lines)."""
    import time

    import huggingface_hub
    from moescope.analysis.core import paths

    folder, watch = work
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(paths, "_hub_unreachable", [])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    t0 = time.monotonic()
    line = assert_refused(capfd, "info", "moescope-test/not-a-model", watch=watch, says=("unreachable",))
    assert time.monotonic() - t0 < 20, line


# ---- outputs: checked before any work, written atomically, never replacing what is not ours -------------
def test_plan_output_paths_are_checked_before_any_work(capfd, work):
    folder, watch = work
    args = ["plan", "demo", "--strategy", "frequency", "--keep", "6", "--samples", "2", "--seq-len", "32"]
    assert_refused(capfd, *args, "-o", "", watch=watch, says=("empty",))
    assert_refused(capfd, *args, "-o", str(folder), watch=watch, says=("folder",))
    target = folder / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    link = folder / "link"
    link.symlink_to(target)
    assert_refused(capfd, *args, "-o", str(link), watch=watch, says=("folder",))
    assert link.is_symlink() and (target / "notes.txt").read_text() == "keep me"
    (folder / "file.txt").write_text("x")
    assert_refused(capfd, *args, "-o", str(folder / "file.txt" / "plan.json"), watch=watch)


def test_plan_output_symlink_to_a_file_is_followed(capfd, work):
    folder, watch = work
    real = folder / "real.json"
    real.write_text("old")
    link = folder / "plan.json"
    link.symlink_to(real)
    rc, out, err = cli(capfd, "plan", "demo", "--strategy", "manual", "--param", "drop=0:1,2", "-o", str(link))
    assert rc == 0, err
    assert link.is_symlink() and json.loads(real.read_text())["layers"]["0"]["groups"] == [[0], [3], [4], [5], [6],
                                                                                             [7]]
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json", "real.json"]  # no temporary file left


def test_analyze_export_onto_a_file_is_refused_before_the_analysis(capfd, work):
    folder, watch = work
    (folder / "f").write_text("mine")
    assert_refused(capfd, "analyze", "demo", "--samples", "2", "--seq-len", "32", "--metrics", "routing",
                   "--export", str(folder / "f"), watch=watch, says=("not a folder",))
    assert (folder / "f").read_text() == "mine"


class _Place:
    """A folder with a broken file system: a real tmpfs mount (full, or read-only) where this machine
    allows it, else an audit hook that fails writes under it the same way."""

    hooks: list[tuple[str, int]] = []
    installed = False

    @classmethod
    def _hook(cls, event, args):
        if not cls.hooks:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            writing = bool(args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)) or (
                isinstance(args[1], str) and any(m in args[1] for m in "wax+"))
            path = os.fsdecode(args[0])
        elif event in ("os.mkdir", "os.rename", "os.replace", "shutil.copyfile"):
            writing, path = True, os.fsdecode(args[0])
        else:
            return
        for prefix, code in cls.hooks:
            if writing and os.path.abspath(path).startswith(prefix):
                raise OSError(code, os.strerror(code), path)

    @classmethod
    @contextlib.contextmanager
    def broken(cls, folder: Path, code: int):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sub").mkdir()
        opts = "size=64k" if code == errno.ENOSPC else "size=1m"
        try:
            mounted = os.environ.get("MOESCOPE_TEST_NO_MOUNT") is None and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True).returncode == 0
        except OSError:  # no mount command
            mounted = False
        try:
            if mounted:
                (folder / "sub").mkdir()
                (folder / "sub" / ".tmp").mkdir()  # a cache root that already exists
                if code == errno.ENOSPC:
                    with contextlib.suppress(OSError), open(folder / "filler", "wb") as fh:
                        while True:
                            fh.write(b"\0" * 4096)
                            fh.flush()
                else:
                    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            else:
                (folder / "sub" / ".tmp").mkdir()
                if not cls.installed:
                    sys.addaudithook(cls._hook)
                    cls.installed = True
                cls.hooks.append((str(folder.resolve()), code))
            yield folder / "sub"
        finally:
            if mounted:
                subprocess.run(["umount", str(folder)], check=False)
            else:
                cls.hooks.pop()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full-disk", "read-only"])
def test_writes_onto_a_full_or_read_only_disk(capfd, work, tmp_path, code):
    """plan -o, prune -o, analyze --export, compare --csv and a new cache entry on a full or read-only
    file system: one line each, no temporary file left, nothing else written."""
    folder, watch = work
    with _Place.broken(tmp_path / "disk", code) as place:
        before = files_under(place.parent)
        plan_args = ["plan", "demo", "--strategy", "manual", "--param", "drop=0:1,2"]
        assert_refused(capfd, *plan_args, "-o", str(place / "plan.json"), watch=watch)
        keep6 = plan_file(folder, "keep6.json", uniform(KEEP6))
        assert_refused(capfd, "prune", "demo", "--plan", str(keep6), "-o", str(place / "out"), watch=watch)
        assert_refused(capfd, "analyze", "demo", "--samples", "2", "--seq-len", "32", "--metrics", "routing",
                       "--export", str(place / "csv"), watch=watch)
        assert_refused(capfd, "experiments", "compare", "abc", "--csv", str(place / "t.csv"), watch=watch)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV_VAR, str(place))
            assert_refused(capfd, "analyze", "demo", "--samples", "2", "--seq-len", "32", "--metrics", "routing",
                           watch=watch, says=("cache",))
        assert {f for f in files_under(place.parent) if "/.locks/" not in f} == before  # lock files hold no result


def test_plan_onto_a_full_disk_keeps_the_old_plan(capfd, work, tmp_path):
    """Full only once the work is done (the check before work passed): the write fails in one line,
    the plan that was there is unchanged and no ``*.tmp`` is left."""
    folder, watch = work
    from moescope.analysis.core import outputs

    old = folder / "plan.json"
    old.write_text("the old plan")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outputs.os, "fsync", full)
        line = assert_refused(capfd, "plan", "demo", "--strategy", "manual", "--param", "drop=0:1,2", "-o",
                              str(old), watch=(folder.parent / "none",), says=("no space",))
    assert os.fsync is real_fsync
    assert old.read_text() == "the old plan" and sorted(p.name for p in folder.iterdir()) == ["plan.json"], line


def _make_folder(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("notes")


def _make_file(out: Path) -> None:
    out.write_text("notes")


@pytest.mark.parametrize("make", [_make_folder, _make_file], ids=["folder", "file"])
def test_what_appears_at_the_output_during_the_export_is_never_deleted(capfd, work, monkeypatch, make):
    """Data loss case 1: while the export is written, someone creates ``out/notes.txt`` (or a file
    ``out``). The placement refuses in one line, the notes are intact, the finished export is kept
    (named in the line, complete, with moescope's marker) and no temporary folder remains; the same
    with --overwrite, which replaces only moescope's own folders."""
    from moescope.analysis.run import export

    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    out = folder / "out"
    write_records = export._write_records  # the last step of every export, streamed or in memory

    def meanwhile(tmp, *a, **kw):
        result = write_records(tmp, *a, **kw)
        make(out)
        return result

    monkeypatch.setattr(export, "_write_records", meanwhile)
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), *extra)
        lines = err.splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        notes = out / "notes.txt" if out.is_dir() else out
        assert notes.read_text() == "notes" and (not out.is_dir() or [p.name for p in out.iterdir()] == ["notes.txt"])
        kept = [p for p in folder.iterdir() if p.name.startswith("out.moescope-")]
        assert len(kept) == 1 and str(kept[0]) in lines[0], (lines, sorted(p.name for p in folder.iterdir()))
        assert (kept[0] / ".moescope-export").is_file() and (kept[0] / "config.json").is_file()
        assert not [p for p in folder.iterdir() if p.name.startswith(".out")]
        shutil.rmtree(kept[0])
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def test_export_into_a_symlinked_folder_follows_the_link(capfd, work):
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    real = folder / "real"
    link = folder / "link"
    link.symlink_to(real, target_is_directory=True)
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(link))
    assert rc == 0, err
    assert link.is_symlink() and (real / ".moescope-export").is_file() and (link / "config.json").is_file()


# ---- named plans under concurrency -----------------------------------------------------------------
def test_rename_racing_a_save_never_loses_the_save(tmp_path):
    """Data loss case 2: ``rename_plan("A", "B")`` racing ``save_plan("A", v2)`` in two threads, 40 times,
    the save started at a random point of the rename: v2 always survives (as A's newest plan, or moved
    to B), and B exists."""
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.named_plans import list_plans, rename_plan, save_plan

    cache = Cache(tmp_path / "c")
    v1 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]})
    v2 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3]})
    rng = random.Random(0)
    save_plan("A", v1, "timing", cache)
    t0 = time.perf_counter()
    rename_plan("A", "B", "timing", cache)
    span = time.perf_counter() - t0  # the save lands at a random point of a rename's duration
    for trial in range(40):
        source = f"race-{trial}"
        save_plan("A", v1, source, cache)
        start = threading.Barrier(2)
        errors: list[Exception] = []

        def run(start, errors, fn, *args, delay=0.0):
            start.wait()
            time.sleep(delay)
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=run, args=(start, errors, rename_plan, "A", "B", source, cache)),
                   threading.Thread(target=run, args=(start, errors, save_plan, "A", v2, source, cache),
                                    kwargs={"delay": rng.uniform(0, span)})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        plans = list_plans(source, cache)
        held = [p.to_json()["layers"] for p in plans.values()]
        assert v2.to_json()["layers"] in held, f"trial {trial}: the concurrent save was lost: {plans}"
        assert "B" in plans


def test_a_save_started_inside_a_rename_waits_for_it_and_stays(tmp_path, monkeypatch):
    """The worst interleaving, made certain: a save of A (another thread) starts while the rename
    A→B is storing its copy. The name is locked: the save waits until the rename is done (the
    rename removes only what it read), then lands as A's plan; nothing is lost."""
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run import named_plans as N

    cache = Cache(tmp_path / "c")
    v1 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]})
    v2 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3]})
    N.save_plan("A", v1, "demo", cache)
    store = N._store
    saver: list[threading.Thread] = []

    def store_during_rename(name, plan, source, cache):
        if name == "B":  # the rename is storing its copy: the concurrent save of A starts now
            saver.append(threading.Thread(target=N.save_plan, args=("A", v2, source, cache)))
            saver[0].start()
            saver[0].join(timeout=0.5)
            assert saver[0].is_alive(), "the save of A did not wait for the rename holding A"
        store(name, plan, source, cache)

    monkeypatch.setattr(N, "_store", store_during_rename)
    N.rename_plan("A", "B", "demo", cache)
    saver[0].join()
    plans = N.list_plans("demo", cache)
    assert plans["B"].layers[0].groups == v1.layers[0].groups
    assert plans["A"].layers[0].groups == v2.layers[0].groups, "the save started during the rename was lost"


def _race(*calls) -> list:
    """Run ``calls`` ((fn, args…)) in threads released together; each one's exception or None."""
    start = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, fn, *args):
        start.wait()
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_renames_of_one_plan_never_duplicate_it(tmp_path):
    """Issue 31: renames A→B and A→C at once, 20 times: exactly one succeeds, the other says there
    is no plan A (one line); the plan exists once, under B or C."""
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.named_plans import list_plans, rename_plan, save_plan

    cache = Cache(tmp_path / "c")
    v1 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]})
    for trial in range(20):
        source = f"renames-{trial}"
        save_plan("A", v1, source, cache)
        errors = _race((rename_plan, "A", "B", source, cache), (rename_plan, "A", "C", source, cache))
        failed = [e for e in errors if e is not None]
        assert len(failed) == 1 and isinstance(failed[0], MoescopeError), errors
        assert "no plan named 'A'" in str(failed[0])
        assert len(list_plans(source, cache)) == 1, f"trial {trial}: {list(list_plans(source, cache))}"


def test_a_save_racing_a_rename_onto_its_name_is_never_hidden(tmp_path):
    """Issue 31, data loss case 2: rename A→B racing save(B), 20 times: whichever runs first, B's
    plan is the one saved (the rename either finds B and refuses, or runs first and the save then
    replaces it); never the renamed plan in front of a save that reported success."""
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.named_plans import list_plans, rename_plan, save_plan

    cache = Cache(tmp_path / "c")
    v1 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]})
    v2 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3]})
    for trial in range(20):
        source = f"onto-{trial}"
        save_plan("A", v1, source, cache)
        rename_err, save_err = _race((rename_plan, "A", "B", source, cache), (save_plan, "B", v2, source, cache))
        assert save_err is None and (rename_err is None or isinstance(rename_err, MoescopeError)), (rename_err, save_err)
        plans = list_plans(source, cache)
        assert plans["B"].layers[0].groups == v2.layers[0].groups, f"trial {trial}: the saved B is hidden"
        assert ("A" in plans) == (rename_err is not None)


def test_delete_removes_exactly_the_revisions_it_saw(tmp_path):
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run import named_plans as N

    cache = Cache(tmp_path / "c")
    v1 = PruningPlan.from_keep("demo", {0: [0, 1, 2, 3, 4, 5]})
    N.save_plan("A", v1, "demo", cache)
    seen = [key for n, _, key, _ in N._entries("demo", cache) if n == "A"]
    N.save_plan("A", PruningPlan.from_keep("demo", {0: [0, 1, 2, 3]}), "demo", cache)  # lands after the listing
    assert N.delete_plan("A", "demo", cache, keys=seen) == 1
    assert N.list_plans("demo", cache)["A"].layers[0].groups == [[0], [1], [2], [3]]


# ---- exports never carry a dangling auto_map ------------------------------------------------------------
def test_foreign_auto_map_is_dropped_and_said_in_the_card(capfd, work, tmp_path):
    folder, watch = work
    base = config_folder(tmp_path, "with-auto-map", weights=True,
                         auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model=str(base))
    rc, _, err = cli(capfd, "prune", str(base), "--plan", str(plan), "-o", str(folder / "out"))
    assert rc == 0, err
    config = json.loads((folder / "out" / "config.json").read_text())
    assert "auto_map" not in config
    card = (folder / "out" / "README.md").read_text()
    assert "modeling_custom.CustomForCausalLM" in card and "dropped" in card


# ---- flags reach the efficiency child -----------------------------------------------------------------
def test_allow_pickle_reaches_the_efficiency_child(capfd, work, bad_models):
    """Case 7: ``eval --allow-pickle`` on a pickle-only folder measures efficiency in its child
    process (which loads the model again) instead of failing there."""
    folder, watch = work
    rc, out, err = cli(capfd, "eval", str(bad_models["pickle"]), "--allow-pickle", "--ppl", "demo:all", "--samples",
                       "2", "--seq-len", "32", "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "2",
                       "--skip-calib", "none", "--json")
    assert rc == 0, err
    eff = json.loads(out)
    assert eff["efficiency"]["original"]["plain"]["generate_tokens_per_s"] > 0, eff["efficiency"]


def test_every_loading_flag_reaches_the_efficiency_child(monkeypatch):
    """``--trust-remote-code``, ``--allow-pickle`` and ``--device`` are written into the child's spec
    (the child loads the model with them); the spec file is removed afterwards."""
    from moescope.analysis.core import processes
    from moescope.analysis.evaluation import EfficiencyParams, isolated_efficiency

    seen = {}

    def child(cmd, env=None):
        spec_path = Path(cmd[-1])
        seen.update(json.loads(spec_path.read_text()), path=spec_path)
        return subprocess.CompletedProcess(cmd, 0, '{"plain": {}, "skip": null}\n', "")

    monkeypatch.setattr(processes, "run_child", child)
    out = isolated_efficiency("demo", None, EfficiencyParams(), dtype="float32", device="cpu", trust_remote_code=True,
                              allow_pickle=True)
    assert out == {"plain": {}, "skip": None}
    assert (seen["trust_remote_code"], seen["allow_pickle"], seen["device"]) == (True, True, "cpu")
    assert not seen["path"].exists()


# ---- issue 31: the last unclear messages, usage dumps and silent results ---------------------------------
def test_a_config_nested_5000_levels_or_with_a_key_twice_is_one_line(capfd, work, tmp_path):
    """config.json nested 5,000 levels (was a RecursionError) and with num_local_experts given twice
    (JSON keeps the last one silently): one line naming the file."""
    folder, watch = work
    deep = config_folder(tmp_path, "deep")
    (deep / "config.json").write_text(json.dumps(DEMO_CONFIG)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}")
    assert_refused(capfd, "info", str(deep), watch=(*watch, deep), says=("config.json", "nested"))
    twice = config_folder(tmp_path, "twice")
    (twice / "config.json").write_text(json.dumps(DEMO_CONFIG)[:-1] + ', "num_local_experts": 4}')
    assert_refused(capfd, "info", str(twice), watch=(*watch, twice), says=("config.json", "num_local_experts", "twice"))


@pytest.mark.parametrize("argv", [
    ["plan", "demo", "--strategy", "random", "--keep", "6", "--seed", "-1"],
    ["analyze", "demo", "--seed", "-1"], ["grid", "demo", "--seed", "-1"], ["eval", "demo", "--seed", "-1"],
], ids=["plan", "analyze", "grid", "eval"])
def test_a_negative_seed_is_one_line(capfd, work, argv):
    folder, watch = work
    out = ["-o", str(folder / "p.json")] if argv[0] == "plan" else []
    assert_refused(capfd, *argv, *out, watch=watch, says=("--seed", "-1", "4294967295"))


USAGE_CASES = {  # (argv, what the line names): what argparse refused with up to 22 lines of usage first
    **{f"keep-{v or 'empty'}": (["plan", "demo", "--strategy", "random", "--keep", v, "-o", "p.json"], "--keep")
       for v in ("inf", "nan", "1e309", "0x6", "", "6.0")},
    "samples-1e309": (["eval", "demo", "--samples", "1e309"], "--samples"),
    "seq-len-nan": (["eval", "demo", "--seq-len", "nan"], "--seq-len"),
    "epochs-1e9": (["plan", "demo", "--strategy", "merge", "--keep", "6", "--epochs", "1e9", "-o", "p.json"], "--epochs"),
    "port-abc": (["dashboard", "--port", "abc"], "--port"),
    "experiments-rm": (["experiments", "rm"], "'rm'"),
    "no-command": ([], "COMMAND"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_argparse_errors_are_one_line_pointing_to_help(capfd, work, case):
    folder, watch = work
    argv, names = USAGE_CASES[case]
    line = assert_refused(capfd, *argv, watch=watch, says=(names, "--help"))
    assert "usage:" not in line


def test_a_full_disk_while_the_tokenizer_is_written_names_the_tokenizer(capfd, work, monkeypatch):
    """ENOSPC raised by the tokenizer's save without a file name: the line says it was the tokenizer
    files, nothing is left at the output."""
    from moescope.analysis.model import view

    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(view, "drop_tokenizer_auto_map", full)  # the last step of writing the tokenizer
    assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), watch=watch,
                   says=("tokenizer", "no space left"))


def test_a_moescope_export_appearing_mid_run_is_said_so(capfd, work, monkeypatch):
    """Another moescope run finishes an export at the same output while this one works: the line says
    so (not "no .moescope-export"); nothing is replaced, the finished folder is kept aside."""
    from moescope.analysis.run import export

    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    out = folder / "out"
    write_records = export._write_records

    def meanwhile(tmp, *a, **kw):
        result = write_records(tmp, *a, **kw)
        shutil.copytree(tmp, out)  # a complete moescope folder (its marker comes with the copy below)
        (out / ".moescope-export").write_text(json.dumps({"written_by": "moescope", "files": sorted(
            p.name for p in out.iterdir())}))
        return result

    monkeypatch.setattr(export, "_write_records", meanwhile)
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out))
    assert rc == 2 and len(err.splitlines()) == 1 and "another moescope run" in err and "no .moescope" not in err, err
    assert (out / ".moescope-export").is_file()
    assert len([p for p in folder.iterdir() if p.name.startswith("out.moescope-")]) == 1


def test_overwrite_never_deletes_what_the_user_put_into_an_export(capfd, work):
    """Data loss case 1 of issue 31: NOTES.txt and my_results/ put into an earlier export; prune
    --overwrite onto it is refused naming them, and both are intact. An export of only moescope's
    files is still replaced."""
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    out = folder / "out"
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out))
    assert rc == 0, err
    rc, _, err = cli(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--overwrite")
    assert rc == 0, err  # moescope's own folder: replaced
    (out / "NOTES.txt").write_text("mine")
    (out / "my_results").mkdir()
    (out / "my_results" / "r.csv").write_text("1,2")
    line = assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(out), "--overwrite",
                          watch=(*watch[1:], out), says=("NOTES.txt", "my_results/", "did not write"))
    assert "--overwrite" in line
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "my_results" / "r.csv").read_text() == "1,2"


def test_prune_offload_onto_a_read_only_folder_names_that_folder(capfd, work, tmp_path):
    folder, watch = work
    plan = plan_file(folder, "plan.json", uniform(KEEP6))
    with _Place.broken(tmp_path / "ro", errno.EROFS) as place:
        line = assert_refused(capfd, "prune", "demo", "--plan", str(plan), "-o", str(folder / "out"), "--offload",
                              str(place), "--ppl", "demo:all", "--samples", "1", "--seq-len", "16", "--no-efficiency",
                              watch=watch, says=("--offload folder", str(place)))
        assert str(folder / "out") not in line


def test_an_exported_tokenizer_carries_no_foreign_auto_map(capfd, work, tmp_path):
    """tokenizer_config.json's auto_map (custom tokenizer code the export does not carry) is dropped
    like the config's, streamed and in memory; AutoTokenizer(trust_remote_code=True) loads the export."""
    from transformers import AutoTokenizer

    folder, watch = work
    base = config_folder(tmp_path, "tok-auto-map", weights=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoTokenizer": ["evil.EvilTok", None]}}))
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model=str(base))
    for name, extra in (("streamed", []), ("in-memory", ["--ppl", "demo:all", "--samples", "1", "--seq-len", "16",
                                                        "--no-efficiency"])):
        out = folder / name
        rc, _, err = cli(capfd, "prune", str(base), "--plan", str(plan), "-o", str(out), *extra)
        assert rc == 0, err
        assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text()), name
        AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)


def test_export_of_an_experiment_refuses_a_tokenizer_edited_since(capfd, work, tmp_path):
    """prune --ppl records the experiment; tokenizer.json edited afterwards; export ID is refused in
    one line (the fingerprint covers every file an export copies), nothing written."""
    folder, watch = work
    base = config_folder(tmp_path, "tok-edit", weights=True)
    plan = plan_file(folder, "plan.json", uniform(KEEP6), base_model=str(base))
    rc, out, err = cli(capfd, "prune", str(base), "--plan", str(plan), "-o", str(folder / "first"), "--ppl",
                       "demo:all", "--samples", "1", "--seq-len", "16", "--no-efficiency", "--json")
    assert rc == 0, err
    ident = json.loads(out)["experiment"]
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"] = [*tok.get("added_tokens", []), {"id": 99999, "content": "<edited>", "single_word": False,
                                                           "lstrip": False, "rstrip": False, "normalized": False,
                                                           "special": True}]
    (base / "tokenizer.json").write_text(json.dumps(tok))
    assert_refused(capfd, "export", ident, "-o", str(folder / "again"), watch=watch,
                   says=("tokenizer", "changed", ident))


def test_max_ecc_on_a_top_1_router_is_refused(capfd, work, tmp_path):
    """A top-1 router never selects two experts together: ECC's pair matrix is all zeros, so the max
    pair is a tie broken by index. The preset is refused in one line instead of writing that plan."""
    folder, watch = work
    top1 = config_folder(tmp_path, "top1", weights=True, num_experts_per_tok=1)
    assert_refused(capfd, "plan", str(top1), "--preset", "max-ecc", "--keep", "4", "--samples", "2", "--seq-len", "32",
                   "-o", str(folder / "plan.json"), watch=watch, says=("ECC", "every pair", "top-1"))


@pytest.mark.parametrize("family,patch,says", [
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": math.nan}}, "rope_parameters.rope_theta"),
    ("deepseek_v3", {"routed_scaling_factor": math.nan}, "routed_scaling_factor"),
    ("deepseek_v3", {"n_group": 2, "topk_group": 5}, "topk_group"),
    ("deepseek_v3", {"n_group": 0}, "n_group"),
    ("gpt_oss", {"swiglu_limit": math.nan}, "swiglu_limit"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe", {"norm_topk_prob": "false"}, "norm_topk_prob"),
], ids=["mixtral-rope", "dsv3-scaling", "dsv3-topk-group", "dsv3-n-group-0", "gpt-oss-swiglu", "qwen2-step-0",
        "qwen3-norm-text"])
def test_config_values_of_each_family_are_refused_by_info_and_plan(capfd, work, tmp_path, family, patch, says):
    """On the family's own tiny folder (issue 31: these exited 0 with NaN in the cache, or raised
    ZeroDivisionError / RuntimeError / transformers' unnamed validation error)."""
    from conftest import save_tiny

    folder, watch = work
    d = Path(save_tiny(family, tmp_path / family))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **patch}))
    for argv in (["info", str(d)], ["plan", str(d), "--strategy", "random", "--keep", "4", "-o", str(folder / "p.json")]):
        assert_refused(capfd, *argv, watch=(*watch, d), says=(str(d / "config.json"), says))
