"""The README's CLI walk-through runs as written, start to end, in a scratch folder.

Every command line of the code blocks under "## CLI" runs in order (bash, a fresh cache) with the
README's own stand-ins filled in: ``./my-model`` is a tiny model folder made there first, and
``ID1`` / ``ID2`` / ``ID3`` are the ids ``moescope experiments ls --json`` lists, oldest first. The one line
that needs the network (a hub id) must, offline, end in moescope's one-line error with status 2.
Afterwards the scratch folder holds what the README says the commands write.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent


def walkthrough() -> list[str]:
    """The command lines of the README's CLI section, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                lines.append(line)
    return lines


def command(line: str) -> str:
    """``line`` without its trailing comment."""
    return line.split("  #", 1)[0]


def test_the_walkthrough_is_the_readme_sequence():
    lines = walkthrough()
    assert lines[0].startswith("moescope info demo") and lines[-1].startswith("lm_eval ")
    assert sum("ID1" in command(l) or "ID2" in command(l) for l in lines) >= 2 and any("./my-model" in l for l in lines)
    outputs = [m for l in lines for m in re.findall(r" -o (\S+)", l)]
    assert len(outputs) == len(set(outputs)), f"two commands write the same output: {outputs}"


def test_the_readme_cli_walkthrough_runs_as_written(tmp_path):
    from moescope.analysis.model.synthetic import save_tiny

    scratch = tmp_path / "walk"
    scratch.mkdir()
    save_tiny("mixtral", scratch / "my-model")
    env = {**os.environ, "MOESCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ids: list[str] = []
    last = None
    for line in walkthrough():
        if re.search(r"\bID\d\b", command(line)):
            if not ids:
                listed = subprocess.run(["moescope", "experiments", "ls", "--json"], env=env, cwd=scratch,
                                        capture_output=True, text=True, timeout=120)
                ids = [e["id"] for e in sorted(json.loads(listed.stdout), key=lambda e: e["created"])]
                assert len(ids) == 3, listed.stdout
            line = re.sub(r"\bID(\d)\b", lambda m, ids=ids: ids[int(m.group(1)) - 1], line)
        run = subprocess.run(["bash", "-c", line], env=env, cwd=scratch, capture_output=True, text=True,
                             timeout=1800)
        if re.match(r"moescope info [\w-]+/[\w.-]+", line):  # a hub id: offline, one line and status 2
            assert run.returncode == 2, f"{line}\n{run.stderr[-2000:]}"
            assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
            continue
        assert run.returncode == 0, f"{line}\nexit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        if command(line).split()[:3] == ["moescope", "experiments", "compare"] and len(command(line).split()) == 5:
            last = run.stdout
    # the walk-through's last compare: two plans of one setting, the second against the first, paired
    assert last is not None and f"({ids[2]}) against " in last and f"({ids[1]}), paired on the same windows" in last
    assert "different settings" not in last
    for name in ("plan.json", "merge.json", "ties.json", "ean.json", "manual.json", "lottery.json", "gam.json", "hc.json",
                 "compare.csv", "pruned/config.json", "pruned-eval/config.json", "pruned-merge/config.json",
                 "pruned-enum/plan.json",
                 "pruned-enum/README.md"):
        assert (scratch / name).is_file(), name
    assert any((scratch / "tables").iterdir())
