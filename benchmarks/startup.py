"""Start-up time of the commands that only read configs or the cache, in fresh processes, against
the same command with what it imported before (the registry's plan flags for ``--help``, the
evaluation package for ``experiments ls``, an uncached ``info`` that builds the meta-device model).

    python benchmarks/startup.py [--repeats 3]

Prints the median wall time of each and their ratio; every pair runs interleaved in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    ("moescope --help", "main(['--help'])", "import moescope.analysis.strategies; main(['--help'])"),
    ("moescope cache ls", "main(['cache', 'ls'])", "import moescope.analysis.strategies; main(['cache', 'ls'])"),
    ("moescope experiments ls", "main(['experiments', 'ls'])",
     "import moescope.analysis.evaluation; main(['experiments', 'ls'])"),
    ("moescope info demo", "main(['info', 'demo'])", "CLEAR; main(['info', 'demo'])"),
]


def run(code: str, cache: str) -> float:
    if code.startswith("CLEAR; "):
        subprocess.run([sys.executable, "-m", "moescope.analysis.run.cli", "cache", "clear", "--kind", "model_info"],
                       env={**os.environ, "MOESCOPE_CACHE": cache}, capture_output=True)
        code = code[len("CLEAR; "):]
    prog = f"from moescope.analysis.run.cli import main\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", prog], env={**os.environ, "MOESCOPE_CACHE": cache}, capture_output=True,
                   check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        run(CASES[-1][1], cache)  # the info of the demo config is in the cache from here on
        print("| command | now (s) | with the old imports (s) | ratio |\n|---|---:|---:|---:|")
        for name, now_code, old_code in CASES:
            now, old = [], []
            for _ in range(args.repeats):
                old.append(run(old_code, cache))
                now.append(run(now_code, cache))
            a, b = statistics.median(now), statistics.median(old)
            print(f"| `{name}` | {a:.2f} | {b:.2f} | {b / a:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
