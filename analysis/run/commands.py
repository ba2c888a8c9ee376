"""What each ``moescope`` command does: validate, make one library call, print. The parser and
the entry point are in :mod:`moescope.analysis.run.cli`."""

from __future__ import annotations

import errno
import json
import sys
import time

from moescope.analysis.core import defaults as D
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.run.report import (
    ProgressBars,
    compare_text,
    experiment_json,
    format_info,
    print_quality,
)


def cmd_info(args) -> int:
    from moescope.analysis.model.model_info import model_info

    info = model_info(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_families(args) -> int:
    """Every MoE model type of the installed transformers: supported / refused / not yet."""
    from moescope.analysis.model import family_catalog

    entries = family_catalog.catalog()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    elif args.markdown:
        print(family_catalog.markdown(entries), end="")
    else:
        for e in entries:
            detail = f"{e.routing} · shared: {e.shared_experts}" if e.status == "supported" else e.reason
            print(f"{e.model_type:28s} {e.status:9s} {detail}")
    return 0


def cmd_dashboard(args) -> int:
    """Start the Streamlit dashboard (bound to localhost unless --address says otherwise)."""
    import os
    from pathlib import Path

    from moescope.analysis.core.paths import DEMO_SOURCES, REPO_ROOT

    check_listen(args.address, args.port)
    # "demo" names the shipped model even where a demo/ folder sits in the working directory
    model = (str(Path(args.model).resolve()) if args.model not in DEMO_SOURCES and Path(args.model).exists()
             else args.model)
    app = REPO_ROOT / "dashboard" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--", "--model", model]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    os.chdir(REPO_ROOT)  # so .streamlit/config.toml (theme, localhost binding) applies
    os.execv(sys.executable, cmd)
    return 0


def check_listen(address: str, port: int) -> None:
    """The dashboard's ``--address`` and ``--port``, checked before Streamlit starts: a port in
    1..65535, a non-empty address (an empty one would bind every interface), and a port that is
    free on that address (else: which ``--port`` to try)."""
    import socket

    if not 1 <= port <= 65535:
        raise MoescopeError(f"--port {port} is not a TCP port; use 1-65535 (default 8501)")
    if not address.strip():
        raise MoescopeError("--address is empty, which would listen on every network interface; give "
                            "localhost (the default), or 0.0.0.0 to be reachable from other machines on purpose")
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise MoescopeError(f"--address {address!r} is not an address of this machine ({err.strerror or err})") from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as s:
        try:
            s.bind(where)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                free = _next_free_port(where, port)
                hint = (f"; start it on a free one with `moescope dashboard --port {free}`" if free
                        else "; pick another with --port")
                raise MoescopeError(f"port {port} on {address} is in use (another moescope dashboard?){hint}") from None
            raise MoescopeError(f"cannot listen on {address}:{port} ({err.strerror or err}); pass another "
                                "--address or --port") from None


def _next_free_port(where: tuple, port: int) -> int | None:
    """The first port after ``port`` that binds on the same address, within 50."""
    import socket

    family = socket.AF_INET6 if len(where) == 4 else socket.AF_INET
    for candidate in range(port + 1, min(port + 50, 65536)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((where[0], candidate, *where[2:]))
            except OSError:
                continue
            return candidate
    return None


def check_device(device: str | None) -> None:
    """``--device`` names a device this machine has (cpu, auto, cuda[:N] with CUDA, mps with MPS)."""
    if device in (None, "cpu", "auto"):
        return
    import re

    m = re.fullmatch(r"(cuda|mps)(?::(\d+))?", device)
    if not m:
        raise MoescopeError(f"--device {device!r} is not a device; use cpu, auto, cuda, cuda:N or mps")
    import torch

    if m[1] == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise MoescopeError(f"--device {device}: this machine has no CUDA device (torch sees none); use cpu")
        if m[2] is not None and int(m[2]) >= n:
            raise MoescopeError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif not torch.backends.mps.is_available():
        raise MoescopeError(f"--device {device}: MPS is not available here; use cpu")


def tokenizer_for(model, tokenizer_arg: str | None):
    if tokenizer_arg:
        from moescope.analysis.core.paths import DEMO_SOURCES
        from transformers import AutoTokenizer

        location = str(DEMO_SOURCES[tokenizer_arg][0]()) if tokenizer_arg in DEMO_SOURCES else tokenizer_arg
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
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.outputs import check_output_folder
    from moescope.analysis.data import parse_source, sample_tokens
    from moescope.analysis.measure.analyze import AnalysisParams, run_analysis
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.loading import check_sampling, load_config

    if args.export is not None:  # before the analysis, so it is never thrown away at the end
        check_output_folder(args.export, "--export folder")
    if args.offload is not None:
        check_output_folder(args.offload, "--offload folder")
    check_device(args.device)
    parse_source(args.calib)  # validate before loading anything heavy
    check_sampling(load_config(args.model, args.trust_remote_code), args.samples, args.seq_len)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.offload and metrics == ("all",):
        from moescope.analysis.measure.analyze import FORWARD_METRICS

        metrics = FORWARD_METRICS
        print("moescope: note: --offload analyses everything but the gradient criteria (they need the whole "
              "model in memory)", file=sys.stderr)
    params = AnalysisParams(
        metrics=metrics,
        similarity_tokens=args.similarity_tokens, augment_ratio=args.augment, augment=args.augment_mode,
        seed=args.seed,
    )
    if _memory_checked(args, params):  # --dry-run: the estimate only
        return 0
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                     offload_dir=args.offload, allow_pickle=args.allow_pickle)
    batch = sample_tokens(args.calib, tokenizer_for(model, args.tokenizer), args.samples, args.seq_len,
                          seed=args.seed, sampling=args.sampling, split="validation")
    bars = ProgressBars(quiet=args.json)
    try:
        result = run_analysis(model, batch, params, cache=Cache(), progress=bars,
                              note=lambda text: print(f"moescope: {text}", file=sys.stderr))
    finally:
        bars.close()
    from moescope.analysis.core.distributed import current

    if result is None or not current().is_main:  # under torchrun the main rank alone reports and exports
        return 0
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
    if args.export:
        left = [n for n in ("similarity", "criteria") if n not in exported]
        if left:
            how = {"similarity": "--metrics similarity", "criteria": "--metrics weights, activations or gradients"}
            print("not written: " + "; ".join(f"{n}.csv (this analysis has none: {how[n]} computes it)" for n in left))
    return 0


def _memory_checked(args, params) -> bool:
    """``analyze``'s memory estimate (:func:`~moescope.analysis.measure.analyze.predicted_memory`)
    from the config alone, refused in one line when it exceeds the memory available, before any
    weight is read; with ``--dry-run`` printed with the predicted time of each family
    (:mod:`~moescope.analysis.measure.cost`) (True: stop there)."""
    from moescope.analysis.core.units import format_bytes
    from moescope.analysis.measure.analyze import check_memory
    from moescope.analysis.measure.cost import analysis_cost
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.loading import parse_dtype

    skeleton = load_moe(args.model, dtype=args.dtype, weights=False, trust_remote_code=args.trust_remote_code)
    if not args.dry_run:
        from moescope.analysis.core.processes import available_memory
        from moescope.analysis.measure.analyze import predicted_memory

        predicted = predicted_memory(skeleton, params, args.samples, args.seq_len, parse_dtype(args.dtype),
                                     offloaded=args.offload is not None)
        check_memory(predicted, available_memory(), params.similarity_tokens,
                     min(args.samples * args.seq_len, params.similarity_tokens))
        return False
    cost = analysis_cost(skeleton, params, args.samples, args.seq_len, parse_dtype(args.dtype),
                         offloaded=args.offload is not None)
    from moescope.analysis.measure.cost import multiply_adds

    available, rates, work = cost["available_bytes"], cost["rates"], cost["work"]
    if args.json:
        print(json.dumps({"predicted_bytes": cost["bytes"], "total_bytes": cost["total_bytes"],
                          "available_bytes": available, "predicted_seconds": cost["seconds"],
                          "total_seconds": cost["total_seconds"], "work": work,
                          "rates_per_second": rates}, indent=2))
        return True
    print("memory at the peak:")
    for part, n in cost["bytes"].items():
        print(f"  {part.replace('_', ' '):<16} {format_bytes(n):>12}")
    print(f"  {'total':<16} {format_bytes(cost['total_bytes']):>12}  (available: "
          f"{format_bytes(available) if available is not None else 'unknown'})")
    print(f"time (multiply-adds and element-wise passes at this machine's measured rates: {rates['model'] / 1e9:.0f} G/s "
          f"in the model's dtype, {rates['fp32'] / 1e9:.0f} G/s float32, {rates['elementwise'] / 1e9:.1f} G elements/s; "
          "smaller terms left out, so a lower bound):")
    for family, sec in cost["seconds"].items():
        print(f"  {family.replace('_', ' '):<16} {format_seconds(sec):>12}  ({multiply_adds(work[family]):.3g} "
              "multiply-adds)")
    print(f"  {'total':<16} {format_seconds(cost['total_seconds']):>12}")
    return True


def format_seconds(sec: float) -> str:
    if sec < 60:
        return f"{sec:.1f} s"
    if sec < 3600:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def cmd_cache(args) -> int:
    from moescope.analysis.core.cache import Cache, format_entries

    cache = Cache()
    if args.cache_command == "ls":
        entries = cache.inspect(kind=args.kind, model=args.model, verify=args.verify)
        if args.json:
            print(json.dumps([{"kind": e.kind, "label": e.label, "key": e.key, "path": str(e.path),
                               "created": e.created, "size": e.size, "model_source": e.model_source,
                               "data": e.data, "status": e.status, "problem": e.problem} for e in entries],
                             indent=2))
        else:
            print(format_entries(entries) if entries else f"no cache entries under {cache.root}")
        return 0
    n = cache.clear(kind=args.kind, model=args.model, damaged=args.damaged, verify=args.verify)
    what = "damaged cache entr" if args.damaged else "cache entr"
    print(f"removed {n} {what}{'y' if n == 1 else 'ies'} from {cache.root}")
    return 0


def parse_value(text: str):
    from moescope.analysis.core.outputs import loads_json

    try:
        return loads_json(text, "--param value", unique_keys=True)
    except json.JSONDecodeError:
        return text


def strategy_params(args, strategy) -> dict:
    """The parameters given for ``strategy``: the flags (generated from the registry) and
    ``--param KEY=VALUE``; the strategy's declaration then refuses any it does not know."""
    declared = {p.name: p for p in strategy.all_params()}
    params = {}
    for name, param in strategy_flag_names().items():
        if name in vars(args):  # given on the command line (flags default to absent)
            value = getattr(args, name)
            parse = declared[name].parse if name in declared else param.parse
            params[name] = parse(value) if parse is not None and isinstance(value, str) else value
    if "seed" in declared and args.seed is not None:
        params["seed"] = args.seed
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoescopeError(f"--param expects KEY=VALUE, got {item!r}")
        key = key.replace("-", "_")
        p = declared.get(key)
        params[key] = p.parse(value) if p is not None and p.parse is not None else parse_value(value)
    return params


def strategy_flag_names() -> dict:
    """Every strategy parameter across the registry (name → Param), for the generated flags."""
    from moescope.analysis.strategies import STRATEGIES

    out = {}
    for strategy in STRATEGIES.values():
        for p in strategy.all_params():
            if p.name != "seed":  # --seed is the calibration seed, passed on to strategies that take one
                out.setdefault(p.name, p)
    return out


def calib_batch(args, model, split="validation"):
    from moescope.analysis.data import sample_tokens

    return sample_tokens(args.calib if split == "validation" else args.eval, tokenizer_for(model, args.tokenizer),
                         args.samples, args.seq_len, seed=args.seed or 0, sampling=args.sampling, split=split)


def cmd_plan(args) -> int:
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.outputs import check_output_file
    from moescope.analysis.data import parse_source
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.plan import unused_kept_note
    from moescope.analysis.strategies import StrategyContext, get_strategy, make_plan, validate_request
    from moescope.analysis.strategies.presets import (
        calibration_length,
        fill_target,
        get_preset,
        validate_preset,
    )

    check_output_file(args.output, "plan file")  # before any work, so none is thrown away at the end
    check_device(args.device)
    preset = get_preset(args.preset) if args.preset else None
    if preset is None and args.strategy is None:
        raise MoescopeError("plan needs --strategy NAME or --preset NAME (see `moescope strategies`)")
    if preset is not None and args.strategy not in (None, preset.strategy):
        raise MoescopeError(f"preset {preset.name} is a {preset.strategy} recipe; drop --strategy {args.strategy} "
                            f"or give --strategy {preset.strategy}")
    strategy = get_strategy(preset.strategy if preset is not None else args.strategy)
    params = strategy_params(args, strategy)
    if args.samples is None:
        args.samples = preset.calib_samples if preset is not None and preset.calib_samples else D.CALIB_SAMPLES
    if strategy.needs_data:
        parse_source(args.calib)
    # everything about the request is checked against the config before any weights are read
    skeleton = load_moe(args.model, dtype=None, weights=False, trust_remote_code=args.trust_remote_code)
    notes = []
    if args.seq_len is None:
        from moescope.analysis.model.loading import max_positions

        length, capped = calibration_length(preset.name, max_positions(skeleton.config)) if preset else (None, None)
        args.seq_len = length or D.CALIB_SEQ_LEN
        notes += [capped] if capped else []
    if preset is not None:
        params, headline = fill_target(preset.name, params, skeleton)
        notes += [headline] if headline else []
        params = validate_preset(preset.name, params, skeleton)[1]
    else:
        validate_request(strategy.name, params, skeleton)
    for note in notes:  # what the preset filled in, said before any weights load
        print(f"note: {note}", file=sys.stderr)
    if strategy.needs_data:
        from moescope.analysis.model.loading import check_sampling

        check_sampling(skeleton.config, args.samples, args.seq_len)
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                     allow_pickle=args.allow_pickle)
    batch = calib_batch(args, model) if strategy.needs_data else None
    bars = ProgressBars(quiet=args.json)
    try:
        plan = make_plan(strategy.name, StrategyContext(model, batch, Cache(), progress=bars), params)
    finally:
        bars.close()
    if preset is not None:
        plan.provenance["preset"] = preset.name
    from moescope.analysis.core.distributed import current

    if not current().is_main:  # under torchrun every rank chose the same plan; the main rank writes it
        return 0
    path = plan.save(args.output)
    label = f"{preset.name} ({strategy.name})" if preset is not None else strategy.name
    if args.json:
        print(json.dumps({"plan": str(path), **plan.to_json()}, indent=2))
    else:
        print(f"{label}: {plan.summary()}")
        print(f"wrote {path}")
    note = unused_kept_note(plan)
    if note:  # a literal rule kept a dead expert: the plan stays as chosen, and the user is told
        print(f"warning: {label} {note}", file=sys.stderr)
    return 0


def cmd_strategies(args) -> int:
    """Every registered strategy with its parameters (from the one declaration)."""
    from moescope.analysis.strategies import STRATEGIES
    from moescope.analysis.strategies.presets import presets_of

    described = [{**s.describe(), "presets": [p.describe() for p in presets_of(s.name)]}
                 for s in STRATEGIES.values()]
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    for d in described:
        traits = ", ".join(t for t, on in (("needs calibration data", d["needs_data"]), ("merges", d["merges"]),
                                           ("global budget", d["budget"])) if on)
        print(f"{d['name']}: {d['help']}" + (f" [{traits}]" if traits else ""))
        for p in d["params"]:
            choices = f" {{{', '.join(map(str, p['choices']))}}}" if p["choices"] else ""
            default = f" (default {p['default']})" if p["default"] is not None else ""
            print(f"    --{p['name'].replace('_', '-')} {p['type']}{choices}{default}: {p['help']}")
        for p in d["presets"]:
            values = " ".join(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool)
                              else f"--{k.replace('_', '-')} {v}" for k, v in p["params"].items())
            samples = f" --samples {p['calib_samples']}" if p["calib_samples"] else ""
            samples += f" --seq-len {p['calib_seq_len']}" if p["calib_seq_len"] else ""
            target = (f"; target when none is given: keep {p['keep_fraction']:.0%} of each layer's experts "
                      f"({p['target_source']})" if p["keep_fraction"] else "")
            print(f"    preset {p['name']}: {values}{samples}  ({p['source']}{target})")
    return 0


def eval_spec(args, default_ppl: list[str] | None):
    from moescope.analysis.evaluation import EfficiencyParams, EvalSpec

    ppl = args.ppl if args.ppl is not None else (default_ppl if not args.tasks else [])
    spec = EvalSpec(
        ppl=list(ppl or []), samples=args.samples, seq_len=args.seq_len, sampling=args.sampling, seed=args.seed,
        stride=args.stride, tasks=list(args.tasks or []), limit=args.limit or None,  # --limit 0: every sample
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, efficiency=not args.no_efficiency,
        efficiency_params=EfficiencyParams(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                           repeats=args.repeats),
        skip_calib=None if args.skip_calib == "none" else args.skip_calib,
    )
    spec.validate()
    from moescope.analysis.core.distributed import current

    if current().distributed and (spec.tasks or spec.efficiency):  # every rank would run them all again
        raise MoescopeError("under torchrun / --nproc, evaluation spreads the perplexity windows over the ranks; "
                            "lm-eval tasks (--tasks) and the speed measurement are not data-parallel here: add "
                            "--no-efficiency and run tasks with lm-eval's own multi-GPU path (README: Many GPUs)")
    return spec


def evaluating(args) -> bool:
    return args.ppl is not None or bool(args.tasks)


def cmd_eval(args) -> int:
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.model import load_config
    from moescope.analysis.run.experiments import run_experiment

    check_device(args.device)
    spec = eval_spec(args, ["demo:all"])
    spec.validate_for(load_config(args.model, args.trust_remote_code))  # before any weights are read
    bars = ProgressBars(quiet=args.json)
    try:
        exp = run_experiment(args.model, None, spec, cache=Cache(), progress=bars, dtype=args.dtype,
                             device=args.device, trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle)
    finally:
        bars.close()
    if args.json:
        print(json.dumps(experiment_json(exp), indent=2))
        return 0
    print(f"{exp.model}: experiment {exp.id}")
    print_quality(exp)
    return 0


def cmd_prune(args) -> int:
    """Check the output folder, the plan (in full, against the config and the base model) and the
    evaluation settings once → load weights → apply → evaluate (if asked) → export atomically
    with the plan passed explicitly → only then store the experiment record, so a killed run
    leaves neither a partial folder nor a record without its export."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.outputs import check_output_folder
    from moescope.analysis.model import check_output_dir, folder_fingerprint, load_moe, resolve_source
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.pruning.prune import apply, finetuned_weights, is_finetuned
    from moescope.analysis.run import experiments
    from moescope.analysis.run.export import check_exportable, export, export_bytes

    out = check_output_dir(args.output, args.overwrite)
    plan = PruningPlan.load(args.plan)
    spec = eval_spec(args, None) if evaluating(args) else None
    skeleton = check_exportable(args.model, plan, args.trust_remote_code, args.transformers_only)
    local = resolve_source(args.model)[1]
    plan.check_base(args.model, folder_fingerprint(local) if local is not None else None, force=args.force)
    if spec is not None:
        spec.validate_for(skeleton.config)
    if args.offload is not None and spec is not None:  # a read-only or full --offload folder is named, not the output
        check_output_folder(args.offload, "--offload folder")
    check_output_dir(args.output, args.overwrite, needed_bytes=export_bytes(skeleton, plan, args.dtype))
    cache = Cache()
    streamable = not is_finetuned(plan) and (local is None or any(local.glob("*.safetensors")))
    if spec is None and streamable:
        from moescope.analysis.core.distributed import current

        if current().distributed:
            raise MoescopeError("prune without evaluation rewrites the checkpoint in one process (nothing to spread "
                                "over ranks): run it without torchrun / --nproc, or add --ppl to evaluate it")
        return _prune_streamed(args, plan, skeleton, out)
    if args.offload:
        if not streamable:
            raise MoescopeError("--offload streams the pruned checkpoint from safetensors; this plan carries finetuned "
                                "weights or the model has no safetensors: prune it without --offload")
        return _prune_offloaded(args, plan, spec, skeleton, out, cache)
    weights = finetuned_weights(plan, cache) if is_finetuned(plan) else None
    work_dtype = args.dtype or "float32"  # evaluated in float32 unless asked; written in the checkpoint's dtype
    model = load_moe(args.model, dtype=work_dtype, trust_remote_code=args.trust_remote_code,
                     allow_pickle=args.allow_pickle)
    before = model.parameter_counts()
    exp = None
    if spec is not None:
        bars = ProgressBars(quiet=args.json)
        try:
            exp = experiments.prune_and_evaluate(model, plan, spec, cache=cache, progress=bars, dtype=work_dtype,
                                                 store=False)
        finally:
            bars.close()
    else:
        apply(model, plan, weights=weights)
    from moescope.analysis.core.distributed import current

    if not current().is_main:  # under torchrun the main rank alone exports and stores
        return 0
    export(model, out, plan=plan, experiment=exp, overwrite=args.overwrite, transformers_only=args.transformers_only,
           dtype=args.dtype, merged_dtype=args.merged_dtype)
    if exp is not None:
        experiments.store(exp, cache)
    after = model.parameter_counts()
    result = {"output": str(out), "experts": {str(k): v for k, v in model.num_experts().items()},
              "params_before": before, "params_after": after}
    if args.json:
        print(json.dumps({**result, **(experiment_json(exp) if exp else {})}, indent=2))
    else:
        print(f"pruned {model.source}: {plan.summary()}")
        print(f"parameters {before['total']:,} -> {after['total']:,} "
              f"({100 * (1 - after['total'] / before['total']):.1f}% fewer); wrote {out}")
        if exp:
            print(f"experiment {exp.id}")
            print_quality(exp)
    return 0


def _prune_streamed(args, plan, skeleton, out) -> int:
    """``prune`` without evaluation: the checkpoint is rewritten shard by shard, never loaded
    (:func:`~moescope.analysis.run.export.stream_export`), so it runs on models larger than memory."""
    from moescope.analysis.model import load_moe
    from moescope.analysis.run.export import stream_export

    before = skeleton.parameter_counts()
    bars = ProgressBars(quiet=args.json)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        stream_export(args.model, out, plan, overwrite=args.overwrite, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, progress=bars,
                      transformers_only=args.transformers_only, merged_dtype=args.merged_dtype)
    finally:
        bars.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pruned = load_moe(str(out), dtype=None, weights=False)
    after = pruned.parameter_counts()
    result = {"output": str(out), "experts": {str(k): v for k, v in pruned.num_experts().items()},
              "params_before": before, "params_after": after, "streamed": True,
              "export_s": {"wall": round(wall, 3), "cpu": round(cpu, 3)}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"pruned {args.model}: {plan.summary()} (streamed shard by shard)")
        print(f"parameters {before['total']:,} -> {after['total']:,} "
              f"({100 * (1 - after['total'] / before['total']):.1f}% fewer); wrote {out}")
        print(f"export took {wall:.1f} s wall, {cpu:.1f} s CPU (this process: user + system)")
    return 0


def _prune_offloaded(args, plan, spec, skeleton, out, cache) -> int:
    """``prune --offload`` with evaluation: stream the folder, evaluate both models layer-streamed,
    store the record once the folder is complete."""
    from moescope.analysis.model import load_moe
    from moescope.analysis.run import experiments
    from moescope.analysis.run.export import stream_prune_and_evaluate

    bars = ProgressBars(quiet=args.json)
    try:
        exp = stream_prune_and_evaluate(args.model, out, plan, spec, args.offload, overwrite=args.overwrite,
                                        dtype=args.dtype, trust_remote_code=args.trust_remote_code, cache=cache,
                                        progress=bars, transformers_only=args.transformers_only)
    finally:
        bars.close()
    experiments.store(exp, cache)
    pruned = load_moe(str(out), dtype=None, weights=False)
    before, after = skeleton.parameter_counts(), pruned.parameter_counts()
    if args.json:
        print(json.dumps({"output": str(out), "experts": {str(k): v for k, v in pruned.num_experts().items()},
                          "params_before": before, "params_after": after, "streamed": True,
                          **experiment_json(exp)}, indent=2))
        return 0
    print(f"pruned {args.model}: {plan.summary()} (streamed; evaluated with layers offloaded to {args.offload})")
    print(f"parameters {before['total']:,} -> {after['total']:,}; wrote {out}")
    print(f"experiment {exp.id}")
    print_quality(exp)
    return 0


def cmd_export(args) -> int:
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.run.export import export_experiment

    out = export_experiment(args.experiment, args.output, overwrite=args.overwrite, cache=Cache(), dtype=args.dtype,
                            transformers_only=args.transformers_only,
                            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        print(json.dumps({"output": str(out), "files": files}, indent=2))
    else:
        print(f"wrote {out}: {', '.join(files)}")
    return 0


def cmd_experiments(args) -> int:
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.run import experiments as X

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
                from moescope.analysis.pruning.plan import PruningPlan

                print(f"plan: {PruningPlan.from_json(exp.plan).summary()}")
            print_quality(exp)
            print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in exp.timings.items()))
        return 0
    if args.csv and args.csv != "-":
        from moescope.analysis.core.outputs import atomic_file, check_output_file

        check_output_file(args.csv, "--csv file")
    chosen = [X.load(i, cache) for i in args.ids]
    table = X.compare(chosen)
    if args.csv:
        if args.csv == "-":
            print(table.to_csv(index=False), end="")
        else:
            with atomic_file(args.csv, "--csv file") as fh:
                table.to_csv(fh, index=False)
            print(f"wrote {args.csv}")
        return 0
    if args.json:
        print(table.to_json(orient="records", indent=2))
        return 0
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(compare_text(table))
    if len(chosen) == 2 and X.same_setting(chosen) and all(e.plan for e in chosen):
        from moescope.analysis.run.report import between_text

        print("\n" + between_text(chosen[0], chosen[1]))  # the second against the first, paired
    return 0


def cmd_grid(args) -> int:
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import parse_source
    from moescope.analysis.measure.sensitivity import cached_drop_grid
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.loading import check_sampling, load_config

    check_device(args.device)
    parse_source(args.eval)
    check_sampling(load_config(args.model, args.trust_remote_code), args.samples, args.seq_len)
    model = load_moe(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                     allow_pickle=args.allow_pickle)
    batch = calib_batch(args, model, split="test")
    bars = ProgressBars(quiet=args.json)
    try:
        grid = cached_drop_grid(model, batch, Cache(), progress=bars,
                                note=lambda text: print(f"moescope: {text}", file=sys.stderr))
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
