"""How the ``moescope`` commands print: the model facts, progress bars, experiment results."""

from __future__ import annotations

import sys

from moescope.analysis.core.units import format_bytes, format_count


def format_ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def format_info(info: dict) -> str:
    counts = sorted(set(info["num_experts"].values()))
    experts = (
        f"{counts[0]} per MoE layer"
        if len(counts) == 1
        else ", ".join(f"layer {k}: {v}" for k, v in info["num_experts"].items())
    )
    p = info["params"]
    shared = (
        ", ".join(
            f"layer {s['layer']}: {format_count(s['params'])} params{' (sigmoid-gated)' if s['gated'] else ''}"
            for s in info["shared_experts"]
        )
        or "none"
    )
    lines = [
        f"{info['source']}  ({info['family']}, {', '.join(info['architectures']) or info['model_type']})",
        f"decoder layers   {info['num_hidden_layers']} (MoE: {format_ranges(info['moe_layers'])}; dense: "
        f"{format_ranges(info['dense_layers'])})",
        f"routed experts   {experts}, top-{info['top_k']}",
        f"routing          {info['routing']}"
        + (f" ({info['routing_groups']} routing groups)" if info.get("routing_groups") else ""),
        f"shared experts   {shared}",
        f"parameters       total {format_count(p['total'])} · routed experts {format_count(p['experts'])} "
        f"({100 * p['experts'] / p['total']:.1f}%) · active per token {format_count(p['active'])}",
        "weights          " + ", ".join(f"{k} {format_bytes(v)}" for k, v in info["bytes"].items()),
    ]
    ckpt = info.get("checkpoint")
    if ckpt:  # what the files hold (a quantized checkpoint is not its config's dtype)
        if ckpt["quantization"]:
            lines[-1] = f"quantization     {ckpt['quantization']}"
        lines.append(f"files            {format_bytes(ckpt['bytes'])}: " + ", ".join(
            f"{kind} ({'/'.join(e['dtypes'])}) {format_bytes(e['bytes'])}" for kind, e in ckpt["tensors"].items()))
    return "\n".join(lines)


class ProgressBars:
    """tqdm bars keyed by stage, fed by the library's ``progress(stage, done, total)`` callback.

    Bars are drawn only on a terminal: redirected stderr gets no carriage returns or cursor
    escapes, so an error line that follows is a clean line of its own. Every stage also raises
    the audit event ``moescope.progress`` (what ``cli._fault_hook`` listens to)."""

    live: list[ProgressBars] = []  # open bar sets, closed by cli.main() before it prints an error

    def __init__(self, quiet: bool = False):
        self.bars: dict = {}
        from moescope.analysis.core.distributed import current

        # under torchrun only the main rank draws (the others' bars would overwrite each other)
        self.quiet = quiet or not sys.stderr.isatty() or not current().is_main
        ProgressBars.live.append(self)

    def __call__(self, stage: str, done: int, total: int) -> None:
        sys.audit("moescope.progress", stage, done, total)
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        bar.update(done - bar.n)  # redrawn at most every tqdm mininterval (a streamed export calls this per tensor)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        if self in ProgressBars.live:
            ProgressBars.live.remove(self)

    @classmethod
    def close_all(cls) -> None:
        for bars in list(cls.live):
            bars.close()


def experiment_json(exp) -> dict:
    return {"experiment": exp.id, "label": exp.label, "model": exp.model,
            "ppl": exp.result["ppl"], "ppl_domains": exp.result["ppl_domains"], "tasks": exp.result["tasks"],
            "reference": {"ppl": exp.reference["ppl"], "tasks": exp.reference["tasks"]},
            "efficiency": exp.efficiency, "structure": exp.structure, "timings": exp.timings}


def _interval(quality: dict, src: str) -> str:
    domains = (quality.get("ppl_interval") or {}).get(src) or {}
    iv = domains.get("all") or (next(iter(domains.values())) if len(domains) == 1 else None)
    return f" [95% {iv[0]:.3f}–{iv[1]:.3f}]" if iv else ""


def print_quality(exp) -> None:
    """The experiment's numbers as the dashboard states them: each with its uncertainty (the
    per-window interval of a perplexity, lm-eval's standard error of a score), and every speed of
    a pruned model with its verdict (the change with the repeats' range, or within noise and why)."""
    from moescope.analysis.evaluation.efficiency import BUSY_CORES, speed_verdict
    from moescope.analysis.run.experiments import setting_name, speed_text
    from moescope.analysis.run.verdicts import against, verdict_text

    print(f"evaluated on: {setting_name(exp.eval)}")
    for src, value in exp.result["ppl"].items():
        ref = exp.reference["ppl"][src]
        change = (f" (original {ref:.3f}{_interval(exp.reference, src)}, {100 * (value / ref - 1):+.1f}%)"
                  if exp.plan else "")
        print(f"perplexity {src}: {value:.3f}{_interval(exp.result, src)}{change}")
        if exp.plan:
            print(f"    against the original: {verdict_text(*against(exp.reference, exp.result, f'ppl {src}'), f'ppl {src}')}")
        domains = {d: v for d, v in exp.result["ppl_domains"][src].items() if d != "all"}
        if len(domains) > 1:
            print("    " + ", ".join(f"{d} {v:.2f}" for d, v in domains.items()))
    for task, metrics in exp.result["tasks"].items():
        shown = {k: v for k, v in metrics.items() if not k.endswith("_stderr") and k != "samples"}
        print(f"{task}: " + ", ".join(
            f"{k} {v:.4g}" + (f" ± {metrics[k + '_stderr']:.2g}" if isinstance(metrics.get(k + "_stderr"), float) else "")
            for k, v in shown.items()) + (" (± lm-eval's standard error)" if any(k.endswith("_stderr") for k in metrics)
                                          else ""))
        if exp.plan:
            for k in shown:
                column = f"task: {task} {k}"
                print(f"    {k} against the original: {verdict_text(*against(exp.reference, exp.result, column), column)}")
    ref_plain = ((exp.efficiency.get("original") or {}).get("plain")) or {}
    for variant, eff in exp.efficiency.items():
        if variant == "pruned" and not exp.plan:
            continue
        plain, skip = eff["plain"], eff.get("skip")
        line = (f"{variant}: {plain['params_total']:,} params ({plain['params_active']:,} active), "
                f"{format_bytes(plain['weight_bytes'])} weights, peak {format_bytes(plain['peak_memory_bytes'] or 0)}, "
                f"prefill {plain['prefill_tokens_per_s']:.0f} tok/s, generate {plain['generate_tokens_per_s']:.1f} tok/s")
        if skip:
            line += f"; with skipping {skip['generate_tokens_per_s']:.1f} tok/s ({100 * skip['skipped_fraction']:.1f}% calls skipped)"
        busy = plain.get("busy_cores") or 0.0
        if busy >= BUSY_CORES:
            line += f" (measured while other processes kept {busy:.1f} cores busy)"
        print(line)
        if variant == "pruned":
            verdicts = [f"{what} {speed_text(speed_verdict(plain, ref_plain, key)) or 'no figure'}"
                        for what, key in (("prefill", "prefill_tokens_per_s"), ("generate", "generate_tokens_per_s"))]
            if skip:
                verdicts.append("generate with skipping "
                                + (speed_text(speed_verdict(skip, ref_plain, "generate_tokens_per_s")) or "no figure"))
            print("speed against the original: " + "; ".join(verdicts))


def _better(column: str) -> str | None:
    from moescope.analysis.run.experiments import DERIVED_SUFFIXES
    from moescope.analysis.run.verdicts import direction

    if column.endswith(DERIVED_SUFFIXES):
        return None
    if column in ("params ratio", "weight bytes ratio", "peak memory ratio"):
        return "lower"
    if "speed ratio" in column:
        return "higher"
    return direction(column)


def verdict_lines(table, pos: list[int]) -> list[str]:
    """One line per experiment of a block (rows ``pos`` of a comparison): each quality column's
    paired verdict against the original, with the paired change and its range."""
    lines = []
    cols = [c for c in table.columns if c.endswith(" verdict")]
    for i in pos:
        row = table.iloc[i]
        if row["experiment"] == "original":
            continue
        parts = []
        for c in cols:
            verdict = row.get(c)
            if not isinstance(verdict, str):  # no verdict in this column (NaN: the column is another row's)
                continue
            column = c[: -len(" verdict")]
            change = row.get(f"{column} vs original") or ""
            parts.append(f"{column} {verdict}" + (f" {change}" if change else ""))
        if parts:
            lines.append(f"  {row['name']}: " + "; ".join(parts))
    return lines


def compare_text(table) -> str:
    """A comparison (:func:`~moescope.analysis.run.experiments.compare`) as text: one block per
    evaluation setting, headed by its original, the experiments measured against it below, best
    headline first, only the columns the setting has. Values carry their 95 % range; ``*`` marks the
    best of a column only where it is better than every rival beyond the paired range, ``~`` a value
    within noise of the original (its paired range covers no change). Under each block, every
    experiment's paired verdicts against the original. Blocks of different settings pair nothing:
    a line says so."""
    import math

    import pandas as pd
    from moescope.analysis.run.experiments import best_marks, noise_marks

    value_cols = [c for c in table.columns if _better(c)]
    marks = {c: (best_marks(table, c, _better(c)), noise_marks(table, c)) for c in value_cols}
    blocks = []
    for g in table["group"].unique():
        pos = [i for i in range(len(table)) if table["group"].iloc[i] == g]
        rows = {}
        for i in pos:
            row = table.iloc[i]
            cells = {}
            for c in ["experts kept"] + value_cols + ["prefill speed", "generate speed"]:
                v = row.get(c)
                if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
                    cells[c] = ""
                    continue
                if isinstance(v, str):
                    cells[c] = v
                    continue
                text = f"{v:.4g}"
                low, high = row.get(f"{c} low"), row.get(f"{c} high")
                if isinstance(low, float) and isinstance(high, float) and not (math.isnan(low) or math.isnan(high)):
                    text += f" [{low:.4g}–{high:.4g}]"
                if c in marks:
                    best, noise = marks[c]
                    text += " *" if i in best else " ~" if i in noise else ""
                cells[c] = text
            rows["original" if row["experiment"] == "original" else f"{row['name']} ({row['experiment']})"] = cells
        frame = pd.DataFrame(rows)
        frame = frame.loc[[c for c in frame.index if (frame.loc[c] != "").any()]]
        verdicts = verdict_lines(table, pos)
        blocks.append(f"measured against: {table['name'].iloc[pos[0]]}\n" + frame.to_string()
                      + ("\npaired against the original:\n" + "\n".join(verdicts) if verdicts else ""))
    legend = ("[low–high]: 95% range of the value itself (perplexity: per-window; lm-eval: ±1.96 standard errors; "
              "speed: the repeats). Verdicts are paired on the same windows / documents (paired bootstrap, "
              "95 %: ×ratio of perplexities, +difference of scores). "
              "*: best beyond every rival's paired range; ~: within noise of the original (the paired range "
              "covers no change).")
    head = ("these experiments were measured on different settings: nothing pairs across them, so each is shown "
            "against its own original\n\n" if table["group"].nunique() > 1 else "")
    return head + "\n\n".join(blocks) + "\n\n" + legend


def between_text(a, b) -> str:
    """Experiment ``b`` against experiment ``a`` (one setting): one line per quality column with the
    paired verdict and range (:func:`~moescope.analysis.run.experiments.between`)."""
    from moescope.analysis.run.experiments import between
    from moescope.analysis.run.verdicts import verdict_text

    lines = [f"{b.label} ({b.id}) against {a.label} ({a.id}), paired on the same windows / documents:"]
    for column, p, verdict in between(a, b):
        lines.append(f"  {column}: {verdict_text(p, verdict, column)}")
    return "\n".join(lines)
