"""The streamed export's per-tensor work done once per run, shard or layer: a run of copied tensors
checked for NaN / infinity in one read (still naming the tensor that holds one), a shard's header
parsed once while the file is unchanged (and again once it changes), and transformers' converters
applied to a whole layer giving what they give tensor by tensor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.model import checkpoint
from test_checkpoint_validation import raw_file


def run_of(path):
    """The file's tensors, in the order of their bytes (one run, back to back)."""
    return sorted(checkpoint.read_header(path).values(), key=lambda t: t.start)


def test_a_run_of_copied_tensors_is_checked_as_one_and_the_bad_tensor_named(tmp_path, monkeypatch):
    tensors = {"a": torch.ones(7, dtype=torch.bfloat16), "b": torch.full((3, 5), 2.0), "c": torch.arange(4),
               "d": torch.ones(2, 3, dtype=torch.bfloat16), "e": torch.ones(9, dtype=torch.bfloat16)}
    reads = []
    real = checkpoint.check_finite
    monkeypatch.setattr(checkpoint, "check_finite", lambda t, what="": (reads.append((t.start, t.end)), real(t, what)))
    checkpoint.check_finite_run(run_of(raw_file(tmp_path / "ok.safetensors", tensors)))
    # one read per stretch of one dtype: a (bf16), b (f32), c (i64, skipped inside), d + e (bf16) together
    parts = run_of(tmp_path / "ok.safetensors")
    assert reads == [(parts[0].start, parts[0].end), (parts[1].start, parts[1].end), (parts[2].start, parts[2].end),
                     (parts[3].start, parts[4].end)]
    for bad_name, value in (("e", math.nan), ("d", math.inf), ("b", -math.inf)):
        bad = dict(tensors)
        bad[bad_name] = tensors[bad_name].clone()
        bad[bad_name].view(-1)[-1] = value
        path = raw_file(tmp_path / f"bad-{bad_name}.safetensors", bad)
        with pytest.raises(MoescopeError, match=rf"^tensor {bad_name} in .* holds non-finite values.*; x$"):
            checkpoint.check_finite_run(run_of(path), "; x")


def test_a_header_is_parsed_once_until_its_file_changes(tmp_path, monkeypatch):
    path = raw_file(tmp_path / "m.safetensors", {"w": torch.ones(2, 3)})
    parsed = []
    real = checkpoint._parse_header
    monkeypatch.setattr(checkpoint, "_parse_header", lambda p: (parsed.append(p), real(p))[1])
    first = checkpoint.read_header(path)
    first.pop("w")  # a caller changing its dict changes nobody else's
    second = checkpoint.read_header(path)
    assert len(parsed) == 1 and second["w"].shape == (2, 3)
    raw_file(path, {"w": torch.ones(4, 3), "v": torch.zeros(1)})  # rewritten: parsed again
    third = checkpoint.read_header(path)
    assert len(parsed) == 2 and third["w"].shape == (4, 3) and set(third) == {"w", "v"}
    path.write_bytes(path.read_bytes()[:-2])  # damaged afterwards: refused, never served from memory
    with pytest.raises(MoescopeError, match="not a valid safetensors file"):
        checkpoint.read_header(path)


def test_converters_applied_per_layer_give_what_they_give_per_tensor(tiny_dirs):
    """Qwen3-MoE's per-expert checkpoint tensors fused by one converter per layer (a deep copy per
    in-memory tensor, not per key) equal the fusion done one layer's experts at a time by hand."""
    from moescope.analysis.model import load_moe
    from moescope.analysis.model.checkpoint import read_tensor, validate_checkpoint

    src = Path(tiny_dirs["qwen3_moe"])
    skeleton = load_moe(str(src), dtype=None, weights=False)
    tensors, conv = validate_checkpoint(src, skeleton.hf, None)
    keys = [k for k in tensors if ".mlp.experts." in k and k.startswith("model.layers.0.")]
    assert len(keys) > 6  # per-expert keys (the hub layout)
    fused = conv.forward({k: read_tensor(tensors[k]) for k in keys})
    n = skeleton.layers[0].num_experts
    for name, t in fused.items():
        assert t.shape[0] == n
        for e in range(n):
            if name.endswith("down_proj"):
                want = read_tensor(tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"])
            else:
                want = torch.cat([read_tensor(tensors[f"model.layers.0.mlp.experts.{e}.{p}.weight"])
                                  for p in ("gate_proj", "up_proj")])
            assert torch.equal(t[e], want), (name, e)
    # and back, as save_pretrained writes them
    back = conv.revert(fused)
    assert sorted(back) == sorted(keys)
    for k in keys:
        assert torch.equal(back[k], read_tensor(tensors[k])), k


def test_the_streamed_prune_reports_its_wall_and_cpu_time(demo_available, tmp_path, monkeypatch, capfd):
    import json

    from moescope.analysis.core.cache import ENV_VAR
    from moescope.analysis.run.cli import main

    if not demo_available:
        pytest.skip("the demo model is not built")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "base_model": "demo",
                                "layers": {str(l): {"groups": [[0], [2], [5]]} for l in range(4)}}))
    capfd.readouterr()
    assert main(["prune", "demo", "--plan", str(plan), "-o", str(tmp_path / "a"), "--json"]) == 0
    took = json.loads(capfd.readouterr().out)["export_s"]
    assert took["wall"] > 0 and took["cpu"] > 0
    assert main(["prune", "demo", "--plan", str(plan), "-o", str(tmp_path / "b")]) == 0
    line = capfd.readouterr().out.splitlines()[-1]
    assert line.startswith("export took ") and " s wall, " in line and line.endswith(" s CPU (this process: user + system)")
