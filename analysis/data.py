"""Calibration and evaluation token data: one source syntax everywhere.

A data source is a string, parsed and validated by :func:`parse_source` before any text is
read or tokenized:

``demo:DOMAIN`` / ``demo:all``
    The shipped multi-domain corpus, ``<repo>/demo/corpus/<domain>/{validation,test}.txt``
    (``MOESCOPE_DEMO_CORPUS`` overrides the root). The domains are the sub-folders holding both
    files. ``split`` picks the file: ``"validation"`` for calibration, ``"test"`` for evaluation.
``file:PATH``
    ``.txt``: the whole text is one document, unless it contains lines that are exactly
    ``<|endoftext|>`` (the demo corpus format), which then separate documents. ``.jsonl``: one
    JSON object per line with a string ``text`` field (blank lines are skipped).
``hf:NAME[:CONFIG]:SPLIT[:FIELD]``
    A Hugging Face dataset, streamed (``load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``)
    so only the documents needed are fetched; ``FIELD`` defaults to ``text``. ``NAME`` may hold a
    ``/``. The parts after ``NAME`` are read as: one part → ``SPLIT``; three parts →
    ``CONFIG:SPLIT:FIELD``; two parts → ``CONFIG:SPLIT``, unless the first part is a split word
    (train, validation, valid, dev, test, eval, optionally with a ``[...]`` slice) and the second
    is not, then ``SPLIT:FIELD``. Write ``NAME::SPLIT:FIELD`` (empty config) to force the latter.
    Examples: ``hf:wikitext:wikitext-2-raw-v1:test``, ``hf:allenai/c4:en:validation:text``,
    ``hf:openwebtext:train``, ``hf:my/set:train:content``. At most :data:`HF_MAX_DOCUMENTS`
    documents are streamed.

``file:`` and ``hf:`` sources carry their own split; the ``split`` argument only picks the demo
file (it is still validated). Every domain's documents are tokenized without special tokens and
concatenated into one token stream, with the tokenizer's eos id (bos if it has no eos) between
documents. Windows of ``seq_len`` tokens are cut from the streams:

* :func:`sample_tokens` ``sampling="random"``: windows at seeded uniform random offsets
  (``numpy.random.default_rng(seed)``; windows may overlap, but a domain must hold at least as
  many tokens as its windows ask for). ``sampling="first"``: the first consecutive
  non-overlapping windows of the stream, for reproducing numbers elsewhere.
* :func:`eval_windows`: consecutive non-overlapping windows from the start of each stream up to
  a token budget, for perplexity.

For ``demo:all`` the N rows are shared out over the domains as by round robin in sorted order
(the first ``N mod D`` domains give ``ceil(N/D)`` rows, the rest ``floor(N/D)``); each row comes
from its own domain's stream, and rows are listed grouped by domain in sorted order.

Every :class:`TokenBatch` carries a fingerprint: the sha256 of a canonical JSON of the source
spec, effective split, tokenizer fingerprint, separator id, N, L, seed, sampling (and token
budget), and the sha256 of the raw text used, so a changed corpus or tokenizer changes the key.

Shapes: N windows (rows), L tokens per window (``seq_len``), T tokens, d hidden size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moescope.analysis.errors import MoescopeError, unknown_name
from moescope.analysis.models import REPO_ROOT

DATA_VERSION = 2  # bump when the stream / window rules change (it is part of every fingerprint)
DEMO_CORPUS_ENV = "MOESCOPE_DEMO_CORPUS"
SPLITS = ("validation", "test")
SAMPLINGS = ("random", "first")
SOURCE_KINDS = {
    "demo": "demo:DOMAIN or demo:all",
    "file": "file:PATH (.txt or .jsonl)",
    "hf": "hf:NAME[:CONFIG]:SPLIT[:FIELD]",
}
FILE_SUFFIXES = (".txt", ".jsonl")
DOC_MARKER = "<|endoftext|>"  # a line holding only this separates documents in corpus files
HF_SPLIT_WORDS = ("train", "validation", "valid", "dev", "test", "eval")
HF_MAX_DOCUMENTS = 100_000  # cap on documents streamed from one hf: source
HF_SHUFFLE_BUFFER = 2_000  # ds.shuffle buffer for random sampling from hf:
HF_RANDOM_POOL = 4  # random sampling from hf: streams this many times the tokens asked for
TOKENIZE_BATCH = 256  # documents per tokenizer call

_SYNTAX = "; ".join(SOURCE_KINDS.values())
_MARKER_LINE = re.compile(r"\n?^" + re.escape(DOC_MARKER) + r"[ \t]*$\n?", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


# ---- sources ---------------------------------------------------------------------------------
def demo_corpus_dir() -> Path:
    """The shipped demo corpus root (``MOESCOPE_DEMO_CORPUS`` overrides it)."""
    return Path(os.environ.get(DEMO_CORPUS_ENV, REPO_ROOT / "demo" / "corpus"))


def demo_domains() -> list[str]:
    """Sorted names of the demo corpus sub-folders that hold both ``validation.txt`` and ``test.txt``."""
    root = demo_corpus_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and all((p / f"{s}.txt").is_file() for s in SPLITS)
    )


@dataclass(frozen=True)
class DataSource:
    """A parsed, validated data source (see the module docstring for the syntax)."""

    kind: str  # "demo" | "file" | "hf"
    spec: str  # the canonical spec string
    domain: str | None = None  # demo: a domain or "all"
    path: Path | None = None  # file:
    name: str | None = None  # hf: dataset id
    config: str | None = None  # hf: config name
    hf_split: str | None = None  # hf: split
    field: str = "text"  # hf: text field

    def __str__(self) -> str:
        return self.spec

    @property
    def domains(self) -> list[str]:
        """The domains rows are labelled with: demo domains, else the spec itself."""
        if self.kind == "demo":
            return demo_domains() if self.domain == "all" else [self.domain]
        return [self.spec]

    def effective_split(self, split: str) -> str | None:
        """The split actually read: the demo file's, the hf spec's, or None for a file."""
        return {"demo": split, "hf": self.hf_split, "file": None}[self.kind]


def parse_source(spec: str | DataSource) -> DataSource:
    """Parse and validate a source spec; a :class:`MoescopeError` quotes the bad value and lists
    what is accepted. Checks that demo domains and files exist; an hf: dataset is only reached
    when its text is read."""
    if isinstance(spec, DataSource):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise MoescopeError(f"data source {spec!r} is empty; accepted: {_SYNTAX}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        hint = (
            "demo:all" if spec == "demo" else f"file:{spec}" if Path(spec).suffix in FILE_SUFFIXES else None
        )
        did = f"; did you mean '{hint}'?" if hint else ""
        raise MoescopeError(f"data source '{spec}' has no kind prefix{did} accepted: {_SYNTAX}")
    if kind not in SOURCE_KINDS:
        err = unknown_name("data source kind", kind, SOURCE_KINDS)
        raise MoescopeError(f"in data source '{spec}': {err} (syntax: {_SYNTAX})")
    return {"demo": _parse_demo, "file": _parse_file, "hf": _parse_hf}[kind](spec, rest)


def _parse_demo(spec: str, domain: str) -> DataSource:
    domains = demo_domains()
    if not domains:
        raise MoescopeError(
            f"data source '{spec}': the demo corpus is missing at '{demo_corpus_dir()}' (no domain folder with "
            f"validation.txt and test.txt); run `python demo/build_corpus.py` or set {DEMO_CORPUS_ENV}"
        )
    if domain != "all" and domain not in domains:
        err = unknown_name("demo domain", domain, [*domains, "all"])
        raise MoescopeError(f"in data source '{spec}': {err}")
    return DataSource(kind="demo", spec=f"demo:{domain}", domain=domain)


def _parse_file(spec: str, raw: str) -> DataSource:
    if not raw:
        raise MoescopeError(
            f"data source '{spec}' names no file; write file:PATH with a {' or '.join(FILE_SUFFIXES)} file"
        )
    path = Path(raw).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise MoescopeError(
            f"data source '{spec}': unsupported file type '{path.suffix or '(none)'}'; accepted: "
            f"{', '.join(FILE_SUFFIXES)} (jsonl: one object per line with a 'text' field)"
        )
    if not path.exists():
        raise MoescopeError(
            f"data source '{spec}': file '{path}' does not exist (relative paths start at '{Path.cwd()}')"
        )
    if not path.is_file():
        raise MoescopeError(f"data source '{spec}': '{path}' is not a file")
    return DataSource(kind="file", spec=spec, path=path)


def _split_hf_parts(rest: str) -> list[str]:
    """Split on ':' outside ``[...]`` (so ``train[:10%]`` stays one part)."""
    parts, depth, cur = [], 0, []
    for ch in rest:
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _is_split_word(part: str) -> bool:
    return part.split("[", 1)[0].lower() in HF_SPLIT_WORDS


def _parse_hf(spec: str, rest: str) -> DataSource:
    usage = "accepted: hf:NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf:wikitext:wikitext-2-raw-v1:test or hf:openwebtext:train"
    parts = _split_hf_parts(rest)
    name, tail = parts[0], parts[1:]
    config, field = None, "text"
    if len(tail) == 1:
        (split,) = tail
    elif len(tail) == 2:
        if _is_split_word(tail[0]) and not _is_split_word(tail[1]):
            split, field = tail
        else:
            config, split = tail
    elif len(tail) == 3:
        config, split, field = tail
    else:
        what = "no split" if not tail else f"{len(tail) + 1} parts"
        raise MoescopeError(f"data source '{spec}' has {what}; {usage}")
    config = config or None
    for label, value in (("dataset name", name), ("split", split), ("field", field)):
        if not value:
            raise MoescopeError(f"data source '{spec}' has an empty {label}; {usage}")
    return DataSource(
        kind="hf",
        spec=_hf_spec(name, config, split, field),
        name=name,
        config=config,
        hf_split=split,
        field=field,
    )


def _hf_spec(name: str, config: str | None, split: str, field: str) -> str:
    """The shortest spec that parses back to the same parts (``NAME::SPLIT:FIELD`` where needed)."""
    if config:
        return f"hf:{name}:{config}:{split}" + (f":{field}" if field != "text" else "")
    if field == "text":
        return f"hf:{name}:{split}"
    if _is_split_word(split) and not _is_split_word(field):
        return f"hf:{name}:{split}:{field}"
    return f"hf:{name}::{split}:{field}"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise MoescopeError(
            f"unknown split {split!r}; accepted: {', '.join(SPLITS)} (validation calibrates, test evaluates)"
        )
    return split


# ---- documents -------------------------------------------------------------------------------
def split_documents(text: str, blank_lines: bool = False) -> list[str]:
    """Documents of a corpus text: separated by lines holding only ``<|endoftext|>``; without such
    lines, the whole text (or, with ``blank_lines``, paragraphs split on blank lines).
    Whitespace-only documents are dropped."""
    if _MARKER_LINE.search(text):
        docs = _MARKER_LINE.split(text)
    elif blank_lines:
        docs = _BLANK_LINES.split(text)
    else:
        docs = [text]
    return [d for d in docs if d.strip()]


def _read_text(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoescopeError(f"data source '{spec}': file '{path}' does not exist") from None
    except UnicodeDecodeError as err:
        raise MoescopeError(
            f"data source '{spec}': '{path}' is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None


def _read_jsonl(path: Path, spec: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path, spec).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data source '{spec}': line {lineno} of '{path}'"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoescopeError(
                f'{where} is not valid JSON ({err.msg}); expected one object per line like {{"text": "..."}}'
            ) from None
        if not isinstance(row, dict) or "text" not in row:
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise MoescopeError(f'{where} has no \'text\' field (got: {keys}); expected {{"text": "..."}}')
        if not isinstance(row["text"], str):
            raise MoescopeError(f"{where}: 'text' is a {type(row['text']).__name__}, expected a string")
        if row["text"].strip():
            docs.append(row["text"])
    return docs


def load_texts(
    source: str | DataSource, split: str = "validation", max_documents: int | None = None
) -> dict[str, list[str]]:
    """Documents per domain (``{domain: [document, ...]}``, domains sorted).

    ``max_documents`` keeps the first documents of each domain; hf: sources are streamed and
    capped at :data:`HF_MAX_DOCUMENTS` documents when it is None."""
    src = parse_source(source)
    _check_split(split)
    if src.kind == "hf":
        cap = HF_MAX_DOCUMENTS if max_documents is None else max_documents
        return {src.spec: list(_iter_hf(src, seed=None, max_documents=cap))}
    if src.kind == "demo":
        out = {}
        for d in src.domains:
            text = _read_text(demo_corpus_dir() / d / f"{split}.txt", src.spec)
            out[d] = split_documents(text, blank_lines=True)
    elif src.path.suffix.lower() == ".jsonl":
        out = {src.spec: _read_jsonl(src.path, src.spec)}
    else:
        out = {src.spec: split_documents(_read_text(src.path, src.spec))}
    if max_documents is not None:
        out = {d: docs[:max_documents] for d, docs in out.items()}
    return out


# ---- hf: -------------------------------------------------------------------------------------
def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:  # pragma: no cover - requests ships with datasets
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _hf_error(src: DataSource, err: BaseException) -> MoescopeError:
    msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    name = type(err).__name__
    offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true", "TRUE", "yes") or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ) in ("1", "true", "TRUE", "yes")
    if (
        isinstance(err, _network_errors())
        or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError")
        or (offline and isinstance(err, OSError))
    ):
        return MoescopeError(
            f"cannot load {src.spec}: the Hugging Face hub is unreachable ({msg}); "
            f"use demo:all, demo:DOMAIN or file:PATH offline"
        )
    if name == "DatasetNotFoundError":
        return MoescopeError(
            f"cannot load {src.spec}: dataset '{src.name}' is not on the Hugging Face hub or is gated ({msg})"
        )
    return MoescopeError(f"cannot load {src.spec}: {msg}")


def _iter_hf(src: DataSource, seed: int | None, max_documents: int) -> Iterator[str]:
    """Documents of an hf: source, streamed (shuffled with ``seed`` unless None), at most ``max_documents``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise MoescopeError(
            f"cannot load {src.spec}: hf: sources need the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.hf_split, streaming=True)
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=HF_SHUFFLE_BUFFER)
        rows = iter(ds)
        for i in range(max_documents):
            try:
                row = next(rows)
            except StopIteration:
                return
            if src.field not in row:
                raise MoescopeError(
                    f"cannot load {src.spec}: rows have no field '{src.field}' (fields: {', '.join(map(str, row))}); "
                    "name the text field last: hf:NAME[:CONFIG]:SPLIT:FIELD"
                )
            text = row[src.field]
            if not isinstance(text, str):
                raise MoescopeError(
                    f"cannot load {src.spec}: field '{src.field}' of row {i} is a {type(text).__name__}, not text"
                )
            if text.strip():
                yield text
    except MoescopeError:
        raise
    except (OSError, ValueError) as err:
        raise _hf_error(src, err) from None


# ---- tokenizing ------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the backend tokenizer's JSON (``backend_tokenizer.to_str()``), else of the class
    name and the sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        payload = backend.to_str()
    else:
        payload = json.dumps(
            [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())], ensure_ascii=False
        )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def separator_id(tokenizer) -> int:
    """The token put between documents: eos, else bos."""
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise MoescopeError(
        f"tokenizer {type(tokenizer).__name__} has neither an eos nor a bos token to separate documents; "
        "set tokenizer.eos_token"
    )


def _encode(tokenizer, docs: list[str]) -> list[list[int]]:
    if not docs:
        return []
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def _stream_from_ids(pieces: Iterable[list[int]], sep: int) -> Tensor:
    """``[T]`` int64: documents' ids with ``sep`` between consecutive documents."""
    joined: list[list[int]] = []
    for ids in pieces:
        if joined:
            joined.append([sep])
        joined.append(ids)
    return torch.from_numpy(np.fromiter(chain.from_iterable(joined), dtype=np.int64))


class _Hasher:
    """sha256 over (domain, documents) with length prefixes: the raw text a batch was built from."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, item: str) -> None:
        b = item.encode("utf-8")
        self._h.update(len(b).to_bytes(8, "little"))
        self._h.update(b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


_STREAM_CACHE: OrderedDict[tuple[str, int, str], dict[str, Tensor]] = OrderedDict()
STREAM_CACHE_SIZE = 8  # tokenized local sources kept in memory, keyed by tokenizer and text content


def _local_streams(src: DataSource, tokenizer, split: str, tok_fp: str) -> tuple[dict[str, Tensor], str]:
    """Token streams of a demo:/file: source, memoised on (tokenizer, separator, text content)."""
    texts = load_texts(src, split)
    sep = separator_id(tokenizer)
    hasher = _Hasher()
    for domain in sorted(texts):
        hasher.add(domain)
        for doc in texts[domain]:
            hasher.add(doc)
    content = hasher.hexdigest()
    key = (tok_fp, sep, content)
    if key in _STREAM_CACHE:
        _STREAM_CACHE.move_to_end(key)
        return _STREAM_CACHE[key], content
    streams = {}
    for domain in sorted(texts):
        if src.kind == "demo":
            # the corpus file tokenized as a whole, exactly as the demo model was trained on it
            # (every document followed by "\n<|endoftext|>\n")
            text = _read_text(demo_corpus_dir() / domain / f"{split}.txt", src.spec)
            streams[domain] = torch.tensor(_encode(tokenizer, [text])[0], dtype=torch.long)
            continue
        docs = texts[domain]
        ids = chain.from_iterable(
            _encode(tokenizer, docs[i : i + TOKENIZE_BATCH]) for i in range(0, len(docs), TOKENIZE_BATCH)
        )
        streams[domain] = _stream_from_ids(ids, sep)
    _STREAM_CACHE[key] = streams
    while len(_STREAM_CACHE) > STREAM_CACHE_SIZE:
        _STREAM_CACHE.popitem(last=False)
    return streams, content


def _hf_stream(
    src: DataSource, tokenizer, target_tokens: int | None, seed: int | None
) -> tuple[dict[str, Tensor], str]:
    """Stream documents until the token stream holds ``target_tokens`` (None: up to the document cap)."""
    sep = separator_id(tokenizer)
    hasher, pieces, n_tokens, batch = _Hasher(), [], 0, []
    hasher.add(src.spec)

    def flush() -> int:
        added = 0
        for ids in _encode(tokenizer, batch):
            added += len(ids) + (1 if pieces else 0)
            pieces.append(ids)
        batch.clear()
        return added

    for doc in _iter_hf(src, seed=seed, max_documents=HF_MAX_DOCUMENTS):
        hasher.add(doc)
        batch.append(doc)
        # small batches at first so a short request does not stream a whole batch of documents
        if len(batch) >= min(TOKENIZE_BATCH, 1 + len(pieces)):
            n_tokens += flush()
            if target_tokens is not None and n_tokens >= target_tokens:
                break
    n_tokens += flush()
    return {src.spec: _stream_from_ids(pieces, sep)}, hasher.hexdigest()


def token_streams(source: str | DataSource, tokenizer, split: str = "validation") -> dict[str, Tensor]:
    """Each domain's full token stream ``[T]`` (documents joined by the separator token); hf:
    sources stop at :data:`HF_MAX_DOCUMENTS` documents."""
    src = parse_source(source)
    _check_split(split)
    if src.kind == "hf":
        return _hf_stream(src, tokenizer, None, None)[0]
    streams = _local_streams(src, tokenizer, split, tokenizer_fingerprint(tokenizer))[0]
    return {d: t.clone() for d, t in streams.items()}


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

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a 2-D int64 tensor, got {tuple(self.input_ids.shape)} {self.input_ids.dtype}"
            )
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


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise MoescopeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _shares(n: int, domains: list[str]) -> dict[str, int]:
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


def sample_tokens(
    source: str | DataSource,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    sampling: str = "random",
    split: str = "validation",
) -> TokenBatch:
    """``n_samples`` windows of ``seq_len`` tokens from ``source`` (see the module docstring).

    ``sampling="random"``: uniform seeded offsets (``numpy.random.default_rng(seed)``, drawn
    domain by domain in sorted order); ``"first"``: the first consecutive non-overlapping windows
    of each domain's stream (``seed`` is then ignored and not part of the fingerprint). Either way
    a domain must hold ``rows × seq_len`` tokens, or a :class:`MoescopeError` says how many it has.
    """
    src = parse_source(source)
    _check_split(split)
    n = _check_positive("n_samples", n_samples)
    length = _check_positive("seq_len", seq_len)
    if sampling not in SAMPLINGS:
        raise unknown_name("sampling", str(sampling), SAMPLINGS)
    if sampling == "random" and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise MoescopeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed) if sampling == "random" else None
    eff_split = src.effective_split(split)
    sep = separator_id(tokenizer)  # refuses a tokenizer without eos/bos before any reading
    tok_fp = tokenizer_fingerprint(tokenizer)
    shares = _shares(n, src.domains)
    if src.kind == "hf":
        need = n * length
        target = need * HF_RANDOM_POOL if sampling == "random" else need
        streams, content = _hf_stream(src, tokenizer, target, seed)
    else:
        streams, content = _local_streams(src, tokenizer, split, tok_fp)
    rng = np.random.default_rng(seed) if sampling == "random" else None
    rows, labels = [], []
    for domain in sorted(shares):
        k = shares[domain]
        if k == 0:
            continue
        stream = streams[domain]
        if stream.numel() < k * length:
            raise _not_enough(src, eff_split, domain, stream.numel(), k * length, f"{k} windows of {length}")
        if rng is not None:
            starts = rng.integers(0, stream.numel() - length + 1, size=k).tolist()
        else:
            starts = [i * length for i in range(k)]
        rows.extend(stream[s : s + length] for s in starts)
        labels.extend([domain] * k)
    fp = _fingerprint(
        source=src.spec,
        split=eff_split,
        tokenizer=tok_fp,
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
    at :data:`HF_MAX_DOCUMENTS` documents). A trailing partial window is dropped; a domain with
    fewer than ``seq_len`` tokens (within the budget) is an error."""
    src = parse_source(source)
    _check_split(split)
    length = _check_positive("seq_len", seq_len)
    budget = None if max_tokens is None else _check_positive("max_tokens", max_tokens)
    if budget is not None and budget < length:
        raise MoescopeError(f"max_tokens ({budget}) is smaller than seq_len ({length}); no window fits")
    eff_split = src.effective_split(split)
    sep = separator_id(tokenizer)  # refuses a tokenizer without eos/bos before any reading
    tok_fp = tokenizer_fingerprint(tokenizer)
    if src.kind == "hf":
        streams, content = _hf_stream(src, tokenizer, budget, None)
    else:
        streams, content = _local_streams(src, tokenizer, split, tok_fp)
    rows, labels = [], []
    for domain in sorted(streams):
        stream = streams[domain]
        usable = stream.numel() if budget is None else min(budget, stream.numel())
        k = usable // length
        if k == 0:
            raise _not_enough(src, eff_split, domain, stream.numel(), length, "one window")
        rows.append(stream[: k * length].view(k, length))
        labels.extend([domain] * k)
    fp = _fingerprint(
        source=src.spec,
        split=eff_split,
        tokenizer=tok_fp,
        separator=sep,
        n_samples=len(labels),
        seq_len=length,
        seed=None,
        sampling="eval",
        max_tokens=budget,
        content_sha256=content,
    )
    return TokenBatch(torch.cat(rows).clone(), tuple(labels), src.spec, fp, eff_split, "eval", None)


# ---- augmentation ----------------------------------------------------------------------------
def mix_token_embeddings(hidden: Tensor, ratio: float, seed: int = 0) -> Tensor:
    """Append ``M = round(ratio · T)`` random convex mixtures of token pairs to ``hidden [T, d]``.

    Each new row is ``λ · h_i + (1 − λ) · h_j`` with ``i ≠ j`` drawn uniformly from the T tokens
    (``i = j`` only when T = 1) and ``λ ~ U(0, 1)``, all from ``torch.Generator().manual_seed(seed)``
    (the data augmentation of the group-and-merge paper's data-centric expert representation).
    Returns ``[T + M, d]``: the original rows first, unchanged, then the mixtures (in ``hidden``'s
    dtype and device; mixing is computed in float32)."""
    if hidden.dim() != 2:
        raise MoescopeError(
            f"mix_token_embeddings expects hidden states [T, d], got shape {tuple(hidden.shape)}"
        )
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio < 0:
        raise MoescopeError(f"mixing ratio must be a number ≥ 0, got {ratio!r}")
    t = hidden.shape[0]
    m = round(ratio * t)
    if m == 0 or t == 0:
        return hidden.clone()
    gen = torch.Generator().manual_seed(int(seed))
    i = torch.randint(0, t, (m,), generator=gen)
    if t > 1:  # j uniform over the other T-1 tokens
        j = (i + torch.randint(1, t, (m,), generator=gen)) % t
    else:
        j = i.clone()
    lam = torch.rand(m, 1, generator=gen)
    i, j, lam = i.to(hidden.device), j.to(hidden.device), lam.to(hidden.device)
    h = hidden.float()
    mixed = lam * h[i] + (1.0 - lam) * h[j]
    return torch.cat([hidden, mixed.to(hidden.dtype)])
