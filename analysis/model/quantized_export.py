"""A plan applied to a quantized checkpoint, in the checkpoint's own format (the part of
:func:`analysis.model.stream_export.write_pruned` that knows about :mod:`analysis.model.quantization`).

* A kept expert stored per expert (FP8 and compressed-tensors: ``experts.N.gate_proj.weight`` +
  ``weight_scale_inv`` / ``weight_scale``, or ``weight_packed`` + ``weight_scale`` + ``weight_shape``)
  is a renamed byte copy of all its stored tensors.
* Experts stored fused (gpt-oss MXFP4: ``experts.gate_up_proj_blocks`` [E, ...], ``_scales``,
  ``_bias``) keep the plan's rows of each stored tensor, byte for byte.
* A merged expert (folded ones too, HC-SMoE's ``fix-dom-same``) is computed from its dequantized
  members by the same code as an unquantized merge and quantized back with the scheme's rule; its
  relative error ‖W − Q(W)‖ / ‖W‖ is recorded for the model card. With ``keep_merged="bf16"`` (block
  FP8 only) a layer holding a merged expert is written in bf16 whole — transformers fuses a layer's
  experts and dequantizes them together, so it cannot mix FP8 and bf16 experts in one layer — and
  the layer's experts module (``model.layers.N.mlp.experts``) is listed in
  ``quantization_config.modules_to_not_convert``. compressed-tensors' loader refuses such a module
  and MXFP4 fuses the experts on disk: both are refused in one line.
* The config's skip lists follow the plan (:func:`~analysis.model.quantization.renumber_config`).
"""

from __future__ import annotations

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.quantization import Scheme, not_converted_key, relative_error, renumber_config

KEEP_MERGED = ("bf16",)


def check_keep_merged(scheme: Scheme | None, keep_merged: str | None) -> None:
    """Refuse ``--merged-dtype`` where the checkpoint cannot hold it, in one line naming the setting."""
    if keep_merged is None:
        return
    if keep_merged not in KEEP_MERGED:
        raise MoescopeError(f"--merged-dtype {keep_merged!r} is not known; accepted: {', '.join(KEEP_MERGED)}")
    if scheme is None:
        raise MoescopeError("--merged-dtype bf16 applies to quantized checkpoints; this one is not quantized")
    if scheme.format == "mxfp4":
        raise MoescopeError("--merged-dtype bf16: mxfp4 (gpt-oss) stores a layer's experts as one fused tensor, "
                            "which cannot mix bf16 and mxfp4 experts; merged experts are requantized to mxfp4")
    if scheme.method == "compressed-tensors":
        raise MoescopeError(f"--merged-dtype bf16: a compressed-tensors checkpoint ({scheme.format}) cannot hold bf16 "
                            "experts: transformers' loader fuses a layer's experts and refuses an unquantized one "
                            "listed in ignore; merged experts are requantized with the scheme's rule")


def _suffix(key: str) -> str:
    return key.rpartition(".")[2]


def write_quantized_experts(quant: Scheme, conv, view, lp, coeffs, s, read, emit, copy, combine, combine_rows,
                            renumber, recomputed: bool, offset, prefetch, stats: dict, keep_merged: str | None) -> None:
    """``recomputed``: the layer's experts are computed, not row sums (permuted, folded or TIES), so
    even a group of one is dequantized, recomputed and requantized, as the in-memory path computes it."""
    attr = view.spec.experts_attr
    plain = not recomputed
    single = [plain and len(g) == 1 and c[0] == 1.0 for g, c in zip(lp.groups, coeffs, strict=True)]
    if s.per_expert:
        if keep_merged == "bf16" and not all(single):
            # transformers fuses a layer's experts and dequantizes them together: a layer holding a merged
            # expert is written in bf16 whole and listed in modules_to_not_convert
            single = [False] * len(single)
            stats.setdefault("kept_bf16", []).append(next(iter(s.per_expert.values()))[0].split(f".{attr}.")[0]
                                                     + f".{attr}")
        kept = [(offset(key), renumber(key, attr, j), key) for j, g in enumerate(lp.groups) if single[j]
                for key in s.per_expert[g[0]]]
        prefetch([key for _, _, key in kept])
        for _, name, key in sorted(kept):  # kept experts: every stored tensor, renumbered, as it is
            copy(name, key)
        for j, (g, c) in enumerate(zip(lp.groups, coeffs, strict=True)):
            if single[j]:
                continue
            mini, like = {}, {}
            for i, e in enumerate(g):
                member = {key: read(key) for key in s.per_expert[e]}
                like.update({_suffix(k): t.dtype for k, t in member.items()})
                mini.update({renumber(k, attr, i): t for k, t in quant.dequantize(member).items()})
            fused = conv.forward(mini)
            perms = [lp.permutations[j]] if lp.permutations is not None else None
            folds = [lp.folds[j]] if lp.folds is not None else None
            merged = combine(fused, [list(range(len(g)))], [c], perms, combine_rows, folds)
            del mini, fused
            for name, t in conv.revert(merged).items():
                _emit_merged(quant, renumber(name, attr, j), t, like, emit, stats, keep_merged)
        return
    raw = {k: read(k) for k in s.fused}
    keep = torch.tensor([g[0] for g in lp.groups])
    if all(single):  # a drop: the kept rows of every stored tensor, byte for byte
        for k in sorted(raw, key=offset):
            emit(k, raw[k].index_select(0, keep).contiguous())
        return
    full = conv.forward(quant.dequantize(raw))
    merged = combine(full, [list(g) for g in lp.groups], coeffs, lp.permutations, combine_rows, lp.folds)
    del full
    rows = [j for j in range(len(lp.groups)) if single[j]]
    for name, t in conv.revert(merged).items():
        stored = {k for k in raw if quant.owner(k) == name}
        if not stored:
            emit(name, t)
            continue
        _check_finite(name, t)
        new = quant.quantize(name, t)
        back = quant.dequantize(dict(new))[name]
        for j in range(len(lp.groups)):
            if not single[j]:
                stats["requantized"][f"{name}[{j}]"] = relative_error(t[j], back[j])
        for k, v in new.items():
            if rows:  # kept experts' rows as they were stored
                v[rows] = raw[k][[lp.groups[j][0] for j in rows]]
            emit(k, v)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise MoescopeError(f"{name} holds non-finite values (NaN or infinity) after pruning; nothing was exported")


def _emit_merged(quant: Scheme, name: str, t: torch.Tensor, like: dict, emit, stats: dict,
                 keep_merged: str | None) -> None:
    _check_finite(name, t)
    if keep_merged == "bf16":
        emit(name, t.to(torch.bfloat16))
        return
    base = name.rpartition(".")[0]
    new = quant.quantize(name, t, like={f"{base}.{k}": v for k, v in like.items()})
    stats["requantized"][name] = relative_error(t, quant.dequantize(dict(new))[name])
    for k, v in new.items():
        emit(k, v)


def finish_config(quant: Scheme, skeleton, plan, stats: dict, keep_merged: str | None) -> None:
    """The cut skeleton's ``quantization_config`` after the plan, and what the model card reports."""
    config = skeleton.hf.config
    q = config.quantization_config
    q = dict(q) if isinstance(q, dict) else q.to_dict()
    renames: dict[int, dict[int, int | None]] = {}
    for l, lp in plan.layers.items():
        renames[int(l)] = {g[0]: j for j, g in enumerate(lp.groups) if len(g) == 1}
    q = renumber_config(q, renames)
    if stats.get("kept_bf16"):
        key = not_converted_key(quant)
        q[key] = list(q.get(key) or []) + sorted(set(stats["kept_bf16"]))
    config.quantization_config = q
    skeleton.quantization_report = {"scheme": quant.describe(), "requantized": dict(stats["requantized"]),
                                    "kept_bf16": sorted(set(stats.get("kept_bf16", []))),
                                    "not_converted_key": not_converted_key(quant)}


def export_bytes(folder, plan, num_experts: dict[int, int]) -> int:
    """The tensor bytes a drop of ``plan`` writes from the quantized checkpoint in ``folder`` (its
    stored bytes less the removed share of each edited layer's routed experts), for the free-space
    check before any work; a merged expert counts as one kept expert."""
    import re
    from pathlib import Path

    from moescope.analysis.model.model_info import stored_tensors

    layers = {int(l): lp for l, lp in plan.layers.items()}
    total, routed = 0, {l: 0 for l in layers}
    pattern = re.compile(r"layers\.(\d+)\..*\.experts\.")
    for t in stored_tensors(Path(folder)):
        total += t.nbytes
        m = pattern.search(t.name)
        if m and int(m[1]) in routed:
            routed[int(m[1])] += t.nbytes
    for l, lp in layers.items():  # num_experts: each edited layer's experts before the plan
        total -= routed[l] - routed[l] * lp.num_out // num_experts[l]
    return total
