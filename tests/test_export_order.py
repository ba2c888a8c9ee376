"""Cheap checks for the fast loop (the slow ones kill real processes, tests/test_faults.py):

- an export's completion marker is written after every file of the folder, so a writer killed
  mid-write leaves a folder that the next writer removes instead of renaming into place;
- per-layer (non-uniform) exports pair each layer with its own count when the counts fall or go
  up and down across layers, not only when they rise.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import torch
from moescope.analysis.model import load_moe, wrap_model
from moescope.analysis.model.save import _TMP_TAG, MARKER_FILE, atomic_output_dir, sweep_stale_siblings
from moescope.analysis.model.synthetic import tiny_model
from moescope.analysis.pruning.plan import PruningPlan
from moescope.analysis.pruning.prune import apply
from moescope.analysis.run.export import export


def _reaped() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_marker_is_written_after_every_file_of_an_export(tmp_path):
    model = wrap_model(tiny_model("mixtral"), source="tiny-mixtral")
    real = model.write_files
    seen = {}

    def write_files(folder):
        seen["before"] = (folder / MARKER_FILE).exists()
        real(folder)
        seen["after"] = (folder / MARKER_FILE).exists()
        seen["files"] = sorted(p.name for p in folder.iterdir())

    model.write_files = write_files
    out = export(model, tmp_path / "out")
    assert seen["before"] is False and seen["after"] is False, "the completion marker came before the weights"
    assert any(n.endswith(".safetensors") for n in seen["files"]) and "config.json" in seen["files"]
    assert (out / MARKER_FILE).is_file() and (out / "README.md").is_file()
    assert not list(tmp_path.glob(f".out{_TMP_TAG}*"))


def test_a_writer_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    """The folder as a killed writer leaves it (its temporary sibling, named with its dead process
    id, holding what was written so far) is swept away, and nothing appears at the output path."""
    out = tmp_path / "export"
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}", encoding="utf-8")
        (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half")  # the kill comes here
        left = tmp.parent / tmp.name.replace(tmp.name.rpartition(_TMP_TAG)[2], str(_reaped()))
        shutil.copytree(tmp, left)
        raise RuntimeError("killed")
    assert left.is_dir() and not (left / MARKER_FILE).exists()
    sweep_stale_siblings(out)
    assert not out.exists() and not left.exists()
    # while a completed folder of a dead writer (marked) is put in place
    done = tmp_path / f".export{_TMP_TAG}{_reaped()}"
    done.mkdir()
    (done / "config.json").write_text("{}", encoding="utf-8")
    (done / MARKER_FILE).write_text("{}", encoding="utf-8")
    sweep_stale_siblings(out)
    assert (out / "config.json").is_file() and not done.exists()


def drop_plan(model, counts: dict[int, int]) -> PruningPlan:
    """Keep ``counts[l]`` experts in layer l, a different set in every layer (the first of the
    experts in the order 3l, 3l + 1, … mod 8), so a layer given another layer's count or rows shows."""
    keep = {}
    for l, n in counts.items():
        order = [(e + 3 * l) % 8 for e in range(8)]  # a different set per layer
        keep[l] = sorted(order[:n])
    return PruningPlan.from_keep(model.source, keep)


@pytest.mark.parametrize("shape, counts", [("falling", [7, 5, 3]), ("mixed", [5, 7, 4]), ("mixed2", [6, 3, 6])])
def test_per_layer_exports_pair_each_layer_with_its_count(shape, counts, tmp_path):
    original = tiny_model("mixtral", num_hidden_layers=3)
    model = wrap_model(copy.deepcopy(original), source="tiny-mixtral")
    layers = model.moe_layers
    assert len(layers) == 3
    plan = drop_plan(model, dict(zip(layers, counts)))
    apply(model, plan)
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model.hf(input_ids=ids).logits
    folder = export(model, tmp_path / shape)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["moescope_num_experts_per_layer"] == {str(l): c for l, c in zip(layers, counts)}
    reloaded = load_moe(str(folder))
    assert reloaded.num_experts() == dict(zip(layers, counts))
    source = wrap_model(original)
    for l in layers:
        kept = plan.layers[l].kept()
        torch.testing.assert_close(reloaded.layers[l].router_weight, source.layers[l].router_weight[kept],
                                   rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.hf(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_every_exported_file_has_the_mode_a_plain_file_gets(tmp_path):
    """transformers' safetensors writer creates 0600 files; an export's files and folders all get
    what ``open``/``mkdir`` give under the umask (0644 / 0755 under the usual 022), so the weights
    are as readable as the config beside them."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = export(wrap_model(tiny_model("mixtral"), source="tiny-mixtral"), tmp_path / "out")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert "model.safetensors" in modes
    assert all(m == (0o755 if (out / n).is_dir() else 0o644) for n, m in modes.items()), modes
