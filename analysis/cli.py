"""``moescope`` command line: parse, validate, make one library call, print.

Every user mistake surfaces as a :class:`~analysis.errors.MoescopeError` and is printed as one
line (``moescope: error: ...``, exit status 2); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from analysis.errors import MoescopeError


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
    from analysis.models import load_moe

    model = load_moe(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code, weights=False)
    info = model.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_dashboard(args) -> int:
    """Start the Streamlit dashboard (bound to localhost unless --address says otherwise)."""
    import os
    from pathlib import Path

    from analysis.models import REPO_ROOT

    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
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

        from analysis.models import demo_model_dir

        location = str(demo_model_dir()) if tokenizer_arg == "demo" else tokenizer_arg
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
    from analysis.analyze import AnalysisParams, run_analysis
    from analysis.cache import Cache
    from analysis.data import parse_source, sample_tokens
    from analysis.models import load_moe

    parse_source(args.calib)  # validate before loading anything heavy
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.offload and metrics == ("all",):
        from analysis.analyze import FORWARD_METRICS

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
    from analysis.cache import Cache, format_entries

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
                 "grouping", "merge", "seed"):
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
    from analysis.data import sample_tokens

    return sample_tokens(args.calib if split == "validation" else args.eval, _tokenizer_for(model, args.tokenizer),
                         args.samples, args.seq_len, seed=args.seed or 0, sampling=args.sampling, split=split)


def cmd_plan(args) -> int:
    from analysis.cache import Cache
    from analysis.data import parse_source
    from analysis.models import load_moe
    from analysis.strategies import STRATEGIES, StrategyContext, make_plan

    if args.strategy not in STRATEGIES:
        from analysis.errors import unknown_name

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


def cmd_prune(args) -> int:
    from pathlib import Path

    from analysis.models import load_moe, prepare_output_dir
    from analysis.plan import PruningPlan
    from analysis.prune import apply

    out = Path(args.output)
    plan = PruningPlan.load(args.plan)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # refuse before loading anything
        raise MoescopeError(f"output folder '{out}' is not empty; choose an empty folder or pass --overwrite")
    model = load_moe(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    before = model.parameter_counts()
    apply(model, plan)
    prepare_output_dir(out, args.overwrite)
    model.save(out, overwrite=True)
    plan.save(out / "plan.json")
    after = model.parameter_counts()
    result = {"output": str(out), "experts": {str(k): v for k, v in model.num_experts().items()},
              "params_before": before, "params_after": after}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"pruned {model.source}: {plan.summary()}")
        print(f"parameters {before['total']:,} -> {after['total']:,} "
              f"({100 * (1 - after['total'] / before['total']):.1f}% fewer); wrote {out}")
    return 0


def cmd_grid(args) -> int:
    from analysis.cache import Cache
    from analysis.data import parse_source
    from analysis.models import load_moe
    from analysis.sensitivity import cached_drop_grid

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
    p.add_argument("--merge", help="merge: max | uniform | usage | learned")
    p.add_argument("--no-merge-router", action="store_true", help="merge: keep the dominant expert's router row")
    p.add_argument("--drop", help="manual: LAYER:E,E;LAYER:E")
    p.add_argument("--groups", help='manual: JSON {"0": [[0, 5], [1], ...]}')
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="any other strategy parameter")
    p.add_argument("-o", "--output", required=True, help="where to write plan.json")
    p.set_defaults(func=cmd_plan)

    p = model_command("prune", "Apply a PruningPlan and write a model folder that from_pretrained loads.")
    p.add_argument("--plan", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

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
