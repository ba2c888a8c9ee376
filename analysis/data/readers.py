"""Reading a source: its documents (demo files, ``.txt`` / ``.jsonl`` files, streamed hf: datasets),
tokenized and joined into one token stream per domain (memoised for local sources)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.outputs import loads_json
from moescope.analysis.data.sources import DataSource, check_split, demo_corpus_dir, parse_source
from torch import Tensor

DOC_MARKER = "<|endoftext|>"  # a line holding only this separates documents in corpus files
HF_MAX_DOCUMENTS = 100_000  # cap on documents streamed from one hf: source
HF_SHUFFLE_BUFFER = 2_000  # ds.shuffle buffer for random sampling from hf:
TOKENIZE_BATCH = 256  # documents per tokenizer call

_MARKER_LINE = re.compile(r"\n?^" + re.escape(DOC_MARKER) + r"[ \t]*$\n?", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")


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
            row = loads_json(line, where)
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
    check_split(split)
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


class ContentHasher:
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


def local_streams(src: DataSource, tokenizer, split: str, tok_fp: str) -> tuple[dict[str, Tensor], str]:
    """Token streams of a demo:/file: source, memoised on (tokenizer, separator, text content)."""
    texts = load_texts(src, split)
    sep = separator_id(tokenizer)
    hasher = ContentHasher()
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


def hf_stream(
    src: DataSource, tokenizer, target_tokens: int | None, seed: int | None
) -> tuple[dict[str, Tensor], str]:
    """Stream documents until the token stream holds ``target_tokens`` (None: up to the document cap)."""
    sep = separator_id(tokenizer)
    hasher, pieces, n_tokens, batch = ContentHasher(), [], 0, []
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
    check_split(split)
    if src.kind == "hf":
        return hf_stream(src, tokenizer, None, None)[0]
    streams = local_streams(src, tokenizer, split, tokenizer_fingerprint(tokenizer))[0]
    return {d: t.clone() for d, t in streams.items()}

