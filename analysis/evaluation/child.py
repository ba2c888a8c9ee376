"""The child process of :func:`~.efficiency.isolated_efficiency`: load the model, apply the plan,
measure, print one JSON line (``python -m moescope.analysis.evaluation.child SPEC.json``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moescope.analysis.evaluation.efficiency import EfficiencyParams, efficiency_with_skipping


def measure(spec_path: str) -> dict:
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.pruning.prune import apply

    spec = json.loads(Path(spec_path).read_text())
    params = EfficiencyParams(**spec["params"])
    model = load_moe(spec["source"], dtype=spec.get("dtype"), device=spec.get("device"),
                     trust_remote_code=bool(spec.get("trust_remote_code")), allow_pickle=bool(spec.get("allow_pickle")))
    plan = PruningPlan.from_json(spec["plan"]) if spec.get("plan") else None
    if plan is not None:  # a finetuned plan's weights come from the cache it was made in
        from moescope.analysis.core.cache import Cache

        apply(model, plan, Cache(spec["cache_root"]) if spec.get("cache_root") else None)
    betas = spec.get("skip_beta") or (plan.skip_beta if plan else None)
    return efficiency_with_skipping(model, params, betas)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
