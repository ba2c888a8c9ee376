"""One MoE layer's statistics when the calibration tokens are split over ranks (data parallelism).

Each rank holds the block input ``x_r [T_r, d]`` of its contiguous share of the calibration
sequences (rank order = token order). What a one-process analysis computes from all T tokens is
rebuilt here from the shares, so the stored analysis is the one-process one:

- **Routing traces** (top-k indices and weights, router logits ``[T_r, E]``) are gathered: every
  routing statistic (usage, co-activation, vocabulary coverage, β's median, logit similarities,
  ETS's token overlaps) is then computed once on the whole trace, exactly as in one process.
- **The seeded token sample** of the output similarities is drawn over the global T with the
  one-process generator; each rank sends the sampled block inputs it holds and every rank runs
  every expert on them in the one-process order (gathering inputs, not outputs: E times fewer
  bytes, 8.6 GB → 67 MB per layer for Qwen3-235B's 128 experts at 8192 sampled tokens). The
  exact RBF CKA on them, the costliest similarity, is then spread: bandwidths by expert, Gram row
  blocks round-robin, their float64 sums reduced.
- **Sums** are reduced in float64: HC-SMoE's mean expert outputs, and per expert the sums behind
  EAN (``Σ_t A_tj²`` per hidden unit), EAN-mean and REAP (norm and weighted-norm sums), EAE
  and EAO (the per-unit mean and deviation, then the outlier count against them: three
  reductions per expert, as a one-process run takes mean, deviation and count on all rows),
  ETS-cosine (``Σ x̂``) and EAS (``Σ â``).
"""

from __future__ import annotations

import torch
from moescope.analysis.core.distributed import World, share_of
from moescope.analysis.measure import metrics as M
from torch import Tensor


def token_ranges(n_seq: int, seq_len: int, world: World, unit: int) -> list[tuple[int, int]]:
    """Every rank's ``[start, stop)`` of the flattened calibration tokens."""
    out = []
    for r in range(world.size):
        lo, hi = share_of(n_seq, r, world.size, unit)
        out.append((lo * seq_len, hi * seq_len))
    return out


def gather_routing(r, world: World):
    """The whole calibration batch's :class:`Routing` from each rank's share, on the main rank (on
    the CPU; None on the others)."""
    from moescope.analysis.model.view import Routing

    world.doing("gathering routing traces")
    parts = [world.gather_rows(t, to_main=True)
             for t in (r.logits.float().cpu(), r.topk_idx.cpu(), r.topk_weights.float().cpu())]
    return Routing(*parts) if world.is_main else None


def sample_outputs(view, x: Tensor, sel: Tensor, ranges: list[tuple[int, int]], world: World) -> Tensor | None:
    """``Y [E, n, d]`` every expert's output on the sampled global token indices ``sel [n]``, on
    every rank: each rank sends the sampled block inputs it holds (``n_r × d``, E times fewer bytes
    than their outputs), and every rank puts them in ``sel``'s order and runs every expert on them,
    exactly as one process does (the ranks then share the RBF CKA's blocks)."""
    world.doing("gathering the sampled tokens")
    lo, _ = ranges[world.rank]
    owner = torch.zeros(len(sel), dtype=torch.long)
    for r, (a, b) in enumerate(ranges):
        owner[(sel >= a) & (sel < b)] = r
    here = (owner == world.rank).nonzero().flatten()
    rows = world.gather_rows(x[(sel[here] - lo).to(x.device)].cpu())  # [n, d] in rank order
    order = torch.cat([(owner == r).nonzero().flatten() for r in range(world.size)])
    xs = torch.empty(len(sel), x.shape[1], dtype=x.dtype)
    xs[order] = rows
    xs = xs.to(x.device)
    E = view.num_experts
    Y = torch.empty(E, len(sel), x.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        Y[e] = view.expert_forward(e, xs)
    return Y


def mean_outputs(view, x: Tensor, T: int, world: World) -> Tensor:
    """HC-SMoE's ``[E, d]`` mean expert outputs over all T tokens (float64 sums reduced)."""
    world.doing("reducing mean expert outputs")
    E, d = view.num_experts, x.shape[1]
    b = M._rows_per_chunk(d * 8, max(1, x.shape[0]))
    out = torch.zeros(E, d, dtype=torch.float64)
    for e in range(E):
        for t0 in range(0, x.shape[0], b):
            out[e] += view.expert_forward(e, x[t0 : t0 + b]).double().sum(0).cpu()
    return (world.sum(out) / max(T, 1)).float()


def routed_statistics(view, x: Tensor, r, world: World) -> dict[str, Tensor]:
    """The per-expert statistics of :attr:`LayerStats.routed` over every rank's routed tokens
    (``r``: this rank's local routing). Same names, shapes and NaN rules."""
    world.doing("reducing routed-token statistics")
    E, d = view.num_experts, x.shape[1]
    names = ("EAE", "EAO", "EAO-frac", "EAN", "EAN-mean", "REAP", "ETS-cosine")
    out = {n: torch.full((E,), float("nan")) for n in names}
    mean_dir = torch.full((E, d), float("nan"), dtype=torch.float64)
    for e in range(E):
        hit = r.topk_idx == e
        tok = hit.any(-1)
        xe = x[tok]
        A = view.expert_forward(e, xe).double() if len(xe) else torch.zeros(0, d, dtype=torch.float64)
        we = (r.topk_weights.double() * hit).sum(-1)[tok]
        norms = A.norm(dim=-1)
        first = world.sum(torch.cat([
            torch.tensor([float(len(xe)), float(norms.sum()), float((we.to(norms.device) * norms).sum())],
                         dtype=torch.float64),
            A.sum(0).cpu(), A.pow(2).sum(0).cpu(),
            torch.nn.functional.normalize(xe.double(), dim=-1).sum(0).cpu(),
            torch.nn.functional.normalize(A, dim=-1).sum(0).cpu(),
        ]))
        n = int(first[0])
        if n == 0:
            continue
        col_sum, col_sq, x_dir, a_dir = first[3:].split(d)
        mu = col_sum / n
        out["EAN"][e] = float(col_sq.sqrt().sum())
        out["EAN-mean"][e] = float(first[1] / n)
        out["REAP"][e] = float(first[2] / n)
        mean_dir[e] = a_dir / n
        out["ETS-cosine"][e] = float((x_dir @ x_dir - n) / (n * (n - 1))) if n >= 2 else float("nan")
        # deviation about the reduced mean (two passes, as torch.std takes them), then the outliers
        dev = world.sum((A - mu.to(A.device)).pow(2).sum(0).cpu())
        if n < 2:  # n is the reduced count: every rank skips alike, the collectives stay in step
            continue
        sd = (dev / (n - 1)).sqrt()
        outliers = world.sum(torch.tensor([float(((A - mu.to(A.device)).abs() > 3 * sd.to(A.device)).sum())],
                                          dtype=torch.float64))
        out["EAE"][e] = float(sd.clamp_min(1e-30).log().sum())
        out["EAO"][e] = float(outliers[0])
        out["EAO-frac"][e] = float(outliers[0] / (n * d))
    out["EAS-mean"] = mean_dir
    return out
