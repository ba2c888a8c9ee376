"""Benchmark: a plan applied to a checkpoint shard by shard against a plain copy of the kept bytes.

    python benchmarks/stream_export.py [--root DIR] [--cases small,big] [--keep 48] [--big-gib 25.5]

Builds synthetic checkpoints shard by shard at Qwen3-30B-A3B's real dimensions (128 routed
experts × d 2048 × I 768, top-8, vocabulary 151,936, random bfloat16, hub layout: one tensor per
expert matrix, one shard per decoder layer), then for each case, side by side in one run:

* **stream**: ``moescope.analysis.run.export.stream_export`` of a uniform drop plan (``--keep``
  experts of 128 in every layer, spread over the experts), checkpoint dtypes kept, in a child
  process; time from the call to the last output byte on disk (``fsync``), and the child's peak
  RSS (``wait4`` → ``ru_maxrss``). The child's start-up (importing torch and transformers'
  modelling code, 5-15 s on a busy machine, the same for any model size) is timed apart;
* **copy**: ``cp`` of whole source shards adding up to about the kept bytes, to the same disk, then
  ``sync`` of the copies; its time is scaled to exactly the kept bytes (bytes/s × kept).

The ``many`` case measures the per-tensor cost: ``--many-layers`` layers (default 80) × 128 experts
at tiny dimensions (d 64, I 32; 4 KiB per tensor), ≥ 30k tensors in ~0.1 GiB, one shard per layer:
its time is all Python, not disk. The ``tenk`` case is the real dimensions with ≥ 10k tensors
(``--tenk-layers``, default 28 layers: 11,007 tensors, 18.5 GiB; 48 of Qwen3-30B-A3B's layers hold
18,867). Every case prints the export's wall time beside its CPU time
(user + system of the exporting process, start-up excluded) and the CPU time per source tensor;
``--baseline DIR`` (another checkout, e.g. ``git archive BASE analysis | tar -x -C DIR``) runs the
same export with that checkout's ``analysis/`` right after ours, on the same source, so the two
per-tensor costs are measured side by side under the same load.

Before each measurement the source's pages are flushed and dropped from the page cache
(``posix_fadvise(DONTNEED)`` on our own files only), so both read from disk. Targets: stream time
≤ 1.5 × copy time; peak RSS ≤ 2 × the largest single tensor + 2 GiB. Cases: ``small`` (4 layers,
~6 GB) and ``big`` (``--big-gib`` GiB of weights, more than this machine's RAM). Each case's files
are deleted once it is measured; the script holds at most source + output on disk at a time.
Prints ``uptime``'s load with the table (other work on the machine slows the disk for both sides).
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

D, I, E, TOP_K, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2048, 768, 128, 8, 151_936, 32, 4, 128
BYTES = 2  # bfloat16


def layer_bytes() -> int:
    experts = E * 3 * I * D
    attn = HEADS * HEAD_DIM * D * 2 + KV_HEADS * HEAD_DIM * D * 2 + 2 * HEAD_DIM
    return (experts + attn + E * D + 2 * D) * BYTES


def embed_bytes() -> int:
    return (2 * VOCAB * D + D) * BYTES


def build(folder: Path, layers: int) -> None:
    """A Qwen3-MoE checkpoint of ``layers`` decoder layers, written one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    folder.mkdir(parents=True)
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, intermediate_size=6144, num_experts=E,
                         num_experts_per_tok=TOP_K, num_hidden_layers=layers, vocab_size=VOCAB,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         norm_topk_prob=True, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 * 2**20, generator=g) * 0.02).to(torch.bfloat16)  # 128 MB of random values

    cursor = [0]

    def rnd(*shape):  # distinct slices of the pool, so tensors differ
        n = 1
        for s in shape:
            n *= s
        if n > pool.numel() // 2:  # the embeddings: the pool, repeated
            return pool.repeat(-(-n // pool.numel()))[:n].reshape(shape)
        cursor[0] = (cursor[0] + 7919 * 131) % (pool.numel() - n)
        return pool[cursor[0]: cursor[0] + n].reshape(shape).clone()

    n_files = layers + 1
    weight_map = {}
    for l in range(layers):
        p = f"model.layers.{l}"
        t = {f"{p}.input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
             f"{p}.self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, D),
             f"{p}.self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, D),
             f"{p}.self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, D),
             f"{p}.self_attn.o_proj.weight": rnd(D, HEADS * HEAD_DIM),
             f"{p}.self_attn.q_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
             f"{p}.self_attn.k_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
             f"{p}.mlp.gate.weight": rnd(E, D)}
        for e in range(E):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rnd(I, D)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rnd(I, D)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rnd(D, I)
        name = f"model-{l + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
        del t
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    t = {"model.embed_tokens.weight": rnd(VOCAB, D), "lm_head.weight": rnd(VOCAB, D),
         "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    save_file(t, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(t, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_many(folder: Path, layers: int) -> None:
    """A Qwen3-MoE checkpoint at tiny dimensions with many tensors: ``layers`` × (128 experts × 3 + 9)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    d, i = 64, 32
    folder.mkdir(parents=True)
    Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=i, intermediate_size=128, num_experts=E,
                   num_experts_per_tok=TOP_K, num_hidden_layers=layers, vocab_size=512, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}
    for l in range(layers + 1):
        p = f"model.layers.{l}"
        if l == layers:
            t = {"model.embed_tokens.weight": rnd(512, d), "lm_head.weight": rnd(512, d),
                 "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
        else:
            t = {f"{p}.input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 f"{p}.post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 f"{p}.self_attn.q_proj.weight": rnd(64, d), f"{p}.self_attn.k_proj.weight": rnd(32, d),
                 f"{p}.self_attn.v_proj.weight": rnd(32, d), f"{p}.self_attn.o_proj.weight": rnd(d, 64),
                 f"{p}.self_attn.q_norm.weight": torch.ones(16, dtype=torch.bfloat16),
                 f"{p}.self_attn.k_norm.weight": torch.ones(16, dtype=torch.bfloat16),
                 f"{p}.mlp.gate.weight": rnd(E, d)}
            for e in range(E):
                for proj, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
                    t[f"{p}.mlp.experts.{e}.{proj}.weight"] = rnd(*shape)
        name = f"model-{l + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_caches(paths) -> None:
    """Flush our files and drop their pages from the page cache (nobody else's)."""
    for p in paths:
        for f in ([p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_copy_seconds(src: Path, kept: int, cp_dir: Path) -> float:
    """Seconds ``cp`` takes for ``kept`` bytes of ``src``'s shards, page cache dropped first and the
    copies synced to disk: whole shards are copied until at least ``kept`` bytes are, and the time is
    scaled to ``kept``."""
    chosen, total = [], 0
    for f in sorted(src.glob("model-*.safetensors")):
        if total >= kept:
            break
        chosen.append(f)
        total += f.stat().st_size
    drop_caches([src])
    cp_dir.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, chosen), str(cp_dir)], check=True)
    subprocess.run(["sync", "-f", str(cp_dir)], check=True)
    for f in cp_dir.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return (time.perf_counter() - t0) * kept / total


def timed_child(argv: list[str], env=None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed ({status}):\n{out[-2000:]}")
    return {"wall": wall, "peak": usage.ru_maxrss * 1024, "stdout": out}


def child(source: str, out: str, keep: int) -> None:
    """Run in a fresh process: the streamed export, then fsync of what it wrote."""
    t0 = time.perf_counter()
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.export import stream_export

    load_moe(source, dtype=None, weights=False)  # imports transformers' modelling code (start-up, timed apart)
    startup = time.perf_counter() - t0
    cfg = json.loads((Path(source) / "config.json").read_text())
    layers, experts = cfg["num_hidden_layers"], cfg.get("num_experts") or cfg["num_local_experts"]
    step = experts / keep
    kept = sorted({int(i * step) for i in range(keep)})
    plan = PruningPlan.from_json({"version": 1, "base_model": source,
                                  "layers": {str(l): {"groups": [[e] for e in kept]} for l in range(layers)}})
    t0, c0 = time.perf_counter(), time.process_time()
    stream_export(source, out, plan, dtype=None)
    for f in Path(out).iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "startup": startup}))


def tensor_sizes(folder: Path) -> list[int]:
    """Bytes of every tensor in the folder's safetensors (headers only; this process never imports
    torch, so the children it forks start small and their peak RSS is their own)."""
    import struct

    out = []
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out += [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
    return out


def digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}


def measure(root: Path, name: str, layers: int, keep: int, baseline: str | None = None) -> dict:
    src, out, cp_dir = root / f"{name}-src", root / f"{name}-out", root / f"{name}-cp"
    for p in (src, out, cp_dir):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-many" if name == "many" else "--build", str(src), str(layers)],
                   check=True)
    built_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = max(tensor_sizes(src))
    try:
        drop_caches([src])
        run = timed_child([sys.executable, __file__, "--child", str(src), str(out), str(keep)])
        timing = json.loads(run["stdout"].strip().splitlines()[-1])
        stream_s, startup_s, cpu_s = timing["seconds"], timing["startup"], timing["cpu"]
        base_cpu = base_s = None
        same = None
        if baseline:  # the same export by the other checkout's code, on the same source, right after
            ours = digests(out)
            shutil.rmtree(out)
            drop_caches([src])
            shim = root / "baseline-code" / "moescope"
            shim.mkdir(parents=True, exist_ok=True)
            for part in ("analysis", "dashboard"):
                if not (shim / part).exists():
                    (shim / part).symlink_to(Path(baseline).absolute() / part)
            env = {**os.environ, "PYTHONPATH": str(shim.parent)}
            base = timed_child([sys.executable, __file__, "--child", str(src), str(out), str(keep)], env)
            base_timing = json.loads(base["stdout"].strip().splitlines()[-1])
            base_s, base_cpu = base_timing["seconds"], base_timing["cpu"]
            same = digests(out) == ours
        kept = sum(tensor_sizes(out))
        n_tensors = len(tensor_sizes(src))
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        shutil.rmtree(out)  # free the disk before the copy
        cp_s = cold_copy_seconds(src, kept, cp_dir)
    finally:
        for p in (src, out, cp_dir):
            shutil.rmtree(p, ignore_errors=True)
    return {"case": name, "layers": layers, "model_bytes": size, "kept_bytes": kept, "out_file_bytes": out_bytes,
            "stream_s": stream_s, "cpu_s": cpu_s, "tensors": n_tensors, "baseline_s": base_s, "baseline_cpu_s": base_cpu,
            "same_bytes_as_baseline": same,
            "startup_s": startup_s, "stream_wall_s": run["wall"], "copy_s": cp_s, "ratio": stream_s / cp_s,
            "peak_rss": run["peak"], "largest_tensor": largest, "build_s": built_s}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build-many":
        build_many(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/moescope-stream-bench")
    ap.add_argument("--cases", default="small,big")
    ap.add_argument("--keep", type=int, default=48, help="experts kept of 128 in every layer (default 48)")
    ap.add_argument("--many-layers", type=int, default=80, help="layers of the many case (default 80)")
    ap.add_argument("--tenk-layers", type=int, default=28,
                    help="layers of the tenk case at the real dimensions (default 28: 11,007 tensors, 18.5 GiB)")
    ap.add_argument("--baseline", help="another checkout whose analysis/ also runs each export, for comparison")
    ap.add_argument("--big-gib", type=float, default=25.5, help="weights of the big case in GiB (default 25.5)")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for case in args.cases.split(","):
        layers = {"small": 4, "tenk": args.tenk_layers, "many": args.many_layers}.get(case)
        if layers is None and case != "big":
            sys.exit(f"unknown case '{case}'; accepted: small, tenk, big, many")
        layers = layers or int((args.big_gib * gib - embed_bytes()) // layer_bytes()) + 1
        rows.append(measure(root, case, layers, args.keep, args.baseline))
        print(json.dumps(rows[-1]), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nQwen3-30B-A3B dimensions (128 experts × d {D} × I {I}, bf16), keeping {args.keep}/128 experts per "
          f"layer; machine RAM {ram / gib:.1f} GiB, {os.cpu_count()} CPUs; {load}")
    print(f"{'case':6} {'layers':>6} {'model':>10} {'kept':>10} {'stream s':>9} {'copy s':>8} {'ratio':>6} "
          f"{'peak RSS':>9} {'2×largest+2GiB':>15} {'start-up s':>10} {'CPU s':>7} {'tensors':>8} {'CPU/tensor':>10}"
          + (f" {'baseline: stream s':>18} {'CPU s':>7} {'CPU/tensor':>10} {'same bytes':>10}" if args.baseline else ""))
    for r in rows:
        bound = 2 * r["largest_tensor"] + 2 * gib
        print(f"{r['case']:6} {r['layers']:>6} {r['model_bytes'] / gib:>7.2f}GiB {r['kept_bytes'] / gib:>7.2f}GiB "
              f"{r['stream_s']:>9.1f} {r['copy_s']:>8.1f} {r['ratio']:>6.2f} {r['peak_rss'] / gib:>6.2f}GiB "
              f"{bound / gib:>12.2f}GiB {r['startup_s']:>10.1f} {r['cpu_s']:>7.2f} {r['tensors']:>8,} "
              f"{1e3 * r['cpu_s'] / r['tensors']:>8.3f}ms"
              + (f" {r['baseline_s']:>18.1f} {r['baseline_cpu_s']:>7.2f} {1e3 * r['baseline_cpu_s'] / r['tensors']:>8.3f}ms "
                 f"{str(r['same_bytes_as_baseline']):>10}" if args.baseline else ""))


if __name__ == "__main__":
    main()
