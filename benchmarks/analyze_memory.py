"""Benchmark: peak memory of `moescope analyze` on a model larger than it may hold.

    python benchmarks/analyze_memory.py [--layers 8 --hidden 1024 --intermediate 3584]

Builds a random Mixtral-style model (float32, >= 2 GB of weights by default, vocabulary of the
demo tokenizer), saves it, then runs `moescope analyze MODEL --offload DIR` in a child process
(decoder layers stay on disk; one module's weights are loaded at a time) and prints the child's
peak RSS as a ratio of the weights' size. Target: below 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def build(out: Path, layers: int, hidden: int, intermediate: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out)
    return size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model folder")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        print(build(Path(args.build_only), args.layers, args.hidden, args.intermediate))
        return
    root = Path(tempfile.mkdtemp(prefix="moescope-bench-mem-"))
    try:
        t0 = time.perf_counter()
        # built in a child process: a parent holding the model would make every later fork start
        # with gigabytes resident, and the child's peak RSS would count them
        built = subprocess.run([sys.executable, __file__, "--build-only", str(root / "model"), "--layers",
                                str(args.layers), "--hidden", str(args.hidden), "--intermediate",
                                str(args.intermediate)], capture_output=True, text=True, check=True)
        size = int(built.stdout.strip().splitlines()[-1])
        print(f"synthetic Mixtral: {args.layers} layers, d={args.hidden}, I={args.intermediate}, 8 experts: "
              f"{size / 2**30:.2f} GiB of float32 weights (built and saved in {time.perf_counter() - t0:.0f} s)")
        env = {**os.environ, "MOESCOPE_CACHE": str(root / "cache")}
        cmd = [sys.executable, "-m", "moescope.analysis.run.cli", "analyze", str(root / "model"), "--tokenizer", "demo",
               "--offload", str(root / "offload"), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--metrics", "similarity,weights,routing,activations", "--json"]
        t0 = time.perf_counter()
        out_file, err_file = open(root / "stdout", "w+"), open(root / "stderr", "w+")
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, text=True, env=env,
                                cwd=Path(__file__).parents[1])
        peaks = {"RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def sample() -> None:  # the kernel keeps only the total's high-water mark; sample the parts
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        key, _, value = line.partition(":")
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
                except OSError:
                    pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        elapsed = time.perf_counter() - t0
        out_file.seek(0)
        err_file.seek(0)
        stdout, stderr = out_file.read(), err_file.read()
        if proc.returncode:
            sys.exit(f"analyze failed:\n{stderr[-3000:]}")
        peak = usage.ru_maxrss * 1024  # Linux: KiB
        layers = json.loads(stdout)["layers"]
        print(f"analyze --offload: {len(layers)} MoE layers in {elapsed:.0f} s")
        print(f"peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f} x the weights (target < 0.5)")
        print(f"  of which at most {peaks['RssFile'] / 2**30:.2f} GiB file-backed (page cache of the memory-mapped "
              f"weight files, reclaimable) and at most {peaks['RssAnon'] / 2**30:.2f} GiB anonymous "
              f"= {peaks['RssAnon'] / size:.2f} x the weights")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
