"""Commands that only read configs or the cache start without torch: ``--help``, ``cache ls``,
``experiments ls`` always, ``info`` once the config has been described (cached by its sha256)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
from moescope.analysis.run.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules,
                  "modeling": "transformers.modeling_utils" in sys.modules}), file=sys.stderr)
"""


def run(args, cache_dir):
    env = {**os.environ, "MOESCOPE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    return json.loads(p.stderr.strip().splitlines()[-1]), p.stdout


def test_listing_commands_do_not_import_torch(tmp_path):
    for args in (["--help"], ["cache", "ls"], ["experiments", "ls"]):
        state, _ = run(args, tmp_path)
        assert state["rc"] == 0 and not state["torch"] and not state["modeling"], (args, state)


def test_info_is_cached_by_config_and_then_needs_no_torch(tmp_path):
    first, out1 = run(["info", "demo", "--json"], tmp_path)
    assert first["rc"] == 0 and first["torch"]  # described once from a meta-device model
    second, out2 = run(["info", "demo", "--json"], tmp_path)
    assert second["rc"] == 0 and not second["torch"] and not second["modeling"]
    assert json.loads(out2) == json.loads(out1)
    # another config (even the same family) is a miss, not a stale answer
    third, out3 = run(["info", "demo-upcycled", "--json"], tmp_path)
    assert third["torch"] and json.loads(out3)["source"] == "demo-upcycled"
