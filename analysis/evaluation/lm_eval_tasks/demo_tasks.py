"""Datasets and scoring for moescope's offline lm-eval tasks over the demo corpus test split.

lm-eval imports this file by path (``!function demo_tasks.…`` in the YAML next to it), so it
only needs :mod:`moescope.analysis.data` to be importable (``pip install -e .``). Every task reads the
committed ``demo/corpus/<domain>/test.txt`` files; nothing is downloaded.

* ``moescope_demo_ppl_<domain>`` — rolling log-likelihood over each test document (as lm-eval's
  wikitext task): word and byte perplexity, bits per byte.
* ``moescope_demo_continuation`` — 4-way multiple choice: given the start of a passage, pick its
  true continuation among three distractors cut from other passages (two from the same domain,
  one from another), so a model must follow the text rather than only recognise the language.
"""

from __future__ import annotations

import random
import re

CHOICES = 4
MAX_ITEMS_PER_DOMAIN = 100
CONTEXT_CHARS = (120, 320)  # a passage's context is cut at whitespace inside this range
CONTINUATION_CHARS = 80  # about this many characters, cut at whitespace
SEED = 1234


def _datasets():
    import datasets  # lm-eval's own dependency

    return datasets


def load_ppl(domain: str, **_: object):
    """``DatasetDict(test=[{"text": document}, ...])`` for one demo domain."""
    from moescope.analysis.data import load_texts

    docs = load_texts(f"demo:{domain}", split="test")[domain]
    return _datasets().DatasetDict({"test": _datasets().Dataset.from_dict({"text": docs})})


def process_ppl(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def _cut(text: str, lo: int, hi: int) -> int | None:
    """Index of the last whitespace in ``text[lo:hi]`` (the cut keeps that whitespace on the right)."""
    spaces = [m.start() for m in re.finditer(r"\s", text[lo:hi])]
    return lo + spaces[-1] if spaces else None


def _passages(doc: str) -> list[tuple[str, str]]:
    """(context, continuation) pairs cut from one document: a long document gives several."""
    out = []
    start = 0
    while len(doc) - start >= CONTEXT_CHARS[0] + CONTINUATION_CHARS // 2:
        piece = doc[start:]
        cut = _cut(piece, CONTEXT_CHARS[0], min(CONTEXT_CHARS[1], len(piece) - CONTINUATION_CHARS // 2))
        if cut is None:
            break
        rest = piece[cut:]
        end = _cut(rest, CONTINUATION_CHARS // 2, CONTINUATION_CHARS + 20) if len(rest) > CONTINUATION_CHARS else len(rest)
        end = end or len(rest)
        context, continuation = piece[:cut], rest[:end].rstrip()
        if context.strip() and len(continuation.strip()) >= 8:
            out.append((context, continuation))
        start += cut + end
    return out


def continuation_items(max_per_domain: int = MAX_ITEMS_PER_DOMAIN, seed: int = SEED) -> list[dict]:
    """The multiple-choice items, deterministic for a given corpus and seed."""
    from moescope.analysis.data import demo_domains, load_texts

    rng = random.Random(seed)
    by_domain = {}
    for domain in demo_domains():
        pairs = [p for doc in load_texts(f"demo:{domain}", split="test")[domain] for p in _passages(doc)]
        rng.shuffle(pairs)
        by_domain[domain] = pairs[: max_per_domain * 3]  # spares serve as distractors
    items = []
    domains = sorted(by_domain)
    for domain in domains:
        pairs = by_domain[domain]
        others = [d for d in domains if d != domain and by_domain[d]]
        for context, truth in pairs[:max_per_domain]:
            same = sorted({c for _, c in pairs if c.strip() != truth.strip()})
            if len(same) < CHOICES - 2 or not others:
                continue
            distractors = rng.sample(same, CHOICES - 2)
            taken = {c.strip() for c in (truth, *distractors)}
            pool = [c for _, c in by_domain[rng.choice(others)] if c.strip() not in taken]
            if not pool:
                continue
            distractors.append(rng.choice(pool))
            choices = [truth, *distractors]
            rng.shuffle(choices)
            items.append({"domain": domain, "context": context, "choices": choices, "label": choices.index(truth)})
    return items


def load_continuation(**_: object):
    """``DatasetDict(test=[{"domain", "context", "choices", "label"}, ...])``."""
    ds = _datasets()
    items = continuation_items()
    return ds.DatasetDict({"test": ds.Dataset.from_list(items)})
