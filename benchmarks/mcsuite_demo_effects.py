"""What the published MC-Suite definitions and Lu et al.'s skipping change on a demo model, against the
variants moescope keeps under their own names (issue #22).

    python benchmarks/mcsuite_demo_effects.py [--model demo] [--samples 64] [--seq-len 256]
                                              [--ppl] [--keep 6 4] [--eval-tokens 2048]

Calibration: ``demo:all`` validation windows (seeded, 64×256 = 16,384 tokens by default). Prints per
MoE layer: the usage counts; the Spearman rank correlation between each criterion and its variant
(EAN / EAN-mean, EAS / EAS-output, EAO / EAO-frac); the first two experts each criterion drops at
either end (the pair criteria ECC / ETS by their pair rule); and for dynamic skipping with the
calibrated β the fraction of tokens that skip and the relative L2 distance of the layer output
from the unskipped one, with the kept weights renormalised (the paper) and left as they are.
``--ppl`` adds the pooled test perplexity (the first ``--eval-tokens`` test tokens of every
domain, as ``strategy_table.py``) after one-shot dropping by every criterion at both ends.
"""

from __future__ import annotations

import argparse

import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.data import sample_tokens
from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
from moescope.analysis.measure.criteria import criterion_scores
from moescope.analysis.measure.explore import spearman
from moescope.analysis.model import load_moe, skipping
from moescope.analysis.run.commands import tokenizer_for

ENDS = [("EAN", "min"), ("EAN-mean", "min"), ("ECC", "max"), ("ECC", "min"), ("ECC-rowsum", "max"),
        ("ECC-rowsum", "min"), ("ETS", "max"), ("ETS", "min"), ("ETS-cosine", "max"), ("ETS-cosine", "min"),
        ("EAO", "min"), ("EAO-frac", "min"), ("EAS", "max"), ("EAS-output", "max"), ("RWN", "max"), ("RWN", "min")]
PAIRS = [("EAN", "EAN-mean"), ("EAS", "EAS-output"), ("EAO", "EAO-frac")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl", action="store_true", help="also: perplexity after one-shot drops by every criterion")
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    ap.add_argument("--eval-tokens", type=int, default=2048, help="test tokens per domain")
    args = ap.parse_args()
    model = load_moe(args.model)
    batch = sample_tokens("demo:all", tokenizer_for(model, None), args.samples, args.seq_len)
    res = run_analysis(model, batch, AnalysisParams(metrics=("routing", "activations")), cache=Cache())
    print(f"{args.model}: {batch.describe()}\n")
    print("| layer | usage (tokens) | " + " | ".join(f"ρ({a}, {b})" for a, b in PAIRS) + " |")
    print("|---|---|" + "---:|" * len(PAIRS))
    for l in res.layers:
        rho = [spearman(res.criterion(l, a), res.criterion(l, b)) for a, b in PAIRS]
        usage = [int(u) for u in res.routing(l, "usage_count").tolist()]
        print(f"| {l} | {usage} | " + " | ".join(f"{r:+.3f}" for r in rho) + " |")

    print("\n| first two drops | " + " | ".join(f"layer {l}" for l in res.layers) + " |")
    print("|---|" + "---|" * len(res.layers))
    for name, end in ENDS:
        s = criterion_scores(res, name, end)
        first = [sorted(range(len(v)), key=lambda e: (float(v[e]), e))[:2] for v in (s[l] for l in res.layers)]
        print(f"| {end.capitalize()}-{name} | " + " | ".join(str(f) for f in first) + " |")

    xs: dict[int, list] = {}
    hooks = [v.block.register_forward_pre_hook(
        lambda m, a, _l=l: xs.setdefault(_l, []).append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for l, v in model.layers.items()]
    with torch.no_grad():
        for c in range(0, batch.input_ids.shape[0], 8):
            model.hf(input_ids=batch.input_ids[c:c + 8])
    for h in hooks:
        h.remove()
    betas = skipping.calibrate(res)
    print("\n| layer | β | tokens skipping | rel. error renormalised | rel. error not renormalised |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for l, v in model.layers.items():
            x = torch.cat(xs[l])
            r = v.route(x)
            full = v.combine(x, r)
            skip = skipping.skip_mask(r.topk_weights, betas[l])
            w = r.topk_weights
            err = {}
            for how, weights in (("renorm", skipping.renormalized(w, skip)), ("plain", w.masked_fill(skip, 0.0))):
                r.topk_weights = weights
                err[how] = float((v.combine(x, r) - full).norm() / full.norm())
            print(f"| {l} | {betas[l]:.4f} | {float(skip.any(-1).float().mean()):.3f} | {err['renorm']:.4f} | "
                  f"{err['plain']:.4f} |")
    if args.ppl:
        criteria_perplexity(model, batch, args.keep, args.eval_tokens)


def criteria_perplexity(model, batch, keeps: list[int], eval_tokens: int) -> None:
    """Pooled test perplexity after one-shot dropping by every criterion at both ends; the
    criterion's default end (the paper's better one) is marked with *."""
    import copy

    from moescope.analysis.evaluation import perplexity_by_domain
    from moescope.analysis.measure.criteria import CRITERIA
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.strategies import StrategyContext, make_plan

    ctx = StrategyContext(model, batch, Cache(), AnalysisParams())
    skipping.remove(model)
    base = perplexity_by_domain(model, "demo:all", max_tokens=eval_tokens)["all"]
    print(f"\nunpruned: {base:.2f}\n")
    print("| criterion | " + " | ".join(f"{end} keep {k}" for k in keeps for end in ("min", "max")) + " |")
    print("|---|" + "---:|" * (2 * len(keeps)))
    for name, c in CRITERIA.items():
        cells = []
        for k in keeps:
            for end in ("min", "max"):
                plan = make_plan("criterion", ctx, {"keep": k, "criterion": name, "order": end})
                ppl = perplexity_by_domain(apply(copy.deepcopy(model), plan), "demo:all", max_tokens=eval_tokens)["all"]
                cells.append(f"{ppl:.2f}" + ("*" if end == c.drop else ""))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
