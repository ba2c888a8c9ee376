"""Benchmark: every stage at real model dimensions, against the all-experts floor, in one run.

    python benchmarks/scale.py [--shape qwen3-30b-a3b] [--layers 2] [--samples 4 --seq-len 256]
                               [--experts N] [--device cpu|cuda] [--stages analyze,grid,...]

Builds a randomly initialised model of 1-2 decoder layers at the real dimensions of a released MoE
(bfloat16 on disk, the demo tokenizer's 4,096-token vocabulary), then runs every stage the way a
user would, each in a fresh `moescope` process on an empty cache: ``analyze`` with every metric
family, ``grid``, ``plan`` (enumerate greedy and beam, criterion, merge), ``prune`` (with its
evaluation) and ``eval`` of the exported folder. For each it prints the wall time, the part of it
that is not start-up and loading (a process that only imports and loads the model is timed the
same way), the process's peak RSS, and the floor it is held against:

* the **all-experts pass**: every routed expert of a layer run over the same calibration tokens in
  plain torch (``F.linear``, the model's dtype), timed in its own process. Targets: the similarity
  stage of ``analyze`` at most 1x, the whole ``analyze`` of a layer at most 3x, enumeration
  keeping half the experts (greedy and beam) at most 2x;
* for the drop grid, **experts × the forward of the remaining layers**: Σ_l E_l × (L − l) × one
  decoder layer's forward over the evaluation tokens (measured on the full model, / L).

``--quality`` also runs greedy, beam and exact enumeration on a 16-expert layer of the same shape
and prints how close the searches come to the exact optimum (the search is what changes with E;
scoring is shared).

Shapes (``--shape``): mixtral-8x7b (8 experts, d 4096, I 14336, top-2), qwen3-30b-a3b (128, 2048,
768, top-8), olmoe (64, 2048, 1024, top-8), deepseek-v3 (256 routed in 8 groups, 7168, 2048,
top-8, one shared expert; one layer is 22.5 GB in bfloat16, so use ``--experts`` on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMMON = dict(vocab_size=4096, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0,
               tie_word_embeddings=False)
SHAPES = {
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                           num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
                                           head_dim=128)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                  num_attention_heads=16, num_key_value_heads=16, norm_topk_prob=False)),
    "deepseek-v3": ("DeepseekV3Config", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                             n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                                             n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             first_k_dense_replace=0, num_attention_heads=128,
                                             num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                             head_dim=64)),
}
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def config_for(shape: str, layers: int, experts: int | None):
    import transformers

    cls, kw = SHAPES[shape]
    kw = {**_COMMON, **kw, "num_hidden_layers": layers}
    if experts is not None:
        key = next(k for k in EXPERT_KEYS if k in kw)
        kw[key] = experts
        if "n_group" in kw:  # keep 8 experts per group where the experts divide into groups
            kw["n_group"] = max(1, min(kw["n_group"], experts // 8))
            kw["topk_group"] = max(1, min(kw["topk_group"], kw["n_group"]))
    return getattr(transformers, cls)(**kw)


def build(out: Path, shape: str, layers: int, experts: int | None) -> None:
    """Random weights at the shape's dimensions, saved in bfloat16 with the demo tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config_for(shape, layers, experts)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "demo" / "model" / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": n, "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))


def floor(model_dir: Path, samples: int, seq_len: int, device: str) -> None:
    """Plain-torch reference times, printed as JSON: every routed expert of each MoE layer on the
    layer's calibration inputs, and one full forward of the model (for the per-layer forward)."""
    import torch
    import torch.nn.functional as F
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.capture import LayerStream
    from moescope.analysis.model import load_moe

    model = load_moe(str(model_dir), dtype="bfloat16", device=None if device == "cpu" else device)
    calib = sample_tokens("demo:all", model.tokenizer, samples, seq_len, seed=0)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {"experts_pass": {}, "tokens": calib.input_ids.numel()}
    with torch.no_grad():
        for l, x in LayerStream(model, calib.input_ids).layers():
            if x is None:
                continue
            view = model.layers[l]
            ws = [view.expert_weights(e) for e in range(view.num_experts)]
            best = float("inf")
            for _ in range(2):  # the better of two (the first also warms the kernels)
                sync()
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)
                sync()
                best = min(best, time.perf_counter() - t0)
            out["experts_pass"][str(l)] = best
        ids = calib.input_ids.to(model.hf.device)
        best = float("inf")
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            model.hf(input_ids=ids, use_cache=False)
            sync()
            best = min(best, time.perf_counter() - t0)
        out["forward"] = best
        out["num_hidden_layers"] = model.num_hidden_layers
        out["moe_layers"] = model.moe_layers
        out["num_experts"] = {str(l): n for l, n in model.num_experts().items()}
    print(json.dumps(out))


def _layer_input(model, samples: int, seq_len: int):
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.capture import LayerStream

    calib = sample_tokens("demo:all", model.tokenizer, samples, seq_len, seed=0)
    return next((l, x) for l, x in LayerStream(model, calib.input_ids).layers() if x is not None)


def _best(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(dtype_name: str = "float32", size: int = 2048) -> float:
    """This machine's measured multiply-adds per second of one size³ product (the best of three)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
    a @ b
    return size**3 / _best(lambda: a @ b, 3)


def similarity(model_dir: Path, samples: int, seq_len: int, experts: int | None, store_bytes: int | None) -> None:
    """The similarity stage against the all-experts pass, side by side in one process: the pass
    (every routed expert of the first MoE layer over the calibration tokens, F.linear in the
    model's dtype) and :func:`gram_pass.output_similarities` on those experts' outputs, each the
    better of two; with ``experts``, only the first ``experts`` of the layer (the GEMM-efficiency
    check at many tokens). Prints JSON: the times, each step's seconds and multiply-adds, and this
    machine's float32 GEMM rate measured in the same run."""
    import torch
    import torch.nn.functional as F
    from moescope.analysis.measure import gram_pass as GP
    from moescope.analysis.model import load_moe

    model = load_moe(str(model_dir), dtype="bfloat16")
    l, x = _layer_input(model, samples, seq_len)
    view = model.layers[l]
    E = min(experts or view.num_experts, view.num_experts)
    ws = [view.expert_weights(e) for e in range(E)]
    with torch.no_grad():
        Y = torch.stack([F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down) for w in ws])
        t_pass = _best(lambda: [F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down) for w in ws])
        steps: dict = {}
        store = GP.STORE_BYTES if store_bytes is None else store_bytes
        t_sim = _best(lambda: (steps.clear(), GP.output_similarities(Y, timings=steps, store_bytes=store)))
    _, n, d = Y.shape
    rate = gemm_rate()
    print(json.dumps({"experts": E, "tokens": n, "d": d, "pass_s": t_pass, "similarity_s": t_sim, "steps": steps,
                      "costs": GP.pass_costs(E, n, d, store), "stores": GP.stores_distances(E, n, store),
                      "gemm_fp32_per_s": rate, "pass_macs": 3 * n * d * view.expert_weights(0).gate.shape[0] * E,
                      "load": os.getloadavg()}))


def precision() -> None:
    """The gram pass in float32 against float64 references, on the demo model's real expert
    outputs (its first MoE layer, 8 sequences of 256 tokens): the largest absolute error of each
    measure, printed as JSON."""
    import torch
    from moescope.analysis.measure import gram_pass as GP
    from moescope.analysis.measure import metrics as M
    from moescope.analysis.model import load_moe

    model = load_moe("demo", dtype="float32")
    l, x = _layer_input(model, 8, 256)
    view = model.layers[l]
    with torch.no_grad():
        Y = torch.stack([view.expert_forward(e, x) for e in range(view.num_experts)]).float()
    got = GP.output_similarities(Y)
    Y64 = Y.double()
    refs = {"cka_linear": M.linear_cka_matrix(Y64), "cka_rbf": M.rbf_cka_matrix(Y64),
            "cka_rbf_minibatch": M.rbf_cka_minibatch_matrix(Y64), "cosine": M.output_cosine_matrix(Y64),
            "mse": M.output_mse_matrix(Y64)}
    print(json.dumps({"layer": l, "shape": list(Y.shape),
                      "max_abs_error": {k: float((got[k].double() - v.double()).abs().max()) for k, v in refs.items()},
                      "mse_scale": float(refs["mse"].abs().max())}))


def load_only(model_dir: Path, device: str) -> None:
    from moescope.analysis.model import load_moe

    load_moe(str(model_dir), dtype="bfloat16", device=None if device == "cpu" else device)


def run_child(argv: list[str], env: dict, log: Path) -> dict:
    """Run one process; its wall time, peak RSS (its own, via wait4) and stdout."""
    t0 = time.perf_counter()
    with open(log, "w+") as err, open(log.with_suffix(".out"), "w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc:
        sys.exit(f"{' '.join(argv[:6])} … failed (exit {rc}):\n{stderr[-3000:]}")
    return {"wall": wall, "peak": usage.ru_maxrss * 1024, "stdout": stdout}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default: the shape's)")
    ap.add_argument("--samples", type=int, default=4, help="calibration / evaluation windows (default 4)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep", type=int, default=None, help="experts kept by the plans (default: half)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every stage and the floor)")
    ap.add_argument("--stages", default="similarity,analyze,grid,greedy,beam,criterion,merge,prune,eval")
    ap.add_argument("--eff-experts", type=int, default=16,
                    help="experts of the layer in the 8,192-token GEMM-efficiency check (stage similarity)")
    ap.add_argument("--quality", action="store_true", help="also greedy/beam vs exact enumeration on 16 experts")
    ap.add_argument("--model", default=None, help="reuse a model folder built before (--keep-model)")
    ap.add_argument("--keep-model", default=None, metavar="DIR", help="build the model into DIR and keep it")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "build":
            build(Path(rest[0]), args.shape, args.layers, args.experts)
        elif what == "floor":
            floor(Path(rest[0]), args.samples, args.seq_len, args.device)
        elif what == "load":
            load_only(Path(rest[0]), args.device)
        elif what == "quality":
            quality(args)
        elif what == "similarity":
            similarity(Path(rest[0]), args.samples, args.seq_len, int(rest[1]) if len(rest) > 1 else None,
                       int(rest[2]) if len(rest) > 2 else None)
        elif what == "precision":
            precision()
        return

    root = Path(tempfile.mkdtemp(prefix="moescope-scale-"))
    env = {**os.environ, "MOESCOPE_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, __file__, "--shape", args.shape, "--layers", str(args.layers), "--samples",
          str(args.samples), "--seq-len", str(args.seq_len), "--device", args.device]
    if args.experts:
        me += ["--experts", str(args.experts)]
    rows: list[dict] = []
    try:
        import torch

        threads = torch.get_num_threads()
        model_dir = Path(args.model) if args.model else Path(args.keep_model or root / "model")
        t0 = time.perf_counter()
        if not args.model:
            built = run_child(me + ["--child", "build", str(model_dir)], env, root / "build.log")
            size = json.loads(built["stdout"].strip().splitlines()[-1])
            print(f"{args.shape}: {args.layers} layers, {size['parameters'] / 1e9:.2f} B parameters, "
                  f"{gib(size['bytes'])} in bfloat16 (built in {time.perf_counter() - t0:.0f} s); "
                  f"{args.samples}x{args.seq_len} tokens; device {args.device}; torch threads {threads}",
                  flush=True)
        fl = json.loads(run_child(me + ["--child", "floor", str(model_dir)], env, root / "floor.log")["stdout"]
                        .strip().splitlines()[-1])
        moe = [str(l) for l in fl["moe_layers"]]
        per_layer_pass = sum(fl["experts_pass"].values()) / len(moe)
        L = fl["num_hidden_layers"]
        layer_fwd = fl["forward"] / L
        grid_bound = sum(fl["num_experts"][l] * (L - int(l)) * layer_fwd for l in moe)
        print(f"floor: all-experts pass {per_layer_pass:.2f} s per MoE layer ({fl['tokens']} tokens); "
              f"model forward {fl['forward']:.2f} s ({layer_fwd:.2f} s per layer); drop-grid bound "
              f"{grid_bound:.1f} s", flush=True)
        load = run_child(me + ["--child", "load", str(model_dir)], env, root / "load.log")
        print(f"start-up + load (a process that only loads the model): {load['wall']:.1f} s, peak {gib(load['peak'])}",
              flush=True)
        rows.append({"stage": "start-up + load", "wall": load["wall"], "work": None, "peak": load["peak"],
                     "floor": None, "target": None})

        E = min(fl["num_experts"].values())
        keep = args.keep or E // 2
        data = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        common = ["--dtype", "bfloat16", "--device", args.device]
        cli = [sys.executable, "-m", "moescope.analysis.run.cli"]
        plans = root / "plans"
        plans.mkdir()
        n_moe = len(moe)
        stages = {
            "analyze": (["analyze", str(model_dir), "--calib", "demo:all", *data, "--metrics", "all", *common,
                         "--json"], n_moe * per_layer_pass, 3.0),
            "grid": (["grid", str(model_dir), "--eval", "demo:all", *data, *common, "--json"], grid_bound, 1.0),
            "greedy": (["plan", str(model_dir), "--strategy", "enumerate", "--method", "greedy", "--keep", str(keep),
                        *data, *common, "-o", str(plans / "greedy.json")], n_moe * per_layer_pass, 2.0),
            "beam": (["plan", str(model_dir), "--strategy", "enumerate", "--method", "beam", "--keep", str(keep),
                      *data, *common, "-o", str(plans / "beam.json")], n_moe * per_layer_pass, 2.0),
            "criterion": (["plan", str(model_dir), "--strategy", "criterion", "--criterion", "REAP", "--keep",
                           str(keep), *data, *common, "-o", str(plans / "criterion.json")], None, None),
            "merge": (["plan", str(model_dir), "--strategy", "merge", "--keep", str(keep), *data, *common,
                       "-o", str(plans / "merge.json")], None, None),
            "prune": (["prune", str(model_dir), "--plan", str(plans / "greedy.json"), "-o", str(root / "pruned"),
                       "--dtype", "bfloat16", "--ppl", "demo:all", *data, "--no-efficiency"], None, None),
            "eval": (["eval", str(root / "pruned"), "--ppl", "demo:all", *data, "--no-efficiency", *common],
                     None, None),
        }
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        if "similarity" in wanted:
            wanted.remove("similarity")
            similarity_stage(me, model_dir, env, root, args)
        for s in wanted:
            if s not in stages:
                sys.exit(f"unknown stage '{s}'; accepted: {', '.join(stages)}")
        for s in wanted:
            argv, fl_s, target = stages[s]
            r = run_child(cli + argv, env, root / f"{s}.log")
            work = max(0.0, r["wall"] - load["wall"])
            row = {"stage": s, "wall": r["wall"], "work": work, "peak": r["peak"], "floor": fl_s, "target": target}
            rows.append(row)
            print(line(row), flush=True)
            if s == "analyze":
                dry = json.loads(run_child(cli + argv[:-1] + ["--dry-run", "--json"], env, root / "dry.log")["stdout"])
                predicted = dry["predicted_seconds"]
                for sub in analyze_parts(root / "cache"):
                    sub["floor"] = n_moe * per_layer_pass
                    family = sub["stage"].split(": ")[1]
                    sub["predicted"] = predicted.get(family)
                    rows.append(sub)
                    print(line(sub) + (f"  predicted >= {sub['predicted']:.1f} s (dry-run)"
                                       if sub["predicted"] is not None else ""), flush=True)
                print(f"  analyze --dry-run predicted at least {dry['total_seconds']:.1f} s in all "
                      f"(capture {predicted.get('capture', 0):.1f} s) and {gib(dry['total_bytes'])} at the peak",
                      flush=True)
        if args.quality:
            q = run_child(me + ["--child", "quality", str(model_dir)], env, root / "quality.log")
            print(q["stdout"].strip())
        print()
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": args.layers, "floor": fl,
                                                   "rows": rows}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def similarity_stage(me: list[str], model_dir: Path, env: dict, root: Path, args) -> None:
    """The similarity targets, each side by side in one process: every default measure against the
    all-experts pass (at --samples x --seq-len tokens, target <= 1x); each step's share of this
    machine's float32 GEMM rate at 8,192 tokens (--eff-experts of the layer, the tiles built twice as
    for a model whose distances do not fit, target >= 50 %); the float32 error against float64
    references on the demo model's outputs."""
    r = json.loads(run_child(me + ["--child", "similarity", str(model_dir)], env, root / "sim.log")["stdout"]
                   .strip().splitlines()[-1])
    print(f"similarity, every default measure, {r['experts']} experts x {r['tokens']} tokens: gram pass "
          f"{r['similarity_s']:.2f} s, all-experts pass {r['pass_s']:.2f} s: {r['similarity_s'] / r['pass_s']:.2f}x "
          f"(target <= 1x); steps {', '.join(f'{k} {v:.2f} s' for k, v in r['steps'].items())}; load "
          f"{r['load'][0]:.2f}", flush=True)
    eff = [sys.executable, __file__, "--shape", args.shape, "--layers", str(args.layers), "--samples", "32",
           "--seq-len", "256", "--device", args.device, "--child", "similarity", str(model_dir), str(args.eff_experts),
           "0"]
    r = json.loads(run_child(eff, env, root / "eff.log")["stdout"].strip().splitlines()[-1])
    c, st, rate = r["costs"], r["steps"], r["gemm_fp32_per_s"]
    measures = {  # the step(s) each measure's own multiply-adds run in
        "linear CKA (tiles: Grams + Frobenius products)": (c["grams"] / 2 + c["linear_frobenius"], st["tiles"]),
        "RBF CKA (tiles again + Frobenius products; median by selection)":
            (c["grams"] / 2 + c["rbf_frobenius"], st["rbf"] + st["bandwidths"]),
        "cosine + MSE (one per-token product)": (c["token_products"], st["token_products"]),
    }
    print(f"at {r['tokens']} tokens, {r['experts']} experts, d {r['d']}: float32 GEMM {rate / 1e9:.1f} G multiply-adds/s "
          f"(2048^3, same run); load {r['load'][0]:.2f}")
    for name, (macs, secs) in measures.items():
        print(f"  {name}: {macs:.3g} multiply-adds in {secs:.2f} s = {macs / secs / 1e9:.1f} G/s, "
              f"{100 * macs / secs / rate:.0f} % of GEMM (target >= 50 %)")
    print(f"  mini-batch RBF CKA (read off the tiles): {st['minibatch']:.2f} s")
    r = json.loads(run_child(me + ["--child", "precision"], env, root / "precision.log")["stdout"].strip()
                   .splitlines()[-1])
    print(f"float32 gram pass against float64 references, demo layer {r['layer']} outputs {r['shape']}: max abs error "
          + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_error"].items()) + f" (MSE values up to {r['mse_scale']:.3g})",
          flush=True)


def analyze_parts(cache_dir: Path) -> list[dict]:
    """The analysis's own per-stage timings (summed over layers), read from the stored meta."""
    metas = [json.loads(p.read_text()) for p in cache_dir.rglob("meta.json")]
    metas = [m for m in metas if m.get("kind") == "analysis" or "layers" in m.get("meta", m)]
    if not metas:
        return []
    meta = metas[0].get("meta", metas[0])
    parts: dict[str, float] = {}
    for lay in meta["layers"].values():
        for k, v in lay["timings"].items():
            parts[k] = parts.get(k, 0.0) + v
    rows = []
    for k in ("expert_outputs", "similarity", "similarity_rbf", "weights", "routing", "activations", "total"):
        if k in parts:
            target = {"similarity": 1.0, "total": 3.0}.get(k)
            rows.append({"stage": f"  analyze: {k}", "wall": None, "work": parts[k], "peak": None, "floor": None,
                         "target": target})
    if meta.get("timings", {}).get("gradients_s"):
        rows.append({"stage": "  analyze: gradients", "wall": None, "work": meta["timings"]["gradients_s"],
                     "peak": None, "floor": None, "target": None})
    return rows


def line(r: dict) -> str:
    ratio = f"{r['work'] / r['floor']:.2f}x" if r.get("floor") and r.get("work") is not None else ""
    target = f"(target <= {r['target']:g}x)" if r.get("target") and ratio else ""
    wall = f"{r['wall']:.1f} s" if r.get("wall") is not None else ""
    peak = gib(r["peak"]) if r.get("peak") else ""
    return f"{r['stage']:<26} {wall:>9} {r['work'] or 0:>9.1f} s {peak:>10} {ratio:>8} {target}"


def table(rows: list[dict]) -> str:
    def num(v, fmt="{:.1f}"):
        return "" if v is None else fmt.format(v)

    out = ["| stage | wall (s) | work (s) | peak RSS | floor (s) | work / floor | target |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['work'] / r['floor']:.2f}×" if r.get("floor") and r.get("work") is not None else ""
        target = f"≤ {r['target']:g}×" if r.get("target") else ""
        peak = gib(r["peak"]) if r.get("peak") else ""
        out.append(f"| {r['stage'].strip()} | {num(r['wall'])} | {num(r['work'])} | {peak} | "
                   f"{num(r.get('floor'))} | {ratio} | {target} |")
    return "\n".join(out)


def quality(args) -> None:
    """Greedy and beam against exact enumeration on layers of 16 experts (this shape's d, I, top-k;
    four random initialisations, keeping 12 and 8)."""
    import torch
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.measure.capture import LayerStream
    from moescope.analysis.measure.sensitivity import SubsetScorer, enumerate_layer
    from moescope.analysis.model import load_moe, wrap_model
    from transformers import AutoModelForCausalLM

    tok = load_moe("demo").tokenizer
    cfg = config_for(args.shape, 1, 16)
    keeps = [12, 8]
    found = {"greedy": 0, "beam": 0}
    ratios: dict[str, list[float]] = {"greedy": [], "beam": []}
    trials = 0
    for seed in range(4):
        torch.manual_seed(seed)
        model = wrap_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tokenizer=tok,
                           source=f"random-{args.shape}-16-seed{seed}")
        calib = sample_tokens("demo:all", tok, 2, 128, seed=seed)
        x = next(h for _, h in LayerStream(model, calib.input_ids).layers() if h is not None)
        view = model.layers[model.moe_layers[0]]
        scorer = SubsetScorer(view, x)
        for k in keeps:
            exact = enumerate_layer(view, x, k, "exact", max_subsets=10**6, scorer=scorer)
            for m in ("greedy", "beam"):
                r = enumerate_layer(view, x, k, m, scorer=scorer)
                found[m] += r.keep == exact.keep
                ratios[m].append(r.loss / exact.loss)
            trials += 1
    for m in ("greedy", "beam"):
        rs = sorted(ratios[m])
        print(f"{m} vs exact on 16-expert layers ({trials} searches, keep 12 and 8): exact optimum found "
              f"{found[m]}/{trials}; loss / optimum median {rs[len(rs) // 2]:.4f}, worst {rs[-1]:.4f}")


if __name__ == "__main__":
    main()
