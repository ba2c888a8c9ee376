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

from moescope.analysis.core.paths import REPO_ROOT, demo_model_dir  # noqa: E402
from moescope.analysis.model.synthetic import TINY_CONFIGS, save_tiny  # noqa: E402

# ---------------------------------------------------------------- the repository stays as it was
# Every test writes only under its temp folders: the cache goes to a session temp folder (below),
# and the run fails when the checkout differs afterwards from before (tracked, untracked and
# ignored files alike, e.g. entries left in the repository's cache/), except what Python and the
# runners themselves leave (bytecode, pytest's and coverage's own files).
RUNNER_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "venv"}


def _runner_file(path: str) -> bool:
    parts = path.rstrip("/").split("/")
    return bool(RUNNER_PARTS.intersection(parts)) or parts[-1].startswith(".coverage")


def repo_state() -> set[str] | None:
    """``git status --porcelain --ignored`` of the checkout, less the runners' own files; None
    outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--ignored",
                              "--untracked-files=all", "--", ".", ":(exclude).venv", ":(exclude)venv"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {line for line in out.stdout.splitlines() if line and not _runner_file(line[3:])}


def pytest_sessionstart(session):
    session.config._repo_before = repo_state()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when the checkout changed (printed with what changed)."""
    before = getattr(session.config, "_repo_before", None)
    after = repo_state() if before is not None else None
    if after is None:
        return
    changed = sorted(after ^ before)
    if changed:
        lines = changed[:20] + ([f"… and {len(changed) - 20} more"] if len(changed) > 20 else [])
        report = session.config.pluginmanager.get_plugin("terminalreporter")
        write = report.write_line if report is not None else print
        write(f"the test run changed the repository ({REPO_ROOT}): a test wrote outside its temp folders "
              "(or the checkout was edited while the suite ran)")
        for line in lines:
            write(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test (and every ``moescope`` process a test starts with ``os.environ``) uses a cache in
    a session temp folder, never the repository's ``cache/``; a test that needs its own empty cache
    still sets ``MOESCOPE_CACHE`` itself."""
    root = tmp_path_factory.mktemp("moescope-cache")
    saved = os.environ.get("MOESCOPE_CACHE")
    os.environ["MOESCOPE_CACHE"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("MOESCOPE_CACHE", None)
    else:
        os.environ["MOESCOPE_CACHE"] = saved

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
