"""Doing a plan: edit a model through the family view, exactly as a :class:`PruningPlan` says."""

from __future__ import annotations

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import MoEModel
from moescope.analysis.pruning.plan import PruningPlan

# the cache kind under which a lottery plan stores its finetuned routers and experts
FINETUNED_KIND = "lottery"


def apply(model: MoEModel, plan: PruningPlan, cache=None, weights: dict | None = None) -> MoEModel:
    """Edit ``model`` in place by ``plan`` and return it. Every layer is validated (and a finetuned
    plan's weights found) before the first edit, so a refused plan leaves the model untouched.

    A finetuned plan (a lottery subnetwork) carries trained routers and experts: ``weights`` (as
    :func:`trained_tensors` returns them), else the cache entry its provenance names (in ``cache``,
    default :class:`~moescope.analysis.core.cache.Cache`)."""
    plan.validate_for(model)
    if is_finetuned(plan) and weights is None:
        weights = finetuned_weights(plan, cache)
    for l, lp in sorted(plan.layers.items()):
        model.merge(l, lp.groups, lp.coefficients, merge_router=lp.merge_router, permutations=lp.permutations,
                    operator=lp.operator, density=lp.density, router_coeffs=lp.router_coefficients, folds=lp.folds)
    if weights is not None:
        load_trained_tensors(model, weights)
    if plan.skip_beta:
        from moescope.analysis.model import skipping

        skipping.install(model, plan.skip_beta)
    return model


def is_finetuned(plan: PruningPlan | None) -> bool:
    return bool(plan is not None and (plan.provenance or {}).get("finetuned"))


def finetuned_weights(plan: PruningPlan, cache=None) -> dict:
    """The trained tensors a finetuned plan names (``provenance["weights"]``, a cache key)."""
    from moescope.analysis.core.cache import Cache

    cache = cache or Cache()
    key = (plan.provenance or {}).get("weights")
    entry = cache.get_by_key(FINETUNED_KIND, key) if key else None
    if entry is None:
        raise MoescopeError(f"the plan's finetuned weights (cache entry {str(key)[:12]}) are not in the cache at "
                            f"{cache.root}; make the {plan.provenance.get('strategy')} plan again there")
    tensors = entry.tensors()
    check_finite_tensors(tensors, f"the plan's finetuned weights (cache entry {str(key)[:12]})")
    return tensors


def check_finite_tensors(tensors: dict, what: str) -> None:
    """Refuse weights holding NaN or infinity: they are never stored, applied or exported."""
    import torch

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise MoescopeError(f"{what} hold non-finite values (NaN or infinity) in {len(bad)} tensor(s), e.g. "
                            f"{bad[0]}; nothing was stored or exported")


def trained_tensors(model: MoEModel, scope: str = "moe") -> dict:
    """What finetuning changed: ``scope="moe"`` the routed experts' and routers' weights of every MoE
    layer; ``"all"`` every parameter of the model (keys ``all.<parameter name>``)."""
    if scope == "all":
        return {f"all.{n}": p.detach().cpu().contiguous() for n, p in model.hf.named_parameters()}
    out = {}
    for l, view in model.layers.items():
        for prefix, module in (("experts", view.experts), ("router", view.router)):
            for name, t in module.state_dict().items():
                out[f"L{l}.{prefix}.{name}"] = t.detach().cpu().contiguous()
    return out


def load_trained_tensors(model: MoEModel, tensors: dict) -> None:
    """Put :func:`trained_tensors` (either scope) into ``model`` (already pruned to the same structure), in place."""
    import torch

    if any(k.startswith("all.") for k in tensors):
        params = dict(model.hf.named_parameters())
        missing = sorted(n for n in params if f"all.{n}" not in tensors)
        if missing:
            raise MoescopeError(f"the finetuned weights do not fit this model (no {missing[0]}); make the plan again")
        wrong = next((n for n, p in params.items() if tuple(tensors[f"all.{n}"].shape) != tuple(p.shape)), None)
        if wrong is not None:
            raise MoescopeError(f"the finetuned weights do not fit this model ({wrong} has another shape); "
                                "make the plan again")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"all.{n}"].to(p.device, p.dtype))
        model.weights_changed()
        return
    for l, view in model.layers.items():
        for prefix, module in (("experts", view.experts), ("router", view.router)):
            state = {name: tensors[f"L{l}.{prefix}.{name}"] for name in module.state_dict()}
            module.load_state_dict(state)
    model.weights_changed()
