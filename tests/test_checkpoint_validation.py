"""Issue 31: one validation of a checkpoint for both paths (analysis/model/checkpoint.py).

Each shard header is checked as the safetensors library checks it (the same files refused by
``safe_open`` and by moescope, a healthy one accepted by both); the index must match its shards
(one tensor in one place) and an ambiguous folder is refused; the tensor set must be what the config
implies (a missing weight is never initialised at random, an extra expert or a wrong shape never
exported). Every case goes through ``main()`` on both paths — ``prune`` without evaluation (the
streamed export) and ``eval`` (the model in memory) — each ending in exit 2, one stderr line,
nothing written. NaN in a copied tensor is refused by the stream as by the in-memory path."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.cache import ENV_VAR, Cache
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import demo_model_dir
from moescope.analysis.model import checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from test_faults_inputs import assert_refused

DEMO = demo_model_dir()
pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="demo model not built")


def raw_file(path: Path, tensors: dict[str, torch.Tensor], edit=None, text: str | None = None) -> Path:
    """``tensors`` as a safetensors file written by hand (byte for byte what safetensors writes),
    with ``edit(header)`` applied to the parsed header first (it may return a replacement), or
    ``text`` as the header's JSON."""
    header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": checkpoint.ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    if edit is not None:
        header = edit(header) or header
    raw = (text if text is not None else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def demo_copy(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / f, d / f)
    return d


STATE = load_file(DEMO / "model.safetensors") if (DEMO / "model.safetensors").is_file() else {}
NORM, EMB, Q = "model.norm.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"


def _set(name: str, key: str, value):
    def edit(h):
        h[name][key] = value
    return edit


def _drop_key(name: str, key: str):
    def edit(h):
        del h[name][key]
    return edit


def _overlap(h):  # the norm's bytes said to lie inside the embedding's (safetensors refuses the file)
    e = h[EMB]["data_offsets"][0]
    h[NORM]["data_offsets"] = [e, e + 4 * h[NORM]["shape"][0]]


def _backwards(h):
    b, e = h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [e, b]


# header faults: (edit of the parsed header, or the header text), words the line must say
HEADER_CASES = {
    "header-list": (None, "[]", ("list",)),
    "entry-without-offsets": (_drop_key(NORM, "data_offsets"), None, (NORM, "data_offsets")),
    "overlapping-offsets": (_overlap, None, (NORM, "overlap")),
    "begin-after-end": (_backwards, None, (NORM, "begin")),
    "shape-not-its-bytes": (_set(NORM, "shape", [3]), None, (NORM, "bytes")),
    "unknown-dtype": (_set(NORM, "dtype", "F7"), None, (NORM, "dtype")),
    "offsets-beyond-the-end": (_set(NORM, "data_offsets", [0, 10**12]), None, (NORM,)),
    "shape-text": (_set(NORM, "shape", "128"), None, (NORM, "shape")),
    "duplicate-key": (None, '{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                            '"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', ("twice",)),
}


@pytest.fixture(scope="module")
def bad_headers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-headers")
    out = {}
    for case, (edit, text, _) in HEADER_CASES.items():
        d = demo_copy(root, case)
        raw_file(d / "model.safetensors", STATE, edit, text)
        out[case] = d
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    Cache(tmp_path / "cache")
    (tmp_path / "work").mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "base_model": "", "layers": {"0": {"groups": [[e] for e in range(6)]}}}))
    return tmp_path / "work", plan, (tmp_path / "work", tmp_path / "cache")


def both_paths_refuse(capfd, folder: Path, work, says: tuple[str, ...]) -> None:
    """The streamed export (prune, no evaluation) and the in-memory load (eval) refuse ``folder``
    in one line naming it; nothing is written, the folder untouched."""
    out, plan, watch = work
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert_refused(capfd, "prune", str(folder), "--plan", str(plan), "-o", str(out / "o"), watch=(*watch, folder),
                   says=(str(folder), *says))
    assert_refused(capfd, "eval", str(folder), "--samples", "1", "--seq-len", "16", "--no-efficiency",
                   watch=(*watch, folder), says=(str(folder), *says))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_a_bad_header_is_refused_by_safetensors_and_by_both_paths(capfd, work, bad_headers, case):
    path = bad_headers[case] / "model.safetensors"
    with pytest.raises(Exception):  # noqa: B017 - the library's own verdict (SafetensorError and kin)
        with safe_open(str(path), "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k)
    both_paths_refuse(capfd, bad_headers[case], work, HEADER_CASES[case][2])


def test_a_healthy_handwritten_file_is_accepted_as_safetensors_accepts_it(tmp_path):
    path = raw_file(tmp_path / "m.safetensors", {"a": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0),
                                                 "b": torch.tensor([1, 2], dtype=torch.int8)})
    got = checkpoint.read_header(path)
    with safe_open(str(path), "pt") as fh:
        assert sorted(fh.keys()) == sorted(got)
        for k, t in got.items():
            assert torch.equal(checkpoint.read_tensor(t), fh.get_tensor(k))


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = raw_file(tmp_path / "m.safetensors", {"a": torch.ones(4)})
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(MoescopeError, match="belong to no tensor"):
        checkpoint.read_header(path)


# ---- the index and its shards -------------------------------------------------------------------
def sharded(root: Path, name: str, parts: int = 3) -> Path:
    d = demo_copy(root, name)
    names = sorted(STATE)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        raw_file(d / file, {k: STATE[k] for k in names[i::parts]})
        weight_map.update(dict.fromkeys(names[i::parts], file))
    (d / checkpoint.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_a_tensor_in_two_shards_is_refused(capfd, work, tmp_path):
    """lm_head where the index places it and a zeroed copy in another shard (the stream used to
    export the zeros)."""
    d = sharded(tmp_path, "two-places")
    index = json.loads((d / checkpoint.INDEX_FILE).read_text())["weight_map"]
    home = index["lm_head.weight"]
    other = next(f for f in sorted(set(index.values())) if f != home)
    names = [k for k, f in index.items() if f == other]
    raw_file(d / other, {**{k: STATE[k] for k in names}, "lm_head.weight": torch.zeros_like(STATE["lm_head.weight"])})
    both_paths_refuse(capfd, d, work, ("lm_head.weight", "one place"))


def test_a_folder_with_both_a_single_file_and_an_index_is_refused(capfd, work, tmp_path):
    d = sharded(tmp_path, "ambiguous")
    raw_file(d / "model.safetensors", {k: torch.zeros_like(t) for k, t in STATE.items()})
    both_paths_refuse(capfd, d, work, ("both", "model.safetensors.index.json"))


def test_an_index_naming_a_file_outside_its_folder_is_refused(capfd, work, tmp_path):
    d = sharded(tmp_path, "escape")
    data = json.loads((d / checkpoint.INDEX_FILE).read_text())
    data["weight_map"][NORM] = "../model.safetensors"
    (d / checkpoint.INDEX_FILE).write_text(json.dumps(data))
    both_paths_refuse(capfd, d, work, ("../model.safetensors",))


# ---- the tensor set against the config ----------------------------------------------------------
def _without(*names):
    return {k: t for k, t in STATE.items() if k not in names}


SET_CASES = {  # id: (tensors, words)
    "missing-k-proj": (lambda: _without("model.layers.1.self_attn.k_proj.weight"),
                       ("layers.1.self_attn.k_proj", "random")),
    "wrong-shaped-q-proj": (lambda: {**STATE, Q: STATE[Q][:64].contiguous()}, ("q_proj", "[64, 128] in the checkpoint")),
    "ten-experts-of-8": (lambda: {**STATE, **{f"model.layers.2.block_sparse_moe.experts.{e}.{w}.weight":
                                              STATE[f"model.layers.2.block_sparse_moe.experts.0.{w}.weight"]
                                              for e in (8, 9) for w in ("w1", "w2", "w3")}},
                         ("experts.8", "8 experts")),
    "missing-expert": (lambda: _without("model.layers.3.block_sparse_moe.experts.5.w2.weight"), ("experts.5.w2",)),
    "wrong-shaped-kept-expert": (lambda: {**STATE, "model.layers.0.block_sparse_moe.experts.1.w1.weight":
                                          STATE["model.layers.0.block_sparse_moe.experts.1.w1.weight"][:8].contiguous()},
                                 ("experts.1.w1", "[8, 128]", "[256, 128]")),
    "foreign-tensor": (lambda: {**STATE, "model.layers.0.mystery.weight": torch.ones(3)}, ("mystery",)),
}


@pytest.mark.parametrize("case", sorted(SET_CASES))
def test_the_tensor_set_is_what_the_config_implies_on_both_paths(capfd, work, tmp_path, case):
    d = demo_copy(tmp_path, case)
    raw_file(d / "model.safetensors", SET_CASES[case][0]())
    both_paths_refuse(capfd, d, work, SET_CASES[case][1])


def test_first_k_dense_replace_minus_one_is_refused(capfd, work, tmp_path):
    """DeepSeek-V3 with ``first_k_dense_replace: -1``: every layer would be MoE, so the checkpoint's
    dense layer 0 has no place and its experts none in the checkpoint; refused, never random."""
    from conftest import save_tiny

    d = Path(save_tiny("deepseek_v3", tmp_path / "ds"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": -1}))
    out, _, watch = work
    line = assert_refused(capfd, "eval", str(d), "--samples", "1", "--seq-len", "16", "--no-efficiency",
                          watch=(*watch, d))
    assert "first_k_dense_replace" in line or "layers.0.mlp" in line


# ---- NaN in a copied tensor -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [Q, "model.layers.0.block_sparse_moe.experts.2.w3.weight"], ids=["q_proj", "kept-expert"])
def test_nan_in_a_copied_tensor_is_refused_by_the_stream(capfd, work, tmp_path, name):
    d = demo_copy(tmp_path, "nan")
    bad = STATE[name].clone()
    bad[1, 2] = math.nan
    raw_file(d / "model.safetensors", {**STATE, name: bad})
    out, plan, watch = work
    assert_refused(capfd, "prune", str(d), "--plan", str(plan), "-o", str(out / "o"), "--dtype", "float32",
                   watch=(*watch, d), says=(name, "non-finite"))


def test_check_finite_reads_in_chunks(tmp_path, monkeypatch):
    """A NaN in the last chunk of a tensor larger than a chunk is found; a finite one passes."""
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 64)
    t = torch.ones(100)
    path = raw_file(tmp_path / "ok.safetensors", {"t": t})
    checkpoint.check_finite(checkpoint.read_header(path)["t"])
    t[-1] = math.inf
    path = raw_file(tmp_path / "bad.safetensors", {"t": t})
    with pytest.raises(MoescopeError, match="non-finite"):
        checkpoint.check_finite(checkpoint.read_header(path)["t"])


def test_tensors_transformers_ignores_on_load_are_accepted_and_left_out(capfd, work, tmp_path):
    """An old checkpoint's rotary table (``rotary_emb.inv_freq``, a buffer transformers ignores on
    load for every model) is not an extra weight: both paths accept the folder, the export leaves it
    out (as loading does)."""
    from test_faults_inputs import cli

    d = demo_copy(tmp_path, "inv-freq")
    raw_file(d / "model.safetensors", {**STATE, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)})
    out, plan, _ = work
    rc, _, err = cli(capfd, "prune", str(d), "--plan", str(plan), "-o", str(out / "o"))
    assert rc == 0, err
    with safe_open(str(out / "o" / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "inv_freq" in k]
    from moescope.analysis.model import load_moe

    load_moe(str(d), load_tokenizer=False)
