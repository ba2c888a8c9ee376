"""Plan: choose experts to drop or merge — by a strategy or by hand — validated live against the
model, saved and loaded as PruningPlan JSON. The current valid plan is ``st.session_state["plan"]``
(its JSON dict) for the Run, Compare and Export pages."""

from __future__ import annotations

import json

import streamlit as st
from moescope.analysis.pruning.plan import recipe_name
from moescope.dashboard import backend, charts, plans
from moescope.dashboard.backend import MoescopeError, PruningPlan
from moescope.dashboard.ui import guarded, layer_select, plan_layer_state, run_with_progress, settings

st.header("Plan")
s = settings()
LAYERS = guarded(backend.model_layers, s)  # layer -> (experts, top-k)
layer_ids = sorted(LAYERS)
analysed = guarded(backend.find_analysis, s) is not None


# ---------------------------------------------------------------- the draft and the current plan


def _draft() -> PruningPlan:
    """The plan being edited. It follows ``plan`` when another page (or a test) set that; it may be
    invalid while being edited (the current plan then stays the last valid one)."""
    draft = st.session_state.get("plan_draft")
    current = st.session_state.get("plan")
    if draft is None or current != st.session_state.get("plan_committed"):
        try:
            draft = PruningPlan.from_json(current, where="current plan") if current else backend.empty_plan(s)
        except MoescopeError as err:
            st.session_state["plan_edit_error"] = str(err)
            draft = backend.empty_plan(s)
        st.session_state["plan_draft"] = draft
        st.session_state["plan_committed"] = current
    return draft


def _problem(plan: PruningPlan) -> str | None:
    """Why ``plan`` cannot be applied to the model (one line), or None."""
    try:
        backend.validate_plan(settings(), plan)
    except MoescopeError as err:
        return str(err)
    return None


def commit(plan: PruningPlan) -> None:
    """Make ``plan`` the draft; when it passes the model's checks it becomes the current plan
    (``st.session_state["plan"]``, None for a plan that changes nothing)."""
    st.session_state["plan_draft"] = plan
    if _problem(plan) is None:
        st.session_state["plan"] = plan.to_json() if (plan.layers or plan.skip_beta) else None
        st.session_state["plan_committed"] = st.session_state["plan"]


def edit(layer: int, drop, merge) -> None:
    try:
        commit(backend.edit_plan_layer(_draft(), layer, LAYERS[layer][0], drop, merge))
    except MoescopeError as err:  # a refused edit (e.g. an expert both dropped and merged)
        st.session_state["plan_edit_error"] = str(err)


def _even_out(counts: dict[int, int]) -> None:
    """Make the plan uniform in one click, by the drop grid or a criterion."""
    sources = backend.even_out_sources(s)
    if not sources:
        st.caption("Run the analysis or compute the drop grid to even the plan out by what matters.")
        return
    c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
    by = c1.selectbox("Even out by", sources, key="plan_even_by",
                      help="drop the experts that matter least by this, or add back those that matter most")
    top_k = max(k for _, k in LAYERS.values())
    if st.session_state.get("plan_even_for") != counts:  # a changed plan: propose its nearest uniform count
        st.session_state["plan_even_for"] = counts
        st.session_state["plan_even_count"] = backend.default_even_count(s, counts)
    count = c2.number_input("Experts per layer", top_k, min(n for n, _ in LAYERS.values()), key="plan_even_count")
    if c3.button("Even out", key="plan_even", width="stretch"):
        try:
            commit(backend.even_out_plan(s, _draft(), by, int(count)))
        except MoescopeError as err:
            st.session_state["plan_edit_error"] = str(err)
        st.rerun()


draft = _draft()
problem = _problem(draft)  # validated live, on every run

# ---------------------------------------------------------------- status and save

status, actions = st.columns([3, 1], gap="medium")
with status:
    refused = st.session_state.pop("plan_edit_error", None)
    if refused:
        st.error(refused)
    if problem:
        st.error(problem)
        if st.session_state.get("plan"):
            st.caption("The Run page keeps the last valid plan until this is fixed.")
    elif draft.layers or draft.skip_beta:
        after = draft.experts_after(backend.load_model(s.model))
        before = sum(n for n, _ in LAYERS.values())
        st.success(f"Valid plan ({recipe_name(draft.provenance)}): {sum(after.values())} of {before} "
                   f"routed experts remain" + (f"; dynamic skipping in {len(draft.skip_beta)} layers" if draft.skip_beta
                                                else ""))
        unused = backend.unused_kept_note(draft)
        if unused:  # a literal rule kept experts no calibration token reached: say which
            st.warning(f"This plan {unused}.")
    else:
        st.info("No change planned yet: pick a strategy, or drop and merge experts by hand.")
    if draft.layers:
        counts = backend.plan_counts(s, draft)
        st.markdown("**Experts per layer:** " + " · ".join(f"L{l} {c}" for l, c in sorted(counts.items())))
        form = backend.export_form(s, counts)
        (st.caption if len(set(counts.values())) <= 1 else st.warning)(form)
        st.dataframe(backend.plan_table(draft, LAYERS), hide_index=True)
        if len(set(counts.values())) > 1 and not problem:
            _even_out(counts)
with actions:
    current = st.session_state.get("plan")
    st.download_button("Download plan JSON", json.dumps(current or {}, indent=2) + "\n", file_name="plan.json",
                       mime="application/json", disabled=not current, key="plan_download", width="stretch")
    upload = st.file_uploader("Load plan JSON", type=["json"], key="plan_upload")
    if upload is not None and st.session_state.get("plan_uploaded") != upload.file_id:
        st.session_state["plan_uploaded"] = upload.file_id
        try:
            commit(backend.parse_plan(s, upload.getvalue(), where=upload.name))
        except MoescopeError as err:
            st.session_state["plan_edit_error"] = str(err)
        st.rerun()
    if st.button("Clear the plan", key="plan_clear", width="stretch", disabled=not (draft.layers or draft.skip_beta)):
        commit(backend.empty_plan(s))
        st.rerun()

# ---------------------------------------------------------------- named plans


def _plans_section() -> None:
    saved = guarded(plans.named_plans, s)
    current = st.session_state.get("plan")
    message = st.session_state.pop("plan_named_msg", None)
    with st.expander(f"Named plans ({len(saved)} saved for `{s.model}`)", expanded=bool(saved or message or current)):
        if message:
            (st.error if message.startswith("!") else st.success)(message.lstrip("!"))
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        strategy = recipe_name((current or {}).get("provenance")) if current else "plan"
        if st.session_state.get("plan_name_for") != current:  # propose a name for a new current plan
            st.session_state["plan_name_for"] = current
            st.session_state["plan_name"] = plans.unique_plan_name(s, strategy)
        c1.text_input("Name", key="plan_name", help="plans are kept in the cache: they survive a restart")
        if c2.button("Save the current plan", key="plan_save", disabled=not current, width="stretch"):
            try:
                plans.save_named_plan(s, st.session_state["plan_name"], PruningPlan.from_json(current))
                st.session_state["plan_named_msg"] = f"Saved '{st.session_state['plan_name'].strip()}'"
            except MoescopeError as err:
                st.session_state["plan_named_msg"] = f"!{err}"
            st.rerun()
        if not saved:
            st.caption("No named plan yet: make one (a strategy, by hand, or from an analysis page) and save it.")
            return
        c1, c2, c3, c4 = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
        pick = c1.selectbox("Plan", list(saved), key="plan_pick",
                            format_func=lambda n: f"{n} — {saved[n].summary()}")
        if c2.button("Open", key="plan_open", width="stretch", help="make it the current plan (Run, Export)"):
            commit(saved[pick])
            st.rerun()
        if c3.button("Duplicate", key="plan_dup", width="stretch"):
            name = plans.unique_plan_name(s, pick)
            plans.save_named_plan(s, name, saved[pick])
            st.session_state["plan_named_msg"] = f"Saved '{name}'"
            st.rerun()
        if c4.button("Delete", key="plan_delete", width="stretch"):
            plans.delete_named_plan(s, pick)
            st.session_state["plan_named_msg"] = f"Deleted '{pick}'"
            st.rerun()
        c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
        c1.text_input("Rename to", key="plan_rename_to")
        if c2.button("Rename", key="plan_rename", width="stretch"):
            try:
                plans.rename_named_plan(s, pick, st.session_state.get("plan_rename_to", ""))
                st.session_state["plan_named_msg"] = f"Renamed '{pick}'"
            except MoescopeError as err:
                st.session_state["plan_named_msg"] = f"!{err}"
            st.rerun()
        c3.download_button("Download", saved[pick].dumps(), file_name=f"{pick}.json", mime="application/json",
                           key="plan_named_download", width="stretch")

        st.markdown("**Predicted cost** (no run needed)")
        if st.button("Predict every plan's cost", key="plan_predict"):
            st.session_state["plan_costs"] = run_with_progress(
                "Predicting…", lambda s_, p: plans.predicted_costs(s_, list(saved), p), s, "Predicted")
            st.rerun()
        table = st.session_state.get("plan_costs")
        if table is not None and len(table):
            table = table[table["plan"].isin(list(saved)) | (table["plan"] == "original (no plan)")]
            st.caption(f"Proxy: perplexity on {table.attrs.get('batch', 'a small evaluation batch')}, with each plan "
                       "applied to the loaded model (a full run evaluates many more windows). "
                       + ("Grid Σ: the drop grid's single-drop changes of the dropped experts, added up "
                          "(drop-only plans). " if table.attrs.get("grid") else
                          "Compute the drop grid for a second, grid-based estimate of drop-only plans. ")
                       + "Lower is better everywhere.")
            st.dataframe(table, hide_index=True, column_config={
                "params Δ%": st.column_config.NumberColumn(format="%+.1f%%", help="parameters, change in %"),
                "weight bytes Δ%": st.column_config.NumberColumn(format="%+.1f%%", help="weight bytes, change in %"),
                "proxy ppl": st.column_config.NumberColumn(format="%.2f", help="perplexity on the proxy batch"),
                "proxy Δ%": st.column_config.NumberColumn(format="%+.1f%%",
                                                          help="against the original on the same batch"),
                "against the original (paired)": st.column_config.TextColumn(
                    help="proxy perplexity ÷ the original's, paired on the same windows (a paired bootstrap's 95 % "
                         "range): worse or better only where the whole range lies on one side of 1, else within "
                         "noise"),
                "grid Σ Δppl": st.column_config.TextColumn(help="sum of the dropped experts' single-drop perplexity "
                                                                "changes (drop-only plans with a stored drop grid)"),
                "skipping": st.column_config.TextColumn(help="whether dynamic skipping is part of the estimate: the "
                                                             "proxy prices the kept experts only; a plan's β applies "
                                                             "in a full run"),
                "seconds": st.column_config.NumberColumn(format="%.1f", help="time the prediction took")})
            c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
            send = c1.multiselect("Send to Run", [p for p in table["plan"] if p in saved], key="plan_send",
                                  help="the Run page runs each of them as its own job")
            if c2.button("Send", key="plan_send_go", disabled=not send, width="stretch"):
                st.session_state["run_queue"] = list(send)
                st.switch_page("app_pages/run.py")


_plans_section()

st.divider()
mode = st.radio("Build", ["Strategy", "By hand"], horizontal=True, key="plan_mode", label_visibility="collapsed")

# ---------------------------------------------------------------- by a strategy

def _on_preset() -> None:
    """Choosing a preset fills its strategy's widgets with the preset's values (all stay editable)."""
    preset = st.session_state.get("plan_preset")
    if not preset or preset == "none":
        return
    strategy, values = backend.preset_widgets(preset)
    st.session_state["plan_strategy"] = strategy
    declared = {p.name: p for p in backend.STRATEGIES[strategy].params}
    for key in [k for k in st.session_state if k.startswith(f"plan_{strategy}_")]:
        del st.session_state[key]  # parameters the preset does not name go back to their defaults
    for param, value in values.items():
        if param == "with_skip":
            st.session_state["plan_with_skip"] = bool(value)
        elif param in declared:
            st.session_state[f"plan_{strategy}_{param}"] = value


if mode == "Strategy":
    names = [n for n, strat in backend.STRATEGIES.items() if not strat.manual]
    preset = st.selectbox("Preset (a paper's recipe)", ["none", *backend.PRESETS], key="plan_preset",
                          on_change=_on_preset, help="fills the strategy's parameters below with a paper's values; "
                                                     "change any of them freely")
    if preset != "none":
        p = backend.PRESETS[preset]
        samples = f" The paper calibrates on {p.calib_samples} sequences." if p.calib_samples else ""
        st.caption(f"**{preset}** — {p.help}. Source: {p.source}.{samples}" + (f" Chosen here: {p.note}." if p.note
                                                                                 else ""))
    name = st.selectbox("Strategy", names, key="plan_strategy")
    strategy = backend.STRATEGIES[name]
    st.caption(strategy.help)
    params: dict = {}
    top_k = max(k for _, k in LAYERS.values())
    fewest = min(n for n, _ in LAYERS.values())
    c1, c2, c3 = st.columns(3)
    if strategy.target:
        target = c1.radio("Target", ["keep", "budget"] if strategy.budget else ["keep"], horizontal=True,
                          key="plan_target", format_func={"keep": "experts per layer", "budget": "experts in all layers"}.get)
        if target == "keep":
            params["keep"] = int(c1.number_input("Keep per layer", top_k, fewest, max(top_k, fewest - 2),
                                                 key="plan_keep"))
        else:
            total = sum(n for n, _ in LAYERS.values())
            params["budget"] = int(c1.number_input("Keep in all", top_k * len(LAYERS), total,
                                                   max(top_k * len(LAYERS), total - 2 * len(LAYERS)), key="plan_budget"))
    # one widget per declared parameter (the declaration is the only place they are listed)
    columns = [c2, c3]
    for i, param in enumerate(strategy.params):
        col, key, label = columns[i % 2], f"plan_{name}_{param.name}", (param.label or param.name).replace("_", " ")
        label = label[:1].upper() + label[1:]
        # choices may depend on earlier parameters (merge: the similarities of the representation),
        # which hold their defaults unless changed
        current = {**{p.name: p.default for p in strategy.params}, **params}
        if param.when is not None and not param.when(current):
            continue  # acts only with other choices (TIES density, the learned merge's SGD, …)
        choices = param.allowed(current)
        # a value a preset put in the session state is the widget's value (no second default)
        preset_set = key in st.session_state
        if param.name == "criterion":  # the criteria the registry declares, with their descriptions
            choices = tuple(backend.CRITERIA)
            value = col.selectbox(label, choices, key=key, help=param.help,
                                  **({} if preset_set else {"index": choices.index(param.default)}),
                                  format_func=lambda c: f"{c} — {backend.CRITERIA[c].description.split(':')[0]}")
        elif choices is not None:
            options = list(choices) if param.default is not None else ["default", *choices]
            if preset_set and st.session_state[key] not in options:  # e.g. a similarity of another representation
                del st.session_state[key]
                preset_set = False
            default = options.index(param.default) if param.default in options else 0
            value = col.selectbox(label, options, key=key, help=param.help, **({} if preset_set else {"index": default}),
                                  format_func=lambda v, _p=param.name: backend.friendly(v, _p))
            value = None if value == "default" else value
        elif param.type is bool:
            value = col.checkbox(label, **({} if preset_set else {"value": bool(param.default)}), key=key,
                                 help=param.help)
        elif param.type is int:
            value = int(col.number_input(label, min_value=int(param.minimum) if param.minimum is not None else None,
                                         **({} if preset_set else {"value": int(param.default)}), key=key,
                                         help=param.help))
        elif param.type is float:
            value = float(col.number_input(label, min_value=float(param.minimum) if param.minimum is not None else None,
                                           **({} if preset_set else {"value": float(param.default)}), key=key,
                                           help=param.help, format="%g"))
        else:
            continue  # free-form parameters are given by hand or on the command line
        if value is not None and value != param.default:
            params[param.name] = value
    if strategy.with_skip and st.checkbox("Also skip dynamically (β calibrated per layer)", key="plan_with_skip"):
        params["with_skip"] = True
    if st.button("Make the plan", type="primary", key="plan_make"):
        chosen = preset if preset != "none" else None
        plan = run_with_progress(f"Running {name}…",
                                 lambda s_, p: backend.run_strategy(s_, name, params, p, preset=chosen), s,
                                 f"{name} plan ready")
        commit(plan)
        st.rerun()
    st.stop()

# ---------------------------------------------------------------- by hand


def _on_drop(layer: int, key: str) -> None:
    merged, _ = plan_layer_state(_draft(), layer, LAYERS[layer][0])
    edit(layer, st.session_state[key], merged)


def _on_merge(layer: int) -> None:
    merged, dropped = plan_layer_state(_draft(), layer, LAYERS[layer][0])
    pick = st.session_state.get(f"plan_pick_{layer}") or []
    if len(pick) < 2:
        st.session_state["plan_edit_error"] = "pick at least two experts to merge into one"
        return
    edit(layer, dropped, merged + [pick])
    st.session_state[f"plan_pick_{layer}"] = []


def _on_split(layer: int, group: list[int]) -> None:
    merged, dropped = plan_layer_state(_draft(), layer, LAYERS[layer][0])
    edit(layer, dropped, [g for g in merged if g != group])


left, right = st.columns([2, 3], gap="large")
with left:
    layer = layer_select(layer_ids, "plan_layer")
    E, k = LAYERS[layer]
    merged, dropped = plan_layer_state(draft, layer, E)
    st.caption(f"{E} experts, top-{k}: keep at least {k} output experts.")
    key = f"plan_drop_{layer}"
    st.session_state[key] = dropped
    st.multiselect("Drop", list(range(E)), key=key, on_change=_on_drop, args=(layer, key),
                   placeholder="experts to remove")
    st.multiselect("Merge into one expert", [e for e in range(E) if e not in dropped], key=f"plan_pick_{layer}",
                   placeholder="two or more experts")
    st.button("Merge them", key=f"plan_merge_btn_{layer}", on_click=_on_merge, args=(layer,))
    for i, g in enumerate(merged):
        st.button(f"Split {'+'.join(map(str, g))}", key=f"plan_split_{layer}_{i}", on_click=_on_split, args=(layer, g))
    with st.expander("Drops in every layer"):
        for l in layer_ids:
            kk = f"plan_dropall_{l}"
            st.session_state[kk] = plan_layer_state(draft, l, LAYERS[l][0])[1]
            st.multiselect(f"layer {l}", list(range(LAYERS[l][0])), key=kk, on_change=_on_drop, args=(l, kk))

with right:
    if not analysed:
        st.info("Run the analysis (Model & data page) to pick experts on the similarity and usage maps.")
        st.stop()
    ov = backend.analysis_overview(s)
    sims = [n for n in ("cka_linear", "cka_rbf", "cosine", "mse", "weight_cosine", "surrogate_cosine")
            if n in ov["similarities"]]
    metric = st.selectbox("Similarity", sims, key="plan_metric",
                          format_func=lambda v: backend.friendly(v, "similarity"))
    n_pick = st.session_state.setdefault("plan_pick_round", 0)
    event = st.plotly_chart(
        charts.pair_picker(backend.similarity_matrices(s, metric)[layer], metric,
                           distance=backend.is_distance(metric), groups=merged, dropped=dropped,
                           zrange=backend.similarity_bounds(metric)),  # the measure's own scale
        key=f"plan_pairs_{layer}_{metric}_{n_pick}", on_select="rerun", selection_mode=("points", "box", "lasso"))
    pairs = charts.selected_cells(event)
    st.caption("Click a cell to select that pair (Shift+click for more, or the box/lasso tool in the chart's "
               "toolbar), then merge; overlapping pairs form one group. "
               + (f"Selected: {', '.join(f'{i}–{j}' for i, j in pairs)}" if pairs else ""))
    if pairs and st.button("Merge the selected pairs", key="plan_merge_pairs", type="primary"):
        edit(layer, dropped, merged + [list(p) for p in pairs])
        st.session_state["plan_pick_round"] = n_pick + 1
        st.rerun()

st.subheader("Every layer")
colour_by = ["usage", *[c for c in backend.CRITERIA if c in ov["criteria"]]]
grid = backend.grid_delta(s)
if grid is not None:
    colour_by.append("drop-grid Δ")
paint = st.selectbox("Colour by", colour_by, key="plan_colour_by",
                     format_func=lambda c: {"usage": "usage (fraction of tokens routed)",
                                            "drop-grid Δ": "drop-grid Δ (perplexity change without the expert)"}
                     .get(c, f"{c} — {backend.CRITERIA[c].description.split(':')[0]}" if c in backend.CRITERIA else c))
if paint == "usage":
    usage = backend.layer_map(s, "usage", "routing")
elif paint == "drop-grid Δ":
    usage = plans.grid_on_layers(s, ov["layers"])
else:
    usage = backend.layer_map(s, paint)
state = {}
for l in layer_ids:
    m, d = plan_layer_state(draft, l, LAYERS[l][0])
    state.update({(l, e): "dropped" for e in d})
    state.update({(l, e): "merged" for g in m for e in g})
event = st.plotly_chart(charts.cell_picker(usage, ov["layers"], paint, state=state, fmt=".4g"),
                        key=f"plan_cells_{st.session_state['plan_pick_round']}", on_select="rerun",
                        selection_mode=("points", "box", "lasso"))
cells = charts.selected_cells(event)
st.caption(f"Colour: {paint}. To select, click a cell; Shift+click adds or removes cells; or pick the box or "
           "lasso tool in the chart's toolbar (top right) and drag over cells; double-click clears. Then drop the "
           "selected experts (or keep them again). "
           + (f"Selected: {', '.join(f'L{l}·{e}' for l, e in cells)}" if cells else ""))
if cells:
    c1, c2, _ = st.columns([1, 1, 3])
    for label, drop, col in (("Drop the selected", True, c1), ("Keep the selected", False, c2)):
        if col.button(label, key=f"plan_cells_{'drop' if drop else 'keep'}"):
            try:
                commit(backend.set_drops(_draft(), cells, LAYERS, drop=drop))
            except MoescopeError as err:
                st.session_state["plan_edit_error"] = str(err)
            st.session_state["plan_pick_round"] += 1
            st.rerun()
