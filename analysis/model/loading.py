"""Loading a model: ``'demo'``, a local folder or a hub id, checked from its config before any
weight is read; the tokenizer; the folder fingerprint; wrapping an in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moescope.analysis.errors import MoescopeError
from moescope.analysis.families import family_for, supported_model_types
from moescope.analysis.model.offload import PeriodicRelease, non_layer_modules, release_mapped_weights
from moescope.analysis.model.save import TOKENIZER_FILES
from moescope.analysis.model.view import MoEModel
from moescope.analysis.paths import DEMO_SOURCES


def resolve_source(source: str) -> tuple[str, Path | None]:
    """``'demo'`` / ``'demo-upcycled'`` → the shipped folders; an existing path → that folder;
    otherwise a hub id."""
    if source in DEMO_SOURCES:
        folder, flag = DEMO_SOURCES[source]
        path = folder()
        if not (path / "config.json").is_file():
            raise MoescopeError(f"the {source} model is missing at '{path}'; run `python demo/train_model.py{flag}` "
                                "to build it")
        return str(path), path
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoescopeError(f"'{source}' is a folder without config.json; expected a transformers model folder")
        return str(path), path
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise MoescopeError(f"model '{source}' not found: give 'demo', 'demo-upcycled', an existing model folder, "
                            "or a hub id (org/name)")
    return source, None


def load_config(source: str, trust_remote_code: bool = False):
    """The model's config (no weights), with a one-line error when it cannot be had."""
    from transformers import AutoConfig

    location, local = resolve_source(source)
    remote_code_msg = (
        f"'{source}' needs custom code from its repository; moescope does not run it unless you pass "
        f"--trust-remote-code (supported without it: {', '.join(supported_model_types())})"
    )
    if local is not None and not trust_remote_code:
        raw = json.loads((local / "config.json").read_text())
        if "auto_map" in raw and raw.get("model_type") not in supported_model_types():
            raise MoescopeError(remote_code_msg)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
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
        raise MoescopeError(
            f"cannot load '{source}': not a local model folder, and the Hugging Face hub did not provide it ({msg})"
        ) from None


def load_moe(
    source: str = "demo",
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
    weights: bool = True,
    offload_dir: str | Path | None = None,
) -> MoEModel:
    """Load an MoE causal LM (``'demo'``, a local folder or a hub id) and wrap it.

    The architecture is checked from the config before any weight is read: unknown or non-MoE
    architectures are refused with the list of supported families. ``weights=False`` builds the
    model on the meta device from the config alone (shapes, counts and bytes, no download of the
    weights), in the checkpoint's dtype unless ``dtype`` is given. ``offload_dir`` keeps the
    decoder layers on disk there (accelerate), so a model larger than memory can be analysed
    layer by layer; such a model is read-only (edits need the weights in memory).
    """
    from transformers import AutoModelForCausalLM

    from moescope.analysis import nonuniform

    location, local = resolve_source(source)
    config = load_config(source, trust_remote_code)
    family = family_for(config)
    per_layer_class = nonuniform.model_class(config)  # moescope's own export with per-layer counts
    if not weights:
        torch_dtype = parse_dtype(dtype) if dtype is not None else (config_dtype(config) or torch.float32)
        with torch.device("meta"):
            if per_layer_class is not None:
                hf = per_layer_class._from_config(config, dtype=torch_dtype)
            else:
                hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        return MoEModel(hf.eval(), family, source, tokenizer=None, source_dir=local)
    torch_dtype = parse_dtype(dtype or "float32")
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "auto":
        kwargs["device_map"] = "auto"
    if offload_dir is not None:
        # decoder layers stay on disk; accelerate loads one module's weights at a time
        prefix = family.layers_path
        home = device if device not in (None, "auto") else "cpu"
        kwargs["device_map"] = {prefix: "disk", **{k: home for k in non_layer_modules(config, family)}}
        kwargs["offload_folder"] = str(offload_dir)
    releaser = PeriodicRelease() if offload_dir is not None else None
    try:
        if releaser:
            releaser.start()  # keep the checkpoint's memory-mapped pages from piling up while loading
        if per_layer_class is not None:
            hf = per_layer_class.from_pretrained(location, config=config, **kwargs)
        else:
            hf = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as err:
        raise MoescopeError(f"cannot load the weights of '{source}': {str(err).splitlines()[0]}") from None
    finally:
        if releaser:
            releaser.stop()
    if device not in (None, "auto") and offload_dir is None:
        hf = hf.to(device)
    hf.eval()
    tokenizer = _load_tokenizer(location, trust_remote_code) if load_tokenizer else None
    model = MoEModel(hf, family, source, tokenizer=tokenizer, source_dir=local)
    model.offloaded = offload_dir is not None
    if model.offloaded:
        release_mapped_weights()
    if local is not None:  # unedited weights: the files identify them (cheap, and offload-proof)
        model._fingerprint = folder_fingerprint(local)
    betas = getattr(config, "moescope_skip_beta", None)
    if betas:  # the folder carries dynamic-skipping thresholds: route with them
        from moescope.analysis import skipping

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
