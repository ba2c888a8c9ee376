"""Speed figures are stated only when the measurement can tell them from noise."""

from __future__ import annotations

import threading

import pytest
from moescope.analysis.evaluation.efficiency import (
    BUSY_CORES,
    SLOT_WAIT,
    MachineLoad,
    measurement_slot,
    speed_verdict,
)


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


class Readings:
    """Given readings in turn: the machine's busy CPU seconds, this process's, the clock."""

    def __init__(self, machine, own, clock):
        self.values = {"machine": list(machine), "own": list(own), "clock": list(clock)}

    def reader(self, name):
        return lambda: self.values[name].pop(0)


def load_from(machine, own, clock) -> float | None:
    r = Readings(machine, own, clock)
    with MachineLoad(r.reader("machine"), r.reader("own"), r.reader("clock")) as load:
        pass
    return load.cores


def test_machine_load_counts_other_processes_not_this_one():
    # 2 s of wall time; the machine spent 5 CPU seconds busy, 1.5 of them this process's own
    assert load_from(machine=[100.0, 105.0], own=[10.0, 11.5], clock=[50.0, 52.0]) == pytest.approx(1.75)
    # this process alone kept a core busy: nothing left for the others
    assert load_from(machine=[100.0, 102.0], own=[10.0, 12.0], clock=[50.0, 52.0]) == 0.0
    # tick rounding can make the own share exceed the machine's: never a negative load
    assert load_from(machine=[100.0, 100.9], own=[10.0, 11.0], clock=[0.0, 1.0]) == 0.0
    # no /proc/stat (not Linux): unknown, not zero
    assert load_from(machine=[None, None], own=[0.0, 1.0], clock=[0.0, 1.0]) is None


def test_the_default_readings_are_the_real_ones():
    import os

    from moescope.analysis.evaluation.efficiency import _busy_cpu_seconds, _own_cpu_seconds

    load = MachineLoad()
    assert load._machine is _busy_cpu_seconds and load._own is _own_cpu_seconds
    t = os.times()
    assert _own_cpu_seconds() >= t.user + t.system
    with load:
        pass
    assert load.cores is None or load.cores >= 0.0


def test_speed_measurements_take_turns(tmp_path):
    """b asks while a holds the slot: b reports it waits and gets in only after a is out (events,
    not sleeps, order the two, so a slow machine cannot reorder them)."""
    order = []
    a_inside, b_waiting = threading.Event(), threading.Event()

    def progress(name):
        def report(stage, done, total):
            order.append(f"{name} {stage}")
            b_waiting.set()
        return report

    def first():
        with measurement_slot(str(tmp_path), progress=progress("a")):
            order.append("a in")
            a_inside.set()
            assert b_waiting.wait(60)
            order.append("a out")

    thread = threading.Thread(target=first)
    thread.start()
    assert a_inside.wait(60)
    with measurement_slot(str(tmp_path), progress=progress("b")):
        order.append("b in")
        order.append("b out")
    thread.join()
    assert order == ["a in", f"b {SLOT_WAIT}", "a out", "b in", "b out"]
