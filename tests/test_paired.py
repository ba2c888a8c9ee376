"""Paired verdicts (analysis/evaluation/paired.py, analysis/run/verdicts.py) on constructed windows and
documents: where the models' own intervals overlap the paired comparison decides, and where the
per-window differences straddle zero it says within noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.evaluation import paired as P
from moescope.analysis.evaluation.uncertainty import perplexity_interval, stderr_interval
from moescope.analysis.run import experiments as X
from moescope.analysis.run import verdicts as V
from moescope.analysis.run.report import between_text, compare_text


def windows(per_token: list[float], tokens: int = 100) -> tuple[list[float], list[int]]:
    return [x * tokens for x in per_token], [tokens] * len(per_token)


def test_a_constant_shift_is_decisive_paired_though_the_unpaired_intervals_overlap():
    # 48 windows of very different difficulty (1.5 to 4.5 nats per token); B loses 0.05 nats per token
    # more on every window (±0.01): unpaired, each model's per-window interval is ≈ ±0.25 wide
    rng = np.random.default_rng(1)
    a_tok = list(np.linspace(1.5, 4.5, 48))
    b_tok = [x + 0.05 + 0.01 * float(rng.uniform(-1, 1)) for x in a_tok]
    a, c = windows(a_tok)
    b, _ = windows(b_tok)
    ia, ib = perplexity_interval(a, c), perplexity_interval(b, c)
    assert ia.overlaps(ib)  # the old overlap check: "within noise"
    p = P.perplexity_ratio(a, b, c)
    # the ratio is exp(Σb/Σc − Σa/Σc) (module docstring), and every draw stays above 1
    assert p.value == pytest.approx(math.exp((sum(b) - sum(a)) / sum(c)))
    assert 1.0 < p.low <= p.value <= p.high < 1.07
    assert p.verdict("lower") == "worse" and (p.higher, p.lower, p.n) == (48, 0, 48)
    # seeded: the same losses give the same range
    assert P.perplexity_ratio(a, b, c) == p
    # a constant shift has no spread at all: the range is the point
    exact = P.perplexity_ratio(a, [x + 5.0 for x in a], c)
    assert exact.low == pytest.approx(math.exp(0.05)) == exact.high


def test_differences_that_straddle_zero_are_within_noise():
    # B is 0.2 nats per token better on half the windows and 0.2 worse on the other half: no change
    a_tok = list(np.linspace(2.0, 2.5, 20))
    b_tok = [x + (0.2 if i % 2 else -0.2) for i, x in enumerate(a_tok)]
    a, c = windows(a_tok)
    b, _ = windows(b_tok)
    p = P.perplexity_ratio(a, b, c)
    assert p.value == pytest.approx(1.0)
    assert p.low < 1.0 < p.high and p.verdict("lower") == "within noise"
    # identical losses: the point of no change itself, within noise
    same = P.perplexity_ratio(a, a, c)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0) and same.verdict("lower") == "within noise"


def test_the_bootstrap_range_of_two_windows_lies_among_its_four_possible_draws():
    # windows with 10 tokens each, differences (b − a) of +1 and +3 nats: a draw picks (i, j) with
    # replacement; its ratio is exp((d_i + d_j) / 20) ∈ {exp(0.1), exp(0.2), exp(0.3)}
    p = P.perplexity_ratio([10.0, 10.0], [11.0, 13.0], [10, 10])
    assert p.value == pytest.approx(math.exp(0.2))
    assert p.low == pytest.approx(math.exp(0.1)) and p.high == pytest.approx(math.exp(0.3))


def test_accuracy_differences_are_paired_per_document():
    # 100 documents, A right on 50; B right on the same 50 and on 8 more: acc 0.50 vs 0.58.
    # lm-eval's standard errors (sd/√n ≈ 0.05) give overlapping ranges; paired, B never loses a document
    a = [1.0] * 50 + [0.0] * 50
    b = [1.0] * 58 + [0.0] * 42
    se = lambda v: math.sqrt(np.var(v, ddof=1) / len(v))  # noqa: E731
    assert stderr_interval(0.5, se(a)).overlaps(stderr_interval(0.58, se(b)))
    p = P.score_difference("acc", a, b)
    assert p.value == pytest.approx(0.08) and p.low > 0 and p.verdict("higher") == "better"
    assert (p.higher, p.lower) == (8, 0)
    # the same swap the other way round on half of them: B gains 4, loses 4: within noise
    c = [1.0] * 46 + [0.0] * 4 + [1.0] * 4 + [0.0] * 46
    assert P.score_difference("acc", a, c).verdict("higher") == "within noise"


def test_perplexity_like_task_scores_aggregate_as_lm_eval_does():
    # (log-likelihood, words) per document: word_perplexity = exp(−Σ ll / Σ words)
    a = [[-20.0, 10], [-30.0, 10]]
    b = [[-22.0, 10], [-33.0, 10]]
    p = P.score_difference("word_perplexity", a, b)
    assert p.value == pytest.approx(math.exp(55 / 20) - math.exp(50 / 20))
    assert p.verdict("lower") == "worse"
    bpb = P.score_difference("bits_per_byte", a, b)
    assert bpb.value == pytest.approx((55 - 50) / (20 * math.log(2)))
    assert P.supported("acc", [1.0, 0.0]) and P.supported("word_perplexity", [[-1.0, 2]])
    assert not P.supported("word_perplexity", [1.0]) and not P.supported("bleu", [])


# ---- experiments: verdicts against the original and between experiments ------------------------
SPEC = {"ppl": ["demo:all"], "samples": 48, "seq_len": 256}


def quality(per_token: list[float], acc: list[float] | None = None) -> dict:
    nll, tokens = windows(per_token)
    q = {"ppl": {"demo:all": math.exp(sum(nll) / sum(tokens))},
         "ppl_windows": {"demo:all": {"nll": nll, "tokens": tokens, "domains": ["d"] * len(nll)}},
         "tasks": {}, "task_docs": {}}
    if acc is not None:
        q["tasks"] = {"t": {"acc": float(np.mean(acc))}}
        q["task_docs"] = {"t": {"acc": acc}}
    return q


def experiment(ident: str, ref: dict, result: dict, spec: dict = SPEC, fp: str = "m") -> X.Experiment:
    return X.Experiment(id=ident, created="", label=f"plan {ident}", model="demo", model_fingerprint=fp,
                        pruned_fingerprint=ident, plan={"layers": {}}, eval=spec, reference=ref, result=result)


BASE = list(np.linspace(1.5, 4.5, 48))


def test_compare_marks_paired_verdicts_and_the_best_beyond_every_rival():
    ref = quality(BASE)
    small = experiment("e1", ref, quality([x + 0.05 for x in BASE]))  # +5 %: the old check called it noise
    large = experiment("e2", ref, quality([x + 0.25 for x in BASE]))
    same = experiment("e3", ref, quality([x + (0.2 if i % 2 else -0.2) for i, x in enumerate(BASE)]))
    table = X.compare([small, large, same]).set_index("experiment").loc[["original", "e1", "e2", "e3"]].reset_index()
    assert list(table["ppl demo:all verdict"])[1:] == ["worse", "worse", "within noise"]
    assert table.loc[1, "ppl demo:all vs original"].startswith("×1.051 [")
    assert X.noise_marks(table, "ppl demo:all") == {3}
    # e3 has the lowest perplexity, but against e1 its per-window differences (−0.25 or +0.15 nats per
    # token) straddle no change: no best
    assert V.paired(small.result, same.result, "ppl demo:all").verdict("lower") == "within noise"
    assert X.best_marks(table, "ppl demo:all", "lower") == set()
    # without e3, e1 is better than e2 on every window: the best beyond every rival's paired range
    two = X.compare([large, small])
    assert X.best_marks(two, "ppl demo:all", "lower") == {1} and two["experiment"].iloc[1] == "e1"
    assert V.best_of({"e1": small.result, "e2": large.result}, "ppl demo:all") == "e1"
    text = compare_text(table)
    assert "plan e1: ppl demo:all worse ×1.051" in text and "plan e3: ppl demo:all within noise" in text
    assert "different settings" not in text
    # two experiments of one setting: the second against the first, paired
    lines = between_text(small, large).splitlines()
    assert lines[0] == "plan e2 (e2) against plan e1 (e1), paired on the same windows / documents:"
    assert lines[1].startswith("  ppl demo:all: worse: ×1.221 [") and "(loss higher in 48, lower in 0)" in lines[1]


def test_a_peak_memory_ratio_without_uncertainty_is_never_best():
    import pandas as pd

    t = pd.DataFrame([{"experiment": "original", "name": "o", "group": 0, "peak memory ratio": 1.0,
                       "params ratio": 1.0},
                      {"experiment": "e1", "name": "one", "group": 0, "peak memory ratio": 0.9939, "params ratio": 0.8},
                      {"experiment": "e2", "name": "two", "group": 0, "peak memory ratio": 0.9982, "params ratio": 0.9}])
    assert X.best_marks(t, "peak memory ratio", "lower") == set()
    assert X.best_marks(t, "params ratio", "lower") == {1}  # an exact count: the smallest is the smallest


def test_experiments_of_different_settings_pair_nothing():
    ref = quality(BASE)
    a = experiment("e1", ref, quality([x + 0.05 for x in BASE]))
    other = quality(BASE[:24])
    b = experiment("e2", other, quality([x + 0.05 for x in BASE[:24]]), spec={**SPEC, "samples": 24})
    with pytest.raises(MoescopeError, match="different settings .* nothing pairs, so each is shown against its own"):
        X.between(a, b)
    table = X.compare([a, b])
    assert list(table["group"]) == [0, 0, 1, 1]
    assert list(table["ppl demo:all verdict"].iloc[[1, 3]]) == ["worse", "worse"]  # each against its own original
    assert compare_text(table).splitlines()[0].startswith("these experiments were measured on different settings: "
                                                          "nothing pairs across them")
    # a record without stored per-window losses (an older experiment) gets no verdict at all
    old = experiment("e4", {"ppl": ref["ppl"]}, {"ppl": {"demo:all": 20.0}})
    t = X.compare([a, old])
    assert t.set_index("experiment").loc["e4", "ppl demo:all verdict"] == V.NO_PAIRING
    assert X.noise_marks(t, "ppl demo:all") == set() and X.best_marks(t, "ppl demo:all", "lower") == set()


def test_task_verdicts_in_a_comparison_are_paired_per_document():
    acc_ref = [1.0] * 50 + [0.0] * 50
    ref = quality(BASE, acc_ref)
    up = experiment("e1", ref, quality(BASE, [1.0] * 58 + [0.0] * 42))
    table = X.compare([up])
    assert table["task: t acc verdict"].iloc[1] == "better"
    assert table["task: t acc vs original"].iloc[1].startswith("+0.08 [")
    assert table["ppl demo:all verdict"].iloc[1] == "within noise"  # the same losses: no change


def test_an_experiment_stores_what_pairs_and_lm_eval_stays_quiet(demo_dir, tmp_path, monkeypatch, capfd):
    """On the demo: the stored per-window losses reproduce the stored perplexity, the per-document
    accuracies lm-eval's score, and an evaluation run outside a git checkout prints no git error."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import EvalSpec
    from moescope.analysis.pruning.plan import PruningPlan

    monkeypatch.chdir(tmp_path)  # not a git checkout
    cache = Cache(tmp_path / "cache")
    spec = EvalSpec(ppl=["demo:all"], samples=6, seq_len=64, tasks=["moescope_demo_continuation"], limit=8,
                    efficiency=False)
    keep = {l: [0, 1, 2, 3] for l in range(4)}
    plan = PruningPlan.from_keep("demo", keep, provenance={"strategy": "by hand", "params": {}})
    exp = X.run_experiment("demo", plan, spec, cache=cache)
    assert "not a git repository" not in capfd.readouterr().err
    for q in (exp.reference, exp.result):
        w = q["ppl_windows"]["demo:all"]
        assert len(w["nll"]) == 6 and math.exp(sum(w["nll"]) / sum(w["tokens"])) == pytest.approx(q["ppl"]["demo:all"])
        docs = q["task_docs"]["moescope_demo_continuation"]
        assert len(docs["acc"]) == 8 and np.mean(docs["acc"]) == pytest.approx(q["tasks"]["moescope_demo_continuation"]["acc"])
    stored = X.load(exp.id, cache)
    p, verdict = V.against(stored.reference, stored.result, "ppl demo:all")
    assert p.n == 6 and p.value == pytest.approx(exp.result["ppl"]["demo:all"] / exp.reference["ppl"]["demo:all"])
    assert verdict in ("worse", "better", "within noise")
    row = X.compare([stored]).iloc[1]
    assert row["ppl demo:all verdict"] == verdict
    assert row["task: moescope_demo_continuation acc verdict"] in ("worse", "better", "within noise")
