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
from torch import Tensor

from analysis import metrics as M
from analysis.errors import MoescopeError, unknown_name

METRIC_FAMILIES = ("similarity", "weights", "routing", "activations", "gradients")
DEFAULT_METRICS = ("similarity", "weights", "routing", "activations")

SIMILARITY_NAMES = ("cka_linear", "cka_rbf", "cosine", "mse")
WEIGHT_SIMILARITY_NAMES = ("weight_cosine", "weight_mse", "surrogate_cosine", "surrogate_mse")


@dataclass(frozen=True)
class AnalysisParams:
    """What an analysis computes and how (part of the cache key)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    similarity_tokens: int = 8192  # tokens (subsampled, seeded) for output similarities
    rbf_batch_tokens: int = 512  # RBF CKA mini-batch size (T×T only per mini-batch)
    rbf_batches: int = 4
    augment_ratio: float = 0.0  # group-and-merge augmentation: extra mixed-token rows, × T
    chunk_size: int = 8  # sequences per decoder-layer forward
    seed: int = 0

    def __post_init__(self):
        for m in self.metrics:
            if m not in METRIC_FAMILIES:
                raise unknown_name("metric family", m, METRIC_FAMILIES)
        if self.similarity_tokens < 4:
            raise MoescopeError(f"similarity_tokens must be at least 4, got {self.similarity_tokens}")
        if not 0 <= self.augment_ratio <= 4:
            raise MoescopeError(f"augment_ratio must be in [0, 4], got {self.augment_ratio}")

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
def analyze_layer(view, x: Tensor, token_ids: Tensor, params: AnalysisParams) -> LayerAnalysis:
    """All metrics of one MoE layer from its block input ``x [T, d]`` and the token ids ``[T]``."""
    E, T = view.num_experts, x.shape[0]
    out = LayerAnalysis(layer=view.index, num_experts=E, top_k=view.top_k)
    want = set(params.metrics)
    tm = out.timings
    g = torch.Generator().manual_seed(params.seed + view.index)

    with _timed(tm, "routing"):
        r = view.route(x)
        idx, w = r.topk_idx.cpu(), r.topk_weights.float().cpu()
        counts = M.usage_counts(idx, E)
        coact = M.coactivation_counts(idx, E)
        out.routing = {
            "usage": (counts / T).float(),
            "usage_count": counts.float(),
            "coactivation": coact.float(),
            "vocab_coverage": M.vocabulary_coverage(idx, token_ids.cpu(), E).float(),
            "mean_logit": r.logits.float().mean(0).cpu(),
        }
        out.scalars = {
            "beta": M.skip_ratio_median(w),
            "balance_entropy": M.load_balance_entropy(counts),
            "tokens": float(T),
        }
        distinct = torch.unique(token_ids).numel()
        out.criteria["EUF"] = (counts / T).float()
        out.criteria["ECC"] = ((coact.sum(1) - coact.diagonal()) / T).float()
        out.criteria["EVC"] = (out.routing["vocab_coverage"] / max(distinct, 1)).float()
        out.criteria["RWN"] = view.router_weight.float().norm(dim=1).cpu()

    if "similarity" in want or "activations" in want:
        with _timed(tm, "expert_outputs"):
            n = min(T, params.similarity_tokens)
            sel = torch.randperm(T, generator=g)[:n] if n < T else torch.arange(T)
            xs = x[sel.to(x.device)]
            if params.augment_ratio > 0:
                from analysis.data import mix_token_embeddings

                xs = mix_token_embeddings(xs, params.augment_ratio, seed=params.seed + view.index)
            Y = torch.stack([view.expert_forward(e, xs).float() for e in range(E)]).cpu()  # [E, n, d]

    if "similarity" in want:
        with _timed(tm, "similarity"):
            out.similarity["cka_linear"] = M.linear_cka_matrix(Y)
            out.similarity["cosine"] = M.output_cosine_matrix(Y)
            out.similarity["mse"] = M.output_mse_matrix(Y)
        with _timed(tm, "similarity_rbf"):
            out.similarity["cka_rbf"] = M.rbf_cka_matrix(
                Y, batch_tokens=params.rbf_batch_tokens, n_batches=params.rbf_batches, seed=params.seed
            )

    if "activations" in want:
        with _timed(tm, "activations"):
            out.criteria["EAS"] = M.mean_offdiag(M.output_cosine_matrix(Y))
            eae, eao, ean, reap, ets = (torch.full((E,), float("nan")) for _ in range(5))
            for e in range(E):
                hit = (r.topk_idx == e)
                tok = hit.any(-1)
                if int(tok.sum()) == 0:
                    continue
                xe = x[tok]
                ye = view.expert_forward(e, xe).float()
                we = (r.topk_weights.float() * hit).sum(-1)[tok]
                norms = ye.norm(dim=-1)
                ean[e] = norms.mean()
                reap[e] = (we * norms).mean()
                eae[e] = M.gaussian_entropy(ye)
                eao[e] = M.outlier_fraction(ye)
                ets[e] = M.mean_pairwise_cosine(xe)
            out.criteria.update(EAE=eae, EAO=eao, EAN=ean, REAP=reap, ETS=ets)

    if "weights" in want:
        with _timed(tm, "weights"):
            V = M.weight_vectors(view).cpu()
            S = M.surrogate_weights(view).reshape(E, -1).cpu()
            out.similarity["weight_cosine"] = M.flat_cosine_matrix(V)
            out.similarity["weight_mse"] = M.flat_mse_matrix(V)
            out.similarity["surrogate_cosine"] = M.flat_cosine_matrix(S)
            out.similarity["surrogate_mse"] = M.flat_mse_matrix(S)
            out.criteria["EWS"] = M.mean_offdiag(out.similarity["weight_cosine"])
            out.criteria["EWN"] = V.norm(dim=1)
            wsr = []
            for e in range(E):
                ew = view.expert_weights(e)
                wsr.append(sum(M.stable_rank(t) for t in (ew.gate, ew.up, ew.down)) / 3)
            out.criteria["WSR"] = torch.tensor(wsr, dtype=torch.float32)
    return out


def gradient_criteria(model, input_ids: Tensor, chunk_size: int = 4, progress: Callable | None = None) -> dict[int, dict[str, Tensor]]:
    """EGS / EGE / EGO / EGN for every MoE layer from the gradient of the mean next-token loss over
    the calibration batch with respect to each expert's weights.

    Cost: one forward and backward pass of the whole model per chunk of sequences, with gradients
    kept only for the routed experts' fused tensors (memory: the model, one chunk's activations,
    and one gradient buffer the size of the routed experts). Unlike the other metrics this pass is
    not layer-streamed: backpropagation needs every layer's activations of the chunk.
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
        total_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
        for c in range(n_chunks):
            ids = input_ids[c * chunk_size : (c + 1) * chunk_size].to(device)
            logits = hf(input_ids=ids, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, ids[:, 1:, None]).sum()
            (nll / total_tokens).backward()
            if progress:
                progress(c + 1, n_chunks)
        result = {}
        for i, layer in model.layers.items():
            grads = {n: getattr(layer.experts, n).grad for n in ("gate_up_proj", "down_proj")}
            vecs, ege, ego = [], [], []
            for e in range(layer.num_experts):
                gw = layer.expert_weights(e, grads)
                v = torch.cat([gw.gate.reshape(-1), gw.up.reshape(-1), gw.down.reshape(-1)]).float().cpu()
                vecs.append(v)
                ege.append(M.gaussian_entropy(gw.down.float().T.cpu()))  # rows: I samples, cols: d dims
                ego.append(M.outlier_fraction(v[:, None]))
            V = torch.stack(vecs)
            result[i] = {
                "EGS": M.mean_offdiag(M.flat_cosine_matrix(V)),
                "EGE": torch.tensor(ege, dtype=torch.float32),
                "EGO": torch.tensor(ego, dtype=torch.float32),
                "EGN": V.norm(dim=1),
            }
        return result
    finally:
        for p in expert_params:
            p.grad = None
        for n, p in hf.named_parameters():
            p.requires_grad_(saved[n])
        hf.train(was_training)
