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
# Names are loaded from their sub-module on first use (PEP 562), so that importing one torch-free
# sub-module (``paired``, behind every verdict that ``experiments ls`` prints) does not import torch.
_WHERE = {
    "efficiency": ("EfficiencyParams", "efficiency", "efficiency_prompts", "efficiency_with_skipping",
                   "isolated_efficiency"),
    "keys": ("EVAL_VERSION",),
    "perplexity": ("perplexity", "perplexity_by_domain", "perplexity_windows", "window_perplexity"),
    "quality": ("EvalSpec", "evaluate_quality"),
    "tasks": ("LOCAL_TASKS_DIR", "cached_tasks", "local_task_names", "run_tasks", "task_manager"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
