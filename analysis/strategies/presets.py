"""Presets: each paper's whole recipe as one named set of a strategy's declared parameters.

A preset is data, never a second code path: it names a registered strategy and the values of some
of that strategy's parameters (every one of them declared by the strategy, checked at import by
:func:`check_presets`), plus the number of calibration sequences the paper used. Expanding it
(:func:`expand`) gives ``{**preset.params, **overrides}``: anything a person gives wins, so a preset
is visible (``moescope strategies``, the Plan page) and overridable flag by flag. A preset that
cannot apply to a model (a group count below top-k, skipping on a top-1 router) is refused by
:func:`validate_preset` from the model's structure alone, before any weights are read, in one line
naming the preset and the reason.

Where a paper leaves a setting open the preset says what moescope chose (``note``); README
"Presets" lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.strategies.base import STRATEGIES, get_strategy


@dataclass(frozen=True)
class Preset:
    name: str
    strategy: str
    params: dict
    help: str
    source: str  # the paper and equation, or the authors' file, the values come from
    calib_samples: int | None = None  # calibration sequences the paper used (the CLI's --samples default)
    note: str = ""  # what the paper leaves open and moescope chose
    refuse: tuple[Callable[[object, dict], str | None], ...] = field(default=())  # (model, params) -> reason
    calib_seq_len: int | None = None  # tokens per calibration sequence in the paper (the CLI's --seq-len default)
    keep_fraction: float | None = None  # the paper's headline target: the share of each layer's experts kept
    target_source: str = ""  # where the headline target comes from

    def describe(self) -> dict:
        return {"name": self.name, "strategy": self.strategy, "params": dict(self.params), "help": self.help,
                "source": self.source, "calib_samples": self.calib_samples, "calib_seq_len": self.calib_seq_len,
                "keep_fraction": self.keep_fraction, "target_source": self.target_source, "note": self.note}

    def headline_keep(self, model) -> int | None:
        """The paper's headline target on ``model`` (built from its config alone will do): ``keep_fraction``
        of the experts of its smallest MoE layer, rounded, and never below any layer's top-k."""
        if self.keep_fraction is None:
            return None
        layers = model.layers.values()
        smallest = min(v.num_experts for v in layers)
        return max(int(self.keep_fraction * smallest + 0.5), max(v.top_k for v in layers))


PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


# ---- group-and-merge (Zhang et al. 2024) -------------------------------------------------------
GAM = "group-and-merge (Zhang et al. 2024)"
_add(Preset(
    "gam-data", "merge",
    {"representation": "outputs", "similarity": "cka_linear", "grouping": "spectral", "merge": "uniform",
     "merge_router": True, "align": "none", "augment": "embeddings", "augment_ratio": 1.0},
    "group-and-merge, data-centric: CKA of the experts' outputs on shared calibration tokens (router bypassed, "
    "mixup of token embeddings), spectral grouping, uniform souping of experts and router rows",
    f"{GAM} §3.4–3.5, eq. 3 (CKA), eq. 4 (grouping), eq. 5 (merge, uniform α), Algorithm 1; 128 C4 samples (§4.1)",
    calib_samples=128, keep_fraction=0.75,
    target_source="§4.2: Mixtral's 8 experts pruned to 6 and to 4 per layer (6 first)",
    note="sequence length not stated (moescope's 256); linear kernel (App. B/D figures; the paper also shows RBF); spectral clustering (App. G names it "
         "first, greedy is the faster alternative); mixup ratio 1 mixed sequence per calibration sequence with "
         "λ ~ U(0, 1) per sequence (the paper gives neither)"))
_add(Preset(
    "gam-model", "merge",
    {"representation": "surrogate", "similarity": "mse", "grouping": "spectral", "merge": "uniform",
     "merge_router": True, "align": "none", "augment": "none"},
    "group-and-merge, model-centric: surrogate weights W_down(W_gate ⊙ W_up), MSE, spectral grouping, uniform "
    "souping of experts and router rows (no data)",
    f"{GAM} §3.5 (surrogate weights ♠, MSE 'which we adopt in the model-centric method', App. G), eq. 5",
    keep_fraction=0.75,
    target_source="§4.2: Mixtral's 8 experts pruned to 6 and to 4 per layer (6 first)",
    note="surrogate rather than vectorised weights (App. D: 'more stable'); MSE turned into an affinity "
         "exp(−mse / median) for spectral clustering"))
_add(Preset(
    "gam-learned", "merge",
    {"representation": "outputs", "similarity": "cka_linear", "grouping": "spectral", "merge": "learned",
     "merge_router": True, "align": "none", "augment": "embeddings", "augment_ratio": 1.0, "epochs": 50,
     "lr": 1e-3},
    "group-and-merge, data-centric with learned coefficients: eq. 6 (λ Σ α θ, Σ α = 1, router rows Σ α W) by "
    "SGD, lr 1e-3, 50 epochs, 3:1 train/evaluation sequences",
    f"{GAM} eq. 6, App. A", calib_samples=128, keep_fraction=0.75,
    target_source="§4.2: Mixtral's 8 experts pruned to 6 and to 4 per layer (6 first)",
    note="sequence length not stated (moescope's 256); an epoch is one pass over the training sequences, one SGD step per sequence; α = softmax(β) "
         "starting uniform, λ = 1; loss ‖y − F‖ (Frobenius) as written"))

# ---- enumeration and dynamic skipping (Lu et al. 2024) -----------------------------------------
LU = "enumeration (Lu et al. 2024)"
_add(Preset("enumerate", "enumerate", {"mode": "layer-wise", "objective": "per-batch"},
            "Lu et al.: per layer the kept subset with the smallest reconstruction loss, every layer on the "
            "original model's inputs; the loss as the authors' code sums it (one norm per batch of 8 sequences)",
            f"{LU} §3.1, §4.1 (128 C4 sequences of 2048 tokens); authors' model/wrapper.py enumerate (Σ over "
            "batches of ‖F' − F‖_F, --batch_size 8)", calib_samples=128, calib_seq_len=2048,
            keep_fraction=0.75, target_source="§3.3 (1.2–1.3× speed-up 'with r = 6'), Table 2: r = 6 of 8 (r = 4 too)"))
_add(Preset("enumerate-skip", "enumerate", {"mode": "layer-wise", "objective": "per-batch", "with_skip": True},
            "Lu et al.: layer-wise enumeration, and dynamic skipping with β per layer the median w₂/w₁ of the "
            "pruned model",
            f"{LU} §3.1 and §3.2 (β = median of w_{{e1}}/w_{{e0}}); 128 C4 sequences of 2048 tokens (§4.1); authors' "
            "model/wrapper.py enumerate and method/dynamic_skipping.py (β from the model it is run on)",
            calib_samples=128, calib_seq_len=2048,
            keep_fraction=0.75, target_source="§3.3 (1.2–1.3× speed-up 'with r = 6'), Table 2: r = 6 of 8 (r = 4 too)"))

# ---- MC-SMoE, HC-SMoE, REAP ----------------------------------------------------------------------
MC_T = dict(keep_fraction=0.5, target_source="the script takes num_average_groups without a default; 4 of 8, the "
                                                  "count HC-SMoE's Mixtral script (scripts/mixtral/run.sh) compares at")
_add(Preset("mc-smoe", "router-guided",
            {"router_similarity": "cosine", "allocation": "usage-threshold", "align": "none", "merge": "frequency",
             "merge_router": True},
            "MC-SMoE's Mixtral recipe: groups spread over the layers by one global usage threshold, the most-used "
            "experts lead, the others join the leader with the most similar raw router logits, frequency-weighted "
            "merge of the unaligned weights",
            "MC-SMoE (Li et al. 2024), authors' mcsmoe/msmoe-merging-mixtral.py → merging/grouping_mixtral.py "
            "(group_experts_globally_from_dominant_experts: usage-threshold allocation, router-logits similarity; "
            "merge_by_groups_with_usage_weighted: no permutation); MiniPile blocks of 512 tokens",
            calib_seq_len=512, **MC_T,
            note="keep N asks for N × layers groups in all (the script's num_average_groups), --budget for a total; "
                 "the script reads 10 % of MiniPile, far more than moescope's default 32 sequences; MC-SMoE keeps every "
                 "member's router row pointing at the merged expert, a plan has one router row per output expert, "
                 "merged with the same frequency weights; a target that cannot give every layer its top-k whatever "
                 "the usage (a keep below top-k, a budget below the layers' top-k summed) is refused from the config "
                 "before any weights load; a layer the threshold leaves below top-k depends on the measured usage, so "
                 "it is refused after the routing pass, in one line, before any merge"))
_add(Preset("mc-smoe-aligned", "router-guided",
            {"router_similarity": "cosine", "allocation": "distinctness", "align": "activations", "merge": "frequency",
             "merge_router": True},
            "MC-SMoE grouping with the paper's permutation alignment (activation matching) before the frequency-"
            "weighted merge, the same number of groups in every layer (moescope's variant of the Mixtral recipe)",
            "MC-SMoE (Li et al. 2024) §3 and the authors' mcsmoe/merging/permutation.py (activation matching, their "
            "Switch-Transformer path); grouping_mixtral.py (router-logits similarity)",
            calib_seq_len=512, **MC_T,
            note="alignment matches neurons on the calibration tokens every member sees (router bypassed); "
                 "align=routed-activations uses the tokens routed to the member or the reference, as permutation.py "
                 "gathers them; keep gives every layer the same count"))
HC_T = dict(calib_samples=32, calib_seq_len=2048, keep_fraction=0.5,
            target_source="scripts/mixtral/run.sh: num_average_groups=4 of Mixtral's 8")


def _hc(merge: str) -> dict:
    return {"representation": "mean_output", "similarity": "euclidean", "grouping": "agglomerative", "merge": merge,
            "merge_router": True, "align": "none", "augment": "none"}


HC_CLUSTER_NOTE = ("run.sh and scripts/README.md pass --cluster=\"hirarchical\", which clustering.py does not match "
                   "(it tests \"hierarchical\"), so the script run literally falls through to its k-means; moescope "
                   "clusters hierarchically with the average linkage the script names, as the paper does")
_add(Preset("hc-smoe", "merge", _hc("fix-dom-same"),
            "HC-SMoE's Mixtral script: each expert's mean output over all calibration tokens, Euclidean distance, "
            "average-linkage hierarchical clustering, each group folded onto its dominant expert (the member nearest "
            "the cluster's centre): every other member's neurons averaged into the dominant neuron they correlate "
            "with most (activations + weights), weighted by routed tokens (fix-dom-same)",
            "HC-SMoE (Chen et al. 2025), authors' scripts/mixtral/run.sh (expert-output, --merge fix-dom-same --mode "
            "all --ingredient act+weight, 32 C4 sentences of 2048 tokens), hcsmoe/merging/clustering.py (pairwise "
            "Euclidean distances, average linkage; the dominant is the member closest to the cluster's centre) and "
            "grouping_mixtral.py (_merge_moe_experts_with_dominant_same_rule)",
            **HC_T,
            note="the fold's data are each member's routed tokens scaled by their softmax router probability, at most "
                 "50,000 rows per group (the script's data_limit); where no weight reaches a merged neuron it is the "
                 "plain mean of the neurons folded into it (the script would divide 0 by 0); router rows merged with "
                 "the routed-token weights (HC-SMoE keeps the original router and maps members to the merged expert); "
                 + HC_CLUSTER_NOTE))
_add(Preset("hc-smoe-freq", "merge", _hc("frequency"),
            "HC-SMoE's clustering with its frequency-weighted merge (the option `freq`): mean outputs, Euclidean "
            "distance, average linkage, each group's weights averaged by usage frequency",
            "HC-SMoE (Chen et al. 2025), authors' hcsmoe/merging/clustering.py (pairwise Euclidean distances, "
            "average linkage), grouping_mixtral.py (_merge_mlp_experts_by_usage_frequency_weighting) and the example "
            "of scripts/README.md (--merge freq, otherwise scripts/mixtral/run.sh)",
            **HC_T,
            note="router rows merged with the same frequency weights (HC-SMoE keeps the original router and maps "
                 "members to the merged expert); " + HC_CLUSTER_NOTE))
_add(Preset("reap", "criterion", {"criterion": "REAP", "order": "min", "mode": "one-shot"},
            "REAP: drop the experts with the smallest router-weighted expert activation norm",
            "REAP (Lasby et al. 2025), the authors' saliency score (mean over routed tokens of gate × ‖output‖)",
            keep_fraction=0.5, target_source="the paper's larger of its two compression levels (25 % and 50 % of "
                                             "the experts pruned)"))

# ---- MC-Suite (Jaiswal et al.): each criterion at its best end, one-shot -----------------------
# The end the paper's text supports (the captions of Figs. 8–15 included); Figure 4 itself is an image,
# so for EWN, EAO, EGS, EGO and EGN the end is chosen by analogy (similarity: the most redundant expert
# goes; norms and counts: the least active one goes), and said so.
MCS = "MC-Suite (Jaiswal et al.)"
BEST_ENDS = {
    "EAN": ("min", "Table 1 (best criterion), eq. 13"),
    "EGE": ("min", "Table 1, eq. 15"),
    "RWN": ("max", "Table 1, eq. 4"),
    "ETS": ("max", "Table 1, eq. 10, Fig. 11"),
    "ECC": ("max", "Fig. 10 ('highest collaboration'), eq. 8 and the pair rule after it (the caption reads per "
                   "expert, 'with rest of other experts': that is the row sum, ECC-rowsum, which the pair rule is not)"),
    "EVC": ("min", "Fig. 8 and §3 finding ③, eq. 9"),
    "EUF": ("min", "Fig. 9, eq. 7"),
    "WSR": ("max", "§3 finding ④ (dominant experts have lower stable rank), eq. 5"),
    "EAE": ("min", "§1 and §3 finding ⑤ (dominant experts have higher entropy), eq. 12"),
    "EWS": ("max", "eq. 3, Fig. 15's caption ('highest weight similarity … better candidate for expert dropping')"),
    "EAS": ("max", "eq. 11, Fig. 12's caption ('highest similarity with rest of other experts' are the least "
                   "dominant)"),
    "EGS": ("max", "eq. 14; end by analogy with ETS (the text is silent; Fig. 4 is an image)"),
    "EWN": ("min", "eq. 6; end by analogy with EAN (the text is silent; Fig. 4 is an image)"),
    "EGN": ("min", "eq. 16; end by analogy with EAN (the text is silent; Fig. 4 is an image)"),
    "EAO": ("min", "§2.4 ③; end by analogy with EAN (the text is silent; Fig. 4 is an image)"),
    "EGO": ("min", "§2.5 ③; end by analogy with EAN (the text is silent; Fig. 4 is an image)"),
}
for _crit, (_end, _where) in BEST_ENDS.items():
    _add(Preset(f"{_end}-{_crit.lower()}", "criterion", {"criterion": _crit, "order": _end, "mode": "one-shot"},
                f"MC-Suite {_end.capitalize()}-{_crit}, one-shot",
                f"{MCS} {_where}; 256 C4 samples of 2048 tokens (App. C)", calib_samples=256, calib_seq_len=2048,
                keep_fraction=0.5, target_source="Tables 4 and 7: 50 % expert sparsity (4 of 8 per layer)"))
_add(Preset("min-ean-iterative", "criterion", {"criterion": "EAN", "order": "min", "mode": "iterative"},
            "MC-Suite Min-EAN, iterative: one expert per layer per round, re-estimated",
            f"{MCS} §3, Fig. 3(b), Table 2; 256 C4 samples of 2048 tokens (App. C)", calib_samples=256,
            calib_seq_len=2048,
            keep_fraction=0.5, target_source="Tables 4 and 7: 50 % expert sparsity (4 of 8 per layer)"))
_add(Preset("min-ean-lottery", "lottery", {"criterion": "EAN", "order": "min", "start_tokens": 200_000, "lr": 1e-6},
            "MC-Suite Min-EAN lottery subnetwork: iterative drop with a task-agnostic next-token finetune after "
            "every round, 0.2 M tokens doubling each round, peak lr 1e-6",
            f"{MCS} §3, Fig. 3(c), App. C (AdamW, cosine schedule, lr 1e-6, 0.2 M tokens doubling; 256 C4 samples of "
            "2048 tokens)", calib_samples=256, calib_seq_len=2048,
            keep_fraction=0.5, target_source="Tables 4 and 7: 50 % expert sparsity (4 of 8 per layer)"))


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise unknown_name("preset", name, PRESETS) from None


def presets_of(strategy: str) -> list[Preset]:
    return [p for p in PRESETS.values() if p.strategy == strategy]


def expand(name: str, overrides: dict | None = None) -> tuple[str, dict]:
    """(the preset's strategy, its parameters with ``overrides`` on top)."""
    preset = get_preset(name)
    return preset.strategy, {**preset.params, **(overrides or {})}


def fill_target(name: str, overrides: dict, model) -> tuple[dict, str | None]:
    """``overrides`` with the paper's headline target when it gives none (no keep, no budget), and
    the one-line note saying so (None when a target was given, or the preset has none)."""
    preset = get_preset(name)
    if overrides.get("keep") is not None or overrides.get("budget") is not None:
        return overrides, None
    keep = preset.headline_keep(model)
    if keep is None:
        return overrides, None
    smallest = min(v.num_experts for v in model.layers.values())
    return ({**overrides, "keep": keep},
            f"preset {name}: no target given, so the paper's headline: keep {keep} of {smallest} experts per layer "
            f"({preset.target_source})")


def calibration_length(name: str, model_positions: int | None) -> tuple[int | None, str | None]:
    """The paper's tokens per calibration sequence for preset ``name``, capped at the model's
    positions (``model_positions``; None: unknown), and the one-line note when it was capped."""
    want = get_preset(name).calib_seq_len
    if want is None or model_positions is None or want <= model_positions:
        return want, None
    return model_positions, (f"preset {name}: the paper's {want}-token calibration sequences exceed the model's "
                             f"{model_positions} positions; using {model_positions}")


def validate_preset(name: str, overrides: dict, model) -> tuple[str, dict]:
    """Expand preset ``name`` with ``overrides`` and check the request against ``model`` (which may be
    built from the config alone): the strategy's own validation, then the preset's refusals. Any
    refusal is one line naming the preset. Returns (strategy, the given parameters, coerced)."""
    preset = get_preset(name)
    strategy, params = expand(name, overrides)
    try:
        given, full = get_strategy(strategy).validate(params, model)
        for refuse in preset.refuse:
            reason = refuse(model, full)
            if reason:
                raise MoescopeError(reason)
    except MoescopeError as e:
        raise MoescopeError(f"preset {name}: {e}") from None
    return strategy, given


def make_preset_plan(name: str, ctx, overrides: dict | None = None):
    """The plan of preset ``name`` (with ``overrides``), its provenance naming the preset."""
    from moescope.analysis.strategies.base import make_plan

    strategy, params = validate_preset(name, fill_target(name, dict(overrides or {}), ctx.model)[0], ctx.model)
    plan = make_plan(strategy, ctx, params)
    plan.provenance["preset"] = name
    return plan


def check_presets() -> None:
    """Every preset names a registered strategy and only parameters that strategy declares."""
    for p in PRESETS.values():
        strategy = STRATEGIES.get(p.strategy)
        if strategy is None:
            raise MoescopeError(f"preset {p.name}: unknown strategy {p.strategy!r}")
        declared = {q.name for q in strategy.all_params()}
        extra = sorted(set(p.params) - declared)
        if extra:
            raise MoescopeError(f"preset {p.name}: {extra} are not parameters of strategy {p.strategy}")
