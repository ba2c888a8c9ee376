"""Token windows: the one code path that cuts calibration batches (:func:`sample_tokens`) and
evaluation windows (:func:`eval_windows`, :func:`sliding_windows`) out of token streams, and the
:class:`TokenBatch` they return with its content fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.data.readers import (
    hf_stream,
    local_streams,
    separator_id,
    token_streams,
    tokenizer_fingerprint,
)
from moescope.analysis.data.sources import DataSource, check_split, parse_source
from torch import Tensor

DATA_VERSION = 2  # bump when the stream / window rules change (it is part of every fingerprint)
SAMPLINGS = ("random", "first")
HF_RANDOM_POOL = 4  # random sampling from hf: streams this many times the tokens asked for


# ---- batches ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TokenBatch:
    """N token windows of L tokens, with the domain of each row and a content fingerprint."""

    input_ids: Tensor  # [N, L] int64
    domains: tuple[str, ...]  # [N] domain of each row (file:/hf: the source spec)
    source: str  # canonical source spec
    fingerprint: str  # sha256 hex of the canonical description (see module docstring)
    split: str | None = None  # split actually read (None: a whole file)
    sampling: str = "random"  # "random" | "first" | "eval"
    seed: int | None = None
    score_from: tuple[int, ...] | None = None  # first scored target of each row (sliding windows)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a 2-D int64 tensor, got {tuple(self.input_ids.shape)} {self.input_ids.dtype}"
            )
        if self.score_from is not None and len(self.score_from) != self.input_ids.shape[0]:
            raise ValueError(f"{len(self.score_from)} score_from entries for {self.input_ids.shape[0]} rows")
        if len(self.domains) != self.input_ids.shape[0]:
            raise ValueError(f"{len(self.domains)} domain labels for {self.input_ids.shape[0]} rows")

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def domain_counts(self) -> dict[str, int]:
        """Rows per domain, in order of first appearance."""
        out: dict[str, int] = {}
        for d in self.domains:
            out[d] = out.get(d, 0) + 1
        return out

    def rows(self, domain: str) -> Tensor:
        """``[n, L]`` the rows of one domain."""
        idx = [i for i, d in enumerate(self.domains) if d == domain]
        if not idx:
            raise unknown_name("domain in this batch", domain, self.domain_counts())
        return self.input_ids[idx]

    def describe(self) -> str:
        """One short line, e.g. ``demo:all (validation): 12×64 tokens, random seed 0, 6 domains [3f2a9c1e]``."""
        how = f"random seed {self.seed}" if self.sampling == "random" else self.sampling
        counts = self.domain_counts()
        where = f"{len(counts)} domains" if len(counts) > 1 else ""
        split = f" ({self.split})" if self.split else ""
        parts = ", ".join(p for p in (f"{self.n_samples}×{self.seq_len} tokens", how, where) if p)
        return f"{self.source}{split}: {parts} [{self.fingerprint[:8]}]"


def _fingerprint(**fields) -> str:
    payload = json.dumps({"version": DATA_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_positive(name: str, value) -> int:
    """``value`` as an int, refused in one line unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise MoescopeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def domain_shares(n: int, domains: list[str]) -> dict[str, int]:
    """Rows per domain as by round robin over the sorted domains."""
    q, r = divmod(n, len(domains))
    return {d: q + (i < r) for i, d in enumerate(sorted(domains))}


def _not_enough(
    src: DataSource, split: str | None, domain: str, have: int, need: int, what: str
) -> MoescopeError:
    where = (
        f"{src.spec}"
        + (f" ({split})" if split else "")
        + (f", domain '{domain}'" if domain != src.spec else "")
    )
    return MoescopeError(
        f"not enough tokens in {where}: it has {have} tokens, {what} asks for {need}; "
        "use fewer samples, a shorter sequence length, or a larger source"
    )


def _cut(src: DataSource, split: str | None, streams: dict[str, Tensor], counts: dict[str, int | None],
         length: int, stride: int | None = None, rng=None, budget: int | None = None):
    """The one windowing rule. For each domain (sorted), ``counts[domain]`` windows of ``length``
    tokens (None: as many consecutive ones as fit in the first ``budget`` tokens, at least one):
    at seeded uniform offsets with ``rng``, else every ``stride`` tokens from the stream's start
    (``stride`` None: ``length``, non-overlapping). Returns (rows, domain labels, score_from)."""
    step = stride or length
    rows, labels, score_from = [], [], []
    for domain in sorted(counts):
        stream, k = streams[domain], counts[domain]
        if k is None:
            usable = stream.numel() if budget is None else min(budget, stream.numel())
            k = usable // length
            if k == 0:
                raise _not_enough(src, split, domain, stream.numel(), length, "one window")
        if k == 0:
            continue
        need, what = (length + (k - 1) * step, f"{k} windows of {length} with stride {step}") if stride else \
            (k * length, f"{k} windows of {length}")
        if stream.numel() < need:
            raise _not_enough(src, split, domain, stream.numel(), need, what)
        if rng is not None:
            starts = rng.integers(0, stream.numel() - length + 1, size=k).tolist()
        else:
            starts = [i * step for i in range(k)]
        rows.extend(stream[s : s + length] for s in starts)
        labels.extend([domain] * k)
        score_from.extend(1 if i == 0 or stride is None else length - stride for i in range(k))
    return rows, labels, tuple(score_from)


def _streams(src: DataSource, tokenizer, split: str, target_tokens: int | None, seed: int | None):
    if src.kind == "hf":
        return hf_stream(src, tokenizer, target_tokens, seed)
    return local_streams(src, tokenizer, split, tokenizer_fingerprint(tokenizer))


def sample_tokens(
    source: str | DataSource,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    sampling: str = "random",
    split: str = "validation",
) -> TokenBatch:
    """``n_samples`` windows of ``seq_len`` tokens from ``source`` (see :mod:`moescope.analysis.data`).

    ``sampling="random"``: uniform seeded offsets (``numpy.random.default_rng(seed)``, drawn
    domain by domain in sorted order); ``"first"``: the first consecutive non-overlapping windows
    of each domain's stream (``seed`` is then ignored and not part of the fingerprint). Either way
    a domain must hold ``rows × seq_len`` tokens, or a :class:`MoescopeError` says how many it has.
    """
    src = parse_source(source)
    check_split(split)
    n = check_positive("n_samples", n_samples)
    length = check_positive("seq_len", seq_len)
    if sampling not in SAMPLINGS:
        raise unknown_name("sampling", str(sampling), SAMPLINGS)
    if sampling == "random" and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise MoescopeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed) if sampling == "random" else None
    eff_split = src.effective_split(split)
    sep = separator_id(tokenizer)  # refuses a tokenizer without eos/bos before any reading
    need = n * length
    streams, content = _streams(src, tokenizer, split, need * HF_RANDOM_POOL if sampling == "random" else need, seed)
    rng = np.random.default_rng(seed) if sampling == "random" else None
    rows, labels, _ = _cut(src, eff_split, streams, domain_shares(n, src.domains), length, rng=rng)
    fp = _fingerprint(
        source=src.spec,
        split=eff_split,
        tokenizer=tokenizer_fingerprint(tokenizer),
        separator=sep,
        n_samples=n,
        seq_len=length,
        seed=seed,
        sampling=sampling,
        content_sha256=content,
    )
    return TokenBatch(torch.stack(rows), tuple(labels), src.spec, fp, eff_split, sampling, seed)


def eval_windows(
    source: str | DataSource,
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
    split: str = "test",
) -> TokenBatch:
    """Consecutive non-overlapping ``seq_len`` windows from the start of each domain's stream,
    covering at most ``max_tokens`` tokens per domain (None: the whole stream; hf: sources stop
    at :data:`~.readers.HF_MAX_DOCUMENTS` documents). A trailing partial window is dropped; a
    domain with fewer than ``seq_len`` tokens (within the budget) is an error."""
    src = parse_source(source)
    check_split(split)
    length = check_positive("seq_len", seq_len)
    budget = None if max_tokens is None else check_positive("max_tokens", max_tokens)
    if budget is not None and budget < length:
        raise MoescopeError(f"max_tokens ({budget}) is smaller than seq_len ({length}); no window fits")
    eff_split = src.effective_split(split)
    sep = separator_id(tokenizer)  # refuses a tokenizer without eos/bos before any reading
    streams, content = _streams(src, tokenizer, split, budget, None)
    rows, labels, _ = _cut(src, eff_split, streams, dict.fromkeys(streams), length, budget=budget)
    fp = _fingerprint(
        source=src.spec,
        split=eff_split,
        tokenizer=tokenizer_fingerprint(tokenizer),
        separator=sep,
        n_samples=len(labels),
        seq_len=length,
        seed=None,
        sampling="eval",
        max_tokens=budget,
        content_sha256=content,
    )
    return TokenBatch(torch.stack(rows), tuple(labels), src.spec, fp, eff_split, "eval", None)


def sliding_windows(source: str | DataSource, tokenizer, n_samples: int, seq_len: int, stride: int,
                    split: str = "test") -> TokenBatch:
    """``n_samples`` windows of ``seq_len`` tokens spread over the domains as :func:`sample_tokens`
    does, each domain's starting every ``stride`` tokens from its stream's start; every window
    after a domain's first scores only its last ``stride`` targets (``score_from``), the earlier
    tokens being context."""
    src = parse_source(source)
    check_split(split)
    length = check_positive("seq_len", seq_len)
    stride = check_positive("stride", stride)
    if stride > length:
        raise MoescopeError(f"stride ({stride}) must not exceed seq_len ({length}); windows would skip tokens")
    n = check_positive("samples", n_samples)
    streams = token_streams(src, tokenizer, split=split)
    rows, labels, score_from = _cut(src, split, streams, domain_shares(n, sorted(streams)), length, stride=stride)
    eff_split = src.effective_split(split)
    fp = _fingerprint(source=src.spec, split=eff_split, tokenizer=tokenizer_fingerprint(tokenizer),
                      separator=separator_id(tokenizer), n_samples=n, seq_len=length, stride=stride,
                      sampling="sliding", content_sha256=hashlib.sha256(torch.stack(rows).numpy().tobytes()).hexdigest())
    return TokenBatch(torch.stack(rows), tuple(labels), src.spec, fp, eff_split, f"first, stride {stride}", None,
                      score_from=score_from)
