"""Speed figures are stated only when the measurement can tell them from noise."""

from __future__ import annotations

import threading
import time

import pytest
from moescope.analysis.evaluation.efficiency import BUSY_CORES, MachineLoad, measurement_slot, speed_verdict


def eff(runs, busy=0.0):
    return {"generate_tokens_per_s": sorted(runs)[len(runs) // 2], "generate_tokens_runs": runs, "busy_cores": busy}


def test_a_clear_speed_up_is_stated_with_its_range():
    v = speed_verdict(eff([120, 121, 122]), eff([100, 101, 102]))
    assert v["noise"] is None and v["ratio"] == pytest.approx(121 / 101)
    assert (v["low"], v["high"]) == (pytest.approx(120 / 102), pytest.approx(122 / 100))


def test_a_range_covering_one_or_a_busy_machine_is_within_noise():
    covers = speed_verdict(eff([95, 104, 110]), eff([100, 101, 102]))
    assert covers["noise"].startswith("the repeats' range") and covers["low"] < 1 < covers["high"]
    busy = speed_verdict(eff([150, 151, 152]), eff([100, 101, 102], busy=BUSY_CORES + 0.5))
    assert "cores busy" in busy["noise"]
    assert speed_verdict(None, eff([1, 2, 3])) is None


def test_machine_load_counts_other_processes_not_this_one():
    with MachineLoad() as quiet:  # this process spins: not counted as load
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            pass
    assert quiet.cores is not None and quiet.cores < 1.0


def test_speed_measurements_take_turns(tmp_path):
    order = []

    def measure(name):
        with measurement_slot(str(tmp_path), progress=lambda stage, d, t: order.append(f"{name} {stage}")):
            order.append(f"{name} in")
            time.sleep(0.3)
            order.append(f"{name} out")

    first = threading.Thread(target=measure, args=("a",))
    first.start()
    time.sleep(0.1)
    measure("b")
    first.join()
    assert order == ["a in", "b waiting for another speed measurement", "a out", "b in", "b out"]
