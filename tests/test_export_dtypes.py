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


def with_large_weight(tmp_path: Path) -> tuple[Path, Path]:
    """A bf16 Qwen3-MoE checkpoint whose first attention projection holds 1e5 (99,840 in bfloat16, beyond float16's
    65,504), and a plan for it."""
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5
    src = tmp_path / "src"
    model.save_pretrained(src)
    plan = plan_for(str(src), "uniform_drop")
    plan.save(tmp_path / "plan.json")
    return src, tmp_path / "plan.json"


def test_a_cast_beyond_the_dtypes_range_is_refused_on_both_paths(tmp_path):
    """``--dtype float16`` of a bf16 weight of 99,840 would write infinity: refused in one line naming
    the tensor and the range, nothing at the output path, the in-memory model left as it was."""
    from moescope.analysis.core.errors import MoescopeError
    from moescope.analysis.pruning.plan import PruningPlan
    from moescope.analysis.run.export import stream_export

    src, plan_file = with_large_weight(tmp_path)
    plan = PruningPlan.load(plan_file)
    with pytest.raises(MoescopeError, match=r"self_attn\.q_proj\.weight holds 9.984e\+04, beyond float16's range") as err:
        stream_export(str(src), tmp_path / "stream", plan, dtype="float16")
    assert "\n" not in str(err.value) and not (tmp_path / "stream").exists()
    model = load_moe(str(src))
    apply(model, plan)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with pytest.raises(MoescopeError, match=r"q_proj\.weight holds 9.984e\+04, beyond float16's range"):
        export(model, tmp_path / "mem", plan=plan, dtype="float16")
    assert not (tmp_path / "mem").exists()
    after = model.hf.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    export(model, tmp_path / "kept", plan=plan)  # the checkpoint's own bfloat16 holds it
    assert float(tensors(tmp_path / "kept")["model.layers.0.self_attn.q_proj.weight"][0, 0]) == 99840.0


def test_the_cli_refuses_a_lossy_dtype_in_one_line(tmp_path, capfd):
    src, plan_file = with_large_weight(tmp_path)
    capfd.readouterr()
    assert main(["prune", str(src), "--plan", str(plan_file), "-o", str(tmp_path / "out"), "--dtype", "float16"]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("moescope: error:")]
    assert len(err) == 1 and "beyond float16's range" in err[0] and "--dtype" in err[0], err
    assert not (tmp_path / "out").exists()
