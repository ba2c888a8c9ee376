"""Lottery subnetworks (Jaiswal et al., MC-Suite §3 and App. C): rounds of estimate → drop one expert
per layer → a short task-agnostic next-token finetune, the finetune budget doubling every round.

The defaults are App. C's: AdamW with a cosine schedule from a maximum learning rate of 1e-6,
batches of 8 sequences, 0.2 M training tokens in the first round doubling every round, the
optimiser (and its schedule) reset every round, and Min-EAN, the paper's best criterion (Tables 1
and 2). The paper does not say which parameters the finetune trains; it finetunes "the MoE
subnetwork" with nothing said to be frozen, so the default trains every parameter (``train="all"``;
``"moe"`` trains only the routers and routed experts). Unstated and kept from common practice:
no weight decay, no warm-up, gradients clipped to norm 1.

The rounds run on a copy of the model (the caller's model is left as it is). The finetuned
weights are stored in the cache (kind ``lottery``, keyed by model, data and parameters, so a
repeated request is served from there); the plan names that entry in ``provenance["weights"]``
and :func:`moescope.analysis.pruning.prune.apply` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.pruning.prune import FINETUNED_KIND, check_finite_tensors
from moescope.analysis.strategies.base import Param, register
from moescope.analysis.strategies.criterion import CRITERION, ORDER, criterion_scores, resolve
from moescope.analysis.strategies.selection import iterative_drop, keep_counts

KIND = FINETUNED_KIND
LOTTERY_VERSION = 2
TRAIN_SCOPES = ("all", "moe")


def finetune(model, input_ids, tokens: int, lr: float = 1e-6, batch_rows: int = 8,
             weight_decay: float = 0.0, train: str = "all", progress=None) -> dict:
    """Task-agnostic next-token finetune of ``model`` in place for about ``tokens`` training tokens
    cycled from ``input_ids [N, L]`` in batches of ``batch_rows`` sequences: a fresh AdamW with a
    cosine schedule from ``lr`` to 0 over the steps (MC-Suite App. C). ``train``: ``"all"``
    parameters, or ``"moe"`` (routers and routed experts; everything else frozen). Returns the
    steps, tokens and the first and last batch losses.

    Under torchrun (data parallel, as DDP does it): each step's rows are split over the ranks, each
    rank's mean loss is weighted by its share of the rows (every row has the same number of
    targets, so the weighted sum is the batch's mean loss) and the gradients are summed over the
    ranks before clipping and the AdamW step, which every rank then takes alike: the weights stay
    the same on every rank, equal to one process's up to the order of the float sums."""
    import torch
    from moescope.analysis.core.distributed import current, share_of

    world = current()
    world.check_shards(batch_rows, "sequences per finetune step")

    hf = model.hf
    if train == "all":
        trainable = [p for p in hf.parameters() if p.dtype.is_floating_point]
    else:
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
            lo, hi = share_of(batch_rows, world.rank, world.size)
            ids = input_ids[idx[lo:hi]].to(next(hf.parameters()).device)
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss * ((hi - lo) / batch_rows)
            opt.zero_grad()
            loss.backward()
            if world.distributed:
                world.doing(f"summing finetune gradients (step {step + 1})")
                # a parameter no rank's tokens reached keeps no gradient, as in one process
                reached = world.sum(torch.tensor([float(p.grad is not None) for p in trainable]))
                for p, r in zip(trainable, reached.tolist()):
                    if r > 0:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        world.sum_(p.grad)
                loss = world.sum(loss.detach().reshape(1))[0]
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


@register("lottery", "Lottery subnetwork (MC-Suite §3, App. C): rounds of estimate → drop one expert per layer by a "
          "criterion → a short next-token finetune (AdamW, cosine, max lr 1e-6, batch 8, 0.2 M tokens doubling every "
          "round, optimiser reset). The finetuned weights are kept in the cache and applied with the plan.",
          [dataclasses.replace(CRITERION, affects_key=True), dataclasses.replace(ORDER, affects_key=True),
           Param("start_tokens", int, 200_000, help="finetune tokens in the first round (doubling after)", minimum=1),
           Param("lr", float, 1e-6, help="maximum finetune learning rate (cosine schedule to 0 in every round)",
                 minimum=0, maximum=10),
           Param("batch", int, 8, help="sequences per finetune step", minimum=1),
           Param("train", str, "all", choices=TRAIN_SCOPES,
                 help="parameters finetuned: all, or moe (routers and routed experts only)")])
def lottery(ctx, params):
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.pruning.prune import trained_tensors

    name, order, metrics = resolve(params)
    counts = keep_counts(ctx.model, params)
    cache = ctx.cache or Cache()
    parts = {"model": ctx.model.fingerprint(), "data": ctx.calib.fingerprint, "keep": {str(l): c for l, c in counts.items()}, "criterion": name,
             "order": order, "start_tokens": params["start_tokens"], "lr": params["lr"],
             "batch": params["batch"], "train": params["train"],
             "analysis": (ctx.analysis_params.key() if ctx.analysis_params else None), "version": LOTTERY_VERSION}

    def compute():
        model = copy.deepcopy(ctx.model)  # finetuned in place: a copy, never the caller's model
        work = dataclasses.replace(ctx, model=model)
        log = []

        def tune(r: int, rounds: int) -> None:
            log.append(finetune(model, ctx.calib.input_ids, params["start_tokens"] * 2**r, lr=params["lr"],
                                batch_rows=params["batch"], train=params["train"],
                                progress=(lambda s, d, t: ctx.report(f"round {r + 1}/{rounds}", d, t))))

        alive = iterative_drop(work, counts, lambda res: criterion_scores(res, name, order), metrics,
                               after_round=tune, restore=False)
        tensors = trained_tensors(model, "all" if params["train"] == "all" else "moe")
        diverged = [r for r in log if not (math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]))]
        if diverged:
            raise MoescopeError(f"lottery: the finetune diverged (loss {diverged[0]['loss_last']}) with "
                                f"lr={params['lr']:g}; nothing was stored: try a smaller --lr")
        check_finite_tensors(tensors, f"lottery: the finetuned weights (lr={params['lr']:g})")
        return {"tensors": tensors,
                "meta": {"alive": {str(l): a for l, a in alive.items()}, "rounds": log,
                         "model": parts["model"], "model_source": ctx.model.source}}

    from moescope.analysis.core.distributed import get_or_compute_entry

    entry = get_or_compute_entry(cache, KIND, parts, compute, label=f"{ctx.model.source.split('/')[-1]}-{name}-{order}")
    alive = {int(l): a for l, a in entry.meta["alive"].items()}
    plan = ctx.plan_from_keep(alive, f"lottery:{order}-{name}")
    plan.provenance.update(finetuned=True, weights=entry.key, rounds=entry.meta["rounds"])
    return plan
