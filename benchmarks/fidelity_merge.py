"""What the published definitions of issue #22 (part B) change on the demos, measured side by side.

    python benchmarks/fidelity_merge.py [--models demo demo-upcycled] [--calib-samples 64]
                                        [--similarity-tokens 8192] [--skip-learned]

Per model, on ``--calib-samples`` × 256 ``demo:all`` calibration tokens (seeded), every MoE layer and
every group count r = 2 … E−1, how often the grouping moescope used before equals the published one:

- router-guided (MC-SMoE): leaders by usage, members by the cosine of the raw router-logit columns,
  against the centred (Pearson) similarity used before;
- spectral grouping (MC-SMoE ``grouping.py``): k-means label assignment against discretize, on the
  linear-CKA and cosine affinities;
- HC-SMoE: average linkage on Euclidean distances between mean outputs, against average linkage on
  the output similarities that were offered (linear CKA, cosine, MSE);
- RBF CKA over the whole batch against the 4 × 512-token mini-batch mean, and whether spectral groups
  on it change;
- augmentation (Algorithm 1's mixup of token embeddings, one mixed sequence per calibration
  sequence) against none, on the linear-CKA spectral groups;

then the TIES merge of demo-upcycled layer 1, group [3, 4] with its usage weights (the weighted mean
against the previous floating-point sign election), and the learned merge (eq. 6) coefficients.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch


def _count(pairs) -> str:
    pairs = list(pairs)
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "demo-upcycled"])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--similarity-tokens", type=int, default=8192, help="tokens of the output similarities")
    ap.add_argument("--skip-learned", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.merging import affinity, group_experts, router_guided_groups, ties_merge
    from moescope.analysis.strategies import StrategyContext, make_plan

    cache = Cache(tempfile.mkdtemp(prefix="moescope-fidelity-"))
    for source in args.models:
        model = load_moe(source)
        calib = sample_tokens("demo:all", model.tokenizer, args.calib_samples, 256, seed=0)
        print(f"\n## {source} (calibration {calib.describe()})", flush=True)
        params = AnalysisParams(metrics=("routing", "similarity"), similarity_tokens=args.similarity_tokens)
        res = run_analysis(model, calib, params, cache=cache)
        cases = [(l, r) for l in res.layers for r in range(2, res.num_experts(l))]

        def grouped(l, name, r, method, res=res):
            S = res.similarity(l, name)
            D = S if ("mse" in name or "euclidean" in name) else None
            return group_experts(affinity(S, name), r, method, 0, D)

        usage = {l: res.routing(l, "usage") for l in res.layers}
        rg = [(router_guided_groups(usage[l], res.routing(l, "logit_correlation"), r),
               router_guided_groups(usage[l], res.routing(l, "logit_similarity"), r)) for l, r in cases]
        print(f"router-guided: centred (before) = raw-logit cosine (MC-SMoE) in {_count(rg)} (layer, r) cases")
        for sim in ("cka_linear", "cosine"):
            sp = [(grouped(l, sim, r, "spectral_discretize"), grouped(l, sim, r, "spectral")) for l, r in cases]
            print(f"spectral on {sim}: discretize (before) = k-means (MC-SMoE) in {_count(sp)}")
        for sim in ("cka_linear", "cosine", "mse"):
            hc = [(grouped(l, sim, r, "agglomerative"), grouped(l, "mean_output_euclidean", r, "agglomerative"))
                  for l, r in cases]
            print(f"HC-SMoE partition (mean outputs, Euclidean, average linkage) = average linkage on {sim} in "
                  f"{_count(hc)}")
        for l in res.layers:
            diff = (res.similarity(l, "cka_rbf") - res.similarity(l, "cka_rbf_minibatch")).abs().max()
            rbf = [(grouped(l, "cka_rbf_minibatch", r, "spectral"), grouped(l, "cka_rbf", r, "spectral"))
                   for r in range(2, res.num_experts(l))]
            print(f"layer {l}: RBF CKA full batch vs 4×512 mini-batch mean: max |Δ| {diff:.4f}; spectral groups "
                  f"equal in {_count(rbf)} r")
        aug = run_analysis(model, calib, AnalysisParams(metrics=("routing", "similarity"), augment_ratio=1.0,
                                                        augment="embeddings", similarity_tokens=args.similarity_tokens),
                           cache=cache)
        same = []
        for l, r in cases:
            A0, A1 = affinity(res.similarity(l, "cka_linear"), "cka"), affinity(aug.similarity(l, "cka_linear"), "cka")
            same.append((group_experts(A0, r, "spectral"), group_experts(A1, r, "spectral")))
        dmax = max(float((res.similarity(l, "cka_linear") - aug.similarity(l, "cka_linear")).abs().max())
                   for l in res.layers)
        print(f"augmentation (embedding mixup, ratio 1): linear CKA moves by up to {dmax:.4f}; spectral groups "
              f"equal to the unaugmented ones in {_count(same)}")

        if source == "demo-upcycled" and 1 in model.layers:
            view = model.layers[1]
            u = usage[1][[3, 4]].double()
            w = (u / u.sum()).tolist()
            P = view.experts.gate_up_proj.detach()[[3, 4]].float()
            want = w[0] * P[0] + w[1] * P[1]
            new = ties_merge(P, w, 0.2)
            old = _old_ties(P, w, 0.2)
            print(f"TIES layer 1 [3, 4], weights {w[0]:.2f}/{w[1]:.2f}: before {int(((old - want).abs() > 1e-6).sum())} "
                  f"of {want.numel()} gate_up entries off the weighted mean by up to {float((old - want).abs().max()):.4f}; "
                  f"now {float((new - want).abs().max()):.2e}")

        if not args.skip_learned:
            ctx = StrategyContext(model, calib, cache, params)
            plan = make_plan("merge", ctx, {"keep": 6, "merge": "learned", "grouping": "greedy"})
            for l, lp in sorted(plan.layers.items()):
                info = plan.provenance["learned"][str(l)]
                singles = [a for g, a in zip(lp.groups, lp.router_coefficients) if len(g) == 1]
                print(f"learned merge layer {l}: λ {[round(v, 3) for v in info['lambda']]}, router Σα "
                      f"{[round(sum(a), 6) for a in lp.router_coefficients]}, single-expert router rows "
                      f"{sorted({a[0] for a in singles})}, held-out ‖y − F‖ {info['held_loss_start']:.3f} → "
                      f"{info['held_loss_end']:.3f} ({'kept' if info['kept'] else 'uniform kept'})", flush=True)


def _old_ties(P, coeffs, density):
    """The TIES merge as it was before issue #22: the sign elected by the floating-point mass."""
    import math

    c = torch.as_tensor(coeffs, dtype=torch.float32)
    w = c / c.sum()
    mean = (w[:, None, None] * P).sum(0)
    tau = (P - mean).reshape(P.shape[0], -1)
    k = max(1, math.ceil(density * tau.shape[1]))
    thresh = tau.abs().topk(k, dim=1).values[:, -1:]
    tau = torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))
    mass = (w[:, None] * tau).sum(0)
    sign = torch.where(mass.abs() <= 1e-6 * (w[:, None] * tau.abs()).sum(0), torch.zeros_like(mass), torch.sign(mass))
    agree = (torch.sign(tau) == sign) & (tau != 0)
    num, den = (w[:, None] * tau * agree).sum(0), (w[:, None] * agree).sum(0)
    delta = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return float(c.sum()) * (mean + delta.reshape(mean.shape))


if __name__ == "__main__":
    main()
