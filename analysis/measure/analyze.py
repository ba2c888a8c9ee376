"""The cached analysis: capture each MoE layer streamed, then every similarity, routing statistic
and MC-Suite criterion of that layer.

``analyze(model, batch, params)`` walks the decoder layers one at a time
(:class:`analysis.capture.LayerStream`), computes :func:`analyze_layer` on each MoE layer's input
while only that layer's activations are alive, and stores the result under the content-addressed
cache (key: model fingerprint, data fingerprint, parameters, metrics version). A second call with
the same inputs is served from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from moescope.analysis.core.cache import StoredResult, cache_key, canonical_json
from moescope.analysis.core.errors import MoescopeError, unknown_name
from moescope.analysis.measure import metrics as M
from moescope.analysis.measure import parallel as P
from moescope.analysis.measure.capture import LayerStream, token_nll
from moescope.analysis.measure.criteria import CRITERIA, GradientStats, LayerStats, pair_drop_position
from moescope.analysis.measure.gram_pass import NAMES as GRAM_PASS_NAMES
from moescope.analysis.measure.gram_pass import output_similarities
from moescope.analysis.measure.metrics import METRICS_VERSION
from torch import Tensor

METRIC_FAMILIES = ("similarity", "weights", "routing", "activations", "gradients")
DEFAULT_METRICS = METRIC_FAMILIES
FORWARD_METRICS = ("similarity", "weights", "routing", "activations")  # everything but the backward pass

SIMILARITY_NAMES = ("cka_linear", "cka_rbf", "cka_rbf_minibatch", "cosine", "mse", "mean_output_euclidean")
WEIGHT_SIMILARITY_NAMES = ("weight_cosine", "weight_mse", "surrogate_cosine", "surrogate_mse")


@dataclass(frozen=True)
class AnalysisParams:
    """What an analysis computes and how (part of the cache key)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    similarity_tokens: int = 8192  # tokens (subsampled, seeded) for output similarities
    rbf_batch_tokens: int = 512  # cka_rbf_minibatch: tokens per mini-batch (cka_rbf uses them all)
    rbf_batches: int = 4  # cka_rbf_minibatch: mini-batches averaged
    augment_ratio: float = 0.0  # group-and-merge augmentation: extra mixed rows for similarities, × T
    augment: str = "embeddings"  # what is mixed: embeddings (Algorithm 1's mixup) | hidden_states
    chunk_size: int = 8  # sequences per decoder-layer forward
    seed: int = 0

    def __post_init__(self):
        if "all" in self.metrics:
            object.__setattr__(self, "metrics", METRIC_FAMILIES)
        for m in self.metrics:
            if m not in METRIC_FAMILIES:
                raise unknown_name("metric family", m, METRIC_FAMILIES)
        if self.similarity_tokens < 4:
            raise MoescopeError(f"similarity_tokens must be at least 4, got {self.similarity_tokens}")
        if not 0 <= self.augment_ratio <= 4:
            raise MoescopeError(f"augment_ratio must be in [0, 4], got {self.augment_ratio}")
        from moescope.analysis.measure.augment import AUGMENTS

        if self.augment not in AUGMENTS:
            raise unknown_name("augmentation", self.augment, AUGMENTS)

    def key(self) -> dict:
        d = asdict(self)
        d["metrics"] = sorted(self.metrics)
        return d


@dataclass
class LayerAnalysis:
    """Everything computed for one MoE layer."""

    layer: int
    num_experts: int
    top_k: int
    similarity: dict[str, Tensor] = field(default_factory=dict)  # name -> [E, E]
    criteria: dict[str, Tensor] = field(default_factory=dict)  # acronym -> [E]
    pairs: dict[str, Tensor] = field(default_factory=dict)  # pair criterion (ECC, ETS) -> [E, E]
    routing: dict[str, Tensor] = field(default_factory=dict)  # usage [E], coactivation [E,E], ...
    scalars: dict[str, float] = field(default_factory=dict)  # beta, balance_entropy
    timings: dict[str, float] = field(default_factory=dict)  # seconds per metric family


def _timed(timings: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t

    return _T()


@torch.no_grad()
def analyze_layer(view, x: Tensor, token_ids: Tensor, params: AnalysisParams,
                  x_aug: Tensor | None = None, world=None, ranges=None,
                  on_step: Callable[[int, int], None] | None = None) -> LayerAnalysis | None:
    """All metrics of one MoE layer from its block input ``x [T, d]`` and the token ids ``[T]``:
    routing statistics, similarities, and every criterion of :data:`~moescope.analysis.measure.criteria.CRITERIA`
    whose metric family is asked for (gradient criteria come from :func:`gradient_criteria`).
    ``x_aug`` is the block input of the mixed-embedding sequences (``augment=embeddings``, see
    :func:`augmented_stream`); augmented rows enter the output similarities only. ``on_step(done,
    total)`` is called before each step of the layer (routing, expert outputs, similarities, weight
    similarities, each criterion) and once all are done.

    Data parallel (``world`` of several ranks): ``x`` holds this rank's share of the tokens,
    ``ranges`` every rank's ``[start, stop)`` of the ``T`` tokens of ``token_ids``; every rank
    takes part in the reductions of :mod:`~moescope.analysis.measure.parallel` and the main rank
    returns the layer's analysis (the others None)."""
    dp = world is not None and world.distributed
    E, T = view.num_experts, (token_ids.numel() if dp else x.shape[0])
    out = LayerAnalysis(layer=view.index, num_experts=E, top_k=view.top_k)
    want = {"routing", *params.metrics}
    tm = out.timings
    g = torch.Generator().manual_seed(params.seed + view.index)
    total = (1 + ("similarity" in want or "activations" in want) + ("similarity" in want) + ("weights" in want)
             + sum(1 for c in CRITERIA.values() if c.family in want and c.family != "gradients"))
    done = [0]

    def timed(name: str):
        if on_step is not None:
            on_step(done[0], total)
        done[0] += 1
        return _timed(tm, name)

    with timed("routing"):
        r_local = view.route(x)
        r = P.gather_routing(r_local, world) if dp else r_local  # the whole trace, on the main rank only
    if r is not None:
        idx, w = r.topk_idx.cpu(), r.topk_weights.float().cpu()
        counts = M.usage_counts(idx, E)
        coact = M.coactivation_counts(idx, E)
        out.routing = {
            "usage": (counts / T).float(),
            "usage_count": counts.float(),
            "coactivation": coact.float(),
            "vocab_coverage": M.vocabulary_coverage(idx, token_ids.cpu(), E).float(),
            "mean_logit": r.logits.float().mean(0).cpu(),
            # MC-SMoE's router-guided similarity: cosine between experts' raw router-logit columns
            # over the tokens (its grouping_mixtral.py, similarity_base "router-logits")
            "logit_similarity": M.flat_cosine_matrix(r.logits.float().T.cpu()),
            # the same after centring each column: a Pearson correlation (moescope's variant)
            "logit_correlation": M.flat_cosine_matrix((r.logits.float() - r.logits.float().mean(0)).T.cpu()),
        }
        out.scalars = {
            "beta": M.skip_ratio_median(w),
            "balance_entropy": M.load_balance_entropy(counts),
            "tokens": float(T),
        }

    Y = routed = rbf = None  # routed, rbf: the data-parallel reductions, when their families are asked for
    if "similarity" in want or "activations" in want:
        with timed("expert_outputs"):
            n = min(T, params.similarity_tokens)
            sel = torch.randperm(T, generator=g)[:n] if n < T else torch.arange(T)
        if dp:
            with _timed(tm, "expert_outputs"):
                Y = P.sample_outputs(view, x, sel, ranges, world)
                means = (P.mean_outputs(view, x, T, world) if "similarity" in want and n < T else None)
                routed = P.routed_statistics(view, x, r_local, world) if "activations" in want else None
            if "similarity" in want:
                with _timed(tm, "similarity"):
                    world.doing(f"sharing the RBF CKA of layer {view.index}")
                    rbf = M.rbf_cka_matrix(Y, world=world)
    if dp and not world.is_main:
        return None
    if Y is None and ("similarity" in want or "activations" in want):
        with _timed(tm, "expert_outputs"):
            xs = x[sel.to(x.device)]
            if params.augment_ratio > 0 and params.augment == "hidden_states":
                from moescope.analysis.measure.augment import mix_hidden_rows

                xs = mix_hidden_rows(xs, params.augment_ratio, seed=params.seed + view.index)
            elif params.augment_ratio > 0 and x_aug is not None and len(x_aug):
                m = min(len(x_aug), round(params.augment_ratio * n))
                pick = torch.randperm(len(x_aug), generator=g)[:m].to(x_aug.device)
                xs = torch.cat([xs, x_aug[pick].to(xs.dtype)])
            # [E, n (+ augmented rows), d] in the model's dtype on the model's device (bfloat16
            # outputs are exact in bfloat16); the similarity functions read it a chunk at a time
            Y = torch.empty(E, xs.shape[0], xs.shape[1], dtype=xs.dtype, device=xs.device)
            for e in range(E):
                Y[e] = view.expert_forward(e, xs)

    # criteria see the calibration tokens only, never the augmented rows
    stats = LayerStats(view, x, token_ids, r, counts, coact, out.routing["vocab_coverage"],
                       Y[:, :n] if Y is not None else None)
    if dp:  # the reduced forms stand in for what one process reads off all T tokens
        stats.T = T
        if routed is not None:
            stats.__dict__["routed"] = routed
    if "similarity" in want:
        with timed("similarity"):
            # every output similarity from one pass over the experts' token Gram tiles (gram_pass)
            sims = output_similarities(Y, batch_tokens=params.rbf_batch_tokens, n_batches=params.rbf_batches,
                                       seed=params.seed, rbf=rbf if dp else None)
            for name in GRAM_PASS_NAMES:
                out.similarity[name] = sims[name]
            if Y.shape[1] == n:  # no augmented rows: the criteria's output cosine is this one
                stats.__dict__["output_cosine"] = sims["cosine"]
            # HC-SMoE: every expert's mean output over all T calibration tokens, Euclidean distance
            if not dp or n == T:
                means = sims["mean"] if n == T and Y.shape[1] == T else M.mean_outputs(view, x)
            out.similarity["mean_output_euclidean"] = M.euclidean_distance_matrix(means)

    if "weights" in want:
        with timed("weights"):
            G, n_weights = stats.weight_gram
            S, n_surrogate = M.surrogate_gram(view)
            out.similarity["weight_cosine"] = M.gram_cosine(G)
            out.similarity["weight_mse"] = M.gram_mse(G, n_weights)
            out.similarity["surrogate_cosine"] = M.gram_cosine(S)
            out.similarity["surrogate_mse"] = M.gram_mse(S, n_surrogate)
    for c in CRITERIA.values():
        if c.family in want and c.family != "gradients":
            with timed(c.family):
                value = c.compute(stats)
                if c.pair:  # the matrix is kept; the map shows the pair rule's drop round at the default end
                    out.pairs[c.name] = value
                    value = pair_drop_position(value, counts, c.drop)
                out.criteria[c.name] = value
    if on_step is not None:
        on_step(total, total)
    return out


def augmented_stream(model, input_ids: Tensor, params: AnalysisParams) -> LayerStream | None:
    """The mixup sequences of group-and-merge's Algorithm 1 (line 5, ``f_i(Mixup(D))``; §3.5
    "randomly mixing token embeddings"), as a :class:`LayerStream` beside the calibration one:
    ``M = round(augment_ratio · N)`` sequences whose token embeddings are
    ``λ · e(a) + (1 − λ) · e(b)`` for two calibration sequences (:func:`~.augment.mixup_pairs`),
    run through every layer like real text, so each MoE layer sees the mixtures' own hidden
    states. None unless ``augment=embeddings`` with a ratio above 0."""
    if params.augment != "embeddings" or params.augment_ratio <= 0:
        return None
    from moescope.analysis.measure.augment import mix_embeddings, mixup_pairs
    from moescope.analysis.measure.capture import record_layer_kwargs

    a, b, lam = mixup_pairs(input_ids.shape[0], params.augment_ratio, params.seed)
    if len(a) == 0:
        return None
    stream = LayerStream(model, input_ids[a], chunk_size=params.chunk_size)
    cs = params.chunk_size
    for c, h in enumerate(stream.hidden):
        emb_b, _ = record_layer_kwargs(model, input_ids[b[c * cs : (c + 1) * cs]].to(stream.device))
        stream.hidden[c] = mix_embeddings(h, emb_b, lam[c * cs : (c + 1) * cs])
    return stream


def gradient_criteria(model, input_ids: Tensor, chunk_size: int = 4, progress: Callable | None = None,
                      world=None, total_tokens: int | None = None) -> dict[int, dict[str, Tensor]]:
    """EGS / EGE / EGO / EGN for every MoE layer from the gradient of the mean next-token loss over
    the calibration batch with respect to each expert's weights.

    Cost: one forward and backward pass of the whole model per chunk of sequences, with gradients
    kept only for the routed experts' fused tensors (memory: the model, one chunk's activations,
    and one gradient buffer the size of the routed experts). Unlike the other metrics this pass is
    not layer-streamed: backpropagation needs every layer's activations of the chunk.

    Data parallel (``world`` of several ranks): ``input_ids`` is this rank's share and
    ``total_tokens`` the whole batch's predicted tokens; the gradient is a sum over tokens, so the
    ranks' gradients are summed (float64) before the criteria, which the main rank computes (the
    others get ``{}``).
    """
    hf = model.hf
    was_training = hf.training
    saved = {n: p.requires_grad for n, p in hf.named_parameters()}
    expert_params = []
    for layer in model.layers.values():
        for name in ("gate_up_proj", "down_proj"):
            expert_params.append(getattr(layer.experts, name))
    try:
        for p in hf.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in expert_params:
            p.requires_grad_(True)
        hf.eval()
        device = next(hf.parameters()).device
        n_chunks = (input_ids.shape[0] + chunk_size - 1) // chunk_size
        total_tokens = total_tokens or input_ids.shape[0] * (input_ids.shape[1] - 1)
        for c in range(n_chunks):
            ids = input_ids[c * chunk_size : (c + 1) * chunk_size].to(device)
            nll = token_nll(hf(input_ids=ids, use_cache=False).logits, ids).sum()
            (nll / total_tokens).backward()
            if progress:
                progress(c + 1, n_chunks)
        if world is not None and world.distributed:
            for p in expert_params:
                p.grad.copy_(world.sum(p.grad.cpu()).to(p.grad.device, p.grad.dtype))
            if not world.is_main:
                return {}
        gradient = [c for c in CRITERIA.values() if c.family == "gradients"]
        result = {}
        for i, layer in model.layers.items():
            stats = GradientStats(layer, {n: getattr(layer.experts, n).grad for n in ("gate_up_proj", "down_proj")})
            result[i] = {c.name: c.compute(stats) for c in gradient}
        return result
    finally:
        for p in expert_params:
            p.grad = None
        for n, p in hf.named_parameters():
            p.requires_grad_(saved[n])
        hf.train(was_training)


# ---------------------------------------------------------------- the cached run


def _flatten(la: LayerAnalysis) -> dict[str, Tensor]:
    out = {}
    for group, d in (("sim", la.similarity), ("crit", la.criteria), ("pair", la.pairs), ("routing", la.routing)):
        for name, t in d.items():
            out[f"L{la.layer}.{group}.{name}"] = t.detach().float().cpu().contiguous()
    return out


def analysis_parts(model, batch, params: AnalysisParams) -> dict:
    """Everything an analysis depends on: its cache key parts."""
    return {
        "model": model.fingerprint(),
        "dtype": str(next(model.hf.parameters()).dtype),
        "data": batch.fingerprint,
        "params": params.key(),
        "version": METRICS_VERSION,
    }


def lookup_analysis(model, batch, params: AnalysisParams | None = None, cache=None) -> AnalysisResult | None:
    """The stored analysis :func:`run_analysis` would return, or None when it has not been computed
    (never computes: a dashboard can ask on every page view)."""
    from moescope.analysis.core.cache import lookup

    return lookup("analysis", analysis_parts(model, batch, params or AnalysisParams()), AnalysisResult, cache)


def predicted_memory(skeleton, params: AnalysisParams, samples: int, seq_len: int, dtype: torch.dtype,
                     offloaded: bool = False) -> dict[str, int]:
    """The bytes an analysis of ``skeleton`` (a weightless model, :func:`load_moe` with
    ``weights=False``) on ``samples`` × ``seq_len`` calibration tokens holds at its peak, by what
    holds them — the terms that grow with the model and the request:

    * ``weights``: every parameter in ``dtype`` (offloaded: the largest decoder layer and what lies
      outside the layers, embeddings and head);
    * ``hidden_states``: the T = samples × seq_len tokens' hidden states, a layer's input and its
      output (2 · T · d values in ``dtype``);
    * ``expert_outputs``: every routed expert's output on the similarity sample, E × n × d in
      ``dtype`` with n = min(T, similarity_tokens) · (1 + augment_ratio), when similarity or
      activations are asked for (the largest MoE layer's E);
    * ``gradients``: one gradient of every routed expert's weights (float32), for the gradients
      family;
    * ``working``: the similarity functions' chunk (:data:`metrics.WORK_BYTES`), and when similarity
      is asked for what the Gram pass holds besides (:func:`gram_pass.pass_memory`): a float32 copy
      of the centred outputs and every expert's token distances when they fit its store, the
      mini-batch blocks."""
    from moescope.analysis.model.view import attr_path

    width = torch.empty((), dtype=dtype).element_size()
    hf = skeleton.hf
    total = sum(p.numel() for p in hf.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in attr_path(hf, skeleton.family.layers_path)]
    weights = (total - sum(layers) + max(layers, default=0)) if offloaded else total
    d = int(skeleton.config.hidden_size)
    T = samples * seq_len
    want = set(params.metrics)
    E = max(skeleton.num_experts().values(), default=0)
    n = int(min(T, params.similarity_tokens) * (1 + params.augment_ratio))
    outputs = E * n * d * width if want & {"similarity", "activations"} else 0
    expert_params = sum(p.numel() for view in skeleton.layers.values() for p in view.experts.parameters())
    working = M.WORK_BYTES
    if "similarity" in want and E:
        from moescope.analysis.measure.gram_pass import pass_memory

        working = pass_memory(E, n, d, params.rbf_batch_tokens, params.rbf_batches)  # its tiles: WORK_BYTES
    return {"weights": weights * width, "hidden_states": 2 * T * d * width, "expert_outputs": outputs,
            "gradients": expert_params * 4 if "gradients" in want else 0, "working": working}


def check_memory(predicted: dict[str, int], available: int | None, similarity_tokens: int, n_rows: int) -> None:
    """Refuse, before any capture, an analysis whose :func:`predicted_memory` exceeds ``available``
    bytes, in one line naming the estimate, its largest parts, the limit and what to lower."""
    from moescope.analysis.core.units import format_bytes

    need = sum(predicted.values())
    if available is None or need <= available:
        return
    parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in
                      sorted(predicted.items(), key=lambda kv: -kv[1]) if v)
    hint = "lower --samples or --seq-len, or keep the weights on disk with --offload DIR"
    if predicted["expert_outputs"] and n_rows:
        per_token = predicted["expert_outputs"] / n_rows
        fits = int((available - need + predicted["expert_outputs"]) // per_token) if per_token else 0
        if fits >= 4:
            hint = f"lower --similarity-tokens to {min(fits, similarity_tokens - 1):,} or fewer, or " + hint
    raise MoescopeError(f"this analysis would hold about {format_bytes(need)} ({parts}), more than the "
                        f"{format_bytes(available)} of memory available; {hint}")


def run_analysis(
    model,
    batch,
    params: AnalysisParams | None = None,
    cache=None,
    progress: Callable[[str, int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> AnalysisResult | None:
    """Analyse every MoE layer of ``model`` on the calibration ``batch`` (a
    :class:`analysis.data.TokenBatch`), served from ``cache`` when the same model, data,
    parameters and metrics version were analysed before.

    ``progress(stage, done, total)`` is called at the start and after each decoder layer (stage
    ``"layers"``), before each step within a layer (stage ``"layer steps"``) and after each gradient
    chunk (stage ``"gradients"``).

    Resumable: each finished MoE layer is stored as its own ``analysis-layer`` entry as soon as it
    is done, so an interrupted run (Ctrl-C, SIGKILL, a lost rank) keeps them and the same call
    continues after the last one (``note`` is told which layers it reuses; their decoder layers
    still run forward, to carry the hidden states on). Once the whole analysis is stored, its
    layer entries are removed; no partial entry is ever written.

    Under ``torchrun`` (:func:`moescope.analysis.core.distributed.current` has several ranks) the
    calibration sequences are split over the ranks in contiguous shares of whole chunks, each rank
    walks the layers on its share, and every layer's statistics are reduced or gathered
    (:mod:`~moescope.analysis.measure.parallel`) so that the result is the one-process one; the
    main rank alone writes the cache, and the other ranks then read the stored result from it
    (None where they do not share the main rank's cache folder).
    """
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.distributed import current

    params = params or AnalysisParams()
    world = current()
    if "gradients" in params.metrics and getattr(model, "offloaded", False):
        raise MoescopeError("gradient criteria (EGS/EGE/EGO/EGN) need a backward pass through the whole model, "
                            "which an offloaded model cannot do; drop 'gradients' from the metrics or load it in memory")
    cache = cache or Cache()
    parts = analysis_parts(model, batch, params)
    label = f"{_slug(model.source)}-{_slug(batch.source)}-{batch.n_samples}x{batch.seq_len}"
    if world.distributed:
        if params.augment_ratio > 0:
            raise MoescopeError("the augmented similarities (--augment) mix sequences held by different ranks and "
                                "are not data-parallel yet: run them in one process (without torchrun / --nproc)")
        world.check_shards(batch.n_samples)
        world.agree(model=parts["model"], dtype=parts["dtype"], data=parts["data"],
                    params=canonical_json(parts["params"]))
    lo, hi = world.share(batch.n_samples, params.chunk_size)
    ranges = P.token_ranges(batch.n_samples, batch.seq_len, world, params.chunk_size)

    def layer_parts(l: int) -> dict:
        return {**parts, "layer": l}

    def compute():
        tensors: dict[str, Tensor] = {}
        layers_meta = {}
        stream = LayerStream(model, batch.input_ids[lo:hi], chunk_size=params.chunk_size)
        mixed = augmented_stream(model, batch.input_ids, params) if "similarity" in params.metrics else None
        n_layers = model.num_hidden_layers
        token_ids = batch.input_ids.reshape(-1)
        reused = []
        t_start = time.perf_counter()
        if progress:  # at once, before the first layer's work (which can take minutes)
            progress("layers", 0, n_layers)
        while stream.layer < n_layers:
            l = stream.layer
            stored = None
            if l in model.layers:
                stored = cache.get("analysis-layer", layer_parts(l)) if world.is_main else None
                if world.distributed:  # the main rank's cache decides for every rank
                    world.doing(f"analysing layer {l}")
                    if not world.any(stored is not None):
                        stored = None
                    elif not world.is_main:
                        stored = True
            if stored is not None:  # finished by an earlier run: only carry the hidden states on
                stream.step(capture_moe_input=False)
                x_aug = mixed.step() if mixed is not None else None
                if world.is_main:
                    tensors.update(stored.tensors())
                    layers_meta[str(l)] = stored.meta["layer_meta"]
                reused.append(l)
            else:
                x = stream.step()
                x_aug = mixed.step() if mixed is not None else None
                if x is not None:
                    t0 = time.perf_counter()
                    world.doing(f"analysing layer {l}")
                    with model.materialized(model.layers[l].block):
                        la = analyze_layer(model.layers[l], x, token_ids, params, x_aug, world=world, ranges=ranges,
                                           on_step=(lambda d, t: progress("layer steps", d, t)) if progress else None)
                    if model.offloaded:
                        from moescope.analysis.model import release_mapped_weights

                        release_mapped_weights()
                    if la is not None:
                        la.timings["total"] = time.perf_counter() - t0
                        flat = _flatten(la)
                        meta_l = {"num_experts": la.num_experts, "top_k": la.top_k,
                                  "scalars": la.scalars, "timings": la.timings}
                        cache.put("analysis-layer", layer_parts(l), tensors=flat,
                                  meta={"layer_meta": meta_l, "model": parts["model"], "model_source": model.source,
                                        "data": batch.describe()}, label=f"{label}-L{l}")
                        tensors.update(flat)
                        layers_meta[str(l)] = meta_l
                    del x
            if progress:
                progress("layers", l + 1, n_layers)
        if reused and note and world.is_main:
            note(f"reused {len(reused)} finished layer(s) from the cache ({_spans(reused)}); "
                 "their decoder layers ran forward only")
        stream_s = time.perf_counter() - t_start
        grad_s = 0.0
        if "gradients" in params.metrics:
            t0 = time.perf_counter()
            world.doing("reducing expert gradients")
            grads = gradient_criteria(
                model, batch.input_ids[lo:hi], chunk_size=max(1, params.chunk_size // 2),
                progress=(lambda d, t: progress("gradients", d, t)) if progress else None,
                world=world, total_tokens=batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1),
            )
            for l, crit in grads.items():
                for name, t in crit.items():
                    tensors[f"L{l}.crit.{name}"] = t.float().contiguous()
            grad_s = time.perf_counter() - t0
        meta = {
            "model": parts["model"], "model_source": model.source, "family": model.family.name,
            "data": batch.describe(), "data_source": batch.source,
            "params": params.key(), "layers": layers_meta,
            "timings": {"stream_s": stream_s, "gradients_s": grad_s},
            "domains": batch.domain_counts(),
        }
        if world.distributed:
            meta["ranks"] = world.size
        return {"tensors": tensors, "meta": meta}

    if not world.distributed:
        entry = cache.get_or_compute("analysis", parts, compute, label=label)
    else:
        world.doing("looking up the cache")
        done = world.any(world.is_main and cache.get("analysis", parts) is not None)
        if done:
            entry = cache.get("analysis", parts) if world.is_main else None
        else:
            t0 = time.perf_counter()
            result = compute()
            entry = None
            if world.is_main:
                entry = cache.put("analysis", parts, tensors=result["tensors"], meta=result["meta"], label=label,
                                  elapsed=time.perf_counter() - t0)
        world.doing("finishing")
        world.barrier()  # the main rank has stored it: the others read it (one machine or a shared cache folder)
        if not world.is_main:
            entry = cache.get("analysis", parts)
    if world.is_main:  # the whole analysis is stored: its per-layer checkpoints are no longer needed
        for l in model.layers:
            cache.remove("analysis-layer", cache_key("analysis-layer", layer_parts(l)))
    return AnalysisResult(entry) if entry is not None else None


def _spans(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"layers 0–2, 5"``."""
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(f"{start}" if start == l else f"{start}–{l}")
            start = None
    return "layer " + out[0] if len(layers) == 1 else "layers " + ", ".join(out)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.split("/")[-1] if "/" in text and not text.startswith(("hf:", "file:")) else text)[:24]


class AnalysisResult(StoredResult):
    """Read access to a stored analysis: per-layer matrices, layer × expert maps, tidy tables."""

    def num_experts(self, layer: int) -> int:
        return int(self.meta["layers"][str(layer)]["num_experts"])

    def scalars(self, layer: int) -> dict[str, float]:
        return dict(self.meta["layers"][str(layer)]["scalars"])

    def timings(self, layer: int) -> dict[str, float]:
        return dict(self.meta["layers"][str(layer)]["timings"])

    def similarity_names(self) -> list[str]:
        return sorted({k.split(".", 2)[2] for k in self._t if ".sim." in k})

    def criteria_names(self) -> list[str]:
        return sorted({k.split(".", 2)[2] for k in self._t if ".crit." in k})

    def similarity(self, layer: int, name: str) -> Tensor:
        """``[E, E]`` similarity ``name`` of ``layer``."""
        try:
            return self._t[f"L{layer}.sim.{name}"]
        except KeyError:
            raise self._missing("similarity", name, layer, self.similarity_names()) from None

    def _get(self, layer: int, group: str, name: str, kind: str) -> Tensor:
        try:
            return self._t[f"L{layer}.{group}.{name}"]
        except KeyError:
            names = sorted({k.split(".", 2)[2] for k in self._t if f".{group}." in k})
            raise self._missing(kind, name, layer, names) from None

    def routing(self, layer: int, name: str) -> Tensor:
        return self._get(layer, "routing", name, "routing statistic")

    def criterion(self, layer: int, name: str) -> Tensor:
        return self._get(layer, "crit", name, "criterion")

    def pair(self, layer: int, name: str) -> Tensor:
        """``[E, E]`` matrix of pair criterion ``name`` (ECC: co-selection counts, ETS: shared token ids)."""
        return self._get(layer, "pair", name, "pair criterion")

    def layer_map(self, name: str, group: str = "crit") -> Tensor:
        """``[layers, max E]`` map of a criterion (or routing vector), NaN where a layer has fewer experts."""
        get = self.criterion if group == "crit" else self.routing
        rows = [get(l, name) for l in self.layers]
        width = max(r.numel() for r in rows)
        out = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out

    @staticmethod
    def _missing(kind, name, layer, names) -> MoescopeError:
        if name in names:
            return MoescopeError(f"layer {layer} has no {kind} '{name}'")
        return unknown_name(kind, name, names)

    # ---- tidy tables -------------------------------------------------------------------------
    def similarity_table(self):
        import pandas as pd

        rows = []
        for l in self.layers:
            for name in self.similarity_names():
                S = self.similarity(l, name)
                E = S.shape[0]
                ii, jj = torch.meshgrid(torch.arange(E), torch.arange(E), indexing="ij")
                rows.append(pd.DataFrame({"layer": l, "metric": name, "expert_i": ii.reshape(-1).numpy(),
                                          "expert_j": jj.reshape(-1).numpy(), "value": S.reshape(-1).numpy()}))
        return pd.concat(rows, ignore_index=True)

    def criteria_table(self):
        import pandas as pd

        rows = []
        for l in self.layers:
            for name in self.criteria_names():
                v = self.criterion(l, name)
                rows.append(pd.DataFrame({"layer": l, "expert": range(v.numel()), "criterion": name,
                                          "value": v.numpy()}))
        return pd.concat(rows, ignore_index=True)

    def routing_table(self):
        import pandas as pd

        rows = []
        for l in self.layers:
            E = self.num_experts(l)
            s = self.scalars(l)
            rows.append(pd.DataFrame({
                "layer": l, "expert": range(E),
                "usage": self.routing(l, "usage").numpy(),
                "tokens_routed": self.routing(l, "usage_count").numpy().astype("int64"),
                "vocab_coverage": self.routing(l, "vocab_coverage").numpy().astype("int64"),
                "mean_router_logit": self.routing(l, "mean_logit").numpy(),
                "layer_beta": s["beta"], "layer_balance_entropy": s["balance_entropy"],
            }))
        return pd.concat(rows, ignore_index=True)

    def coactivation_table(self):
        import pandas as pd

        rows = []
        for l in self.layers:
            C = self.routing(l, "coactivation")
            E = C.shape[0]
            ii, jj = torch.meshgrid(torch.arange(E), torch.arange(E), indexing="ij")
            rows.append(pd.DataFrame({"layer": l, "expert_i": ii.reshape(-1).numpy(),
                                      "expert_j": jj.reshape(-1).numpy(),
                                      "tokens": C.reshape(-1).numpy().astype("int64")}))
        return pd.concat(rows, ignore_index=True)

    def summary(self) -> dict:
        """Per layer: the most similar expert pair (by linear CKA when computed) and the least-used expert."""
        sims = self.similarity_names()
        metric = "cka_linear" if "cka_linear" in sims else (sims[0] if sims else None)
        out = {}
        for l in self.layers:
            row: dict = {"num_experts": self.num_experts(l), **self.scalars(l)}
            if metric:
                S = self.similarity(l, metric).clone().fill_diagonal_(float("-inf"))
                flat = int(torch.argmax(S))
                i, j = divmod(flat, S.shape[0])
                row["most_similar_pair"] = {"experts": [min(i, j), max(i, j)], "metric": metric,
                                            "value": float(S[i, j])}
            usage = self.routing(l, "usage")
            e = int(torch.argmin(usage))
            row["least_used_expert"] = {"expert": e, "usage": float(usage[e])}
            out[str(l)] = row
        return out

    def exportable(self) -> list[str]:
        """The tables this analysis has data for: ``similarity`` and ``criteria`` only when some
        similarity metric / criterion was computed (``--metrics``), routing and co-activation always."""
        return ([*(["similarity"] if self.similarity_names() else []), *(["criteria"] if self.criteria_names() else []),
                 "routing", "coactivation"])

    def export(self, out_dir) -> dict[str, str]:
        """Write ``similarity.csv``, ``criteria.csv``, ``routing.csv``, ``coactivation.csv`` into
        ``out_dir`` (each to a temporary sibling, then renamed; a symlink is followed), each that
        the analysis has data for (:meth:`exportable`)."""
        from moescope.analysis.core.outputs import atomic_file, check_output_folder

        out = check_output_folder(out_dir, "--export folder")
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        tables = {"similarity": self.similarity_table, "criteria": self.criteria_table, "routing": self.routing_table,
                  "coactivation": self.coactivation_table}
        for name in self.exportable():
            table = tables[name]()
            p = out / f"{name}.csv"
            with atomic_file(p, "--export file") as fh:
                table.to_csv(fh, index=False)
            paths[name] = str(p)
        return paths
