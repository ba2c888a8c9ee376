"""The demo model pruned by several strategies at r experts per layer: test perplexity per domain.

    python benchmarks/strategy_table.py [--keep 6 4] [--calib-samples 32] [--eval-tokens 16384]

Calibration: demo:all validation split (seeded); evaluation: the first --eval-tokens tokens of
each domain's test split, in 256-token windows. Prints one markdown table per r.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

STRATEGIES = [
    ("original", None, {}),
    ("random (seed 0)", "random", {"seed": 0}),
    ("frequency", "frequency", {}),
    ("Min-EAN one-shot", "criterion", {"criterion": "EAN", "order": "min"}),
    ("Min-EAN iterative", "criterion", {"criterion": "EAN", "order": "min", "mode": "iterative"}),
    ("enumerate (layer-wise)", "enumerate", {}),
    ("enumerate (progressive)", "enumerate", {"mode": "progressive"}),
    ("merge: CKA + spectral + uniform", "merge", {"similarity": "cka_linear", "grouping": "spectral", "merge": "uniform"}),
    ("merge: CKA + greedy + usage", "merge", {"similarity": "cka_linear", "grouping": "greedy", "merge": "usage"}),
    ("router-guided (usage)", "router-guided", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--only", nargs="*", help="subset of strategy labels")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from moescope.analysis.analyze import AnalysisParams
    from moescope.analysis.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.evaluation import perplexity_by_domain
    from moescope.analysis.model import load_moe, wrap_model
    from moescope.analysis.prune import apply
    from moescope.analysis.strategies import StrategyContext, make_plan

    base = load_moe("demo")
    calib = sample_tokens("demo:all", base.tokenizer, args.calib_samples, 256, seed=0)
    cache = Cache(tempfile.mkdtemp(prefix="moescope-strategy-table-"))
    print(f"calibration: {calib.describe()}; evaluation: first {args.eval_tokens} test tokens per domain")
    for keep in args.keep:
        rows = []
        for label, name, params in STRATEGIES:
            if args.only and label not in args.only:
                continue
            t0 = time.perf_counter()
            model = wrap_model(copy.deepcopy(base.hf), source="demo", tokenizer=base.tokenizer)
            if name is not None:
                ctx = StrategyContext(model, calib, cache, AnalysisParams(metrics=("routing", "activations", "similarity")))
                plan = make_plan(name, ctx, {"keep": keep, **params})
                apply(model, plan)
            ppl = perplexity_by_domain(model, "demo:all", max_tokens=args.eval_tokens)
            rows.append((label, ppl, time.perf_counter() - t0))
        domains = [d for d in rows[0][1] if d != "all"] + ["all"]
        print(f"\n### r = {keep} experts per layer (of 8)\n")
        print("| strategy | " + " | ".join(domains) + " | time (s) |")
        print("|---" * (len(domains) + 2) + "|")
        for label, ppl, secs in rows:
            print(f"| {label} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {secs:.1f} |")


if __name__ == "__main__":
    main()
