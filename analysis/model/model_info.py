"""``moescope info`` from the config alone, and from the cache without torch.

A model's MoE structure (layers, experts, routing, parameter and byte counts) is a function of its
``config.json``: :meth:`MoEModel.info` reads it from a model built on the meta device
(``load_moe(weights=False)``), which needs torch and transformers' modelling code (~5 s of
imports). The answer is stored in the cache under the sha256 of the raw ``config.json`` bytes (with
the dtype asked for, the transformers version and :data:`INFO_VERSION`), so every later ``info``
of the same config reads one file and one JSON entry and imports neither torch nor the
modelling code. For a hub id only ``config.json`` is fetched (``huggingface_hub``), never weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import not_on_hub, resolve_source

INFO_VERSION = 1
KIND = "model_info"


def config_bytes(source: str) -> bytes:
    """The raw ``config.json`` of ``source`` ('demo', a folder or a hub id); a hub id fetches
    only that file (from the local hub cache when offline)."""
    location, local = resolve_source(source)
    if local is not None:
        path = Path(local) / "config.json"
        try:
            return path.read_bytes()
        except OSError as err:
            raise MoescopeError(f"cannot read '{path}': {err.strerror or err}") from None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(location, "config.json")).read_bytes()
    except Exception as err:  # network, missing repo, offline without a cached copy
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise not_on_hub(source, msg[:200]) from None


def _check_raw(raw: bytes, source: str) -> None:
    import json

    from moescope.analysis.model.config_check import check_config

    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        return  # loading reports it with the file's name
    if isinstance(config, dict):
        from moescope.analysis.model.quantization import scheme_of

        _, local = resolve_source(source)
        where = str(Path(local) / "config.json") if local is not None else f"the config of '{source}'"
        check_config(config, where)
        scheme_of(config, f"'{where}'" if local is not None else where)  # an unknown quantization is refused here


def info_parts(raw_config: bytes, dtype: str | None, trust_remote_code: bool) -> dict:
    from importlib.metadata import version  # the installed version, without importing transformers

    return {"config_sha256": hashlib.sha256(raw_config).hexdigest(), "dtype": dtype,
            "trust_remote_code": bool(trust_remote_code), "transformers": version("transformers"),
            "info_version": INFO_VERSION}


def model_info(source: str, dtype: str | None = None, trust_remote_code: bool = False, cache=None) -> dict:
    """What ``moescope info`` prints for ``source``: from the cache when this exact config was
    described before, else from a meta-device model (then stored; an unwritable cache only means
    the next call builds it again)."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    raw = config_bytes(source)
    _check_raw(raw, source)  # a broken value is refused here, before torch and transformers are imported
    parts = info_parts(raw, dtype, trust_remote_code)
    entry = cache.get(KIND, parts)
    if entry is not None and isinstance(entry.meta.get("info"), dict):
        return with_checkpoint({**entry.meta["info"], "source": source}, source)

    from moescope.analysis.model import load_moe

    model = load_moe(source, dtype=dtype, trust_remote_code=trust_remote_code, weights=False)
    info = model.info()
    try:
        cache.put(KIND, parts, meta={"info": info, "model": str(source), "model_source": str(source)},
                  label=Path(str(source)).name or str(source))
    except (OSError, MoescopeError):  # an unwritable cache: the next call builds it again
        pass
    return with_checkpoint(info, source)


def with_checkpoint(info: dict, source: str) -> dict:
    """``info`` with ``checkpoint``: what a local folder's safetensors hold, from their headers —
    the quantization scheme (or None) and, per tensor kind (fp8 weights, scales, int4 packed
    weights, mxfp4 blocks, unquantized), the dtypes, tensor count and bytes. Not cached: the files
    may change under the same config."""
    _, local = resolve_source(source)
    if local is None or not any(Path(local).glob("*.safetensors")):
        return info
    from moescope.analysis.model.quantization import bytes_by_kind, scheme_of_folder

    scheme = scheme_of_folder(local)
    tensors = stored_tensors(Path(local))
    return {**info, "checkpoint": {"quantization": scheme.describe() if scheme else None,
                                   "tensors": bytes_by_kind(scheme, tensors),
                                   "bytes": sum(t.nbytes for t in tensors)}}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str  # safetensors name
    nbytes: int


def stored_tensors(folder: Path) -> list[StoredTensor]:
    """Every tensor of the folder's safetensors files, from their headers (no torch)."""
    import json
    import struct

    out = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 100 * 2**20)))
            out += [StoredTensor(k, v["dtype"], v["data_offsets"][1] - v["data_offsets"][0])
                    for k, v in header.items() if k != "__metadata__"]
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as err:
            raise MoescopeError(f"'{f}' is not a safetensors file (its header cannot be read: {err})") from None
    return out
