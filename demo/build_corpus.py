#!/usr/bin/env python3
"""Rebuild the multi-domain demo corpus from locally installed Debian packages.

Six domains, each built only from files already present on a Debian 12 machine:

* ``python``    - CPython standard-library source (``*.py``; tests, site-packages,
                  codec tables and generated data modules skipped)
* ``docs``      - English technical prose extracted from the ``python3.11-doc`` HTML
                  (main body only, code blocks / signatures / navigation dropped)
* ``quotes_en`` - English fortunes (``fortunes``, ``fortunes-min``)
* ``german``    - ``fortunes-de``
* ``spanish``   - ``fortunes-es`` (the ``off/`` offensive folder is skipped)
* ``italian``   - ``fortunes-it``

Every domain is split *by document* (one source file for ``python``/``docs``, one
fortune for the fortune domains) into ``test``, ``validation`` and ``train``.
The split is deterministic: documents are listed in sorted order, de-duplicated,
then shuffled with ``random.Random(f"{seed}:{domain}")``.  Test and validation
are filled greedily (in shuffled order) up to ~``--eval-bytes`` each; train gets
the remaining documents, capped at ``--train-cap`` bytes.

File format of ``demo/corpus/<domain>/<split>.txt`` (UTF-8): every document is
followed by a line containing only ``<|endoftext|>``, i.e. the file is
``"".join(doc + "\\n<|endoftext|>\\n" for doc in docs)``.  ``<|endoftext|>`` is
also the tokenizer's bos/eos token, so a document boundary is one EOS token.
Use :func:`read_split` to get the documents back.

Usage (from the repository root)::

    python demo/build_corpus.py            # writes demo/corpus/
    python demo/build_corpus.py --check    # rebuild in memory, compare with manifest.json
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

EOT = "<|endoftext|>"
DOC_SEP = "\n" + EOT + "\n"  # appended after every document
SPLITS = ("train", "validation", "test")
DOMAINS = ("python", "docs", "quotes_en", "german", "spanish", "italian")

FORTUNE_ROOT = Path("/usr/share/games/fortunes")
DOCS_ROOT = Path("/usr/share/doc/python3.11-doc/html")

DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[@-Z\\-_]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Normalise a raw document: NFC, no overstrike/ANSI/control chars, no
    trailing whitespace, no leading/trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    while True:  # remove "X\bX" (bold) and "_\bX" (underline) overstriking
        new = _OVERSTRIKE.sub("", text)
        if new == text:
            break
        text = new
    text = _ANSI.sub("", text)
    text = text.replace("\x0c", "\n")
    text = _CTRL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = text.replace(EOT, "<endoftext>")  # never let data forge the separator
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    # collapse runs of >2 blank lines
    out, blank = [], 0
    for ln in lines:
        blank = blank + 1 if not ln else 0
        if blank <= 2:
            out.append(ln)
    return "\n".join(out)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def letter_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() for c in chars) / len(chars)


def dpkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "not installed"
    except FileNotFoundError:
        return "unknown (no dpkg-query)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_split(path: str | os.PathLike) -> list[str]:
    """Read a corpus split file back into its list of documents."""
    text = Path(path).read_text(encoding="utf-8")
    docs = text.split(DOC_SEP)
    if docs and docs[-1] == "":
        docs.pop()
    return docs


# ---------------------------------------------------------------------------
# fortunes
# ---------------------------------------------------------------------------


def fortune_files(folder: Path, exclude: set[str]) -> list[Path]:
    """Regular fortune data files in ``folder`` (non-recursive): no ``.dat``
    indexes, no ``.u8`` symlinks, no symlinks into other packages."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file():
            continue
        if p.name.endswith((".dat", ".u8")) or p.name in exclude:
            continue
        files.append(p)
    return files


def parse_fortunes(path: Path) -> list[str]:
    text = read_text(path).replace("\r\n", "\n")
    chunks, cur = [], []
    for line in text.split("\n"):
        if line.rstrip() == "%":
            chunks.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    chunks.append("\n".join(cur))
    out = []
    for ch in chunks:
        ch = clean_text(ch)
        if len(ch) < 8:
            continue
        if letter_ratio(ch) < 0.6:  # ASCII art, tables, banners
            continue
        out.append(ch)
    return out


FORTUNE_SETS = {
    # domain: (folder, excluded file names)
    "quotes_en": (FORTUNE_ROOT, {"art", "ascii-art"}),
    "german": (FORTUNE_ROOT / "de", {"asciiart"}),
    "spanish": (FORTUNE_ROOT / "es", set()),  # es/off/ is a sub-folder: never read
    "italian": (FORTUNE_ROOT / "it", {"banner"}),
}


def collect_fortunes(domain: str) -> list[tuple[str, str]]:
    folder, exclude = FORTUNE_SETS[domain]
    docs = []
    for f in fortune_files(folder, exclude):
        for i, fo in enumerate(parse_fortunes(f)):
            docs.append((f"{f.relative_to(FORTUNE_ROOT)}#{i}", fo))
    return docs


# ---------------------------------------------------------------------------
# Python documentation (HTML -> prose)
# ---------------------------------------------------------------------------

DOCS_SKIP_FILES = {
    "genindex.html", "genindex-all.html", "search.html", "py-modindex.html",
    "contents.html", "copyright.html", "license.html", "download.html", "index.html",
    "whatsnew/changelog.html",
}
BLOCK_TAGS = {
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dd", "dt", "div", "section",
    "blockquote", "table", "tr", "td", "th", "ul", "ol", "dl", "caption", "br",
}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _DocHTML(HTMLParser):
    """Collects paragraphs of prose from the Sphinx ``div.body[role=main]``."""

    SKIP_TAGS = {"pre", "script", "style", "table", "dt", "nav", "form", "svg"}
    SKIP_CLASSES = {"highlight", "headerlink", "linenos", "sphinxsidebar", "related",
                    "footer", "toctree-wrapper", "admonition-title", "versionmodified-wrapper"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, starts_main, starts_skip)
        self.in_main = 0
        self.skip = 0
        self.buf: list[str] = []
        self.paras: list[tuple[str, str]] = []  # (kind, text)
        self.kind = "p"

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paras.append((self.kind, text))

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag == "br" and self.in_main and not self.skip:
                self.buf.append(" ")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        starts_main = a.get("role") == "main"
        starts_skip = bool(
            self.in_main
            and (tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES
                 or any(c.startswith("highlight") for c in classes))
        )
        if tag in BLOCK_TAGS and self.in_main and not self.skip:
            self._flush()
            if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                self.kind = "h"
            elif tag in ("p", "li", "dd"):
                self.kind = "p"
        self.stack.append((tag, starts_main, starts_skip))
        self.in_main += starts_main
        self.skip += starts_skip

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        # pop until the matching tag (tolerates sloppy HTML)
        for idx in range(len(self.stack) - 1, -1, -1):
            if self.stack[idx][0] == tag:
                break
        else:
            return
        while len(self.stack) > idx:
            t, m, s = self.stack.pop()
            if t in BLOCK_TAGS and self.in_main and not self.skip:
                self._flush()
                self.kind = "p"
            self.in_main -= m
            self.skip -= s

    def handle_data(self, data):
        if self.in_main and not self.skip:
            self.buf.append(data)


def html_to_prose(raw: str) -> str:
    parser = _DocHTML()
    parser.feed(raw)
    parser.close()
    parser._flush()
    keep = []
    for kind, text in parser.paras:
        text = html.unescape(text).replace("\u00b6", "").strip()
        words = re.findall(r"[A-Za-z]{2,}", text)
        if kind == "h":
            if words:
                keep.append(text)
            continue
        if len(words) < 4 or letter_ratio(text) < 0.7:
            continue  # code-heavy fragments, lone identifiers, tables of symbols
        keep.append(text)
    return clean_text("\n\n".join(keep))


def collect_docs() -> list[tuple[str, str]]:
    docs = []
    for p in sorted(DOCS_ROOT.rglob("*.html")):
        rel = p.relative_to(DOCS_ROOT).as_posix()
        if rel.startswith("_") or rel in DOCS_SKIP_FILES or Path(rel).name.startswith("genindex"):
            continue
        text = html_to_prose(read_text(p))
        if len(text) < 400:
            continue
        docs.append((rel, text))
    return docs


# ---------------------------------------------------------------------------
# Python stdlib source
# ---------------------------------------------------------------------------

STDLIB_SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "encodings",      # generated codec tables
    "pydoc_data",     # one huge generated string table
    "lib2to3",        # grammar/fixer boilerplate, deprecated
    "ensurepip",      # bundled wheels
}
STDLIB_MAX_BYTES = 250_000


def collect_python(stdlib: Path) -> list[tuple[str, str]]:
    docs = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if any(part in STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if p.is_symlink() or p.stat().st_size > STDLIB_MAX_BYTES:
            continue
        text = clean_text(read_text(p))
        if len(text) < 200:
            continue
        docs.append((rel.as_posix(), text))
    return docs


# ---------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------


def dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for src, text in docs:
        key = re.sub(r"\s+", " ", text).strip().lower()
        if key in seen:
            continue
        seen.add(key)
        out.append((src, text))
    return out


def split_docs(docs, domain, seed, eval_bytes, eval_max_doc, train_cap):
    order = list(range(len(docs)))
    random.Random(f"{seed}:{domain}").shuffle(order)
    nbytes = [len((docs[i][1] + DOC_SEP).encode("utf-8")) for i in order]
    splits = {s: [] for s in SPLITS}
    used = set()
    hard_max = int(eval_bytes * 1.25)
    for split in ("test", "validation"):
        total = 0
        for pos, i in enumerate(order):
            if total >= eval_bytes:
                break
            if i in used or nbytes[pos] > eval_max_doc or total + nbytes[pos] > hard_max:
                continue
            splits[split].append(i)
            used.add(i)
            total += nbytes[pos]
    total = 0
    for pos, i in enumerate(order):
        if i in used:
            continue
        if total + nbytes[pos] > train_cap:
            continue
        splits["train"].append(i)
        used.add(i)
        total += nbytes[pos]
    return {s: [docs[i] for i in idx] for s, idx in splits.items()}, len(docs) - len(used)


# ---------------------------------------------------------------------------
# SOURCES.md
# ---------------------------------------------------------------------------


def sources_md(manifest: dict, stdlib: Path) -> str:
    v = {p: dpkg_version(p) for p in
         ("fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "python3.11-doc")}
    pyver = manifest["python_version"]
    info = {
        "python": (
            f"CPython {pyver} standard library source, `{stdlib}` (`*.py`)",
            "interpreter stdlib (" + (dpkg_owner(stdlib / "os.py") or "not from a Debian package") + ")",
            "PSF License Version 2 (Python Software Foundation License); see `LICENSE.txt` in the stdlib dir",
            "one document per `.py` file; skipped: test/tests/idle_test, site-packages, encodings/, "
            "pydoc_data/, lib2to3/, ensurepip/, files > 250 kB",
        ),
        "docs": (
            f"Python 3.11 documentation HTML, `{DOCS_ROOT}`",
            f"Debian `python3.11-doc` {v['python3.11-doc']}",
            "PSF License Version 2 (documentation; code examples also 0BSD); "
            "see `/usr/share/doc/python3.11-doc/copyright`",
            "one document per HTML page, prose of the `div.body[role=main]` only (headings, paragraphs, "
            "list items); code blocks, signatures, tables, navigation, index/search pages and the "
            "changelog dropped; paragraphs with < 4 words or < 70% letters dropped",
        ),
        "quotes_en": (
            f"`{FORTUNE_ROOT}/*` (regular files only; `art`, `ascii-art` and the symlinks into `it/` skipped)",
            f"Debian `fortunes` {v['fortunes']} + `fortunes-min` {v['fortunes-min']}",
            "BSD licence (fortune-mod, University of California; see `/usr/share/doc/fortunes/copyright`); "
            "quotations are attributed in the text",
            "one document per fortune",
        ),
        "german": (
            f"`{FORTUNE_ROOT}/de/*` (`asciiart` skipped)",
            f"Debian `fortunes-de` {v['fortunes-de']}",
            "GPL-2+ (see `/usr/share/doc/fortunes-de/copyright`)",
            "one document per fortune",
        ),
        "spanish": (
            f"`{FORTUNE_ROOT}/es/*.fortunes*` (the offensive `es/off/` folder skipped)",
            f"Debian `fortunes-es` {v['fortunes-es']}",
            "fortunes presumed public domain, collection tools GPL-2+ "
            "(see `/usr/share/doc/fortunes-es/copyright`)",
            "one document per fortune",
        ),
        "italian": (
            f"`{FORTUNE_ROOT}/it/*` (`banner` skipped)",
            f"Debian `fortunes-it` {v['fortunes-it']}",
            "\"freeware (public domain)\" per the fortune-it copying policy "
            "(see `/usr/share/doc/fortunes-it/copyright`)",
            "one document per fortune (the upstream text is ASCII; accents are written as `e'`)",
        ),
    }
    lines = [
        "# Demo corpus: sources and licences",
        "",
        "Generated by `demo/build_corpus.py`; do not edit by hand.",
        "Everything comes from files installed by Debian packages (plus the running",
        "interpreter's standard library); nothing is downloaded.",
        "",
        "Rebuild (from the repository root):",
        "",
        "```bash",
        "python demo/build_corpus.py          # writes demo/corpus/*/{train,validation,test}.txt",
        "python demo/build_corpus.py --check  # verifies the result against manifest.json",
        "```",
        "",
        f"Settings: seed {manifest['seed']}, eval target {manifest['eval_bytes']} bytes per split, "
        f"max eval document {manifest['eval_max_doc']} bytes, train cap {manifest['train_cap']} bytes per domain. "
        "`train.txt` files are git-ignored (rebuild them); `validation.txt` and `test.txt` are committed.",
        "",
        "File format: UTF-8; every document is followed by a line containing only `<|endoftext|>` "
        "(`''.join(doc + '\\n<|endoftext|>\\n' for doc in docs)`). Documents are de-duplicated within a "
        "domain (whitespace/case-insensitive) before splitting, so no document is in two splits.",
        "",
        "| domain | source | package / version | licence |",
        "|---|---|---|---|",
    ]
    for d in DOMAINS:
        src, pkg, lic, _ = info[d]
        lines.append(f"| `{d}` | {src} | {pkg} | {lic} |")
    lines += ["", "## Documents and bytes per split", "",
              "| domain | available docs | unused (over train cap) | train docs | train bytes | "
              "validation docs | validation bytes | test docs | test bytes |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in DOMAINS:
        m = manifest["domains"][d]
        lines.append(
            f"| `{d}` | {m['available_documents']} | {m['unused_documents']} | "
            + " | ".join(f"{m[s]['documents']} | {m[s]['bytes']:,}" for s in SPLITS) + " |"
        )
    lines += ["", "## Notes per domain", ""]
    for d in DOMAINS:
        lines.append(f"* `{d}`: {info[d][3]}.")
    lines += ["", "Checksums of every split are in `manifest.json`.", ""]
    return "\n".join(lines)


def dpkg_owner(path: Path) -> str | None:
    try:
        out = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        return None
    pkg = out.stdout.split(":")[0].strip()
    return f"Debian `{pkg}` {dpkg_version(pkg)}"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def build(args) -> tuple[dict, dict[str, dict[str, bytes]]]:
    stdlib = Path(args.stdlib_dir)
    collectors = {
        "python": lambda: collect_python(stdlib),
        "docs": collect_docs,
        "quotes_en": lambda: collect_fortunes("quotes_en"),
        "german": lambda: collect_fortunes("german"),
        "spanish": lambda: collect_fortunes("spanish"),
        "italian": lambda: collect_fortunes("italian"),
    }
    manifest = {
        "format": "documents each followed by '\\n<|endoftext|>\\n'",
        "seed": args.seed,
        "eval_bytes": args.eval_bytes,
        "eval_max_doc": args.eval_max_doc,
        "train_cap": args.train_cap,
        "python_version": sys.version.split()[0],
        "domains": {},
    }
    blobs: dict[str, dict[str, bytes]] = {}
    for d in DOMAINS:
        docs = dedupe(collectors[d]())
        splits, unused = split_docs(docs, d, args.seed, args.eval_bytes, args.eval_max_doc, args.train_cap)
        manifest["domains"][d] = {"available_documents": len(docs), "unused_documents": unused}
        blobs[d] = {}
        for s in SPLITS:
            data = "".join(text + DOC_SEP for _, text in splits[s]).encode("utf-8")
            blobs[d][s] = data
            manifest["domains"][d][s] = {
                "documents": len(splits[s]), "bytes": len(data), "sha256": sha256(data),
            }
        print(f"{d:10s} docs={len(docs):6d} " + " ".join(
            f"{s}={len(splits[s])}/{len(blobs[d][s]):,}B" for s in SPLITS), file=sys.stderr)
    return manifest, blobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-bytes", type=int, default=120_000,
                    help="target size of validation and of test per domain")
    ap.add_argument("--eval-max-doc", type=int, default=30_000,
                    help="documents larger than this never go to validation/test")
    ap.add_argument("--train-cap", type=int, default=3_000_000, help="max train bytes per domain")
    ap.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare checksums with <out>/manifest.json")
    args = ap.parse_args(argv)

    manifest, blobs = build(args)
    out: Path = args.out
    if args.check:
        old = json.loads((out / "manifest.json").read_text())
        bad = [f"{d}/{s}" for d in DOMAINS for s in SPLITS
               if old["domains"][d][s]["sha256"] != manifest["domains"][d][s]["sha256"]]
        if bad:
            print("MISMATCH: " + ", ".join(bad))
            return 1
        print("OK: corpus matches manifest.json")
        return 0
    for d in DOMAINS:
        (out / d).mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            (out / d / f"{s}.txt").write_bytes(blobs[d][s])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "SOURCES.md").write_text(sources_md(manifest, Path(args.stdlib_dir)))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
