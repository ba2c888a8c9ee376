"""Small Streamlit helpers shared by the pages: settings, one-line errors, progress, pickers."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st
from moescope.dashboard import backend, plans
from moescope.dashboard.backend import MoescopeError, PruningPlan, Settings
from moescope.dashboard.runs import clock

STAGES = {"layers": "decoder layers", "layer steps": "steps of the current layer (routing, expert outputs, similarities, criteria)",
          "gradients": "gradient chunks", "trace": "routing trace",
          "cells": "drop-grid cells", "rounds": "rounds"}


def settings() -> Settings:
    return Settings.from_state(st.session_state)


def fail(err: Exception) -> None:
    """Show a user mistake as one line and stop the page."""
    st.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    st.stop()


def guarded(fn: Callable, *args, **kwargs):
    """``fn(*args)``, or its :class:`MoescopeError` as one line (page stopped)."""
    try:
        return fn(*args, **kwargs)
    except MoescopeError as err:
        fail(err)


class Progress:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage inside ``st.status``,
    each with its time so far and, from its pace, the time left; the box's label counts the
    seconds and says how long the same work took last time (the whole-build estimate)."""

    def __init__(self, label: str, estimate: float | None = None):
        import time

        self.label, self.estimate = label, estimate
        self.status = st.status(label, expanded=True)
        self.bars: dict = {}
        self.started: dict[str, float] = {}
        self.t0 = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = self.status.progress(0.0)
            self.started[stage] = now
        spent = now - self.started[stage]
        text = f"{STAGES.get(stage, stage)}: {done} / {total} · {clock(spent)}"
        if 0 < done < total:
            text += f" · about {clock(spent / done * (total - done))} left"
        bar.progress(min(1.0, done / max(total, 1)), text=text)

    def tick(self) -> None:
        """Refresh the box's label with the time so far (and the estimate's time left)."""
        import time

        spent = time.monotonic() - self.t0
        text = f"{self.label} {clock(spent)}"
        if self.estimate:
            text += (f" · about {clock(self.estimate - spent)} left (took {clock(self.estimate)} last time)"
                     if spent < self.estimate else f" · took {clock(self.estimate)} last time")
        self.status.update(label=text)

    def done(self, label: str) -> None:
        self.status.update(label=label, state="complete", expanded=False)

    def failed(self, label: str) -> None:
        self.status.update(label=label, state="error", expanded=False)


def run_with_progress(label: str, fn: Callable, s: Settings, done_label: str):
    """Run ``fn(s, progress)`` in a worker thread while this script run draws its progress: the
    stages it reports, a clock, and how long the same work (``label``) took last time in this
    session. The worker never calls Streamlit; a :class:`MoescopeError` becomes one line."""
    import threading
    import time

    from streamlit.runtime.scriptrunner import add_script_run_ctx

    took = st.session_state.setdefault("_took", {})
    progress = Progress(label, took.get(label))
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    box: dict = {}

    def record(stage: str, done: int, total: int) -> None:
        with lock:
            events.append((stage, done, total))

    def work() -> None:
        try:
            box["out"] = fn(s, record)
        except BaseException as err:  # noqa: BLE001 - handed to the script thread, which raises it
            box["err"] = err

    worker = threading.Thread(target=work, daemon=True)
    add_script_run_ctx(worker)  # the backend's st.cache_* wrappers run in it (it draws nothing)
    t0 = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.5)
        with lock:
            latest = {}
            for stage, done, total in events:
                latest[stage] = (done, total)
            events.clear()
        for stage, (done, total) in latest.items():
            progress(stage, done, total)
        progress.tick()
    for stage, done, total in events:
        progress(stage, done, total)
    if "err" in box:
        if isinstance(box["err"], MoescopeError):
            progress.failed("Failed")
            fail(box["err"])
        raise box["err"]
    took[label] = time.monotonic() - t0
    progress.done(f"{done_label} ({clock(took[label])})")
    return box["out"]


def require_stored(find: Callable, compute: Callable, s: Settings, message: str, button: str, key: str,
                   busy: str, done: str):
    """``find(s)``'s stored result, or (when there is none) ``message`` and a ``button`` that runs
    ``compute(s, progress)`` with a progress display; stops the page until there is one."""
    found = guarded(find, s)
    if found is not None:
        return found
    st.info(message)
    if st.button(button, type="primary", key=key):
        run_with_progress(busy, compute, s, done)
        st.rerun()
    st.stop()


def show_analysis_cost(cost: dict) -> None:
    """The predicted memory and time of an analysis (before it runs), with each family's share."""
    from moescope.analysis.core.units import format_bytes
    from moescope.analysis.measure.cost import multiply_adds

    avail = cost["available_bytes"]
    fits = avail is None or cost["total_bytes"] <= avail
    secs = cost["total_seconds"]
    took = f"{secs:.1f} s" if secs < 10 else f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
    line = (f"Predicted before it runs: about **{format_bytes(cost['total_bytes'])}** of memory at the peak "
            f"({format_bytes(avail) if avail is not None else 'unknown'} available) and at least **{took}** on this "
            f"machine (multiply-adds and the main element-wise passes at its measured speed; smaller terms left out).")
    (st.caption if fits else st.warning)(line if fits else line + " It does not fit: lower the calibration "
                                         "samples or sequence length in the sidebar.")
    with st.expander("Predicted cost by part"):
        st.dataframe(pd.DataFrame(
            [{"part": k.replace("_", " "), "memory": format_bytes(v)} for k, v in cost["bytes"].items()]),
            hide_index=True)
        st.dataframe(pd.DataFrame(
            [{"family": k.replace("_", " "), "seconds (at least)": round(v, 2),
              "multiply-adds": f"{multiply_adds(cost['work'][k]):.3g}"} for k, v in cost["seconds"].items()]),
            hide_index=True)


def require_analysis(s: Settings):
    """The stored analysis's overview, or a button that computes the analysis with its predicted
    cost (page stopped)."""
    if guarded(backend.find_analysis, s) is None:
        cost = guarded(backend.analysis_cost, s.model, s.calib_samples, s.calib_seq_len)
        if cost is not None:
            show_analysis_cost(cost)
    require_stored(backend.find_analysis, backend.compute_analysis, s,
                   f"No analysis of **{s.model}** on {s.calib_samples}×{s.calib_seq_len} tokens of "
                   f"`{s.calib_source}` yet. It is computed once and cached (the CLI's `moescope analyze` shares it).",
                   "Run the analysis", "run_analysis", "Analysing…", "Analysis done")
    return backend.analysis_overview(s)


def require_trace(s: Settings, needed_for: str):
    """The stored routing trace, or a button that traces the routing (page stopped)."""
    return require_stored(backend.find_trace, backend.compute_trace, s,
                          f"{needed_for} need the routing of every calibration token (one forward pass, cached).",
                          "Trace the routing", "route_trace", "Tracing…", "Routing traced")


def layer_select(layers: list[int], key: str, label: str = "Layer") -> int:
    """A layer picker that remembers its choice across pages (``key`` stays in session state)."""
    if st.session_state.get(key) not in layers:
        st.session_state[key] = layers[0]
    return st.selectbox(label, layers, key=key, format_func=lambda l: f"layer {l}")


def current_plan() -> PruningPlan | None:
    data = st.session_state.get("plan")
    if not data:
        return None
    try:
        return PruningPlan.from_json(data, where="current plan")
    except MoescopeError:
        return None


def plan_layer_state(plan: PruningPlan | None, layer: int, num_experts: int) -> tuple[list[list[int]], list[int]]:
    """(merged groups, dropped experts) of ``layer`` in ``plan``."""
    return plans.layer_state(plan, layer, num_experts)


def add_to_plan(drops=None, merges=None, what: str = "", page: str = "") -> None:
    """An analysis page's action: add ``drops`` / ``merges`` to the current plan (recording the
    action, ``page: what``, in its provenance), or show why not."""
    try:
        plan = plans.add_to_plan(settings(), st.session_state.get("plan"), drops, merges,
                                 action=f"{page}: {what}" if page else what)
    except MoescopeError as err:
        st.error(str(err))
        return
    st.session_state["plan"] = plan.to_json()
    n_out = sum(len(lp.groups) for lp in plan.layers.values())
    st.toast(f"Added to the plan: {what}")
    st.success(f"Added to the current plan: {what}. The plan now changes {len(plan.layers)} layer(s), "
               f"{n_out} output experts in them; see the Plan page.")


def persistent(widget: Callable, label: str, key: str, **kwargs):
    """A widget bound to the session-state ``key`` that survives page switches (Streamlit forgets
    the state of widgets that are not drawn, so the widget gets its own key and copies back)."""
    wkey = f"_w_{key}"
    st.session_state[wkey] = st.session_state[key]

    def copy_back():
        st.session_state[key] = st.session_state[wkey]

    return widget(label, key=wkey, on_change=copy_back, **kwargs)
