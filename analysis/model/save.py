"""Output folders of saved and exported models: the checks made before any expensive work, and
the facts a folder needs (tokenizer files, one expert count per config)."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.outputs import check_free_space, check_writable, write_error
from moescope.analysis.core.processes import process_alive

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


MARKER_FILE = ".moescope-export"  # written last into every folder moescope saves; --overwrite needs it
_TMP_TAG, _OLD_TAG = ".moescope-tmp-", ".moescope-old-"


# what an export of an older moescope (whose marker lists no files) may hold: anything else in it is not moescope's
_EXPORT_NAMES = frozenset({"config.json", "generation_config.json", "model.safetensors.index.json", "plan.json",
                           "experiment.json", "README.md", "modeling_moescope.py", *TOKENIZER_FILES})


def foreign_entries(out: Path) -> list[str]:
    """The entries of moescope's folder ``out`` that moescope did not write (a person's notes, a
    results folder put in it since): those its marker does not list, or for an older marker without
    a list, those that are not an export's own files. ``--overwrite`` refuses a folder holding any."""
    try:
        listed = json.loads((out / MARKER_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        listed = None
    names = sorted(p.name for p in out.iterdir() if p.name != MARKER_FILE)
    if isinstance(listed, list):
        return [n for n in names if n not in set(listed)]
    return [n for n in names if n not in _EXPORT_NAMES and not (n.endswith(".safetensors") and (out / n).is_file())]


def _refuse_foreign(out: Path, given) -> None:
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise MoescopeError(f"output folder '{given}' holds {shown}, which moescope did not write; --overwrite "
                            "replaces only moescope's own files: move them out or choose another folder")


def _follow(out_dir: str | Path) -> Path:
    """The output folder's path with a symlink followed (moescope writes the folder a link points to
    and leaves the link in place; it never replaces a link with a folder)."""
    if not str(out_dir).strip():
        raise MoescopeError("output folder: the path is empty; give a folder to write the model into")
    out = Path(out_dir).expanduser()
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def check_output_dir(out_dir: str | Path, overwrite: bool, needed_bytes: int | None = None) -> Path:
    """Refuse (before any expensive work) a path that is a file or lies under one, a place that
    cannot be written, a file system with less than ``needed_bytes`` free (when estimated), or a
    non-empty folder unless ``overwrite``; ``overwrite`` replaces only a folder moescope wrote (one
    that carries :data:`MARKER_FILE`), never a folder of someone's own files. A symlink is followed:
    the folder it points to is the output. Returns the folder to write."""
    given = Path(out_dir)
    out = _follow(out_dir)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MoescopeError(f"output path '{given}' lies under '{parent}', which is a file, not a folder")
            break
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"output path '{given}' exists and is not a folder")
    if out.exists() and any(p for p in out.iterdir()):
        if not overwrite:
            raise MoescopeError(f"output folder '{given}' is not empty; choose an empty folder or pass --overwrite")
        if not (out / MARKER_FILE).is_file():
            raise MoescopeError(f"output folder '{given}' was not written by moescope (it has no {MARKER_FILE}); "
                                "--overwrite only replaces moescope's own folders: choose another folder")
        _refuse_foreign(out, given)
    check_writable(out.parent, f"output folder '{given}'")
    if needed_bytes:
        check_free_space(out.parent, needed_bytes, f"the output folder '{given}'")
    return out


def sweep_stale_siblings(out: Path) -> None:
    """Finish or remove what a killed writer of ``out`` left next to it: its temporary folder
    (renamed into place when complete, i.e. marked, and ``out`` is missing; removed otherwise) and
    the folder it was replacing (put back when ``out`` is missing, removed otherwise)."""
    parent = out.parent
    if not parent.is_dir():
        return
    for tag in (_TMP_TAG, _OLD_TAG):
        for sib in parent.glob(f".{glob.escape(out.name)}{tag}*"):
            pid = sib.name.rpartition(tag)[2]
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            if not out.exists() and (tag == _OLD_TAG or (sib / MARKER_FILE).is_file()):
                with contextlib.suppress(OSError):
                    os.replace(sib, out)
                    continue
            shutil.rmtree(sib, ignore_errors=True)


def _keep_aside(tmp: Path, out: Path) -> Path:
    """Rename a finished temporary folder to a visible sibling of ``out`` no sweep removes."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        keep = out.parent / (f"{out.name}.moescope-{stamp}" + (f"-{i}" if i else ""))
        if not os.path.lexists(keep):
            with contextlib.suppress(OSError):
                os.rename(tmp, keep)
                return keep
    return tmp


def _appeared(out: Path, tmp: Path, overwrite: bool = False) -> MoescopeError:
    keep = _keep_aside(tmp, out)
    if out.is_dir() and not out.is_symlink() and (out / MARKER_FILE).is_file():
        why = ("another moescope run wrote a folder there while this one worked, and it holds files moescope did not "
               "write" if overwrite else "another moescope run wrote a folder there while this one worked (pass "
               "--overwrite to replace such a folder)")
        return MoescopeError(f"'{out}': {why}; nothing was replaced: the finished output is in '{keep}'")
    return MoescopeError(f"'{out}' appeared while moescope was writing it and is not a folder moescope wrote "
                         f"(no {MARKER_FILE}); nothing was replaced: the finished output is in '{keep}'")


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``out``. Whatever stands at ``out`` by now is looked at again
    (it may have appeared during the work): only a folder moescope wrote is replaced, and only with
    ``overwrite``; anything else is left as it is and ``tmp`` is kept under a visible name."""
    if os.path.islink(out) or (os.path.lexists(out) and not out.is_dir()):
        raise _appeared(out, tmp)
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite and (out / MARKER_FILE).is_file() and not foreign_entries(out)):
            raise _appeared(out, tmp, overwrite)
        old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            with contextlib.suppress(OSError):
                os.replace(old, out)  # put moescope's previous folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:  # rename(2) replaces only a missing or empty folder: a file added meanwhile makes it fail
        os.replace(tmp, out)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(out, tmp) from None
        raise


def _ordinary_modes(folder: Path) -> None:
    """Give every file and folder written into ``folder`` the mode a plain ``open``/``mkdir`` gets
    under this process's umask: some writers (safetensors through transformers) create 0600 files,
    which would leave an export's weights unreadable to the group while its config is readable."""
    umask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``os.umask`` sets it
    while reading, a moment another thread could create files in)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out_dir`` to write into; when the block finishes,
    mark it (:data:`MARKER_FILE`) and rename it into place, so ``out_dir`` is either absent (or as
    it was) or complete, whenever the process dies. An exception removes the temporary folder.

    Nothing moescope did not write is ever deleted: if something that is not a moescope folder
    appeared at ``out_dir`` during the work, the placement refuses in one line and keeps the
    finished folder under a visible name it gives; ``overwrite`` replaces only moescope's own
    folders. A symlink at ``out_dir`` is followed (the folder it points to is written)."""
    sweep_stale_siblings(_follow(out_dir))  # first: it may put a killed writer's folder back in place
    out = check_output_dir(out_dir, overwrite, needed_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _ordinary_modes(tmp)
        files = sorted(p.name for p in tmp.iterdir())  # what --overwrite may later replace, and nothing else
        (tmp / MARKER_FILE).write_text(json.dumps({"written_by": "moescope", "files": files}) + "\n", encoding="utf-8")
        _place(tmp, out, overwrite)
    except MoescopeError:
        if tmp.exists() and not (tmp / MARKER_FILE).is_file():  # a finished folder is never removed
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as err:  # disk full, permissions, ...: one line naming the file
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(err, f"'{out}'") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
