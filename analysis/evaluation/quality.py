"""One evaluation spec (stored with every experiment) and the quality measurement it asks for:
perplexity on each source and lm-eval tasks."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from moescope.analysis.core import defaults as D
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.evaluation.efficiency import EfficiencyParams
from moescope.analysis.evaluation.keys import Progress
from moescope.analysis.evaluation.perplexity import perplexity
from moescope.analysis.evaluation.tasks import cached_tasks_with_docs


@dataclass
class EvalSpec:
    """What an evaluation measures (stored with every experiment)."""

    ppl: list[str] = field(default_factory=lambda: [D.EVAL_SOURCE])
    samples: int = D.EVAL_SAMPLES
    seq_len: int = D.EVAL_SEQ_LEN
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
        if self.limit is not None and (not math.isfinite(self.limit) or self.limit <= 0
                                       or (self.limit > 1 and self.limit != int(self.limit))):
            raise MoescopeError(f"--limit must be a fraction in (0, 1] or a whole number of samples, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise MoescopeError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        for flag, value in (("--samples", self.samples), ("--seq-len", self.seq_len), ("--batch-size", self.batch_size),
                            ("--stride", self.stride)):
            if value is not None and value < 1:
                raise MoescopeError(f"{flag} must be a positive number, got {value}")

    def validate_for(self, config) -> None:
        """The sequence settings against the model's limit (``max_position_embeddings``), from the
        config alone: checked before any weights are read."""
        from moescope.analysis.model.loading import check_seq_len

        check_seq_len(config, self.seq_len, "--seq-len")
        if self.efficiency:
            p = self.efficiency_params
            check_seq_len(config, p.prompt_tokens + p.new_tokens, "--prompt-tokens + --new-tokens")


def evaluate_quality(model, spec: EvalSpec, cache=None, progress: Progress | None = None) -> dict:
    """``{"ppl": {source: value}, "ppl_domains": {source: {domain: ppl}}, "ppl_interval": {source:
    {domain: [low, high]}}, "ppl_windows": {source: {"nll": [...], "tokens": [...], "domains": [...]}},
    "tasks": {task: {metric: v, metric_stderr: se}}, "task_docs": {task: {metric: [per document]}},
    "timings": {...}}`` for ``model`` as it is now. The per-window losses and per-document values
    are what a paired comparison (:mod:`~moescope.analysis.evaluation.paired`) reads."""
    out: dict = {"ppl": {}, "ppl_domains": {}, "ppl_interval": {}, "ppl_data": {}, "ppl_windows": {}, "tasks": {},
                 "task_docs": {}, "timings": {}}
    for src in spec.ppl:
        t0 = time.perf_counter()
        res = perplexity(model, src, samples=spec.samples, seq_len=spec.seq_len, sampling=spec.sampling,
                         seed=spec.seed, stride=spec.stride, batch_size=spec.batch_size, cache=cache,
                         progress=progress)
        out["ppl"][src] = res["value"]
        out["ppl_domains"][src] = res["ppl"]
        out["ppl_interval"][src] = res["interval"]  # per domain and "all": the per-window 95 % range
        out["ppl_data"][src] = res["data"]
        out["ppl_windows"][src] = {k: list(res["windows"][k]) for k in ("nll", "tokens", "domains")}
        out["timings"][f"ppl {src}"] = time.perf_counter() - t0
    if spec.tasks:
        t0 = time.perf_counter()
        if progress:  # until lm-eval has built its requests (then "lm-eval requests" counts them)
            progress("lm-eval: preparing the requests", 0, 1)
        out["tasks"], out["task_docs"] = cached_tasks_with_docs(
            model, spec.tasks, num_fewshot=spec.num_fewshot, limit=spec.limit, batch_size=spec.batch_size,
            seed=spec.seed, cache=cache, progress=progress)
        out["timings"]["tasks"] = time.perf_counter() - t0
    return out

