"""Benchmark: full analysis of the demo model, per layer and per metric family; cached re-runs.

    python benchmarks/analyze_demo.py [--samples 64 --seq-len 256]

Prints (1) the wall time of the first analysis (all metrics but gradients) with the time per
layer and per metric family, (2) the gradient pass separately, and (3) the cached re-run both
in-process and as a fresh `moescope analyze` process, each as a ratio to the first run. Uses a
throw-away cache folder so the first run really computes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cache_dir = tempfile.mkdtemp(prefix="moescope-bench-cache-")
    os.environ["MOESCOPE_CACHE"] = cache_dir

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import FORWARD_METRICS, AnalysisParams, run_analysis
    from moescope.analysis.model import load_moe

    model = load_moe("demo")
    batch = sample_tokens("demo:all", model.tokenizer, args.samples, args.seq_len, seed=0)
    params = AnalysisParams(metrics=FORWARD_METRICS)
    cache = Cache(cache_dir)

    t0 = time.perf_counter()
    res = run_analysis(model, batch, params, cache=cache)
    first = time.perf_counter() - t0
    print(f"demo model, {batch.describe()}, {torch.get_num_threads()} threads")
    print(f"first analysis (all metrics but gradients): {first:.2f} s "
          f"({'under' if first < 60 else 'OVER'} the 60 s target)")
    print(f"  layer streaming (decoder layers incl. attention): "
          f"{res.meta['timings']['stream_s'] - sum(res.timings(l)['total'] for l in res.layers):.2f} s")
    families = sorted({k for l in res.layers for k in res.timings(l) if k != "total"})
    print("  layer  " + "  ".join(f"{f:>14}" for f in families) + "       total")
    for l in res.layers:
        t = res.timings(l)
        print(f"  {l:>5}  " + "  ".join(f"{t.get(f, 0.0):>13.2f}s" for f in families) + f"  {t['total']:>9.2f}s")
    sums = {f: sum(res.timings(l).get(f, 0.0) for l in res.layers) for f in families}
    print("  all    " + "  ".join(f"{sums[f]:>13.2f}s" for f in families))

    t0 = time.perf_counter()
    run_analysis(model, batch, AnalysisParams(metrics=("gradients",)), cache=cache)
    print(f"gradient criteria (one forward+backward pass over the batch): {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    again = run_analysis(model, batch, params, cache=cache)
    cached = time.perf_counter() - t0
    assert again.entry.path == res.entry.path
    print(f"cached re-run in-process: {cached * 1000:.1f} ms  -> {first / cached:.0f}x faster than the first")

    cmd = [sys.executable, "-m", "moescope.analysis.run.cli", "analyze", "demo", "--calib", "demo:all", "--samples",
           str(args.samples), "--seq-len", str(args.seq_len), "--metrics", ",".join(FORWARD_METRICS), "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    cli = time.perf_counter() - t0
    assert json.loads(out.stdout)["cache_entry"] == str(res.entry.path)
    print(f"cached re-run as a new `moescope analyze` process: {cli:.2f} s -> {first / cli:.1f}x faster "
          f"(includes Python start-up and importing torch/transformers)")


if __name__ == "__main__":
    main()
