"""Benchmark: how long each dashboard page takes to render on the demo model with a warm cache.

    python benchmarks/dashboard_render.py [--samples 64 --seq-len 256 --grid-samples 16 --grid-seq-len 256 --repeat 5]
    python benchmarks/dashboard_render.py --wide 48x128   # a random 48-layer, 128-expert model (Qwen3-30B-A3B's
                                                          # layer and expert counts, tiny widths; no drop grid)

Fills a throw-away cache with what the pages read (the analysis, the routing trace and the drop
grid, computed by the library the way ``moescope analyze`` / ``moescope grid`` do; the defaults
are the dashboard's own defaults), then renders each page through Streamlit's AppTest:

* ``first``: the first render of that page in this process (Streamlit's in-memory caches cold, so
  it reads the stored results from disk; the first page also loads the model),
* ``warm``: the median of ``--repeat`` renders, each in a fresh session (a person opening the app
  again, or another browser tab), with Streamlit's caches warm.

The time is the server-side script run only (not the browser drawing the plotly figures). Torch
runs on one thread: AppTest polls the page's thread every millisecond from the main thread, which
makes multi-threaded torch crawl (the real server has no such poller), and one thread is also
steady when other processes share the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")

# (label, page file, extra session state)
PAGES = [
    ("Model & data", "model.py", {}),
    ("Similarity (one layer)", "similarity.py", {}),
    ("Similarity (clustered)", "similarity.py", {"sim_order": "by clustering"}),
    ("Similarity (all layers)", "similarity.py", {"sim_view": "All layers"}),
    ("Routing (usage)", "routing.py", {}),
    ("Routing (tokens)", "routing.py", {"route_view": "Tokens"}),
    ("Routing (skipping)", "routing.py", {"route_view": "Skipping"}),
    ("Expert maps (+ grid ρ)", "expert_maps.py", {}),
    ("Drop grid", "drop_grid.py", {}),
    ("Plan (strategy)", "plan.py", {}),
    ("Plan (by hand)", "plan.py", {"plan_mode": "By hand"}),
]


def render(settings: dict, page: str, extra: dict) -> float:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=300)
    for k, v in settings.items():
        at.session_state[k] = v
    if page != "model.py":
        at.run()  # open the app (the Model & data page), then go to the page
        at.switch_page(f"app_pages/{page}")
    for k, v in extra.items():
        at.session_state[k] = v
    t0 = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - t0
    if at.exception or at.error:
        raise SystemExit(f"{page}: {[e.value for e in at.exception] or [e.value for e in at.error]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grid-samples", type=int, default=16)
    ap.add_argument("--grid-seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--wide", default=None, metavar="LxE",
                    help="render a random Qwen3-MoE of L layers and E experts (top-8, hidden 32) instead of the demo")
    ap.add_argument("--cache", default=None, metavar="DIR", help="reuse (or fill) this cache folder")
    args = ap.parse_args()
    cache_dir = args.cache or tempfile.mkdtemp(prefix="moescope-bench-dashboard-")
    os.environ["MOESCOPE_CACHE"] = cache_dir
    sys.path.insert(0, str(REPO))

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.measure.explore import routing_trace
    from moescope.analysis.measure.sensitivity import cached_drop_grid
    from moescope.analysis.model import load_moe

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    source = "demo"
    if args.wide:
        import shutil

        from moescope.analysis.model.synthetic import save_tiny

        n_layers, n_experts = (int(v) for v in args.wide.lower().split("x"))
        source = str(Path(cache_dir) / f"wide-{n_layers}x{n_experts}")
        if not (Path(source) / "config.json").is_file():
            save_tiny("qwen3_moe", source, vocab_size=4096, num_hidden_layers=n_layers, num_experts=n_experts,
                      num_experts_per_tok=8, max_position_embeddings=512)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REPO / "demo" / "model" / name, Path(source) / name)
    model = load_moe(source)
    calib = sample_tokens("demo:all", model.tokenizer, args.samples, args.seq_len, seed=0, split="validation")
    evalb = sample_tokens("demo:all", model.tokenizer, args.grid_samples, args.grid_seq_len, seed=0, split="test")
    run_analysis(model, calib, AnalysisParams(), cache=Cache(cache_dir))
    routing_trace(model, calib, cache=Cache(cache_dir))
    if not args.wide:  # 48 x 128 cells of the grid would take the benchmark far longer than the pages
        cached_drop_grid(model, evalb, Cache(cache_dir))
    warmup = time.perf_counter() - t0
    del model

    settings = {"model": source, "calib_samples": args.samples, "calib_seq_len": args.seq_len,
                "grid_samples": args.grid_samples, "grid_seq_len": args.grid_seq_len}
    print(f"{'demo model' if not args.wide else f'random Qwen3-MoE {args.wide} (layers x experts)'}; calibration {calib.describe()}; drop grid on {evalb.describe()}")
    print(f"cache filled in {warmup:.1f} s (analysis, routing trace, drop grid); {args.repeat} warm renders per page")
    print(f"{'page':<26}{'first':>9}{'warm (median)':>16}{'warm (max)':>13}")
    rows = []
    for label, page, extra in PAGES:
        if args.wide and label == "Drop grid":
            continue
        first = render(settings, page, extra)
        warm = [render(settings, page, extra) for _ in range(args.repeat)]
        rows.append((label, first, statistics.median(warm), max(warm)))
        print(f"{label:<26}{first:>8.3f}s{statistics.median(warm):>15.3f}s{max(warm):>12.3f}s", flush=True)
    worst = max(r[2] for r in rows)
    print(f"slowest warm page: {worst:.3f} s ({'under' if worst < 1 else 'OVER'} the 1 s target)")


if __name__ == "__main__":
    main()
