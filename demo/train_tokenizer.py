#!/usr/bin/env python3
"""Train the demo's byte-level BPE tokenizer on the corpus train splits.

Vocabulary 4096 (256 byte symbols + merges + ``<|endoftext|>``), GPT-2 style
ByteLevel pre-tokenizer/decoder, no normaliser, so ``decode(encode(text)) == text``
for any UTF-8 text. ``<|endoftext|>`` is bos, eos, unk and pad token.

Usage (from the repository root)::

    python demo/train_tokenizer.py --out demo/model

``demo/train_model.py`` calls :func:`train_tokenizer` itself, so running this
script separately is only needed to experiment with the tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_corpus import DOMAINS, EOT  # noqa: E402

VOCAB_SIZE = 4096


def _iter_texts(corpus_dir: Path, chunk_chars: int = 1 << 16):
    for d in DOMAINS:
        text = (corpus_dir / d / "train.txt").read_text(encoding="utf-8")
        for i in range(0, len(text), chunk_chars):
            yield text[i : i + chunk_chars]


def train_tokenizer(corpus_dir: Path, vocab_size: int = VOCAB_SIZE, model_max_length: int = 512):
    """Return a ``transformers.PreTrainedTokenizerFast`` trained on ``corpus_dir/*/train.txt``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(Path(corpus_dir)), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return hf_tok


def check_roundtrip(hf_tok, corpus_dir: Path, n_chars: int = 20_000) -> dict[str, bool]:
    """decode(encode(text)) == text on the start of every domain's test split
    plus a few hand-written strings with umlauts/accents."""
    samples = {d: (Path(corpus_dir) / d / "test.txt").read_text(encoding="utf-8")[:n_chars] for d in DOMAINS}
    samples["accents"] = (
        "Grüße aus Köln: Äpfel, Öl, Übermaß, straße. ¿Qué tal? ¡Olé! Año, niño, "
        "acción. Perché è così? Città, però. Ça va, naïve café — “quotes” 😀\t\n  x"
    )
    ok = {}
    for name, text in samples.items():
        ids = hf_tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        ok[name] = hf_tok.decode(ids, clean_up_tokenization_spaces=False) == text
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus")
    ap.add_argument("--out", type=Path, default=HERE / "model")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    tok = train_tokenizer(args.corpus, args.vocab_size)
    ok = check_roundtrip(tok, args.corpus)
    print("round-trip:", ok)
    if not all(ok.values()):
        return 1
    tok.save_pretrained(args.out)
    print(f"saved tokenizer ({len(tok)} tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
