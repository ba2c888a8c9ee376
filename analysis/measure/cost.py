"""What an analysis will cost in time, from the model's shapes and this machine's measured speed.

The time of each metric family is predicted from its multiply-adds (counted from the config: E
experts, d hidden size, I expert width, k top-k, T calibration tokens, n similarity tokens) and
four rates measured here in a fraction of a second: a product in the model's dtype (the expert
forwards), a float32 product (the similarity and weight Grams), a small float32 matrix-vector
product (the Lanczos iterations of the stable ranks) and an element-wise pass over float32
memory. The element-wise work is counted as the passes the code makes over its largest arrays
(``elementwise``: the E·n²/2 distances of the similarity, 16 passes between distances, kept copy,
selection and kernel; the mini-batch blocks, 10; the routed experts' gradients, 11 between their
Gram, moments and outlier count); smaller terms are left out, so a prediction is a lower bound.
``benchmarks/scale.py`` prints it beside the measured time of each family.

Multiply-adds per MoE layer (``analysis_work``):

* ``capture``: the calibration forward that yields every layer's input, ``T · active`` with
  ``active`` the parameters a token uses (the routed experts counted k times of E);
* ``routing``: the router, ``T d E``;
* ``expert_outputs``: every expert on the similarity sample, ``3 n d I E`` (model dtype);
* ``similarity``: :func:`~moescope.analysis.measure.gram_pass.pass_costs` (float32), and when
  ``n < T`` the mean outputs over all tokens ``3 T d I E``;
* ``weights``: the weight Gram ``E² 3dI``, the surrogates ``E d² I`` and their Gram ``E² d²``, the
  stable ranks' Grams ``3 E s² l`` (``s, l`` the smaller and larger of d, I) and about 70 Lanczos
  matvecs of ``s²`` each;
* ``activations``: the routed experts on their tokens, ``3 T k d I``;
* ``gradients``: forward and backward, ``3 T · active``, and the gradient Gram ``E² 3dI``.
"""

from __future__ import annotations

import functools
import time

import torch

LANCZOS_MATVECS = 70  # matvecs per stable rank, as measured on random and trained expert matrices
PASSES = {"distances": 16, "minibatch": 10, "gradients": 11}  # element-wise passes, counted in the code


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


@functools.lru_cache(maxsize=4)
def machine_rates(dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Multiply-adds per second of this process: ``model`` (a 1024×1024×1024 product in ``dtype``),
    ``fp32`` (the same in float32) and ``matvec`` (a 768×768 float32 matrix-vector product, one
    thread); ``elementwise``: float32 elements per second of an in-place multiply-add over 64 MiB.
    Measured once per process (about 0.2 s)."""
    n = 1024
    out = {}
    for name, dt in (("model", dtype), ("fp32", torch.float32)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b
        out[name] = n**3 / _best(lambda a=a, b=b: a @ b)
    m, v = torch.randn(768, 768), torch.randn(768)
    with torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["matvec"] = 768**2 * 50 / _best(lambda: [m.mv(v) for _ in range(50)])
        finally:
            torch.set_num_threads(threads)
    x = torch.ones(16 * 2**20)
    out["elementwise"] = x.numel() / _best(lambda: x.mul_(1.0000001).add_(1e-7))
    return out


def _layer_shapes(skeleton) -> list[tuple[int, int, int, int]]:
    """``(E, d, I, k)`` of every MoE layer."""
    shapes = []
    d = int(skeleton.config.hidden_size)
    for view in skeleton.layers.values():
        w = view.expert_weights(0)
        shapes.append((view.num_experts, d, int(w.gate.shape[0]), view.top_k))
    return shapes


def active_parameters(skeleton) -> int:
    """Parameters one token uses: everything but the routed experts, plus k of each layer's E."""
    total = sum(p.numel() for p in skeleton.hf.parameters())
    routed = 0
    used = 0
    for view in skeleton.layers.values():
        n = sum(p.numel() for p in view.experts.parameters())
        routed += n
        used += n * view.top_k // max(view.num_experts, 1)
    return total - routed + used


def analysis_work(skeleton, metrics, samples: int, seq_len: int, similarity_tokens: int,
                  augment_ratio: float = 0.0) -> dict[str, dict[str, float]]:
    """Multiply-adds of each family asked for (and of the capture every analysis runs), split by
    the kind of work that does them: ``model`` (model dtype), ``fp32``, ``matvec`` products and
    ``elementwise`` passes (in elements)."""
    from moescope.analysis.measure.gram_pass import pass_costs

    T = samples * seq_len
    n = int(min(T, similarity_tokens) * (1 + augment_ratio))
    want = {"routing", *metrics}
    active = active_parameters(skeleton)
    work: dict[str, dict[str, float]] = {"capture": {"model": T * active}}

    def add(family: str, kind: str, macs: float) -> None:
        work.setdefault(family, {}).setdefault(kind, 0.0)
        work[family][kind] += macs

    for E, d, I, k in _layer_shapes(skeleton):
        add("routing", "model", T * d * E)
        if want & {"similarity", "activations"}:
            add("expert_outputs", "model", 3 * n * d * I * E)
        if "similarity" in want:
            add("similarity", "fp32", sum(pass_costs(E, n, d).values()))
            b = min(512, n)
            add("similarity", "elementwise", PASSES["distances"] * E * n * n / 2 + PASSES["minibatch"] * 4 * E * b * b)
            if n < T:
                add("similarity", "model", 3 * T * d * I * E)
        if "weights" in want:
            s, big = min(d, I), max(d, I)
            add("weights", "fp32", E * E * 3 * d * I + E * d * d * I + E * E * d * d + 3 * E * s * s * big)
            add("weights", "matvec", 3 * E * LANCZOS_MATVECS * s * s)
        if "activations" in want:
            add("activations", "model", 3 * T * k * d * I)
        if "gradients" in want:
            add("gradients", "fp32", E * E * 3 * d * I)
            add("gradients", "elementwise", PASSES["gradients"] * E * 3 * d * I)
    if "gradients" in want:
        add("gradients", "model", 3 * T * active)
    return work


def predicted_seconds(work: dict[str, dict[str, float]], rates: dict[str, float]) -> dict[str, float]:
    """Seconds per family: each kind's multiply-adds at its measured rate."""
    return {family: sum(macs / rates[kind] for kind, macs in kinds.items()) for family, kinds in work.items()}


def analysis_cost(skeleton, params, samples: int, seq_len: int, dtype: torch.dtype | None = None,
                  offloaded: bool = False) -> dict:
    """The memory and time an analysis of ``skeleton`` (a weightless model, ``load_moe(...,
    weights=False)``) with ``params`` on ``samples`` × ``seq_len`` tokens is predicted to take, and
    the memory this machine has: ``{"bytes": {part: n}, "total_bytes", "available_bytes",
    "seconds": {family: s}, "total_seconds", "work": {family: {kind: n}}, "rates": …}`` (``work``:
    :func:`analysis_work`)."""
    from moescope.analysis.core.processes import available_memory
    from moescope.analysis.measure.analyze import predicted_memory

    dtype = dtype or next(iter(skeleton.hf.parameters())).dtype
    memory = predicted_memory(skeleton, params, samples, seq_len, dtype, offloaded=offloaded)
    rates = machine_rates(dtype)
    work = analysis_work(skeleton, params.metrics, samples, seq_len, params.similarity_tokens, params.augment_ratio)
    seconds = predicted_seconds(work, rates)
    return {"bytes": memory, "total_bytes": sum(memory.values()), "available_bytes": available_memory(),
            "seconds": seconds, "total_seconds": sum(seconds.values()), "work": work, "rates": rates}


def multiply_adds(kinds: dict[str, float]) -> float:
    """The multiply-adds of one family's :func:`analysis_work` (its element-wise passes left out)."""
    return sum(v for k, v in kinds.items() if k != "elementwise")
