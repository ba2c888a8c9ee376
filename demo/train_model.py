#!/usr/bin/env python3
"""Train the tiny Mixtral-style MoE demo model on the six-domain demo corpus.

The result (``demo/model/`` by default) is an ordinary transformers folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("demo/model")
    tok = AutoTokenizer.from_pretrained("demo/model")

Architecture: ``MixtralForCausalLM``, vocab 4096, d_model 128, 4 layers, 4 heads
(2 KV heads), 8 experts per layer (SwiGLU, intermediate 256), top-2 routing,
untied embeddings (~4.4 M parameters, ~17 MB in float32).

Training: 256-token windows sampled uniformly at random from the train split of a
uniformly chosen domain, AdamW, linear warm-up + cosine decay, gradient clipping
1.0, Switch-style load-balancing loss (``router_aux_loss_coef``) added to the LM
loss by ``MixtralForCausalLM`` itself when ``output_router_logits=True``.
Training stops at ``--steps`` or at the ``--minutes`` wall-clock budget; without
``--steps`` the number of steps (and with it the cosine schedule) is derived from
the speed measured during warm-up.

After training the script saves the model + tokenizer, evaluates per-domain test
perplexity and per-domain expert usage, and writes ``README.md`` (model card) and
``training_log.json`` into the output folder.

Usage (from the repository root)::

    python demo/build_corpus.py                       # once: corpus/*/train.txt
    python demo/train_model.py                        # 40 min on 2 CPU cores
    python demo/train_model.py --steps 20 --out /tmp/demo_smoke   # smoke test
    python demo/train_model.py --eval-only            # re-evaluate demo/model, rewrite card
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_corpus import DOMAINS  # noqa: E402
from train_tokenizer import check_roundtrip, train_tokenizer  # noqa: E402

REPO = HERE.parent


def rel(p: Path) -> str:
    p = Path(p).resolve()
    try:
        return p.relative_to(REPO).as_posix()
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def encode_file(tok, path: Path) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.int32)


def load_split(tok, corpus: Path, split: str) -> dict[str, torch.Tensor]:
    return {d: encode_file(tok, corpus / d / f"{split}.txt") for d in DOMAINS}


class DomainSampler:
    """Random ``seq_len`` windows; each sequence's domain drawn uniformly."""

    def __init__(self, data: dict[str, torch.Tensor], seq_len: int, seed: int):
        self.data = [data[d] for d in DOMAINS]
        self.seq_len = seq_len
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        doms = torch.randint(len(self.data), (batch_size,), generator=self.g).tolist()
        rows = []
        for d in doms:
            arr = self.data[d]
            start = torch.randint(len(arr) - self.seq_len + 1, (1,), generator=self.g).item()
            rows.append(arr[start : start + self.seq_len])
        return torch.stack(rows).long()


def windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows covering all tokens (last one may be shorter)."""
    out = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w.long() for w in out if len(w) >= 2]


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


class RoutingCounter:
    """Forward hooks on every ``mlp.gate`` (router) counting top-k selections."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.n_exp = model.config.num_local_experts
        self.counts = torch.zeros(len(self.layers), self.n_exp, dtype=torch.float64)
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.mlp.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(module, inputs, output):
            indices = output[2] if isinstance(output, tuple) else output
            self.counts[i] += torch.bincount(indices.reshape(-1).cpu(), minlength=self.n_exp).double()

        return fn

    def reset(self):
        self.counts.zero_()

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def eval_loss(model, wins: list[torch.Tensor], device, batch_size: int = 16) -> tuple[float, int]:
    """Sum of next-token NLL over all predicted tokens of ``wins`` and their count."""
    model.eval()
    total, count = 0.0, 0
    full = [w for w in wins if len(w) == len(wins[0])]
    rest = [w for w in wins if len(w) != len(wins[0])]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w[None] for w in rest]
    for x in groups:
        x = x.to(device)
        logits = model(input_ids=x, output_router_logits=False, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total, count


def evaluate(model, tok, corpus: Path, seq_len: int, device, split: str = "test") -> dict:
    data = load_split(tok, corpus, split)
    counter = RoutingCounter(model)
    res = {"split": split, "domains": {}}
    k = model.config.num_experts_per_tok
    try:
        for d in DOMAINS:
            counter.reset()
            total, count = eval_loss(model, windows(data[d], seq_len), device)
            slots = counter.counts.sum(dim=1, keepdim=True)
            usage = (counter.counts / slots).tolist()
            res["domains"][d] = {
                "tokens": int(len(data[d])),
                "predicted_tokens": count,
                "loss": total / count,
                "ppl": math.exp(total / count),
                "usage": usage,  # [layer][expert] fraction of top-k slots
                "routed_tokens": int(slots[0, 0].item() / k),
            }
    finally:
        counter.remove()
    # usage over all domains, each domain weighted equally
    L, E = model.config.num_hidden_layers, model.config.num_local_experts
    overall = [[sum(res["domains"][d]["usage"][l][e] for d in DOMAINS) / len(DOMAINS) for e in range(E)]
               for l in range(L)]
    res["usage_all"] = overall
    # specialisation: mean total-variation distance between a domain's usage and the average
    res["tv_distance"] = {
        d: [0.5 * sum(abs(res["domains"][d]["usage"][l][e] - overall[l][e]) for e in range(E)) for l in range(L)]
        for d in DOMAINS
    }
    res["dead_experts"] = [[e for e in range(E) if overall[l][e] == 0.0] for l in range(L)]
    res["rare_experts"] = [[e for e in range(E) if overall[l][e] < 0.02] for l in range(L)]
    return res


@torch.no_grad()
def samples(model, tok, device, prompts: dict[str, str], max_new_tokens: int = 40, seed: int = 0) -> dict[str, str]:
    model.eval()
    out = {}
    for i, (name, prompt) in enumerate(prompts.items()):
        torch.manual_seed(seed + i)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                             pad_token_id=tok.pad_token_id)
        out[name] = tok.decode(gen[0], skip_special_tokens=False)
    return out


SAMPLE_PROMPTS = {
    "python": "def read_config(path):\n    ",
    "docs": "The module provides",
    "quotes_en": "A computer is",
    "german": "Der Mensch ist",
    "spanish": "La vida es",
    "italian": "La vita e'",
}


# ---------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def model_card(log: dict, ev: dict, out: Path) -> str:
    cfg = log["config"]
    tr = log["training"]
    L, E, k = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    n_params, n_active = log["parameters"]["total"], log["parameters"]["active_per_token"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: other",
        "tags: [mixtral, moe, mixture-of-experts, demo, tiny]",
        "language: [en, de, es, it, code]",
        "---",
        "",
    ]
    up = log.get("upcycle")
    folder = rel(out)
    if up:
        dn = up["dense"]
        lines += [
            "# moescope upcycled demo MoE (tiny Mixtral, 8 experts, top-2, upcycled from a dense model)",
            "",
            "The sibling of `demo/model` made the way Mixtral and Qwen1.5-MoE were made: same tokenizer, corpus",
            "and architecture, but a **dense** model of the same width was trained first, its FFN was then copied",
            "into all 8 experts of every layer (with small noise so they can diverge) under a freshly initialised",
            "router, and the MoE was trained from there. Its experts therefore share one coordinate system for",
            "their intermediate neurons, the regime in which averaging expert weights is natural; `demo/model`'s",
            "experts were trained from scratch (like DeepSeek-MoE and OLMoE). moescope ships both so that merging",
            "and dropping can be compared in each regime (`moescope info demo-upcycled`, `moescope plan demo-upcycled …`).",
            f"It is **not** a useful language model: it has seen ~{(tr['tokens'] + dn['tokens']) / 1e6:.1f} M tokens.",
            "",
        ]
    else:
        lines += [
            "# moescope demo MoE (tiny Mixtral, 8 experts, top-2)",
            "",
            "A deliberately tiny Mixture-of-Experts causal LM trained from scratch on CPU, shipped with",
            "moescope so that the expert-pruning / expert-merging tools can be tried and tested offline.",
            "It is **not** a useful language model: it has seen ~"
            f"{tr['tokens'] / 1e6:.1f} M tokens and produces fortune-cookie-flavoured gibberish. What it does",
            "have is experts that specialise by domain (code vs. English prose vs. German/Spanish/Italian),",
            "which is what the workbench needs.",
            "",
        ]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")  # works with HF_HUB_OFFLINE=1',
        f'tok = AutoTokenizer.from_pretrained("{folder}")',
        "experts = model.model.layers[0].mlp.experts   # gate_up_proj [E, 2I, d], down_proj [E, d, I]",
        "router = model.model.layers[0].mlp.gate        # weight [E, d]",
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        "| class | `MixtralForCausalLM` (transformers " + log["env"]["transformers"] + ") |",
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE, `<\\|endoftext\\|>` = bos/eos/unk/pad, id "
        f"{cfg['eos_token_id']}) |",
        f"| hidden size / layers | {cfg['hidden_size']} / {L} |",
        f"| attention | {cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} KV heads (GQA), RoPE, "
        f"max {cfg['max_position_embeddings']} positions |",
        f"| MoE | {E} SwiGLU experts per layer, intermediate size {cfg['intermediate_size']}, top-{k} routing, "
        f"renormalised top-k softmax weights |",
        f"| embeddings | untied (`lm_head` separate) |",
        f"| parameters | {n_params:,} total, ~{n_active:,} active per token |",
        f"| weights | float32 safetensors, {log['files']['model.safetensors'] / 1e6:.1f} MB |",
        "",
        "## Training",
        "",
        f"* Data: the six-domain corpus in `demo/corpus/` (train splits, {log['data']['train_tokens_total']:,} "
        "tokens); see [`corpus/SOURCES.md`](../corpus/SOURCES.md) for sources, licences and the rebuild "
        "command. Each training sequence is a random 256-token window from one domain, the domain drawn "
        "uniformly (so the smaller Spanish/Italian sets are repeated more often).",
    ]
    if up:
        lines += [
            f"* Dense phase: the same architecture with one expert (top-1, i.e. a plain SwiGLU FFN of width "
            f"{cfg['intermediate_size']}; {dn['parameters']['total']:,} parameters), {dn['steps']:,} steps x batch "
            f"{tr['batch_size']} x {tr['seq_len']} tokens = {dn['tokens']:,} tokens in {dn['train_seconds'] / 60:.1f} "
            f"min, final validation loss {dn['val_history'][-1]['val_loss']:.3f}; stop reason: {dn['stop_reason']}.",
            *([f"* Dense warm start (to fit the CPU budget): the dense model did not start from random weights but "
               f"from `{up['dense_init']['from']}` (embeddings, attention, norms and head copied; each layer's FFN "
               f"= that model's most-used expert, experts {up['dense_init']['ffn_from_expert_per_layer']} for "
               f"layers 0..{L - 1}). The other experts of that model were discarded, so this model's experts all "
               "descend from one FFN per layer."] if up.get("dense_init") else []),
            f"* Budget: the whole run (both phases and this evaluation) had {tr['minutes_budget']:g} minutes on "
            f"{tr['threads']} thread(s) of a 2-core CPU machine: {dn['steps'] + tr['steps']:,} optimizer steps in "
            "all (dense and MoE), against 912 for `demo/model`'s from-scratch training. The experts moved apart: "
            "the spread of each layer's expert weights around "
            f"their mean, ||W - mean|| / ||mean||, is {', '.join(f'{x:.2f}' for x in up.get('expert_spread', []))} "
            "(layers 0..3; 0.01 right after upcycling; 2.6 for `demo/model`'s experts, trained from scratch).",
            f"* Upcycling: every non-FFN tensor copied; the FFN copied into all {E} experts with independent "
            f"Gaussian noise of {up['noise']} x the tensor's std added; router freshly initialised (normal, std "
            f"{cfg['initializer_range']}); new optimiser state.",
        ]
    lines += [
        ("* MoE phase: " if up else "* ") + f"{tr['steps']:,} steps x batch {tr['batch_size']} x {tr['seq_len']} tokens = "
        f"{tr['tokens']:,} tokens ({tr['tokens'] / max(1, log['data']['train_tokens_total']):.1f} passes over "
        f"the train tokens) in {tr['train_seconds'] / 60:.1f} min on {tr['device_name']}"
        + (f" ({tr['threads']} threads)" if tr["device"] == "cpu" else "") + ".",
        f"* AdamW (lr {tr['lr']}, betas {tuple(tr['betas'])}, weight decay {tr['weight_decay']} on matrices), "
        f"{tr['warmup_steps']} warm-up steps then cosine decay to {tr['min_lr_ratio']} x lr over "
        f"{tr['planned_steps']} planned steps, gradient clipping {tr['grad_clip']}, seed {tr['seed']}.",
        f"* Load-balancing loss: `router_aux_loss_coef = {cfg['router_aux_loss_coef']}` "
        "(`output_router_logits=True` during training; disabled in the saved config); "
        + ("transformers' built-in Switch loss, whose routing statistics are pooled over all layers."
           if tr.get("balance", "pooled") == "pooled" else
           "the same Switch loss computed separately for every layer and averaged (`--balance per-layer`)."),
        f"* Final train LM loss {tr['final_train_loss']:.3f} (mean of last steps), validation loss "
        f"{tr['final_val_loss']:.3f} (mean over domains, fixed validation windows).",
        f"* Stop reason: {tr['stop_reason']}.",
        "* Rebuild: `python demo/build_corpus.py && python demo/train_model.py" + (" --upcycle" if up else "") + "` "
        f"(this run: `{log['command']}`). Training on CPU is not bit-for-bit reproducible across "
        "machines/thread counts, and the number of steps depends on measured speed unless `--steps` is given.",
        "",
        "## Test perplexity per domain",
        "",
        "exp(mean next-token loss) over all predicted tokens of non-overlapping 256-token windows of each "
        "domain's `test.txt` (the first token of each window is context only).",
        "",
        "| domain | test tokens | loss | perplexity | bytes/token |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in DOMAINS:
        r = ev["domains"][d]
        bpt = log["data"]["test_bytes"][d] / r["tokens"]
        lines.append(f"| `{d}` | {r['tokens']:,} | {r['loss']:.3f} | {r['ppl']:.1f} | {bpt:.2f} |")
    lines += [
        "",
        "## Expert usage per domain",
        "",
        f"Share (%) of the top-{k} routing slots each expert receives on each domain's test split "
        f"(uniform = {100 / E:.1f}%). `TV` is the total-variation distance between the domain's usage and "
        "the all-domain average (0 = no specialisation, 1 = disjoint experts).",
        "",
    ]
    for l in range(L):
        lines.append(f"**Layer {l}**")
        lines.append("")
        lines.append("| domain | " + " | ".join(f"E{e}" for e in range(E)) + " | TV |")
        lines.append("|---|" + "---:|" * (E + 1))
        for d in DOMAINS:
            u = ev["domains"][d]["usage"][l]
            mx = max(u)
            cells = [(f"**{fmt_pct(x)}**" if x == mx else fmt_pct(x)) for x in u]
            lines.append(f"| `{d}` | " + " | ".join(cells) + f" | {ev['tv_distance'][d][l]:.2f} |")
        u = ev["usage_all"][l]
        lines.append("| *all* | " + " | ".join(fmt_pct(x) for x in u) + " | |")
        lines.append("")
    dead = [(l, e) for l in range(L) for e in ev["dead_experts"][l]]
    rare = [(l, e) for l in range(L) for e in ev["rare_experts"][l]]
    mean_tv = sum(sum(v) for v in ev["tv_distance"].values()) / (len(DOMAINS) * L)
    lines.append(f"Mean TV distance over domains and layers: {mean_tv:.2f}.")
    lines.append(
        "Dead experts (never selected on any test split): "
        + (", ".join(f"layer {l} expert {e}" for l, e in dead) if dead else "none")
        + ". Rarely used (< 2% of slots averaged over domains): "
        + (", ".join(f"L{l}E{e}" for l, e in rare) if rare else "none")
        + "."
    )
    lines += [
        "",
        "## Samples",
        "",
        "Sampled (temperature 0.7, top-p 0.9, 40 new tokens, fixed seed) to show what the model is, not what "
        "it can do:",
        "",
    ]
    for name, text in log.get("samples", {}).items():
        shown = json.dumps(text, ensure_ascii=False)[1:-1][:400].replace("`", "'")
        lines.append(f"* `{name}`: `{shown}`")
    lines += [
        "",
        "## Licence and data sources",
        "",
        "Trained only on text installed by Debian packages and on the CPython standard library, all under "
        "free licences: Python source and documentation (PSF License v2), English fortunes (`fortunes`, "
        "BSD), German fortunes (`fortunes-de`, GPL-2+), Spanish fortunes (`fortunes-es`, public domain / "
        "GPL-2+), Italian fortunes (`fortunes-it`, public domain). The exact files, package versions, licence "
        "files and document counts are in [`demo/corpus/SOURCES.md`](../corpus/SOURCES.md). Because part of "
        "the training data is GPL-2+, treat the weights as a GPL-2+-compatible artefact when redistributing. "
        "The fortunes contain jokes and quotations of their time; the `off/` (offensive) folders were "
        "excluded, but no further filtering was done.",
        "",
        "Files: `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`, "
        "`tokenizer_config.json`, `training_log.json` (full metrics, including the usage tables above), "
        "this `README.md`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def build_model(tok, args, n_experts: int = 8):
    """The demo architecture; ``n_experts=1`` (top-1, no balancing loss) is its dense counterpart of the
    same width, whose single SwiGLU FFN is what :func:`upcycle` copies into every expert."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=n_experts,
        num_experts_per_tok=min(2, n_experts),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=None,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef if n_experts > 1 else 0.0,
        router_jitter_noise=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        attention_dropout=0.0,
    )
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(cfg)
    return model


@torch.no_grad()
def upcycle(dense, moe, noise: float, seed: int) -> dict:
    """Sparse upcycling (Komatsuzaki et al. 2022; Mixtral, Qwen1.5-MoE): copy every non-FFN weight of the
    dense model, copy its FFN into each expert with Gaussian noise of ``noise`` x the tensor's std added
    (independent per expert, so they can diverge), and keep ``moe``'s freshly initialised router."""
    g = torch.Generator().manual_seed(seed + 1)
    dsd, msd = dense.state_dict(), moe.state_dict()
    copied, experts, fresh = 0, 0, []
    for name, t in msd.items():
        if ".mlp.gate." in name:
            fresh.append(name)
            continue
        src = dsd[name]
        if ".mlp.experts." in name:  # [E, ...] <- [1, ...]
            std = src.float().std().item()
            noisy = src.expand_as(t).clone() + noise * std * torch.randn(t.shape, generator=g).to(t)
            t.copy_(noisy)
            experts += 1
        else:
            t.copy_(src)
            copied += 1
    return {"noise": noise, "copied_tensors": copied, "expert_tensors": experts, "fresh_router_tensors": fresh}


@torch.no_grad()
def warm_start_dense(dense, folder: str) -> dict:
    """Initialise the dense model from an MoE folder of the same architecture (a CPU-budget shortcut):
    embeddings, attention, norms and head are copied, and each layer's FFN is that model's most-used
    expert (``expert_usage.all_domains_mean`` of its training_log.json; expert 0 without it)."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(folder)
    log_path = Path(folder) / "training_log.json"
    usage = json.loads(log_path.read_text()).get("expert_usage", {}).get("all_domains_mean") if log_path.exists() else None
    picked = []
    dsd, ssd = dense.state_dict(), src.state_dict()
    for name, t in dsd.items():
        if ".mlp.gate." in name:
            continue  # one-expert router: its output is 1 whatever the weights
        if ".mlp.experts." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            e = max(range(len(usage[layer])), key=usage[layer].__getitem__) if usage else 0
            t.copy_(ssd[name][e : e + 1])
            if name.endswith("gate_up_proj"):
                picked.append(e)
        else:
            t.copy_(ssd[name])
    return {"from": rel(Path(folder)), "ffn_from_expert_per_layer": picked}


def lr_at(step: int, warmup: int, total: int, base: float, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def count_params(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_local_experts
    return {"total": total, "experts": expert, "active_per_token": active}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU"


def run_phase(model, sampler, val_wins, device, args, deadline: float, reserve: float, steps, desc: str) -> dict:
    """Train ``model`` in place until ``steps`` (or, without them, the planned steps that fit before
    ``deadline - reserve``); fresh AdamW, warm-up + cosine schedule. Returns the phase's log."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8,
    )
    planned = steps
    auto_plan = planned is None
    plans, val_cost = [], None
    warmup = args.warmup if planned is None else min(args.warmup, max(1, planned // 10))
    coef = model.config.router_aux_loss_coef
    history, val_history = [], []
    t_train0 = time.time()
    step_times = []
    stop_reason = None
    bar = tqdm(total=planned or args.max_steps, desc=desc, mininterval=args.log_interval, dynamic_ncols=False,
               ncols=110, file=sys.stdout)

    def run_val():
        tot, cnt, per = 0.0, 0, {}
        for d in DOMAINS:
            s, c = eval_loss(model, val_wins[d], device, batch_size=args.val_windows)
            per[d] = s / c
        model.train()
        return sum(per.values()) / len(per), per

    step = 0
    model.train()
    while True:
        if planned is not None and step >= planned:
            stop_reason = f"reached planned {planned} steps"
            break
        if step >= args.max_steps:
            stop_reason = f"reached --max-steps {args.max_steps}"
            break
        if time.time() >= deadline - reserve:
            stop_reason = (f"wall-clock budget ({args.minutes} min incl. {args.reserve_minutes} min reserved "
                           f"for evaluation) exhausted at step {step}" if reserve else
                           f"phase budget ({args.dense_fraction:.0%} of {args.minutes} min) exhausted at step {step}")
            break
        t0 = time.time()
        lr = lr_at(step, warmup, planned or args.max_steps, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.batch(args.batch_size).to(device)
        outp = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        loss = outp.loss
        if args.balance == "per-layer":
            # MixtralForCausalLM pools the routing statistics of all layers before computing the
            # Switch loss, so one layer's imbalance can be hidden by another's; balance each layer.
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            per_layer = torch.stack([
                load_balancing_loss_func((rl,), model.config.num_local_experts, model.config.num_experts_per_tok)
                for rl in outp.router_logits
            ]).mean()
            loss = loss - coef * outp.aux_loss + coef * per_layer
            outp.aux_loss = per_layer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        opt.step()
        aux = outp.aux_loss.detach().item()
        lm = loss.item() - coef * aux
        step += 1
        dt = time.time() - t0
        step_times.append(dt)
        history.append({"step": step, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4), "lr": lr,
                        "grad_norm": round(gnorm, 3), "time": round(time.time() - t_train0, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.1e}", s_it=f"{dt:.2f}", refresh=False)

        # plan the number of steps from the speed measured during warm-up (median step time, robust to
        # other processes stealing the CPU for a moment); re-plan once, early in the cosine phase
        if auto_plan and step in (warmup, warmup + args.replan_after):
            recent = sorted(step_times[min(3, len(step_times) - 1):])
            sec_per_step = recent[len(recent) // 2]
            if val_cost is None:
                val_t0 = time.time()
                run_val()
                val_cost = time.time() - val_t0
            remaining = deadline - reserve - time.time()
            per_step = sec_per_step * args.speed_margin + val_cost / args.eval_every
            planned = min(args.max_steps, step + max(1, int(remaining / per_step)))
            plans.append({"step": step, "sec_per_step": round(sec_per_step, 3), "planned_steps": planned})
            bar.total = planned
            bar.refresh()
            tqdm.write(f"[plan] step {step}: median {sec_per_step:.2f} s/step (x{args.speed_margin} margin), "
                       f"val {val_cost:.1f}s -> {planned} planned steps "
                       f"({planned * args.batch_size * args.seq_len / 1e6:.1f} M tokens)")

        if step % args.eval_every == 0 or (planned is not None and step == planned):
            v, per = run_val()
            recent = history[-args.eval_every:]
            tl = sum(h["lm_loss"] for h in recent) / len(recent)
            val_history.append({"step": step, "val_loss": round(v, 4), "train_loss": round(tl, 4),
                                "per_domain": {d: round(x, 4) for d, x in per.items()},
                                "time": round(time.time() - t_train0, 1)})
            tqdm.write(f"[val] step {step}: train {tl:.3f} val {v:.3f} aux {aux:.3f} | "
                       + " ".join(f"{d}={x:.2f}" for d, x in per.items()))
    bar.close()
    train_seconds = time.time() - t_train0
    tqdm.write(f"stopped: {stop_reason}; {step} steps in {train_seconds / 60:.1f} min")

    if not val_history or val_history[-1]["step"] != step:
        v, per = run_val()
        val_history.append({"step": step, "val_loss": round(v, 4), "per_domain": {d: round(x, 4) for d, x in per.items()},
                            "time": round(time.time() - t_train0, 1)})
    return {"steps": step, "planned_steps": planned, "plans": plans, "warmup_steps": warmup, "history": history,
            "val_history": val_history, "stop_reason": stop_reason, "train_seconds": train_seconds}


def train(args):
    from transformers import GenerationConfig

    t_start = time.time()
    deadline = t_start + args.minutes * 60
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # tokenizer
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tqdm.write("training tokenizer ...")
        tok = train_tokenizer(corpus)
    rt = check_roundtrip(tok, corpus)
    if not all(rt.values()):
        raise SystemExit(f"tokenizer round-trip failed: {rt}")
    tqdm.write(f"tokenizer: {len(tok)} tokens, round-trip ok on {sorted(rt)}")

    # data
    train_data = load_split(tok, corpus, "train")
    val_data = load_split(tok, corpus, "validation")
    train_tokens = {d: int(len(v)) for d, v in train_data.items()}
    tqdm.write("train tokens: " + ", ".join(f"{d}={n:,}" for d, n in train_tokens.items()))
    sampler = DomainSampler(train_data, args.seq_len, args.seed)
    val_wins = {}
    for d in DOMAINS:
        w = [x for x in windows(val_data[d], args.seq_len) if len(x) == args.seq_len]
        stride = max(1, len(w) // args.val_windows)
        val_wins[d] = w[::stride][: args.val_windows]

    # model / optimiser
    model = build_model(tok, args)
    if device.type == "cpu":
        model.set_experts_implementation("eager")  # fastest on CPU in our measurements
    model.to(device)
    params = count_params(model)
    tqdm.write(f"parameters: {params}")
    if args.upcycle:
        # Mixtral / Qwen1.5-MoE recipe: a dense model of the same width first, its FFN then copied
        # into every expert (plus small noise so they can diverge) with a fresh router, then MoE training
        dense = build_model(tok, args, n_experts=1)
        if device.type == "cpu":
            dense.set_experts_implementation("eager")
        if args.dense_init:
            upcycle_init = warm_start_dense(dense, args.dense_init)
            tqdm.write(f"dense model warm-started from {upcycle_init}")
        dense.to(device)
        dense_deadline = t_start + args.dense_fraction * (deadline - t_start)
        tqdm.write(f"dense phase: {count_params(dense)['total']:,} parameters, "
                   f"{(dense_deadline - time.time()) / 60:.1f} min")
        dense_run = run_phase(dense, sampler, val_wins, device, args, dense_deadline, reserve=0.0,
                              steps=args.dense_steps, desc="dense")
        upcycle_info = upcycle(dense, model, args.upcycle_noise, args.seed)
        upcycle_info["dense_init"] = upcycle_init if args.dense_init else None
        upcycle_info["dense"] = {k: v for k, v in dense_run.items() if k != "history"}
        upcycle_info["dense"]["history"] = dense_run["history"][:: max(1, args.history_every)]
        upcycle_info["dense"]["parameters"] = count_params(dense)
        upcycle_info["dense"]["tokens"] = dense_run["steps"] * args.batch_size * args.seq_len
        del dense
        tqdm.write(f"upcycled: FFN copied into {model.config.num_local_experts} experts "
                   f"(noise {args.upcycle_noise} x weight std), fresh router")
    run = run_phase(model, sampler, val_wins, device, args, deadline, reserve=args.reserve_minutes * 60,
                    steps=args.steps, desc="moe" if args.upcycle else "train")
    step, planned, plans, warmup = run["steps"], run["planned_steps"], run["plans"], run["warmup_steps"]
    history, val_history, stop_reason = run["history"], run["val_history"], run["stop_reason"]
    train_seconds = run["train_seconds"]

    # save
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=128,
    )
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for p in out.iterdir():  # safetensors writes 0600 files
        if p.is_file():
            p.chmod(0o644)

    last = history[-min(len(history), 50):]
    log = {
        "command": "python " + " ".join([rel(Path(sys.argv[0]))] + sys.argv[1:]),
        "config": model.config.to_dict(),
        "parameters": params,
        "env": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "tokenizers": __import__("tokenizers").__version__, "python": platform.python_version()},
        "data": {
            "corpus": rel(corpus),
            "train_tokens": train_tokens,
            "train_tokens_total": sum(train_tokens.values()),
            "test_bytes": {d: (corpus / d / "test.txt").stat().st_size for d in DOMAINS},
        },
        "training": {
            "device": device.type, "device_name": device_name(args.device), "threads": args.threads,
            "steps": step, "planned_steps": planned, "plans": plans, "warmup_steps": warmup, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "tokens": step * args.batch_size * args.seq_len,
            "lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "betas": [args.beta1, args.beta2],
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
            "balance": args.balance, "minutes_budget": args.minutes, "train_seconds": round(train_seconds, 1),
            "sec_per_step": round(train_seconds / max(1, step), 3),
            "final_train_loss": sum(h["lm_loss"] for h in last) / len(last),
            "final_aux_loss": sum(h["aux_loss"] for h in last) / len(last),
            "final_val_loss": val_history[-1]["val_loss"],
            "stop_reason": stop_reason,
        },
        "val_history": val_history,
        **({"upcycle": upcycle_info} if args.upcycle else {}),
        "history": [h for i, h in enumerate(history)
                    if i % max(1, args.history_every) == 0 or i == len(history) - 1],
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    finish(model, tok, out, corpus, args, log, t_start)


@torch.no_grad()
def expert_spread(model) -> list[float]:
    """Per layer, ``‖W − W̄‖ / ‖W̄‖`` over the experts' fused weights (W̄ their mean): how far the
    experts have moved apart (0 = identical copies)."""
    out = []
    for layer in model.model.layers:
        num = den = 0.0
        for t in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            t = t.detach().float()
            mean = t.mean(0, keepdim=True)
            num += float((t - mean).pow(2).sum())
            den += float(mean.pow(2).sum()) * t.shape[0]
        out.append(round(math.sqrt(num / den), 4))
    return out


def finish(model, tok, out: Path, corpus: Path, args, log: dict, t_start: float):
    """Evaluate the saved model, then write training_log.json and README.md."""
    device = torch.device(args.device)
    if log.get("upcycle"):
        log["upcycle"]["expert_spread"] = expert_spread(model)
    t0 = time.time()
    ev = evaluate(model, tok, corpus, args.seq_len, device, "test")
    tqdm.write("test ppl: " + ", ".join(f"{d}={ev['domains'][d]['ppl']:.1f}" for d in DOMAINS)
               + f" ({time.time() - t0:.0f}s)")
    log["samples"] = samples(model, tok, device, SAMPLE_PROMPTS, seed=args.seed)
    log["test"] = {
        "ppl": {d: ev["domains"][d]["ppl"] for d in DOMAINS},
        "loss": {d: ev["domains"][d]["loss"] for d in DOMAINS},
        "tokens": {d: ev["domains"][d]["tokens"] for d in DOMAINS},
        "predicted_tokens": {d: ev["domains"][d]["predicted_tokens"] for d in DOMAINS},
        "method": f"exp(mean NLL) over all predicted tokens of non-overlapping {args.seq_len}-token windows",
    }
    log["expert_usage"] = {
        "description": "fraction of top-k routing slots per expert, [layer][expert], on each domain's test split",
        "per_domain": {d: [[round(x, 5) for x in row] for row in ev["domains"][d]["usage"]] for d in DOMAINS},
        "all_domains_mean": [[round(x, 5) for x in row] for row in ev["usage_all"]],
        "tv_distance_to_mean": {d: [round(x, 4) for x in v] for d, v in ev["tv_distance"].items()},
        "dead_experts": ev["dead_experts"],
        "rare_experts_below_2pct": ev["rare_experts"],
    }
    log["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    log["total_seconds"] = round(time.time() - t_start, 1)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    (out / "README.md").write_text(model_card(log, ev, out))
    log["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    tqdm.write(f"wrote {out}/README.md and training_log.json ({log['total_seconds'] / 60:.1f} min total)")


def eval_only(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = AutoModelForCausalLM.from_pretrained(out).to(args.device).eval()
    if args.device == "cpu":
        model.set_experts_implementation("eager")
    tok = AutoTokenizer.from_pretrained(out)
    log = json.loads((out / "training_log.json").read_text())
    finish(model, tok, out, Path(args.corpus), args, log, time.time())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE / "corpus"))
    ap.add_argument("--out", default=None, help="output folder (default: demo/model, or demo/model-upcycled "
                                                 "with --upcycle)")
    ap.add_argument("--tokenizer", default=None, help="existing tokenizer folder (default: train a new one; "
                                                       "demo/model's with --upcycle)")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget for the whole run")
    ap.add_argument("--reserve-minutes", type=float, default=2.0,
                    help="part of the budget kept for final evaluation and saving")
    ap.add_argument("--steps", type=int, default=None,
                    help="planned optimizer steps (default: derived from --minutes and measured speed)")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--speed-margin", type=float, default=1.1,
                    help="safety factor on the measured s/step when planning steps from the budget")
    ap.add_argument("--replan-after", type=int, default=150,
                    help="re-estimate speed and planned steps this many steps after warm-up")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.02, help="router_aux_loss_coef")
    ap.add_argument("--balance", choices=["pooled", "per-layer"], default="pooled",
                    help="load-balancing loss: transformers' built-in one (statistics pooled over layers) "
                         "or the same loss computed per layer and averaged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-windows", type=int, default=8, help="validation windows per domain")
    ap.add_argument("--log-interval", type=float, default=10.0, help="progress bar refresh (s)")
    ap.add_argument("--history-every", type=int, default=5, help="keep every n-th step in training_log.json")
    ap.add_argument("--upcycle", action="store_true",
                    help="build the upcycled demo (demo/model-upcycled): dense model first, its FFN copied into all "
                         "experts with small noise and a fresh router, then MoE training; reuses demo/model's "
                         "tokenizer unless --tokenizer is given")
    ap.add_argument("--dense-fraction", type=float, default=0.4,
                    help="with --upcycle: share of the training budget spent on the dense phase")
    ap.add_argument("--dense-steps", type=int, default=None,
                    help="with --upcycle: dense-phase steps (default: derived from the budget)")
    ap.add_argument("--upcycle-noise", type=float, default=0.01,
                    help="with --upcycle: std of the noise added to each expert copy, relative to the weight std")
    ap.add_argument("--dense-init", default=None, metavar="FOLDER",
                    help="with --upcycle: warm-start the dense model from this MoE folder (embeddings, attention, "
                         "head, and each layer's most-used expert as the FFN) instead of from scratch")
    ap.add_argument("--eval-only", action="store_true",
                    help="load --out, re-run the test evaluation and rewrite README.md/training_log.json")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(HERE / ("model-upcycled" if args.upcycle else "model"))
    if args.upcycle and args.tokenizer is None and not args.eval_only:
        args.tokenizer = str(HERE / "model")
    if args.eval_only:
        eval_only(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
