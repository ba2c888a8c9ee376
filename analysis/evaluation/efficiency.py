"""Size and speed of a model: total and active parameters, weight bytes, peak memory while
generating, prefill and generation tokens/s (same prompts, warm-up, median of repeats), with and
without dynamic skipping, in this process or in a fresh one (:mod:`.child`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moescope.analysis.errors import MoescopeError
from moescope.analysis.evaluation.keys import Progress, skip_key


def _rss_peak_reset() -> bool:
    """Reset this process's peak-RSS mark (Linux ``/proc/self/clear_refs`` 5); False where
    unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class EfficiencyParams:
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 1
    source: str = "demo:all"

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise MoescopeError(f"efficiency {name} must be at least 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise MoescopeError("efficiency new_tokens must be at least 2 (one prefill token, one decoded)")


def efficiency_prompts(tokenizer, params: EfficiencyParams) -> torch.Tensor:
    """The same prompts for every model: the first ``batch_size`` test windows of the source."""
    from moescope.analysis.data import sample_tokens

    return sample_tokens(params.source, tokenizer, params.batch_size, params.prompt_tokens, sampling="first",
                         split="test").input_ids


@torch.no_grad()
def efficiency(model, params: EfficiencyParams | None = None, prompts: torch.Tensor | None = None,
               progress: Progress | None = None) -> dict:
    """Size and speed of ``model`` as it is now (pruned, skipping or not).

    Prefill: one forward over the prompts. Generation: greedy ``generate`` of exactly
    ``new_tokens`` tokens; generation tokens/s counts the ``new_tokens - 1`` decoded after the
    first, over the generate time minus the prefill time. Times are medians of ``repeats`` after
    ``warmup`` runs. Peak memory: CUDA allocator peak on a GPU; on CPU, the process's peak
    resident set while generating (reset before, where Linux allows)."""
    p = params or EfficiencyParams()
    hf = model.hf
    device = next(hf.parameters()).device
    ids = (prompts if prompts is not None else efficiency_prompts(model.tokenizer, p)).to(device)
    batch, length = ids.shape
    pad = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    gen_kwargs = dict(max_new_tokens=p.new_tokens, min_new_tokens=p.new_tokens, do_sample=False,
                      pad_token_id=pad, attention_mask=torch.ones_like(ids))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    prefill, generate = [], []
    total = p.warmup + p.repeats
    for i in range(total):
        t_pre = timed(lambda: hf(input_ids=ids, use_cache=True))
        if i == p.warmup:  # measure peak memory on the first timed generate
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            reset = _rss_peak_reset()
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _proc_status("VmRSS")
        t_gen = timed(lambda: hf.generate(ids, **gen_kwargs))
        if i == p.warmup:
            if device.type == "cuda":
                peak, how = torch.cuda.max_memory_allocated(device), "cuda allocated peak"
            else:
                peak, how = _proc_status("VmHWM"), "peak RSS while generating" if reset else "process peak RSS"
        if i >= p.warmup:
            prefill.append(t_pre)
            generate.append(t_gen)
        if progress:
            progress("efficiency", i + 1, total)
    t_pre, t_gen = statistics.median(prefill), statistics.median(generate)
    counts = model.parameter_counts()
    return {
        "params_total": counts["total"], "params_active": counts["active"], "params_experts": counts["experts"],
        "weight_bytes": sum(model.bytes_by_dtype().values()),
        "peak_memory_bytes": peak, "peak_memory_kind": how, "memory_before_generate_bytes": before,
        "prefill_tokens_per_s": batch * length / t_pre,
        "generate_tokens_per_s": batch * (p.new_tokens - 1) / max(t_gen - t_pre, 1e-9),
        "prefill_s": t_pre, "generate_s": t_gen,
        "skip_beta": skip_key(model),
        "device": str(device), "threads": torch.get_num_threads(), "params": asdict(p),
    }


def isolated_efficiency(source: str, plan: dict | None, params: EfficiencyParams, skip_beta: dict | None = None,
                        dtype: str | None = None, device: str | None = None, cache_root: str | None = None) -> dict:
    """:func:`efficiency` of ``source`` with ``plan`` applied, measured in a fresh Python process,
    so that peak memory is that model's alone (not whatever this process loaded before) and
    timings do not depend on what ran earlier. Returns ``{"plain": …, "skip": … or None}``: the
    second with dynamic skipping at ``skip_beta`` (or the plan's own β)."""
    import json
    import subprocess
    import sys
    import tempfile

    spec = {"source": source, "plan": plan, "params": asdict(params), "skip_beta": skip_beta,
            "dtype": dtype, "device": device, "cache_root": cache_root}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "moescope.analysis.evaluation.child", f.name], capture_output=True, text=True)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoescopeError(f"efficiency measurement of {source} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def efficiency_with_skipping(model, params: EfficiencyParams, betas: dict | None,
                             prompts: torch.Tensor | None = None) -> dict:
    """``{"plain": efficiency without dynamic skipping, "skip": with skipping at ``betas`` (and
    the fraction of expert calls skipped) or None}``; the model's own skipping is restored after."""
    from moescope.analysis import skipping

    own = dict(model.skip_beta)
    prompts = prompts if prompts is not None else efficiency_prompts(model.tokenizer, params)
    try:
        skipping.remove(model)
        out = {"plain": efficiency(model, params, prompts), "skip": None}
        if betas:
            counter = skipping.install(model, {int(k): float(v) for k, v in betas.items()})
            out["skip"] = {**efficiency(model, params, prompts), "skipped_fraction": counter.fraction}
    finally:
        skipping.remove(model)
        if own:
            skipping.install(model, own)
    return out

