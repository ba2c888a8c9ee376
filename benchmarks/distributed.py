"""Benchmark: a data-parallel analysis, 1 rank against 2 gloo ranks on this machine, side by side.

    python benchmarks/distributed.py [--samples 32 --seq-len 128]

Runs the same analysis (every metric family but the gradients) of (a) the demo model and (b) a
synthetic Qwen3-MoE with 128 experts (top-8) per layer, first as one process with every CPU
thread, then as two ranks with the threads shared out (each rank a ``python -m``-style worker
started with torchrun's variables, gloo on localhost). Each worker times ``run_analysis`` alone
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
columns of one run, not numbers between runs.
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
        t0 = time.perf_counter()
        res = run_analysis(model, batch, params, cache=Cache(cache_dir))
        wall = time.perf_counter() - t0
        sent = world.bytes_exchanged
        world.barrier()
        if world.is_main:
            layers = {str(l): res.timings(l) for l in res.layers}
            json.dump({"wall_s": wall, "bytes_by_rank0": sent, "moe_layers": len(res.layers),
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


def run(kind: str, n: int, samples: int, seq_len: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // n)
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
    token), its share of the sampled tokens' expert outputs (E·d·elem per token), the routed-token
    sums (per expert: 3 + 4d float64, then d, then 1), and the mean outputs (E·d float64, only when
    the sample is smaller than T), plus a few 8-byte counts."""
    share = T / ranks
    trace = share * (E * 4 + k * 8 + k * 4)
    sample = (n_sample / ranks) * E * d * elem
    routed = E * ((3 + 4 * d) + d + 1) * 8
    means = E * d * 8 if n_sample < T else 0
    return trace + sample + routed + means


def split(res: dict) -> tuple[float, float]:
    """(seconds of work the ranks share, seconds done once on the main rank: the similarity and
    weight families) of one run."""
    once = sum(t.get("similarity", 0) + t.get("weights", 0) for t in res["layers"].values())
    shared = res["wall_s"] - once
    return shared, once


def paper(measured: dict) -> None:
    """Qwen3-235B-A22B on 1, 8, 32 GPUs from FLOPs, the measured split and stated GPU rates."""
    L, E, k, d, I = 94, 128, 8, 4096, 1536
    T, n = 256 * 2048, 8192
    heads, kv, hd = 64, 4, 128
    expert = 6 * d * I  # FLOPs of one expert on one token (gate, up, down)
    attn = 2 * d * (heads * hd * 2 + kv * hd * 2) + 2 * 2 * 2048 / 2 * heads * hd
    per_token = attn + k * expert + k * expert  # the layer's forward, then the routed-token statistics
    shared_flops = T * per_token + n * E * expert  # + every expert on the sampled tokens
    once_flops = 2 * E * n * n * d * 2 + E * E * n * d * 2 + T * E * E * 2 + E * d * d * I * 2
    # stated assumptions (one H100 SXM): expert/attention matmuls in bf16 at 300 TFLOP/s sustained;
    # the float32 similarity and statistics at 40 TFLOP/s; the layer's bf16 weights (5.0 GB) onloaded
    # from host memory at 20 GB/s; collectives over NVLink at 150 GB/s within a node of 8 and
    # 20 GB/s between nodes (what one IB NIC per GPU gives, less gloo's host copy)
    bf16, fp32, onload_bw = 300e12, 40e12, 20e9
    layer_bytes = 3 * E * d * I * 2 + heads * hd * d * 4
    print("\nOn paper: Qwen3-235B-A22B, 94 MoE layers × 128 experts (top-8, d 4096, expert width 1536), "
          "256 × 2048 tokens, 8192 sampled for similarities")
    print(f"  per layer: shared work {shared_flops / 1e12:.0f} TFLOP (split over ranks), once on rank 0 "
          f"{once_flops / 1e12:.0f} TFLOP, weights {layer_bytes / 1e9:.1f} GB onloaded by every rank")
    syn = measured.get("synthetic-128")
    if syn:
        print(f"  (measured on the synthetic 128-expert layer here: {100 * syn['once_frac']:.0f} % of one rank's "
              "analysis time is the once-on-rank-0 part)")
    print("  GPUs   shared/rank   once   onload   exchange    per layer     94 layers")
    for g in (1, 8, 32):
        bw = 150e9 if g <= 8 else 20e9
        shared = shared_flops / g / bf16
        once = once_flops / fp32
        onload = layer_bytes / onload_bw
        exchange = (bytes_formula(T, E, k, d, n, g, elem=2) * (g - 1)) / bw if g > 1 else 0.0
        per_layer = shared + once + onload + exchange
        print(f"  {g:>4}   {shared:>9.1f} s  {once:>5.1f} s  {onload:>5.2f} s  {exchange:>7.2f} s   "
              f"{per_layer:>8.1f} s   {L * per_layer / 60:>8.1f} min")
    print("  (exchange: the main rank receives every other rank's share; the once-on-rank-0 part — similarities "
          "on the gathered sample, routing statistics on the gathered trace — does not shrink with more GPUs)")


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
        print(f"  bytes rank 0 put into collectives per MoE layer: {per_layer / 1e6:.2f} MB "
              f"(formula for a non-main rank: {bytes_formula(T, E, k, d, m, 2) / 1e6:.2f} MB)")
    paper(measured)
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
