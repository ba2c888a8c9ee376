"""Where the repository's shipped files are: the demo model (``MOESCOPE_DEMO_DIR`` overrides it) and
the upcycled demo (``MOESCOPE_DEMO_UPCYCLED_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
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
