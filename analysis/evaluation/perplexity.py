"""Perplexity: ``exp`` of the mean next-token loss over every predicted token of token windows
from any data source (``demo:DOMAIN``, ``file:``, ``hf:``), per domain and pooled (``"all"``).
Windows come from :mod:`moescope.analysis.data.windows` (the same code path as calibration);
they are non-overlapping by default, and ``stride < seq_len`` slides them (each window then
scores only the tokens the previous one did not, with the earlier tokens as context). Results
are cached by model and window content."""

from __future__ import annotations

import hashlib
import math

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.data import TokenBatch, check_positive, eval_windows, sample_tokens, sliding_windows
from moescope.analysis.evaluation.keys import EVAL_VERSION, Progress, skip_key
from moescope.analysis.measure.capture import token_nll


def score_from(windows: TokenBatch) -> tuple[int, ...]:
    """The first scored target position of each row (1: every target)."""
    return windows.score_from or (1,) * windows.n_samples


def windows_fingerprint(windows: TokenBatch) -> str:
    """sha256 of the windows' tokens, scored positions and domains (the perplexity cache key)."""
    h = hashlib.sha256()
    h.update(windows.input_ids.contiguous().numpy().tobytes())
    h.update(repr((score_from(windows), windows.domains)).encode())
    return h.hexdigest()


def perplexity_windows(source: str, tokenizer, samples: int = 96, seq_len: int = 256, sampling: str = "first",
                       seed: int = 0, stride: int | None = None, split: str = "test") -> TokenBatch:
    """``samples`` windows of ``seq_len`` tokens spread over the source's domains (as
    :func:`~moescope.analysis.data.sample_tokens`: ``first`` takes consecutive windows from the start
    of each domain, ``random`` seeded offsets). With ``stride`` < ``seq_len`` (``first`` only) the
    windows start every ``stride`` tokens and each one after the first scores only its last
    ``stride`` targets."""
    length = check_positive("seq_len", seq_len)
    if stride is None or stride == length:
        return sample_tokens(source, tokenizer, samples, length, seed=seed, sampling=sampling, split=split)
    if check_positive("stride", stride) < length and sampling != "first":
        raise MoescopeError("sliding windows (stride < seq_len) read each domain from its start; use --sampling first")
    return sliding_windows(source, tokenizer, samples, length, stride, split=split)


@torch.no_grad()
def window_perplexity(model, windows: TokenBatch, batch_size: int = 8, progress: Progress | None = None) -> dict:
    """``{"ppl": {domain: ppl, ["all": pooled]}, "tokens": {domain: predicted tokens},
    "interval": {domain|"all": [low, high]}, "windows": {"nll": [per-window loss sum], "tokens": [...],
    "domains": [...]}}``; the interval is the per-window 95 % one of
    :func:`~moescope.analysis.evaluation.uncertainty.perplexity_interval`.

    Under torchrun the windows are split over the ranks in contiguous shares of whole batches;
    every rank gathers the per-window sums (float64) and pools them in window order, so each rank
    holds the number one process computes, to the last bit."""
    from moescope.analysis.core.distributed import current

    world = current()
    device = next(model.hf.parameters()).device
    n = windows.input_ids.shape[0]
    world.check_shards(n, "perplexity windows")
    lo, hi = world.share(n, batch_size)
    starts = score_from(windows)
    nlls: list[float] = []
    counts: list[float] = []
    for i in range(lo, hi, batch_size):
        ids = windows.input_ids[i : min(i + batch_size, hi)].to(device)
        nll = token_nll(model.hf(input_ids=ids, use_cache=False).logits, ids).float().cpu()  # [b, L-1]
        for row in range(ids.shape[0]):
            scored = nll[row, starts[i + row] - 1 :]
            nlls.append(float(scored.double().sum()))
            counts.append(scored.numel())
        if progress:
            progress("perplexity", min(i + batch_size, hi) - lo, hi - lo)
    if world.distributed:
        world.doing("gathering perplexity windows")
        nlls, counts = world.gather_floats(nlls), world.gather_floats(counts)
    per_window: dict[str, list] = {"nll": nlls, "tokens": [int(c) for c in counts], "domains": list(windows.domains)}
    sums: dict[str, list[float]] = {}
    for value, count, domain in zip(per_window["nll"], per_window["tokens"], per_window["domains"]):
        acc = sums.setdefault(domain, [0.0, 0])
        acc[0] += value
        acc[1] += count
    ppl = {d: math.exp(s / c) for d, (s, c) in sorted(sums.items())}
    if len(ppl) > 1:
        ppl["all"] = math.exp(sum(s for s, _ in sums.values()) / sum(c for _, c in sums.values()))
    return {"ppl": ppl, "tokens": {d: c for d, (_, c) in sorted(sums.items())},
            "interval": window_intervals(per_window), "windows": per_window}


def window_intervals(windows: dict) -> dict[str, list[float]]:
    """``{domain: [low, high], "all": [low, high] (several domains)}``: the per-window 95 % interval
    of each domain's perplexity and of the pooled one; None for a domain of a single window (one
    window gives no spread to measure)."""
    from moescope.analysis.evaluation.uncertainty import perplexity_interval

    groups: dict[str, tuple[list, list]] = {}
    for s, c, d in zip(windows["nll"], windows["tokens"], windows["domains"]):
        groups.setdefault(d, ([], []))
        groups[d][0].append(s)
        groups[d][1].append(c)
    out = {}
    for d, (s, c) in sorted(groups.items()):
        iv = perplexity_interval(s, c)
        out[d] = [iv.low, iv.high] if len(s) > 1 else None
    if len(groups) > 1:
        iv = perplexity_interval(windows["nll"], windows["tokens"])
        out["all"] = [iv.low, iv.high]
    return out


def perplexity(model, source: str = "demo:all", samples: int = 96, seq_len: int = 256, sampling: str = "first",
               seed: int = 0, stride: int | None = None, split: str = "test", tokenizer=None, batch_size: int = 8,
               cache=None, progress: Progress | None = None) -> dict:
    """Perplexity of ``model`` on ``source`` (see :func:`perplexity_windows`), cached when a
    :class:`~moescope.analysis.core.cache.Cache` is given. Returns ``{"ppl": {domain: ppl, "all": …},
    "tokens": {…}, "interval": {domain: [low, high]}, "windows": per-window sums, "data": description,
    "value": headline perplexity}`` where ``value`` is the pooled ``all`` for a multi-domain source,
    else the single domain's."""
    windows = perplexity_windows(source, tokenizer or model.tokenizer, samples, seq_len, sampling, seed, stride, split)

    def compute():
        out = window_perplexity(model, windows, batch_size=batch_size, progress=progress)
        bad = {d: v for d, v in out["ppl"].items() if not math.isfinite(v)}
        if bad:  # never stored (nor returned) as a result
            d, v = next(iter(bad.items()))
            raise MoescopeError(f"the perplexity of '{model.source}' on {windows.source} ({d}) is {v}: the model "
                                "computes non-finite numbers (NaN or infinite weights or activations); nothing was "
                                "stored or exported")
        return {"meta": out}

    if cache is None:
        out = compute()["meta"]
    else:
        parts = {"model": model.fingerprint(), "skip_beta": skip_key(model),
                 "windows": windows_fingerprint(windows), "version": EVAL_VERSION, "per_window": 1}
        from moescope.analysis.core.distributed import get_or_compute_meta

        meta = get_or_compute_meta(cache, "perplexity", parts, compute, label=f"{model.source}-{windows.source}")
        out = {k: meta[k] for k in ("ppl", "tokens", "interval", "windows")}
    ppl = out["ppl"]
    return {**out, "data": windows.describe(), "value": ppl.get("all", next(iter(ppl.values())))}


def perplexity_by_domain(model, source: str = "demo:all", seq_len: int = 256, max_tokens: int | None = 16384,
                         tokenizer=None, batch_size: int = 8, progress: Progress | None = None) -> dict[str, float]:
    """``{domain: perplexity, "all": pooled}`` over the first ``max_tokens`` test tokens of every
    domain in consecutive non-overlapping windows (the strategy benchmark's fixed budget)."""
    windows = eval_windows(source, tokenizer or model.tokenizer, seq_len, max_tokens=max_tokens)
    return window_perplexity(model, windows, batch_size=batch_size, progress=progress)["ppl"]

