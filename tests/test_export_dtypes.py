"""Issue 33: an export keeps the checkpoint's own dtypes unless ``--dtype`` is given, so a pruned
model is never larger than the part of the source it keeps. A bfloat16 checkpoint pruned by the CLI
(streamed, the default without evaluation; in memory, with evaluation in float32) or exported through
the API comes out bfloat16, tensor by tensor, with the same bytes either way, and the model card
states the dtypes and the bytes against the source's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CORE_FAMILIES
from moescope.analysis.core.paths import demo_model_dir
from moescope.analysis.model import load_moe
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.cli import main
from moescope.analysis.run.export import export
from test_stream_export import assert_same_folder, plan_for, tensors


def bf16_checkpoint(family: str, where: Path) -> Path:
    tiny_model(family, dtype=torch.bfloat16).save_pretrained(where)
    return where


def source_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(folder).values())


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_a_bf16_checkpoint_is_pruned_into_bf16_on_both_paths(tmp_path, family, capsys):
    """``moescope prune SRC --plan P -o OUT`` (streamed) and ``load_moe`` in float32 → apply →
    ``export`` (in memory) write the same folder; every tensor has its source dtype, and the
    export holds fewer bytes than the source (half the experts of every MoE layer dropped)."""
    from moescope.analysis.model.vllm_plugin import SERVED_FAMILIES

    src = bf16_checkpoint(family, tmp_path / "src")
    plan = plan_for(str(src), "uniform_drop")
    plan.save(tmp_path / "plan.json")
    only = ["--transformers-only"] if family not in SERVED_FAMILIES else []
    assert main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "cli"), *only]) == 0
    model = load_moe(str(src))  # float32, the working dtype
    assert next(model.hf.parameters()).dtype == torch.float32
    apply(model, plan)
    mem = export(model, tmp_path / "mem", plan=plan, transformers_only=bool(only))
    assert_same_folder(tmp_path / "cli", mem)

    source, written = tensors(src), tensors(mem)
    # outside the routed experts and routers (renumbered or cut by the plan) every tensor is the source's
    unchanged = [k for k in written if k in source and ".experts." not in k and written[k].shape == source[k].shape
                 and not any(r in k for r in (".gate.", ".router."))]
    assert len(unchanged) > 5, unchanged
    for k in written:
        if k in source:
            assert written[k].dtype == source[k].dtype, f"{k}: {source[k].dtype} written as {written[k].dtype}"
    for k in unchanged:  # kept bf16 tensors come back bit for bit (float32 holds every bfloat16 exactly)
        assert torch.equal(written[k].view(torch.uint8), source[k].view(torch.uint8)), k
    assert source_bytes(mem) < source_bytes(src)
    assert json.loads((mem / "config.json").read_text())["dtype"] == "bfloat16"
    assert "Weights written: BF16" in (mem / "README.md").read_text()


def test_dtype_given_casts_and_the_card_says_so(tmp_path):
    src = bf16_checkpoint("qwen3_moe", tmp_path / "src")
    plan = plan_for(str(src), "uniform_drop")
    plan.save(tmp_path / "plan.json")
    assert main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "f32"),
                 "--dtype", "float32"]) == 0
    written = tensors(tmp_path / "f32")
    assert {t.dtype for t in written.values()} == {torch.float32}
    card = (tmp_path / "f32" / "README.md").read_text()
    assert "F32 is not a dtype of the source (asked with --dtype)" in card


def test_prune_with_evaluation_evaluates_in_float32_and_writes_bf16(demo_available, tmp_path):
    """The in-memory path: the demo saved in bfloat16, pruned with ``--ppl`` (evaluated in float32):
    the folder holds bfloat16 weights that reload with the logits of the same plan applied to the
    checkpoint loaded in bfloat16."""
    if not demo_available:
        pytest.skip("demo model not built")
    src = tmp_path / "demo-bf16"
    model = load_moe(str(demo_model_dir()))
    model.hf.to(torch.bfloat16).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(demo_model_dir() / f, src / f)
    keep = {str(l): {"groups": [[e] for e in range(0, 8, 2)]} for l in range(4)}
    (tmp_path / "plan.json").write_text(json.dumps({"version": 1, "base_model": str(src), "layers": keep}))
    rc = main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out"),
               "--ppl", "demo:all", "--samples", "2", "--seq-len", "32", "--no-efficiency", "--json"])
    assert rc == 0
    out = tmp_path / "out"
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    assert source_bytes(out) < source_bytes(src)
    from moescope.analysis.pruning.plan import PruningPlan

    pruned = load_moe(str(src), dtype="bfloat16")  # the checkpoint in its own dtype, pruned in memory
    apply(pruned, PruningPlan.load(tmp_path / "plan.json"))
    ids = torch.arange(1, 17).unsqueeze(0)
    want = pruned.hf(ids).logits
    got = load_moe(str(out), dtype="bfloat16").hf(ids).logits
    assert torch.equal(want, got)
