"""Shared fixtures: tiny random models of every family (built locally, nothing downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from moescope.analysis.paths import demo_model_dir  # noqa: E402
from moescope.analysis.synthetic import TINY_CONFIGS, save_tiny  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """One saved tiny model folder per family (weights only, no tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: str(save_tiny(fam, root / fam)) for fam in FAMILIES}


@pytest.fixture(scope="session")
def demo_available() -> bool:
    return (demo_model_dir() / "config.json").is_file()


@pytest.fixture
def demo_dir(demo_available):
    if not demo_available:
        pytest.fail(f"the demo model is missing at {demo_model_dir()}")
    return demo_model_dir()
