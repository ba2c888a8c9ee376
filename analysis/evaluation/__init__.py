"""Quality and cost of a (pruned) model, measured the way the field measures them.

Sub-modules: :mod:`.perplexity`, :mod:`.tasks` (lm-eval), :mod:`.efficiency`, :mod:`.child` (the
fresh process that measures efficiency), :mod:`.quality` (the evaluation spec and its run).


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
from moescope.analysis.evaluation.efficiency import (
    EfficiencyParams,
    efficiency,
    efficiency_prompts,
    efficiency_with_skipping,
    isolated_efficiency,
)
from moescope.analysis.evaluation.keys import EVAL_VERSION
from moescope.analysis.evaluation.perplexity import (
    perplexity,
    perplexity_by_domain,
    perplexity_windows,
    window_perplexity,
)
from moescope.analysis.evaluation.quality import EvalSpec, evaluate_quality
from moescope.analysis.evaluation.tasks import (
    LOCAL_TASKS_DIR,
    cached_tasks,
    local_task_names,
    run_tasks,
    task_manager,
)

__all__ = ["EVAL_VERSION", "LOCAL_TASKS_DIR", "EfficiencyParams", "EvalSpec", "cached_tasks", "efficiency",
           "efficiency_prompts", "efficiency_with_skipping", "evaluate_quality", "isolated_efficiency",
           "local_task_names", "perplexity", "perplexity_by_domain", "perplexity_windows", "run_tasks",
           "task_manager", "window_perplexity"]
