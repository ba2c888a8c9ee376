"""Issue 12, interruptions: real ``moescope`` processes SIGKILLed at named points of analyze, prune
(during evaluation, during export) and export. After each kill: no partial output folder, no
half cache entry, no experiment record without its export; and a clean re-run succeeds.

A kill point is chosen with ``MOESCOPE_FAULT_AT`` (see ``analysis/run/cli.py:_fault_hook``):
``progress:STAGE`` kills when that progress stage reports, ``write:GLOB`` when a file whose path
matches GLOB is opened for writing. The globs name only the target's parent folder and the file,
so they still hit when the export writes into a temporary sibling that is renamed into place.
Each process costs ~8 s of imports, so the whole file is marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MOESCOPE = str(Path(sys.executable).with_name("moescope"))
DEMO_LAYERS = 4
EVAL = ["--ppl", "demo:all", "--samples", "4", "--seq-len", "64", "--no-efficiency"]


def moescope(*argv: str, cache: Path, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOESCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MOESCOPE_FAULT_AT", None)
    if fault:
        env["MOESCOPE_FAULT_AT"] = fault
    return subprocess.run([MOESCOPE, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (
        f"expected the fault point to SIGKILL the process, got exit {proc.returncode}\n{proc.stderr[-3000:]}")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def cache_state(cache: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Every entry folder by kind, with its verdict (reading the folders directly, not the CLI)."""
    from moescope.analysis.core.cache import Cache

    out: dict[str, list] = {}
    for info in Cache(cache).inspect(verify=True):
        out.setdefault(info.kind, []).append((info.path.name, info.problem))
    return out


def experiments(cache: Path) -> list[dict]:
    from moescope.analysis.core.cache import Cache

    return [info for info in Cache(cache).inspect("experiment")]


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def assert_complete_export(out: Path) -> None:
    """A folder that loads, with the files an export promises."""
    from moescope.analysis.model import load_moe

    for name in ("config.json", "model.safetensors", "plan.json", "README.md", "tokenizer.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{out} lacks {name}: {visible(out)}"
    model = load_moe(str(out))
    assert model.num_experts() == {l: 6 for l in range(DEMO_LAYERS)}


def keep6_plan(folder: Path) -> Path:
    path = folder / "plan.json"
    path.write_text(json.dumps({"version": 1, "base_model": "demo",
                                "layers": {str(l): {"groups": [[0], [1], [2], [3], [5], [7]]}
                                           for l in range(DEMO_LAYERS)}}))
    return path


# ---- analyze ------------------------------------------------------------------------------------
def test_analyze_killed_mid_compute_or_mid_write_leaves_no_entry(tmp_path):
    cache = tmp_path / "cache"
    args = ["analyze", "demo", "--samples", "4", "--seq-len", "64", "--metrics", "similarity,routing", "--json"]
    killed(moescope(*args, cache=cache, fault="progress:layers"))
    assert cache_state(cache).get("analysis", []) == []
    # after the tensors are written, before the manifest that completes the entry
    killed(moescope(*args, cache=cache, fault=f"write:{cache}/.tmp/*/manifest.json"))
    assert cache_state(cache).get("analysis", []) == []
    first = json.loads(ok(moescope(*args, cache=cache)).stdout)
    again = json.loads(ok(moescope(*args, cache=cache)).stdout)
    assert again["cache_entry"] == first["cache_entry"]
    state = cache_state(cache)
    assert [problem for _, problem in state["analysis"]] == [None]  # one entry, verified in full
    assert Path(first["cache_entry"]).name == state["analysis"][0][0]


# ---- prune --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prune_runs(tmp_path_factory) -> dict:
    """Three killed ``prune … --ppl`` runs into the same target, then a clean re-run; what each left."""
    root = tmp_path_factory.mktemp("prune-faults")
    cache, work = root / "cache", root / "work"
    work.mkdir()
    plan = keep6_plan(root)
    out = work / "out"
    args = ["prune", "demo", "--plan", str(plan), "-o", str(out), *EVAL, "--json"]
    seen = {}
    for name, fault in (("evaluation", "progress:evaluate pruned"),
                        ("export-config", f"write:{work}/*config.json"),
                        ("export-card", f"write:{work}/*README.md")):
        proc = moescope(*args, cache=cache, fault=fault)
        seen[name] = {"proc": proc, "visible": visible(work), "out_files": visible(out) if out.is_dir() else None,
                      "experiments": experiments(cache)}
    rerun = moescope(*args, cache=cache)
    return {"cache": cache, "work": work, "out": out, "seen": seen, "rerun": rerun}


@pytest.mark.parametrize("point", ["evaluation", "export-config", "export-card"])
def test_prune_killed_leaves_no_partial_folder_and_no_record(prune_runs, point):
    seen = prune_runs["seen"][point]
    killed(seen["proc"])
    problems = []
    if seen["out_files"] is not None:
        problems.append(f"the target '{prune_runs['out'].name}' exists holding {seen['out_files']}")
    if seen["visible"] not in ([], ["out"]):
        problems.append(f"the work folder holds {seen['visible']}")
    if seen["experiments"]:
        problems.append(f"{len(seen['experiments'])} experiment record(s) without an export")
    assert not problems, f"killed during {point}: " + "; ".join(problems)


def test_prune_rerun_after_kills_is_clean(prune_runs):
    result = json.loads(ok(prune_runs["rerun"]).stdout)
    out = prune_runs["out"]
    assert visible(prune_runs["work"]) == ["out"]
    assert_complete_export(out)
    records = experiments(prune_runs["cache"])
    assert len(records) == 1 and records[0].problem is None
    assert records[0].label.startswith(result["experiment"])
    assert json.loads((out / "experiment.json").read_text())["id"] == result["experiment"]


# ---- export -------------------------------------------------------------------------------------
def test_export_killed_leaves_no_partial_folder(prune_runs, tmp_path):
    cache = prune_runs["cache"]
    rerun = prune_runs["rerun"]
    if rerun.returncode != 0:  # that failure is reported above; export is tested on its own record
        rerun = moescope("prune", "demo", "--plan", str(keep6_plan(tmp_path)), "-o", str(tmp_path / "fresh"), *EVAL,
                         "--json", cache=cache)
    ident = json.loads(ok(rerun).stdout)["experiment"]
    known = len(experiments(cache))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "exported"
    for fault in (f"write:{work}/*config.json", f"write:{work}/*README.md"):
        killed(moescope("export", ident, "-o", str(out), cache=cache, fault=fault))
        assert visible(work) == [], f"killed at {fault}: {work} holds {visible(work)}"
    ok(moescope("export", ident, "-o", str(out), cache=cache))
    assert visible(work) == ["exported"]
    assert_complete_export(out)
    assert len(experiments(cache)) == known  # export adds no record


# ---- SIGTERM during eval's efficiency child (issue 27) -------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_sigterm_stops_the_efficiency_child_at_once_and_removes_its_temp_file(tmp_path):
    """A SIGTERM'd ``eval`` stops its efficiency child at once (it ran on for ~35 s) and removes the
    child's spec file; it exits 143 with one line."""
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "MOESCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp)}
    env.pop("MOESCOPE_FAULT_AT", None)
    proc = subprocess.Popen([MOESCOPE, "eval", "demo", "--ppl", "demo:all", "--samples", "2", "--seq-len", "32",
                             "--repeats", "200", "--prompt-tokens", "64", "--new-tokens", "64", "--skip-calib", "none"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    children: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        children = _children(proc.pid)
        if children and list(tmp.glob("moescope-efficiency-*.json")):
            break
        time.sleep(0.2)
    assert children, f"the efficiency child never started: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    time.sleep(2)  # the child is loading or measuring
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.splitlines()[-1] == "moescope: terminated", (proc.returncode, err[-2000:])
    time.sleep(0.5)
    alive = [c for c in children if Path(f"/proc/{c}").exists()
             and Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"the efficiency child {alive} outlived its parent"
    assert list(tmp.glob("moescope-*")) == [], sorted(p.name for p in tmp.iterdir())  # (torch keeps its own)
