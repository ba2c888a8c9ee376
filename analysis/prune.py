"""Doing a plan: edit a model through the family view, exactly as a :class:`PruningPlan` says."""

from __future__ import annotations

from moescope.analysis.models import MoEModel
from moescope.analysis.plan import PruningPlan


def apply(model: MoEModel, plan: PruningPlan) -> MoEModel:
    """Edit ``model`` in place by ``plan`` (every layer is validated before the first edit, so a
    refused plan leaves the model untouched) and return it. The plan is remembered as
    ``model.plan`` so that a later save or export can store it."""
    plan.validate_for(model)
    for l, lp in sorted(plan.layers.items()):
        model.merge(l, lp.groups, lp.coefficients, merge_router=lp.merge_router, permutations=lp.permutations,
                    operator=lp.operator, density=lp.density)
    if plan.skip_beta:
        from moescope.analysis import skipping

        skipping.install(model, plan.skip_beta)
    model.plan = plan
    return model


def finetune(model: MoEModel, input_ids, tokens: int, lr: float = 1e-4, batch_rows: int = 4,
             weight_decay: float = 0.0, progress=None) -> dict:
    """Task-agnostic next-token finetune of the routers and routed experts (everything else
    frozen) for about ``tokens`` training tokens cycled from ``input_ids [N, L]``: AdamW with a
    cosine schedule over the steps. Returns the first and last batch losses."""
    import math

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
    model._fingerprint = None
    return {"steps": steps, "tokens": steps * batch_rows * length, "loss_first": losses[0], "loss_last": losses[-1]}


def lottery(model: MoEModel, calib, keep: int, criterion: str = "REAP", order: str = "min",
            start_tokens: int = 8192, lr: float = 1e-4, cache=None, analysis_params=None, progress=None):
    """Lottery subnetwork (Jaiswal et al.): rounds of estimate → drop one expert per layer (one per
    routing group for group-limited routers) → budget finetune, the finetune token budget doubling
    every round from ``start_tokens``. Edits ``model`` in place (its weights are finetuned, so the
    result is the model itself; the returned plan records which original experts survived)."""
    from moescope.analysis.strategies import (
        StrategyContext,
        _check_criterion,
        _criterion_scores,
        _iterative,
        _metrics_for,
        keep_counts,
    )

    name, order, _ = _check_criterion({"criterion": criterion, "order": order})
    counts = keep_counts(model, {"keep": keep})
    ctx = StrategyContext(model, calib, cache, analysis_params)
    log = []

    def tune(r: int, rounds: int) -> None:
        log.append(finetune(model, calib.input_ids, start_tokens * 2**r, lr=lr, progress=(
            lambda s, d, t: progress(f"round {r + 1}/{rounds}", d, t)) if progress else None))

    alive = _iterative(ctx, counts, lambda res: _criterion_scores(res, name, order), _metrics_for(name),
                       after_round=tune, restore=False)
    plan = PruningPlan.from_keep(model.source, alive, provenance={
        "strategy": f"lottery:{order}-{name}", "params": {"keep": keep, "start_tokens": start_tokens, "lr": lr},
        "data": calib.fingerprint, "finetuned": True, "rounds": log})
    model.plan = plan
    return model, plan
