"""Data parallelism under ``torchrun``: who this process is, and the few collectives moescope needs.

One process is the default and needs nothing: :func:`current` returns a world of one whose
collectives return their input. Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment) :func:`init` joins the process group:
gloo for tensors on the CPU (tests, CPU machines), and on GPUs NCCL for CUDA tensors beside gloo
for the small host-side statistics (``"cpu:gloo,cuda:nccl"``, one group, two transports).

Every collective has a timeout (``MOESCOPE_DIST_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT_S`): a rank that dies or cannot be reached ends the run on every other
rank with one :class:`~moescope.analysis.core.errors.MoescopeError` line naming this rank, what it
was doing and why, never a hang. :meth:`World.agree` checks before any work that every rank holds
the same model, data and parameters (by fingerprint).

This module knows nothing of models or data: it moves tensors and byte strings. Tensors are
exchanged as tensors and texts as UTF-8 bytes in uint8 tensors, never pickled.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.core.processes import launched_by_torchrun  # noqa: F401 (torch-free, for the CLI)
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0  # a collective waits this long for the slowest rank (a layer of a big model)
ENV_TIMEOUT = "MOESCOPE_DIST_TIMEOUT"




def timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise MoescopeError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise MoescopeError(f"{ENV_TIMEOUT} must be positive, got {raw!r}")
    return value


@dataclass
class World:
    """This process's place among the ranks, and the collectives (each a no-op for one rank).

    ``bytes_exchanged`` counts the payload this rank contributed to collectives (what
    ``benchmarks/distributed.py`` reports per layer)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "none"
    timeout: float = DEFAULT_TIMEOUT_S
    bytes_exchanged: int = 0
    _what: str = field(default="starting", repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def doing(self, what: str) -> World:
        """Name the work in progress (it appears in the lost-rank line)."""
        self._what = what
        return self

    # ---- collectives ----------------------------------------------------------------------
    def _run(self, op, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return op(*args, **kwargs)
        except MoescopeError:
            raise
        except Exception as err:  # gloo / NCCL raise RuntimeError (or DistBackendError) on a lost peer
            waited = time.monotonic() - t0
            reason = " ".join(str(err).split("\n", 1)[0].split())[:160] or type(err).__name__
            raise MoescopeError(
                f"rank {self.rank} of {self.size}: lost contact with the other ranks while {self._what} "
                f"(after {waited:.0f} s; timeout {self.timeout:.0f} s): {reason}. Finished layers and cells are "
                "in the cache: run the same command again to continue") from None

    def sum(self, t: Tensor) -> Tensor:
        """``Σ_ranks t`` on every rank, in float64 for floating input (the sums behind counts,
        norms and co-activations are exact in float64 up to 2⁵³)."""
        if not self.distributed:
            return t
        out = t.double() if t.is_floating_point() else t.long()
        out = out.contiguous().clone()
        self.bytes_exchanged += out.numel() * out.element_size()
        self._run(torch.distributed.all_reduce, out)
        return out

    def sum_(self, t: Tensor) -> Tensor:
        """``Σ_ranks t`` in place, in ``t``'s own dtype and on its device (gradients: NCCL for CUDA
        tensors, gloo for CPU ones)."""
        if self.distributed:
            self.bytes_exchanged += t.numel() * t.element_size()
            self._run(torch.distributed.all_reduce, t)
        return t

    def gather_rows(self, t: Tensor, to_main: bool = False) -> Tensor | None:
        """The ranks' tensors concatenated along dim 0, in rank order (the rows may differ in number
        between ranks; the other dimensions and the dtype may not): on every rank, or with
        ``to_main`` on the main rank only (None on the others)."""
        if not self.distributed:
            return t
        t = t.contiguous()
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        self._run(torch.distributed.all_gather, counts, n)
        counts = [int(c) for c in counts]
        most = max(counts)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        self.bytes_exchanged += padded.numel() * padded.element_size()
        if to_main:
            parts = [torch.empty_like(padded) for _ in range(self.size)] if self.is_main else None
            self._run(torch.distributed.gather, padded, parts, dst=0)
            if not self.is_main:
                return None
        else:
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            self._run(torch.distributed.all_gather, parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def gather_floats(self, values: list[float]) -> list[float]:
        """Every rank's list of Python floats, concatenated in rank order (exact: float64)."""
        return self.gather_rows(torch.tensor(values, dtype=torch.float64).reshape(-1)).tolist()

    def texts(self, text: str) -> list[str]:
        """Every rank's ``text`` (UTF-8), in rank order."""
        if not self.distributed:
            return [text]
        raw = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        parts = self.gather_rows(raw.reshape(-1, 1))
        sizes = self.gather_rows(torch.tensor([[raw.numel()]], dtype=torch.long)).reshape(-1).tolist()
        out, start = [], 0
        for s in sizes:
            out.append(bytes(parts[start : start + s, 0].tolist()).decode("utf-8"))
            start += s
        return out

    def barrier(self) -> None:
        if self.distributed:
            self._run(torch.distributed.barrier)

    def any(self, flag: bool) -> bool:
        """Whether any rank says ``flag`` (how one rank's failure reaches the others)."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    # ---- checks before any work -----------------------------------------------------------
    def agree(self, **facts: str) -> None:
        """Refuse to start unless every rank holds the same ``facts`` (model, data, parameters:
        their fingerprints). The line names the first rank that differs and in what."""
        if not self.distributed:
            return
        self.doing("comparing model, data and parameters across ranks")
        mine = {k: hashlib.sha256(str(v).encode()).hexdigest()[:16] for k, v in sorted(facts.items())}
        text = ";".join(f"{k}={v}" for k, v in mine.items())
        everyone = self.texts(text)
        for r, other in enumerate(everyone):
            if other == everyone[0]:
                continue
            theirs = dict(kv.split("=", 1) for kv in other.split(";") if "=" in kv)
            first = dict(kv.split("=", 1) for kv in everyone[0].split(";") if "=" in kv)
            differ = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
            raise MoescopeError(f"rank {r} of {self.size} differs from rank 0 in its {', '.join(differ)}: "
                                "every rank must load the same model and data with the same parameters")

    def check_shards(self, n_items: int, what: str = "calibration sequences") -> None:
        """A world larger than the work leaves ranks idle and sums over nothing: refused."""
        if self.size > n_items:
            raise MoescopeError(f"{self.size} ranks but only {n_items} {what}: use at most {n_items} ranks "
                                f"(--nproc / --nproc-per-node) or more {what}")

    # ---- splitting work -------------------------------------------------------------------
    def share(self, n: int, unit: int = 1) -> tuple[int, int]:
        """This rank's contiguous ``[start, stop)`` of ``n`` items, split at multiples of ``unit``
        (a chunk of sequences) where there are at least as many units as ranks, so each rank runs
        the very batches one process would."""
        return share_of(n, self.rank, self.size, unit)

    def mine(self, index: int) -> bool:
        """Round-robin ownership of item ``index`` (grid cells, subsets)."""
        return index % self.size == self.rank


def share_of(n: int, rank: int, size: int, unit: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``n`` items (see :meth:`World.share`)."""
    units = (n + unit - 1) // unit
    if units < size:
        unit, units = 1, n
    lo = units * rank // size
    hi = units * (rank + 1) // size
    return min(n, lo * unit), min(n, hi * unit)


_WORLD = World()


def get_or_compute_meta(cache, kind: str, parts: dict, compute, label: str | None = None) -> dict:
    """``cache.get_or_compute(kind, parts, compute, label).meta`` for a result that is JSON only
    (``compute`` returns ``{"meta": …}``), on every rank of a world: the main rank's cache
    decides, on a miss every rank computes (its collectives need them all) and the main rank
    alone stores; on a hit the main rank sends the stored JSON to the others."""
    import json

    w = current()
    if not w.distributed:
        return cache.get_or_compute(kind, parts, compute, label=label).meta
    w.doing(f"looking up the cache ({kind})")
    entry = cache.get(kind, parts) if w.is_main else None
    if w.any(entry is not None):
        return json.loads(w.texts(json.dumps(entry.meta) if w.is_main else "")[0])
    t0 = time.monotonic()
    meta = compute()["meta"]
    if w.is_main:
        cache.put(kind, parts, meta=meta, label=label, elapsed=time.monotonic() - t0)
    return meta


def get_or_compute_entry(cache, kind: str, parts: dict, compute, label: str | None = None):
    """``cache.get_or_compute(kind, parts, compute, label)`` on every rank of a world: the main
    rank's cache decides, on a miss every rank computes (its collectives need them all) and the
    main rank alone stores; then the other ranks read the stored entry (one machine, or a cache
    folder every rank sees; None where they cannot)."""
    w = current()
    if not w.distributed:
        return cache.get_or_compute(kind, parts, compute, label=label)
    w.doing(f"looking up the cache ({kind})")
    entry = cache.get(kind, parts) if w.is_main else None
    if not w.any(entry is not None):
        t0 = time.monotonic()
        result = compute()
        if w.is_main:
            entry = cache.put(kind, parts, tensors=result.get("tensors"), tables=result.get("tables"),
                              meta=result.get("meta"), label=label, elapsed=time.monotonic() - t0)
    w.doing(f"storing ({kind})")
    w.barrier()
    return entry if w.is_main else cache.get(kind, parts)


def current() -> World:
    """The world this process belongs to (one rank unless :func:`init` joined a group)."""
    return _WORLD


def init(device: str | None = None) -> World:
    """Join the process group torchrun set up (a no-op world of one without torchrun).

    ``device``: the device this rank computes on; ``cuda`` (or none with CUDA present) takes
    ``cuda:LOCAL_RANK`` and adds NCCL. Returns the world, also kept for :func:`current`."""
    global _WORLD
    if not launched_by_torchrun():
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    size = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    limit = timeout_s()
    if dist.is_initialized():
        _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local,
                       backend=str(dist.get_backend()), timeout=limit)
        return _WORLD
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=limit), rank=rank, world_size=size)
    except Exception as err:  # the rendezvous failed: a rank that cannot reach the others
        reason = " ".join(str(err).split("\n", 1)[0].split())[:160]
        raise MoescopeError(f"rank {rank} of {size}: could not join the process group at "
                            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} "
                            f"within {limit:.0f} s: {reason}") from None
    _WORLD = World(rank=rank, size=size, local_rank=local, backend=backend, timeout=limit)
    return _WORLD


def rank_device(device: str | None) -> str | None:
    """The device a rank computes on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    w = current()
    if w.distributed and device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return device


def finish() -> None:
    """Leave the process group (at the end of a command)."""
    global _WORLD
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to leave
            pass
    _WORLD = World()
