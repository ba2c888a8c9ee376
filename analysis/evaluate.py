"""Quality of a (pruned) model: perplexity on any data source, per domain for the demo corpus.

Perplexity is ``exp`` of the mean next-token loss over every predicted token of non-overlapping
windows (:func:`analysis.data.eval_windows`, test split by default, a fixed token budget per
domain so that strategies are compared on exactly the same tokens).
"""

from __future__ import annotations

import math

import torch

from analysis.capture import token_nll


@torch.no_grad()
def perplexity_by_domain(model, source: str = "demo:all", seq_len: int = 256, max_tokens: int | None = 16384,
                         tokenizer=None, batch_size: int = 8, progress=None) -> dict[str, float]:
    """``{domain: perplexity}`` plus ``"all"`` (pooled over every predicted token)."""
    from analysis.data import eval_windows

    tok = tokenizer or model.tokenizer
    batch = eval_windows(source, tok, seq_len, max_tokens=max_tokens)
    device = next(model.hf.parameters()).device
    sums: dict[str, list[float]] = {}
    n = batch.input_ids.shape[0]
    for i in range(0, n, batch_size):
        ids = batch.input_ids[i : i + batch_size].to(device)
        nll = token_nll(model.hf(input_ids=ids).logits, ids)  # [b, L-1]
        for row, domain in enumerate(batch.domains[i : i + batch_size]):
            acc = sums.setdefault(domain, [0.0, 0])
            acc[0] += float(nll[row].sum())
            acc[1] += nll.shape[1]
        if progress:
            progress("evaluate", min(i + batch_size, n), n)
    out = {d: math.exp(s / c) for d, (s, c) in sorted(sums.items())}
    if len(out) > 1:
        total = sum(s for s, _ in sums.values())
        count = sum(c for _, c in sums.values())
        out["all"] = math.exp(total / count)
    return out

