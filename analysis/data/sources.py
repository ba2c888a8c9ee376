"""Data sources: the one source syntax (``demo:DOMAIN``, ``file:PATH``, ``hf:NAME[:CONFIG]:SPLIT[:FIELD]``),
parsed and validated before any text is read (the syntax is described in :mod:`moescope.analysis.data`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.core.paths import REPO_ROOT

DEMO_CORPUS_ENV = "MOESCOPE_DEMO_CORPUS"
SPLITS = ("validation", "test")
SOURCE_KINDS = {
    "demo": "demo:DOMAIN or demo:all",
    "file": "file:PATH (.txt or .jsonl)",
    "hf": "hf:NAME[:CONFIG]:SPLIT[:FIELD]",
}
FILE_SUFFIXES = (".txt", ".jsonl")
HF_SPLIT_WORDS = ("train", "validation", "valid", "dev", "test", "eval")

SYNTAX = "; ".join(SOURCE_KINDS.values())


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
        raise MoescopeError(f"data source {spec!r} is empty; accepted: {SYNTAX}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        hint = (
            "demo:all" if spec == "demo" else f"file:{spec}" if Path(spec).suffix in FILE_SUFFIXES else None
        )
        did = f"; did you mean '{hint}'?" if hint else ""
        raise MoescopeError(f"data source '{spec}' has no kind prefix{did} accepted: {SYNTAX}")
    if kind not in SOURCE_KINDS:
        err = unknown_name("data source kind", kind, SOURCE_KINDS)
        raise MoescopeError(f"in data source '{spec}': {err} (syntax: {SYNTAX})")
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


def is_split_word(part: str) -> bool:
    return part.split("[", 1)[0].lower() in HF_SPLIT_WORDS


def _parse_hf(spec: str, rest: str) -> DataSource:
    usage = "accepted: hf:NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf:wikitext:wikitext-2-raw-v1:test or hf:openwebtext:train"
    parts = _split_hf_parts(rest)
    name, tail = parts[0], parts[1:]
    config, field = None, "text"
    if len(tail) == 1:
        (split,) = tail
    elif len(tail) == 2:
        if is_split_word(tail[0]) and not is_split_word(tail[1]):
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
    if is_split_word(split) and not is_split_word(field):
        return f"hf:{name}:{split}:{field}"
    return f"hf:{name}::{split}:{field}"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise MoescopeError(
            f"unknown split {split!r}; accepted: {', '.join(SPLITS)} (validation calibrates, test evaluates)"
        )
    return split

