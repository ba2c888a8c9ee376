"""Shared fixtures: tiny random models of every family (built locally, nothing downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# one thread: the tiny test models are far faster without OpenMP hand-offs, and two threads per
# test process spin against each other on a shared 2-core machine (measured: 5 ms vs 500 ms CPU
# per forward of a tiny Mixtral)
torch.set_num_threads(1)

from moescope.analysis.core.paths import demo_model_dir  # noqa: E402
from moescope.analysis.model.synthetic import TINY_CONFIGS, save_tiny  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)
# one family per distinct mechanism (routing rule, expert layout, where router tensors live, shared
# experts): the original seven plus Llama 4 (scores on the expert input, transposed experts),
# DeepSeek-V2 (softmax group-limited), Cohere 2 (top-k first, shared experts averaged) and AFMoE
# (block-level selection bias, nested router Linear). Pipeline tests (strategies, analysis) run on
# these; the family proofs (tests/test_families*.py) run on every family.
CORE_FAMILIES = sorted(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "gpt_oss",
                        "llama4_text", "deepseek_v2", "cohere2_moe", "afmoe"])

_BUILT: dict = {}


def fresh_tiny(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A private copy of the tiny ``family`` model in ``dtype``, wrapped;
    each (family, dtype, seed) is built once per session and deep-copied per call."""
    import copy

    from moescope.analysis.model import wrap_model
    from moescope.analysis.model.synthetic import tiny_model

    key = (family, dtype, seed)
    if key not in _BUILT:
        _BUILT[key] = tiny_model(family, seed=seed, dtype=dtype)
    return wrap_model(copy.deepcopy(_BUILT[key]), source=f"tiny-{family}")


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
