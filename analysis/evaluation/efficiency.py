"""Size and speed of a model: total and active parameters, weight bytes, peak memory while
generating, prefill and generation tokens/s (same prompts, warm-up, median of repeats), with and
without dynamic skipping, in this process or in a fresh one (:mod:`.child`)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from moescope.analysis.core import defaults as D
from moescope.analysis.core.errors import MoescopeError
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


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy so far (``/proc/stat``); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class MachineLoad:
    """How busy the rest of the machine was during a measurement: CPU seconds spent by every
    other process per wall-clock second (in cores), from ``/proc/stat`` minus this process.

    The three readings (the machine's busy CPU seconds, this process's, the wall clock) are
    arguments so the arithmetic can be checked on given numbers; measuring it on a real machine is
    ``benchmarks/efficiency.py --load``."""

    def __init__(self, machine=_busy_cpu_seconds, own=_own_cpu_seconds, clock=time.perf_counter):
        self._machine, self._own, self._clock = machine, own, clock
        self.cores: float | None = None

    def __enter__(self):
        self.busy, self.own, self.wall = self._machine(), self._own(), self._clock()
        return self

    def __exit__(self, *exc):
        wall = max(self._clock() - self.wall, 1e-9)
        busy = self._machine()
        self.cores = (None if busy is None or self.busy is None
                      else max(0.0, (busy - self.busy) - (self._own() - self.own)) / wall)


# a figure measured while other processes kept this many cores busy is not trusted as a speed-up
BUSY_CORES = 0.25


SLOT_KIND = "efficiency-slot"  # the cache kind whose one lock orders speed measurements
SLOT_WAIT = "waiting for the speed slot"  # the progress stage while another job measures speed


@contextlib.contextmanager
def measurement_slot(cache_root: str | None = None, progress: Progress | None = None):
    """One speed measurement at a time on this machine (across processes): the cache's lock of one
    fixed key; a job that finds it taken reports it is waiting in line."""
    from moescope.analysis.core.cache import Cache, cache_key

    cache = Cache(cache_root) if cache_root else Cache()
    wait = (lambda: progress(SLOT_WAIT, 0, 1)) if progress else None
    with cache.lock(SLOT_KIND, cache_key(SLOT_KIND, {"slot": "speed"}), on_wait=wait):
        yield


def speed_verdict(pruned: dict | None, original: dict | None, key: str = "generate_tokens_per_s") -> dict | None:
    """Whether a pruned model's speed change is measured well enough to state: the ratio of the
    medians, its range over the repeats (worst to best pairing), and ``noise`` (a reason) when
    either side ran while other processes kept ≥ ``BUSY_CORES`` cores busy or the range covers 1.0×.
    None when either side has no figure."""
    if not pruned or not original or not pruned.get(key) or not original.get(key):
        return None
    ratio = pruned[key] / original[key]
    runs_p, runs_o = pruned.get(key.replace("_per_s", "_runs")), original.get(key.replace("_per_s", "_runs"))
    low = high = ratio
    if runs_p and runs_o:
        low, high = min(runs_p) / max(runs_o), max(runs_p) / min(runs_o)
    busy = max((m.get("busy_cores") or 0.0) for m in (pruned, original))
    noise = None
    if busy >= BUSY_CORES:
        noise = f"measured while other processes kept {busy:.1f} cores busy"
    elif low <= 1.0 <= high:
        noise = f"the repeats' range {low:.2f}–{high:.2f}× covers 1.0×"
    return {"ratio": ratio, "low": low, "high": high, "busy_cores": busy, "noise": noise}


@dataclass
class EfficiencyParams:
    prompt_tokens: int = D.PROMPT_TOKENS
    new_tokens: int = D.NEW_TOKENS
    batch_size: int = 1
    repeats: int = D.SPEED_REPEATS
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
    with MachineLoad() as load:  # how busy the rest of the machine keeps the CPU meanwhile
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
        # every repeat, so that a comparison can tell a change from noise, and how busy the machine was
        "prefill_tokens_runs": [batch * length / t for t in prefill],
        "generate_tokens_runs": [batch * (p.new_tokens - 1) / max(g - f, 1e-9) for f, g in zip(prefill, generate)],
        "busy_cores": load.cores, "cpu_count": os.cpu_count(),
        "skip_beta": skip_key(model),
        "device": str(device), "threads": torch.get_num_threads(), "params": asdict(p),
    }


def isolated_efficiency(source: str, plan: dict | None, params: EfficiencyParams, skip_beta: dict | None = None,
                        dtype: str | None = None, device: str | None = None, cache_root: str | None = None,
                        trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """:func:`efficiency` of ``source`` with ``plan`` applied, measured in a fresh Python process,
    so that peak memory is that model's alone (not whatever this process loaded before) and
    timings do not depend on what ran earlier. Returns ``{"plain": …, "skip": … or None}``: the
    second with dynamic skipping at ``skip_beta`` (or the plan's own β). The child loads the model
    with the same ``device``, ``trust_remote_code`` and ``allow_pickle`` as the caller; it is
    stopped at once if this process is interrupted or terminated, and its spec file removed."""
    import json
    import sys
    import tempfile

    from moescope.analysis.core.processes import run_child

    spec = {"source": source, "plan": plan, "params": asdict(params), "skip_beta": skip_beta,
            "dtype": dtype, "device": device, "cache_root": cache_root,
            "trust_remote_code": bool(trust_remote_code), "allow_pickle": bool(allow_pickle)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="moescope-efficiency-", delete=False) as f:
        spec_path = Path(f.name)
        try:
            json.dump(spec, f)
        except BaseException:
            spec_path.unlink(missing_ok=True)
            raise
    try:
        proc = run_child([sys.executable, "-m", "moescope.analysis.evaluation.child", str(spec_path)])
    finally:
        spec_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoescopeError(f"efficiency measurement of {source} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def efficiency_with_skipping(model, params: EfficiencyParams, betas: dict | None,
                             prompts: torch.Tensor | None = None) -> dict:
    """``{"plain": efficiency without dynamic skipping, "skip": with skipping at ``betas`` (and
    the fraction of expert calls skipped) or None}``; the model's own skipping is restored after."""
    from moescope.analysis.model import skipping

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

