"""What moescope writes where a person asked it to: output paths checked before any work, files
written to a temporary sibling and renamed into place, and JSON read with a bounded depth.

Symlinks at an output path are *followed*: ``-o link`` writes the file or folder the link points
to (beside it, then renamed), and the link itself stays. Nothing but a moescope temporary file is
ever removed here; an error while writing is one line naming the path, and the temporary file is
gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError

MAX_JSON_DEPTH = 64  # nesting of objects/arrays any JSON moescope reads may have (plans are 4 deep)
TMP_TAG = ".moescope-tmp-"
SMALL_FILE_BYTES = 64 * 1024  # the free space a plan, a CSV or a few of them need at least


# ---- JSON ---------------------------------------------------------------------------------------
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text`` outside strings, without recursing; the text
    is reduced to its brackets by regular expressions first, so a large plan costs milliseconds."""
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _unique_pairs(where: str) -> Callable[[list], dict]:
    def hook(pairs: list) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise MoescopeError(f"{where}: key {key!r} appears twice in one object; give each key once")
            out[key] = value
        return out

    return hook


def loads_json(text: str, where: str, parse_constant: Callable[[str], object] | None = None,
               unique_keys: bool = False, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` for text a person gave: nesting deeper than ``max_depth`` is refused in one line
    before parsing (no RecursionError), ``unique_keys`` refuses an object that repeats a key (JSON
    otherwise keeps the last one silently), and integers too long to be a number are refused.
    Decoding errors are left to the caller (it knows what was expected)."""
    if len(text) > 2 * max_depth and json_depth(text) > max_depth:
        raise MoescopeError(f"{where}: JSON nested more than {max_depth} levels deep; moescope reads at most "
                            f"{max_depth}")
    kwargs = {"parse_constant": parse_constant} if parse_constant else {}
    if unique_keys:
        kwargs["object_pairs_hook"] = _unique_pairs(where)
    try:
        return json.loads(text, **kwargs)
    except RecursionError:  # deep nesting inside a short text
        raise MoescopeError(f"{where}: JSON nested too deeply; moescope reads at most {max_depth} levels") from None
    except ValueError as err:
        if isinstance(err, json.JSONDecodeError) or isinstance(err, MoescopeError):
            raise
        # int() of a too-long digit string (sys.set_int_max_str_digits)
        raise MoescopeError(f"{where}: {err}") from None


# ---- output paths -------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def check_writable(folder: Path, what: str) -> None:
    """Refuse a folder (or its nearest existing ancestor) that cannot be written, by trying: a file
    is created and removed (``os.access`` says yes to root on a read-only mount)."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise MoescopeError(f"{what} lies under '{base}', which is a file, not a folder")
    try:
        probe = base / f"{TMP_TAG}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise MoescopeError(f"cannot write {what}: '{base}' is not writable ({err.strerror or err}); choose "
                            "another place") from None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse when the file system of ``folder`` has less than ``needed`` bytes free."""
    base = _existing_ancestor(folder)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return  # cannot be estimated here
    if needed > free:
        raise MoescopeError(f"not enough free space for {what}: about {needed / 2**20:,.2f} MiB needed, "
                            f"{free / 2**20:,.2f} MiB free on '{base}'; free space or choose another place")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """The file ``path`` will be written to, checked before any work: not empty, not a folder, not
    under a file, in a writable folder. A symlink is followed (its target is written, the link
    stays). Returns the path to write (the link's target for a link)."""
    if not str(path).strip():
        raise MoescopeError(f"{what}: the path is empty; give a file name such as plan.json")
    given = Path(path).expanduser()
    out = Path(os.path.realpath(given)) if given.is_symlink() else given
    if out.is_dir():
        raise MoescopeError(f"{what} '{given}' is a folder; give a file path (e.g. {given / 'plan.json'})")
    if out.exists() and not out.is_file():
        raise MoescopeError(f"{what} '{given}' exists and is not a regular file")
    check_writable(out.parent, f"{what} '{given}'")
    check_free_space(out.parent, SMALL_FILE_BYTES, f"{what} '{given}'")
    return out


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder moescope will write files into (``analyze --export``): not a file, writable. A
    symlink to a folder is followed."""
    if not str(path).strip():
        raise MoescopeError(f"{what}: the path is empty; give a folder")
    given = Path(path).expanduser()
    out = Path(os.path.realpath(given)) if given.is_symlink() else given
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"{what} '{given}' exists and is not a folder")
    check_writable(out, f"{what} '{given}'")
    check_free_space(out, SMALL_FILE_BYTES, f"{what} '{given}'")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str = "output file", binary: bool = False) -> Iterator:
    """Open a temporary sibling of ``path`` for writing; when the block ends, flush, fsync and rename
    it onto ``path`` (a symlink is followed: its target is replaced, the link stays). On any error the
    temporary file is removed and an ``OSError`` becomes one line naming the path; ``path`` is then
    as it was."""
    out = check_output_file(path, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MoescopeError(f"cannot write {what} '{path}': {_why(err)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "output file") -> Path:
    with atomic_file(path, what) as fh:
        fh.write(text)
    return Path(path)


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device; free space or choose another place"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror} (read-only or not yours); choose another place"
    return err.strerror or str(err)


def write_error(err: OSError, what: str) -> MoescopeError:
    """One line for an ``OSError`` met while writing ``what``."""
    where = f" ({err.filename})" if err.filename else ""
    return MoescopeError(f"cannot write {what}{where}: {_why(err)}")
