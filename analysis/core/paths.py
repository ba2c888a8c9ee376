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


HUB_PROBE_TIMEOUT_S = 3.0
_hub_unreachable: list[str] = []  # why, once a probe failed in this process


def probe_hub() -> str | None:
    """Whether the Hugging Face hub can be reached, asked once per process with one connection of
    at most :data:`HUB_PROBE_TIMEOUT_S`; when it cannot, huggingface_hub is switched to offline mode
    (answers from its local cache only), so a missing network costs seconds and one line instead of
    five retries with backoff (~25 s). Returns why it is unreachable, or None. ``HF_HUB_OFFLINE``
    set by the user is respected (no probe)."""
    import socket
    from urllib.parse import urlparse

    if _hub_unreachable:
        return _hub_unreachable[0]
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return None
    except OSError as err:
        why = f"the hub at {host} is unreachable: {getattr(err, 'strerror', None) or err}"
    _hub_unreachable.append(why)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:  # read at import: set the live constant too
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    return why


def not_on_hub(source: str, why: str) -> MoescopeError:
    """The one-line error for a source that is neither a local folder nor obtainable from the hub."""
    if _hub_unreachable:
        why = f"{_hub_unreachable[0]}, and no copy is in the local hub cache"
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
    probe_hub()
    return source, None
