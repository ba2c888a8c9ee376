"""The content-addressed cache: keys, exact roundtrips, atomic writes, damage detection, locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import moescope.analysis.core.cache as cache_mod
import pandas as pd
import pytest
import torch
from moescope.analysis.core.cache import (
    Cache,
    CacheWarning,
    Result,
    cache_key,
    canonical_json,
    default_cache_root,
    format_entries,
    label_slug,
)
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import REPO_ROOT

PARTS = {
    "model": "f00dcafe" * 8,
    "data": "demo:all/64x256/seed0",
    "params": {"metric": "cka", "kernel": "linear", "layers": [0, 1, 3], "opts": {"augment": False, "sigma": 0.5}},
    "version": 1,
}
ALLOWED_SUFFIXES = {".safetensors", ".parquet", ".json"}


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "sim": torch.randn(8, 8, generator=g),
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "counts": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "base": base,
        "row_view": base[1],  # shares storage with "base"
        "transposed": base.T,  # non-contiguous view
    }


def sample_tables() -> dict[str, pd.DataFrame]:
    usage = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "expert": [0, 1, 0, 1],
            "freq": [0.25, 0.75, float("nan"), 1e-300],
            "name": ["a", "b", "c", "d"],
            "kept": [True, False, True, True],
        }
    )
    grid = pd.DataFrame([[1.5, 2.0], [3.0, 4.125]], columns=["e0", "e1"], index=pd.Index([0, 3], name="layer"))
    return {"usage": usage, "drop_grid": grid}


class Counter:
    """A compute callable that counts its calls."""

    def __init__(self, value: float = 1.0):
        self.calls = 0
        self.value = value

    def __call__(self) -> Result:
        self.calls += 1
        return Result(
            tensors={"x": torch.full((3, 2), self.value)},
            tables={"t": pd.DataFrame({"v": [self.value, 2 * self.value]})},
            meta={"model": PARTS["model"], "model_source": "demo", "note": "computed"},
        )


def visible_entries(root: Path) -> list[Path]:
    return [
        p for kind in root.iterdir() if kind.is_dir() and not kind.name.startswith(".")
        for p in kind.iterdir() if not p.name.startswith(".")
    ]


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


# ---- keys ------------------------------------------------------------------------------------
def test_same_parts_same_key_regardless_of_order():
    shuffled = {k: PARTS[k] for k in reversed(list(PARTS))}
    shuffled["params"] = dict(reversed(list(PARTS["params"].items())))
    assert cache_key("similarity", PARTS) == cache_key("similarity", shuffled)
    key = cache_key("similarity", PARTS)
    assert len(key) == 64 and int(key, 16) >= 0
    # tuples are lists in the canonical form
    as_tuple = {**PARTS, "params": {**PARTS["params"], "layers": (0, 1, 3)}}
    assert cache_key("similarity", as_tuple) == key


def _changed(path: tuple, value) -> dict:
    parts = json.loads(json.dumps(PARTS))
    node = parts
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return parts


@pytest.mark.parametrize(
    "path, value",
    [
        (("model",), "f00dcafe" * 7 + "f00dcafd"),
        (("data",), "demo:all/64x256/seed1"),
        (("version",), 2),
        (("version",), 1.0),  # int 1 and float 1.0 are different parameters
        (("version",), True),
        (("params", "metric"), "cosine"),
        (("params", "layers"), [0, 1, 2]),
        (("params", "layers"), [0, 3, 1]),
        (("params", "opts", "augment"), True),
        (("params", "opts", "sigma"), 0.5000000000000001),
        (("params", "opts", "extra"), None),
    ],
)
def test_any_change_of_any_part_changes_the_key(path, value):
    assert cache_key("similarity", _changed(path, value)) != cache_key("similarity", PARTS)


def test_kind_is_part_of_the_key():
    assert cache_key("similarity", PARTS) != cache_key("criteria", PARTS)


def test_canonical_json_is_compact_sorted_and_uses_repr_for_floats():
    assert canonical_json({"b": 0.1, "a": (1, 2.5e-10)}) == '{"a":[1,2.5e-10],"b":0.1}'


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"params": {"s": {1, 2}}}, "parts['params']['s']"),
        ({"path": Path("/x")}, "parts['path']"),
        ({"params": {0: "layer"}}, "parts['params']"),
        ({"t": torch.zeros(2)}, "parts['t']"),
        ({"l": [1, object()]}, "parts['l'][1]"),
    ],
)
def test_non_json_parts_are_refused_with_a_clear_type_error(bad, where):
    with pytest.raises(TypeError) as info:
        cache_key("similarity", bad)
    assert where in str(info.value)


def test_invalid_kind_is_refused():
    for kind in ("", "../x", ".tmp", "a/b", "x" * 65):
        with pytest.raises(MoescopeError, match="invalid cache kind"):
            cache_key(kind, PARTS)


# ---- roots and names -------------------------------------------------------------------------
def test_root_from_env_or_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("MOESCOPE_CACHE", raising=False)
    assert default_cache_root() == REPO_ROOT / "cache"
    monkeypatch.setenv("MOESCOPE_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_root() == tmp_path / "elsewhere"
    assert Cache().root == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / ".tmp").is_dir()


def test_folder_name_has_readable_prefix_and_hash(cache):
    entry = cache.put("similarity", PARTS, meta={"x": 1}, label="demo-demo_all-64x256")
    key = cache_key("similarity", PARTS)
    assert entry.path.parent == cache.root / "similarity"
    assert entry.path.name == f"demo-demo_all-64x256-{key[:20]}"
    assert entry.key == key and entry.label == "demo-demo_all-64x256"


def test_label_slug_is_sanitised_and_short(cache):
    assert label_slug("Qwen/Qwen3 30B: all layers") == "Qwen-Qwen3-30B-all-layers"
    assert label_slug("../..") == ""
    assert label_slug(None) == ""
    long = label_slug("x" * 200)
    assert len(long) <= 60
    entry = cache.put("similarity", PARTS, label="../../etc/passwd")
    assert entry.path.parent == cache.root / "similarity"
    assert entry.path.name == f"etc-passwd-{entry.key[:20]}"
    unlabeled = cache.put("similarity", {**PARTS, "version": 9})
    assert unlabeled.path.name == unlabeled.key[:20]
    assert cache.get("similarity", {**PARTS, "version": 9}).path == unlabeled.path


# ---- roundtrip -------------------------------------------------------------------------------
def test_roundtrip_is_exact(cache):
    tensors, tables = sample_tensors(), sample_tables()
    meta = {"model": PARTS["model"], "model_source": "demo", "stats": {"ppl": 12.5, "layers": (0, 1)}, "nan": None}
    cache.put("similarity", PARTS, tensors=tensors, tables=tables, meta=meta, label="rt", elapsed=1.5)

    entry = Cache(cache.root).get("similarity", PARTS)  # a fresh handle: nothing kept in memory
    assert entry is not None
    loaded = entry.tensors()
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert entry.tables() == ["drop_grid", "usage"]
    for name, df in tables.items():
        pd.testing.assert_frame_equal(entry.table(name), df, check_exact=True)
    for k, v in meta.items():
        assert entry.meta[k] == (list(v) if isinstance(v, tuple) else v) or k == "stats"
    assert entry.meta["stats"] == {"ppl": 12.5, "layers": [0, 1]}
    assert entry.meta["kind"] == "similarity"
    assert entry.meta["parts"] == json.loads(canonical_json(PARTS))
    assert entry.meta["label"] == "rt"
    assert entry.meta["elapsed_s"] == 1.5
    assert entry.meta["moescope_version"]
    assert entry.meta["created"].endswith("+00:00")
    with pytest.raises(MoescopeError, match="Did you mean 'usage'"):
        entry.table("usag")


def test_entry_without_tensors_or_tables(cache):
    entry = cache.put("plan", PARTS, meta={"plan": {"version": 1, "layers": {}}})
    again = cache.get("plan", PARTS)
    assert again.tensors() == {} and again.tables() == []
    assert again.meta["plan"] == {"version": 1, "layers": {}}
    assert sorted(p.name for p in entry.path.iterdir()) == ["manifest.json", "meta.json"]


def test_only_safetensors_parquet_json_and_no_pickle(cache, monkeypatch):
    import pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dump", no_pickle)
    monkeypatch.setattr(pickle, "dumps", no_pickle)
    entry = cache.put("similarity", PARTS, tensors=sample_tensors(), tables=sample_tables(), meta={"a": 1})
    names = {p.name for p in entry.path.iterdir()}
    assert names == {"tensors.safetensors", "usage.parquet", "drop_grid.parquet", "meta.json", "manifest.json"}
    everything = [p for p in cache.root.rglob("*") if p.is_file()]
    assert not [p for p in everything if p.suffix in {".pkl", ".pickle", ".pt", ".bin"}]
    assert {p.suffix for p in entry.path.iterdir()} <= ALLOWED_SUFFIXES
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, info in manifest["files"].items():
        assert info["bytes"] == (entry.path / name).stat().st_size
    assert cache.get("similarity", PARTS).tensors().keys() == sample_tensors().keys()


def test_bad_inputs_are_refused_before_writing(cache):
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        cache.put("k", PARTS, tensors={"a": [1, 2]})
    with pytest.raises(TypeError, match="not a pandas DataFrame"):
        cache.put("k", PARTS, tables={"a": {"x": [1]}})
    with pytest.raises(ValueError, match="invalid table name"):
        cache.put("k", PARTS, tables={"../a": pd.DataFrame({"x": [1]})})
    with pytest.raises(ValueError, match="reserved"):
        cache.put("k", PARTS, meta={"key": "mine"})
    with pytest.raises(TypeError, match=r"meta\['p'\]"):
        cache.put("k", PARTS, meta={"p": Path("/x")})
    assert cache.get("k", PARTS) is None
    assert not list((cache.root / ".tmp").iterdir())


def test_second_put_of_same_key_does_not_duplicate(cache):
    first = cache.put("similarity", PARTS, tensors={"x": torch.ones(2)}, meta={"n": 1}, label="one")
    second = cache.put("similarity", PARTS, tensors={"x": torch.zeros(2)}, meta={"n": 2}, label="two")
    assert second.path == first.path
    assert second.meta["n"] == 1
    assert torch.equal(cache.get("similarity", PARTS).tensors()["x"], torch.ones(2))
    assert len(visible_entries(cache.root)) == 1
    assert not list((cache.root / ".tmp").iterdir())


# ---- get_or_compute --------------------------------------------------------------------------
def test_get_or_compute_computes_once(cache):
    compute = Counter(3.0)
    a = cache.get_or_compute("similarity", PARTS, compute, label="demo")
    assert cache.stats.by_kind() == {"similarity": {"hits": 0, "misses": 1, "computed": 1, "stored": 1}}
    b = cache.get_or_compute("similarity", PARTS, compute, label="demo")
    assert compute.calls == 1
    assert cache.stats.by_kind() == {"similarity": {"hits": 1, "misses": 1, "computed": 1, "stored": 1}}
    assert a.path == b.path
    assert torch.equal(b.tensors()["x"], torch.full((3, 2), 3.0))
    assert b.meta["note"] == "computed" and b.meta["elapsed_s"] >= 0
    cache.get_or_compute("similarity", {**PARTS, "version": 2}, compute)
    assert compute.calls == 2 == cache.stats.computed("similarity") == cache.stats.computed()


def test_stats_count_hits_misses_computations_and_writes_per_kind(cache):
    stats = cache.stats
    assert cache.get("similarity", PARTS) is None
    cache.put("similarity", PARTS, tensors={"x": torch.ones(2)})
    cache.put("similarity", PARTS, tensors={"x": torch.ones(2)})  # already stored: nothing written
    assert cache.get("similarity", PARTS) is not None
    assert cache.get_by_key("similarity", cache_key("similarity", PARTS)) is not None
    cache.get_or_compute("criteria", PARTS, Counter())
    cache.get_or_compute("criteria", PARTS, Counter())
    assert stats.by_kind() == {
        "criteria": {"hits": 1, "misses": 1, "computed": 1, "stored": 1},
        "similarity": {"hits": 2, "misses": 1, "computed": 0, "stored": 1},
    }
    assert (stats.hits(), stats.misses(), stats.computed(), stats.stored()) == (3, 2, 1, 2)
    assert stats.count("hits", "nothing") == 0
    with pytest.raises(MoescopeError, match="Did you mean 'hits'"):
        stats.count("hit")
    # a fresh object over the same folder starts at zero and only sees its own hits
    other = Cache(cache.root)
    other.get_or_compute("criteria", PARTS, Counter())
    assert other.stats.by_kind() == {"criteria": {"hits": 1, "misses": 0, "computed": 0, "stored": 0}}
    stats.reset()
    assert stats.by_kind() == {} and stats.computed() == 0


def test_a_failed_compute_is_counted_but_stores_nothing(cache):
    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("similarity", PARTS, boom)
    assert cache.stats.by_kind() == {"similarity": {"hits": 0, "misses": 1, "computed": 1, "stored": 0}}


def test_compute_may_return_dict_namedtuple_or_dataclass(cache):
    class Out(NamedTuple):
        tensors: dict
        tables: dict
        meta: dict

    e1 = cache.get_or_compute("a", PARTS, lambda: {"meta": {"n": 1}, "tensors": {"x": torch.ones(1)}})
    e2 = cache.get_or_compute("b", PARTS, lambda: Out({}, {"t": pd.DataFrame({"v": [1]})}, {"n": 2}))
    e3 = cache.get_or_compute("c", PARTS, lambda: Result(meta={"n": 3}))
    assert [e.meta["n"] for e in (e1, e2, e3)] == [1, 2, 3]
    with pytest.raises(TypeError, match="unknown keys"):
        cache.get_or_compute("d", PARTS, lambda: {"tensor": {}})
    with pytest.raises(TypeError, match="must return"):
        cache.get_or_compute("d", PARTS, lambda: None)
    assert cache.get("d", PARTS) is None


# ---- damaged entries -------------------------------------------------------------------------
def _truncate_safetensors(path: Path) -> None:
    f = path / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_parquet_byte(path: Path) -> None:
    f = path / "t.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete_manifest(path: Path) -> None:
    (path / "manifest.json").unlink()


def _garble_meta(path: Path) -> None:
    (path / "meta.json").write_text("{not json")


def _garble_meta_and_fix_manifest(path: Path) -> None:
    """Invalid meta.json whose checksum the manifest agrees with: the JSON parse must catch it."""
    import hashlib

    (path / "meta.json").write_text("{not json")
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "meta.json").read_bytes()
    manifest["files"]["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _delete_table(path: Path) -> None:
    (path / "t.parquet").unlink()


CORRUPTIONS = {
    "truncated-safetensors": (_truncate_safetensors, "tensors.safetensors"),
    "flipped-parquet-byte": (_flip_parquet_byte, "t.parquet does not match its sha256"),
    "missing-manifest": (_delete_manifest, "manifest.json is missing"),
    "invalid-meta": (_garble_meta, "meta.json"),
    "invalid-meta-matching-manifest": (_garble_meta_and_fix_manifest, "meta.json is unreadable"),
    "missing-table": (_delete_table, "t.parquet is missing"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_damaged_entry_is_detected_warned_and_recomputed(cache, name):
    damage, reason = CORRUPTIONS[name]
    compute = Counter(2.0)
    entry = cache.get_or_compute("similarity", PARTS, compute, label="dmg")
    damage(entry.path)

    with pytest.warns(CacheWarning, match=f"similarity/{entry.path.name}") as record:
        again = cache.get_or_compute("similarity", PARTS, compute, label="dmg")
    assert reason in str(record[0].message)
    assert len(str(record[0].message).splitlines()) == 1
    assert compute.calls == 2 == cache.stats.computed("similarity")
    assert torch.equal(again.tensors()["x"], torch.full((3, 2), 2.0))
    pd.testing.assert_frame_equal(again.table("t"), pd.DataFrame({"v": [2.0, 4.0]}))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_or_compute("similarity", PARTS, compute).path == again.path
    assert compute.calls == 2
    assert len(visible_entries(cache.root)) == 1


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_damaged_entry_is_a_miss_for_get_and_is_removed(cache, name):
    damage, _ = CORRUPTIONS[name]
    entry = cache.get_or_compute("similarity", PARTS, Counter(), label="dmg")
    damage(entry.path)
    with pytest.warns(CacheWarning, match="removed damaged entry"):
        assert cache.get("similarity", PARTS) is None
    assert not entry.path.exists()
    assert cache.entries() == []


def test_large_files_are_checksummed_on_first_read(cache, monkeypatch):
    monkeypatch.setattr(cache_mod, "EAGER_HASH_LIMIT", 16)
    entry = cache.put("similarity", PARTS, tensors={"x": torch.arange(100.0)}, tables={"t": pd.DataFrame({"v": [1]})})
    f = entry.path / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different payload
    f.write_bytes(bytes(data))

    lazy = cache.get("similarity", PARTS)  # sizes match: returned, checksum deferred
    assert lazy is not None
    pd.testing.assert_frame_equal(lazy.table("t"), pd.DataFrame({"v": [1]}))
    with pytest.warns(CacheWarning, match="tensors.safetensors does not match its sha256"):
        with pytest.raises(MoescopeError, match="damaged.*run the command again"):
            lazy.tensors()
    assert not entry.path.exists()
    assert cache.get("similarity", PARTS) is None


# ---- interrupted writes ----------------------------------------------------------------------
def test_interrupted_compute_leaves_nothing(cache):
    def interrupted():
        time.sleep(0.01)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("similarity", PARTS, interrupted)
    assert visible_entries(cache.root) == []
    assert not list((cache.root / ".tmp").iterdir())
    compute = Counter()
    entry = cache.get_or_compute("similarity", PARTS, compute)  # the lock was released
    assert compute.calls == 1 and entry.tensors()["x"].shape == (3, 2)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_put_interrupted_at_rename_leaves_no_visible_entry(cache, monkeypatch, exc):
    real_rename = os.rename

    def broken_rename(src, dst):
        raise exc("interrupted")

    monkeypatch.setattr(os, "rename", broken_rename)
    # an OSError while storing is a user's problem (full disk, read-only cache): one line naming the cache
    with pytest.raises(MoescopeError if exc is OSError else exc, match="cache" if exc is OSError else None):
        cache.put("similarity", PARTS, tensors=sample_tensors(), tables=sample_tables(), label="x")
    assert visible_entries(cache.root) == []
    assert not list((cache.root / ".tmp").iterdir())
    assert cache.get("similarity", PARTS) is None

    monkeypatch.setattr(os, "rename", real_rename)
    compute = Counter()
    entry = cache.get_or_compute("similarity", PARTS, compute, label="x")
    assert compute.calls == 1 and entry.path.is_dir()


def test_put_interrupted_while_writing_files_leaves_nothing(cache, monkeypatch):
    calls = []
    real_fsync = cache_mod._fsync_file

    def interrupt_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(path)

    monkeypatch.setattr(cache_mod, "_fsync_file", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        cache.put("similarity", PARTS, tensors=sample_tensors(), tables=sample_tables())
    assert visible_entries(cache.root) == []
    assert not list((cache.root / ".tmp").iterdir())


def test_stale_temp_folders_are_swept_on_open(tmp_path):
    root = tmp_path / "cache"
    Cache(root)
    old, fresh = root / ".tmp" / "crashed-old", root / ".tmp" / "in-progress"
    for d in (old, fresh):
        d.mkdir()
        (d / "tensors.safetensors").write_bytes(b"partial")
    long_write = root / ".tmp" / "long-write"
    long_write.mkdir()
    (long_write / "tensors.safetensors").write_bytes(b"still growing")
    two_hours_ago = time.time() - 7200
    for path in (old / "tensors.safetensors", old, long_write):
        os.utime(path, (two_hours_ago, two_hours_ago))
    Cache(root)
    assert not old.exists()
    assert fresh.exists() and long_write.exists()


# ---- locking ---------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from moescope.analysis.core.cache import Cache

    root, counter, started = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    parts = json.loads(sys.argv[4])

    def compute():
        started.touch()
        time.sleep(1.0)
        with open(counter, "a") as f:
            f.write("computed\\n")
        return {"meta": {"value": 42}}

    entry = Cache(root).get_or_compute("slow", parts, compute, label="race")
    print(json.dumps({"path": str(entry.path), "key": entry.key, "value": entry.meta["value"]}))
    """
)


def test_two_processes_compute_once(tmp_path):
    root, counter, started = tmp_path / "cache", tmp_path / "counter.txt", tmp_path / "started"
    args = [sys.executable, "-c", WORKER, str(root), str(counter), str(started), json.dumps(PARTS)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not started.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert started.exists(), first.communicate()[1]
    # the first is computing now: the second misses, waits on the lock, then reads the first's entry
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    outs = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert counter.read_text().splitlines() == ["computed"]
    assert outs[0] == outs[1]
    assert outs[0]["value"] == 42 and outs[0]["key"] == cache_key("slow", PARTS)
    assert len(visible_entries(root)) == 1


def test_two_threads_compute_once(cache):
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.3)
        return {"tensors": {"x": torch.ones(2)}}

    results = [None, None]
    caches = [Cache(cache.root), Cache(cache.root)]

    def run(i):
        results[i] = caches[i].get_or_compute("slow", PARTS, compute)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1
    assert results[0].path == results[1].path
    # one computed and stored it; the other waited on the lock and was served the entry
    assert sorted((c.stats.computed("slow"), c.stats.hits("slow")) for c in caches) == [(0, 1), (1, 0)]


# ---- index -----------------------------------------------------------------------------------
def _populate(cache: Cache) -> dict[str, str]:
    fp_a, fp_b = "aaaa1111" + "0" * 56, "bbbb2222" + "0" * 56
    for i, (kind, fp, src) in enumerate(
        [
            ("similarity", fp_a, "demo"),
            ("criteria", fp_a, "demo"),
            ("similarity", fp_b, "Qwen/Qwen3-30B-A3B"),
            ("drop_grid", fp_b, "Qwen/Qwen3-30B-A3B"),
        ]
    ):
        cache.put(
            kind,
            {**PARTS, "model": fp, "i": i},
            tables={"t": pd.DataFrame({"v": [i]})},
            meta={"model": fp, "model_source": src, "data": f"demo:all/{i}"},
            label=f"{src}-{kind}",
        )
        time.sleep(0.002)  # distinct created timestamps
    return {"a": fp_a, "b": fp_b}


def test_entries_are_indexed_and_filtered(cache):
    fps = _populate(cache)
    everything = cache.entries()
    assert [e.kind for e in everything] == ["similarity", "criteria", "similarity", "drop_grid"]
    assert [e.created for e in everything] == sorted(e.created for e in everything)
    first = everything[0]
    assert first.model == fps["a"] and first.model_source == "demo" and first.data == "demo:all/0"
    assert first.label == "demo-similarity" and first.size == sum(p.stat().st_size for p in first.path.iterdir())
    assert first.key == cache_key("similarity", {**PARTS, "model": fps["a"], "i": 0})
    assert cache.get_by_key("similarity", first.key).path == first.path

    assert [e.kind for e in cache.entries(kind="similarity")] == ["similarity", "similarity"]
    assert {e.kind for e in cache.entries(model="demo")} == {"similarity", "criteria"}
    assert {e.kind for e in cache.entries(model="bbbb22")} == {"similarity", "drop_grid"}
    assert [e.model_source for e in cache.entries(kind="similarity", model="Qwen/Qwen3-30B-A3B")] == [
        "Qwen/Qwen3-30B-A3B"
    ]
    assert cache.entries(model="cccc") == []
    assert cache.entries(kind="nothing-here") == []
    with pytest.raises(MoescopeError, match="empty model filter"):
        cache.entries(model="")

    table = format_entries(everything)
    assert "KIND" in table and "demo-similarity" in table and "4 entries" in table
    assert "Qwen/Qwen3-30B-A3B" in table and first.key[:12] in table
    assert "empty" in format_entries([])


def test_clear_by_model_and_kind(cache):
    fps = _populate(cache)
    before = cache.size()
    assert before > 0
    assert cache.clear(model="demo") == 2
    assert {e.model for e in cache.entries()} == {fps["b"]}
    assert cache.size() < before
    assert cache.clear(kind="drop_grid") == 1
    assert [e.kind for e in cache.entries()] == ["similarity"]
    assert cache.clear(model="zzzz") == 0
    assert cache.clear(model=fps["b"][:6]) == 1
    assert cache.entries() == [] and visible_entries(cache.root) == []
    assert cache.get("similarity", {**PARTS, "model": fps["a"], "i": 0}) is None


def test_clear_all_removes_broken_folders_too(cache):
    _populate(cache)
    broken = cache.root / "similarity" / "half-written-0123456789abcdef0123"
    broken.mkdir()
    (broken / "meta.json").write_text("{")
    assert len(cache.entries()) == 4  # the broken folder is not listed
    assert cache.clear() == 5
    assert visible_entries(cache.root) == []
