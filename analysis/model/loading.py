"""Loading a model: ``'demo'``, a local folder or a hub id, checked from its config before any
weight is read; the tokenizer; the folder fingerprint; wrapping an in-memory model."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.paths import DEMO_SOURCES, not_on_hub, resolve_source  # noqa: F401 (re-exported)
from moescope.analysis.model.config_check import check_config
from moescope.analysis.model.families import supported_model_types
from moescope.analysis.model.family_catalog import family_for
from moescope.analysis.model.offload import PeriodicRelease, non_layer_modules, release_mapped_weights
from moescope.analysis.model.quantization import scheme_of, scheme_of_folder
from moescope.analysis.model.save import TOKENIZER_FILES
from moescope.analysis.model.view import MoEModel
from torch import nn


def load_config(source: str, trust_remote_code: bool = False):
    """The model's config (no weights), with a one-line error when it cannot be had."""
    from transformers import AutoConfig

    location, local = resolve_source(source)
    remote_code_msg = (
        f"'{source}' needs custom code from its repository; moescope does not run it unless you pass "
        f"--trust-remote-code (supported without it: {', '.join(supported_model_types())})"
    )
    if local is not None:
        raw = read_config_json(local)
        check_config(raw, str(local / "config.json"))  # every value moescope reads, before anything is built
        scheme_of(raw, f"'{local / 'config.json'}'")  # a quantization moescope cannot read is refused here
    if local is not None and not trust_remote_code:
        if "auto_map" in raw and raw.get("model_type") not in supported_model_types():
            raise MoescopeError(remote_code_msg)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        if local is None:
            check_config(config.to_dict(), f"the config of '{source}'")
            scheme_of(config.to_dict(), f"the config of '{source}'")
        return config
    except MoescopeError:
        raise
    except ValueError as err:  # unknown model_type / remote code refused
        msg = str(err).splitlines()[0]
        if "trust_remote_code" in str(err):
            raise MoescopeError(remote_code_msg) from None
        if "model_type" in str(err) or "Unrecognized model" in str(err):
            raise MoescopeError(
                f"unsupported architecture in '{source}': {msg[:200]}; moescope supports the MoE families "
                f"{', '.join(supported_model_types())}"
            ) from None
        raise MoescopeError(f"cannot read the config of '{source}': {msg}") from None
    except OSError as err:
        msg = str(err).splitlines()[0]
        if local is not None:
            raise MoescopeError(f"cannot read '{local / 'config.json'}': {msg}") from None
        raise not_on_hub(source, msg) from None


def max_positions(config) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings``), when the config says."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse a sequence length the model cannot take (its positions end earlier)."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise MoescopeError(f"{flag} {seq_len} is longer than the model's max_position_embeddings {limit}; "
                            f"use at most {limit}")


def check_sampling(config, samples: int, seq_len: int) -> None:
    """``--samples`` / ``--seq-len`` positive and within the model's positions (config only)."""
    for flag, value in (("--samples", samples), ("--seq-len", seq_len)):
        if value < 1:
            raise MoescopeError(f"{flag} must be a positive number, got {value}")
    check_seq_len(config, seq_len)


def read_config_json(folder: Path) -> dict:
    """``folder/config.json`` as a dict, or one line naming the file and what is wrong with it."""
    from moescope.analysis.core.outputs import loads_json

    path = folder / "config.json"
    try:  # deep nesting and a key given twice refused in one line (JSON keeps the last one silently)
        raw = loads_json(path.read_text(encoding="utf-8"), f"'{path}'", unique_keys=True)
    except (OSError, UnicodeDecodeError) as err:
        raise MoescopeError(f"cannot read '{path}': {getattr(err, 'strerror', None) or err}") from None
    except json.JSONDecodeError as err:
        what = "is empty" if not path.read_bytes().strip() else f"is not valid JSON ({err})"
        raise MoescopeError(f"'{path}' {what}; a model folder needs the config transformers wrote") from None
    if not isinstance(raw, dict):
        raise MoescopeError(f"'{path}' is not a JSON object; a model folder needs the config transformers wrote")
    return raw


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(folder: Path, allow_pickle: bool) -> None:
    """Refuse a local folder whose weights are only pickles (unpickling can run code), saying how
    to convert it; ``allow_pickle`` (``--allow-pickle``) is the only way around."""
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        raise MoescopeError(
            f"'{folder}' holds only pickled weights ({', '.join(pickles[:3])}); moescope loads safetensors only, "
            "since unpickling can run code: convert it once where you trust the file "
            "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors), "
            "or pass --allow-pickle (unsafe)")


@contextlib.contextmanager
def _held_library_logs(held: list[logging.LogRecord]):
    """Hold what transformers logs while loading (its multi-line load report among it) in
    ``held``: replayed to its own handlers when loading succeeds, read into the one-line error
    when it fails."""
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # the library's root logger ("transformers")

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    saved = root.handlers[:]
    hold = Hold()
    root.handlers[:] = [hold]
    try:
        yield
    finally:
        root.handlers[:] = saved


def _replay(held: list[logging.LogRecord]) -> None:
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()
    for record in held:
        root.handle(record)


def _mismatches(held: list[logging.LogRecord]) -> list[str]:
    """``NAME is [shape] in the checkpoint, [shape] by the config`` from transformers' load report."""
    out = []
    for record in held:
        for line in record.getMessage().splitlines():
            m = re.search(r"^\s*(.+?)\s*\|\s*MISMATCH.*ckpt:\s*torch\.Size\((\[[^\]]*\])\)\s*vs\s*model:\s*"
                          r"torch\.Size\((\[[^\]]*\])\)", line)
            if m:
                out.append(f"{m[1]} is {m[2]} in the checkpoint, {m[3]} by the config")
    return out


def _weights_error(source: str, local: Path | None, err: BaseException,
                   held: list[logging.LogRecord] = ()) -> MoescopeError:
    """One line for an exception raised while reading a checkpoint, naming the file(s)."""
    msg = " ".join(str(err).split())[:300] or type(err).__name__
    mismatched = _mismatches(list(held))
    if mismatched and local is not None:
        files = ", ".join(sorted(f.name for f in local.glob("*.safetensors"))[:3])
        return MoescopeError(f"the weights in '{local}' ({files}) do not match its config.json: "
                             + "; ".join(mismatched[:3]) + (" …" if len(mismatched) > 3 else ""))
    if local is None:
        return MoescopeError(f"cannot load the weights of '{source}': {msg}")
    files = sorted(f.name for f in local.glob("*.safetensors")) or sorted(
        f.name for f in local.iterdir() if f.suffix in PICKLE_SUFFIXES)
    named = ", ".join(files[:3]) + (" …" if len(files) > 3 else "")
    if "size mismatch" in msg or "shape" in msg.lower():
        return MoescopeError(f"the weights in '{local}' ({named}) do not match its config.json: {msg}")
    return MoescopeError(f"cannot read the weights in '{local}' ({named}): {type(err).__name__}: {msg}")


def load_moe(
    source: str = "demo",
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
    weights: bool = True,
    offload_dir: str | Path | None = None,
    allow_pickle: bool = False,
) -> MoEModel:
    """Load an MoE causal LM (``'demo'``, a local folder or a hub id) and wrap it.

    The architecture is checked from the config before any weight is read: unknown or non-MoE
    architectures are refused with the list of supported families. ``weights=False`` builds the
    model on the meta device from the config alone (shapes, counts and bytes, no download of the
    weights), in the checkpoint's dtype unless ``dtype`` is given. ``offload_dir`` keeps the
    decoder layers on disk there (accelerate), so a model larger than memory can be analysed
    layer by layer; such a model is read-only (edits need the weights in memory).

    Weights are read from safetensors only (``use_safetensors=True``): a folder holding only
    pickled weights is refused with how to convert it, unless ``allow_pickle`` (unsafe: a crafted
    pickle runs code). Any error reading the checkpoint is one line naming the files.
    """
    from moescope.analysis.model import nonuniform
    from transformers import AutoModelForCausalLM

    location, local = resolve_source(source)
    config = load_config(source, trust_remote_code)
    family = family_for(config)
    declared_dtype = config_dtype(config)  # before from_pretrained sets the working dtype on the config
    per_layer_class = nonuniform.model_class(config)  # moescope's own export with per-layer counts

    def skeleton(torch_dtype):
        with torch.device("meta"):
            if per_layer_class is not None:
                return per_layer_class._from_config(config, dtype=torch_dtype)
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)

    if not weights:
        torch_dtype = parse_dtype(dtype) if dtype is not None else (config_dtype(config) or torch.float32)
        model = MoEModel(skeleton(torch_dtype).eval(), family, source, tokenizer=None, source_dir=local)
        model.checkpoint_dtype = declared_dtype
        return model
    torch_dtype = parse_dtype(dtype or "float32")
    if local is not None:
        check_weight_files(local, allow_pickle)
        if any(local.glob("*.safetensors")):  # the streamed export's validation, before the model is built
            from moescope.analysis.model.checkpoint import validate_checkpoint

            validate_checkpoint(local, skeleton(torch_dtype))
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device == "auto":
        kwargs["device_map"] = "auto"
    if offload_dir is not None:
        # decoder layers stay on disk; accelerate loads one module's weights at a time
        prefix = family.layers_path
        home = device if device not in (None, "auto") else "cpu"
        kwargs["device_map"] = {prefix: "disk", **{k: home for k in non_layer_modules(config, family)}}
        kwargs["offload_folder"] = str(offload_dir)
    scheme = scheme_of_folder(local) if local is not None and offload_dir is not None else None
    releaser = PeriodicRelease() if offload_dir is not None and scheme is None else None
    held: list[logging.LogRecord] = []
    try:
        if releaser:
            releaser.start()  # keep the checkpoint's memory-mapped pages from piling up while loading
        with _held_library_logs(held):
            if scheme is not None and per_layer_class is None:
                from moescope.analysis.model import quantized_offload  # dequantized layer by layer, on use

                hf = quantized_offload.load(local, config, family, torch_dtype, scheme)
            elif per_layer_class is not None:
                hf = per_layer_class.from_pretrained(location, config=config, **kwargs)
            else:
                hf = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except MoescopeError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise _weights_error(source, local, err, held) from None
    except Exception as err:  # safetensors' SafetensorError and other loader errors
        if type(err).__module__.split(".")[0] in ("safetensors", "torch", "transformers", "accelerate"):
            raise _weights_error(source, local, err, held) from None
        raise
    finally:
        if releaser:
            releaser.stop()
    _replay(held)
    if device not in (None, "auto") and offload_dir is None:
        hf = hf.to(device)
    hf.eval()
    tokenizer = _load_tokenizer(location, trust_remote_code) if load_tokenizer else None
    model = MoEModel(hf, family, source, tokenizer=tokenizer, source_dir=local)
    model.offloaded = offload_dir is not None
    model.checkpoint_dtype = declared_dtype
    if model.offloaded:
        release_mapped_weights()
    if local is not None:  # unedited weights: the files identify them (cheap, and offload-proof)
        model._fingerprint = folder_fingerprint(local)
    betas = getattr(config, "moescope_skip_beta", None)
    if betas:  # the folder carries dynamic-skipping thresholds: route with them
        from moescope.analysis.model import skipping

        skipping.install(model, {int(k): float(v) for k, v in betas.items()})
    return model



def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's config and weight files: names, sizes and an evenly strided
    sample of 4 MB of each weight file's bytes (all bytes of files up to 64 MB)."""
    import hashlib

    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
                continue
            step = size // 4096
            for i in range(4096):
                fh.seek(i * step)
                h.update(fh.read(1024))
    return h.hexdigest()


COPIED_FILES = ("generation_config.json", *TOKENIZER_FILES)  # what an export copies besides config and weights


def files_fingerprint(folder: Path | None) -> str | None:
    """sha256 of the files an export copies from a model folder besides its config and weights
    (generation config and tokenizer files: names and bytes), so an export of a stored experiment
    notices a tokenizer edited since; None for a model without a folder."""
    import hashlib

    if folder is None:
        return None
    h = hashlib.sha256()
    for name in COPIED_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(f"{name}|{path.stat().st_size}|".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _load_tokenizer(location: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None  # transformers 5 would hand back an empty tokenizer instead of failing
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder is fine: everything but text decoding works


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise MoescopeError(f"unknown dtype '{dtype}'; accepted: float32, bfloat16, float16") from None


def config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value).removeprefix("torch.")) if value else None


def wrap_model(hf_model: nn.Module, source: str = "<in-memory>", tokenizer=None) -> MoEModel:
    """Wrap an already-built transformers model (tests, notebooks)."""
    return MoEModel(hf_model, family_for(hf_model.config), source, tokenizer=tokenizer)
