"""The verdicts a person reads — better, worse, within noise, best — from paired comparisons of
experiments measured on the same windows and documents (:mod:`~moescope.analysis.evaluation.paired`).

A quality column of a comparison is ``ppl <source>`` (perplexity, paired per window) or
``task: <task> <metric>`` (an lm-eval score, paired per document). Two quality records pair only
where both carry the per-window losses (per-document values) of the same windows (documents):
experiments of one evaluation setting of one model. Every verdict of the CLI, the dashboard and
the model card is one of :func:`against` (B against A) or :func:`best_of` (the one better than
every rival beyond the paired range).
"""

from __future__ import annotations

from moescope.analysis.evaluation.paired import BETTER, WITHIN, Paired, perplexity_ratio, score_difference

HIGHER_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mc1", "mc2")
NO_PAIRING = "no paired data"


def direction(column: str) -> str | None:
    """The better end of a quality column: "lower" for perplexities and perplexity-like scores,
    "higher" for accuracies; None for anything else."""
    if column.startswith("ppl "):
        return "lower"
    if column.startswith("task: "):
        return "higher" if column.split(" ")[-1] in HIGHER_METRICS else "lower"
    return None


def quality_columns(quality: dict) -> list[str]:
    """The quality columns a record has a value for (in the order of its sources and tasks)."""
    cols = [f"ppl {src}" for src in quality.get("ppl", {})]
    for task, metrics in quality.get("tasks", {}).items():
        cols += [f"task: {task} {m}" for m in metrics if not m.endswith("_stderr") and m != "samples"]
    return cols


def _task_metric(column: str, quality: dict) -> tuple[str, str] | None:
    rest = column[len("task: "):]
    for task in quality.get("tasks", {}):
        if rest.startswith(task + " "):
            return task, rest[len(task) + 1:]
    return None


def paired(a: dict, b: dict, column: str) -> Paired | None:
    """Quality record ``b`` against ``a`` in ``column`` (a ratio B ÷ A for a perplexity, a difference
    B − A for a task score), or None where the two cannot be paired (no stored per-window losses or
    per-document values, or not the same windows / documents)."""
    if column.startswith("ppl "):
        src = column[4:]
        wa, wb = (q.get("ppl_windows", {}).get(src) for q in (a, b))
        if not wa or not wb or wa.get("tokens") != wb.get("tokens") or wa.get("domains") != wb.get("domains"):
            return None
        return perplexity_ratio(wa["nll"], wb["nll"], wa["tokens"])
    if column.startswith("task: "):
        found = _task_metric(column, a)
        if found is None:
            return None
        task, metric = found
        da, db = ((q.get("task_docs", {}).get(task) or {}).get(metric) for q in (a, b))
        if not da or not db or len(da) != len(db):
            return None
        return score_difference(metric, da, db)
    return None


def against(a: dict, b: dict, column: str) -> tuple[Paired | None, str]:
    """``(paired range, verdict)`` of quality record ``b`` against ``a`` in ``column``: better /
    worse / within noise, or :data:`NO_PAIRING` where the records cannot be paired."""
    p = paired(a, b, column)
    if p is None:
        return None, NO_PAIRING
    return p, p.verdict(direction(column))


def best_of(qualities: dict[str, dict], column: str) -> str | None:
    """The key of ``qualities`` (experiment id → quality record, all of one setting) whose ``column``
    is better than every other's beyond the paired range (each paired verdict against each rival is
    *better*); None with fewer than two, where any pair cannot be paired, or where the leader is
    within noise of a rival."""
    side = direction(column)
    have = {k: q for k, q in qualities.items() if _value(q, column) is not None}
    if side is None or len(have) < 2:
        return None
    sign = 1 if side == "lower" else -1
    leader = min(have, key=lambda k: sign * _value(have[k], column))
    for k, q in have.items():
        if k == leader:
            continue
        _, verdict = against(q, have[leader], column)
        if verdict != BETTER:
            return None
    return leader


def _value(quality: dict, column: str) -> float | None:
    if column.startswith("ppl "):
        return quality.get("ppl", {}).get(column[4:])
    found = _task_metric(column, quality) if column.startswith("task: ") else None
    if found is None:
        return None
    v = quality["tasks"][found[0]].get(found[1])
    return v if isinstance(v, int | float) else None


def verdict_text(p: Paired | None, verdict: str, column: str) -> str:
    """``worse: ×1.204 [1.16–1.25] paired over 48 windows (higher in 48)`` — one verdict as the
    CLI, the dashboard and the model card print it."""
    if p is None:
        return verdict
    items = "windows" if column.startswith("ppl ") else "documents"
    what = "loss" if column.startswith("ppl ") else "score"
    return (f"{verdict}: {p.text()} paired over {p.n} {items} ({what} higher in {p.higher}, lower in {p.lower})")


__all__ = ["HIGHER_METRICS", "NO_PAIRING", "WITHIN", "against", "best_of", "direction", "paired", "quality_columns",
           "verdict_text"]
