"""Size and speed of the demo model before and after pruning, with and without dynamic skipping.

Each measurement runs in a fresh process (analysis.evaluation.isolated_efficiency); the original
and the pruned model alternate for ``--rounds`` rounds so that drifts in machine load hit both,
and the table prints the median of the rounds and the pruned/original ratios.

    python benchmarks/efficiency.py [--keep 6] [--rounds 3] [--new-tokens 64]

``--load`` instead measures what the machine-load reading sees: this process spinning alone
(not counted: about 0 cores on a quiet machine) and a child process spinning beside it (about 1
core), printed side by side; a figure needs a quiet machine to mean anything, so it is a
benchmark, not a test (the tests check the arithmetic on given readings).
"""

from __future__ import annotations

import argparse
import statistics

from moescope.analysis.evaluation import EfficiencyParams, isolated_efficiency
from moescope.analysis.model import load_moe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, default=6, help="experts kept per layer (frequency strategy)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--load", action="store_true", help="measure the machine-load reading instead")
    args = ap.parse_args()
    if args.load:
        return machine_load()

    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.model import skipping
    from moescope.analysis.strategies import StrategyContext, make_plan

    model = load_moe("demo")
    batch = sample_tokens("demo:all", model.tokenizer, 32, 256, split="validation")
    cache = Cache()
    plan = make_plan("frequency", StrategyContext(model, batch, cache), {"keep": args.keep})
    betas = skipping.calibrate(run_analysis(model, batch, AnalysisParams(metrics=("routing",)), cache=cache))
    params = EfficiencyParams(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                              batch_size=args.batch_size, repeats=5)
    runs: dict[str, list[dict]] = {"original": [], "pruned": []}
    for r in range(args.rounds):
        for name, p in (("original", None), ("pruned", plan)):
            runs[name].append(isolated_efficiency("demo", p.to_json() if p else None, params, betas))
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)

    def med(name: str, variant: str, key: str) -> float:
        return statistics.median(m[variant][key] for m in runs[name])

    print(f"\ndemo, frequency keep={args.keep}, {args.batch_size}×{args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, median of {args.rounds} rounds × 5 repeats\n")
    print(f"{'':34}{'original':>12}{'pruned':>12}{'ratio':>8}")
    rows = [("parameters", "plain", "params_total"), ("weight bytes", "plain", "weight_bytes"),
            ("peak RSS while generating (bytes)", "plain", "peak_memory_bytes"),
            ("prefill tokens/s", "plain", "prefill_tokens_per_s"),
            ("generation tokens/s", "plain", "generate_tokens_per_s"),
            ("generation tokens/s, skipping", "skip", "generate_tokens_per_s"),
            ("expert calls skipped", "skip", "skipped_fraction")]
    for label, variant, key in rows:
        o, p = med("original", variant, key), med("pruned", variant, key)
        print(f"{label:34}{o:>12.4g}{p:>12.4g}{p / o:>8.3f}")
    o_plain, o_skip = med("original", "plain", "generate_tokens_per_s"), med("original", "skip", "generate_tokens_per_s")
    print(f"\nskipping speed-up on the original: {o_skip / o_plain:.3f}×")


def machine_load(seconds: float = 1.0) -> None:
    """Cores the load reading counts while this process spins, then while a child spins too."""
    import subprocess
    import sys
    import time

    from moescope.analysis.evaluation.efficiency import MachineLoad

    def spin():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass

    with MachineLoad() as alone:
        spin()
    child = subprocess.Popen([sys.executable, "-c", f"import time\nt=time.time()\nwhile time.time()-t<{seconds + 0.5}: pass"])
    time.sleep(0.2)
    with MachineLoad() as beside:
        spin()
    child.wait()
    print(f"other processes' busy cores while this one spins alone: {alone.cores:.2f} (expected about 0)")
    print(f"... while one child process spins beside it:           {beside.cores:.2f} (expected about 1)")


if __name__ == "__main__":
    main()
