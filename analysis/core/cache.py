"""Content-addressed result store: the CLI writes it, the dashboard reads it.

An entry is addressed by ``key = sha256(canonical JSON of {"kind": kind, "parts": parts})``
where ``parts`` holds everything the result depends on (model fingerprint, data fingerprint,
parameters, the metric's ``version``), so a changed model, data set or parameter can never
show a stale result. It lives in ``<root>/<kind>/<label-slug>-<key[:20]>/`` and holds only

* ``tensors.safetensors`` — name → tensor (when the result has tensors),
* ``<table>.parquet``     — one pandas DataFrame per table,
* ``meta.json``           — the caller's metadata plus kind, key, parts, label, created, version,
* ``manifest.json``       — sha256 and byte size of every other file, written last.

Never pickle. An entry is built in ``<root>/.tmp/`` (same filesystem), fsynced and moved into
place with one ``os.rename``, so an interrupted run never leaves a half entry where readers look.
Readers verify the manifest (presence and sizes always; sha256 eagerly for files up to
:data:`EAGER_HASH_LIMIT` bytes, on first read for larger ones); a damaged entry is removed with a
:class:`CacheWarning` and treated as a miss. :meth:`Cache.get_or_compute` holds an ``fcntl.flock``
per key, so two processes (or threads) never compute the same entry twice.

Each :class:`Cache` object counts what it did (:class:`CacheStats`, ``cache.stats``): per kind, the
lookups served by a stored entry (``hits``), the lookups that found none (``misses``), the
``compute()`` calls :meth:`Cache.get_or_compute` ran (``computed``) and the entries it wrote
(``stored``), so a caller (or a test) can see that a cached call computed nothing.

``torch``, ``safetensors`` and ``pandas`` are imported only when tensors or tables are touched:
listing the cache stays cheap. The store, its entries and their listing are one job, kept in one
file past ~450 lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.core.units import format_bytes

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

ENV_VAR = "MOESCOPE_CACHE"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
EAGER_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed when the entry is opened
STALE_TMP_SECONDS = 3600.0
LABEL_MAX = 60
HASH_CHARS = 20  # key characters in a folder name (80 bits)
RESERVED_META = ("kind", "key", "parts", "label", "created", "moescope_version", "elapsed_s")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")  # kinds and table names
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


MIN_FREE_BYTES = 1 << 20  # below this, a computation is refused before it starts


class CacheWarning(UserWarning):
    """A cache entry was damaged (and removed), or could not be read."""


class _Corrupt(Exception):
    """Internal: an entry failed verification; the message is the reason."""


# ---- keys ------------------------------------------------------------------------------------
def _plain(obj: Any, where: str) -> Any:
    """``obj`` as plain JSON data (tuples → lists, numpy scalars → Python), or a TypeError naming
    the offending place."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} has the key {k!r} of type {type(k).__name__}; cache keys and metadata need "
                    f"str dict keys (use {str(k)!r})"
                )
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return _plain(obj.item(), where)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__} ({obj!r:.80}), which is not "
        "JSON data; pass str, int, float, bool, None, lists/tuples or dicts with str keys "
        "(e.g. str(path), a fingerprint string, or tensor.tolist())"
    )


def canonical_json(obj: Any, where: str = "value") -> str:
    """Canonical JSON text: sorted keys, no whitespace, floats by ``repr``, tuples as lists."""
    return json.dumps(_plain(obj, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=True)


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _NAME_RE.match(kind):
        raise MoescopeError(
            f"invalid cache kind {kind!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not starting with '.' or '-'), e.g. 'similarity'"
        )
    return kind


def cache_key(kind: str, parts: dict) -> str:
    """sha256 hex of ``canonical_json({"kind": kind, "parts": parts})``.

    ``parts`` should hold the model fingerprint, the data fingerprint, the parameters and the
    metric ``version``; any change in any of them (nested values included) gives another key.
    Values must be JSON data; anything else is a TypeError naming where it sits.
    """
    _check_kind(kind)
    if not isinstance(parts, Mapping):
        raise TypeError(f"parts must be a dict, got {type(parts).__name__}")
    text = canonical_json({"kind": kind, "parts": _plain(parts, "parts")})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def label_slug(label: str | None) -> str:
    """A short, filesystem-safe form of ``label`` (``[A-Za-z0-9._-]``, at most 60 characters)."""
    if not label:
        return ""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(label))[:LABEL_MAX]
    return slug.strip("-._")


def _folder_name(key: str, label: str | None) -> str:
    slug = label_slug(label)
    return f"{slug}-{key[:HASH_CHARS]}" if slug else key[:HASH_CHARS]


def default_cache_root() -> Path:
    """``$MOESCOPE_CACHE`` if set, else ``cache/`` in the repository."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    from moescope.analysis.core.paths import REPO_ROOT

    return REPO_ROOT / "cache"


# ---- files -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on folders
        _fsync_file(path)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n",
                    encoding="utf-8")


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is copied
    (safetensors refuses shared storage)."""
    import torch

    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def _check_tables(tables: Mapping[str, pd.DataFrame]) -> None:
    import pandas as pd

    for name, df in tables.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"invalid table name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
                "(not starting with '.' or '-')"
            )
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"tables[{name!r}] is a {type(df).__name__}, not a pandas DataFrame")


# ---- entries ---------------------------------------------------------------------------------
class Entry:
    """One verified cache entry (read-only).

    ``meta`` is the parsed ``meta.json``; :meth:`tensors` and :meth:`table` read their files on
    each call (a file above :data:`EAGER_HASH_LIMIT` is checksummed on its first read).
    """

    def __init__(self, cache: Cache, path: Path, meta: dict, files: dict[str, dict], unverified: set[str]):
        self._cache = cache
        self.path = path
        self.meta = meta
        self._files = files
        self._unverified = set(unverified)

    def __repr__(self) -> str:
        return f"Entry({self.kind}/{self.path.name})"

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def label(self) -> str | None:
        return self.meta.get("label")

    @property
    def parts(self) -> dict:
        return self.meta["parts"]

    @property
    def size(self) -> int:
        """Bytes on disk of the entry's files."""
        return sum(int(f["bytes"]) for f in self._files.values()) + self._manifest_bytes()

    def _manifest_bytes(self) -> int:
        try:
            return (self.path / MANIFEST_FILE).stat().st_size
        except OSError:
            return 0

    def tables(self) -> list[str]:
        """Names of the entry's tables."""
        return sorted(n.removesuffix(".parquet") for n in self._files if n.endswith(".parquet"))

    def tensors(self, device: str = "cpu") -> dict[str, Tensor]:
        """The stored tensors (``{}`` when the entry has none), loaded with safetensors."""
        if TENSORS_FILE not in self._files:
            return {}
        from safetensors.torch import load_file

        path = self._checked(TENSORS_FILE)
        return self._read(lambda: load_file(path, device=device))

    def table(self, name: str) -> pd.DataFrame:
        """The stored table ``name`` as a DataFrame."""
        if name not in self.tables():
            raise unknown_name(f"table in cache entry {self.kind}/{self.path.name}", name, self.tables())
        import pandas as pd

        file = f"{name}.parquet"
        path = self._checked(file)
        return self._read(lambda: pd.read_parquet(path, engine="pyarrow"))

    def _read(self, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except FileNotFoundError:
            raise self._gone() from None

    def _gone(self) -> MoescopeError:
        return MoescopeError(
            f"cache entry {self.kind}/{self.path.name} was removed while in use (cache clear?); "
            "run the command again to recompute it"
        )

    def _checked(self, file: str) -> Path:
        """The file's path, after its deferred sha256 check (removes the entry on a mismatch)."""
        path = self.path / file
        if file in self._unverified:
            try:
                ok = _sha256(path) == self._files[file]["sha256"]
            except FileNotFoundError:
                raise self._gone() from None
            if not ok:
                reason = f"{file} does not match its sha256"
                self._cache._discard(self.path, reason)
                raise MoescopeError(
                    f"cache entry {self.kind}/{self.path.name} is damaged ({reason}) and was removed; "
                    "run the command again to recompute it"
                )
            self._unverified.discard(file)
        return path


@dataclass(frozen=True)
class EntryInfo:
    """One line of the cache index (from ``meta.json`` alone; no checksums)."""

    kind: str
    label: str | None
    key: str
    path: Path
    created: str  # ISO 8601, UTC
    size: int  # bytes
    model: str | None = None  # model fingerprint
    model_source: str | None = None  # 'demo', a folder, a hub id
    data: str | None = None  # calibration data description / fingerprint
    elapsed_s: float | None = None
    problem: str | None = None  # why the entry is damaged (set by Cache.inspect); None: it checked out

    @property
    def status(self) -> str:
        return "damaged" if self.problem else "ok"

    def matches_model(self, model: str) -> bool:
        """``model`` is this entry's model source or a prefix of its model fingerprint."""
        return model == self.model_source or bool(self.model and self.model.startswith(model))


@dataclass
class Result:
    """What a ``compute`` callable hands to :meth:`Cache.get_or_compute` (a dict with these keys,
    or any object with these attributes, works as well)."""

    tensors: dict[str, Any] | None = None
    tables: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None


def _unpack_result(result: Any) -> tuple[dict | None, dict | None, dict | None]:
    names = ("tensors", "tables", "meta")
    if isinstance(result, Mapping):
        extra = sorted(set(result) - set(names))
        if extra:
            raise TypeError(f"compute() returned a dict with unknown keys {extra}; allowed: {list(names)}")
        return tuple(result.get(n) for n in names)  # type: ignore[return-value]
    if result is not None and any(hasattr(result, n) for n in names):
        return tuple(getattr(result, n, None) for n in names)  # type: ignore[return-value]
    raise TypeError(
        f"compute() must return a dict or an object (e.g. analysis.cache.Result) with tensors / tables / "
        f"meta, got {type(result).__name__}"
    )


class StoredResult:
    """Base of read views over one entry whose ``meta["layers"]`` is keyed by layer index
    (:class:`analysis.analyze.AnalysisResult`, :class:`analysis.explore.RoutingTrace`)."""

    def __init__(self, entry: Entry):
        self.entry = entry
        self.meta = entry.meta
        self._t = entry.tensors()

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.meta["layers"])


class CacheStats:
    """What one :class:`Cache` object did since it was opened (or :meth:`reset`), per kind, in this
    process: ``hits`` (a lookup — :meth:`Cache.get`, :meth:`Cache.get_by_key` or
    :meth:`Cache.get_or_compute` — answered by a stored entry, also one another process had just
    written), ``misses`` (a lookup that found none), ``computed`` (``compute()`` calls run by
    :meth:`Cache.get_or_compute`) and ``stored`` (entries this object wrote).

    ``stats.computed()`` counts every kind, ``stats.computed("analysis")`` one kind.
    """

    EVENTS = ("hits", "misses", "computed", "stored")

    def __init__(self):
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _add(self, event: str, kind: str) -> None:
        with self._lock:
            self._counts[(event, kind)] += 1

    def count(self, event: str, kind: str | None = None) -> int:
        """How many ``event`` (one of :attr:`EVENTS`) happened, for ``kind`` or for every kind."""
        if event not in self.EVENTS:
            raise unknown_name("cache event", event, self.EVENTS)
        with self._lock:
            return sum(n for (e, k), n in self._counts.items() if e == event and (kind is None or k == kind))

    def hits(self, kind: str | None = None) -> int:
        return self.count("hits", kind)

    def misses(self, kind: str | None = None) -> int:
        return self.count("misses", kind)

    def computed(self, kind: str | None = None) -> int:
        return self.count("computed", kind)

    def stored(self, kind: str | None = None) -> int:
        return self.count("stored", kind)

    def by_kind(self) -> dict[str, dict[str, int]]:
        """``{kind: {"hits": n, "misses": n, "computed": n, "stored": n}}`` for every kind seen."""
        with self._lock:
            kinds = sorted({k for _e, k in self._counts})
            return {k: {e: self._counts[(e, k)] for e in self.EVENTS} for k in kinds}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        return f"CacheStats({self.by_kind()})"


def lookup(kind: str, parts: dict, wrap: Callable[[Entry], Any], cache: Cache | None = None):
    """``wrap(entry)`` of the stored result of ``kind`` with ``parts``, or None when it has not been
    computed (never computes, so a dashboard can ask on every page view)."""
    entry = (cache or Cache()).get(kind, parts)
    return wrap(entry) if entry is not None else None


# ---- the store -------------------------------------------------------------------------------
class Cache:
    """The on-disk store under ``root`` (default :func:`default_cache_root`).

    Opening it creates the folder and sweeps temporary folders older than an hour that crashed
    writers left in ``<root>/.tmp/``. ``stats`` counts this object's hits, misses, computations and
    writes (:class:`CacheStats`).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.stats = CacheStats()
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MoescopeError(
                f"cannot create the cache folder '{self.root}' ({err.strerror}); set {ENV_VAR} to a "
                "writable folder"
            ) from None
        self._sweep_tmp()

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def _check_room(self, least: int = MIN_FREE_BYTES) -> None:
        """Refuse to start a computation whose entry could not be stored: the cache's file system has
        less than ``least`` bytes free."""
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.root).free
            if free < least:
                raise self._write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _write_error(self, err: Exception) -> MoescopeError:
        code = getattr(err, "errno", None)
        if code is None and "os error 28" in str(err) or "No space left" in str(err):
            code = errno.ENOSPC
        why = ("no space left on the device" if code == errno.ENOSPC else
               f"{err.strerror} (read-only or not yours)" if code in (errno.EACCES, errno.EPERM, errno.EROFS)
               else getattr(err, "strerror", None) or " ".join(str(err).split())[:200])
        return MoescopeError(f"cannot write to the cache at '{self.root}': {why}; nothing was stored. Free space, "
                             f"or set {ENV_VAR} to a writable folder")

    @property
    def _tmp(self) -> Path:
        return self.root / ".tmp"

    def _sweep_tmp(self, max_age: float = STALE_TMP_SECONDS) -> None:
        """Remove what writers left in ``.tmp`` untouched for ``max_age`` seconds (a folder counts as
        touched when it or a file directly in it changed, so a long write in progress stays)."""
        now = time.time()
        for child in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                touched = child.lstat().st_mtime
                if child.is_dir() and not child.is_symlink():
                    touched = max([touched, *(f.lstat().st_mtime for f in child.iterdir())])
                if now - touched > max_age:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()

    # ---- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the inter-process lock of one key (``<root>/<kind>/.locks/<key>.lock``); ``on_wait``
        is called once if another process holds it, before waiting.

        Not re-entrant: a second ``lock`` of the same key in the same thread waits forever.
        """
        import fcntl

        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise MoescopeError(f"invalid cache key {key!r}: expected 64 lowercase hex characters")
        locks = self.root / _check_kind(kind) / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise self._write_error(err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if on_wait else 0))
            except BlockingIOError:
                on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ---- reading -----------------------------------------------------------------------------
    def get(self, kind: str, parts: dict) -> Entry | None:
        """The verified entry for ``(kind, parts)``, or None (a damaged one is removed with a warning)."""
        return self.get_by_key(kind, cache_key(kind, parts))

    def get_by_key(self, kind: str, key: str) -> Entry | None:
        """Like :meth:`get` for a known key (e.g. :attr:`EntryInfo.key`)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise MoescopeError(f"invalid cache key {key!r}: expected 64 lowercase hex characters")
        entry = self._lookup(_check_kind(kind), key, locked=False)
        self.stats._add("hits" if entry is not None else "misses", kind)
        return entry

    def _candidates(self, kind: str, key: str) -> list[Path]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        short = key[:HASH_CHARS]
        found = [p for p in folder.glob(f"*-{short}") if not p.name.startswith(".")]
        if (folder / short).is_dir():
            found.append(folder / short)
        return sorted(found)

    def _lookup(self, kind: str, key: str, locked: bool) -> Entry | None:
        for path in self._candidates(kind, key):
            try:
                return self._open(path, kind, key)
            except _Corrupt as err:
                if locked:
                    self._discard(path, str(err))
                    continue
                # re-check under the key's lock, so a fresh entry that another process just
                # moved into the same place is never removed by mistake
                with self.lock(kind, key):
                    try:
                        return self._open(path, kind, key)
                    except _Corrupt as err2:
                        self._discard(path, str(err2))
        return None

    def _open(self, path: Path, kind: str, key: str) -> Entry:
        """Verify an entry folder (raises :class:`_Corrupt` with the reason)."""
        files, unverified = self._verify_files(path, key, hash_limit=EAGER_HASH_LIMIT)
        meta = self._read_meta(path)
        if meta.get("key") != key or meta.get("kind") != kind:
            raise _Corrupt(f"{META_FILE} does not describe this entry")
        return Entry(self, path, meta, files, unverified)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not path.exists():
                raise _Corrupt("it vanished while being read") from None
            raise _Corrupt(f"{MANIFEST_FILE} is missing (incomplete write)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Corrupt(f"{MANIFEST_FILE} is unreadable ({type(err).__name__})") from None
        if not isinstance(manifest, dict):
            raise _Corrupt(f"{MANIFEST_FILE} is malformed")
        return manifest

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Corrupt(f"{META_FILE} is unreadable ({type(err).__name__})") from None
        if not isinstance(meta, dict):
            raise _Corrupt(f"{META_FILE} is not a JSON object")
        return meta

    @classmethod
    def _verify_files(cls, path: Path, key: str | None, hash_limit: float) -> tuple[dict, set[str]]:
        """Check the manifest against the files: presence and sizes always, sha256 of files up to
        ``hash_limit`` bytes (``meta.json`` always). Returns (manifest files, files left unhashed);
        ``key=None`` accepts the manifest's own key."""
        manifest = cls._read_manifest(path)
        files = manifest.get("files")
        if (
            not isinstance(files, dict)
            or (key is not None and manifest.get("key") != key)
            or META_FILE not in files
            or not all(isinstance(v, dict) and "bytes" in v and "sha256" in v for v in files.values())
        ):
            raise _Corrupt(f"{MANIFEST_FILE} is malformed or belongs to another key")
        unverified: set[str] = set()
        for name, info in files.items():
            if "/" in name or name.startswith(".") or not name.endswith((".json", ".parquet", ".safetensors")):
                raise _Corrupt(f"{MANIFEST_FILE} lists an unexpected file {name!r}")
            try:
                size = (path / name).stat().st_size
            except OSError:
                raise _Corrupt(f"{name} is missing") from None
            if size != info["bytes"]:
                raise _Corrupt(f"{name} has {size} bytes, the manifest says {info['bytes']}")
            if size > hash_limit and name != META_FILE:
                unverified.add(name)
                continue
            try:
                digest = _sha256(path / name)
            except OSError as err:
                raise _Corrupt(f"{name} is unreadable ({type(err).__name__})") from None
            if digest != info["sha256"]:
                raise _Corrupt(f"{name} does not match its sha256")
        return files, unverified

    def _discard(self, path: Path, reason: str) -> None:
        """Move a damaged entry out of sight (atomically), delete it, and warn in one line."""
        where = f"{path.parent.name}/{path.name}"
        aside = self._tmp / f"corrupt-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it already
        except OSError:
            aside = path  # cannot move it (e.g. another filesystem): delete in place
        shutil.rmtree(aside, ignore_errors=True)
        warnings.warn(f"moescope cache: removed damaged entry {where}: {reason}", CacheWarning, stacklevel=3)

    # ---- writing -----------------------------------------------------------------------------
    def put(
        self,
        kind: str,
        parts: dict,
        *,
        tensors: Mapping[str, Tensor] | None = None,
        tables: Mapping[str, pd.DataFrame] | None = None,
        meta: Mapping[str, Any] | None = None,
        label: str | None = None,
        elapsed: float | None = None,
    ) -> Entry:
        """Store a result atomically and return its entry.

        If the key is already stored (by this or another process), nothing is written and the
        existing entry is returned. ``meta`` must be JSON data and may not use the reserved
        names ``kind, key, parts, label, created, moescope_version, elapsed_s``; ``model``,
        ``model_source`` and ``data`` (strings) are shown by :meth:`entries`.
        """
        key = cache_key(kind, parts)
        return self._put(kind, key, parts, tensors, tables, meta, label, elapsed, locked=False)

    def _put(self, kind, key, parts, tensors, tables, meta, label, elapsed, locked: bool) -> Entry:
        for name, value in (("tensors", tensors), ("tables", tables), ("meta", meta)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a dict (or None), got {type(value).__name__}")
        label = None if label is None else str(label)
        full_meta = self._build_meta(kind, key, parts, meta, label, elapsed)
        tensors = _prepare_tensors(tensors) if tensors else {}
        tables = dict(tables or {})
        _check_tables(tables)
        if not locked:
            existing = self._lookup(kind, key, locked=False)
            if existing is not None:
                return existing
        try:
            (self.root / kind).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-{key[:HASH_CHARS]}-", dir=self._tmp))
        except OSError as err:
            raise self._write_error(err) from None
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should stay readable
            files = self._write_files(tmp, tensors, tables, full_meta)
            dest = self.root / kind / _folder_name(key, label)
            with contextlib.nullcontext() if locked else self.lock(kind, key):
                existing = self._lookup(kind, key, locked=True)
                if existing is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return existing
                try:
                    os.rename(tmp, dest)
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # lost a race: keep theirs
                    winner = self._lookup(kind, key, locked=True)
                    if winner is None:
                        raise MoescopeError(
                            f"cannot store cache entry {kind}/{dest.name}: '{dest}' exists and is not a "
                            "valid entry; remove it"
                        ) from None
                    return winner
            _fsync_dir(dest.parent)
        except OSError as err:  # full disk, read-only folder: nothing half-written stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(err) from None
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if type(err).__module__.split(".")[0] in ("safetensors", "pyarrow"):  # their own I/O errors
                raise self._write_error(err) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.stats._add("stored", kind)
        return Entry(self, dest, full_meta, files, unverified=set())

    @staticmethod
    def _build_meta(kind, key, parts, meta, label, elapsed) -> dict:
        from moescope.analysis.core import __version__

        user = _plain(dict(meta or {}), "meta")
        clash = sorted(set(user) & set(RESERVED_META))
        if clash:
            raise ValueError(f"meta uses reserved name(s) {clash}; the cache sets {', '.join(RESERVED_META)}")
        if elapsed is not None and not (isinstance(elapsed, int | float) and math.isfinite(elapsed)):
            raise ValueError(f"elapsed must be a finite number of seconds, got {elapsed!r}")
        full = {
            **user,
            "kind": kind,
            "key": key,
            "parts": _plain(parts, "parts"),
            "label": label,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "moescope_version": __version__,
        }
        if elapsed is not None:
            full["elapsed_s"] = round(float(elapsed), 6)
        return full

    @staticmethod
    def _write_files(tmp: Path, tensors: dict, tables: dict, meta: dict) -> dict[str, dict]:
        written: list[str] = []
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / TENSORS_FILE))
            written.append(TENSORS_FILE)
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", engine="pyarrow")
            written.append(f"{name}.parquet")
        _write_json(tmp / META_FILE, meta)
        written.append(META_FILE)
        files = {}
        for name in written:
            _fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        _write_json(tmp / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "key": meta["key"], "files": files})
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        return files

    def get_or_compute(
        self,
        kind: str,
        parts: dict,
        compute: Callable[[], Any],
        label: str | None = None,
    ) -> Entry:
        """The entry for ``(kind, parts)``; on a miss, run ``compute()`` once across processes.

        ``compute`` returns a :class:`Result`, a dict with keys ``tensors`` / ``tables`` / ``meta``
        or any object with those attributes. While one process computes, the others asking for the
        same key wait on its lock and then read its entry. The compute time is stored as
        ``meta['elapsed_s']``.
        """
        key = cache_key(kind, parts)
        entry = self._lookup(kind, key, locked=False)
        if entry is not None:
            self.stats._add("hits", kind)
            return entry
        with self.lock(kind, key):
            entry = self._lookup(kind, key, locked=True)
            if entry is not None:  # another process computed it while we waited
                self.stats._add("hits", kind)
                return entry
            self.stats._add("misses", kind)
            self._check_room()  # before the work, so it is not thrown away when the entry cannot be written
            self.stats._add("computed", kind)
            start = time.perf_counter()
            tensors, tables, meta = _unpack_result(compute())
            elapsed = time.perf_counter() - start
            return self._put(kind, key, parts, tensors, tables, meta, label, elapsed, locked=True)

    # ---- index -------------------------------------------------------------------------------
    def _entry_dirs(self, kind: str | None = None) -> Iterator[Path]:
        if kind is not None:
            kinds = [self.root / _check_kind(kind)]
        else:
            kinds = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in kinds:
            if folder.is_dir():
                yield from sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    @staticmethod
    def _info(path: Path) -> EntryInfo | None:
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            if not (path / MANIFEST_FILE).is_file() or not isinstance(meta, dict):
                return None
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            kind, key, created = meta["kind"], meta["key"], meta["created"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError):
            return None
        parts = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}

        def text(name: str) -> str | None:
            value = meta.get(name, parts.get(name))
            if value is None or isinstance(value, str):
                return value
            return json.dumps(value, sort_keys=True, separators=(",", ":"))

        elapsed = meta.get("elapsed_s")
        return EntryInfo(
            kind=kind, label=meta.get("label"), key=key, path=path, created=created, size=size,
            model=text("model"), model_source=text("model_source"), data=text("data"),
            elapsed_s=float(elapsed) if isinstance(elapsed, int | float) else None,
        )

    def entries(self, kind: str | None = None, model: str | None = None) -> list[EntryInfo]:
        """Index of the stored entries, oldest first, from their ``meta.json`` (no checksums).

        ``model`` keeps entries whose ``model_source`` equals it or whose model fingerprint starts
        with it (the fields ``model`` / ``model_source`` of the entry's meta, else of its parts).
        """
        if model is not None and not model:
            raise MoescopeError("empty model filter: give a model source (e.g. 'demo') or a fingerprint prefix")
        out = []
        for path in self._entry_dirs(kind):
            info = self._info(path)
            if info is not None and (model is None or info.matches_model(model)):
                out.append(info)
        return sorted(out, key=lambda i: (i.created, str(i.path)))

    def inspect(self, kind: str | None = None, model: str | None = None, verify: bool = False) -> list[EntryInfo]:
        """Every entry folder with its verdict, oldest first: like :meth:`entries`, but each entry's
        manifest is checked (files present with their recorded sizes, ``meta.json`` hashed; every
        file's sha256 with ``verify``), and damaged or unreadable folders are listed too, with
        :attr:`EntryInfo.problem` saying why. Nothing is removed (see :meth:`clear`). A damaged
        entry whose ``meta.json`` cannot be read matches no ``model`` filter."""
        if model is not None and not model:
            raise MoescopeError("empty model filter: give a model source (e.g. 'demo') or a fingerprint prefix")
        out = []
        for path in self._entry_dirs(kind):
            info = self._inspect(path, verify)
            if model is None or info.matches_model(model):
                out.append(info)
        return sorted(out, key=lambda i: (i.created, str(i.path)))

    def _inspect(self, path: Path, verify: bool) -> EntryInfo:
        problem = None
        try:
            self._verify_files(path, None, hash_limit=math.inf if verify else -1)
            meta = self._read_meta(path)
            manifest_key = self._read_manifest(path).get("key")
            if (meta.get("kind") != path.parent.name or meta.get("key") != manifest_key
                    or not str(meta.get("key", "")).startswith(path.name[-HASH_CHARS:])):
                raise _Corrupt(f"{META_FILE} does not describe this entry")
            info = self._info(path)
            if info is None:
                raise _Corrupt(f"{META_FILE} lacks kind, key or created")
            return info
        except _Corrupt as err:
            problem = str(err)
        info = self._info(path)  # what can still be read, for the listing
        if info is not None:
            return dataclasses.replace(info, problem=problem)
        try:
            stat = path.stat()
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        except OSError:
            stat, size = None, 0
        created = datetime.fromtimestamp(stat.st_mtime if stat else 0, timezone.utc).isoformat(timespec="microseconds")
        return EntryInfo(kind=path.parent.name, label=None, key="", path=path, created=created, size=size,
                         problem=problem)

    def _remove_folder(self, path: Path, why: str) -> bool:
        """Move an entry folder aside (readers never see half a folder), then delete it; whether it
        was there."""
        aside = self._tmp / f"{why}-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def remove(self, kind: str, key: str) -> bool:
        """Remove one stored entry; whether there was one."""
        return sum(self._remove_folder(p, "remove") for p in self._candidates(_check_kind(kind), key)) > 0

    def clear(self, kind: str | None = None, model: str | None = None, damaged: bool = False,
              verify: bool = False) -> int:
        """Remove the matching entries (see :meth:`entries`; without ``model`` unreadable entry folders
        go too) and return how many were removed. ``damaged`` removes only the entries that
        :meth:`inspect` (with ``verify``: every checksum) finds damaged."""
        if damaged:
            targets = [i.path for i in self.inspect(kind, model, verify=verify) if i.problem]
        elif model is not None:
            targets = [i.path for i in self.entries(kind, model)]
        else:
            targets = list(self._entry_dirs(kind))
        return sum(self._remove_folder(path, "clear") for path in targets)

    def size(self) -> int:
        """Bytes of all files under the cache root."""
        total = 0
        for dirpath, _dirs, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total


# ---- display ---------------------------------------------------------------------------------
def _short(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def format_entries(entries: list[EntryInfo]) -> str:
    """A readable table of :meth:`Cache.entries` / :meth:`Cache.inspect` for ``moescope cache ls``
    (damaged entries are marked and their reasons listed below the table)."""
    if not entries:
        return "cache is empty (no matching entries)"
    header = ("KIND", "LABEL", "CREATED (UTC)", "SIZE", "MODEL", "DATA", "KEY", "STATUS")
    rows = []
    for e in entries:
        model = e.model_source or ""
        if e.model:
            model = f"{model} ({e.model[:10]})" if model else e.model[:10]
        rows.append((
            e.kind,
            _short(e.label, 40),
            e.created[:19].replace("T", " "),
            format_bytes(e.size),
            _short(model, 40),
            _short(e.data, 30),
            e.key[:12] or "-",
            e.status,
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [v.rjust(w) if i == 3 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    lines = [line(r) for r in [header, *rows]]
    total = sum(e.size for e in entries)
    lines.append(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {format_bytes(total)}")
    damaged = [e for e in entries if e.problem]
    if damaged:
        lines += [f"damaged: {e.path.parent.name}/{e.path.name}: {e.problem}" for e in damaged]
        lines.append(f"{len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'}; "
                     "`moescope cache clear --damaged` removes them")
    return "\n".join(lines)
