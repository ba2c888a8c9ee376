"""Models larger than memory: decoder layers kept on disk by accelerate, and the memory-mapped
checkpoint pages released as they are read."""

from __future__ import annotations

from pathlib import Path

import torch
from moescope.analysis.model.families import FamilySpec
from moescope.analysis.model.view import attr_path


def release_mapped_weights() -> int:
    """Drop this process's resident pages of memory-mapped ``*.safetensors`` files (Linux).

    accelerate reads offloaded weights through memory maps of the checkpoint that stay open;
    every page it touched would otherwise stay counted in the process's RSS. For a mapping with
    no privately modified page (``Anonymous: 0 kB`` in smaps), ``madvise(MADV_DONTNEED)`` only
    unmaps the pages from this process and a later read faults them back in from the page cache
    or the file, so nothing is lost; a mapping with modified pages is left alone. Returns the
    bytes advised."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    regions, current = [], None
    for line in smaps:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            if len(head) >= 6 and head[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, None]
                regions.append(current)
        elif current is not None and line.startswith("Anonymous:"):
            current[2] = int(line.split()[1])
    total = 0
    for start, end, anonymous in regions:
        if anonymous == 0 and libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
            total += end - start
    return total


class PeriodicRelease:
    """A daemon thread calling :func:`release_mapped_weights` every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            release_mapped_weights()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        release_mapped_weights()


def non_layer_modules(config, family: FamilySpec) -> list[str]:
    """Top-level modules besides the decoder layers (embeddings, final norm, rotary, LM head)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = family.layers_path.rsplit(".", 1)[0]
    names = [f"{base}.{n}" for n, _ in attr_path(skeleton, base).named_children() if n != "layers"]
    names += [n for n, _ in skeleton.named_children() if n != base.split(".")[0]]
    return names

