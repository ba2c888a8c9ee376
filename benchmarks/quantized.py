"""Benchmark: quantized checkpoints pruned in their own format.

    python benchmarks/quantized.py [--root DIR] [--layers 4] [--experts 32] [--skip-fp8] [--skip-ratios]

1. **FP8 stream-prune at DeepSeek-V3 width.** A synthetic checkpoint in DeepSeek-V3's published
   FP8 layout (d 7168, routed-expert I 2048, one shared expert, MLA attention at its real shapes,
   every Linear float8_e4m3fn + float32 ``weight_scale_inv`` per 128×128 block, routers bf16,
   score-correction bias float32, ``quantization_config`` as published), ``--experts`` routed
   experts in each of ``--layers`` layers (the real model has 256 × 58; the disk decides) and a
   32,000-token vocabulary (the real 129,280 would add 2.6 GB of bf16 embeddings to both sides).
   Side by side in one run, the page cache dropped for our files before each:

   * **stream**: ``stream_export`` of a drop plan keeping half the experts (the same number in
     every routing group), in a child process; time from the call to the last byte fsynced, the
     child's peak RSS (``wait4``), and its start-up (imports) timed apart;
   * **copy**: ``cp`` of whole source shards adding up to about the kept bytes, then ``sync``;
     its time scaled to exactly the kept bytes.

   Target: stream ≤ 1.5 × copy; peak RSS flat in model size (compare ``--layers 2`` and ``4``).
2. **Export bytes / source bytes against the kept fraction, for every scheme**: the tiny
   fixtures of ``tests/quantized_fixtures.py`` (DeepSeek-V3 FP8, Qwen3-MoE FP8, gpt-oss MXFP4,
   compressed-tensors FP8 and W4A16), uniform drop plans keeping 2, 4 and 6 of 8 experts, and what
   the kept fraction predicts: (bytes outside routed experts + fraction × routed-expert bytes) /
   source bytes. They agree to the byte (router rows follow the plan too).

Prints ``uptime``'s load with the tables: other work on the machine slows the disk for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream_export import cold_copy_seconds, drop_caches, tensor_sizes, timed_child  # noqa: E402  (this folder's benchmark)

D, I, VOCAB, HEADS = 7168, 2048, 32_000, 128
Q_LORA, KV_LORA, ROPE, NOPE, V_HEAD = 1536, 512, 64, 128, 128
GROUPS = 8  # routing groups (DeepSeek-V3: n_group 8)
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def build(folder: Path, layers: int, experts: int) -> None:
    """A DeepSeek-V3-shaped FP8 checkpoint, one shard per decoder layer (random FP8 bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config

    folder.mkdir(parents=True)
    cfg = DeepseekV3Config(hidden_size=D, intermediate_size=18432, moe_intermediate_size=I, num_hidden_layers=layers,
                           first_k_dense_replace=0, n_routed_experts=experts, n_shared_experts=1,
                           num_experts_per_tok=8, n_group=GROUPS, topk_group=4, vocab_size=VOCAB,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=Q_LORA,
                           kv_lora_rank=KV_LORA, qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=V_HEAD,
                           tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = FP8_CONFIG
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 0x7E, (256 * 2**20,), dtype=torch.uint8, generator=g)  # finite e4m3 codes
    pool |= (torch.randint(0, 2, pool.shape, dtype=torch.uint8, generator=g) << 7)  # random signs
    cursor = [0]

    def fp8(rows: int, cols: int) -> dict:
        n = rows * cols
        cursor[0] = (cursor[0] + 7919 * 131) % (pool.numel() - n)
        w = pool[cursor[0]: cursor[0] + n].clone().view(torch.float8_e4m3fn).reshape(rows, cols)
        s = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3
        return {"weight": w, "weight_scale_inv": s}

    def linear(t: dict, name: str, rows: int, cols: int) -> None:
        for k, v in fp8(rows, cols).items():
            t[f"{name}.{k}"] = v

    n_files = layers + 1
    weight_map = {}
    for l in range(layers):
        p = f"model.layers.{l}"
        t = {f"{p}.input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             f"{p}.self_attn.q_a_layernorm.weight": torch.ones(Q_LORA, dtype=torch.bfloat16),
             f"{p}.self_attn.kv_a_layernorm.weight": torch.ones(KV_LORA, dtype=torch.bfloat16),
             f"{p}.mlp.gate.weight": (torch.randn(experts, D, generator=g) * 0.02).to(torch.bfloat16),
             f"{p}.mlp.gate.e_score_correction_bias": torch.randn(experts, generator=g) * 0.01}
        linear(t, f"{p}.self_attn.q_a_proj", Q_LORA, D)
        linear(t, f"{p}.self_attn.q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
        linear(t, f"{p}.self_attn.kv_a_proj_with_mqa", KV_LORA + ROPE, D)
        linear(t, f"{p}.self_attn.kv_b_proj", HEADS * (NOPE + V_HEAD), KV_LORA)
        linear(t, f"{p}.self_attn.o_proj", D, HEADS * V_HEAD)
        for e in [*range(experts), "shared"]:
            m = f"{p}.mlp.experts.{e}" if e != "shared" else f"{p}.mlp.shared_experts"
            linear(t, f"{m}.gate_proj", I, D)
            linear(t, f"{m}.up_proj", I, D)
            linear(t, f"{m}.down_proj", D, I)
        name = f"model-{l + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
        del t
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    t = {"model.embed_tokens.weight": (torch.randn(VOCAB, D, generator=g) * 0.02).to(torch.bfloat16),
         "lm_head.weight": (torch.randn(VOCAB, D, generator=g) * 0.02).to(torch.bfloat16),
         "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    save_file(t, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(t, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def half_plan(source: str, layers: int, experts: int):
    from moescope.analysis.pruning.plan import PruningPlan

    per = experts // GROUPS
    kept = [g * per + i for g in range(GROUPS) for i in range(per // 2)]  # half of every routing group
    return PruningPlan.from_json({"version": 1, "base_model": source,
                                  "layers": {str(l): {"groups": [[e] for e in kept]} for l in range(layers)}})


def child(source: str, out: str) -> None:
    t0 = time.perf_counter()
    from moescope.analysis.model import load_moe
    from moescope.analysis.run.export import stream_export

    load_moe(source, dtype=None, weights=False)  # imports transformers' modelling code (start-up, timed apart)
    startup = time.perf_counter() - t0
    cfg = json.loads((Path(source) / "config.json").read_text())
    plan = half_plan(source, cfg["num_hidden_layers"], cfg["n_routed_experts"])
    t0 = time.perf_counter()
    stream_export(source, out, plan)
    for f in Path(out).iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    print(json.dumps({"seconds": time.perf_counter() - t0, "startup": startup}))


def measure_fp8(root: Path, layers: int, experts: int) -> dict:
    src, out, cp_dir = root / "fp8-src", root / "fp8-out", root / "fp8-cp"
    for p in (src, out, cp_dir):
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run([sys.executable, __file__, "--build", str(src), str(layers), str(experts)], check=True)
    size = sum(tensor_sizes(src))
    try:
        drop_caches([src])
        run = timed_child([sys.executable, __file__, "--child", str(src), str(out)])
        timing = json.loads(run["stdout"].strip().splitlines()[-1])
        kept = sum(tensor_sizes(out))
        dtypes = sorted({v["dtype"] for f in out.glob("*.safetensors") for k, v in _header(f).items()
                         if k != "__metadata__"})
        shutil.rmtree(out)
        cp_s = cold_copy_seconds(src, kept, cp_dir)
    finally:
        for p in (src, out, cp_dir):
            shutil.rmtree(p, ignore_errors=True)
    return {"layers": layers, "experts": experts, "source_bytes": size, "kept_bytes": kept, "out_dtypes": dtypes,
            "stream_s": timing["seconds"], "startup_s": timing["startup"], "copy_s": cp_s,
            "ratio": timing["seconds"] / cp_s, "peak_rss": run["peak"]}


def _header(f: Path) -> dict:
    import struct

    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def ratios(root: Path) -> list[dict]:
    """Export bytes / source bytes against the kept fraction, every scheme's fixture."""
    import re

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import transformers
    from moescope.analysis.model.stream_export import source_tensors
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.export import stream_export
    from quantized_fixtures import LAYOUTS, publish

    transformers.logging.set_verbosity_error()
    rows = []
    for layout in LAYOUTS:
        base = root / layout
        shutil.rmtree(base, ignore_errors=True)
        quantized, _ = publish(layout, base)
        tensors = source_tensors(quantized)
        source = sum(t.nbytes for t in tensors.values())
        layers = [1, 2] if layout.startswith("deepseek") else [0, 1]
        routed = sum(t.nbytes for k, t in tensors.items()
                     if any(f"layers.{l}." in k for l in layers) and re.search(r"\.experts\.", k)
                     or re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", k))
        for keep in ((6, 4) if layout.startswith("deepseek") else (6, 4, 2)):  # ≥ 2 per routing group
            kept = list(range(keep)) if not layout.startswith("deepseek") else \
                [g * 4 + i for g in range(2) for i in range(keep // 2)]
            plan = PruningPlan.from_json({"version": 1, "base_model": str(quantized),
                                          "layers": {str(l): {"groups": [[e] for e in kept]} for l in layers}})
            out = base / f"keep{keep}"
            stream_export(str(quantized), out, plan)
            written = sum(t.nbytes for t in source_tensors(out).values())
            rows.append({"layout": layout, "kept_fraction": keep / 8, "ratio": written / source,
                         "predicted": (source - routed + routed * keep / 8) / source})
        shutil.rmtree(base, ignore_errors=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/moescope-quantized-bench")
    ap.add_argument("--layers", default="2,4", help="comma-separated layer counts (peak RSS flat in size)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer, a multiple of 16")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument("--skip-ratios", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    if not args.skip_fp8:
        rows = [measure_fp8(root, int(n), args.experts) for n in args.layers.split(",")]
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"\nFP8 stream-prune, DeepSeek-V3 width (d {D}, I {I}, {args.experts} routed experts + 1 shared), keeping "
              f"half of every routing group; {os.cpu_count()} CPUs; {load}")
        print(f"{'layers':>6} {'source':>10} {'kept':>10} {'stream s':>9} {'copy s':>8} {'ratio':>6} {'peak RSS':>9} "
              f"{'start-up s':>10}  output dtypes")
        for r in rows:
            print(f"{r['layers']:>6} {r['source_bytes'] / gib:>7.2f}GiB {r['kept_bytes'] / gib:>7.2f}GiB "
                  f"{r['stream_s']:>9.1f} {r['copy_s']:>8.1f} {r['ratio']:>6.2f} {r['peak_rss'] / gib:>6.2f}GiB "
                  f"{r['startup_s']:>10.1f}  {','.join(r['out_dtypes'])}")
    if not args.skip_ratios:
        print("\nexport bytes / source bytes against the kept fraction (tiny fixtures, 2 MoE layers of 8 experts)")
        print(f"{'layout':22} {'kept':>5} {'export/source':>14} {'predicted':>10}")
        for r in ratios(root):
            print(f"{r['layout']:22} {r['kept_fraction']:>5.2f} {r['ratio']:>14.4f} {r['predicted']:>10.4f}")


if __name__ == "__main__":
    main()
