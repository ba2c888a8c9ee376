"""Output folders of saved and exported models: the checks made before any expensive work, and
the facts a folder needs (tokenizer files, one expert count per config)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
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


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse (before any expensive work) a path that is a file or lies under one, or a non-empty
    folder unless ``overwrite``; ``overwrite`` replaces only a folder moescope wrote (one that
    carries :data:`MARKER_FILE`), never a folder of someone's own files."""
    out = Path(out_dir)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MoescopeError(f"output path '{out}' lies under '{parent}', which is a file, not a folder")
            break
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"output path '{out}' exists and is not a folder")
    if out.exists() and any(p for p in out.iterdir()):
        if not overwrite:
            raise MoescopeError(f"output folder '{out}' is not empty; choose an empty folder or pass --overwrite")
        if not (out / MARKER_FILE).is_file():
            raise MoescopeError(f"output folder '{out}' was not written by moescope (it has no {MARKER_FILE}); "
                                "--overwrite only replaces moescope's own folders: choose another folder")
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


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out_dir`` to write into; when the block finishes,
    mark it (:data:`MARKER_FILE`) and rename it into place, so ``out_dir`` is either absent (or as
    it was) or complete, whenever the process dies. An exception removes the temporary folder."""
    sweep_stale_siblings(Path(out_dir))  # first: it may put a killed writer's folder back in place
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER_FILE).write_text(json.dumps({"written_by": "moescope"}) + "\n", encoding="utf-8")
        if out.exists() and any(out.iterdir()):  # checked above: a moescope folder, --overwrite given
            old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # over an empty folder, or where there was none
    except OSError as err:  # disk full, permissions, ...: one line naming the file
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({err.filename})" if err.filename else ""
        raise MoescopeError(f"cannot write '{out}'{where}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
