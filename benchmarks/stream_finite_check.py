"""Benchmark: what the streamed export's finiteness check of copied tensors costs against the copy.

    python benchmarks/stream_finite_check.py [--root DIR] [--gib 1.0] [--dtype bf16] [--repeats 3]

The streamed export copies an untouched tensor by the kernel (``copy_file_range``) and, since
issue 31, first reads it once to refuse NaN or infinity (:func:`analysis.model.checkpoint.check_finite`,
64 MB chunks). This writes one safetensors file holding ``--gib`` GiB of random values in one
tensor, then times, side by side and alternating, each with the file's pages dropped from the page
cache first (``posix_fadvise(DONTNEED)`` on our own files) and the output fsynced:

* **copy**: the kernel copy of the tensor's bytes to a new file (what the export did before);
* **check+copy**: ``check_finite`` of the tensor, then the same kernel copy;
* **check alone** (warm and cold).

Prints the medians, the ratio check+copy / copy, and ``uptime``'s load (other work on the machine
slows the disk for both sides; compare the ratio, not the seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from moescope.analysis.model import stream_export as stream
    from moescope.analysis.model.checkpoint import check_finite, read_header
    from safetensors.torch import save_file

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n = int(args.gib * 2**30) // torch.empty((), dtype=dtype).element_size()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        src = root / "src.safetensors"
        save_file({"t": torch.randn(n, dtype=torch.float32).to(dtype)}, str(src))
        t = read_header(src)["t"]

        def copy() -> None:
            out = root / "out.bin"
            with open(src, "rb") as s, open(out, "wb") as d:
                stream._copy_range(s.fileno(), d.fileno(), t.start, t.nbytes)
                os.fsync(d.fileno())
            out.unlink()

        def timed(fn, cold: bool = True) -> float:
            if cold:
                drop(src)
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        res: dict[str, list[float]] = {"copy": [], "check+copy": [], "check (cold)": [], "check (warm)": []}
        for _ in range(args.repeats):
            res["copy"].append(timed(copy))
            res["check+copy"].append(timed(lambda: (check_finite(t), copy())))
            res["check (cold)"].append(timed(lambda: check_finite(t)))
            res["check (warm)"].append(timed(lambda: check_finite(t), cold=False))
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    med = {k: statistics.median(v) for k, v in res.items()}
    gb = t.nbytes / 1e9
    print(f"{gb:.2f} GB {args.dtype}, median of {args.repeats}, page cache dropped before each cold run")
    for k, v in med.items():
        print(f"  {k:14s} {v:7.3f} s  ({gb / v:6.2f} GB/s)")
    print(f"  check+copy / copy = {med['check+copy'] / med['copy']:.2f}")
    print(f"  load: {load}")


if __name__ == "__main__":
    main()
