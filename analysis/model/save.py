"""Output folders of saved and exported models: the checks made before any expensive work, and
the facts a folder needs (tokenizer files, one expert count per config)."""

from __future__ import annotations

import shutil
from pathlib import Path

from moescope.analysis.errors import MoescopeError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse (before any expensive work) a path that is a file, or a non-empty folder unless
    ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"output path '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MoescopeError(f"output folder '{out}' is not empty; choose an empty folder or pass --overwrite")
    return out


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty folder unless ``overwrite`` (then empty it)."""
    check_output_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

