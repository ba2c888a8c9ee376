"""lm-eval's numbers for the offline moescope tasks, computed by hand from their definitions
(lm-eval 0.4: ``api/model.py`` ``_encode_pair``, ``utils.get_rolling_token_windows``,
``api/metrics.py`` ``weighted_perplexity`` / ``bits_per_byte``, ``api/task.py`` multiple choice),
with plain forwards of the model and nothing from lm-eval or moescope's evaluation code.
"""

from __future__ import annotations

import math
import re

import torch


@torch.no_grad()
def _scored(hf, windows: list[tuple[list[int], list[int]]]) -> float:
    """Sum over ``(input, targets)`` windows of the log-probabilities of the targets at the last
    ``len(targets)`` positions; windows of one length share a forward (a causal model scores each
    row on its own)."""
    total = 0.0
    for length in sorted({len(w) for w, _ in windows}):
        group = [(w, t) for w, t in windows if len(w) == length]
        logp = torch.log_softmax(hf(input_ids=torch.tensor([w for w, _ in group])).logits.double(), -1)
        for row, (_, targets) in zip(logp, group):
            total += float(row[-len(targets):].gather(-1, torch.tensor(targets)[:, None]).sum())
    return total


def choice_loglikelihood(hf, tokenizer, context: str, continuation: str, max_length: int = 512) -> float:
    """Sum of log p(continuation tokens | context), tokenised as lm-eval's HFLM does: the context's
    trailing whitespace moves onto the continuation, the whole string is encoded and split at the
    context's token count, and the input is cut to the last ``max_length`` tokens."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    return _scored(hf, [((ctx + cont)[-(max_length + 1):][:-1], cont)])


def multiple_choice_metrics(hf, tokenizer, items: list[dict]) -> dict[str, float]:
    """``acc``: the choice with the highest log-likelihood is the label; ``acc_norm``: the highest
    log-likelihood per character of the choice (lm-eval's ``lls / len(choice)``)."""
    acc = acc_norm = 0
    for item in items:
        lls = [choice_loglikelihood(hf, tokenizer, item["context"], c) for c in item["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]
        acc += max(range(len(lls)), key=lls.__getitem__) == item["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["label"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def rolling_windows(tokenizer, text: str, max_length: int = 512) -> list[tuple[list[int], list[int]]]:
    """``(input, targets)`` windows that predict every token of the document once. The first
    ``max_length`` tokens are predicted after the tokenizer's BOS token (EOS when it has none);
    each later chunk of up to ``max_length`` tokens is predicted in one forward over the
    ``max_length`` tokens that precede the chunk's last token (so its first token sees
    ``max_length - n + 1`` earlier ones)."""
    ids = tokenizer(text)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows, start = [], 0
    while start < len(ids):
        end = min(start + max_length, len(ids))
        window = [prefix] + ids[: end - 1] if start == 0 else ids[end - 1 - max_length : end - 1]
        windows.append((window, ids[start:end]))
        start = end
    assert sum(len(t) for _, t in windows) == len(ids)
    return windows


def words(text: str) -> int:
    """Whitespace-separated words (lm-eval splits on ``\\s+``; the demo tasks strip the document
    first, so an indented poem does not count an empty word)."""
    return len(re.split(r"\s+", text.strip()))


def perplexity_metrics(hf, tokenizer, docs: list[str], max_length: int = 512) -> dict[str, float]:
    """lm-eval's corpus-level aggregation: total log-likelihood over total words / UTF-8 bytes."""
    ll = _scored(hf, [w for d in docs for w in rolling_windows(tokenizer, d, max_length)])
    n_words = sum(words(d) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"word_perplexity": math.exp(-ll / n_words), "byte_perplexity": math.exp(-ll / n_bytes),
            "bits_per_byte": -ll / n_bytes / math.log(2), "loglikelihood": ll}


def continuation_items() -> list[dict]:
    """The multiple-choice items of ``moescope_demo_continuation`` (its data, from the task file)."""
    import sys

    from moescope.analysis.evaluation import LOCAL_TASKS_DIR

    sys.path.insert(0, str(LOCAL_TASKS_DIR))
    try:
        import demo_tasks
    finally:
        sys.path.remove(str(LOCAL_TASKS_DIR))
    return demo_tasks.continuation_items()
