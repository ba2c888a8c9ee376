"""Quantized checkpoints as they are published: which scheme a ``quantization_config`` declares,
the tensors each scheme stores for one weight, and the scheme's dequantize and quantize rules.

Schemes moescope reads (everything else is refused in one line naming these):

* ``fp8`` — block-wise FP8 (DeepSeek-V3/R1, Kimi-K2, GLM-4.5, Qwen3 ``-FP8``):
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``. A quantized Linear stores ``X.weight`` (``float8_e4m3fn``,
  [out, in]) and ``X.weight_scale_inv`` (float32 or bf16, one value per 128×128 block:
  [⌈out/128⌉, ⌈in/128⌉], the last block of a dimension the block does not divide being partial, as
  DeepSeek-V3's ``kv_a_proj_with_mqa`` [576, 7168] with its [5, 56] grid). Value = weight ·
  scale of its block; quantizing takes scale = amax(block) / 448.
* ``mxfp4`` — OCP microscaling FP4 (gpt-oss): the fused experts' ``P_blocks`` (uint8,
  [E, out, in/32, 16]: two E2M1 values per byte, the low nibble first) and ``P_scales`` (uint8
  E8M0, [E, out, in/32]: 2^(byte − 127) for each 32 values); biases bf16. Dequantized, ``P`` is
  [E, in, out] (the bf16 gpt-oss layout). Quantizing takes the shared exponent
  ⌊log2 amax⌋ − 2 (E2M1's largest exponent) and rounds each value to the nearest E2M1 value
  (ties to the even mantissa).
* ``compressed-tensors`` (llm-compressor), format ``float-quantized`` — FP8 weights with a
  ``weight_scale`` per output channel ([out, 1]) or per tensor ([1]); scale = amax / 448 —
  and format ``pack-quantized`` — W4A16: ``weight_packed`` (int32, eight 4-bit values per word,
  offset by 8, the first value in the low bits), ``weight_scale`` ([out, in/group]) and
  ``weight_shape`` (int64 [2]); symmetric round-to-nearest with scale = amax(group) / 7.5,
  values clamped to [−8, 7].

A drop plan never goes through these rules: a kept expert's stored tensors are copied as they are.
A merge dequantizes its members, merges, and quantizes the result back (:func:`Scheme.quantize`),
reporting the relative error of each requantized tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moescope.analysis.core.errors import MoescopeError

if TYPE_CHECKING:  # torch is imported where values are computed: reading a config or a header needs none
    import torch
    from torch import Tensor

SUPPORTED = ("fp8 (block-wise, weight_block_size), mxfp4, compressed-tensors (format float-quantized: FP8; "
             "pack-quantized: W4A16)")

FP8_MAX = 448.0  # largest float8_e4m3fn value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32  # values sharing one E8M0 exponent
E2M1_EMAX = 2  # exponent of E2M1's largest value (6 = 1.5 · 2²)


@dataclass(frozen=True)
class Scheme:
    """One checkpoint's quantization scheme, from its ``quantization_config``."""

    method: str  # "fp8" | "mxfp4" | "compressed-tensors"
    format: str  # "fp8-block" | "mxfp4" | "float-quantized" | "pack-quantized"
    block: tuple[int, int] | None = None  # fp8: weight_block_size
    group_size: int | None = None  # pack-quantized: values per scale along the input
    strategy: str | None = None  # float-quantized: "channel" | "tensor"
    config: dict = field(default_factory=dict, compare=False, hash=False)

    # ---- names ----------------------------------------------------------------------------
    @property
    def stored(self) -> tuple[str, ...]:
        """The suffixes a quantized weight ``X.weight`` (mxfp4: ``P``) is stored under."""
        return {"fp8-block": (".weight", ".weight_scale_inv"), "float-quantized": (".weight", ".weight_scale"),
                "pack-quantized": (".weight_packed", ".weight_scale", ".weight_shape"),
                "mxfp4": ("_blocks", "_scales")}[self.format]

    @property
    def owner_suffix(self) -> str:
        return "" if self.format == "mxfp4" else ".weight"

    def owner(self, key: str) -> str | None:
        """The weight a stored companion tensor belongs to (``X.weight_scale_inv`` → ``X.weight``,
        ``P_blocks`` → ``P``), or None for a tensor stored as itself."""
        for suffix in self.stored:
            if suffix == ".weight":
                continue
            if key.endswith(suffix):
                return key[: -len(suffix)] + self.owner_suffix
        return None

    def is_quantized_key(self, key: str, dtype: str) -> bool:
        """Whether the stored tensor ``key`` (safetensors dtype name) is part of a quantized weight."""
        if self.owner(key) is not None:
            return True
        return key.endswith(".weight") and dtype in ("F8_E4M3", "F8_E5M2") and self.format in ("fp8-block",
                                                                                               "float-quantized")

    def kind(self, key: str, dtype: str) -> str:
        """What ``moescope info`` counts the tensor as."""
        if not self.is_quantized_key(key, dtype):
            return "unquantized"
        if key.endswith(("_scale_inv", "_scale", "_scales")):
            return "scales"
        if key.endswith("weight_shape"):
            return "shapes"
        return {"fp8-block": "fp8 weights", "float-quantized": "fp8 weights", "pack-quantized": "int4 packed weights",
                "mxfp4": "mxfp4 blocks"}[self.format]

    def describe(self) -> str:
        if self.format == "fp8-block":
            return f"fp8 block-wise {self.block[0]}×{self.block[1]} (float8_e4m3fn, weight_scale_inv)"
        if self.format == "float-quantized":
            return f"compressed-tensors float-quantized FP8 (weight_scale per {self.strategy})"
        if self.format == "pack-quantized":
            return f"compressed-tensors pack-quantized W4A16 (group {self.group_size})"
        return "mxfp4 (uint8 blocks, E8M0 scales per 32 values)"

    # ---- shapes -----------------------------------------------------------------------------
    def expected(self, owner: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The stored shapes of weight ``owner`` whose dequantized shape is ``shape`` (fp8 / CT:
        [out, in]; mxfp4: the checkpoint orientation [E, out, in])."""
        base = owner[: -len(self.owner_suffix)] if self.owner_suffix else owner
        *lead, rows, cols = shape
        lead = tuple(lead)
        if self.format == "fp8-block":
            br, bc = self.block
            return {base + ".weight": shape, base + ".weight_scale_inv": lead + (-(-rows // br), -(-cols // bc))}
        if self.format == "float-quantized":
            scale = lead + ((rows, 1) if self.strategy == "channel" else (1,))
            return {base + ".weight": shape, base + ".weight_scale": scale}
        if self.format == "pack-quantized":
            return {base + ".weight_packed": lead + (rows, -(-cols // 8)),
                    base + ".weight_scale": lead + (rows, -(-cols // self.group_size)), base + ".weight_shape": (2,)}
        return {base + "_blocks": lead + (rows, cols // MX_GROUP, MX_GROUP // 2),
                base + "_scales": lead + (rows, cols // MX_GROUP)}

    def check_stored(self, owner: str, present: dict[str, tuple[int, ...]], where: str) -> None:
        """Refuse, in one line naming the tensor, a quantized weight whose companions are missing or
        of the wrong shape. ``present`` maps the stored names of this weight to their shapes."""
        base = owner[: -len(self.owner_suffix)] if self.owner_suffix else owner
        first = base + self.stored[0]
        if first not in present:
            raise MoescopeError(f"'{where}' has {next(iter(present))} but no {first}; the {self.method} checkpoint "
                                "is incomplete")
        shape = present[first]
        if self.format == "pack-quantized":
            return self._check_packed(base, present, where)
        if self.format == "mxfp4":
            shape = shape[:-2] + (shape[-2] * MX_GROUP,)
        for name, want in self.expected(owner, tuple(shape)).items():
            if name not in present:
                raise MoescopeError(f"'{where}' has {first} but no {name}; every {self.method} weight needs its "
                                    f"{name.rpartition('.')[2] if self.format != 'mxfp4' else name[len(base):]}")
            if tuple(present[name]) != tuple(want):
                raise MoescopeError(f"'{where}': {name} is {list(present[name])}, but {first} "
                                    f"{list(present[first])} needs {list(want)} ({self.describe()})")

    def _check_packed(self, base: str, present: dict, where: str) -> None:
        for suffix in self.stored:
            if base + suffix not in present:
                raise MoescopeError(f"'{where}' has {base}.weight_packed but no {base}{suffix}; every pack-quantized "
                                    f"weight needs its {suffix[1:]}")
        rows, words = present[base + ".weight_packed"]
        scale = tuple(present[base + ".weight_scale"])
        g = self.group_size
        if len(scale) != 2 or scale[0] != rows or scale[1] not in (-(-(8 * words) // g), -(-(8 * words - 7) // g)):
            raise MoescopeError(f"'{where}': {base}.weight_scale is {list(scale)}, which does not fit "
                                f"{base}.weight_packed {[rows, words]} with group_size {self.group_size}")

    # ---- values -----------------------------------------------------------------------------
    def dequantize(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stored tensors → the same names with every quantized weight replaced by its float32
        value under its owner's name (``X.weight`` / ``P``); other tensors pass through."""
        out, owners = {}, {}
        for key, t in stored.items():
            own = self.owner(key)
            if own is None and not self.is_quantized_key(key, _st_name(t.dtype)):
                out[key] = t
            else:
                owners.setdefault(own or key, {})[key] = t
        for own, parts in owners.items():
            base = own[: -len(self.owner_suffix)] if self.owner_suffix else own
            out[own] = self._dequantize_one(base, parts)
        return out

    def _dequantize_one(self, base: str, parts: dict[str, Tensor]) -> Tensor:
        if self.format == "fp8-block":
            q, s = parts[base + ".weight"], parts[base + ".weight_scale_inv"]
            return fp8_block_dequantize(q, s, self.block)
        if self.format == "float-quantized":
            return parts[base + ".weight"].float() * parts[base + ".weight_scale"].float()
        if self.format == "pack-quantized":
            shape = tuple(int(v) for v in parts[base + ".weight_shape"].tolist())
            return int4_dequantize(parts[base + ".weight_packed"], parts[base + ".weight_scale"], shape,
                                   self.group_size)
        return mxfp4_dequantize(parts[base + "_blocks"], parts[base + "_scales"])

    def quantize(self, owner: str, value: Tensor, like: dict[str, torch.dtype] | None = None) -> dict[str, Tensor]:
        """A float weight → its stored tensors under the scheme's rule; ``like`` gives the scale dtype
        the checkpoint uses (its members' scales)."""
        import torch
        base = owner[: -len(self.owner_suffix)] if self.owner_suffix else owner
        like = like or {}
        if self.format == "fp8-block":
            q, s = fp8_block_quantize(value, self.block, like.get(base + ".weight_scale_inv", torch.float32))
            return {base + ".weight": q, base + ".weight_scale_inv": s}
        if self.format == "float-quantized":
            w = value.float()
            amax = w.abs().amax(dim=-1, keepdim=True) if self.strategy == "channel" else w.abs().amax().reshape(1)
            scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            scale = scale.to(like.get(base + ".weight_scale", torch.bfloat16))
            q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return {base + ".weight": q, base + ".weight_scale": scale}
        if self.format == "pack-quantized":
            packed, scale = int4_quantize(value, self.group_size, like.get(base + ".weight_scale", torch.bfloat16))
            return {base + ".weight_packed": packed, base + ".weight_scale": scale,
                    base + ".weight_shape": torch.tensor(list(value.shape), dtype=torch.int64)}
        blocks, scales = mxfp4_quantize(value)
        return {base + "_blocks": blocks, base + "_scales": scales}


def _st_name(dtype: torch.dtype) -> str:
    import torch
    return {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}.get(dtype, str(dtype))


# ---- detection ------------------------------------------------------------------------------
def scheme_of(raw_config: dict, where: str) -> Scheme | None:
    """The scheme ``raw_config``'s ``quantization_config`` declares (None: not quantized), or one
    line naming the setting that moescope cannot read and the schemes it reads."""
    q = raw_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise MoescopeError(f"{where}: quantization_config must be an object with quant_method; supported: {SUPPORTED}")
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise MoescopeError(f"{where}: quantization_config.weight_block_size is {block!r}; moescope reads "
                                "block-wise fp8 checkpoints, whose weight_block_size is two positive integers "
                                "such as [128, 128]")
        return Scheme("fp8", "fp8-block", block=(int(block[0]), int(block[1])), config=q)
    if method == "mxfp4":
        return Scheme("mxfp4", "mxfp4", config=q)
    if method == "compressed-tensors":
        return _compressed_tensors(q, where)
    raise MoescopeError(f"{where}: quantization method {method!r} is not one moescope reads; supported: {SUPPORTED}")


def _compressed_tensors(q: dict, where: str) -> Scheme:
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise MoescopeError(f"{where}: quantization_config.config_groups has {len(groups) if isinstance(groups, dict) else groups!r} "
                            f"groups; moescope reads compressed-tensors checkpoints with one scheme ({SUPPORTED})")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    fmt = group.get("format") or fmt
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if fmt == "float-quantized" and bits == 8 and kind == "float" and strategy in ("channel", "tensor"):
        return Scheme("compressed-tensors", "float-quantized", strategy=strategy, config=q)
    if fmt == "pack-quantized" and bits == 4 and kind == "int" and strategy == "group" \
            and weights.get("symmetric", True):
        size = weights.get("group_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise MoescopeError(f"{where}: quantization_config weights.group_size is {size!r}; pack-quantized W4A16 "
                                "needs a positive number of values per scale (published: 128)")
        return Scheme("compressed-tensors", "pack-quantized", group_size=size, config=q)
    raise MoescopeError(f"{where}: compressed-tensors format {fmt!r} with weights {bits}-bit {kind} per {strategy} "
                        f"is not one moescope reads; supported: {SUPPORTED}")


def scheme_of_folder(folder) -> Scheme | None:
    """The scheme of a model folder's ``config.json`` (None when it has none or is not quantized)."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return scheme_of(raw, f"'{path}'") if isinstance(raw, dict) else None


# ---- the rules --------------------------------------------------------------------------------
def _expand(scale: Tensor, block: tuple[int, int], rows: int, cols: int) -> Tensor:
    return scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[
        ..., :cols]


def fp8_block_dequantize(q: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """float8 weight [.., out, in] times the scale of its block (partial last blocks included)."""
    rows, cols = q.shape[-2:]
    return q.float() * _expand(scale_inv, block, rows, cols)


def fp8_block_quantize(w: Tensor, block: tuple[int, int],
                       scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight, scale per block = amax / 448 in ``scale_dtype``: float32 as DeepSeek-V3
    stores it, bf16 as Qwen3-FP8 does), the weight divided by the scale as stored."""
    import torch
    scale_dtype = scale_dtype or torch.float32
    w = w.float()
    rows, cols = w.shape[-2:]
    br, bc = block
    gr, gc = -(-rows // br), -(-cols // bc)
    padded = torch.nn.functional.pad(w, (0, gc * bc - cols, 0, gr * br - rows))
    amax = padded.reshape(*w.shape[:-2], gr, br, gc, bc).abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (w / _expand(scale, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def int4_dequantize(packed: Tensor, scale: Tensor, shape: tuple[int, int], group: int) -> Tensor:
    """compressed-tensors' pack-quantized int4 → float32 [out, in]."""
    import torch
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    values = ((words[..., None] >> shifts) & 0xF).reshape(*packed.shape[:-1], -1)[..., : shape[-1]] - 8
    return values.float() * scale.float().repeat_interleave(group, dim=-1)[..., : shape[-1]]


def int4_quantize(w: Tensor, group: int, scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric group round-to-nearest (compressed-tensors' rule: scale = amax / 7.5, values in
    [−8, 7]) and its int32 packing; returns (weight_packed, weight_scale)."""
    import torch
    scale_dtype = scale_dtype or torch.bfloat16
    w = w.float()
    rows, cols = w.shape[-2:]
    groups = -(-cols // group)
    padded = torch.nn.functional.pad(w, (0, groups * group - cols))
    amax = padded.reshape(*w.shape[:-1], groups, group).abs().amax(dim=-1)
    scale = (amax / 7.5).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w / scale.float().repeat_interleave(group, dim=-1)[..., :cols]).clamp(-8, 7).to(torch.int64) + 8
    words = -(-cols // 8)
    q = torch.nn.functional.pad(q, (0, words * 8 - cols)).reshape(*w.shape[:-1], words, 8)
    packed = (q << (torch.arange(8, dtype=torch.int64) * 4)).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed, scale


def mxfp4_dequantize(blocks: Tensor, scales: Tensor) -> Tensor:
    """gpt-oss ``P_blocks`` [E, out, G, 16] and ``P_scales`` [E, out, G] → float32 [E, in, out]
    (in = 32·G), the layout of the bf16 checkpoint."""
    import torch
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    b = blocks.to(torch.int64)
    values = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).reshape(*blocks.shape[:-1], MX_GROUP)
    values = values * torch.exp2(scales.to(torch.float32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).contiguous()


def mxfp4_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """float [E, in, out] → (``_blocks`` uint8 [E, out, in/32, 16], ``_scales`` uint8 [E, out, in/32]):
    the shared exponent ⌊log2 amax⌋ − 2 per 32 values, each value rounded to the nearest E2M1."""
    import torch
    x = w.float().transpose(-1, -2)
    if x.shape[-1] % MX_GROUP:
        raise MoescopeError(f"an mxfp4 weight's input dimension {x.shape[-1]} is not a multiple of {MX_GROUP}")
    g = x.reshape(*x.shape[:-1], -1, MX_GROUP)
    amax = g.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - E2M1_EMAX,
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    dist = (scaled[..., None] - lut).abs()
    odd = torch.arange(16) % 2  # a code's last bit is its mantissa bit
    nearest = dist == dist.amin(dim=-1, keepdim=True)
    codes = torch.where(nearest, odd, 2).argmin(dim=-1)  # nearest E2M1 value, ties to the even mantissa
    codes = codes.reshape(*codes.shape[:-1], MX_GROUP // 2, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def relative_error(value: Tensor, requantized: Tensor) -> float:
    """‖W − Q(W)‖_F / ‖W‖_F of a requantized merged weight (0 for an all-zero weight)."""
    norm = float(value.float().norm())
    return float((value.float() - requantized.float()).norm()) / norm if norm else 0.0


# ---- the checkpoint and the config after a plan ---------------------------------------------
def check_checkpoint(scheme: Scheme, stored: dict[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """Every quantized weight of a checkpoint (``stored``: name → (safetensors dtype, shape)) has
    its companions, of the shapes the scheme gives; else one line naming the tensor."""
    owners: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (dtype, shape) in stored.items():
        own = scheme.owner(key) or (key if scheme.is_quantized_key(key, dtype) else None)
        if own is not None:
            owners.setdefault(own, {})[key] = tuple(shape)
    for own, present in owners.items():
        scheme.check_stored(own, present, where)


NOT_CONVERTED_KEYS = ("modules_to_not_convert", "ignore")
_EXPERT_ENTRY = re.compile(r"^(.*layers\.(\d+)\..*\.experts\.)(\d+)(\..*|)$")


def renumber_config(q: dict, renames: dict[int, dict[int, int | None]]) -> dict:
    """``quantization_config`` with its skip lists (``modules_to_not_convert``, compressed-tensors'
    ``ignore``) following a plan: an entry naming a routed expert the plan removes or merges is
    dropped, one naming a kept expert takes its new number. ``renames[layer][old]`` is the new
    index (None: not kept as itself); layers not in ``renames`` are unchanged."""
    out = dict(q)
    for key in NOT_CONVERTED_KEYS:
        entries = q.get(key)
        if not isinstance(entries, list):
            continue
        new = []
        for entry in entries:
            m = _EXPERT_ENTRY.match(entry) if isinstance(entry, str) else None
            if m and int(m[2]) in renames:
                target = renames[int(m[2])].get(int(m[3]))
                if target is None:
                    continue
                entry = f"{m[1]}{target}{m[4]}"
            new.append(entry)
        out[key] = new
    return out


def not_converted_key(scheme: Scheme) -> str:
    """The config entry that lists modules kept unquantized (mixed precision)."""
    return "ignore" if scheme.method == "compressed-tensors" else "modules_to_not_convert"


def bytes_by_kind(scheme: Scheme | None, tensors) -> dict[str, dict]:
    """``{kind: {"dtypes": [...], "tensors": n, "bytes": b}}`` over a checkpoint's stored tensors
    (``SourceTensor``s)."""
    out: dict[str, dict] = {}
    for t in tensors:
        kind = scheme.kind(t.name, t.dtype) if scheme else "unquantized"
        entry = out.setdefault(kind, {"dtypes": [], "tensors": 0, "bytes": 0})
        if t.dtype not in entry["dtypes"]:
            entry["dtypes"].append(t.dtype)
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    return out


def bits_per_weight(scheme: Scheme) -> float:
    """Stored bits per dequantized weight value, scales included (for size estimates)."""
    if scheme.format == "fp8-block":
        return 8 + 32 / math.prod(scheme.block)
    if scheme.format == "float-quantized":
        return 8.0
    if scheme.format == "pack-quantized":
        return 4 + 16 / scheme.group_size
    return 4 + 8 / MX_GROUP
