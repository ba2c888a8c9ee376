"""Quality and cost of a (pruned) model, measured the way the field measures them.

* :func:`perplexity` — ``exp`` of the mean next-token loss over every predicted token of token
  windows from any data source (``demo:DOMAIN``, ``file:``, ``hf:``), per domain and pooled
  (``"all"``). Windows are non-overlapping by default; ``stride < seq_len`` slides them (each
  window then scores only the tokens the previous one did not, with the earlier tokens as
  context). Results are cached by model and window content.
* :func:`run_tasks` — any lm-eval task through lm-eval's own ``HFLM`` wrapper around the
  in-memory model (original, pruned, skipping-patched), zero- or k-shot, with a sample limit.
  The offline tasks shipped in :data:`LOCAL_TASKS_DIR` (``moescope_demo_ppl_<domain>``,
  ``moescope_demo_continuation``) are always included.
* :func:`efficiency` — total and active parameters, weight bytes, peak memory while generating,
  prefill and generation tokens/s (same prompts, warm-up, median of repeats).
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moescope.analysis.capture import token_nll
from moescope.analysis.errors import MoescopeError

EVAL_VERSION = 1
LOCAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
Progress = Callable[[str, int, int], None]


def _skip_key(model) -> dict[str, float]:
    """The model's dynamic-skipping thresholds as JSON (part of every cache key and record:
    skipping changes outputs, the fingerprint covers only config and weights)."""
    return {str(k): v for k, v in sorted(model.skip_beta.items())}


# ---- perplexity ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """Token windows ``[N, L]`` with the first scored target position of each row (targets before
    it are context only) and the domain of each row."""

    input_ids: torch.Tensor
    score_from: tuple[int, ...]
    domains: tuple[str, ...]
    source: str
    describe: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.input_ids.contiguous().numpy().tobytes())
        h.update(repr((self.score_from, self.domains)).encode())
        return h.hexdigest()


def perplexity_windows(source: str, tokenizer, samples: int = 96, seq_len: int = 256, sampling: str = "first",
                       seed: int = 0, stride: int | None = None, split: str = "test") -> Windows:
    """``samples`` windows of ``seq_len`` tokens spread over the source's domains (as
    :func:`analysis.data.sample_tokens`: ``first`` takes consecutive windows from the start of
    each domain, ``random`` seeded offsets). With ``stride`` < ``seq_len`` (``first`` only) the
    windows start every ``stride`` tokens and each one after the first scores only its last
    ``stride`` targets."""
    from moescope.analysis.data import _check_positive, sample_tokens, token_streams

    length = _check_positive("seq_len", seq_len)
    if stride is None or stride == length:
        batch = sample_tokens(source, tokenizer, samples, length, seed=seed, sampling=sampling, split=split)
        return Windows(batch.input_ids, (1,) * batch.n_samples, batch.domains, batch.source, batch.describe())
    stride = _check_positive("stride", stride)
    if stride > length:
        raise MoescopeError(f"stride ({stride}) must not exceed seq_len ({length}); windows would skip tokens")
    if sampling != "first":
        raise MoescopeError("sliding windows (stride < seq_len) read each domain from its start; use --sampling first")
    from moescope.analysis.data import _not_enough, _shares, parse_source

    src = parse_source(source)
    streams = token_streams(src, tokenizer, split=split)
    rows, starts, labels = [], [], []
    for domain, k in sorted(_shares(_check_positive("samples", samples), sorted(streams)).items()):
        stream = streams[domain]
        need = length + (k - 1) * stride
        if stream.numel() < need:
            raise _not_enough(src, split, domain, stream.numel(), need, f"{k} windows of {length} with stride {stride}")
        for i in range(k):
            rows.append(stream[i * stride : i * stride + length])
            starts.append(1 if i == 0 else length - stride)
            labels.append(domain)
    what = f"{len(rows)}×{length} tokens, stride {stride}"
    return Windows(torch.stack(rows), tuple(starts), tuple(labels), src.spec, f"{src.spec} ({split}): {what}")


@torch.no_grad()
def window_perplexity(model, windows: Windows, batch_size: int = 8, progress: Progress | None = None) -> dict:
    """``{"ppl": {domain: ppl, ["all": pooled]}, "tokens": {domain: predicted tokens}}``."""
    device = next(model.hf.parameters()).device
    sums: dict[str, list[float]] = {}
    n = windows.input_ids.shape[0]
    for i in range(0, n, batch_size):
        ids = windows.input_ids[i : i + batch_size].to(device)
        nll = token_nll(model.hf(input_ids=ids, use_cache=False).logits, ids).float().cpu()  # [b, L-1]
        for row, domain in enumerate(windows.domains[i : i + batch_size]):
            scored = nll[row, windows.score_from[i + row] - 1 :]
            acc = sums.setdefault(domain, [0.0, 0])
            acc[0] += float(scored.double().sum())
            acc[1] += scored.numel()
        if progress:
            progress("perplexity", min(i + batch_size, n), n)
    ppl = {d: math.exp(s / c) for d, (s, c) in sorted(sums.items())}
    if len(ppl) > 1:
        ppl["all"] = math.exp(sum(s for s, _ in sums.values()) / sum(c for _, c in sums.values()))
    return {"ppl": ppl, "tokens": {d: c for d, (_, c) in sorted(sums.items())}}


def perplexity(model, source: str = "demo:all", samples: int = 96, seq_len: int = 256, sampling: str = "first",
               seed: int = 0, stride: int | None = None, split: str = "test", tokenizer=None, batch_size: int = 8,
               cache=None, progress: Progress | None = None) -> dict:
    """Perplexity of ``model`` on ``source`` (see :func:`perplexity_windows`), cached when a
    :class:`analysis.cache.Cache` is given. Returns ``{"ppl": {domain: ppl, "all": …},
    "tokens": {…}, "data": description, "value": headline perplexity}`` where ``value`` is the
    pooled ``all`` for a multi-domain source, else the single domain's."""
    windows = perplexity_windows(source, tokenizer or model.tokenizer, samples, seq_len, sampling, seed, stride, split)

    def compute():
        out = window_perplexity(model, windows, batch_size=batch_size, progress=progress)
        return {"meta": out}

    if cache is None:
        out = compute()["meta"]
    else:
        parts = {"model": model.fingerprint(), "skip_beta": _skip_key(model),
                 "windows": windows.fingerprint, "version": EVAL_VERSION}
        entry = cache.get_or_compute("perplexity", parts, compute, label=f"{model.source}-{windows.source}")
        out = {"ppl": entry.meta["ppl"], "tokens": entry.meta["tokens"]}
    ppl = out["ppl"]
    return {**out, "data": windows.describe, "value": ppl.get("all", next(iter(ppl.values())))}


def perplexity_by_domain(model, source: str = "demo:all", seq_len: int = 256, max_tokens: int | None = 16384,
                         tokenizer=None, batch_size: int = 8, progress: Progress | None = None) -> dict[str, float]:
    """``{domain: perplexity, "all": pooled}`` over the first ``max_tokens`` test tokens of every
    domain in consecutive non-overlapping windows (the strategy benchmark's fixed budget)."""
    from moescope.analysis.data import eval_windows

    batch = eval_windows(source, tokenizer or model.tokenizer, seq_len, max_tokens=max_tokens)
    windows = Windows(batch.input_ids, (1,) * batch.n_samples, batch.domains, batch.source, batch.describe())
    return window_perplexity(model, windows, batch_size=batch_size, progress=progress)["ppl"]


# ---- lm-eval ---------------------------------------------------------------------------------
def local_task_names() -> list[str]:
    """The offline tasks and groups shipped with moescope (``moescope_demo_*``)."""
    import re

    names = []
    for path in sorted(LOCAL_TASKS_DIR.glob("*.yaml")):
        m = re.search(r"^(?:task|group):\s*(\S+)", path.read_text(), re.M)
        if m:
            names.append(m.group(1))
    return names


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool = True):
    """lm-eval's TaskManager with moescope's local task folder included (indexing lm-eval's own
    thousands of task files takes seconds, so it is built once per process, and only when a task
    outside the local folder is asked for)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def _quiet_lm_eval() -> None:
    import logging

    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_tasks(model, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
              batch_size: int = 8, seed: int = 0, verbose: bool = False) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks`` (hub task names need the network;
    ``moescope_demo_*`` are local). Returns ``{task: {metric: value}}`` with lm-eval's metric
    names stripped of their filter suffix (``acc,none`` → ``acc``, stderr as ``acc_stderr``)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        return {}
    if not verbose:
        _quiet_lm_eval()
    local = set(local_task_names()) | {"moescope_demo"}
    manager = task_manager(include_defaults=not set(tasks) <= local)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MoescopeError(f"unknown lm-eval task(s) {', '.join(unknown)}; moescope ships "
                            f"{', '.join(sorted(local))}; "
                            "any task of `lm_eval ls tasks` works where its data set can be downloaded")
    hf = model.hf
    was_cache = hf.config.use_cache
    lm = HFLM(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, max_length=_max_length(hf.config))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, verbosity="ERROR" if not verbose else None)
    except (ConnectionError, OSError) as err:
        raise MoescopeError(f"lm-eval could not load the data of {', '.join(tasks)}: {err}; hub tasks need the "
                            "network (the moescope_demo_* tasks run offline)") from None
    finally:
        hf.config.use_cache = was_cache
    out = {}
    for task, metrics in res["results"].items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name, _, _filter = key.partition(",")
            if isinstance(value, float) and math.isnan(value):
                continue
            row["samples" if name == "sample_len" else name] = float(value)
        if row:
            out[task] = row
    return out


def _local_tasks_hash() -> str:
    """sha256 of the local task definitions and the demo test split they read."""
    from moescope.analysis.data import demo_corpus_dir

    h = hashlib.sha256()
    files = sorted(LOCAL_TASKS_DIR.glob("*.yaml")) + [LOCAL_TASKS_DIR / "demo_tasks.py"]
    files += sorted(demo_corpus_dir().glob("*/test.txt"))
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cached_tasks(model, tasks: list[str], num_fewshot=None, limit=None, batch_size: int = 8, seed: int = 0,
                 cache=None) -> dict[str, dict[str, float]]:
    """:func:`run_tasks`, stored under the cache by model (and skip thresholds), tasks, shots,
    limit and seed, so the original model of many experiments is evaluated once."""
    if cache is None:
        return run_tasks(model, tasks, num_fewshot, limit, batch_size, seed)
    import lm_eval

    parts = {"model": model.fingerprint(), "skip_beta": _skip_key(model),
             "tasks": sorted(tasks), "num_fewshot": num_fewshot, "limit": limit, "seed": seed,
             "lm_eval": getattr(lm_eval, "__version__", "?"), "local_tasks": _local_tasks_hash(), "version": EVAL_VERSION}
    entry = cache.get_or_compute(
        "lm_eval", parts, lambda: {"meta": {"results": run_tasks(model, tasks, num_fewshot, limit, batch_size, seed)}},
        label=f"{model.source}-{'-'.join(sorted(tasks))}")
    return entry.meta["results"]


def _max_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 8192)
    return 2048


# ---- efficiency ------------------------------------------------------------------------------
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
        "skip_beta": _skip_key(model),
        "device": str(device), "threads": torch.get_num_threads(), "params": asdict(p),
    }


def isolated_efficiency(source: str, plan: dict | None, params: EfficiencyParams, skip_beta: dict | None = None,
                        dtype: str | None = None, device: str | None = None) -> dict:
    """:func:`efficiency` of ``source`` with ``plan`` applied, measured in a fresh Python process,
    so that peak memory is that model's alone (not whatever this process loaded before) and
    timings do not depend on what ran earlier. Returns ``{"plain": …, "skip": … or None}``: the
    second with dynamic skipping at ``skip_beta`` (or the plan's own β)."""
    import json
    import subprocess
    import sys
    import tempfile

    spec = {"source": source, "plan": plan, "params": asdict(params), "skip_beta": skip_beta,
            "dtype": dtype, "device": device}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "moescope.analysis.evaluate", f.name], capture_output=True, text=True)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoescopeError(f"efficiency measurement of {source} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _efficiency_child(spec_path: str) -> dict:
    import json

    from moescope.analysis.models import load_moe
    from moescope.analysis.plan import PruningPlan
    from moescope.analysis.prune import apply

    spec = json.loads(Path(spec_path).read_text())
    params = EfficiencyParams(**spec["params"])
    model = load_moe(spec["source"], dtype=spec.get("dtype"), device=spec.get("device"))
    plan = PruningPlan.from_json(spec["plan"]) if spec.get("plan") else None
    if plan is not None:
        apply(model, plan)
    betas = spec.get("skip_beta") or (plan.skip_beta if plan else None)
    return efficiency_with_skipping(model, params, betas)


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


# ---- one evaluation spec ---------------------------------------------------------------------
@dataclass
class EvalSpec:
    """What an evaluation measures (stored with every experiment)."""

    ppl: list[str] = field(default_factory=lambda: ["demo:all"])
    samples: int = 96
    seq_len: int = 256
    sampling: str = "first"
    seed: int = 0
    stride: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    efficiency: bool = True
    efficiency_params: EfficiencyParams = field(default_factory=EfficiencyParams)
    skip_calib: str | None = "demo:all"  # β for the "with skipping" efficiency, when the model has none
    skip_calib_samples: int = 16

    @classmethod
    def from_json(cls, data: dict) -> EvalSpec:
        data = dict(data)
        eff = EfficiencyParams(**data.pop("efficiency_params", {}))
        return cls(**data, efficiency_params=eff)

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        from moescope.analysis.data import parse_source

        for src in self.ppl:
            parse_source(src)
        if self.limit is not None and self.limit <= 0:
            raise MoescopeError(f"--limit must be positive, got {self.limit}")


def evaluate_quality(model, spec: EvalSpec, cache=None, progress: Progress | None = None) -> dict:
    """``{"ppl": {source: value}, "ppl_domains": {source: {domain: ppl}}, "tasks": {task: {metric: v}},
    "timings": {...}}`` for ``model`` as it is now."""
    out: dict = {"ppl": {}, "ppl_domains": {}, "ppl_data": {}, "tasks": {}, "timings": {}}
    for src in spec.ppl:
        t0 = time.perf_counter()
        res = perplexity(model, src, samples=spec.samples, seq_len=spec.seq_len, sampling=spec.sampling,
                         seed=spec.seed, stride=spec.stride, batch_size=spec.batch_size, cache=cache,
                         progress=progress)
        out["ppl"][src] = res["value"]
        out["ppl_domains"][src] = res["ppl"]
        out["ppl_data"][src] = res["data"]
        out["timings"][f"ppl {src}"] = time.perf_counter() - t0
    if spec.tasks:
        t0 = time.perf_counter()
        if progress:
            progress("lm-eval", 0, 1)
        out["tasks"] = cached_tasks(model, spec.tasks, num_fewshot=spec.num_fewshot, limit=spec.limit,
                                    batch_size=spec.batch_size, seed=spec.seed, cache=cache)
        if progress:
            progress("lm-eval", 1, 1)
        out["timings"]["tasks"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":  # the child process of isolated_efficiency
    import json
    import sys

    print(json.dumps(_efficiency_child(sys.argv[1])))
