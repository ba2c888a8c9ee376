"""Applying a drop or merge plan to a checkpoint on disk, shard by shard, without building the model.

A drop keeps some rows of the routed-expert tensors and of the router; a merge sums a few (permuted)
rows. Neither needs the model in memory, so :func:`write_pruned` reads the source's safetensors
tensor by tensor and writes the pruned folder's weights directly:

* every tensor the plan does not touch (attention, embeddings, dense layers, shared experts, the
  routers and experts of unlisted layers) is copied byte for byte by the kernel
  (``copy_file_range``), cast only where the requested dtype differs;
* a kept routed expert stored per expert (the hub layout, ``experts.N.w1`` / ``gate_proj``) is a
  renamed byte copy of its tensors; a merged one is read member by member, brought into
  transformers 5's fused form by transformers' own load converters, combined by the same code
  :meth:`MoEModel.merge` runs (:func:`analysis.edits.combine_rows`,
  :func:`analysis.merging.combine_tensors` with its permutations or folds), and written back in the
  checkpoint's form by transformers' save converters (``revert_weight_conversion``);
* experts stored fused on disk (GPT-OSS, Granite) are read one layer tensor at a time;
* router rows, router biases and score-correction biases follow :meth:`MoEModel.merge`.

The result is, tensor by tensor (names, dtypes, shapes, bytes), what ``load_moe(dtype) → apply →
save`` writes: transformers converts a checkpoint on load only with the conversions that match its
keys and reverts exactly those on save, and here the same conversions are applied to the same keys.
Output shards follow the source's (each written tensor goes to the shard of its first source
tensor), with a ``model.safetensors.index.json`` when there are several. Memory holds one merged
group (or one fused layer tensor) at a time; copies never enter the process.

Before the first byte is written the source passes :func:`analysis.model.checkpoint.validate_checkpoint`,
the validation the in-memory loader runs too (every header as safetensors checks it, the index
matching its shards, the tensor set and shapes the config implies); every tensor written, copied
ones included, is refused if it holds NaN or infinity. Errors name the file: a damaged or
ambiguous source, a write that fails (a full disk). The caller
writes into :func:`analysis.save.atomic_output_dir`'s temporary folder, so nothing half-written is
ever left at the output path, and the source is only read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model.checkpoint import (  # noqa: F401 (re-exported: the names this module always had)
    INDEX_FILE,
    SINGLE_FILE,
    ST_DTYPES,
    ST_NAMES,
    Conversions,
    SourceTensor,
    all_finite,
    check_finite,
    check_finite_run,
    read_header,
    read_tensor,
    source_tensors,
    validate_checkpoint,
)
from moescope.analysis.model.dtypes import cast_for_writing
from torch import Tensor


# ---- writing ---------------------------------------------------------------------------------
def _write(fh, data: memoryview) -> None:
    """Write all of ``data`` to the unbuffered file ``fh`` (tests replace it to fill the disk)."""
    data = data.cast("B")
    while data:
        n = fh.write(data)
        data = data[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``'s position, in the kernel."""
    while count > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.sendfile(dst_fd, src_fd, offset, count)
        if n == 0:
            raise OSError(errno.EIO, "the source file ended early")
        offset += n
        count -= n


def prefetch(parts: list[SourceTensor]) -> None:
    """Ask the kernel to start reading ``parts`` now (``POSIX_FADV_WILLNEED``), so the scattered
    rows of kept experts arrive in large requests while earlier ones are being copied."""
    runs: list[list] = []
    for t in sorted(parts, key=lambda t: (t.file.name, t.start)):
        if runs and runs[-1][0] == t.file and runs[-1][2] == t.start:
            runs[-1][2] = t.end
        else:
            runs.append([t.file, t.start, t.end])
    by_file: dict[Path, list] = defaultdict(list)
    for f, a, b in runs:
        by_file[f].append((a, b))
    for f, spans in by_file.items():
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            for a, b in spans:
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only
        finally:
            os.close(fd)


class ShardWriter:
    """A safetensors file written as its tensors come: a header region reserved up front (filled
    in, padded with spaces, when the file is closed), then each tensor's bytes in turn. Copies of
    source tensors that lie back to back on disk are joined into one kernel copy, checked first by
    ``check`` (called with the run's source tensors) as one read."""

    def __init__(self, path: Path, reserve: int, check=None):
        self.path = path
        self.reserve = -(-reserve // 8) * 8
        self.fh = open(path, "wb", buffering=0)
        self.fh.seek(8 + self.reserve)
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.pending: list = []  # [file, start, end] of a run of source bytes still to copy
        self.pending_parts: list[SourceTensor] = []  # the source tensors of that run
        self.check = check

    def _record(self, name: str, dtype: str, shape, nbytes: int) -> None:
        self.entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def add(self, name: str, tensor: Tensor) -> None:
        self._flush()
        t = tensor.detach().contiguous().cpu()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        self._guard(lambda: _write(self.fh, data))
        self._record(name, ST_NAMES[t.dtype], t.shape, t.numel() * t.element_size())

    def copy(self, name: str, src: SourceTensor) -> None:
        """``src``'s bytes as they are (same dtype), copied by the kernel."""
        run = self.pending
        if run and run[0] == src.file and run[2] == src.start:
            run[2] = src.end
        else:
            self._flush()
            self.pending = [src.file, src.start, src.end]
        self.pending_parts.append(src)
        self._record(name, src.dtype, src.shape, src.nbytes)

    def _flush(self) -> None:
        if not self.pending:
            return
        file, start, end = self.pending
        parts, self.pending, self.pending_parts = self.pending_parts, [], []
        if self.check is not None:
            self.check(parts)

        def run():
            with open(file, "rb") as s:
                _copy_range(s.fileno(), self.fh.fileno(), start, end - start)
        self._guard(run)

    def _guard(self, run) -> None:
        try:
            run()
        except OSError as err:  # name the file being written (a full disk says ENOSPC)
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from None

    def close(self) -> int:
        """Write the header; returns the bytes of tensor data."""
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        header = {"__metadata__": {"format": "pt"}, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self.reserve:  # cannot happen with write_pruned's reserve; kept as a guard
            raise MoescopeError(f"internal: the header of '{self.path}' outgrew its reserved space")
        raw += b" " * (self.reserve - len(raw))

        def run():
            self.fh.seek(0)
            _write(self.fh, memoryview(struct.pack("<Q", len(raw)) + raw))
            self.fh.close()
        self._guard(run)
        return self.offset

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()


# ---- transformers' checkpoint conversions, applied to a few tensors at a time ------------------
# ---- the plan, layer by layer ----------------------------------------------------------------
def _block_path(spec, layer: int) -> str:
    return f"{spec.layers_path}.{layer}.{spec.mlp_attr}"


def router_targets(view, layer: int) -> dict[str, str]:
    """In-memory names of the layer's router tensors that :meth:`MoEModel.merge` rewrites (attribute
    path → state-dict name), where the family has them."""
    from moescope.analysis.model.layouts import resolve

    spec = view.spec
    block = _block_path(spec, layer)
    out = {}
    for attr in (spec.router_weight_attr, spec.router_bias_attr, spec.score_bias_attr):
        if not attr or resolve(view.block, view.router, attr) is None:
            continue
        out[attr] = f"{block}.{attr[len('block.'):]}" if attr.startswith("block.") else f"{block}.{spec.router_attr}.{attr}"
    return out


def expert_targets(view, layer: int) -> list[str]:
    spec = view.spec
    return [f"{_block_path(spec, layer)}.{spec.experts_attr}.{n}" for n in view.expert_param_names()]


_EXPERT_INDEX = r"\.{attr}\.(\d+)\."


def _renumber(key: str, attr: str, new: int) -> str:
    m = re.search(_EXPERT_INDEX.format(attr=re.escape(attr)), key)
    return key[: m.start(1)] + str(new) + key[m.end(1):]


@dataclass
class LayerSources:
    """The checkpoint tensors one edited layer is made of."""

    per_expert: dict[int, list[str]]  # expert → its checkpoint keys (hub layout), or empty
    fused: list[str]  # checkpoint keys of experts stored fused (GPT-OSS, Granite), or empty
    router: list[str]


def layer_sources(conv: Conversions, view, layer: int, tensors: dict[str, SourceTensor], where: Path) -> LayerSources:
    """Group the checkpoint keys of ``layer``'s routed experts and router; refuse a checkpoint that
    lacks any of them (one line naming the folder and the tensor)."""
    spec = view.spec
    experts = set(expert_targets(view, layer))
    routers = set(router_targets(view, layer).values())
    index_re = re.compile(_EXPERT_INDEX.format(attr=re.escape(spec.experts_attr)))
    per_expert: dict[int, list[str]] = defaultdict(list)
    fused, router, seen = [], [], set()
    for key in tensors:
        name, _ = conv.targets[key]
        if name in experts:
            m = index_re.search(key)
            (per_expert[int(m.group(1))] if m else fused).append(key)
            seen.add(name)
        elif name in routers:
            router.append(key)
            seen.add(name)
    lacking = sorted((experts | routers) - seen)
    n = view.num_experts
    if not lacking and per_expert:
        counts = {e: len(k) for e, k in per_expert.items()}
        full = max(counts.values())
        short = [e for e in range(n) if counts.get(e, 0) < full]
        if short:
            lacking = [f"{spec.experts_attr}.{short[0]} (of {len(short)} incomplete experts)"]
    if lacking:
        raise MoescopeError(f"'{where}' has no tensor for {lacking[0]} of layer {layer}, which the plan edits; "
                            "the checkpoint is incomplete (or not of the model its config.json describes)")
    return LayerSources(dict(per_expert), fused, router)


@dataclass
class Unit:
    """One piece of output: a tensor copied as it is, or an edited layer's experts / router."""

    kind: str  # "copy" | "experts" | "router"
    first: str  # the checkpoint key that places it (its shard)
    key: str = ""  # copy: the checkpoint key
    layer: int = -1


def write_pruned(source_dir: Path, skeleton, plan, out: Path, dtype: torch.dtype | None = None,
                 progress=None, keep_merged: str | None = None) -> dict:
    """Write ``plan`` applied to the checkpoint in ``source_dir`` as safetensors shards (and an
    index) into the existing folder ``out``. ``skeleton`` is the source's weightless model
    (``load_moe(..., weights=False)``, unedited; the plan validated against it), which comes back
    cut to the plan's structure (expert counts, config) for the config and the card. ``dtype`` casts
    like ``load_moe(dtype=...)`` (None: every tensor keeps its checkpoint dtype).
    ``progress(stage, done, total)`` counts the pieces written (tensors copied, edited layers'
    experts and routers). Returns the tensor bytes read and written.

    A quantized checkpoint (:mod:`analysis.model.quantization`) keeps its format and dtypes whatever
    ``dtype`` says: kept experts' stored tensors (weights and scales) are copied as they are, merged
    ones are requantized (``keep_merged="bf16"``: written in bf16 and listed as not converted), see
    :mod:`analysis.model.quantized_export`."""
    from moescope.analysis.model.checkpoint import saved_names
    from moescope.analysis.model.edits import combine_rows, onehot_of_largest, validate_groups

    # every header and the tensor set against the config (a quantized checkpoint: its stored tensors
    # against its scheme), before the first byte is written
    tensors, conv = validate_checkpoint(source_dir, skeleton.hf, dtype)
    from moescope.analysis.model.quantization import scheme_of_folder

    quant = scheme_of_folder(source_dir)  # a quantized checkpoint (checked against its scheme above) keeps its format
    if quant is not None:
        dtype = None
        for key in tensors:  # scales and packed parts go where the weight they belong to goes
            own = quant.owner(key)
            if own is not None:
                conv.targets[key] = conv.target(own)
        skeleton.hf._weight_conversions = [t for t in conv.transforms if t.was_used()]  # the owners' conversions
    saved = saved_names(skeleton.hf)
    # checkpoint keys the model does not save (tied weights) are left out, as saving leaves them out;
    # the rest in the order of their bytes on disk, so reads run forward through each shard
    kept_keys = sorted((k for k in tensors if conv.targets[k][0] in saved),
                       key=lambda k: (tensors[k].file.name, tensors[k].start))

    layers = {int(l): lp for l, lp in plan.layers.items()}
    # each edited layer looks only at the keys whose in-memory names are its experts' and router's
    by_target: dict[str, list[str]] = defaultdict(list)
    for i, k in enumerate(kept_keys):
        by_target[conv.targets[k][0]].append((i, k))

    def of_layer(l: int) -> dict[str, SourceTensor]:
        view = skeleton.layers[l]
        names = {*expert_targets(view, l), *router_targets(view, l).values()}
        return {k: tensors[k] for _, k in sorted(ik for n in names for ik in by_target.get(n, ()))}

    sources = {l: layer_sources(conv, skeleton.layers[l], l, of_layer(l), source_dir) for l in sorted(layers)}
    edited = {k: l for l, s in sources.items() for k in
              [*s.fused, *s.router, *(k for ks in s.per_expert.values() for k in ks)]}

    # units of output, placed in the shard of their first checkpoint tensor
    units: list[Unit] = []
    placed: set = set()
    for key in kept_keys:
        if key not in edited:
            units.append(Unit("copy", key, key=key))
            continue
        l = edited[key]
        s = sources[l]
        if ("router", l) not in placed and key in s.router:
            placed.add(("router", l))
            units.append(Unit("router", key, layer=l))
        elif ("experts", l) not in placed and key not in s.router:
            placed.add(("experts", l))
            units.append(Unit("experts", key, layer=l))
    files = sorted({t.file for t in tensors.values()}, key=lambda p: p.name)
    by_file: dict[Path, list[Unit]] = {f: [] for f in files}
    for u in units:
        by_file[tensors[u.first].file].append(u)

    stats = {"bytes_read": 0, "bytes_written": 0, "copied_bytes": 0, "requantized": {}}
    written: list[tuple[Path, dict]] = []

    def emit(writer: ShardWriter, name: str, t: Tensor) -> None:
        # a computed tensor (a merge, a cast) holding NaN or infinity is never written as a result
        writer._flush()  # (the copies before it are checked first)
        if not all_finite(t):
            raise MoescopeError(f"{name} holds non-finite values (NaN or infinity) after pruning; nothing was exported")
        writer.add(name, t)
        stats["bytes_written"] += t.numel() * t.element_size()

    def copy_or_cast(writer: ShardWriter, out_name: str, key: str) -> None:
        src = tensors[key]
        want = conv.target_dtype(conv.targets[key][0], ST_DTYPES[src.dtype])
        stats["bytes_read"] += src.nbytes
        if ST_NAMES.get(want) == src.dtype:
            writer.copy(out_name, src)  # checked for NaN and infinity with its run, as a computed tensor is
            stats["bytes_written"] += src.nbytes
            stats["copied_bytes"] += src.nbytes
        else:
            emit(writer, out_name, cast_for_writing(read_tensor(src), want, out_name))

    def read(key: str) -> Tensor:
        stats["bytes_read"] += tensors[key].nbytes
        return read_tensor(tensors[key])

    data_bytes: dict[Path, int] = defaultdict(int)
    for t in tensors.values():
        data_bytes[t.file] += t.nbytes
    done = 0
    for i, f in enumerate(files):
        todo = by_file[f]
        if not todo:
            continue
        src_header = f.stat().st_size - data_bytes[f]
        n_out = sum(1 for _ in todo) + sum(
            sum(len(k) for k in sources[u.layer].per_expert.values()) + 8 for u in todo if u.kind != "copy")
        path = out / f"{f.stem}.moescope-part{i:05d}.safetensors"
        writer = ShardWriter(path, reserve=2 * src_header + 160 * n_out + 4096,
                             check=partial(check_finite_run, what="; nothing was exported"))
        try:
            for u in todo:
                if progress:
                    progress("stream export", done, len(units))
                done += 1
                if u.kind == "copy":
                    copy_or_cast(writer, u.key, u.key)
                    continue
                view, lp, s = skeleton.layers[u.layer], layers[u.layer], sources[u.layer]
                coeffs = validate_groups(view, lp.groups, lp.coefficients)
                if u.kind == "router":
                    _write_router(conv, view, lp, coeffs, s, read, partial(emit, writer), combine_rows,
                                  onehot_of_largest)
                elif quant is not None:
                    from moescope.analysis.model.quantized_export import write_quantized_experts

                    write_quantized_experts(quant, conv, view, lp, coeffs, s, read, partial(emit, writer),
                                            partial(copy_or_cast, writer), partial(_combine, view, lp),
                                            combine_rows, _renumber, not _plain(lp),
                                            lambda k: (tensors[k].file.name, tensors[k].start),
                                            lambda keys: prefetch([tensors[k] for k in keys]), stats, keep_merged)
                else:
                    _write_experts(conv, view, lp, coeffs, s, read, partial(emit, writer),
                                   partial(copy_or_cast, writer), combine_rows,
                                   lambda k: (tensors[k].file.name, tensors[k].start),
                                   lambda keys: prefetch([tensors[k] for k in keys]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if writer.entries:
            written.append((path, writer.entries))
        else:
            path.unlink()
    if progress:
        progress("stream export", len(units), len(units))
    for l, lp in sorted(layers.items()):  # the skeleton takes the plan's structure (it has no weights)
        skeleton.merge(l, [[g[0]] for g in lp.groups], None)
    if quant is not None:
        from moescope.analysis.model.quantized_export import finish_config

        finish_config(quant, skeleton, plan, stats, keep_merged)
    _finish_shards(out, written, skeleton)
    return stats


def _aligned(lp) -> bool:
    perms = lp.permutations
    return perms is not None and any(p is not None for ps in perms for p in (ps or []))


def _plain(lp) -> bool:
    """Whether ``lp``'s experts are plain weighted sums of rows (no permutation, fold or TIES), so
    that a kept expert is a byte copy; decided for the whole layer, as :meth:`MoEModel.merge` does."""
    return not _aligned(lp) and not lp.folded() and lp.operator == "linear"


def _combine(view, lp, fused: dict[str, Tensor], groups, coeffs, perms, combine_rows, folds=None) -> dict[str, Tensor]:
    """:meth:`MoEModel.merge`'s expert arithmetic on ``fused`` (in-memory form) for ``groups`` with
    ``perms`` and ``folds`` (per group, per member). Whether the members go through the aligned path
    is decided for the whole layer ``lp``, as :meth:`MoEModel.merge` decides it."""
    if not _plain(lp):
        from moescope.analysis.model.merging import combine_tensors

        short = {n.rpartition(".")[2]: n for n in fused}  # the experts module's parameter names
        combined = combine_tensors(view, groups, coeffs, perms, lp.operator, 0.2 if lp.density is None else lp.density,
                                   tensors={p: fused[n] for p, n in short.items()},
                                   folds=folds if lp.folded() else None)
        return {n: combined[p].to(fused[n].dtype).contiguous() for p, n in short.items()}
    return {n: combine_rows(t, groups, coeffs) for n, t in fused.items()}


def _write_experts(conv, view, lp, coeffs, s: LayerSources, read, emit, copy, combine_rows, offset, prefetch) -> None:
    attr = view.spec.experts_attr
    plain = _plain(lp)
    if s.per_expert:
        kept = [(offset(key), _renumber(key, attr, j), key) for j, (g, c) in enumerate(zip(lp.groups, coeffs, strict=True))
                if plain and len(g) == 1 and c[0] == 1.0 for key in s.per_expert[g[0]]]
        prefetch([key for _, _, key in kept])
        for _, name, key in sorted(kept):  # kept experts: their tensors renumbered, in the order on disk
            copy(name, key)
        for j, (g, c) in enumerate(zip(lp.groups, coeffs, strict=True)):
            if plain and len(g) == 1 and c[0] == 1.0:
                continue
            # the members, held as experts 0..n-1 of a one-group layer, combined exactly as group j
            mini = {_renumber(key, attr, i): read(key) for i, e in enumerate(g) for key in s.per_expert[e]}
            fused = conv.forward(mini)
            perms = [lp.permutations[j]] if lp.permutations is not None else None
            folds = [lp.folds[j]] if lp.folds is not None else None
            merged = _combine(view, lp, fused, [list(range(len(g)))], [c], perms, combine_rows, folds)
            del mini, fused
            for name, t in conv.revert(merged).items():
                emit(_renumber(name, attr, j), t)
        return
    full = conv.forward({k: read(k) for k in s.fused})
    merged = _combine(view, lp, full, [list(g) for g in lp.groups], coeffs, lp.permutations, combine_rows, lp.folds)
    del full
    for name, t in conv.revert(merged).items():
        emit(name, t)


def _write_router(conv, view, lp, coeffs, s: LayerSources, read, emit, combine_rows, onehot_of_largest) -> None:
    from moescope.analysis.model.edits import validate_groups

    current = conv.forward({k: read(k) for k in s.router})
    targets = router_targets(view, view.index)
    groups = [list(g) for g in lp.groups]
    # the router rows' own coefficients where the plan gives them (the learned merge), as MoEModel.merge
    rows = coeffs if lp.router_coefficients is None else validate_groups(view, groups, lp.router_coefficients)
    row_coeffs = rows if lp.merge_router else onehot_of_largest(rows)
    new = {}
    for attr, name in targets.items():
        old = current[name]
        if old.dim() == 2 and old.shape[0] == 1 and attr != view.spec.router_weight_attr:
            new[name] = combine_rows(old[0], groups, row_coeffs)[None]  # [1, E] bias (ERNIE)
        else:
            new[name] = combine_rows(old, groups, row_coeffs)
    for name, t in conv.revert(new).items():
        emit(name, t)


def _finish_shards(out: Path, written: list[tuple[Path, dict]], skeleton) -> None:
    """Name the shards as ``save_pretrained`` does and write the index when there are several."""
    if len(written) == 1:
        os.replace(written[0][0], out / SINGLE_FILE)
        return
    weight_map, total = {}, 0
    n = len(written)
    for i, (path, entries) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path, out / name)
        for tensor, info in entries.items():
            weight_map[tensor] = name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    index = {"metadata": {"total_parameters": int(skeleton.hf.num_parameters()), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
