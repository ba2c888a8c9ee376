"""Lottery subnetworks (Jaiswal et al.): rounds of estimate → drop one expert per layer → a short
task-agnostic next-token finetune, the finetune budget doubling every round.

The rounds run on a copy of the model (the caller's model is left as it is). The finetuned
routers and routed experts are stored in the cache (kind ``lottery``, keyed by model, data and
parameters, so a repeated request is served from there); the plan names that entry in
``provenance["weights"]`` and :func:`moescope.analysis.pruning.prune.apply` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from moescope.analysis.pruning.prune import FINETUNED_KIND
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.criterion import CRITERION, ORDER, criterion_scores, resolve
from moescope.analysis.strategies.selection import iterative_drop, keep_counts

KIND = FINETUNED_KIND
LOTTERY_VERSION = 1


def finetune(model, input_ids, tokens: int, lr: float = 1e-4, batch_rows: int = 4,
             weight_decay: float = 0.0, progress=None) -> dict:
    """Task-agnostic next-token finetune of ``model``'s routers and routed experts in place
    (everything else frozen) for about ``tokens`` training tokens cycled from ``input_ids [N, L]``:
    AdamW with a cosine schedule over the steps. Returns the first and last batch losses."""
    import torch

    hf = model.hf
    trainable = []
    for view in model.layers.values():
        trainable += list(view.experts.parameters()) + list(view.router.parameters())
    saved = {n: p.requires_grad for n, p in hf.named_parameters()}
    for p in hf.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    rows, length = input_ids.shape
    steps = max(1, math.ceil(tokens / (batch_rows * length)))
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    hf.train()
    try:
        for step in range(steps):
            idx = [(step * batch_rows + i) % rows for i in range(batch_rows)]
            ids = input_ids[idx].to(next(hf.parameters()).device)
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress:
                progress("finetune", step + 1, steps)
    finally:
        hf.eval()
        for n, p in hf.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
    model.weights_changed()
    return {"steps": steps, "tokens": steps * batch_rows * length, "loss_first": losses[0], "loss_last": losses[-1]}


@register("lottery", "Lottery subnetwork: rounds of estimate → drop one expert per layer by a criterion → a "
          "short next-token finetune of routers and experts (budget doubling every round). The finetuned weights "
          "are kept in the cache and applied with the plan.",
          [dataclasses.replace(CRITERION, default="REAP", affects_key=True),
           dataclasses.replace(ORDER, affects_key=True),
           Param("start_tokens", int, 8192, help="finetune tokens in the first round (doubling after)", minimum=1),
           Param("lr", float, 1e-4, help="finetune learning rate", minimum=0)])
def lottery(ctx, params):
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.pruning.prune import trained_tensors

    name, order, metrics = resolve(params)
    counts = keep_counts(ctx.model, params)
    cache = ctx.cache or Cache()
    parts = {"model": ctx.model.fingerprint(), "data": ctx.calib.fingerprint, "keep": {str(l): c for l, c in counts.items()}, "criterion": name,
             "order": order, "start_tokens": params["start_tokens"], "lr": params["lr"],
             "analysis": (ctx.analysis_params.key() if ctx.analysis_params else None), "version": LOTTERY_VERSION}

    def compute():
        model = copy.deepcopy(ctx.model)  # finetuned in place: a copy, never the caller's model
        work = dataclasses.replace(ctx, model=model)
        log = []

        def tune(r: int, rounds: int) -> None:
            log.append(finetune(model, ctx.calib.input_ids, params["start_tokens"] * 2**r, lr=params["lr"],
                                progress=(lambda s, d, t: ctx.report(f"round {r + 1}/{rounds}", d, t))))

        alive = iterative_drop(work, counts, lambda res: criterion_scores(res, name, order), metrics,
                               after_round=tune, restore=False)
        return {"tensors": trained_tensors(model),
                "meta": {"alive": {str(l): a for l, a in alive.items()}, "rounds": log,
                         "model": parts["model"], "model_source": ctx.model.source}}

    entry = cache.get_or_compute(KIND, parts, compute, label=f"{ctx.model.source.split('/')[-1]}-{name}-{order}")
    alive = {int(l): a for l, a in entry.meta["alive"].items()}
    plan = ctx.plan_from_keep(alive, f"lottery:{order}-{name}")
    plan.provenance.update(finetuned=True, weights=entry.key, rounds=entry.meta["rounds"])
    return plan
