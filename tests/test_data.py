"""Data sources, token streams, windows and fingerprints (offline: a tiny local tokenizer and corpus)."""

from __future__ import annotations

import json

import pytest
import torch
from moescope.analysis import data
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import REPO_ROOT, demo_model_dir
from moescope.analysis.data import (
    eval_windows,
    load_texts,
    parse_source,
    sample_tokens,
    token_streams,
    tokenizer_fingerprint,
)
from moescope.analysis.measure.augment import mix_hidden_rows

EOT = "<|endoftext|>"
SAMPLE_TEXT = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "def f(x):\n    return x + 1\n",
    "der die das und ein eine, el la los las y",
]


def make_tokenizer(texts=SAMPLE_TEXT, vocab_size: int = 300):
    """A byte-level BPE trained on a few strings, wrapped like a hub tokenizer (eos = bos = EOT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _docs(domain: str, n: int) -> list[str]:
    return [
        f"{domain} document {i}: " + " ".join(f"{domain}{i}w{j}" for j in range(20 + i)) for i in range(n)
    ]


def _write_split(path, docs) -> None:
    path.write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A three-domain corpus in the demo layout, plus a folder without a test split (not a domain)."""
    root = tmp_path / "corpus"
    for domain, n in (("alpha", 6), ("beta", 5), ("gamma", 4)):
        (root / domain).mkdir(parents=True)
        _write_split(root / domain / "validation.txt", _docs(domain, n))
        _write_split(root / domain / "test.txt", _docs(domain + "T", n))
    (root / "incomplete").mkdir()
    _write_split(root / "incomplete" / "validation.txt", _docs("x", 2))
    monkeypatch.setenv(data.DEMO_CORPUS_ENV, str(root))
    return root


def _stream(tok, docs: list[str]) -> torch.Tensor:
    """The stream rule, written out independently: ids of each document, eos between them."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            out.append(tok.eos_token_id)
        out.extend(tok.encode(doc, add_special_tokens=False))
    return torch.tensor(out)


def _is_window_of(row: torch.Tensor, stream: torch.Tensor) -> bool:
    windows = stream.unfold(0, row.numel(), 1)
    return bool((windows == row).all(dim=1).any())


# ---- sources ---------------------------------------------------------------------------------
def test_demo_domains_are_folders_with_both_splits(corpus):
    assert data.demo_domains() == ["alpha", "beta", "gamma"]
    assert parse_source("demo:all").domains == ["alpha", "beta", "gamma"]
    assert parse_source("demo:beta").domains == ["beta"]


def test_load_texts_splits_documents_on_marker_lines(corpus):
    texts = load_texts("demo:all")
    assert sorted(texts) == ["alpha", "beta", "gamma"]
    assert texts["alpha"] == _docs("alpha", 6)
    assert load_texts("demo:gamma", split="test") == {"gamma": _docs("gammaT", 4)}


def test_demo_files_without_markers_split_on_blank_lines(corpus):
    (corpus / "alpha" / "validation.txt").write_text("first doc\nline two\n\n\nsecond doc\n\nthird\n")
    assert load_texts("demo:alpha")["alpha"] == ["first doc\nline two", "second doc", "third\n"]


def test_shipped_corpus_matches_its_manifest():
    root = REPO_ROOT / "demo" / "corpus"
    if not (root / "manifest.json").is_file():
        pytest.skip("the demo corpus is not built")
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(data.demo_domains()) == set(manifest["domains"])
    for domain, facts in manifest["domains"].items():
        for split in data.SPLITS:
            assert len(load_texts(f"demo:{domain}", split)[domain]) == facts[split]["documents"], (
                domain,
                split,
            )


def test_file_txt_is_one_document_unless_marked(tmp_path, tok):
    plain = tmp_path / "notes.txt"
    plain.write_text("para one\n\npara two\n")
    spec = f"file:{plain}"
    assert load_texts(spec) == {spec: ["para one\n\npara two\n"]}
    marked = tmp_path / "marked.txt"
    _write_split(marked, ["a b c", "d e"])
    assert load_texts(f"file:{marked}")[f"file:{marked}"] == ["a b c", "d e"]


def test_file_jsonl_reads_text_fields(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha beta", "id": 1}, {"text": "gamma"}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = f"file:{path}"
    assert load_texts(spec) == {spec: ["alpha beta", "gamma"]}
    batch = eval_windows(spec, tok, seq_len=2)
    assert batch.domains == (spec,) * batch.n_samples and batch.split is None


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"text": "ok"}', "", "{not json"], "line 3"),
        (['{"text": "ok"}', '{"body": "x"}'], "line 2 of .* has no 'text' field \\(got: body\\)"),
        (['{"text": 5}'], "line 1 of .*'text' is a int"),
    ],
)
def test_file_jsonl_bad_line_names_the_line(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoescopeError, match=expected):
        load_texts(f"file:{path}")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("foo:x", r"unknown data source kind 'foo'.*Available: demo, file, hf.*hf:NAME\[:CONFIG\]:SPLIT"),
        ("dmeo:all", r"Did you mean 'demo'\?"),
        (
            "demo:klingon",
            r"'demo:klingon'.*unknown demo domain 'klingon'.*Available: all, alpha, beta, gamma",
        ),
        ("demo:incomplete", r"unknown demo domain 'incomplete'"),
        ("demo:", r"unknown demo domain ''"),
        ("demo", r"no kind prefix; did you mean 'demo:all'\?"),
        ("data.jsonl", r"did you mean 'file:data.jsonl'\?"),
        ("", r"empty; accepted: demo:DOMAIN"),
        ("file:/no/such/file.txt", r"'/no/such/file.txt' does not exist"),
        ("file:corpus.csv", r"unsupported file type '.csv'; accepted: .txt, .jsonl"),
        ("file:", r"names no file"),
        ("hf:wikitext", r"'hf:wikitext' has no split; accepted: hf:NAME\[:CONFIG\]:SPLIT\[:FIELD\]"),
        ("hf:a:b:c:d:e", r"has 5 parts"),
        ("hf::train", r"empty dataset name"),
    ],
)
def test_bad_specs_say_what_is_accepted(corpus, spec, expected):
    with pytest.raises(MoescopeError, match=expected) as info:
        parse_source(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "parts", "canonical"),
    [
        ("hf:openwebtext:train", ("openwebtext", None, "train", "text"), "hf:openwebtext:train"),
        ("hf:wikitext:wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test", "text"), None),
        (
            "hf:allenai/c4:en:validation:text",
            ("allenai/c4", "en", "validation", "text"),
            "hf:allenai/c4:en:validation",
        ),
        ("hf:my/set:train:content", ("my/set", None, "train", "content"), None),
        ("hf:my/set:default:train", ("my/set", "default", "train", "text"), None),
        ("hf:my/set::shard0:body", ("my/set", None, "shard0", "body"), None),
        ("hf:my/set:train[:10%]", ("my/set", None, "train[:10%]", "text"), None),
    ],
)
def test_hf_spec_parts(spec, parts, canonical):
    src = parse_source(spec)
    assert (src.name, src.config, src.hf_split, src.field) == parts
    assert src.spec == (canonical or spec)
    assert parse_source(src.spec) == src  # the canonical spec parses back to the same source


def test_hf_offline_gives_one_line_error(monkeypatch, tok):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoescopeError) as info:
        sample_tokens("hf:wikitext:wikitext-2-raw-v1:test", tok, 2, 8)
    msg = str(info.value)
    assert msg.startswith(
        "cannot load hf:wikitext:wikitext-2-raw-v1:test: the Hugging Face hub is unreachable ("
    )
    assert "use demo:all, demo:DOMAIN or file:PATH offline" in msg and "\n" not in msg


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` replaced by a local generator of 500 rows; records calls and rows read."""
    import datasets

    log = {"calls": [], "read": 0}

    def gen():
        for i in range(500):
            log["read"] += 1
            yield {"content": f"row {i} " + "word " * (i % 7 + 3), "id": i}

    def load_dataset(name, config=None, split=None, streaming=False):
        log["calls"].append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return log


def test_hf_streams_only_what_it_needs(fake_hub, tok):
    first = sample_tokens("hf:org/set:train:content", tok, 2, 16, sampling="first")
    assert fake_hub["calls"] == [("org/set", None, "train", True)]
    assert fake_hub["read"] < 50
    texts = [f"row {i} " + "word " * (i % 7 + 3) for i in range(50)]
    assert torch.equal(first.input_ids.flatten(), _stream(tok, texts)[:32])
    assert first.domains == ("hf:org/set:train:content",) * 2 and first.split == "train"
    a = sample_tokens("hf:org/set:train:content", tok, 4, 16, seed=1)
    b = sample_tokens("hf:org/set:train:content", tok, 4, 16, seed=1)
    c = sample_tokens("hf:org/set:train:content", tok, 4, 16, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_hf_missing_field_lists_fields(fake_hub, tok):
    with pytest.raises(MoescopeError, match=r"no field 'text' \(fields: content, id\).*SPLIT:FIELD"):
        sample_tokens("hf:org/set:train", tok, 2, 16)


# ---- streams and windows ---------------------------------------------------------------------
def test_demo_streams_are_the_corpus_files_tokenized_whole(corpus, tok):
    """demo: sources are the corpus files exactly as the demo model was trained on them."""
    streams = token_streams("demo:all", tok)
    assert sorted(streams) == ["alpha", "beta", "gamma"]
    for domain in streams:
        text = (corpus / domain / "validation.txt").read_text(encoding="utf-8")
        assert torch.equal(streams[domain], torch.tensor(tok(text, add_special_tokens=False).input_ids))


def test_file_streams_join_documents_with_eos(corpus, tok):
    for domain, n in (("alpha", 6), ("beta", 5), ("gamma", 4)):
        spec = f"file:{corpus / domain / 'validation.txt'}"
        stream = token_streams(spec, tok)[spec]
        assert torch.equal(stream, _stream(tok, _docs(domain, n)))
        assert int((stream == tok.eos_token_id).sum()) == n - 1


def test_bos_separates_documents_when_there_is_no_eos(corpus):
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    spec = f"file:{corpus / 'gamma' / 'validation.txt'}"
    stream = token_streams(spec, no_eos)[spec]
    assert int((stream == no_eos.bos_token_id).sum()) == 3


def test_random_sampling_is_seeded(corpus, tok):
    a = sample_tokens("demo:all", tok, 9, 16, seed=3)
    b = sample_tokens("demo:all", tok, 9, 16, seed=3)
    c = sample_tokens("demo:all", tok, 9, 16, seed=4)
    assert a.input_ids.shape == (9, 16) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0


def test_demo_all_spreads_rows_over_domains(corpus, tok):
    streams = token_streams("demo:all", tok)
    for sampling in ("random", "first"):
        batch = sample_tokens("demo:all", tok, 7, 12, sampling=sampling)
        assert batch.domain_counts() == {"alpha": 3, "beta": 2, "gamma": 2}
        assert batch.domains == ("alpha",) * 3 + ("beta",) * 2 + ("gamma",) * 2
        for row, domain in zip(batch.input_ids, batch.domains, strict=True):
            assert _is_window_of(row, streams[domain])
            assert not any(_is_window_of(row, streams[d]) for d in streams if d != domain)
    assert sample_tokens("demo:all", tok, 2, 12).domain_counts() == {"alpha": 1, "beta": 1}


def test_first_windows_are_exact_slices(corpus, tok):
    stream = _stream(tok, _docs("beta", 5))
    batch = sample_tokens("demo:beta", tok, 4, 10, sampling="first", seed=99)
    for i in range(4):
        assert torch.equal(batch.input_ids[i], stream[i * 10 : (i + 1) * 10])
    assert batch.seed is None
    assert batch.fingerprint == sample_tokens("demo:beta", tok, 4, 10, sampling="first", seed=1).fingerprint
    assert batch.fingerprint != sample_tokens("demo:beta", tok, 4, 10).fingerprint


def test_fingerprint_follows_content_tokenizer_and_shape(corpus, tok):
    base = sample_tokens("demo:alpha", tok, 3, 8)
    assert base.fingerprint != sample_tokens("demo:alpha", tok, 3, 9).fingerprint
    assert base.fingerprint != sample_tokens("demo:alpha", tok, 4, 8).fingerprint
    assert base.fingerprint != sample_tokens("demo:alpha", tok, 3, 8, split="test").fingerprint
    other_tok = make_tokenizer(SAMPLE_TEXT + ["alpha document tokens"], vocab_size=320)
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(make_tokenizer()) == tokenizer_fingerprint(tok)
    assert base.fingerprint != sample_tokens("demo:alpha", other_tok, 3, 8).fingerprint
    path = corpus / "alpha" / "validation.txt"
    path.write_text(path.read_text().replace("document 5", "document five"))
    assert base.fingerprint != sample_tokens("demo:alpha", tok, 3, 8).fingerprint
    assert torch.equal(
        token_streams("demo:alpha", tok)["alpha"],
        torch.tensor(tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids),
    )


def test_tokenizer_without_eos_or_bos_is_refused(corpus):
    bare = make_tokenizer()
    bare.eos_token = bare.bos_token = None
    with pytest.raises(MoescopeError, match="neither an eos nor a bos token"):
        sample_tokens("demo:all", bare, 2, 8)


def test_tokenizer_fingerprint_without_backend():
    class Plain:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    class Other(Plain):
        pass

    assert tokenizer_fingerprint(Plain()) == tokenizer_fingerprint(Plain())
    assert tokenizer_fingerprint(Plain()) != tokenizer_fingerprint(Other())


def test_not_enough_tokens_says_how_many(corpus, tok):
    have = token_streams("demo:gamma", tok)["gamma"].numel()
    for sampling in ("random", "first"):
        with pytest.raises(
            MoescopeError,
            match=rf"domain 'gamma': it has {have} tokens, 5 windows of {have // 4} asks for {5 * (have // 4)}",
        ):
            sample_tokens("demo:gamma", tok, 5, have // 4, sampling=sampling)
    have_test = token_streams("demo:gamma", tok, split="test")["gamma"].numel()
    with pytest.raises(
        MoescopeError, match=rf"demo:gamma \(test\), domain 'gamma': it has {have_test} tokens, one window"
    ):
        eval_windows("demo:gamma", tok, have_test + 1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"split": "train"}, r"unknown split 'train'; accepted: validation, test"),
        ({"sampling": "strided"}, r"unknown sampling 'strided'.*Available: first, random"),
        ({"n_samples": 0}, r"n_samples must be a positive integer, got 0"),
        ({"seq_len": 2.5}, r"seq_len must be a positive integer, got 2.5"),
        ({"seed": "x"}, r"seed must be an integer"),
    ],
)
def test_bad_parameters(corpus, tok, kwargs, expected):
    args = {"n_samples": 2, "seq_len": 8, **kwargs}
    with pytest.raises(MoescopeError, match=expected):
        sample_tokens("demo:all", tok, **args)


def test_eval_windows_cover_the_stream_from_the_start(corpus, tok):
    streams = token_streams("demo:all", tok, split="test")
    full = eval_windows("demo:all", tok, seq_len=16)
    assert full.split == "test" and full.sampling == "eval"
    for domain, stream in streams.items():
        rows = full.rows(domain)
        k = stream.numel() // 16
        assert rows.shape == (k, 16)
        assert torch.equal(rows.flatten(), stream[: k * 16])
    capped = eval_windows("demo:all", tok, seq_len=16, max_tokens=40)
    assert capped.domain_counts() == {"alpha": 2, "beta": 2, "gamma": 2}
    assert torch.equal(capped.rows("beta").flatten(), streams["beta"][:32])
    assert capped.fingerprint != full.fingerprint
    assert capped.fingerprint == eval_windows("demo:all", tok, seq_len=16, max_tokens=40).fingerprint
    with pytest.raises(MoescopeError, match=r"max_tokens \(8\) is smaller than seq_len \(16\)"):
        eval_windows("demo:all", tok, seq_len=16, max_tokens=8)


def test_describe_is_short_and_informative(corpus, tok):
    text = sample_tokens("demo:all", tok, 6, 8, seed=5).describe()
    assert text.startswith("demo:all (validation): 6×8 tokens, random seed 5, 3 domains [")
    assert "\n" not in text and len(text) < 120


# ---- augmentation ----------------------------------------------------------------------------
def test_mix_hidden_rows_appends_convex_mixtures():
    hidden = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    out = mix_hidden_rows(hidden, ratio=1.5, seed=7)
    assert out.shape == (6 + 9, 5)
    assert torch.equal(out[:6], hidden)
    assert torch.equal(out, mix_hidden_rows(hidden, ratio=1.5, seed=7))
    assert not torch.equal(out, mix_hidden_rows(hidden, ratio=1.5, seed=8))
    for row in out[6:]:
        found = False
        for i in range(6):
            for j in range(6):
                if i == j:
                    continue
                diff = hidden[i] - hidden[j]  # row = h_j + λ (h_i - h_j)
                lam = float((row - hidden[j]) @ diff / (diff @ diff))
                if 0.0 <= lam <= 1.0 and torch.allclose(hidden[j] + lam * diff, row, atol=1e-5):
                    found = True
        assert found, row
    assert mix_hidden_rows(hidden, ratio=0.0).shape == (6, 5)
    assert mix_hidden_rows(hidden.to(torch.bfloat16), 0.5).dtype == torch.bfloat16
    with pytest.raises(MoescopeError, match="ratio must be a number ≥ 0"):
        mix_hidden_rows(hidden, ratio=-1)
    with pytest.raises(MoescopeError, match=r"expects hidden states \[T, d\]"):
        mix_hidden_rows(hidden[0], ratio=1)


# ---- the demo tokenizer and corpus -----------------------------------------------------------
@pytest.fixture(scope="module")
def demo_tokenizer():
    if not (demo_model_dir() / "tokenizer.json").is_file():
        pytest.skip("the demo tokenizer is not built (demo/model/tokenizer.json)")
    if not data.demo_domains():
        pytest.skip("the demo corpus is not built")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir())


def test_demo_tokenizer_on_the_shipped_corpus(demo_tokenizer, monkeypatch):
    monkeypatch.delenv(data.DEMO_CORPUS_ENV, raising=False)
    domains = data.demo_domains()
    batch = sample_tokens("demo:all", demo_tokenizer, 2 * len(domains), 64, seed=0)
    assert batch.domain_counts() == dict.fromkeys(domains, 2)
    first = sample_tokens("demo:python", demo_tokenizer, 1, 64, sampling="first")
    decoded = demo_tokenizer.decode(first.input_ids[0].tolist()).rstrip("\ufffd")
    docs = load_texts("demo:python")["python"]
    assert f"{demo_tokenizer.eos_token}".join(docs).startswith(decoded)
    windows = eval_windows("demo:all", demo_tokenizer, 128, max_tokens=512)
    assert windows.domain_counts() == dict.fromkeys(domains, 4)
