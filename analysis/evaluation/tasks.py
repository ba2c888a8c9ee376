"""lm-eval tasks on the in-memory model (original, pruned, skipping-patched) through lm-eval's own
``HFLM`` wrapper, zero- or k-shot, with a sample limit. The offline tasks shipped in
:data:`LOCAL_TASKS_DIR` (``moescope_demo_ppl_<domain>``, ``moescope_demo_continuation``) are always
included."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from pathlib import Path

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.evaluation.keys import EVAL_VERSION, Progress, skip_key

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


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


# lm-eval's standard errors: the closed form ``sd / √n`` for a mean (acc, exact_match), a bootstrap of
# this many draws for the others (perplexity-like aggregations); 0 would skip them all
STDERR_BOOTSTRAP = 100


@contextlib.contextmanager
def _request_progress(progress: Progress | None):
    """Report lm-eval's own progress over its requests (the tqdm bar its HF model wrapper draws
    over loglikelihood and generation requests) as ``progress("lm-eval requests", done, total)``;
    the bar itself stays quiet. lm-eval's bootstrap of standard errors runs in this process
    (``DISABLE_MULTIPROC``) instead of a pool of one process per core, and its look-up of the
    working folder's git commit is skipped."""
    import io

    import lm_eval.models.huggingface as hf_module

    original = hf_module.tqdm
    env = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"

    class Reporting(original):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            if progress and self.total:
                progress("lm-eval requests", 0, int(self.total))

        def update(self, n=1):
            out = super().update(n)
            if progress and self.total:
                progress("lm-eval requests", int(self.n), int(self.total))
            return out

    hf_module.tqdm = Reporting
    # lm-eval records the git commit of the working folder by running `git describe`, whose
    # "fatal: not a git repository" reaches the terminal outside a checkout: moescope keeps its own
    # versions with each experiment, so lm-eval is given none to look up
    import lm_eval.evaluator as evaluator_module

    git_probe = evaluator_module.get_git_commit_hash
    evaluator_module.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator_module.get_git_commit_hash = git_probe
        hf_module.tqdm = original
        if env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = env


def run_tasks(model, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
              batch_size: int = 8, seed: int = 0, verbose: bool = False,
              progress: Progress | None = None, max_length: int | None = None) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks`` (hub task names need the network;
    ``moescope_demo_*`` are local). Returns ``{task: {metric: value}}`` with lm-eval's metric
    names stripped of their filter suffix (``acc,none`` → ``acc``, lm-eval's standard error as
    ``acc_stderr``). ``progress`` gets lm-eval's requests done / total; ``max_length`` (default:
    the model's context) bounds lm-eval's windows."""
    return run_tasks_with_docs(model, tasks, num_fewshot, limit, batch_size, seed, verbose, progress, max_length)[0]


def run_tasks_with_docs(model, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
                        batch_size: int = 8, seed: int = 0, verbose: bool = False,
                        progress: Progress | None = None, max_length: int | None = None) -> tuple[dict, dict]:
    """:func:`run_tasks`'s scores and, from lm-eval's logged samples, every document's own value of
    each metric that can be paired (:func:`~moescope.analysis.evaluation.paired.supported`):
    ``{task: {metric: [value per document, in document order]}}`` (a (log-likelihood, count) pair
    for the perplexity-like metrics)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        return {}, {}
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
    lm = HFLM(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size,
              max_length=max_length or _max_length(hf.config))
    try:
        with _request_progress(progress):
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=True, bootstrap_iters=STDERR_BOOTSTRAP,
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
    return out, per_document(res.get("samples") or {})


def per_document(samples: dict) -> dict[str, dict[str, list]]:
    """``{task: {metric: [value per document]}}`` from lm-eval's logged ``samples`` (one filter per
    task: ``none`` where present), documents in ``doc_id`` order; metrics that cannot be paired left out."""
    from moescope.analysis.evaluation.paired import supported

    out: dict[str, dict[str, list]] = {}
    for task, rows in samples.items():
        if not rows:
            continue
        filters = {r.get("filter") for r in rows}
        keep = "none" if "none" in filters else sorted(f for f in filters if f is not None)[0] if filters - {None} \
            else None
        rows = sorted((r for r in rows if r.get("filter") == keep), key=lambda r: r["doc_id"])
        metrics = {}
        for metric in rows[0].get("metrics") or []:
            values = [list(v) if isinstance(v, tuple | list) else v for v in (r.get(metric) for r in rows)]
            if all(v is not None for v in values) and supported(metric, values):
                metrics[metric] = [float(v) if isinstance(v, int | float) else [float(x) for x in v] for v in values]
        if metrics:
            out[task] = metrics
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
                 cache=None, progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """:func:`run_tasks`, stored under the cache by model (and skip thresholds), tasks, shots,
    limit and seed, so the original model of many experiments is evaluated once."""
    return cached_tasks_with_docs(model, tasks, num_fewshot, limit, batch_size, seed, cache, progress)[0]


def cached_tasks_with_docs(model, tasks: list[str], num_fewshot=None, limit=None, batch_size: int = 8, seed: int = 0,
                           cache=None, progress: Progress | None = None) -> tuple[dict, dict]:
    """:func:`run_tasks_with_docs`, cached as :func:`cached_tasks` (the per-document values are
    stored with the scores, so two models' scores can be paired document by document)."""
    if cache is None:
        return run_tasks_with_docs(model, tasks, num_fewshot, limit, batch_size, seed, progress=progress)
    import lm_eval

    parts = {"model": model.fingerprint(), "skip_beta": skip_key(model),
             "tasks": sorted(tasks), "num_fewshot": num_fewshot, "limit": limit, "seed": seed,
             "lm_eval": getattr(lm_eval, "__version__", "?"), "local_tasks": _local_tasks_hash(), "version": EVAL_VERSION,
             "stderr_bootstrap": STDERR_BOOTSTRAP, "per_document": 1}

    def compute():
        results, docs = run_tasks_with_docs(model, tasks, num_fewshot, limit, batch_size, seed, progress=progress)
        return {"meta": {"results": results, "docs": docs}}

    entry = cache.get_or_compute("lm_eval", parts, compute, label=f"{model.source}-{'-'.join(sorted(tasks))}")
    return entry.meta["results"], entry.meta.get("docs") or {}


def _max_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 8192)
    return 2048

