"""Issue 25: a plan applied to the checkpoint shard by shard (analysis/model/stream_export.py) writes,
tensor by tensor, what load_moe → apply → save writes, on every family and both demos, for a
uniform drop, a non-uniform drop and a merge with permutations; the config and every other file
too. A folder is never left half-written (a kill between two shards, a full disk, a broken
source), and the source is only read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import load_moe
from moescope.analysis.model import stream_export as stream
from moescope.analysis.model.alignment import intermediate_size
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.export import export, stream_export
from safetensors import safe_open

PLANS = ("uniform_drop", "nonuniform_drop", "merge_permuted")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                assert k not in out, f"{k} is in two shards of {folder}"
                out[k] = fh.get_tensor(k)
    return out


def plan_for(source: str, kind: str) -> PruningPlan:
    """A plan of ``kind`` that every family accepts (group-limited routers: groups stay within
    their routing group and equal in size)."""
    skeleton = load_moe(source, weights=False)
    layers = skeleton.moe_layers
    view = skeleton.layers[layers[0]]
    n = view.num_experts
    n_group = view.router_params.n_group if skeleton.family.group_limited else 1
    per = n // n_group
    if kind == "uniform_drop":  # every MoE layer keeps every other expert
        spec = {str(l): {"groups": [[e] for e in range(0, n, 2)]} for l in layers}
    elif kind == "nonuniform_drop":  # the first MoE layer keeps all but the first of each routing group
        spec = {str(layers[0]): {"groups": [[e] for e in range(n) if e % per]}}
    else:  # pairs merged with random permutations and unequal coefficients, others kept
        I = intermediate_size(view)
        g = torch.Generator().manual_seed(7)
        groups, coeffs, perms = [], [], []
        for r in range(n_group):
            base = r * per
            groups += [[base, base + 1], [base + 2]] + [[e] for e in range(base + 3, base + per)]
            coeffs += [[0.625, 0.375], [1.0]] + [[1.0]] * (per - 3)
            perms += [[None, torch.randperm(I, generator=g).tolist()], None] + [None] * (per - 3)
        spec = {str(layers[-1]): {"groups": groups, "coefficients": coeffs, "permutations": perms}}
    plan = PruningPlan.from_json({"version": 1, "base_model": source, "layers": spec})
    plan.validate_for(skeleton)
    return plan


def in_memory(source: str, plan: PruningPlan, out: Path, transformers_only: bool = False) -> Path:
    model = load_moe(source)
    apply(model, plan)
    return export(model, out, plan=plan, transformers_only=transformers_only)


def assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb), (sorted(set(ta) ^ set(tb)))[:6]
    for k in ta:
        x, y = ta[k], tb[k]
        assert (x.dtype, tuple(x.shape)) == (y.dtype, tuple(y.shape)), k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{k} differs"
    others = sorted(p.name for p in a.iterdir() if p.suffix != ".safetensors" and p.name != stream.INDEX_FILE)
    assert others == sorted(p.name for p in b.iterdir() if p.suffix != ".safetensors" and p.name != stream.INDEX_FILE)
    marker = ".moescope-export"  # lists the folder's files: the weight shards may be named differently
    for name in (n for n in others if n != marker):  # config, generation config, tokenizer, plan, card, module
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"

    def listed(folder: Path) -> list[str]:
        files = json.loads((folder / marker).read_text())["files"]
        return [f for f in files if not f.endswith(".safetensors") and f != stream.INDEX_FILE]
    assert listed(a) == listed(b)


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_in_memory_on_every_family(tiny_dirs, tmp_path, family, kind):
    from moescope.analysis.model.vllm_plugin import SERVED_FAMILIES

    source = tiny_dirs[family]
    plan = plan_for(source, kind)
    only = family not in SERVED_FAMILIES  # a non-uniform folder vLLM cannot serve is asked for transformers alone
    assert_same_folder(in_memory(source, plan, tmp_path / "mem", only),
                       stream_export(source, tmp_path / "stream", plan, transformers_only=only))
    if kind == "nonuniform_drop":
        assert (tmp_path / "stream" / "modeling_moescope.py").is_file()
        assert json.loads((tmp_path / "stream" / "config.json").read_text())["moescope_num_experts_per_layer"]


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("demo", ["demo", "demo-upcycled"])
def test_streamed_equals_in_memory_on_the_demos(demo_available, tmp_path, demo, kind):
    if not demo_available:
        pytest.skip("demo model not built")
    plan = plan_for(demo, kind)
    assert_same_folder(in_memory(demo, plan, tmp_path / "mem"), stream_export(demo, tmp_path / "stream", plan))


def test_a_merge_really_merges_and_a_drop_copies(tiny_dirs, tmp_path):
    """Hand check on Qwen3-MoE (hub layout, one file per expert matrix): a kept expert is its
    source bytes renumbered; a merged one is c₁·W₀ + c₂·P(W₁) with W₁'s intermediate neurons
    permuted (rows of gate/up, columns of down); the router row is c₁·r₀ + c₂·r₁."""
    source = tiny_dirs["qwen3_moe"]
    plan = plan_for(source, "merge_permuted")
    lp = plan.layers[max(plan.layers)]
    out = tensors(stream_export(source, tmp_path / "s", plan))
    src = tensors(Path(source))
    pre = f"model.layers.{max(plan.layers)}.mlp"
    perm = torch.tensor(lp.permutations[0][1])
    gate = 0.625 * src[f"{pre}.experts.0.gate_proj.weight"] + 0.375 * src[f"{pre}.experts.1.gate_proj.weight"][perm]
    down = 0.625 * src[f"{pre}.experts.0.down_proj.weight"] + 0.375 * src[f"{pre}.experts.1.down_proj.weight"][:, perm]
    torch.testing.assert_close(out[f"{pre}.experts.0.gate_proj.weight"], gate, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[f"{pre}.experts.0.down_proj.weight"], down, rtol=0, atol=1e-6)
    assert torch.equal(out[f"{pre}.experts.1.up_proj.weight"], src[f"{pre}.experts.2.up_proj.weight"])
    assert torch.equal(out[f"{pre}.experts.6.down_proj.weight"], src[f"{pre}.experts.7.down_proj.weight"])
    router = 0.625 * src[f"{pre}.gate.weight"][0] + 0.375 * src[f"{pre}.gate.weight"][1]
    torch.testing.assert_close(out[f"{pre}.gate.weight"][0], router, rtol=0, atol=1e-6)
    assert out[f"{pre}.gate.weight"].shape[0] == 7 and f"{pre}.experts.7.up_proj.weight" not in out


def reshard(source: Path, dest: Path, parts: int = 3) -> Path:
    """``source`` rewritten as ``parts`` safetensors shards with an index (as big checkpoints come)."""
    from safetensors.torch import save_file

    shutil.copytree(source, dest)
    (dest / "model.safetensors").unlink()
    t = tensors(source)
    names = sorted(t)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({k: t[k].contiguous() for k in chunk}, str(dest / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (dest / stream.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sharded_source_gives_sharded_output_with_index(tiny_dirs, tmp_path):
    source = reshard(Path(tiny_dirs["mixtral"]), tmp_path / "src")
    plan = plan_for(str(source), "merge_permuted")
    out = stream_export(str(source), tmp_path / "out", plan)
    index = json.loads((out / stream.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("*.safetensors"))
    t = tensors(out)
    assert sorted(index["weight_map"]) == sorted(t)
    assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in t.values())
    assert index["metadata"]["total_parameters"] == load_moe(str(out), weights=False).hf.num_parameters()
    assert_same_folder(in_memory(tiny_dirs["mixtral"], plan, tmp_path / "mem"), out)


def test_dtype_none_keeps_the_checkpoint_dtypes(tiny_dirs, tmp_path):
    """bf16 checkpoint, ``dtype=None``: every written tensor keeps its source dtype (no upcast), and
    ``dtype='bfloat16'`` / ``'float32'`` write what the in-memory path writes in that dtype."""
    from moescope.analysis.model.synthetic import tiny_model

    src = tmp_path / "bf16"
    tiny_model("deepseek_v3", dtype=torch.bfloat16).save_pretrained(src)
    plan = plan_for(str(src), "merge_permuted")
    kept = tensors(stream_export(str(src), tmp_path / "keep", plan, dtype=None))
    source = tensors(src)
    assert all(kept[k].dtype == source[k].dtype for k in kept if k in source)
    for dtype in ("bfloat16", "float32"):  # as asked: float32 casts every tensor on the way
        model = load_moe(str(src), dtype=dtype)
        apply(model, plan)
        assert_same_folder(export(model, tmp_path / f"mem-{dtype}", plan=plan, dtype=dtype),
                           stream_export(str(src), tmp_path / dtype, plan, dtype=dtype))


# ---- bad input: one line naming the file, nothing at the output path, the source untouched ------
def refused(source: Path, plan: PruningPlan, out: Path, match: str) -> str:
    before = digest(source)
    with pytest.raises(MoescopeError, match=match) as err:
        stream_export(str(source), out, plan)
    assert "\n" not in str(err.value)
    assert not out.exists(), f"{out} was left behind"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    assert digest(source) == before
    return str(err.value)


def test_shards_that_do_not_match_their_index_are_refused(tiny_dirs, tmp_path):
    source = reshard(Path(tiny_dirs["qwen3_moe"]), tmp_path / "src")
    plan = plan_for(str(source), "uniform_drop")
    index = json.loads((source / stream.INDEX_FILE).read_text())
    # the index places a tensor in a shard that does not hold it
    moved = dict(index, weight_map={**index["weight_map"], "model.norm.weight": "model-00001-of-00003.safetensors"})
    if index["weight_map"]["model.norm.weight"] == "model-00001-of-00003.safetensors":
        moved["weight_map"]["model.norm.weight"] = "model-00002-of-00003.safetensors"
    (source / stream.INDEX_FILE).write_text(json.dumps(moved))
    msg = refused(source, plan, tmp_path / "out", "does not hold model.norm.weight")
    assert "model-0000" in msg and "index" in msg
    # a shard the index names is missing
    (source / stream.INDEX_FILE).write_text(json.dumps(index))
    (source / "model-00003-of-00003.safetensors").unlink()
    refused(source, plan, tmp_path / "out", r"model-00003-of-00003\.safetensors' is missing")


def test_a_tensor_missing_for_an_edited_layer_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "src"
    shutil.copytree(tiny_dirs["mixtral"], source)
    t = tensors(source)
    del t["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(t, str(source / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_for(str(source), "uniform_drop")
    msg = refused(source, plan, tmp_path / "out", "experts.3")
    assert "layers.1." in msg and str(source) in msg


def test_a_full_disk_mid_write_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    """The second tensor write fails with ENOSPC (what a full disk says): one line naming the
    shard being written, the partial folder removed, the source untouched."""
    import errno

    calls = {"n": 0}
    real = stream._write

    def full(fh, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(stream, "_write", full)
    source = Path(tiny_dirs["olmoe"])
    msg = refused(source, plan_for(str(source), "merge_permuted"), tmp_path / "out", "(?i)no space left on (the )?device")
    assert ".safetensors" in msg


def test_a_full_disk_during_a_kernel_copy_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    import errno

    def full(src_fd, dst_fd, offset, count):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "_copy_range", full)
    source = Path(tiny_dirs["mixtral"])
    refused(source, plan_for(str(source), "uniform_drop"), tmp_path / "out", "(?i)no space left on (the )?device")


@pytest.mark.slow
def test_a_kill_between_shards_leaves_nothing_and_a_rerun_completes(tiny_dirs, tmp_path):
    """A real ``moescope prune`` (streamed: no evaluation) SIGKILLed when it opens its second
    output shard, the first one written: no folder at the output path, the source untouched; the
    same command again completes, equal to the in-memory export."""
    import signal

    source = reshard(Path(tiny_dirs["qwen3_moe"]), tmp_path / "src")
    plan = plan_for(str(source), "nonuniform_drop")
    plan_path = plan.save(tmp_path / "plan.json")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    before = digest(source)
    env = {**os.environ, "MOESCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MOESCOPE_FAULT_AT": f"write:{work}/*part00001.safetensors"}
    argv = [str(Path(sys.executable).with_name("moescope")), "prune", str(source), "--plan", str(plan_path),
            "-o", str(out), "--json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    assert digest(source) == before
    env.pop("MOESCOPE_FAULT_AT")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["streamed"] is True
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # the killed run's temporary folder is gone
    assert_same_folder(in_memory(str(source), plan, tmp_path / "mem"), out)


# ---- evaluation layer-streamed, and `export` of its experiment -----------------------------------
def test_offloaded_evaluation_matches_in_memory_and_export_streams_the_same_folder(demo_available, tmp_path):
    """``prune --offload``: the perplexities of the original and of the streamed pruned folder,
    each evaluated with its layers on disk, equal those of the in-memory run; ``export`` of the
    stored experiment writes (streamed) the same weights again."""
    if not demo_available:
        pytest.skip("demo model not built")
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation import EvalSpec
    from moescope.analysis.run import experiments
    from moescope.analysis.run.export import export_experiment, stream_prune_and_evaluate

    cache = Cache(tmp_path / "cache")
    plan = plan_for("demo", "merge_permuted")
    spec = EvalSpec(ppl=["demo:all"], samples=4, seq_len=64, efficiency=False)
    exp = stream_prune_and_evaluate("demo", tmp_path / "streamed", plan, spec, tmp_path / "offload", cache=cache)
    model = load_moe("demo")
    mem = experiments.prune_and_evaluate(model, plan, spec, cache=Cache(tmp_path / "cache2"), store=False)
    for side in ("reference", "result"):
        got, want = getattr(exp, side)["ppl"]["demo:all"], getattr(mem, side)["ppl"]["demo:all"]
        assert got == pytest.approx(want, rel=1e-5), side
    assert exp.result["ppl"]["demo:all"] != exp.reference["ppl"]["demo:all"]
    assert exp.structure["after"]["experts"] == mem.structure["after"]["experts"]
    assert json.loads((tmp_path / "streamed" / "experiment.json").read_text())["id"] == exp.id
    assert list((tmp_path / "offload").iterdir()) == []  # the offload folders are removed
    experiments.store(exp, cache)
    again = export_experiment(exp.id, tmp_path / "exported", cache=cache)
    ta, tb = tensors(tmp_path / "streamed"), tensors(again)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(MoescopeError, match="--no-efficiency"):
        stream_prune_and_evaluate("demo", tmp_path / "x", plan, EvalSpec(ppl=["demo:all"]), tmp_path / "offload",
                                  cache=cache)
    assert not (tmp_path / "x").exists()
