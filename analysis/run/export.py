"""Export a pruned model as a folder that plain ``transformers`` and lm-eval load.

The folder holds the weights in the hub layout (``save_pretrained``, safetensors), the config
with the new expert counts (and ``moescope_skip_beta`` when dynamic skipping was part of the
plan), the tokenizer, ``plan.json`` (the plan with its provenance), ``experiment.json`` (the
evaluation record, when there is one) and a model card ``README.md``: base model, method and
parameters, experts kept per layer, parameter and memory reduction, evaluation against the
original. A non-empty target folder is refused unless ``overwrite`` (and then only a folder moescope
wrote, marked by ``.moescope-export``). The folder is written as a temporary sibling and renamed into
place when complete, so a killed export leaves no partial folder.

A model whose MoE layers keep different expert counts is exported at its real per-layer sizes
with ``modeling_moescope.py`` registered in ``auto_map`` (:mod:`analysis.nonuniform`): plain
``transformers`` and lm-eval load it with ``trust_remote_code=True``, which the model card says
with the counts per layer; uniform models export to the plain family class.
"""

from __future__ import annotations

import json
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import atomic_output_dir, check_output_dir
from moescope.analysis.pruning.plan import unused_kept_note


def export(model, out_dir: str | Path, plan=None, experiment=None, overwrite: bool = False,
           transformers_only: bool = False, dtype: str | None = None, merged_dtype: str | None = None) -> Path:
    """Write ``model`` (already pruned by ``plan``, or None for the model as loaded) to ``out_dir``
    with ``plan.json``, ``experiment.json`` (when given) and the model card. The weights are written
    in the checkpoint's own dtype (a bfloat16 checkpoint analysed in float32 comes out bfloat16)
    unless ``dtype`` is given; ``model`` is cast in place to it
    (:meth:`~moescope.analysis.model.view.MoEModel.cast_for_export`). A non-uniform model of a
    family moescope's vLLM plugin does not serve is refused before anything is written, unless
    ``transformers_only`` (:func:`~moescope.analysis.model.nonuniform.check_servable`)."""
    from moescope.analysis.model.loading import parse_dtype
    from moescope.analysis.model.nonuniform import check_servable
    from moescope.analysis.model.quantization import scheme_of_folder

    source_dir = getattr(model, "source_dir", None)
    if plan is not None and source_dir is not None and not (plan.provenance or {}).get("finetuned") \
            and scheme_of_folder(source_dir) is not None:
        # a quantized checkpoint is written in its own format from its stored tensors, as a streamed prune
        # writes it (the model in memory holds transformers' dequantized copy)
        return stream_export(str(source_dir), out_dir, plan, experiment=experiment, overwrite=overwrite, dtype=None,
                             transformers_only=transformers_only, merged_dtype=merged_dtype)
    check_servable(model.family.name, model.num_experts(), transformers_only)
    target = parse_dtype(dtype) if dtype is not None else None
    check_finite_weights(model)
    model.cast_for_export(target)
    check_finite_weights(model)  # a float32 merge beyond the checkpoint dtype's range is not written as infinity
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.write_files(tmp)
        _write_records(tmp, model, plan, experiment)
    return Path(out_dir)


def stream_export(source: str, out_dir: str | Path, plan, experiment=None, overwrite: bool = False,
                  dtype: str | None = None, trust_remote_code: bool = False, progress=None,
                  transformers_only: bool = False, merged_dtype: str | None = None) -> Path:
    """Write ``plan`` applied to ``source`` as an export folder without loading the model: the
    checkpoint is rewritten shard by shard (:mod:`analysis.model.stream_export`; the weights are
    those ``load_moe(dtype) → apply → export`` writes), then config, tokenizer, ``plan.json``,
    ``experiment.json`` and the model card as :func:`export` writes them. ``dtype=None`` keeps the
    checkpoint's dtypes. The plan and the folder are checked before anything is written; a plan
    carrying finetuned weights needs :func:`export` of the model it finetuned. A quantized checkpoint
    keeps its format and dtypes (``dtype`` is ignored); ``merged_dtype="bf16"`` keeps merged experts
    in bf16 where its scheme allows."""
    skeleton, folder, torch_dtype = _stream_checks(source, out_dir, plan, overwrite, dtype, trust_remote_code,
                                                   transformers_only, merged_dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        pruned = _stream_into(tmp, skeleton, folder, plan, torch_dtype, trust_remote_code, progress, merged_dtype)
        _write_records(tmp, pruned, plan, experiment)
    return Path(out_dir)


def stream_prune_and_evaluate(source: str, out_dir: str | Path, plan, spec, offload_dir: str | Path,
                              overwrite: bool = False, dtype: str | None = None, trust_remote_code: bool = False,
                              cache=None, progress=None, transformers_only: bool = False):
    """``prune --offload``: stream the pruned folder (as :func:`stream_export`), evaluate the original
    and the pruned folder with their decoder layers on disk under ``offload_dir``
    (:func:`~moescope.analysis.run.experiments.evaluate_offloaded`), then write the record and
    the card; the folder appears complete or not at all. Returns the (unstored) experiment."""
    from moescope.analysis.run.experiments import evaluate_offloaded

    skeleton, folder, torch_dtype = _stream_checks(source, out_dir, plan, overwrite, dtype, trust_remote_code,
                                                   transformers_only)
    spec.validate_for(skeleton.config)
    if spec.efficiency:
        raise MoescopeError("--offload measures quality only (memory and tokens/s need the model in memory); "
                            "add --no-efficiency")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        pruned = _stream_into(tmp, skeleton, folder, plan, torch_dtype, trust_remote_code, progress)
        exp = evaluate_offloaded(source, tmp, plan, spec, offload_dir, dtype=dtype, cache=cache, progress=progress,
                                 trust_remote_code=trust_remote_code)
        _write_records(tmp, pruned, plan, exp)
    return exp


def _stream_checks(source, out_dir, plan, overwrite, dtype, trust_remote_code, transformers_only=False,
                   merged_dtype=None):
    from moescope.analysis.model import load_moe, resolve_source
    from moescope.analysis.model.loading import parse_dtype
    from moescope.analysis.model.nonuniform import check_servable
    from moescope.analysis.model.quantization import scheme_of_folder
    from moescope.analysis.model.quantized_export import check_keep_merged

    check_output_dir(out_dir, overwrite)
    if (plan.provenance or {}).get("finetuned"):
        raise MoescopeError("the plan carries finetuned experts and routers (a lottery subnetwork); they are not in "
                            "the checkpoint, so it is exported from the model in memory, not streamed")
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    local = resolve_source(source)[1]
    scheme = scheme_of_folder(local) if local is not None else None
    check_keep_merged(scheme, merged_dtype)
    if scheme is not None:
        torch_dtype = None  # a quantized checkpoint keeps its own dtypes
    skeleton = load_moe(source, dtype=torch_dtype, weights=False, trust_remote_code=trust_remote_code)
    plan.validate_for(skeleton)
    check_servable(skeleton.family.name, plan.experts_after(skeleton), transformers_only)
    return skeleton, resolve_source(source)[1] or hub_snapshot(source), torch_dtype


def _stream_into(tmp: Path, skeleton, folder: Path, plan, torch_dtype, trust_remote_code: bool, progress,
                 merged_dtype=None):
    """Weights, config, generation config and tokenizer of the pruned folder into ``tmp``; returns
    the skeleton cut to the plan's structure (what the model card describes)."""
    from moescope.analysis.model import stream_export as stream
    from moescope.analysis.model.loading import _load_tokenizer

    stream.write_pruned(folder, skeleton, plan, tmp, dtype=torch_dtype, progress=progress,  # cuts the skeleton
                        keep_merged=merged_dtype)
    betas = plan.skip_beta or getattr(skeleton.config, "moescope_skip_beta", None)
    skeleton.skip_beta = {int(k): float(v) for k, v in betas.items()} if betas else {}
    skeleton.source_dir = folder
    skeleton.tokenizer = _load_tokenizer(str(folder), trust_remote_code)
    if skeleton.hf.can_generate() and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig  # what from_pretrained reads besides the weights

        skeleton.hf.generation_config = GenerationConfig.from_pretrained(folder)
    skeleton.write_config_files(tmp, skeleton.hf.dtype)
    return skeleton


def hub_snapshot(repo: str) -> Path:
    """The local folder of a hub model's config, safetensors and tokenizer files (downloaded once
    into the Hugging Face cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja"]))
    except Exception as err:  # offline, gated, missing: one line
        raise MoescopeError(f"cannot download '{repo}' from the hub: {str(err).splitlines()[0][:200]}") from None


def _write_records(tmp: Path, model, plan, experiment) -> None:
    if plan is not None:
        plan.save(tmp / "plan.json")
    if experiment is not None:
        (tmp / "experiment.json").write_text(json.dumps(experiment.to_json(), indent=2) + "\n", encoding="utf-8")
    weights = {"export": weights_on_disk(tmp), "source": weights_on_disk(model.source_dir)}
    (tmp / "README.md").write_text(model_card(model, plan, experiment, weights), encoding="utf-8")


def weights_on_disk(folder: Path | None) -> dict[str, dict[str, int]] | None:
    """``{safetensors dtype: {"tensors": n, "bytes": b}}`` of a model folder's weight files, read from
    their headers (None for a folder without safetensors, or none at all)."""
    from moescope.analysis.model.stream_export import source_tensors

    if folder is None or not any(Path(folder).glob("*.safetensors")):
        return None
    out: dict[str, dict[str, int]] = {}
    for t in source_tensors(Path(folder)).values():
        row = out.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += t.nbytes
    return out


def _weights_section(weights: dict | None) -> list[str]:
    """The card's statement of the dtypes and bytes written, against the source's."""
    from moescope.analysis.core.units import format_bytes

    if not weights or not weights.get("export"):
        return []
    exp, src = weights["export"], weights.get("source") or {}

    def said(by_dtype: dict) -> str:
        return ", ".join(f"{d} {format_bytes(v['bytes'])} ({v['tensors']:,} tensors)" for d, v in sorted(by_dtype.items()))

    total = sum(v["bytes"] for v in exp.values())
    line = f"Weights written: {said(exp)}; {format_bytes(total)} in all"
    if src:
        src_total = sum(v["bytes"] for v in src.values())
        line += (f", against the source's {format_bytes(src_total)} ({said(src)}): "
                 f"{100 * total / src_total:.1f} % of it")
        if set(exp) - set(src):
            line += f"; {', '.join(sorted(set(exp) - set(src)))} is not a dtype of the source (asked with --dtype)"
    return ["", "## Weights on disk", "", line + "."]


def export_experiment(ident: str, out_dir: str | Path, overwrite: bool = False, cache=None,
                      dtype: str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
                      transformers_only: bool = False) -> Path:
    """Rebuild experiment ``ident``'s model (its base model with its plan; finetuned weights from
    the record) and export it. The experiment and the output folder are checked before any
    weights are read."""
    from moescope.analysis.model import folder_fingerprint, load_moe, resolve_source
    from moescope.analysis.model.loading import COPIED_FILES, files_fingerprint
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.run import experiments

    exp = experiments.load(ident, cache)
    check_output_dir(out_dir, overwrite)  # before any weights are read
    if exp.plan is None:
        raise MoescopeError(f"experiment {exp.id} evaluated '{exp.model}' without a plan; there is nothing "
                            "pruned to export (the original model is its own folder)")
    plan = PruningPlan.from_json(exp.plan)
    skeleton = check_exportable(exp.model, plan, trust_remote_code, transformers_only)
    check_output_dir(out_dir, overwrite, needed_bytes=export_bytes(skeleton, plan, dtype))
    local = resolve_source(exp.model)[1]
    if exp.files_fingerprint is not None and files_fingerprint(local) != exp.files_fingerprint:
        raise MoescopeError(f"the tokenizer or generation config of '{exp.model}' has changed since experiment {exp.id} "
                            f"was run (the files an export copies: {', '.join(COPIED_FILES[:3])}, …); re-run the "
                            "experiment")
    if not exp.finetuned and local is not None and any(local.glob("*.safetensors")):
        # streamed: the weights are never loaded; the folder's fingerprint is the one load_moe records
        if folder_fingerprint(local) != exp.model_fingerprint:
            raise MoescopeError(f"'{exp.model}' has changed since experiment {exp.id} was run (fingerprint "
                                f"{folder_fingerprint(local)[:12]} ≠ {exp.model_fingerprint[:12]}); re-run the experiment")
        return stream_export(exp.model, out_dir, plan, experiment=exp, overwrite=overwrite, dtype=dtype,
                             trust_remote_code=trust_remote_code, transformers_only=transformers_only)
    weights = experiments.trained_tensors_of(exp, cache) if exp.finetuned else None
    model = load_moe(exp.model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if model.fingerprint() != exp.model_fingerprint:
        raise MoescopeError(f"'{exp.model}' has changed since experiment {exp.id} was run (fingerprint "
                            f"{model.fingerprint()[:12]} ≠ {exp.model_fingerprint[:12]}); re-run the experiment")
    apply(model, plan, weights=weights)
    return export(model, out_dir, plan=plan, experiment=exp, overwrite=overwrite, transformers_only=transformers_only,
                  dtype=dtype)


def check_finite_weights(model) -> None:
    """Refuse to export routed experts or routers holding NaN or infinity (a diverged finetune, an
    overflowing merge): a non-finite model is never written as a result."""
    import torch

    for l, view in model.layers.items():
        for part, module in (("experts", view.experts), ("router", view.router)):
            for name, t in module.named_parameters():
                if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                    raise MoescopeError(f"layer {l} {part}.{name} holds non-finite values (NaN or infinity) after "
                                        "pruning; nothing was exported")


def export_bytes(skeleton, plan, dtype: str | None) -> int:
    """About how many bytes an export of ``skeleton`` pruned by ``plan`` in ``dtype`` writes: its
    parameters less the routed-expert parameters of the experts the plan removes, at the dtype's
    width (for the free-space check before any work)."""
    import torch
    from moescope.analysis.model.loading import config_dtype, parse_dtype
    from moescope.analysis.model.quantization import scheme_of_folder

    source_dir = getattr(skeleton, "source_dir", None)
    if source_dir is not None and scheme_of_folder(source_dir) is not None:  # written in its own format
        from moescope.analysis.model.quantized_export import export_bytes as quantized_bytes

        return quantized_bytes(source_dir, plan, {l: v.num_experts for l, v in skeleton.layers.items()})
    width = (parse_dtype(dtype) if dtype else (config_dtype(skeleton.config) or torch.float32)).itemsize
    params = sum(p.numel() for p in skeleton.hf.parameters())
    for l, view in skeleton.layers.items():
        if l in plan.layers and view.num_experts:
            expert_params = sum(p.numel() for p in view.experts.parameters())
            params -= expert_params * (view.num_experts - plan.layers[l].num_out) // view.num_experts
    return params * width


def check_exportable(source: str, plan, trust_remote_code: bool = False, transformers_only: bool = False):
    """Refuse, from the config alone (no weights read), a plan that does not fit ``source``, and a
    plan whose layers keep different counts for a family vLLM cannot serve (the per-layer format,
    :mod:`analysis.nonuniform`, is served through moescope's vLLM plugin) unless
    ``transformers_only``. Returns the weightless model it was checked against."""
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.nonuniform import check_servable

    skeleton = load_moe(source, dtype=None, weights=False, trust_remote_code=trust_remote_code)
    plan.validate_for(skeleton)
    check_servable(skeleton.family.name, plan.experts_after(skeleton), transformers_only)
    return skeleton


# ---- model card ------------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "–" if x is None else str(x)


def _pct(after, before) -> str:
    if not isinstance(after, int | float) or not isinstance(before, int | float) or not before:
        return "–"
    return f"{100 * (after / before - 1):+.1f}%"


def _speed_change(pruned: dict, original: dict, key: str) -> str:
    """A speed change as the card states it: the % change, or "within noise" with the reason when
    the measurement cannot tell it from noise (:func:`~moescope.analysis.evaluation.efficiency.speed_verdict`)."""
    from moescope.analysis.evaluation.efficiency import speed_verdict

    v = speed_verdict(pruned, original, key)
    if v is None:
        return _pct(pruned.get(key), original.get(key))
    if v["noise"]:
        return f"left out: within noise ({v['noise']})"
    return f"{_pct(pruned.get(key), original.get(key))} (repeats: {v['low']:.2f}–{v['high']:.2f}×)"


def _speed_row(name: str, original: dict, pruned: dict, key: str) -> list:
    """A speed row of the card; a figure that is noise is left out (its change says so)."""
    from moescope.analysis.evaluation.efficiency import speed_verdict

    v = speed_verdict(pruned, original, key)
    if v is not None and v["noise"]:
        return [name, "–", "–", _speed_change(pruned, original, key)]
    return [name, _fmt(original.get(key)), _fmt(pruned.get(key)), _speed_change(pruned, original, key)]


def _bytes(x) -> str:
    from moescope.analysis.core.units import format_bytes

    return format_bytes(x) if isinstance(x, int | float) else "–"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plan_origin(prov: dict) -> str:
    """Where a plan came from, in words: the strategy that chose it (and whether it was edited by hand
    afterwards), the analysis actions that built it (e.g. the drop grid's "drop the least needed"),
    or a hand edit on the Plan page."""
    strategy = prov.get("strategy") or "manual"
    actions = [str(a) for a in prov.get("actions") or []]
    if strategy != "manual":
        text = f"strategy **{strategy}**"
        if actions:
            text += ", then analysis actions: " + "; ".join(actions)
        elif prov.get("edited_by_hand"):
            text += ", then edited by hand"
        return text
    if actions:
        return "analysis actions: " + "; ".join(actions) + ("" if not prov.get("edited_by_hand") else
                                                             ", then edited by hand")
    return "edited by hand (no strategy)"


def _preset_line(name: str) -> str:
    """The preset a plan was made from, with the paper (and equation or file) its values come from."""
    from moescope.analysis.strategies.presets import PRESETS

    p = PRESETS.get(name)
    if p is None:
        return f"Preset: **{name}**"
    return f"Preset: **{p.name}** (strategy `{p.strategy}`) — {p.help}. Source: {p.source}."


def model_card(model, plan, experiment=None, weights: dict | None = None) -> str:
    """The README of an exported folder (Markdown with hub front matter); ``weights`` the dtypes and
    bytes of the export and its source (:func:`weights_on_disk`)."""
    base = plan.base_model if plan is not None else model.source
    prov = (plan.provenance if plan is not None else None) or {}
    hub_base = base if "/" in base and not Path(base).exists() else None
    front = ["---", "library_name: transformers", "tags:", "- moe", "- expert-pruning", "- moescope"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    out = ["\n".join(front), "", f"# {model.family.name} MoE pruned with moescope", ""]
    out.append(f"Base model: `{base}`" + (f" (fingerprint `{experiment.model_fingerprint[:16]}`)" if experiment else ""))
    out += ["", "## Method", ""]
    if plan is None:
        out.append("No plan: the model as loaded.")
    else:
        name = prov.get("name") or (experiment.label if experiment is not None else None)
        if name:
            out.append(f"Plan: **{name}**")
            out.append("")
        out.append(f"Origin: {plan_origin(prov)}")
        if prov.get("preset"):
            out += ["", _preset_line(str(prov["preset"]))]
        params = prov.get("params") or {}
        if params:
            out += ["", "Parameters:", ""] + [f"- `{k}`: `{json.dumps(v)}`" for k, v in sorted(params.items())]
        if prov.get("data"):
            what = f"{prov['data_description']} " if prov.get("data_description") else ""
            out += ["", f"Calibration data: {what}(fingerprint `{str(prov['data'])[:16]}`)"]
        note = unused_kept_note(plan)
        if note:
            out += ["", f"**Warning:** the plan {note}: its rule keeps them as written."]
        if prov.get("finetuned"):
            out += ["", "The kept experts and routers were finetuned (lottery subnetwork rounds)."]
        if plan.skip_beta:
            betas = ", ".join(f"layer {l}: {b:.3f}" for l, b in sorted(plan.skip_beta.items()))
            out += ["", f"Dynamic skipping thresholds β ({betas}) are stored as `config.moescope_skip_beta`; "
                    "plain transformers ignores them, `moescope` applies them when it loads this folder."]
        out += ["", "## Experts kept per layer", "",
                "New experts are numbered in this order; a group of several original experts is merged with "
                "the coefficients shown."
                + (" Members were first permuted onto their group's reference expert (neuron alignment; the "
                   "permutations are in `plan.json`)." if any(lp.permutations for lp in plan.layers.values()) else "")
                + (" Folded groups (HC-SMoE's fix-dom-same) average each member's intermediate neurons into the "
                   "merged expert's neurons their fold names, weighted by the coefficients shown (the folds are in "
                   "`plan.json`)." if any(lp.folded() for lp in plan.layers.values()) else "")
                + (" Layers marked TIES combine by sign consensus on the members' differences from their mean."
                   if any(lp.operator == "ties" for lp in plan.layers.values()) else ""), ""]
        rows = []
        before = (experiment.structure.get("before", {}).get("experts", {}) if experiment else {})
        for l, lp in sorted(plan.layers.items()):
            groups = []
            for i, (g, c) in enumerate(zip(lp.groups, lp.resolved_coefficients())):
                zero = lp.weightless(i)
                live = [(e, w) for e, w in zip(g, c) if e not in zero]
                text = str(live[0][0]) if len(live) == 1 else "(" + " + ".join(f"{w:.2g}·{e}" for e, w in live) + ")"
                groups.append(text + (f" [drops {', '.join(map(str, zero))}: weight 0]" if zero else ""))
            rows.append([str(l) + (" (TIES)" if lp.operator == "ties" else ""), _fmt(before.get(str(l))),
                         str(lp.num_out), ", ".join(groups)])
        out.append(_table(["layer", "experts before", "after", "kept / merged (original indices)"], rows))
        out += ["", "Layers not listed are unchanged."]
    out += quantization_section(getattr(model, "quantization_report", None))
    if experiment is not None:
        out += ["", "## Size", ""]
        b, a = experiment.structure.get("before", {}), experiment.structure.get("after", {})
        rows = [[name, _fmt(b.get("params", {}).get(key)), _fmt(a.get("params", {}).get(key)),
                 _pct(a.get("params", {}).get(key), b.get("params", {}).get(key))]
                for name, key in (("parameters", "total"), ("active parameters per token", "active"),
                                  ("routed-expert parameters", "experts"))]
        rows.append(["weights in memory", _bytes(b.get("weight_bytes")), _bytes(a.get("weight_bytes")),
                     _pct(a.get("weight_bytes"), b.get("weight_bytes"))])
        eff = experiment.efficiency or {}
        o, p = (eff.get("original") or {}).get("plain") or {}, (eff.get("pruned") or {}).get("plain") or {}
        if o and p:
            rows += [["peak memory while generating", _bytes(o.get("peak_memory_bytes")),
                      _bytes(p.get("peak_memory_bytes")), _pct(p.get("peak_memory_bytes"), o.get("peak_memory_bytes"))],
                     _speed_row("prefill tokens/s", o, p, "prefill_tokens_per_s"),
                     _speed_row("generation tokens/s", o, p, "generate_tokens_per_s")]
        out.append(_table(["", "original", "pruned", "change"], rows))
        if o:
            out += ["", f"Speed and memory: {o.get('device')}, {o.get('threads')} threads, "
                    f"{o.get('params', {}).get('prompt_tokens')}-token prompts, "
                    f"{o.get('params', {}).get('new_tokens')} new tokens, median of {o.get('params', {}).get('repeats')}; "
                    f"memory is the {o.get('peak_memory_kind')}."]
        out += ["", "## Evaluation", "", _quality_table(experiment)]
        spec = experiment.eval
        out += ["", f"Perplexity: exp of the mean next-token loss over {spec.get('samples')} windows of "
                f"{spec.get('seq_len')} tokens ({spec.get('sampling')} sampling, test split). "
                f"Tasks: lm-eval {experiment.versions.get('lm_eval')}, "
                f"{spec.get('num_fewshot') or 0}-shot, limit {spec.get('limit') or 'none'}. "
                f"Experiment `{experiment.id}`, {experiment.created}."]
    out += _weights_section(weights)
    out += _use_section(model)
    return "\n".join(out)


def split_front_matter(card: str) -> tuple[str, str]:
    """A model card's YAML header (between the leading ``---`` lines, without them) and its
    Markdown body; ``("", card)`` when it has no header."""
    lines = card.split("\n")
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]).lstrip("\n")
    return "", card


def _use_section(model) -> list[str]:
    """How to load the folder; for per-layer expert counts, why ``trust_remote_code=True`` is needed;
    which custom-code entries of the base config's ``auto_map`` were dropped."""
    from moescope.analysis.model.nonuniform import (
        MODULE_FILE,
        base_class_name,
        class_name,
        foreign_auto_map,
        is_uniform,
    )

    counts = model.num_experts()
    uniform = is_uniform(counts)
    trust, trust_arg = ("", "") if uniform else (", trust_remote_code=True", ",trust_remote_code=True")
    out = []
    dropped = foreign_auto_map(model.hf.config)
    if dropped:
        names = ", ".join(f"`{k}` → `{v}`" for k, v in sorted(dropped.items(), key=str))
        out += ["", "## Custom code of the base model was dropped", "",
                f"The base model's config registered custom code in `auto_map` ({names}). Those module files "
                "are not part of this folder, so the entries were removed from `config.json`: the folder loads "
                f"with the `transformers` class for `{model.family.name}`"
                + ("" if uniform else f" (through moescope's own `{MODULE_FILE}`)") + "."]
    if not uniform:
        key, base = model.family.num_experts_key, base_class_name(model.hf)
        out += ["", "## Loading needs `trust_remote_code=True`", "",
                f"The MoE layers of this model keep different numbers of experts. A standard {model.family.name} "
                f"config holds one expert count (`{key}`) for every layer, so `{base}` alone cannot build it. "
                f"The folder ships `{MODULE_FILE}`, a small module (it imports only `torch` and `transformers`) "
                f"whose `{class_name(base)}` builds `{base}` and then cuts each MoE layer to its own count, "
                "listed in `config.moescope_num_experts_per_layer`; the weights are stored at their real sizes, "
                "without padding. `config.auto_map` registers it, so `transformers` runs it only when you pass "
                "`trust_remote_code=True` (without it, loading fails on the tensor shapes). `moescope` loads this "
                "folder without the flag, as it knows its own format.", "",
                _table(["layer", "experts"], [[str(i), n] for i, n in sorted(counts.items())])]
    out += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained(\"PATH\"{trust})",
            "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
            "```", "", "```bash", f"lm_eval --model hf --model_args pretrained=PATH{trust_arg} --tasks TASKS", "```", ""]
    return out + _vllm_section(model, uniform)


def _vllm_section(model, uniform: bool) -> list[str]:
    """How vLLM serves the folder: its own class for a uniform model; moescope's plugin (the
    architecture ``config.moescope_vllm`` names) for per-layer counts."""
    from moescope.analysis.model.nonuniform import VLLM_KEY, base_class_name, class_name, vllm_servable

    base = base_class_name(model.hf)
    out = ["## Serving with vLLM", ""]
    if uniform:
        out += [f"Every MoE layer keeps the same number of experts, so the config names the family's own `{base}`, "
                "which vLLM serves with its own class where it has one for the family:", "",
                "```bash", "vllm serve PATH", "```", ""]
    elif vllm_servable(base):
        out += [f"vLLM builds `{class_name(base)}` (`config.{VLLM_KEY}`) through moescope's vLLM plugin, which "
                "builds every MoE layer at its own expert count and loads the stored tensors as they are (no "
                "padding). Install moescope into vLLM's environment (the plugin is the entry point `moescope` "
                "in the `vllm.general_plugins` group); no `--trust-remote-code` is needed:", "",
                "```bash", "pip install --no-deps moescope   # in vLLM's environment", "vllm serve PATH",
                "lm_eval --model vllm --model_args pretrained=PATH --tasks TASKS", "```", ""]
    else:
        out += [f"vLLM cannot serve this folder: its layers keep different expert counts and moescope's vLLM plugin "
                f"does not serve `{base}` (it was exported for transformers only).", ""]
    return out


def _ppl_range(quality: dict, src: str, value) -> str:
    """A perplexity with its per-window 95 % range."""
    domains = (quality.get("ppl_interval") or {}).get(src) or {}
    iv = domains.get("all") or (next(iter(domains.values())) if len(domains) == 1 else None)
    return f"{_fmt(value)} [{iv[0]:.4g}–{iv[1]:.4g}]" if iv and isinstance(value, int | float) else _fmt(value)


def _score_range(metrics: dict, metric: str) -> str:
    """An lm-eval score with ±1.96 × lm-eval's standard error as its 95 % range."""
    from moescope.analysis.evaluation.uncertainty import stderr_interval

    value, se = metrics.get(metric), metrics.get(f"{metric}_stderr")
    if not isinstance(value, int | float) or not isinstance(se, int | float):
        return _fmt(value)
    iv = stderr_interval(value, se)
    return f"{_fmt(value)} [{iv.low:.4g}–{iv.high:.4g}]"


def _paired_cell(exp, column: str) -> str:
    """The paired verdict against the original (:func:`~moescope.analysis.run.verdicts.against`)."""
    from moescope.analysis.run.verdicts import against

    p, verdict = against(exp.reference, exp.result, column)
    return verdict if p is None else f"{verdict}, {p.text()}"


def _quality_table(exp) -> str:
    """Original and pruned quality, each with its 95 % range, the change, and the paired verdict
    against the original on the same windows / documents (none for a plain evaluation)."""
    rows = []
    for src, value in exp.result.get("ppl", {}).items():
        ref = exp.reference.get("ppl", {}).get(src)
        rows.append([f"perplexity {src}", _ppl_range(exp.reference, src, ref), _ppl_range(exp.result, src, value),
                     _pct(value, ref), _paired_cell(exp, f"ppl {src}")])
        domains = exp.result.get("ppl_domains", {}).get(src, {})
        if len(domains) > 1:
            for d, v in domains.items():
                if d != "all":
                    r = exp.reference.get("ppl_domains", {}).get(src, {}).get(d)
                    rows.append([f"  perplexity {d}", _fmt(r), _fmt(v), _pct(v, r), ""])
    for task, metrics in exp.result.get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "samples":
                continue
            ref_metrics = exp.reference.get("tasks", {}).get(task, {})
            ref = ref_metrics.get(metric)
            delta = f"{value - ref:+.4f}" if isinstance(ref, int | float) else "–"
            rows.append([f"{task} {metric}", _score_range(ref_metrics, metric), _score_range(metrics, metric), delta,
                         _paired_cell(exp, f"task: {task} {metric}")])
    if not rows:
        return "(no evaluation)"
    if not exp.plan:
        return _table(["metric", "original", "pruned", "change"], [r[:4] for r in rows])
    return (_table(["metric", "original [95 % range]", "pruned [95 % range]", "change",
                    "against the original (paired, 95 %)"], rows)
            + "\n\nThe last column compares the two models on the same windows and documents (a paired bootstrap "
              "of the per-window losses and per-document scores): better or worse only where the whole 95 % range "
              "of the change lies on one side of no change, else within noise.")


def quantization_section(report: dict | None) -> list[str]:
    """The model card's lines on a quantized checkpoint's format and its requantized merged tensors."""
    if not report:
        return []
    out = ["", "## Quantization", "", f"Written in the source's format: {report['scheme']}. Kept experts' stored "
           "tensors (weights and scales) are the source's bytes."]
    if report.get("requantized"):
        rows = [[f"`{name}`", f"{err:.4f}"] for name, err in sorted(report["requantized"].items())]
        out += ["", "Merged experts were computed from the dequantized members and quantized back with the scheme's "
                "rule; relative error ‖W − Q(W)‖ / ‖W‖ of each:", "",
                _table(["merged tensor", "relative quantization error"], rows)]
    if report.get("kept_bf16"):
        out += ["", f"Merged experts kept in bf16 (listed in `quantization_config.{report['not_converted_key']}`): "
                + ", ".join(f"`{m}`" for m in report["kept_bf16"])]
    return out
