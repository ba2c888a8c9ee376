"""Where the repository's shipped files are: the demo model (``MOESCOPE_DEMO_DIR`` overrides it) and
the upcycled demo (``MOESCOPE_DEMO_UPCYCLED_DIR``); what a model name points at (:func:`resolve_source`).
Imports neither torch nor transformers."""

from __future__ import annotations

import os
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_DIR = REPO_ROOT / "demo" / "model"
DEMO_UPCYCLED_DIR = REPO_ROOT / "demo" / "model-upcycled"


def demo_model_dir() -> Path:
    """The shipped demo model folder (``MOESCOPE_DEMO_DIR`` overrides it)."""
    return Path(os.environ.get("MOESCOPE_DEMO_DIR", DEMO_MODEL_DIR))


def demo_upcycled_dir() -> Path:
    """The shipped upcycled demo (``MOESCOPE_DEMO_UPCYCLED_DIR`` overrides it): same tokenizer, corpus
    and architecture as the demo, its experts upcycled from one dense FFN per layer."""
    return Path(os.environ.get("MOESCOPE_DEMO_UPCYCLED_DIR", DEMO_UPCYCLED_DIR))


# model source name -> (its folder, the train_model.py flag that rebuilds it)
DEMO_SOURCES = {"demo": (demo_model_dir, ""), "demo-upcycled": (demo_upcycled_dir, " --upcycle")}


def not_on_hub(source: str, why: str) -> MoescopeError:
    """The one-line error for a source that is neither a local folder nor obtainable from the hub."""
    return MoescopeError(f"cannot load '{source}': not a local model folder, and the Hugging Face hub did not "
                         f"provide it ({why})")


def resolve_source(source: str) -> tuple[str, Path | None]:
    """``'demo'`` / ``'demo-upcycled'`` → the shipped folders; an existing path → that folder;
    otherwise a hub id."""
    if source in DEMO_SOURCES:
        folder, flag = DEMO_SOURCES[source]
        path = folder()
        if not (path / "config.json").is_file():
            raise MoescopeError(f"the {source} model is missing at '{path}'; run `python demo/train_model.py{flag}` "
                                "to build it")
        return str(path), path
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoescopeError(f"'{source}' is a folder without config.json; expected a transformers model folder")
        return str(path), path
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise MoescopeError(f"model '{source}' not found: give 'demo', 'demo-upcycled', an existing model folder, "
                            "or a hub id (org/name)")
    return source, None
