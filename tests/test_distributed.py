"""Data parallelism under torchrun, run for real: 2 gloo ranks on localhost.

The ranks are ``python -m moescope …`` processes started with the variables torchrun gives its
workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the process
group code under test is the one torchrun runs (:mod:`moescope.analysis.core.distributed`); one
test goes through ``--nproc 2`` and torchrun itself. Results are compared with a one-process run on
the same sequences (threads pinned to 1 on both sides, so the decoder layers see the same batches
and compute the same bits; the differences left come from the order of the float64 reductions
and from routing each rank's share in its own matmul).

Tolerance of an analysis, stated once (:data:`RTOL`, :data:`ATOL`): counts (usage, co-activation,
vocabulary coverage, ECC, ETS, EAO) exactly; every other statistic to 1e-4 relative / 1e-5
absolute (float32 models); perplexity and the drop grid exactly.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.distributed import World, share_of
from moescope.analysis.run.cli import main

RTOL, ATOL = 1e-4, 1e-5
EXACT = ("usage_count", "coactivation", "vocab_coverage", "pair.ECC", "pair.ETS", "crit.EAO")
ANALYZE = ["analyze", "demo", "--samples", "8", "--seq-len", "32", "--similarity-tokens", "64"]
LOST_RANK_S = 60  # a killed rank ends every other rank within this (its closed sockets are seen at once)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argv: list[str], cache: Path, n: int = 2, per_rank: dict[int, list[str]] | None = None,
          env_extra: dict | None = None, timeout: float = 400, code: str | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``python -m moescope ARGV`` (or ``python -c CODE``) as ``n`` ranks of one gloo world, as
    torchrun would."""
    port = _free_port()
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "MOESCOPE_CACHE": str(cache), **(env_extra or {})}
        env.pop("MOESCOPE_FAULT_AT", None) if "MOESCOPE_FAULT_AT" not in (env_extra or {}) else None
        cmd = ["-c", code] if code is not None else ["-m", "moescope", *argv, *(per_rank or {}).get(r, [])]
        procs.append(subprocess.Popen([sys.executable, *cmd],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def one_process(argv: list[str], cache: Path, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setenv("MOESCOPE_CACHE", str(cache))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def stored(cache: Path, kind: str = "analysis") -> dict[str, torch.Tensor]:
    from moescope.analysis.core.cache import Cache

    infos = Cache(cache).entries(kind)
    assert len(infos) == 1, infos
    entry = Cache(cache).get_by_key(kind, infos[0].key)
    return entry.tensors(), entry.meta


def assert_same_analysis(a: Path, b: Path) -> None:
    ta, ma = stored(a)
    tb, mb = stored(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        if any(part in k for part in EXACT):
            assert torch.equal(ta[k].isnan(), tb[k].isnan()) and torch.equal(ta[k].nan_to_num(), tb[k].nan_to_num()), k
        else:
            torch.testing.assert_close(tb[k], ta[k], rtol=RTOL, atol=ATOL, equal_nan=True, msg=k)
    for l, row in ma["layers"].items():
        for name, v in row["scalars"].items():
            assert math.isclose(mb["layers"][l]["scalars"][name], v, rel_tol=RTOL, abs_tol=ATOL), (l, name)


def one_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------- the pieces, in one process


def test_shares_are_contiguous_whole_chunks_in_rank_order():
    # 20 sequences in chunks of 8 over 2 ranks: chunk boundaries (one process's batches) kept
    assert [share_of(20, r, 2, 8) for r in range(2)] == [(0, 8), (8, 20)]
    # fewer chunks than ranks: split by sequence
    assert [share_of(3, r, 3, 8) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    # every sequence exactly once, in order
    for n, size, unit in ((64, 3, 8), (7, 7, 4), (100, 8, 8)):
        parts = [share_of(n, r, size, unit) for r in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(parts[i][1] == parts[i + 1][0] for i in range(size - 1))


def test_a_world_of_one_is_a_no_op():
    w = World()
    t = torch.arange(6.0).reshape(3, 2)
    assert w.sum(t) is t and w.gather_rows(t) is t and w.texts("x") == ["x"]
    assert not w.distributed and w.is_main and w.share(10, 8) == (0, 10)
    w.agree(model="a")  # nothing to compare with


@pytest.mark.parametrize("argv, says", [
    (["--nproc", "two", "analyze"], "--nproc takes a number of processes (ranks), got 'two'"),
    (["--nproc", "0", "analyze"], "--nproc must be at least 1, got 0"),
    (["--nproc", "2", "families"], "--nproc applies to analyze, grid, plan, eval, prune; 'families' runs in one process"),
])
def test_bad_nproc_is_one_line(argv, says, tmp_path, monkeypatch):
    code, out, err = one_process(argv, tmp_path / "cache", monkeypatch)
    assert code == 2 and out == ""
    assert one_line(err) == f"moescope: error: {says}"
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process analysis of ANALYZE (threads pinned to 1, as the ranks run)."""
    cache = tmp_path_factory.mktemp("one")
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = one_process([*ANALYZE, "--json"], cache, mp)
    finally:
        mp.undo()
    assert code == 0, err
    return cache


@pytest.mark.slow
def test_two_ranks_analyse_as_one_process(reference, tmp_path):
    cache = tmp_path / "two"
    procs = ranks([*ANALYZE, "--json"], cache)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    assert '"cache_entry"' in procs[0].stdout and procs[1].stdout == ""  # the main rank alone reports
    assert_same_analysis(reference, cache)
    _, meta = stored(cache)
    assert meta["ranks"] == 2
    from moescope.analysis.core.cache import Cache

    assert Cache(cache).entries("analysis-layer") == []  # the layer checkpoints went once the whole was stored


@pytest.mark.slow
def test_more_ranks_than_sequences_is_refused_on_every_rank(tmp_path):
    procs = ranks(["analyze", "demo", "--samples", "1", "--seq-len", "16"], tmp_path / "c")
    for p in procs:
        assert p.returncode == 2
        assert one_line(p.stderr) == ("moescope: error: 2 ranks but only 1 calibration sequences: use at most 1 "
                                      "ranks (--nproc / --nproc-per-node) or more calibration sequences")
    assert not list((tmp_path / "c").glob("analysis*/*"))


@pytest.mark.slow
def test_ranks_that_disagree_are_refused_before_any_work(tmp_path):
    procs = ranks(["analyze", "demo", "--samples", "4", "--seq-len", "16"], tmp_path / "c", per_rank={1: ["--seed", "1"]})
    for p in procs:
        assert p.returncode == 2
        assert one_line(p.stderr) == ("moescope: error: rank 1 of 2 differs from rank 0 in its data, params: every "
                                      "rank must load the same model and data with the same parameters")
    assert not list((tmp_path / "c").glob("analysis*/*"))


@pytest.mark.slow
def test_a_lost_rank_ends_the_others_in_one_line_and_the_rerun_continues(reference, tmp_path):
    cache = tmp_path / "c"
    procs = ranks(ANALYZE, cache, env_extra={"MOESCOPE_FAULT_AT": "progress:layers@1", "MOESCOPE_FAULT_RANK": "1"})
    assert procs[1].returncode == -9  # killed after its layer 0
    assert procs[0].returncode == 2
    line = one_line(procs[0].stderr)
    assert line.startswith("moescope: error: rank 0 of 2: lost contact with the other ranks while analysing "
                           "layer 1 (after ") and line.endswith("run the same command again to continue"), line
    # seen when its sockets closed, not after the collective timeout (MOESCOPE_DIST_TIMEOUT, 300 s)
    waited = int(line.split("(after ", 1)[1].split(" s;", 1)[0])
    assert waited < LOST_RANK_S, line
    from moescope.analysis.core.cache import Cache

    c = Cache(cache)
    assert c.entries("analysis") == []
    layers = c.entries("analysis-layer")
    assert len(layers) == 1 and all(c.get_by_key("analysis-layer", i.key) is not None for i in layers)
    # the same command continues after layer 0 and gives the uninterrupted result
    procs = ranks(ANALYZE, cache)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    assert "moescope: reused 1 finished layer(s) from the cache (layer 0)" in procs[0].stderr
    assert "reused" not in procs[1].stderr
    assert_same_analysis(reference, cache)


@pytest.mark.slow
def test_a_killed_analysis_continues_where_it_stopped(reference, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    env = {**os.environ, "MOESCOPE_CACHE": str(cache), "MOESCOPE_FAULT_AT": "progress:layers@1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moescope", *ANALYZE], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == -9, proc.stderr[-2000:]
    code, out, err = one_process(ANALYZE, cache, monkeypatch)
    assert code == 0
    assert "moescope: reused 1 finished layer(s) from the cache (layer 0); their decoder layers ran forward only" in err
    assert_same_analysis(reference, cache)


# ---------------------------------------------------------------- perplexity, drop grid, subset search

EVAL = ["eval", "demo", "--ppl", "demo:all", "--samples", "8", "--seq-len", "32", "--batch-size", "2",
        "--no-efficiency", "--json"]
GRID = ["grid", "demo", "--samples", "4", "--seq-len", "32", "--json"]


@pytest.mark.slow
def test_two_ranks_give_the_one_process_perplexity_to_the_last_bit(tmp_path, monkeypatch):
    import json

    code, out, err = one_process(EVAL, tmp_path / "one", monkeypatch)
    assert code == 0, err
    procs = ranks(EVAL, tmp_path / "two")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    one, two = json.loads(out), json.loads(procs[0].stdout)
    assert two["ppl"] == one["ppl"] and two["ppl_domains"] == one["ppl_domains"]  # float equality, every domain
    assert procs[1].stdout == ""
    from moescope.analysis.core.cache import Cache

    assert len(Cache(tmp_path / "two").entries("experiment")) == 1  # the main rank alone stored the record


@pytest.mark.slow
def test_tasks_and_speed_are_refused_under_torchrun(tmp_path):
    procs = ranks(["eval", "demo", "--ppl", "demo:all", "--samples", "4", "--seq-len", "16"], tmp_path / "c")
    for p in procs:
        assert p.returncode == 2
        assert one_line(p.stderr).startswith("moescope: error: under torchrun / --nproc, evaluation spreads the "
                                             "perplexity windows over the ranks; lm-eval tasks")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*/*"))


@pytest.mark.slow
def test_two_ranks_give_the_one_process_drop_grid_through_nproc(tmp_path, monkeypatch):
    """Through ``--nproc 2``: torchrun itself starts the ranks."""
    import json

    code, out, err = one_process(GRID, tmp_path / "one", monkeypatch)
    assert code == 0, err
    env = {**os.environ, "MOESCOPE_CACHE": str(tmp_path / "two"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moescope", *GRID, "--nproc", "2"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == json.loads(out)  # every cell and the baseline, to the last bit
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_killed_grid_continues_from_its_finished_rows(tmp_path, monkeypatch):
    import json

    code, out, err = one_process(GRID, tmp_path / "ref", monkeypatch)
    assert code == 0, err
    cache = tmp_path / "c"
    env = {**os.environ, "MOESCOPE_CACHE": str(cache), "MOESCOPE_FAULT_AT": "progress:cells@10",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moescope", *GRID], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed in row 1, row 0 (8 cells) finished
    from moescope.analysis.core.cache import Cache

    assert len(Cache(cache).entries("dropgrid-row")) == 1 and Cache(cache).entries("dropgrid") == []
    code, out2, err2 = one_process(GRID, cache, monkeypatch)
    assert code == 0
    assert "moescope: reused 1 finished grid row(s) from the cache (layers 0)" in err2
    assert json.loads(out2) == json.loads(out)
    assert Cache(cache).entries("dropgrid-row") == []


SUBSETS = """
import json, itertools, torch
from moescope.analysis.core import distributed
from moescope.analysis.measure.sensitivity import SubsetScorer, shared_losses
from moescope.analysis.model import load_moe
world = distributed.init()
model = load_moe("demo")
view = model.layers[1]
x = torch.randn(96, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
subsets = list(itertools.combinations(range(view.num_experts), 5))
losses = shared_losses(SubsetScorer(view, x, chunk_tokens=32), subsets)
if world.is_main:
    print(json.dumps([float(v) for v in losses]))
distributed.finish()
"""


@pytest.mark.slow
def test_two_ranks_score_their_shares_of_the_subsets_as_one_process(tmp_path):
    import json

    procs = ranks([], tmp_path / "c", code=SUBSETS)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    two = json.loads(procs[0].stdout)
    one = subprocess.run([sys.executable, "-c", SUBSETS], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    assert two == json.loads(one.stdout) and len(two) == 56  # C(8, 5), each loss to the last bit


# ---------------------------------------------------------------- data-parallel finetune (lottery)

LOTTERY = ["plan", "demo", "--strategy", "lottery", "--keep", "7", "--start-tokens", "256", "--batch", "2",
           "--samples", "4", "--seq-len", "32"]


@pytest.mark.slow
def test_two_ranks_finetune_the_lottery_as_one_process(tmp_path, monkeypatch):
    """Each step's rows split over the ranks, gradients summed: the same plan, the same losses and
    the same finetuned weights (to float32 rounding of the gradient sums: 1e-6 absolute)."""
    import json

    from moescope.analysis.core.cache import Cache

    code, _, err = one_process([*LOTTERY, "-o", str(tmp_path / "one.json")], tmp_path / "one", monkeypatch)
    assert code == 0, err
    procs = ranks([*LOTTERY, "-o", str(tmp_path / "two.json")], tmp_path / "two")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two["layers"] == one["layers"]
    for a, b in zip(one["provenance"]["rounds"], two["provenance"]["rounds"]):
        assert a["steps"] == b["steps"] and math.isclose(a["loss_last"], b["loss_last"], rel_tol=1e-6)

    def weights(cache):
        c = Cache(cache)
        (info,) = c.entries("lottery")
        return c.get_by_key("lottery", info.key).tensors()

    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_two_ranks_prune_evaluate_and_the_main_rank_alone_exports(tmp_path, monkeypatch):
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "base_model": "demo",
                                "layers": {"0": {"groups": [[0], [1], [2], [3], [4], [5], [6]]}}}))
    argv = ["prune", "demo", "--plan", str(plan), "--ppl", "demo:all", "--samples", "4", "--seq-len", "32",
            "--batch-size", "2", "--no-efficiency", "--json"]
    code, out, err = one_process([*argv, "-o", str(tmp_path / "one")], tmp_path / "c1", monkeypatch)
    assert code == 0, err
    procs = ranks([*argv, "-o", str(tmp_path / "two")], tmp_path / "c2")
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    one, two = json.loads(out), json.loads(procs[0].stdout)
    assert two["ppl"] == one["ppl"] and two["reference"]["ppl"] == one["reference"]["ppl"]
    assert (tmp_path / "two" / "config.json").is_file() and procs[1].stdout == ""
    from moescope.analysis.core.cache import Cache

    assert len(Cache(tmp_path / "c2").entries("experiment")) == 1


@pytest.mark.slow
def test_a_hung_rank_ends_the_others_after_the_collective_timeout(tmp_path):
    """Rank 1 freezes (SIGSTOP) after its layer 0: rank 0 waits MOESCOPE_DIST_TIMEOUT at its next
    collective, then ends in one line naming itself and the timeout, never hanging."""
    port = _free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "MOESCOPE_CACHE": str(tmp_path / "c"),
               "MOESCOPE_DIST_TIMEOUT": "30", "MOESCOPE_FAULT_AT": "progress:layers@1", "MOESCOPE_FAULT_RANK": "1",
               "MOESCOPE_FAULT_SIGNAL": "STOP"}
        procs.append(subprocess.Popen([sys.executable, "-m", "moescope", *ANALYZE], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=400)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 2
    line = one_line(err)
    assert line.startswith("moescope: error: rank 0 of 2: lost contact with the other ranks while ") and \
        "timeout 30 s" in line, line
    waited = int(line.split("(after ", 1)[1].split(" s;", 1)[0])
    assert waited >= 29, line  # it waited for the timeout: the frozen rank's sockets stayed open


@pytest.mark.slow
def test_a_rank_that_cannot_reach_the_others_ends_in_one_line(tmp_path):
    """Rank 0 of 2 alone (rank 1 never comes): it gives up after MOESCOPE_DIST_TIMEOUT, one line."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "MOESCOPE_CACHE": str(tmp_path / "c"), "MOESCOPE_DIST_TIMEOUT": "5"}
    proc = subprocess.run([sys.executable, "-m", "moescope", *ANALYZE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"moescope: error: rank 0 of 2: could not join the process group at 127.0.0.1:"
                           f"{env['MASTER_PORT']} within 5 s: "), line
    assert not (tmp_path / "c").exists()
