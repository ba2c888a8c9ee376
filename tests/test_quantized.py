"""Issue 32: quantized checkpoints (block FP8, MXFP4, compressed-tensors FP8 and W4A16) read,
analysed, pruned and merged in their own format.

The fixtures (:mod:`quantized_fixtures`) are written in the published layouts; that they are
the layouts transformers reads is checked first: transformers' own CPU dequantization of each
FP8 / MXFP4 fixture gives exactly the logits of its dequantized twin (the same weights in float32),
so moescope's dequantize rules are transformers' on these layouts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from moescope.analysis.model import load_moe
from moescope.analysis.model import quantization as Q
from moescope.analysis.model.stream_export import source_tensors
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.cli import main
from moescope.analysis.run.export import export, stream_export
from quantized_fixtures import LAYOUTS, publish
from safetensors import safe_open

EXACT = ["deepseek_v3_fp8", "qwen3_moe_fp8", "gpt_oss_mxfp4"]  # transformers dequantizes these itself on the CPU
CT = ["qwen3_moe_ct_fp8", "mixtral_ct_fp8", "qwen3_moe_ct_w4a16"]  # compressed-tensors decompresses these
MOE_LAYERS = {"deepseek_v3_fp8": [1, 2]}
IDS = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("quantized")
    return {layout: publish(layout, root / layout) for layout in LAYOUTS}


def hf_load(folder, **kw):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(IDS).logits


def stored(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (fh.get_slice(k).get_dtype(), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8)
                          .numpy().tobytes() if t.numel() else b"")
    return out


def drop_plan(layout: str, base: Path, keep=(0, 2, 5, 7)) -> PruningPlan:
    layers = MOE_LAYERS.get(layout, [0, 1])
    if layout.startswith("deepseek"):
        keep = (0, 2, 4, 6)  # every routing group (2 groups of 4) keeps the same size
    return PruningPlan.from_json({"version": 1, "base_model": str(base),
                                  "layers": {str(l): {"groups": [[e] for e in keep]} for l in layers}})


def merge_plan(layout: str, base: Path) -> PruningPlan:
    layers = MOE_LAYERS.get(layout, [0, 1])
    groups = [[0], [2, 3], [4], [6, 7]]
    return PruningPlan.from_json({"version": 1, "base_model": str(base), "layers": {
        str(l): {"groups": groups, "coefficients": [[1.0], [0.5, 0.5], [1.0], [0.25, 0.75]]} for l in layers}})


# ---- the fixtures are the published layouts ----------------------------------------------------
@pytest.mark.parametrize("layout", EXACT)
def test_transformers_dequantizes_each_fixture_to_its_twin(published, layout):
    quantized, twin = published[layout]
    assert torch.equal(logits(hf_load(quantized)), logits(hf_load(twin)))


def test_pack_quantized_rule_is_compressed_tensors_own(published):
    """Our W4A16 packing and dequantization agree with compressed-tensors' unpacking and its rule."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    packed, scale = Q.int4_quantize(w, 128, torch.float32)
    assert packed.shape == (16, 38) and packed.dtype == torch.int32 and scale.shape == (16, 3)
    values = helpers.unpack_from_int32(packed, 4, torch.Size((16, 300)))
    assert torch.equal(helpers.pack_to_int32(values, 4), packed)
    ref = values.float() * scale.repeat_interleave(128, dim=1)[:, :300]
    assert torch.equal(Q.int4_dequantize(packed, scale, (16, 300), 128), ref)
    # symmetric RTN: scale = amax / 7.5 per group of 128 (compressed-tensors' calculate_qparams)
    assert torch.allclose(scale[:, 0], w[:, :128].abs().amax(dim=1) / 7.5)


def test_fp8_block_rule_is_amax_over_448_with_partial_blocks():
    w = torch.randn(576, 300, generator=torch.Generator().manual_seed(2))  # DeepSeek-V3's kv_a_proj rows
    q, s = Q.fp8_block_quantize(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)  # ⌈576/128⌉ × ⌈300/128⌉, as published
    assert s[4, 2] == w[512:, 256:].abs().max() / 448
    back = Q.fp8_block_dequantize(q, s, (128, 128))
    assert (back - w).abs().max() <= w.abs().max() / 16  # e4m3: 3 mantissa bits


def test_mxfp4_rule_shares_one_e8m0_exponent_per_32_values():
    w = torch.zeros(1, 64, 2)  # [E, in, out]: two groups of 32 inputs per output
    w[0, :32, 0] = torch.linspace(-5.0, 5.0, 32)
    w[0, 5, 0] = 12.0  # amax 12 → exponent ⌊log2 12⌋ − 2 = 1: values become x / 2
    blocks, scales = Q.mxfp4_quantize(w)
    assert blocks.shape == (1, 2, 2, 16) and scales.tolist() == [[[128, 0], [0, 0]]]
    back = Q.mxfp4_dequantize(blocks, scales)
    assert back[0, 5, 0] == 12.0  # 6 · 2¹
    # −5 / 2 = −2.5 lies halfway between E2M1's −2 and −3: ties go to the even mantissa (−2)
    assert back[0, 0, 0] == -4.0 and Q.mxfp4_dequantize(*Q.mxfp4_quantize(w * 0 + 1.5))[0, 0, 0] == 1.5
    assert torch.equal(back[:, :, 1], torch.zeros(1, 64))


# ---- reading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,fmt", [("deepseek_v3_fp8", "fp8-block"), ("qwen3_moe_fp8", "fp8-block"),
                                        ("gpt_oss_mxfp4", "mxfp4"), ("qwen3_moe_ct_fp8", "float-quantized"),
                                        ("mixtral_ct_fp8", "float-quantized"),
                                        ("qwen3_moe_ct_w4a16", "pack-quantized")])
def test_every_scheme_is_detected_and_info_counts_the_files(published, layout, fmt, capsys):
    quantized, _ = published[layout]
    assert Q.scheme_of_folder(quantized).format == fmt
    assert main(["info", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ckpt = info["checkpoint"]
    tensors = source_tensors(quantized)
    assert ckpt["bytes"] == sum(t.nbytes for t in tensors.values())
    assert sum(e["bytes"] for e in ckpt["tensors"].values()) == ckpt["bytes"]
    want = {"fp8-block": ("fp8 weights", "F8_E4M3"), "float-quantized": ("fp8 weights", "F8_E4M3"),
            "pack-quantized": ("int4 packed weights", "I32"), "mxfp4": ("mxfp4 blocks", "U8")}[fmt]
    assert ckpt["tensors"][want[0]]["dtypes"] == [want[1]]
    assert ckpt["tensors"][want[0]]["bytes"] > ckpt["tensors"]["unquantized"]["bytes"] / 4
    assert main(["info", str(quantized)]) == 0
    text = capsys.readouterr().out
    assert "quantization" in text and want[1] in text


def test_unknown_quantization_method_is_refused_in_one_line(published, tmp_path, capfd):
    quantized, _ = published["qwen3_moe_fp8"]
    bad = tmp_path / "gptq"
    shutil.copytree(quantized, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    for argv in (["info", str(bad)], ["plan", str(bad), "--strategy", "random", "--keep", "4", "-o",
                                      str(tmp_path / "p.json")]):
        assert main(argv) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'gptq'" in err[0] and "fp8" in err[0] and "mxfp4" in err[0] \
            and "compressed-tensors" in err[0]
    assert not (tmp_path / "p.json").exists()


# ---- analysis ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,offload", [("deepseek_v3_fp8", False), ("deepseek_v3_fp8", True),
                                            ("gpt_oss_mxfp4", True), ("qwen3_moe_ct_w4a16", True)])
def test_analysis_of_a_quantized_checkpoint_is_its_twins(published, layout, offload, tmp_path):
    """Every metric, layer by layer, equals the twin's: loaded by transformers (which dequantizes
    the whole model at load), or with --offload (moescope dequantizes one layer at a time)."""
    import moescope.analysis.measure.analyze as A
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.data import TokenBatch

    quantized, twin = published[layout]
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    batch = TokenBatch(input_ids=ids, domains=("synthetic",) * 4, source="synthetic", fingerprint="synthetic-q")
    metrics = [m for m in A.METRIC_FAMILIES if not (offload and m == "gradients")]  # offloaded: no backward pass
    params = A.AnalysisParams(similarity_tokens=64, rbf_batch_tokens=32, rbf_batches=2, chunk_size=2,
                              metrics=metrics)
    res = {}
    for name, folder in (("quantized", quantized), ("twin", twin)):
        model = load_moe(str(folder), dtype="float32", load_tokenizer=False,
                         offload_dir=tmp_path / "offload" if offload and name == "quantized" else None)
        res[name] = A.run_analysis(model, batch, params, cache=Cache(tmp_path / name))
    if offload:
        assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())
    assert res["quantized"].layers == res["twin"].layers == MOE_LAYERS.get(layout, [0, 1])
    assert set(res["quantized"]._t) == set(res["twin"]._t)
    for key, value in res["twin"]._t.items():  # layer by layer, every metric
        assert torch.equal(res["quantized"]._t[key], value), key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_offloaded_quantized_model_is_dequantized_one_layer_at_a_time(published, layout, tmp_path):
    """--offload of a quantized checkpoint: decoder layers stay on the meta device and are
    dequantized by moescope's rules as they run (one layer held at a time, nothing written to the
    offload folder); the logits are exactly the twin's, compressed-tensors included."""
    quantized, twin = published[layout]
    offloaded = load_moe(str(quantized), dtype="float32", load_tokenizer=False, offload_dir=tmp_path / "offload")
    assert offloaded.offloaded
    layer = offloaded.layers[offloaded.moe_layers[0]]
    assert all(p.device.type == "meta" for p in layer.experts.parameters())
    assert torch.equal(logits(offloaded.hf), logits(hf_load(twin)))
    hook = layer.experts._hf_hook
    held = hook.weights_map.dataset._held
    assert held is not None and held[0] == offloaded.num_hidden_layers - 1  # only the last layer run
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())


# ---- pruning in the checkpoint's own format ------------------------------------------------------
def _expert_of(key: str, layer: int) -> int | None:
    import re

    m = re.search(rf"layers\.{layer}\..*experts\.(\d+)\.", key)
    return int(m[1]) if m else None


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_drop_plan_keeps_kept_experts_bytes_and_the_format(published, layout, tmp_path):
    quantized, twin = published[layout]
    plan = drop_plan(layout, quantized)
    out = stream_export(str(quantized), tmp_path / "out", plan)
    src, dst = stored(quantized), stored(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((quantized / "config.json").read_text())["quantization_config"]
    keep = [g[0] for g in next(iter(plan.layers.values())).groups]
    expected_bytes = 0
    for key, (dtype, shape, raw) in src.items():
        layer = next((int(l) for l in plan.layers if f"layers.{l}." in key), None)
        e = _expert_of(key, layer) if layer is not None else None
        if layer is not None and e is not None:  # per-expert layout: kept ones renamed, byte for byte
            if e in keep:
                new = key.replace(f"experts.{e}.", f"experts.{keep.index(e)}.")
                assert dst[new] == (dtype, shape, raw), key
                expected_bytes += len(raw)
        elif layer is not None and (".experts." in key or key.endswith(("gate.weight", "router.weight", "router.bias",
                                                                         "e_score_correction_bias"))):
            t_dtype, t_shape, t_raw = dst[key]  # fused experts, routers: the kept rows, byte for byte
            assert t_dtype == dtype and t_shape == (len(keep),) + shape[1:]
            row = len(raw) // shape[0]
            assert t_raw == b"".join(raw[e * row:(e + 1) * row] for e in keep), key
            expected_bytes += len(t_raw)
        else:
            assert dst[key] == (dtype, shape, raw), key
            expected_bytes += len(raw)
    # nothing else is written: the export's bytes are exactly the source's bytes of what is kept
    assert sum(len(v[2]) for v in dst.values()) == expected_bytes < sum(len(v[2]) for v in src.values())
    # the free-space check before the work estimates the same bytes (routers aside), not float32's
    from moescope.analysis.run.export import export_bytes

    estimate = export_bytes(load_moe(str(quantized), dtype=None, weights=False), plan, "float32")
    assert abs(estimate - expected_bytes) <= 0.02 * expected_bytes
    if layout in EXACT:  # transformers loads it; exactly the same plan applied to the dequantized twin
        model = load_moe(str(twin), dtype="float32", load_tokenizer=False)
        apply(model, plan)
        assert torch.equal(logits(hf_load(out)), logits(model.hf))
    else:  # compressed-tensors: exactly the plan applied in memory to transformers' own load of the source
        pytest.importorskip("compressed_tensors")
        model = load_moe(str(quantized), dtype="float32", load_tokenizer=False)
        apply(model, plan)
        assert torch.equal(logits(hf_load(out)), logits(model.hf))


@pytest.mark.parametrize("layout", ["qwen3_moe_fp8", "gpt_oss_mxfp4"])  # per-expert and fused layouts
def test_non_uniform_drop_loads_as_the_twin_with_the_plan(published, layout, tmp_path):
    quantized, twin = published[layout]
    plan = PruningPlan.from_json({"version": 1, "base_model": str(quantized), "layers": {
        "0": {"groups": [[0], [2], [5], [7]]}, "1": {"groups": [[1], [2], [3], [4], [6], [7]]}}})
    out = stream_export(str(quantized), tmp_path / "out", plan)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == Q.scheme_of_folder(quantized).method and "auto_map" in cfg
    model = load_moe(str(twin), dtype="float32", load_tokenizer=False)
    apply(model, plan)
    assert torch.equal(logits(hf_load(out, trust_remote_code=True)), logits(model.hf))
    assert torch.equal(logits(load_moe(str(out), dtype="float32", load_tokenizer=False).hf), logits(model.hf))


@pytest.mark.parametrize("kind", ["drop", "merge"])
def test_sharded_checkpoint_with_scales_in_another_shard(published, tmp_path, kind):
    """Scales and their weights in different shards (an index places them): the same tensors as
    from the single file, and the export loads."""
    from safetensors.torch import load_file, save_file

    quantized, twin = published["deepseek_v3_fp8"]
    sharded = tmp_path / "sharded"
    shutil.copytree(quantized, sharded)
    (sharded / "model.safetensors").unlink()
    sd = load_file(quantized / "model.safetensors")
    parts = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if not k.endswith("scale_inv")},
             "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k.endswith("scale_inv")}}
    for name, part in parts.items():
        save_file(part, sharded / name, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}))
    plan = (drop_plan if kind == "drop" else merge_plan)("deepseek_v3_fp8", sharded)
    single = stream_export(str(quantized), tmp_path / "single", plan)
    split = stream_export(str(sharded), tmp_path / "split", plan)
    assert stored(split) == stored(single)
    assert len(list(split.glob("*.safetensors"))) == 2 and (split / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(hf_load(split)), logits(hf_load(single)))


def test_in_memory_prune_writes_what_the_stream_writes(published, tmp_path):
    quantized, _ = published["deepseek_v3_fp8"]
    plan = drop_plan("deepseek_v3_fp8", quantized)
    streamed = stream_export(str(quantized), tmp_path / "streamed", plan)
    model = load_moe(str(quantized), dtype="float32", load_tokenizer=False)
    apply(model, plan)
    in_memory = export(model, tmp_path / "memory", plan=plan)
    assert stored(in_memory) == stored(streamed)
    assert json.loads((in_memory / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())


def test_cli_prune_of_fp8_is_smaller_and_stays_fp8(published, tmp_path, capfd):
    quantized, _ = published["deepseek_v3_fp8"]
    drop_plan("deepseek_v3_fp8", quantized).save(tmp_path / "p.json")
    assert main(["prune", str(quantized), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "out")]) == 0
    src = sum(t.nbytes for t in source_tensors(quantized).values())
    out = sum(t.nbytes for t in source_tensors(tmp_path / "out").values())
    assert out < src and {t.dtype for t in source_tensors(tmp_path / "out").values()} >= {"F8_E4M3", "F32"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_skip_list_follows_the_plan(published, tmp_path):
    quantized, _ = published["qwen3_moe_fp8"]
    src = tmp_path / "src"
    shutil.copytree(quantized, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] += ["model.layers.1.mlp.experts.5.down_proj",
                                                             "model.layers.1.mlp.experts.3.down_proj"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = stream_export(str(src), tmp_path / "out", drop_plan("qwen3_moe_fp8", src))
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.1.mlp.experts.2.down_proj" in skip  # expert 5 is the third kept one
    assert not any("experts.3" in s or "experts.5" in s for s in skip)  # expert 3 was dropped
    assert "model.layers.0.mlp.gate" in skip and "lm_head" in skip


@pytest.mark.slow
def test_lm_eval_on_a_quantized_export_is_moescopes_evaluation_of_the_plan(demo_dir, tmp_path):
    """``lm_eval --model hf`` on a streamed FP8 export of the demo model (a drop plan) gives the
    perplexity moescope's own lm-eval run gives the same plan applied to the dequantized twin."""
    import os
    import subprocess
    import sys

    from moescope.analysis.evaluation import LOCAL_TASKS_DIR, run_tasks

    quantized, twin = publish("demo_fp8", tmp_path / "demo", source=demo_dir)
    assert (quantized / "tokenizer.json").is_file() and Q.scheme_of_folder(quantized).format == "fp8-block"
    plan = PruningPlan.from_json({"version": 1, "base_model": str(quantized), "layers": {
        str(l): {"groups": [[0], [1], [3], [4], [6], [7]]} for l in range(4)}})
    folder = stream_export(str(quantized), tmp_path / "export", plan)
    model = load_moe(str(twin))
    apply(model, plan)
    task, limit = "moescope_demo_ppl_python", 1
    expected = run_tasks(model, [task], limit=limit, batch_size=1)[task]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
         "--tasks", task, "--include_path", str(LOCAL_TASKS_DIR), "--limit", str(limit), "--batch_size", "1",
         "--output_path", str(tmp_path / "res")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"][task]
    assert results["word_perplexity,none"] == pytest.approx(expected["word_perplexity"], rel=1e-5)
    assert results["bits_per_byte,none"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)


# ---- merging in the checkpoint's own format -------------------------------------------------------
@pytest.mark.parametrize("layout", ["deepseek_v3_fp8", "qwen3_moe_fp8", "gpt_oss_mxfp4", "qwen3_moe_ct_w4a16",
                                    "mixtral_ct_fp8"])
def test_merge_requantizes_with_the_schemes_rule(published, layout, tmp_path):
    quantized, twin = published[layout]
    plan = merge_plan(layout, quantized)
    out = stream_export(str(quantized), tmp_path / "out", plan)
    scheme = Q.scheme_of_folder(quantized)
    src, dst = stored(quantized), stored(out)
    # the merge of the dequantized members (the twin in memory), quantized with the scheme's rule
    model = load_moe(str(twin), dtype="float32", load_tokenizer=False)
    apply(model, plan)
    expected = {}
    for name, t in model.hf.state_dict().items():
        if ".experts." in name:
            expected[name] = t
    got = load_moe(str(out), dtype="float32", load_tokenizer=False) if layout in EXACT else None
    layer = str(MOE_LAYERS.get(layout, [0, 1])[0])
    if got is not None:  # transformers' dequantization of the export = Q(merge(twin)) dequantized
        for name, t in got.hf.state_dict().items():
            if f"layers.{layer}." in name and ".experts." in name and not name.endswith("bias"):
                ref = expected[name]
                if scheme.format == "mxfp4":
                    ckpt = name  # fused [E, in, out]
                    deq = Q.mxfp4_dequantize(*Q.mxfp4_quantize(ref))
                    assert torch.equal(t, deq), ckpt
                else:
                    scale = torch.bfloat16 if layout == "qwen3_moe_fp8" else torch.float32  # as the source stores it
                    for j in range(t.shape[0]):
                        deq = Q.fp8_block_dequantize(*Q.fp8_block_quantize(ref[j], scheme.block, scale), scheme.block)
                        assert torch.equal(t[j], deq), (name, j)
    # kept experts (groups [0] and [4], now 0 and 2) are the source's bytes; merged ones are new, same dtypes
    checked = 0
    for key, (dtype, shape, raw) in src.items():
        if f"layers.{layer}." not in key or ".experts." not in key:
            continue
        e = _expert_of(key, int(layer))
        if e is None:  # fused (mxfp4): rows 0 and 2 of the export are rows 0 and 4 of the source
            row = len(raw) // shape[0]
            new = dst[key][2]
            assert dst[key][0] == dtype and new[:row] == raw[:row] and new[2 * row:3 * row] == raw[4 * row:5 * row]
            checked += 1
        elif e in (0, 4):
            assert dst[key.replace(f"experts.{e}.", f"experts.{[0, 4].index(e) * 2}.")] == (dtype, shape, raw)
            checked += 1
        else:
            merged = dst[key.replace(f"experts.{e}.", f"experts.{1 if e in (2, 3) else 3}.")]
            assert merged[0] == dtype and merged[1] == shape
    assert checked
    card = (out / "README.md").read_text()
    assert "## Quantization" in card and "relative quantization error" in card
    errors = [float(line.rsplit("|", 2)[1]) for line in card.splitlines() if line.startswith("| `")]
    assert errors and all(0 < e < 0.2 for e in errors)
    assert sum(len(v[2]) for v in dst.values()) < sum(len(v[2]) for v in src.values())


@pytest.mark.parametrize("layout", ["qwen3_moe_fp8", "gpt_oss_mxfp4"])
@pytest.mark.parametrize("how", ["ties", "aligned", "folded"])
def test_ties_aligned_and_folded_merges_are_requantized_from_the_twins_merge(published, layout, how, tmp_path):
    """A merge the in-memory path computes (TIES, permuted members, or HC-SMoE's many-to-one neuron
    fold) is written as the scheme's quantization of the twin's merge, group of one included."""
    quantized, twin = published[layout]
    inter = 128 if layout.startswith("qwen") else 64
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(inter, generator=gen).tolist()
    fold = torch.randint(0, inter, (inter,), generator=gen).tolist()  # many-to-one onto member 2's neurons
    extra = {"operator": "ties", "density": 0.5} if how == "ties" else \
        {"permutations": [[None], [None, perm], [None], [None, None]]} if how == "aligned" else \
        {"folds": [None, [None, fold], None, [fold, None]]}
    plan = PruningPlan.from_json({"version": 1, "base_model": str(quantized), "layers": {str(l): {
        "groups": [[0], [2, 3], [4], [6, 7]], "coefficients": [[1.0], [0.5, 0.5], [1.0], [0.25, 0.75]], **extra}
        for l in (0, 1)}})
    out = stream_export(str(quantized), tmp_path / "out", plan)
    got = load_moe(str(out), dtype="float32", load_tokenizer=False).hf.state_dict()
    model = load_moe(str(twin), dtype="float32", load_tokenizer=False)
    apply(model, plan)
    scheme = Q.scheme_of_folder(quantized)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        ref = model.hf.state_dict()[name]
        if scheme.format == "mxfp4":
            want = Q.mxfp4_dequantize(*Q.mxfp4_quantize(ref))
        else:
            want = torch.stack([Q.fp8_block_dequantize(*Q.fp8_block_quantize(r, scheme.block, torch.bfloat16),
                                                       scheme.block) for r in ref])
        assert torch.equal(got[name], want), name


def test_merged_layers_can_stay_bf16_where_the_scheme_allows(published, tmp_path):
    """Block FP8: a layer holding a merged expert is written in bf16 whole and named in
    modules_to_not_convert (transformers fuses a layer's experts and needs all of one kind)."""
    quantized, twin = published["qwen3_moe_fp8"]
    plan = merge_plan("qwen3_moe_fp8", quantized)
    out = stream_export(str(quantized), tmp_path / "out", plan, merged_dtype="bf16")
    dst = stored(out)
    for j in range(4):
        assert dst[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"][0] == "BF16"
        assert f"model.layers.0.mlp.experts.{j}.gate_proj.weight_scale_inv" not in dst
    assert dst["model.layers.0.self_attn.q_proj.weight"][0] == "F8_E4M3"  # the rest stays as it was
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.mlp.experts" in skip and "model.layers.1.mlp.experts" in skip
    assert "(listed in `quantization_config.modules_to_not_convert`)" in (out / "README.md").read_text()
    model = load_moe(str(twin), dtype="float32", load_tokenizer=False)
    apply(model, plan)
    loaded = hf_load(out).state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert torch.equal(loaded[name].float(), model.hf.state_dict()[name].to(torch.bfloat16).float())


# ---- bad input: one line, nothing written -------------------------------------------------------------
def _damaged(published, tmp_path, layout, edit) -> Path:
    from safetensors.torch import load_file, save_file

    quantized, _ = published[layout]
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    sd = load_file(bad / "model.safetensors")
    cfg = json.loads((bad / "config.json").read_text())
    edit(sd, cfg)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(cfg))
    drop_plan(layout, bad).save(tmp_path / "p.json")
    return bad


CASES = {
    "missing scale": ("deepseek_v3_fp8",
                      lambda sd, cfg: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"),
                      "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"),
    "wrong-shaped scale": ("qwen3_moe_fp8",
                           lambda sd, cfg: sd.__setitem__("model.layers.0.self_attn.q_proj.weight_scale_inv",
                                                          torch.ones(3, 2, dtype=torch.bfloat16)),
                           "model.layers.0.self_attn.q_proj.weight_scale_inv is [3, 2]"),
    "mxfp4 scales": ("gpt_oss_mxfp4", lambda sd, cfg: sd.pop("model.layers.1.mlp.experts.down_proj_scales"),
                     "model.layers.1.mlp.experts.down_proj_scales"),
    "w4a16 shape": ("qwen3_moe_ct_w4a16", lambda sd, cfg: sd.pop("model.layers.0.mlp.experts.4.up_proj.weight_shape"),
                    "model.layers.0.mlp.experts.4.up_proj.weight_shape"),
    "block size": ("deepseek_v3_fp8",
                   lambda sd, cfg: cfg["quantization_config"].__setitem__("weight_block_size", [128, 0]),
                   "weight_block_size"),
    "group size": ("qwen3_moe_ct_w4a16",
                   lambda sd, cfg: cfg["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__(
                       "group_size", 0), "group_size"),
    # the scales were made for groups of 128; a config saying 64 does not match them
    "group size against the scales": ("qwen3_moe_ct_w4a16",
                                      lambda sd, cfg: cfg["quantization_config"]["config_groups"]["group_0"][
                                          "weights"].__setitem__("group_size", 64), "with group_size 64"),
    "fp8 block against the scales": ("deepseek_v3_fp8",
                                     lambda sd, cfg: cfg["quantization_config"].__setitem__("weight_block_size",
                                                                                            [64, 128]),
                                     "fp8 block-wise 64×128"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_quantized_checkpoint_is_refused_before_writing(published, tmp_path, capfd, case):
    layout, edit, named = CASES[case]
    bad = _damaged(published, tmp_path, layout, edit)
    capfd.readouterr()
    rc = main(["prune", str(bad), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("layout,named", [("gpt_oss_mxfp4", "mxfp4"), ("qwen3_moe_ct_w4a16", "compressed-tensors"),
                                          ("mixtral_ct_fp8", "compressed-tensors")])
def test_merge_into_a_scheme_that_cannot_hold_bf16_is_refused(published, tmp_path, capfd, layout, named):
    quantized, _ = published[layout]
    merge_plan(layout, quantized).save(tmp_path / "p.json")
    capfd.readouterr()
    rc = main(["prune", str(quantized), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "out"),
               "--merged-dtype", "bf16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--merged-dtype" in err[0] and named in err[0], err
    assert not (tmp_path / "out").exists()
