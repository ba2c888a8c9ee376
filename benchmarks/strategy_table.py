"""Both demo models pruned by several strategies at r experts per layer: test perplexity per domain.

    python benchmarks/strategy_table.py [--models demo demo-upcycled] [--keep 6 4]
                                        [--calib-samples 32] [--eval-tokens 2048] [--learned-epochs 50]
                                        [--presets NAME[:KEY=VALUE,...] ...] [--only LABEL ...]

Calibration: demo:all validation split (seeded); evaluation: the first --eval-tokens tokens of
each domain's test split, in 256-token windows (``all`` pools every evaluated token). Rows: the
drop strategies (frequency, enumerate, Min-EAN iterative (MC-Suite eq. 13) and Min-EAN-mean iterative) and group-and-merge with one grouping
(output CKA, greedy) under every alignment (none | weights | activations) × operator (usage,
learned, TIES), so rows of one operator differ only in the alignment: same groups, same
coefficients (learned ones are fitted on the aligned weights), then one row per ``--presets`` name
(a paper's recipe, ``analysis/strategies/presets.py``, on the same calibration batch; ``NAME:KEY=VALUE``
overrides a preset value, e.g. ``min-ean-lottery:start_tokens=16384``, and the row's label says so). Prints one
markdown table per model and r; ``plan s`` is the strategy's time, ``eval s`` the evaluation's.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

MERGE = {"representation": "outputs", "similarity": "cka_linear", "grouping": "greedy"}
STRATEGIES = [
    ("original", None, {}),
    ("frequency", "frequency", {}),
    ("enumerate (layer-wise)", "enumerate", {}),
    ("Min-EAN iterative", "criterion", {"criterion": "EAN", "order": "min", "mode": "iterative"}),
    ("Min-EAN-mean iterative", "criterion", {"criterion": "EAN-mean", "order": "min", "mode": "iterative"}),
] + [
    (f"merge {merge} · align {align}", "merge", {**MERGE, "merge": merge, "align": align})
    for merge in ("usage", "learned", "ties")
    for align in ("none", "weights", "activations")
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "demo-upcycled"])
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="test tokens per domain")
    ap.add_argument("--learned-epochs", type=int, default=50,
                    help="SGD epochs fitting the learned coefficients (group-and-merge App. A: 50)")
    ap.add_argument("--presets", nargs="*", default=[],
                    help="also a row per preset (e.g. gam-data hc-smoe mc-smoe); NAME:KEY=VALUE,... overrides its values")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", help="subset of strategy labels (--presets rows always run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.evaluation import perplexity_by_domain
    from moescope.analysis.measure.analyze import AnalysisParams
    from moescope.analysis.model import load_moe, wrap_model
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.strategies import StrategyContext, make_plan
    from moescope.analysis.strategies.presets import expand

    cache = Cache(tempfile.mkdtemp(prefix="moescope-strategy-table-"))
    for source in args.models:
        base = load_moe(source)
        calib = sample_tokens("demo:all", base.tokenizer, args.calib_samples, 256, seed=0)
        print(f"\n## {source}\n\ncalibration: {calib.describe()}; evaluation: first {args.eval_tokens} test tokens "
              "per domain", flush=True)
        first_original = None  # the unpruned row, measured once per model
        for keep in args.keep:
            rows = []
            table = STRATEGIES + [(f"preset {p}", *expand(*preset_overrides(p))) for p in args.presets]
            for label, name, params in table:
                if args.only and label not in args.only and label != "original" and not label.startswith("preset "):
                    continue
                if name is None and keep != args.keep[0]:
                    rows.append(first_original)
                    continue
                model = wrap_model(copy.deepcopy(base.hf), source=source, tokenizer=base.tokenizer)
                t0 = time.perf_counter()
                if name is not None:
                    ctx = StrategyContext(model, calib, cache,
                                          AnalysisParams(metrics=("routing", "activations", "similarity")))
                    extra = {"epochs": args.learned_epochs} if params.get("merge") == "learned" else {}
                    apply(model, make_plan(name, ctx, {"keep": keep, **params, **extra}), cache=cache)
                t1 = time.perf_counter()
                ppl = perplexity_by_domain(model, "demo:all", max_tokens=args.eval_tokens)
                rows.append((label, ppl, t1 - t0, time.perf_counter() - t1))
                if name is None:
                    first_original = rows[-1]
                print(f"  {source} r={keep} {label}: all {ppl['all']:.2f} ({t1 - t0:.0f}+{rows[-1][3]:.0f} s)", flush=True)
            domains = [d for d in rows[0][1] if d != "all"] + ["all"]
            print(f"\n### {source}, r = {keep} experts per layer (of 8)\n")
            print("| strategy | " + " | ".join(domains) + " | plan s | eval s |")
            print("|---" * (len(domains) + 3) + "|")
            for label, ppl, plan_s, eval_s in rows:
                print(f"| {label} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {plan_s:.1f} | {eval_s:.1f} |")
            print(flush=True)


def preset_overrides(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE,...`` → (NAME, {KEY: VALUE}); values are read as int, float or text."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for kind in (int, float, str):
            try:
                overrides[key] = kind(value)
                break
            except ValueError:
                continue
    return name, overrides


if __name__ == "__main__":
    main()
