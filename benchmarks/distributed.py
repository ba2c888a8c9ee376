"""Benchmark: a data-parallel analysis, 1 rank against 2 gloo ranks on this machine, side by side.

    python benchmarks/distributed.py [--samples 32 --seq-len 128]

Runs the same analysis (every metric family but the gradients) of (a) the demo model and (b) a
synthetic Qwen3-MoE with 128 experts (top-8) per layer, first as one process, then as two ranks
(each a worker started with torchrun's variables, gloo on localhost), every process with one
thread (two OpenMP threads per process spin against each other and against other jobs on a shared
2-core machine, which would flatter the two ranks). Each worker times ``run_analysis`` alone
(model loading and process start excluded, a barrier before the clock starts) on a fresh cache.
Prints wall times, the speed-up, the bytes each rank put into collectives per MoE layer
(measured by the process group, and the formula below for comparison), and the main rank's
per-layer split between work every rank shares (decoder layers, expert outputs of the routed
and sampled tokens) and work done once (routing statistics on the gathered trace,
similarities on the gathered sample, weight criteria).

Then, on paper, a Qwen3-235B-A22B observation (94 MoE layers, 128 experts, top-8, d 4096, expert
width 1536; 256 × 2048 calibration tokens, 8192 sampled for similarities) on 1, 8 and 32 GPUs,
from FLOP counts calibrated by the measured split, the measured bytes formula, and stated GPU
assumptions (printed with the numbers).

The machine may be shared: the load average is printed before and after; compare the two
columns of one run, not numbers between runs. On a machine whose cores are already busy a second
rank finds no free core, so the wall-time speed-up understates the split; the CPU seconds each
rank spends (also printed) show it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

# ---------------------------------------------------------------- the worker (one rank)


def _build(kind: str):
    from moescope.analysis.model import load_moe, wrap_model
    from moescope.analysis.model.synthetic import tiny_model

    demo = load_moe("demo")
    if kind == "demo":
        return demo
    # 128 experts, top-8, like Qwen3-235B-A22B's layers (narrower): d 128, expert width 64
    hf = tiny_model("qwen3_moe", seed=0, vocab_size=len(demo.tokenizer), num_experts=128, num_experts_per_tok=8,
                    hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return wrap_model(hf, source="synthetic-128", tokenizer=demo.tokenizer)


def worker(kind: str, samples: int, seq_len: int, out: str) -> None:
    from moescope.analysis.core import distributed
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.analyze import FORWARD_METRICS, AnalysisParams, run_analysis

    world = distributed.init()
    model = _build(kind)
    batch = sample_tokens("demo:all", model.tokenizer, samples, seq_len, seed=0, split="validation")
    params = AnalysisParams(metrics=FORWARD_METRICS, similarity_tokens=2048)
    with tempfile.TemporaryDirectory() as cache_dir:
        world.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_analysis(model, batch, params, cache=Cache(cache_dir))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sent = world.bytes_exchanged
        cpu_max = float(world.sum(torch.tensor([0.0 if world.is_main else cpu]))[0]) if world.distributed else 0.0
        world.barrier()
        if world.is_main:
            layers = {str(l): res.timings(l) for l in res.layers}
            json.dump({"wall_s": wall, "cpu_s": cpu, "cpu_other_s": cpu_max, "bytes_by_rank0": sent, "moe_layers": len(res.layers),
                       "stream_s": res.meta["timings"]["stream_s"], "layers": layers, "tokens": batch.n_samples * seq_len,
                       "threads": torch.get_num_threads(), "E": model.layers[res.layers[0]].num_experts,
                       "k": model.layers[res.layers[0]].top_k, "d": model.config.hidden_size,
                       "similarity_tokens": params.similarity_tokens}, open(out, "w"))
    distributed.finish()


# ---------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kind: str, n: int, samples: int, seq_len: int, threads: int = 1) -> dict:
    port = _free_port()
    out = tempfile.mktemp(suffix=".json")
    procs = []
    for r in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MOESCOPE_CACHE": tempfile.gettempdir()}
        if n > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", kind, "--samples", str(samples),
                                       "--seq-len", str(seq_len), "--out", out], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{kind} with {n} rank(s) failed: exit codes {codes}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def bytes_formula(T: int, E: int, k: int, d: int, n_sample: int, ranks: int, elem: int = 4) -> float:
    """Bytes one non-main rank puts into the collectives of one MoE layer (similarity, routing and
    activation families): its share of the routing trace (logits E×4, indices k×8, weights k×4 per
    token), its share of the sampled tokens' block inputs (d·elem per token), the routed-token
    sums (per expert: 3 + 4d float64, then d, then 1), the mean outputs (E·d float64, only when
    the sample is smaller than T), the shared RBF CKA's sums (bandwidths E, Frobenius products E²,
    row sums E·n, float64), plus a few 8-byte counts."""
    share = T / ranks
    trace = share * (E * 4 + k * 8 + k * 4)
    sample = (n_sample / ranks) * d * elem
    routed = E * ((3 + 4 * d) + d + 1) * 8
    means = E * d * 8 if n_sample < T else 0
    rbf = (E + E * E + E * n_sample) * 8
    return trace + sample + routed + means + rbf


def split(res: dict) -> tuple[float, float]:
    """(seconds of work the ranks share, seconds done once on the main rank: the similarity and
    weight families) of one run."""
    once = sum(t.get("similarity", 0) + t.get("weights", 0) for t in res["layers"].values())
    shared = res["wall_s"] - once
    return shared, once


def paper(measured: dict) -> None:
    """Qwen3-235B-A22B on 1, 8, 32 GPUs from FLOPs and bytes, under stated GPU assumptions."""
    L, E, k, d, I = 94, 128, 8, 4096, 1536
    T, n = 256 * 2048, 8192
    heads, kv, hd = 64, 4, 128
    expert = 6 * d * I  # FLOPs of one expert on one token (gate, up, down)
    attn = 2 * d * (heads * hd * 2 + kv * hd * 2) + 2 * 2 * 2048 / 2 * heads * hd
    per_token = attn + k * expert + k * expert  # the layer's forward, then the routed tokens' expert outputs
    rbf = E * n * n * d * 2  # the exact RBF CKA's distances and kernels, row blocks over the ranks
    shared = T * per_token  # the layer's tokens, split by sequence
    once_all = (E * n * n * d * 2  # token Grams of linear CKA (the exact RBF CKA's distances are shared)
                + E * E * n * d * 2  # output cosine / MSE Grams
                + T * E * E * 2  # co-activation on the gathered trace
                + E * d * d * I * 2)  # surrogate-weight Gram
    once_act = E * E * n * d * 2 + T * E * E * 2  # routing + activations only (REAP, EAN, EAO, …)
    # stated assumptions, per H100 SXM: expert and attention matmuls in bf16 at 300 TFLOP/s sustained;
    # the float32/float64 statistics at 40 TFLOP/s; the layer's bf16 weights (4.9 GB) onloaded from
    # host memory at 20 GB/s by every rank at once; the collectives as implemented (CPU tensors over
    # gloo's TCP, rank 0 receiving every other rank's share) at 2 GB/s into rank 0
    fp32, onload_bw, gather_bw = 40e12, 20e9, 2e9
    layer_bytes = 3 * E * d * I * 2 + (heads * hd * 2 + kv * hd * 2) * d * 2
    print("\nOn paper: Qwen3-235B-A22B, 94 MoE layers × 128 experts (top-8, d 4096, expert width 1536), "
          "256 × 2048 calibration tokens, 8192 sampled for similarities")
    print(f"  per layer: {shared / 1e12:.0f} TFLOP split over the ranks (+ {rbf / 1e12:.0f} TFLOP of RBF CKA, split); "
          f"every rank runs the experts on the sample ({n * E * expert / 1e12:.0f} TFLOP); once on rank 0 {once_all / 1e12:.0f} TFLOP "
          f"(all forward families) or {once_act / 1e12:.0f} TFLOP (routing + activations); "
          f"{layer_bytes / 1e9:.1f} GB of weights onloaded by every rank")
    print("  assumed per GPU: float32 statistics 40 TFLOP/s, onload 20 GB/s, gloo into rank 0 2 GB/s; the bf16 "
          "matmuls at 300 TFLOP/s (large batches) or 30 TFLOP/s (per-expert loops over small token groups)")
    for title, once, bf16 in (("all forward families, bf16 at 300 TFLOP/s", once_all, 300e12),
                              ("all forward families, bf16 at 30 TFLOP/s", once_all, 30e12),
                              ("routing + activations, bf16 at 30 TFLOP/s", once_act, 30e12)):
        print(f"  {title}:")
        print("    GPUs     per rank   once   onload   exchange   per layer   94 layers")
        for g in (1, 8, 32):
            t_shared = shared / g / bf16 + n * E * expert / bf16 + (rbf / g / fp32 if once is once_all else 0.0)
            t_once = once / fp32
            t_onload = layer_bytes / onload_bw
            t_x = bytes_formula(T, E, k, d, n, g, elem=2) * (g - 1) / gather_bw if g > 1 else 0.0
            per_layer = t_shared + t_once + t_onload + t_x
            print(f"    {g:>4}   {t_shared:>9.2f} s  {t_once:>5.2f} s  {t_onload:>5.2f} s  {t_x:>7.2f} s  "
                  f"{per_layer:>8.2f} s   {L * per_layer / 60:>7.1f} min")
    syn = measured.get("synthetic-128")
    if syn:
        print(f"  (measured here on the synthetic 128-expert model: the once-on-rank-0 part is "
              f"{100 * syn['once_frac']:.0f} % of one rank's analysis)")
    print("  The once-on-rank-0 work (linear CKA and the cosine/MSE Grams on the sample, statistics of the gathered "
          "trace, weight criteria) and the gather into rank 0 do not shrink with more GPUs: they bound the speed-up.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.seq_len, args.out)
        return
    print(f"load before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    measured = {}
    for kind in ("demo", "synthetic-128"):
        one = run(kind, 1, args.samples, args.seq_len)
        two = run(kind, 2, args.samples, args.seq_len)
        T, E, k, d, m = one["tokens"], one["E"], one["k"], one["d"], min(one["tokens"], one["similarity_tokens"])
        s1, o1 = split(one)
        s2, o2 = split(two)
        measured[kind] = {"once_frac": o1 / one["wall_s"]}
        per_layer = two["bytes_by_rank0"] / two["moe_layers"]
        print(f"\n{kind}: {one['moe_layers']} MoE layers × {E} experts (top-{k}, d {d}), {T} tokens, "
              f"{m} sampled for similarities")
        print(f"  1 rank × {one['threads']} threads: {one['wall_s']:.2f} s   2 ranks × {two['threads']} thread(s): "
              f"{two['wall_s']:.2f} s   speed-up {one['wall_s'] / two['wall_s']:.2f}×")
        print(f"  shared by the ranks: {s1:.2f} s → {s2:.2f} s; once on rank 0: {o1:.2f} s → {o2:.2f} s")
        print(f"  CPU seconds (what a shared machine does not distort much): 1 rank {one['cpu_s']:.2f} s; "
              f"2 ranks: rank 0 {two['cpu_s']:.2f} s, rank 1 {two['cpu_other_s']:.2f} s "
              f"(the busier rank's CPU time is {max(two['cpu_s'], two['cpu_other_s']) / one['cpu_s']:.2f} of one rank's)")
        print(f"  bytes rank 0 put into collectives per MoE layer: {per_layer / 1e6:.2f} MB "
              f"(formula for a non-main rank: {bytes_formula(T, E, k, d, m, 2) / 1e6:.2f} MB)")
    paper(measured)
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
