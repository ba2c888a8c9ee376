"""Where the repository's shipped files are: the demo model (``MOESCOPE_DEMO_DIR`` overrides it)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "demo" / "model"


def demo_model_dir() -> Path:
    """The shipped demo model folder (``MOESCOPE_DEMO_DIR`` overrides it)."""
    return Path(os.environ.get("MOESCOPE_DEMO_DIR", DEMO_MODEL_DIR))
