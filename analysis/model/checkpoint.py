"""What a safetensors model folder holds, checked before any weight is read: one validation that
the streamed export (:mod:`.stream_export`) and the in-memory loader (:func:`.loading.load_moe`)
both run, so both refuse the same folders with the same line.

* :func:`validate_header` checks one shard's header as the safetensors library checks it: a JSON
  object of entries ``{dtype, shape, data_offsets}`` (plus an optional ``__metadata__`` of strings),
  each a known dtype, a shape of non-negative integers and offsets ``[begin, end]`` whose length is
  ``numel × itemsize``; the entries, ordered by offset, tile the data region exactly (no gap, no
  overlap, nothing beyond the file's end). A format with other dtypes (FP8 scales, MXFP4 blocks,
  packed integers) adds them to :data:`ST_DTYPES` / :data:`ST_BITS`.
* :func:`source_tensors` reads a folder: ``model.safetensors``, or the shards an index names. The
  index must match its shards (each tensor where the index places it, and nowhere else: one tensor
  in one place), and a folder holding both ``model.safetensors`` and an index of other shards is
  refused as ambiguous (transformers and the stream would read different models).
* :func:`check_tensor_set` compares the tensors with what the config implies: every checkpoint
  tensor is taken, as a shape without bytes (the meta device), through transformers' own load-time
  conversions (:class:`Conversions`, the renamings and expert fusions ``from_pretrained`` applies),
  and the result must name exactly the model's saved parameters with their shapes. A missing
  weight (which transformers would initialise at random and report as "newly initialized"), an
  extra one (an expert beyond the config's count) or a wrong shape is refused in one line.
* :func:`check_finite` reads a stored tensor in chunks and refuses NaN or infinity in it.

Every error is one line naming the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from moescope.analysis.core.errors import MoescopeError
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# safetensors dtype names ⇄ torch dtypes, and each one's width in bits
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ST_BITS = {name: torch.empty((), dtype=d).element_size() * 8 for name, d in ST_DTYPES.items()}


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes lie in a source shard."""

    name: str
    file: Path
    dtype: str  # safetensors name (BF16, F32, ...)
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# ---- one shard's header ------------------------------------------------------------------------
def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def validate_header(header, data_size: int, path: Path, base: int = 0) -> dict[str, SourceTensor]:
    """The tensors a parsed safetensors header describes, checked as the safetensors library checks
    them; ``data_size`` is the byte count after the header, ``base`` the header's end in the file
    (added to the offsets). One line naming ``path`` and the entry for anything wrong."""
    def bad(what: str) -> MoescopeError:
        return MoescopeError(f"'{path}' is not a valid safetensors file: {what}")

    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object of tensors")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise bad("its __metadata__ is not an object of strings")
    spans = []
    out: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(f"tensor {name} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            raise bad(f"tensor {name} has dtype {str(dtype)[:20]!r}; moescope reads {', '.join(ST_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {name} has shape {json.dumps(shape)[:40]}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"tensor {name} has data_offsets {json.dumps(offsets)[:40]}, not [begin, end] with "
                      "0 ≤ begin ≤ end")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ST_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
            raise bad(f"tensor {name} ({dtype} {shape}) needs {numel * ST_BITS[dtype] // 8} bytes but its "
                      f"data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = SourceTensor(name, path, dtype, tuple(shape), base + offsets[0], base + offsets[1])
    pos, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise bad(f"tensor {name} overlaps tensor {last} (data_offsets {begin} < {pos})")
        if begin > pos:
            raise bad(f"bytes {pos}..{begin} before tensor {name} belong to no tensor")
        pos, last = end, name
    if pos != data_size:
        raise bad(f"its tensors end at byte {pos} of a data region of {data_size} bytes "
                  + ("(the file is truncated)" if pos > data_size else "(bytes at the end belong to no tensor)"))
    return out


def _unique_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


_PARSED: dict[tuple, dict[str, SourceTensor]] = {}  # read_header's results, by file identity and version
_PARSED_FILES = 4096


def read_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file (its header only, validated), or one line naming the file.
    A file is parsed once per process while it is unchanged (same inode, size and modification time):
    the export's validation and its model card read the same headers."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MoescopeError(f"'{path}' is missing; the model folder is incomplete") from None
    except OSError as err:
        raise MoescopeError(f"cannot read '{path}': {err.strerror or err}") from None
    version = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if version not in _PARSED:
        if len(_PARSED) >= _PARSED_FILES:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[version] = _parse_header(path)
    return dict(_PARSED[version])  # (the path is the same file, spelt the same: it is in the key)


def _parse_header(path: Path) -> dict[str, SourceTensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("its header length is larger than the file")
            text = fh.read(n).decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("its header is not a JSON object")
        header = json.loads(text, object_pairs_hook=_unique_object)
    except FileNotFoundError:
        raise MoescopeError(f"'{path}' is missing; the model folder is incomplete") from None
    except OSError as err:
        raise MoescopeError(f"cannot read '{path}': {err.strerror or err}") from None
    except RecursionError:
        raise MoescopeError(f"'{path}' is not a safetensors file (its header is nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise MoescopeError(f"'{path}' is not a safetensors file ({' '.join(str(err).split())[:160]})") from None
    return validate_header(header, size - 8 - n, path, base=8 + n)


# ---- a folder of shards ------------------------------------------------------------------------
def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_unique_object)
    except (OSError, UnicodeDecodeError) as err:
        raise MoescopeError(f"cannot read '{index}': {getattr(err, 'strerror', None) or err}") from None
    except RecursionError:
        raise MoescopeError(f"'{index}' is not a safetensors index (nested too deeply)") from None
    except ValueError as err:
        raise MoescopeError(f"'{index}' is not a safetensors index ({' '.join(str(err).split())[:160]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MoescopeError(f"'{index}' is not a safetensors index: it needs a weight_map object of tensor → file")
    for file in set(weight_map.values()):
        if Path(file).name != file or not file.endswith(".safetensors"):
            raise MoescopeError(f"'{index}' names the shard {file[:60]!r}; shards are .safetensors files in the "
                                "index's own folder")
    return weight_map


def source_tensors(folder: Path) -> dict[str, SourceTensor]:
    """Every tensor of a model folder's safetensors, each header validated: through
    ``model.safetensors.index.json`` when there is one (each file it names must exist and hold
    exactly the tensors it places there), else ``model.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        if (folder / SINGLE_FILE).is_file() and SINGLE_FILE not in set(weight_map.values()):
            raise MoescopeError(f"'{folder}' holds both {SINGLE_FILE} and {INDEX_FILE} (which names other shards): "
                                "it is unclear which is the model; remove the one that is not")
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            by_file[file].append(name)
        out: dict[str, SourceTensor] = {}
        for file, names in sorted(by_file.items()):
            header = read_header(folder / file)
            lacking = [n for n in names if n not in header]
            if lacking:
                raise MoescopeError(f"'{folder / file}' does not hold {lacking[0]}"
                                    + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
                                    + f", which '{index.name}' places there; the shards do not match their index")
            for name in header:
                if weight_map.get(name) != file:
                    where = (f"the index places it in '{weight_map[name]}'" if name in weight_map
                             else "the index does not list it")
                    raise MoescopeError(f"'{folder / file}' holds {name} but {where}; a tensor must be in one "
                                        "place, the one its index names")
            out.update(header)
        return out
    if (folder / SINGLE_FILE).is_file():
        return read_header(folder / SINGLE_FILE)
    raise MoescopeError(f"'{folder}' holds no {SINGLE_FILE} or {INDEX_FILE}; moescope reads safetensors checkpoints")


def read_tensor(t: SourceTensor) -> Tensor:
    """One tensor's bytes from disk, as a torch tensor owning its memory."""
    with open(t.file, "rb") as fh:
        fh.seek(t.start)
        buf = bytearray(t.nbytes)
        if fh.readinto(buf) != t.nbytes:
            raise MoescopeError(f"'{t.file}' ends inside tensor {t.name}; the file is truncated")
    dtype = ST_DTYPES[t.dtype]
    if not buf:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)


CHUNK_BYTES = 64 * 2**20
_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float8 bits that are not finite: E4M3FN has no infinity and NaN is S.1111.111; E5M2 has IEEE-style
# infinity and NaN, exponent S.11111.xx
_FP8_NAN_MASKS = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite. For the common float dtypes through ``aminmax``
    (NaN and ±inf reach the minimum or maximum), several times faster than ``isfinite(t).all()``,
    which allocates a mask as large as the tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in _FP8_NAN_MASKS:  # torch has no isfinite for float8: read the bit patterns (OCP FP8)
        mask = _FP8_NAN_MASKS[t.dtype]
        return not bool(((t.reshape(-1).view(torch.uint8) & mask) == mask).any())
    if t.dtype in _MINMAX_DTYPES:
        lo, hi = torch.aminmax(t.reshape(-1))
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    return bool(torch.isfinite(t).all())


def _check_mapped(t: SourceTensor, dtype: torch.dtype, step: int, what: str) -> bool:
    """:func:`check_finite` through a read-only mapping of the file (the pages are checked where the
    page cache holds them, no copy into this process: a third of the CPU time of reading, and the
    export's kernel copy then finds them cached). False where the file cannot be mapped or the
    tensor is not aligned to its element size (the caller reads it instead)."""
    width = torch.empty((), dtype=dtype).element_size()
    if t.start % width:
        return False
    try:
        fh = open(t.file, "rb")
    except OSError:
        return False
    with fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return False
        with mm:
            if len(mm) < t.start + t.nbytes:
                raise MoescopeError(f"'{t.file}' ends inside tensor {t.name}; the file is truncated")
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                mm.madvise(mmap.MADV_SEQUENTIAL, t.start - t.start % mmap.PAGESIZE,
                           t.nbytes + t.start % mmap.PAGESIZE)
            with warnings.catch_warnings():  # read-only on purpose: the values are only read
                warnings.simplefilter("ignore", UserWarning)
                for o in range(t.start, t.start + t.nbytes, step):
                    n = min(step, t.start + t.nbytes - o)
                    if not all_finite(torch.frombuffer(mm, dtype=dtype, count=n // width, offset=o)):
                        raise MoescopeError(f"tensor {t.name} in '{t.file}' holds non-finite values (NaN or "
                                            f"infinity){what}")
    return True


def check_finite(t: SourceTensor, what: str = "") -> None:
    """Refuse a stored floating-point tensor holding NaN or infinity (checked in 64 MB chunks, through a
    mapping of the file where it can be mapped, else read)."""
    dtype = ST_DTYPES[t.dtype]
    if not dtype.is_floating_point or t.nbytes == 0:
        return
    step = CHUNK_BYTES - CHUNK_BYTES % torch.empty((), dtype=dtype).element_size()
    if _check_mapped(t, dtype, step, what):
        return
    buf = bytearray(min(step, t.nbytes))
    with open(t.file, "rb", buffering=0) as fh:
        fh.seek(t.start)
        left = t.nbytes
        while left:
            n = min(step, left)
            view = memoryview(buf)[:n]
            if fh.readinto(view) != n:
                raise MoescopeError(f"'{t.file}' ends inside tensor {t.name}; the file is truncated")
            if not all_finite(torch.frombuffer(view, dtype=dtype)):
                raise MoescopeError(f"tensor {t.name} in '{t.file}' holds non-finite values (NaN or infinity)"
                                    f"{what}")
            left -= n


def check_finite_run(parts: list[SourceTensor], what: str = "") -> None:
    """:func:`check_finite` of tensors lying back to back in one file, each stretch of one dtype
    read and checked as one tensor (a stretch that fails is checked again tensor by tensor, so the
    line names the tensor)."""
    i = 0
    while i < len(parts):
        j = i + 1
        while j < len(parts) and parts[j].dtype == parts[i].dtype and parts[j].start == parts[j - 1].end:
            j += 1
        first, last = parts[i], parts[j - 1]
        numel = (last.end - first.start) * 8 // ST_BITS[first.dtype]
        try:
            check_finite(SourceTensor(first.name, first.file, first.dtype, (numel,), first.start, last.end), what)
        except MoescopeError:
            for t in parts[i:j]:
                check_finite(t, what)
            raise
        i = j


# ---- the tensor set the config implies ---------------------------------------------------------
class Conversions:
    """transformers 5's load-time key conversions of ``hf`` (a weightless skeleton of the source's
    class), decided once from the source's key names as ``from_pretrained`` decides them; then
    :meth:`forward` (checkpoint → in-memory form) and :meth:`revert` (back, as ``save_pretrained``
    does) on any subset of tensors."""

    def __init__(self, hf, keys, dtype: torch.dtype | None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, build_glob_alternation

        self.hf = hf
        self.transforms = get_model_conversion_mapping(hf)
        self.renamings = [t for t in self.transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in self.transforms if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.meta = hf.state_dict()
        self.prefix = getattr(hf, "base_model_prefix", None)
        self.dtype = dtype
        plan = hf._get_dtype_plan(dtype) if dtype is not None else {}
        self.dtype_plan = plan
        self._plan_re = build_glob_alternation(list(plan)) if plan else None
        self._named: dict[str, tuple[str, str | None]] = {}  # target() of every key asked, once
        self.targets = {k: self.target(k) for k in keys}  # marks the transforms that match, as loading does
        hf._weight_conversions = [t for t in self.transforms if t.was_used()]  # what save_pretrained reverts

    def target(self, key: str) -> tuple[str, str | None]:
        """The in-memory name of checkpoint ``key`` and the converter pattern it matched (or None)."""
        from transformers.core_model_loading import rename_source_key

        known = self._named.get(key)
        if known is not None:
            return known
        name, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)
        if name not in self.meta and key in self.meta:
            name, pattern = rename_source_key(key, [], [], self.prefix, self.meta)
        self._named[key] = name, pattern
        return name, pattern

    def target_dtype(self, name: str, source_dtype: torch.dtype) -> torch.dtype:
        """The dtype ``from_pretrained(dtype=...)`` gives in-memory tensor ``name`` (the checkpoint's
        own dtype when no dtype is asked for)."""
        if self.dtype is None:
            return source_dtype
        if self._plan_re is not None:
            alt, groups, _ = self._plan_re
            m = alt.search(name)
            if m is not None:
                return self.dtype_plan[groups[m.lastgroup]]
        meta = self.meta.get(name)
        if meta is not None and meta.dtype != self.dtype:
            return meta.dtype
        return self.dtype

    def forward(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Checkpoint tensors (names as on disk) → in-memory tensors, cast as loading casts them."""
        from copy import deepcopy

        from transformers.core_model_loading import WeightRenaming, dot_natural_key

        mappings: dict = {}
        for key, t in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
            name, pattern = self.target(key)
            mapping = mappings.get(name)
            if mapping is None:  # one converter per in-memory tensor (a layer's experts share one)
                mapping = mappings[name] = (deepcopy(self.by_pattern[pattern]) if pattern is not None
                                            else WeightRenaming(key, name))
            if pattern is None:
                pattern = key
            want = self.target_dtype(name, t.dtype)
            mapping.add_tensor(name, key, pattern, t if t.dtype == want else t.to(want))
        out = {}
        for first, mapping in mappings.items():
            for name, value in mapping.convert(first, model=self.hf, config=self.hf.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out

    def revert(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """In-memory tensors → checkpoint names and form, exactly as ``save_pretrained`` writes them."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.hf, dict(tensors))


def saved_names(hf) -> set[str]:
    """The in-memory names ``save_pretrained`` writes for ``hf``: its state dict less tied weights
    and the names the class leaves out of its checkpoints."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    saved = set(remove_tied_weights_from_state_dict(dict(hf.state_dict()), hf))
    return saved - set(getattr(hf, "_keys_to_ignore_on_save", None) or ())


def _ignored(patterns) -> re.Pattern | None:
    patterns = [p for p in (patterns or ()) if p]
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def check_tensor_set(conv: Conversions, tensors: dict[str, SourceTensor], folder: Path) -> set[str]:
    """Refuse a checkpoint whose tensors are not the model's that its config describes: a weight the
    model saves that no tensor provides (transformers would initialise it at random), a tensor the
    model has no place for (beyond what the class itself ignores on load), or a shape other than
    the config's once transformers' conversions (renamings, expert fusions) are applied. Returns
    the checkpoint keys the model ignores (left out of an export, as loading leaves them out)."""
    hf = conv.hf
    # what the class ignores on load, and the buffers transformers itself ignores for every model (old
    # checkpoints saved rotary tables and position ids, now non-persistent)
    skip_unexpected = _ignored([*(getattr(hf, "_keys_to_ignore_on_load_unexpected", None) or ()),
                                r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"])
    skip_missing = _ignored(getattr(hf, "_keys_to_ignore_on_load_missing", None))
    where = f"the checkpoint in '{folder}'"
    ignored = {k for k in tensors if skip_unexpected is not None
               and (skip_unexpected.search(k) or skip_unexpected.search(conv.targets[k][0]))}
    shapes = {k: torch.empty(t.shape, dtype=ST_DTYPES[t.dtype], device="meta")
              for k, t in tensors.items() if k not in ignored}
    _check_expert_shapes(tensors, shapes, where)
    try:
        made = conv.forward(shapes)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise MoescopeError(f"{where} does not fit the model its config.json describes "
                            f"({' '.join(str(err).split())[:160]})") from None
    extra = sorted(n for n in made if n not in conv.meta)
    if extra:
        keys = [k for k in tensors if conv.targets[k][0] == extra[0]] or [extra[0]]
        raise MoescopeError(f"{where} holds {keys[0]}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                            + ", which the model its config.json describes has no place for; the checkpoint is not "
                            "of this config")
    expected = saved_names(hf)
    lacking = sorted(n for n in expected - set(made) if skip_missing is None or not skip_missing.search(n))
    if lacking:
        raise MoescopeError(f"{where} has no tensor for {lacking[0]}"
                            + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
                            + "; the checkpoint is incomplete (or not of the model its config.json describes), "
                            "and a missing weight would be initialised at random")
    for name, t in sorted(made.items()):
        want = tuple(conv.meta[name].shape)
        if tuple(t.shape) != want:
            keys = [k for k in tensors if conv.targets[k][0] == name]
            _check_expert_count(keys, want, where)
            shown = keys[0] if len(keys) == 1 else f"{name} (from {len(keys)} tensors, e.g. {keys[0]})"
            raise MoescopeError(f"the weights in '{folder}' do not match its config.json: {shown} is {list(t.shape)} "
                                f"in the checkpoint, {list(want)} by the config")
    return ignored


_EXPERT_NUMBER = re.compile(r"\.experts\.(\d+)\.")


def _check_expert_count(keys: list[str], want: tuple[int, ...], where: str) -> None:
    """For experts stored one per tensor and fused on load: name the expert that is missing or
    beyond the config's count, rather than the fused shape."""
    by_template: dict[str, set[int]] = defaultdict(set)
    for k in keys:
        m = _EXPERT_NUMBER.search(k)
        if m:
            by_template[k[: m.start(1)] + "{}" + k[m.end(1):]].add(int(m.group(1)))
    if not by_template or not want:
        return
    n = want[0]
    for template, found in sorted(by_template.items()):
        missing = sorted(set(range(n)) - found)
        if missing:
            raise MoescopeError(f"{where} has no tensor for {template.format(missing[0])}"
                                + (f" (and {len(missing) - 1} more experts)" if len(missing) > 1 else "")
                                + f"; its config.json gives that layer {n} experts; the checkpoint is incomplete")
        beyond = sorted(found - set(range(n)))
        if beyond:
            raise MoescopeError(f"{where} holds {template.format(beyond[0])}"
                                + (f" (and {len(beyond) - 1} more experts)" if len(beyond) > 1 else "")
                                + f", but its config.json gives that layer {n} experts; the checkpoint is not of "
                                "this config")


def _check_expert_shapes(tensors: dict[str, SourceTensor], keys, where: str) -> None:
    """Experts stored one per tensor are stacked on load: one of another shape than its siblings is
    named (rather than the stacking's error)."""
    by_template: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        m = _EXPERT_NUMBER.search(k)
        if m:
            by_template[k[: m.start(1)] + "{}" + k[m.end(1):]].append(k)
    for template, ks in sorted(by_template.items()):
        shapes = [tensors[k].shape for k in ks]
        common = max(set(shapes), key=shapes.count)
        odd = [k for k in ks if tensors[k].shape != common]
        if odd:
            raise MoescopeError(f"{where}: {odd[0]} has shape {list(tensors[odd[0]].shape)} but the other experts' "
                                f"{template.format('N')} have {list(common)}")


def validate_checkpoint(folder: Path, hf, dtype: torch.dtype | None = None) -> tuple[dict[str, SourceTensor], Conversions]:
    """The one validation of a model folder before its weights are read or an export is written:
    every header (:func:`source_tensors`), then the tensor set against ``hf`` (a weightless
    skeleton built from the folder's config). Returns the tensors and their conversions."""
    from moescope.analysis.model.quantization import check_checkpoint, scheme_of_folder

    tensors = source_tensors(Path(folder))
    quant = scheme_of_folder(Path(folder))
    if quant is not None:
        # a quantized checkpoint (block FP8, MXFP4, compressed-tensors) holds each quantized weight as
        # stored parts (FP8 values and scales, packed blocks): they are checked against the scheme (every
        # weight's scales present and of its shape), not against the dequantized model's tensor set
        check_checkpoint(quant, {k: (t.dtype, t.shape) for k, t in tensors.items()}, str(folder))
        return tensors, Conversions(hf, list(tensors), None)
    conv = Conversions(hf, list(tensors), dtype)
    ignored = check_tensor_set(conv, tensors, Path(folder))
    for k in ignored:
        tensors.pop(k)
    return tensors, conv
