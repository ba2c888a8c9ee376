"""Calibration and evaluation token data: one source syntax everywhere.

Sub-modules: :mod:`.sources` (the syntax, parsed and validated), :mod:`.readers` (documents and
token streams), :mod:`.windows` (the one windowing code path and :class:`TokenBatch`).

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
  a token budget, for perplexity; :func:`sliding_windows`: windows every ``stride`` tokens.

For ``demo:all`` the N rows are shared out over the domains as by round robin in sorted order
(the first ``N mod D`` domains give ``ceil(N/D)`` rows, the rest ``floor(N/D)``); each row comes
from its own domain's stream, and rows are listed grouped by domain in sorted order.

Every :class:`TokenBatch` carries a fingerprint: the sha256 of a canonical JSON of the source
spec, effective split, tokenizer fingerprint, separator id, N, L, seed, sampling (and token
budget), and the sha256 of the raw text used, so a changed corpus or tokenizer changes the key.

Shapes: N windows (rows), L tokens per window (``seq_len``), T tokens, d hidden size.
"""

from moescope.analysis.data.readers import (
    DOC_MARKER,
    HF_MAX_DOCUMENTS,
    load_texts,
    separator_id,
    split_documents,
    token_streams,
    tokenizer_fingerprint,
)
from moescope.analysis.data.sources import (
    DEMO_CORPUS_ENV,
    SOURCE_KINDS,
    SPLITS,
    DataSource,
    demo_corpus_dir,
    demo_domains,
    parse_source,
)
from moescope.analysis.data.windows import (
    DATA_VERSION,
    SAMPLINGS,
    TokenBatch,
    check_positive,
    eval_windows,
    sample_tokens,
    sliding_windows,
)

__all__ = ["DATA_VERSION", "DEMO_CORPUS_ENV", "DOC_MARKER", "HF_MAX_DOCUMENTS", "SAMPLINGS", "SOURCE_KINDS", "SPLITS",
           "DataSource", "TokenBatch", "check_positive", "demo_corpus_dir", "demo_domains", "eval_windows",
           "load_texts", "parse_source", "sample_tokens", "separator_id", "sliding_windows", "split_documents",
           "token_streams", "tokenizer_fingerprint"]
