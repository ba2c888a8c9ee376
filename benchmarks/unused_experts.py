"""Which one-shot criterion plans keep experts that no calibration token reached (issue #35).

    python benchmarks/unused_experts.py [--model demo] [--samples 64] [--seq-len 256] [--keep 6 4]

The calibration of the criterion table in README "Fidelity to the papers" (``demo:all`` validation
windows, 64×256 tokens, seed 0). For every MC-Suite criterion at both ends and every ``--keep``,
prints the plan's flag (:func:`~moescope.analysis.pruning.plan.unused_kept`): ``none``, or the count
and which experts, per layer, it keeps unused while dropping used ones; then the usage counts.
"""

from __future__ import annotations

import argparse

from moescope.analysis.core.cache import Cache
from moescope.analysis.data import sample_tokens
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.measure.criteria import CRITERIA
from moescope.analysis.model import load_moe
from moescope.analysis.pruning.plan import unused_kept_short
from moescope.analysis.run.commands import tokenizer_for
from moescope.analysis.strategies import StrategyContext, make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    args = ap.parse_args()
    model = load_moe(args.model)
    batch = sample_tokens("demo:all", tokenizer_for(model, None), args.samples, args.seq_len)
    ctx = StrategyContext(model, batch, Cache(), AnalysisParams())
    print(f"{args.model}: {batch.describe()}\n")
    print("| criterion | " + " | ".join(f"{end} keep {k}" for k in args.keep for end in ("min", "max")) + " |")
    print("|---|" + "---|" * (2 * len(args.keep)))
    for name in CRITERIA:
        cells = [unused_kept_short(make_plan("criterion", ctx, {"keep": k, "criterion": name, "order": end}))
                 for k in args.keep for end in ("min", "max")]
        if any(c != "none" for c in cells):
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    res = ctx.analysis(metrics=("routing",))
    print("\nusage (tokens): " + "; ".join(f"layer {l}: {[int(u) for u in res.routing(l, 'usage_count').tolist()]}"
                                          for l in res.layers))


if __name__ == "__main__":
    main()
