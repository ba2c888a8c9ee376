"""``moescope`` command line: parse, validate, make one library call, print.

Every user mistake surfaces as a :class:`~analysis.errors.MoescopeError` and is printed as one
line (``moescope: error: ...``, exit status 2); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from moescope.analysis.errors import MoescopeError


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _ranges(xs: list[int]) -> str:
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
            f"layer {s['layer']}: {_human(s['params'])} params{' (sigmoid-gated)' if s['gated'] else ''}"
            for s in info["shared_experts"]
        )
        or "none"
    )
    lines = [
        f"{info['source']}  ({info['family']}, {', '.join(info['architectures']) or info['model_type']})",
        f"decoder layers   {info['num_hidden_layers']} (MoE: {_ranges(info['moe_layers'])}; dense: "
        f"{_ranges(info['dense_layers'])})",
        f"routed experts   {experts}, top-{info['top_k']}",
        f"routing          {info['routing']}"
        + (f" ({info['routing_groups']} routing groups)" if info.get("routing_groups") else ""),
        f"shared experts   {shared}",
        f"parameters       total {_human(p['total'])} · routed experts {_human(p['experts'])} "
        f"({100 * p['experts'] / p['total']:.1f}%) · active per token {_human(p['active'])}",
        "weights          " + ", ".join(f"{k} {_bytes(v)}" for k, v in info["bytes"].items()),
    ]
    return "\n".join(lines)


def cmd_info(args) -> int:
    from moescope.analysis.models import load_moe

    model = load_moe(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code, weights=False)
    info = model.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_dashboard(args) -> int:
    """Start the Streamlit dashboard (bound to localhost unless --address says otherwise)."""
    import os
    from pathlib import Path

    from moescope.analysis.models import REPO_ROOT

    # "demo" names the shipped model even where a demo/ folder sits in the working directory
    model = str(Path(args.model).resolve()) if args.model != "demo" and Path(args.model).exists() else args.model
    app = REPO_ROOT / "dashboard" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--", "--model", model]
    os.chdir(REPO_ROOT)  # so .streamlit/config.toml (theme, localhost binding) applies
    os.execv(sys.executable, cmd)
    return 0


class _Bars:
    """tqdm bars keyed by stage, fed by the library's ``progress(stage, done, total)`` callback."""

    def __init__(self, quiet: bool = False):
        self.bars: dict = {}
        self.quiet = quiet

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _tokenizer_for(model, tokenizer_arg: str | None):
    if tokenizer_arg:
        from transformers import AutoTokenizer

        from moescope.analysis.models import demo_model_dir

        location = str(demo_model_dir()) if tokenizer_arg in ("demo", "demo-upcycled") else tokenizer_arg
        try:
            return AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as err:
            raise MoescopeError(f"cannot load a tokenizer from '{tokenizer_arg}': {str(err).splitlines()[0]}") from None
    if model.tokenizer is None:
        raise MoescopeError(
            f"'{model.source}' has no tokenizer files; pass --tokenizer FOLDER (a folder or hub id with the same vocabulary)"
        )
    return model.tokenizer


def cmd_analyze(args) -> int:
    from moescope.analysis.analyze import AnalysisParams, run_analysis
    from moescope.analysis.cache import Cache
    from moescope.analysis.data import parse_source, sample_tokens
    from moescope.analysis.models import load_moe

    parse_source(args.calib)  # validate before loading anything heavy
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.offload and metrics == ("all",):
        from moescope.analysis.analyze import FORWARD_METRICS

        metrics = FORWARD_METRICS
        print("moescope: note: --offload analyses everything but the gradient criteria (they need the whole "
              "model in memory)", file=sys.stderr)
    params = AnalysisParams(
        metrics=metrics,
        similarity_tokens=args.similarity_tokens, augment_ratio=args.augment, seed=args.seed,
    )
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                     offload_dir=args.offload)
    batch = sample_tokens(args.calib, _tokenizer_for(model, args.tokenizer), args.samples, args.seq_len,
                          seed=args.seed, sampling=args.sampling, split="validation")
    bars = _Bars(quiet=args.json)
    try:
        result = run_analysis(model, batch, params, cache=Cache(), progress=bars)
    finally:
        bars.close()
    exported = result.export(args.export) if args.export else {}
    summary = result.summary()
    if args.json:
        print(json.dumps({
            "model": model.source, "model_fingerprint": result.meta["model"], "data": result.meta["data"],
            "cache_entry": str(result.entry.path), "exported": exported,
            "similarity": result.similarity_names(), "criteria": result.criteria_names(),
            "elapsed_s": result.meta.get("elapsed_s"), "layers": summary,
        }, indent=2))
        return 0
    print(f"{model.source}: {result.meta['data']}")
    print(f"cache entry: {result.entry.path}")
    for layer, row in summary.items():
        pair = row.get("most_similar_pair")
        least = row["least_used_expert"]
        pair_txt = (f"most similar {pair['experts'][0]}–{pair['experts'][1]} ({pair['metric']} {pair['value']:.3f})"
                    if pair else "")
        print(f"layer {layer:>3}: {pair_txt}; least used {least['expert']} ({100 * least['usage']:.1f}% of tokens); "
              f"β {row['beta']:.3f}; balance {row['balance_entropy']:.3f}")
    for path in exported.values():
        print(f"wrote {path}")
    return 0


def cmd_cache(args) -> int:
    from moescope.analysis.cache import Cache, format_entries

    cache = Cache()
    if args.cache_command == "ls":
        entries = cache.entries(kind=args.kind, model=args.model)
        if args.json:
            print(json.dumps([{"kind": e.kind, "label": e.label, "key": e.key, "path": str(e.path),
                               "created": e.created, "size": e.size, "model_source": e.model_source,
                               "data": e.data} for e in entries], indent=2))
        else:
            print(format_entries(entries) if entries else f"no cache entries under {cache.root}")
        return 0
    n = cache.clear(kind=args.kind, model=args.model)
    print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {cache.root}")
    return 0


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_drop(text: str) -> dict[str, list[int]]:
    """``"0:1,3;2:5"`` → {"0": [1, 3], "2": [5]}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer, _, experts = part.partition(":")
        try:
            out[str(int(layer))] = [int(e) for e in experts.split(",") if e.strip()]
        except ValueError:
            raise MoescopeError(f"--drop expects LAYER:E,E;LAYER:E (e.g. 0:1,3;2:5), got {text!r}") from None
    return out


def _strategy_params(args) -> dict:
    params = {}
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoescopeError(f"--param expects KEY=VALUE, got {item!r}")
        params[key.replace("-", "_")] = _parse_value(value)
    for name in ("keep", "budget", "criterion", "order", "mode", "method", "representation", "similarity",
                 "grouping", "merge", "align", "density", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    if args.no_merge_router:
        params["merge_router"] = False
    if args.drop:
        params["drop"] = _parse_drop(args.drop)
    if args.groups:
        params["groups"] = _parse_value(args.groups)
    return params


def _calib_batch(args, model, split="validation"):
    from moescope.analysis.data import sample_tokens

    return sample_tokens(args.calib if split == "validation" else args.eval, _tokenizer_for(model, args.tokenizer),
                         args.samples, args.seq_len, seed=args.seed or 0, sampling=args.sampling, split=split)


def cmd_plan(args) -> int:
    from moescope.analysis.cache import Cache
    from moescope.analysis.data import parse_source
    from moescope.analysis.models import load_moe
    from moescope.analysis.strategies import STRATEGIES, StrategyContext, make_plan

    if args.strategy not in STRATEGIES:
        from moescope.analysis.errors import unknown_name

        raise unknown_name("strategy", args.strategy, STRATEGIES)
    params = _strategy_params(args)
    parse_source(args.calib)
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    batch = None if args.strategy == "manual" else _calib_batch(args, model)
    bars = _Bars(quiet=args.json)
    try:
        plan = make_plan(args.strategy, StrategyContext(model, batch, Cache(), progress=bars), params)
    finally:
        bars.close()
    path = plan.save(args.output)
    if args.json:
        print(json.dumps({"plan": str(path), **plan.to_json()}, indent=2))
    else:
        print(f"{args.strategy}: {plan.summary()}")
        print(f"wrote {path}")
    return 0


def _eval_spec(args, default_ppl: list[str] | None):
    from moescope.analysis.evaluate import EfficiencyParams, EvalSpec

    ppl = args.ppl if args.ppl is not None else (default_ppl if not args.tasks else [])
    spec = EvalSpec(
        ppl=list(ppl or []), samples=args.samples, seq_len=args.seq_len, sampling=args.sampling, seed=args.seed,
        stride=args.stride, tasks=list(args.tasks or []), limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, efficiency=not args.no_efficiency,
        efficiency_params=EfficiencyParams(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                           repeats=args.repeats),
        skip_calib=None if args.skip_calib == "none" else args.skip_calib,
    )
    spec.validate()
    return spec


def _evaluating(args) -> bool:
    return args.ppl is not None or bool(args.tasks)


def _experiment_json(exp) -> dict:
    return {"experiment": exp.id, "label": exp.label, "model": exp.model,
            "ppl": exp.result["ppl"], "ppl_domains": exp.result["ppl_domains"], "tasks": exp.result["tasks"],
            "reference": {"ppl": exp.reference["ppl"], "tasks": exp.reference["tasks"]},
            "efficiency": exp.efficiency, "structure": exp.structure, "timings": exp.timings}


def _print_quality(exp) -> None:
    for src, value in exp.result["ppl"].items():
        ref = exp.reference["ppl"][src]
        change = f" (original {ref:.3f}, {100 * (value / ref - 1):+.1f}%)" if exp.plan else ""
        print(f"perplexity {src}: {value:.3f}{change}")
        domains = {d: v for d, v in exp.result["ppl_domains"][src].items() if d != "all"}
        if len(domains) > 1:
            print("    " + ", ".join(f"{d} {v:.2f}" for d, v in domains.items()))
    for task, metrics in exp.result["tasks"].items():
        shown = {k: v for k, v in metrics.items() if not k.endswith("_stderr") and k != "samples"}
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    for variant, eff in exp.efficiency.items():
        if variant == "pruned" and not exp.plan:
            continue
        plain, skip = eff["plain"], eff.get("skip")
        line = (f"{variant}: {plain['params_total']:,} params ({plain['params_active']:,} active), "
                f"{_bytes(plain['weight_bytes'])} weights, peak {_bytes(plain['peak_memory_bytes'] or 0)}, "
                f"prefill {plain['prefill_tokens_per_s']:.0f} tok/s, generate {plain['generate_tokens_per_s']:.1f} tok/s")
        if skip:
            line += f"; with skipping {skip['generate_tokens_per_s']:.1f} tok/s ({100 * skip['skipped_fraction']:.1f}% calls skipped)"
        print(line)


def cmd_eval(args) -> int:
    from moescope.analysis.cache import Cache
    from moescope.analysis.experiments import run_experiment

    spec = _eval_spec(args, ["demo:all"])
    bars = _Bars(quiet=args.json)
    try:
        exp = run_experiment(args.model, None, spec, cache=Cache(), progress=bars, dtype=args.dtype,
                             device=args.device, trust_remote_code=args.trust_remote_code)
    finally:
        bars.close()
    if args.json:
        print(json.dumps(_experiment_json(exp), indent=2))
        return 0
    print(f"{exp.model}: experiment {exp.id}")
    _print_quality(exp)
    return 0


def cmd_prune(args) -> int:
    from moescope.analysis.cache import Cache
    from moescope.analysis.experiments import run_experiment
    from moescope.analysis.export import check_target, export
    from moescope.analysis.models import load_moe
    from moescope.analysis.plan import PruningPlan
    from moescope.analysis.prune import apply

    out = check_target(args.output, args.overwrite)  # refuse before loading anything
    plan = PruningPlan.load(args.plan)
    spec = _eval_spec(args, None) if _evaluating(args) else None
    model = load_moe(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    before = model.parameter_counts()
    exp = None
    if spec is not None:
        bars = _Bars(quiet=args.json)
        try:
            exp = run_experiment(args.model, plan, spec, cache=Cache(), progress=bars, model=model, dtype=args.dtype)
        finally:
            bars.close()
    else:
        apply(model, plan)
    export(model, out, experiment=exp, overwrite=args.overwrite)
    after = model.parameter_counts()
    result = {"output": str(out), "experts": {str(k): v for k, v in model.num_experts().items()},
              "params_before": before, "params_after": after}
    if args.json:
        print(json.dumps({**result, **(_experiment_json(exp) if exp else {})}, indent=2))
    else:
        print(f"pruned {model.source}: {plan.summary()}")
        print(f"parameters {before['total']:,} -> {after['total']:,} "
              f"({100 * (1 - after['total'] / before['total']):.1f}% fewer); wrote {out}")
        if exp:
            print(f"experiment {exp.id}")
            _print_quality(exp)
    return 0


def cmd_export(args) -> int:
    from moescope.analysis.cache import Cache
    from moescope.analysis.export import export_experiment

    out = export_experiment(args.experiment, args.output, overwrite=args.overwrite, cache=Cache(), dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code)
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        print(json.dumps({"output": str(out), "files": files}, indent=2))
    else:
        print(f"wrote {out}: {', '.join(files)}")
    return 0


def cmd_experiments(args) -> int:
    from moescope.analysis import experiments as X
    from moescope.analysis.cache import Cache

    cache = Cache()
    if args.experiments_command == "ls":
        exps = X.list_experiments(cache, model=args.model)
        if args.json:
            print(json.dumps([{"id": e.id, "label": e.label, "model": e.model, "created": e.created,
                               "ppl": e.result.get("ppl", {})} for e in exps], indent=2))
        elif not exps:
            print(f"no experiments in {cache.root}")
        else:
            for e in exps:
                print(e.summary_line())
        return 0
    if args.experiments_command == "show":
        exp = X.load(args.id, cache)
        if args.json:
            print(json.dumps(exp.to_json(), indent=2))
        else:
            print(f"experiment {exp.id} ({exp.created}): {exp.label} on {exp.model}")
            if exp.plan:
                from moescope.analysis.plan import PruningPlan

                print(f"plan: {PruningPlan.from_json(exp.plan).summary()}")
            _print_quality(exp)
            print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in exp.timings.items()))
        return 0
    table = X.compare([X.load(i, cache) for i in args.ids])
    if args.csv:
        if args.csv == "-":
            print(table.to_csv(index=False), end="")
        else:
            table.to_csv(args.csv, index=False)
            print(f"wrote {args.csv}")
        return 0
    if args.json:
        print(table.to_json(orient="records", indent=2))
        return 0
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.set_index("experiment").T.to_string())
    return 0


def cmd_grid(args) -> int:
    from moescope.analysis.cache import Cache
    from moescope.analysis.data import parse_source
    from moescope.analysis.models import load_moe
    from moescope.analysis.sensitivity import cached_drop_grid

    parse_source(args.eval)
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    batch = _calib_batch(args, model, split="test")
    bars = _Bars(quiet=args.json)
    try:
        grid = cached_drop_grid(model, batch, Cache(), progress=bars)
    finally:
        bars.close()
    if args.json:
        print(json.dumps({**grid.to_json(), "data": batch.describe()}, indent=2))
        return 0
    print(f"{model.source}: {batch.describe()}; baseline perplexity {grid.baseline:.3f}")
    E = max(len(r) for r in grid.ppl)
    print("layer " + "".join(f"{e:>9}" for e in range(E)) + "   (perplexity change when that expert is dropped)")
    for l, row in zip(grid.layers, grid.ppl):
        print(f"{l:>5} " + "".join(f"{p - grid.baseline:>+9.3f}" for p in row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Find, drop and merge redundant experts in Mixture-of-Experts language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("model", nargs="?", default="demo", metavar="MODEL",
                       help="'demo' (default), a local model folder, or a hub id")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow custom modelling code from the model's repository (off by default)")
        return p

    p = model_command("info", "Show a model's MoE structure: layers, experts, routing, parameter counts.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--dtype", default=None, help="report bytes for this dtype (default: the checkpoint's)")
    p.set_defaults(func=cmd_info)

    p = model_command("analyze", "Compute (or read from the cache) every similarity, routing statistic and criterion.")
    p.add_argument("--calib", default="demo:all", help="calibration source: demo:DOMAIN | demo:all | file:PATH | "
                   "hf:NAME[:CONFIG]:SPLIT[:FIELD] (default demo:all)")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", default="random", choices=["random", "first"])
    p.add_argument("--metrics", default="all",
                   help="comma-separated metric families: similarity, weights, routing, activations, gradients "
                        "(the one that needs a backward pass), or all (default)")
    p.add_argument("--similarity-tokens", type=int, default=8192, help="tokens used for output similarities")
    p.add_argument("--augment", type=float, default=0.0, help="add this × T mixed-token rows (group-and-merge augmentation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id when MODEL has none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or auto (accelerate device map)")
    p.add_argument("--offload", default=None, metavar="DIR",
                   help="keep decoder layers on disk in DIR and load one at a time (models larger than memory)")
    p.add_argument("--export", default=None, metavar="DIR", help="write similarity/criteria/routing/coactivation CSVs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    def data_args(p, flag: str, default: str, samples: int, seq_len: int) -> None:
        p.add_argument(flag, default=default, help=f"data source (default {default}): demo:DOMAIN | demo:all | "
                       "file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        p.add_argument("--samples", type=int, default=samples)
        p.add_argument("--seq-len", type=int, default=seq_len)
        p.add_argument("--sampling", default="random", choices=["random", "first"])
        p.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id when MODEL has none")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--device", default=None)
        p.add_argument("--json", action="store_true")

    p = model_command("grid", "Single-expert-drop perplexity grid (layer × expert), cached.")
    data_args(p, "--eval", "demo:all", 16, 256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_grid)

    p = model_command("plan", "Choose experts to drop or merge with a strategy; write a PruningPlan JSON.")
    p.add_argument("--strategy", required=True, help="random, frequency, criterion, enumerate, merge, router-guided, manual")
    data_args(p, "--calib", "demo:all", 32, 256)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--keep", type=int, help="experts to keep in every MoE layer")
    target.add_argument("--budget", type=int, help="experts to keep in all MoE layers together")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--criterion", help="MC-Suite criterion (EAN, EUF, …, REAP) for --strategy criterion")
    p.add_argument("--order", choices=["min", "max"], help="drop the experts with the min or max criterion")
    p.add_argument("--mode", help="one-shot | iterative (criterion); layer-wise | progressive (enumerate)")
    p.add_argument("--method", help="enumeration search: auto | exact | greedy | beam")
    p.add_argument("--representation", help="merge: outputs | weights | surrogate")
    p.add_argument("--similarity", help="merge: cka_linear | cka_rbf | cosine | mse")
    p.add_argument("--grouping", help="merge: spectral | greedy | agglomerative")
    p.add_argument("--merge", help="merge: max | uniform | usage | frequency | learned | ties")
    p.add_argument("--align", choices=["none", "weights", "activations"],
                   help="merge: permute members onto the group's reference expert first (default activations)")
    p.add_argument("--density", type=float, help="merge ties: fraction of each member's difference kept (0.2)")
    p.add_argument("--no-merge-router", action="store_true", help="merge: keep the dominant expert's router row")
    p.add_argument("--drop", help="manual: LAYER:E,E;LAYER:E")
    p.add_argument("--groups", help='manual: JSON {"0": [[0, 5], [1], ...]}')
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="any other strategy parameter")
    p.add_argument("-o", "--output", required=True, help="where to write plan.json")
    p.set_defaults(func=cmd_plan)

    def eval_args(p) -> None:
        g = p.add_argument_group("evaluation")
        g.add_argument("--ppl", nargs="*", default=None, metavar="SRC",
                       help="perplexity sources: demo:DOMAIN | demo:all | file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        g.add_argument("--samples", type=int, default=96, help="perplexity windows in all (default 96)")
        g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
        g.add_argument("--sampling", default="first", choices=["first", "random"],
                       help="first: consecutive windows from each domain's start (default); random: seeded offsets")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--stride", type=int, default=None, help="slide windows by this many tokens (default: no overlap)")
        g.add_argument("--tasks", nargs="*", default=[], metavar="TASK",
                       help="lm-eval tasks (local: moescope_demo_continuation, moescope_demo_ppl, "
                            "moescope_demo_ppl_DOMAIN; hub tasks such as arc_easy need the network)")
        g.add_argument("--limit", type=float, default=None, help="lm-eval samples per task (a fraction if < 1)")
        g.add_argument("--num-fewshot", type=int, default=None)
        g.add_argument("--batch-size", type=int, default=8)
        g.add_argument("--no-efficiency", action="store_true", help="skip the memory and tokens/s measurement")
        g.add_argument("--prompt-tokens", type=int, default=128, help="efficiency: prompt length (default 128)")
        g.add_argument("--new-tokens", type=int, default=32, help="efficiency: generated tokens (default 32)")
        g.add_argument("--repeats", type=int, default=5, help="efficiency: timed repeats, median (default 5)")
        g.add_argument("--skip-calib", default="demo:all",
                       help="calibration source for the dynamic-skipping β of the efficiency run, or none")

    p = model_command("prune", "Apply a PruningPlan, optionally evaluate it (an experiment), and export the folder.")
    p.add_argument("--plan", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true")
    eval_args(p)
    p.set_defaults(func=cmd_prune)

    p = model_command("eval", "Evaluate a model or exported folder: perplexity, lm-eval tasks, memory and speed.")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="Write an experiment's pruned model folder with its model card.",
                       description="Write an experiment's pruned model folder (weights, tokenizer, config, "
                                   "plan.json, experiment.json, README model card).")
    p.add_argument("experiment", metavar="ID", help="experiment id (or a unique prefix); see `moescope experiments ls`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("experiments", help="List, show and compare experiments.",
                       description="List, show and compare stored experiments.")
    esub = p.add_subparsers(dest="experiments_command", required=True, metavar="ACTION")
    c = esub.add_parser("ls", help="list experiments")
    c.add_argument("--model", default=None)
    c.add_argument("--json", action="store_true")
    c = esub.add_parser("show", help="one experiment in full")
    c.add_argument("id")
    c.add_argument("--json", action="store_true")
    c = esub.add_parser("compare", help="experiments side by side, the original as reference")
    c.add_argument("ids", nargs="+", metavar="ID")
    c.add_argument("--csv", nargs="?", const="-", default=None, metavar="PATH", help="CSV to PATH (or stdout)")
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experiments)

    p = sub.add_parser("cache", help="List or clear cached results.", description="List or clear cached results.")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for action, help_ in (("ls", "list cache entries"), ("clear", "remove cache entries")):
        c = csub.add_parser(action, help=help_)
        c.add_argument("--model", default=None, help="only entries of this model source or fingerprint prefix")
        c.add_argument("--kind", default=None, help="only entries of this kind (e.g. analysis)")
        if action == "ls":
            c.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = model_command("dashboard", "Open the dashboard in the browser (Streamlit).")
    p.add_argument("--address", default="localhost", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoescopeError as err:
        print(f"moescope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
