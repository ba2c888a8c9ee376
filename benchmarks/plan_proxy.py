"""Benchmark: how well the Plan page's predicted cost ranks plans, against the full evaluation.

    python benchmarks/plan_proxy.py [--calib-samples 16 --seq-len 256 --eval-samples 96]

Builds ten plans for the demo model (frequency, random, criterion EAN and REAP, enumerate, the drop
grid and a merge, keeping 6 or 4 of 8 experts per layer), then for each one

* the **proxy** the Plan page shows before any run: perplexity on 8×128 test tokens with the plan
  applied to the loaded model (:func:`analysis.named_plans.predict_cost`), and for drop-only plans
  the sum of the drop grid's single-drop changes;
* the **full evaluation** a run does: perplexity on ``--eval-samples`` windows of 256 test tokens
  of every demo domain (the Run page's defaults are 48; the CLI's 96) on a freshly pruned copy.

It prints both per plan, their Spearman rank correlation, and the time each took. Everything is
computed in a throw-away cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=96)
    args = ap.parse_args()
    os.environ["MOESCOPE_CACHE"] = tempfile.mkdtemp(prefix="moescope-bench-proxy-")

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.evaluation import perplexity_windows
    from moescope.analysis.measure.explore import spearman
    from moescope.analysis.measure.sensitivity import cached_drop_grid, perplexity
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.run.named_plans import predict_cost, proxy_batch
    from moescope.analysis.strategies.base import StrategyContext, make_plan

    cache = Cache()
    model = load_moe("demo")
    calib = sample_tokens("demo:all", model.tokenizer, args.calib_samples, args.seq_len, seed=0)
    ctx = StrategyContext(model, calib, cache)
    requests = [("frequency", {"keep": 6}), ("frequency", {"keep": 4}), ("random", {"keep": 6}),
                ("random", {"keep": 4}), ("criterion", {"keep": 6, "criterion": "EAN"}),
                ("criterion", {"keep": 4, "criterion": "REAP"}), ("enumerate", {"keep": 6}),
                ("enumerate", {"keep": 4}), ("drop-grid", {"keep": 5}), ("merge", {"keep": 6, "merge": "usage"})]
    grid = cached_drop_grid(model, sample_tokens("demo:all", model.tokenizer, 16, 256, seed=0, split="test"), cache)
    batch = proxy_batch(model)
    full_batch = perplexity_windows("demo:all", model.tokenizer, samples=args.eval_samples, seq_len=256)
    print(f"demo model; proxy on {batch.describe()}; full evaluation on {full_batch.describe()}; "
          f"{torch.get_num_threads()} threads")
    rows = []
    t_full_orig = time.perf_counter()
    full_orig = perplexity(model, full_batch.input_ids)
    t_full_orig = time.perf_counter() - t_full_orig
    for name, params in requests:
        plan = make_plan(name, ctx, params)
        label = f"{name} " + " ".join(f"{k}={v}" for k, v in params.items())
        t0 = time.perf_counter()
        cost = predict_cost(model, plan, batch, grid=grid, cache=cache)
        t_proxy = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = perplexity(apply(load_moe("demo"), plan), full_batch.input_ids)
        t_full = time.perf_counter() - t0
        rows.append((label, cost.proxy_ppl_after, cost.grid_sum, full, t_proxy, t_full))
    print(f"\n| plan | proxy ppl ({batch.input_ids.numel()} tokens) | grid Σ Δppl | full ppl "
          f"({full_batch.input_ids.numel()} tokens) | proxy s | full s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| original | {cost.proxy_ppl_before:.2f} | | {full_orig:.2f} | | {t_full_orig:.1f} |")
    for label, p, g, f, tp, tf in rows:
        print(f"| {label} | {p:.2f} | {'' if g is None else f'{g:+.3f}'} | {f:.2f} | {tp:.1f} | {tf:.1f} |")
    rho = spearman([r[1] for r in rows], [r[3] for r in rows])
    drops = [r for r in rows if r[2] is not None]
    rho_grid = spearman([r[2] for r in drops], [r[3] for r in drops])
    print(f"\nSpearman(proxy, full) over {len(rows)} plans: {rho:.3f}")
    print(f"Spearman(grid Σ, full) over the {len(drops)} drop-only plans: {rho_grid:.3f}")
    print(f"time: proxy {sum(r[4] for r in rows):.1f} s for all plans, full evaluations {sum(r[5] for r in rows):.1f} s")


if __name__ == "__main__":
    main()
