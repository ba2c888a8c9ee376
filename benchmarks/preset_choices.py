"""What three of moescope's readings of the papers change on a demo model (issue #35, README
"Fidelity to the papers").

    python benchmarks/preset_choices.py [--model demo] [--samples 64] [--seq-len 256] [--learned-samples 16]

Calibration: ``demo:all`` validation windows, seed 0 (64×256 tokens by default).

* WSR (MC-Suite eq. 5 names one "expert weight matrix"; moescope averages the stable ranks of
  W_gate, W_up and W_down): the first two experts Max-WSR drops per layer, for the mean and for each
  matrix alone.
* EGE (eq. 15, "the accumulated gradients" of the expert's weights; moescope takes W_down's): the
  first two experts Min-EGE drops per layer, W_down alone against all three matrices (eq. 15 over
  the hidden dimensions of the three gradients side by side, i.e. the sum of their entropies).
* CKA (group-and-merge eq. 3 is printed HSIC(K,L) / (HSIC(K,K)·HSIC(L,L)), without the square root
  of the definition it cites): on the first ``--cka-tokens`` calibration tokens of every MoE layer
  (experts run on the same tokens, router bypassed), the spectral groups (r = 2…7) of linear CKA
  against those of the literal eq. 3 (scaled to a maximum of 1; spectral clustering's normalised
  Laplacian ignores a global scale): how many of the (layer, r) cases give the same partition.
* Enumeration (Lu et al. eq. 3: one norm over all tokens; the authors' ``wrapper.py``: the sum of
  each batch's norm, batches of 8 sequences): the kept subset per layer and keep r = 2…7 under each;
  how many (layer, r) cases differ.
* The learned merge (group-and-merge eq. 6, ``gam-learned`` at keep 6 on ``--learned-samples``
  sequences): λ of every single-expert group (eq. 6 read literally scales every output expert, a
  kept one too), and the pooled test perplexity (2048 test tokens per domain) with those λ and with
  the single experts left at 1.
"""

from __future__ import annotations

import argparse
import copy

import torch
from moescope.analysis.core.cache import Cache
from moescope.analysis.data import sample_tokens
from moescope.analysis.evaluation import perplexity_by_domain
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure.analyze import AnalysisParams
from moescope.analysis.measure.criteria import GradientStats, criterion
from moescope.analysis.model import load_moe
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.commands import tokenizer_for
from moescope.analysis.strategies import StrategyContext
from moescope.analysis.strategies.presets import make_preset_plan


@criterion("EGE-all3", "gradient entropy over the hidden dimensions of all three weight gradients", "gradients")
def _ege_all3(s: GradientStats) -> torch.Tensor:
    return torch.tensor([M.gaussian_entropy(torch.cat([g.gate.float(), g.up.float(), g.down.float().T], 1).cpu())
                         for g in s.per_expert], dtype=torch.float32)


def first_two(values: torch.Tensor, end: str) -> list[int]:
    sign = 1 if end == "min" else -1
    return sorted(range(len(values)), key=lambda e: (sign * float(values[e]), e))[:2]


@torch.no_grad()
def cka_comparison(model, batch, tokens: int) -> None:
    from moescope.analysis.measure.capture import LayerStream
    from moescope.analysis.measure.metrics import _cka_from_hsic, _feature_form_hsic
    from moescope.analysis.model.merging import affinity, group_experts

    same = total = 0
    for l, x in LayerStream(model, batch.input_ids).layers():
        if x is None:
            continue
        Y = model.layers[l].expert_outputs(x[:tokens]).float()  # [E, t, d], router bypassed
        hsic = _feature_form_hsic(Y, 512 * 2**20).double()
        standard = affinity(_cka_from_hsic(hsic).float(), "cka_linear")
        literal = hsic / (hsic.diagonal()[:, None] * hsic.diagonal()[None, :])
        literal = literal / literal.max()
        for r in range(2, model.layers[l].num_experts):
            a, b = group_experts(standard, r, "spectral"), group_experts(literal, r, "spectral")
            same += sorted(a) == sorted(b)
            total += 1
    print(f"linear CKA (with the square root) and eq. 3 as printed give the same spectral groups in {same} of "
          f"{total} (layer, r = 2…7) cases, on {tokens} tokens per layer\n")


@torch.no_grad()
def enumeration_objectives(model, batch, sequences: int = 8) -> None:
    from moescope.analysis.measure.capture import LayerStream
    from moescope.analysis.measure.sensitivity import SubsetScorer, enumerate_layer

    differ, total = [], 0
    for l, x in LayerStream(model, batch.input_ids).layers():
        if x is None:
            continue
        view = model.layers[l]
        eq3 = SubsetScorer(view, x)
        per_batch = SubsetScorer(view, x, batch_tokens=sequences * batch.input_ids.shape[1])
        for r in range(max(2, view.top_k), view.num_experts):
            a = enumerate_layer(view, x, r, scorer=eq3).keep
            b = enumerate_layer(view, x, r, scorer=per_batch).keep
            total += 1
            if a != b:
                differ.append(f"layer {l} keep {r}: {a} / {b}")
    print(f"enumeration, eq. 3 / per-batch ({sequences} sequences): different subsets in {len(differ)} of {total} "
          f"(layer, keep) cases" + (": " + "; ".join(differ) if differ else "") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--learned-samples", type=int, default=16)
    ap.add_argument("--cka-tokens", type=int, default=4096)
    ap.add_argument("--cka-only", action="store_true", help="only the CKA comparison")
    ap.add_argument("--enumeration-only", action="store_true", help="only the enumeration objectives")
    args = ap.parse_args()
    model = load_moe(args.model)
    tok = tokenizer_for(model, None)
    batch = sample_tokens("demo:all", tok, args.samples, args.seq_len)
    print(f"{args.model}: {batch.describe()}\n")
    if not args.enumeration_only:
        cka_comparison(model, batch, args.cka_tokens)
    if args.cka_only:
        return
    enumeration_objectives(model, batch)
    if args.enumeration_only:
        return

    print("Max-WSR, first two drops per layer")
    print("| matrices | " + " | ".join(f"layer {l}" for l in model.layers) + " |")
    print("|---|" + "---|" * len(model.layers))
    for label, pick in (("mean of the three (moescope)", None), ("W_gate", "gate"), ("W_up", "up"), ("W_down", "down")):
        cells = []
        for view in model.layers.values():
            ws = [view.expert_weights(e) for e in range(view.num_experts)]
            v = torch.tensor([sum(M.stable_rank(getattr(w, m)) for m in ("gate", "up", "down")) / 3 if pick is None
                              else M.stable_rank(getattr(w, pick)) for w in ws])
            cells.append(str(first_two(v, "max")))
        print(f"| {label} | " + " | ".join(cells) + " |")

    ctx = StrategyContext(model, batch, Cache(), AnalysisParams())
    res = ctx.analysis(metrics=("routing", "gradients"))
    print("\nMin-EGE, first two drops per layer")
    print("| gradient | " + " | ".join(f"layer {l}" for l in res.layers) + " |")
    print("|---|" + "---|" * len(res.layers))
    for label, name in (("W_down (moescope)", "EGE"), ("all three", "EGE-all3")):
        print(f"| {label} | " + " | ".join(str(first_two(res.criterion(l, name), "min")) for l in res.layers) + " |")

    learn = sample_tokens("demo:all", tok, args.learned_samples, args.seq_len)
    plan = make_preset_plan("gam-learned", StrategyContext(model, learn, Cache()), {"keep": 6})
    lam = {l: [c[0] for g, c in zip(lp.groups, lp.coefficients) if len(g) == 1] for l, lp in plan.layers.items()}
    print(f"\ngam-learned keep 6 on {learn.describe()}: λ of the single-expert groups per layer: "
          + "; ".join(f"layer {l}: " + ", ".join(f"{x:.3f}" for x in v) for l, v in lam.items()))
    unit = PruningPlan.from_json(plan.to_json())
    for lp in unit.layers.values():
        lp.coefficients = [[1.0] if len(g) == 1 else c for g, c in zip(lp.groups, lp.coefficients)]
        if lp.router_coefficients is not None:
            lp.router_coefficients = [[1.0] if len(g) == 1 else c for g, c in zip(lp.groups, lp.router_coefficients)]
    for label, p in (("singletons scaled by λ (eq. 6 literally)", plan), ("singletons at 1", unit)):
        ppl = perplexity_by_domain(apply(copy.deepcopy(model), p), "demo:all", max_tokens=2048)["all"]
        print(f"  {label}: pooled test perplexity {ppl:.2f}")


if __name__ == "__main__":
    main()
