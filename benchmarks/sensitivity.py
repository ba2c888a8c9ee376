"""Benchmark: enumeration and drop grid against their naive definitions, side by side, same data.

    python benchmarks/sensitivity.py [--samples 16 --seq-len 256]

1. Enumeration on the demo model's last MoE layer, 8 experts keep 4 (70 subsets): the library's
   scorer (every expert's output computed once per token chunk, each subset scored by re-routing)
   against the naive way (the pruned block run per subset). Target: >= 10x faster, same choice.
2. Single-expert-drop perplexity grid on the demo model: the streamed grid (layers l..L per cell
   from cached hidden states) against the naive way (each cell a full evaluation of a separately
   pruned copy). Target: <= 0.6x the naive time, same values.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.capture import LayerStream, next_token_nll
    from moescope.analysis.measure.sensitivity import drop_grid, enumerate_layer, naive_subset_loss
    from moescope.analysis.model import load_moe, wrap_model

    model = load_moe("demo")
    calib = sample_tokens("demo:all", model.tokenizer, args.samples, args.seq_len, seed=0)
    evalb = sample_tokens("demo:all", model.tokenizer, args.samples, args.seq_len, seed=0, split="test")
    print(f"demo model; calibration {calib.describe()}; evaluation {evalb.describe()}; {torch.get_num_threads()} threads")

    # 1. enumeration
    layer = model.moe_layers[-1]
    x = None
    for l, h in LayerStream(model, calib.input_ids).layers():
        if l == layer:
            x = h
            break
    t0 = time.perf_counter()
    fast = enumerate_layer(model.layers[layer], x, keep=4, method="exact")
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {C: naive_subset_loss(model, layer, x, list(C)) for C in itertools.combinations(range(8), 4)}
    t_naive = time.perf_counter() - t0
    best = min(naive, key=naive.get)
    rel = max(abs(loss - naive[tuple(c)]) / naive[tuple(c)] for c, loss in fast.candidates)
    print(f"enumeration, layer {layer}, {x.shape[0]} tokens, C(8,4)=70 subsets: scorer {t_fast:.2f} s, "
          f"naive {t_naive:.2f} s -> {t_naive / t_fast:.1f}x faster; same choice: {list(best) == fast.keep} "
          f"{fast.keep}; max relative loss difference {rel:.1e}")

    # 2. drop grid
    ids = evalb.input_ids
    t0 = time.perf_counter()
    grid = drop_grid(model, ids)
    t_grid = time.perf_counter() - t0

    def full_ppl(hf) -> float:  # a full evaluation, with the same loss arithmetic as the library
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, ids.shape[0], 8):
                s, n = next_token_nll(hf(input_ids=ids[i : i + 8]).logits, ids[i : i + 8])
                total, count = total + s, count + n
        return math.exp(total / count)

    t0 = time.perf_counter()
    naive_rows = []
    for l in model.moe_layers:
        row = []
        for e in range(8):
            pruned = wrap_model(copy.deepcopy(model.hf))
            pruned.keep(l, [k for k in range(8) if k != e])
            row.append(full_ppl(pruned.hf))
        naive_rows.append(row)
    t_naive_grid = time.perf_counter() - t0
    rel = max(abs(a - b) / b for ra, rb in zip(grid.ppl, naive_rows) for a, b in zip(ra, rb))
    print(f"drop grid, {len(model.moe_layers)} layers x 8 experts on {ids.numel()} tokens: streamed {t_grid:.2f} s, "
          f"naive {t_naive_grid:.2f} s -> {t_grid / t_naive_grid:.2f}x the naive time; "
          f"max relative difference {rel:.1e}; baseline perplexity {grid.baseline:.3f}")


if __name__ == "__main__":
    main()
