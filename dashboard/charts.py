"""Chart builders: plain functions from arrays to plotly figures (no Streamlit, testable alone)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

SIMILAR = "Viridis"  # bright = alike
DIVERGING = "RdBu_r"  # red = above zero
GROUP_COLOURS = ("#e8590c", "#d6336c", "#0ca678", "#1c7ed6", "#f59f00", "#7048e8", "#66a80f", "#c2255c")
FONT = dict(family="sans-serif", size=12)


def _layout(fig: go.Figure, title: str | None, height: int) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0, font=dict(size=14)) if title else None, height=height,
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10), font=FONT,
                      plot_bgcolor="white", paper_bgcolor="white")
    return fig


def _offdiag_values(mats) -> np.ndarray:
    """Every off-diagonal finite entry of square matrices, in one flat array."""
    vals = []
    for M in mats:
        M = np.asarray(M, dtype=float)
        v = M[~np.eye(M.shape[0], dtype=bool)]
        vals.append(v[np.isfinite(v)])
    return np.concatenate(vals) if vals else np.array([])


def offdiag_quantile(mats, q: float) -> float | None:
    """The ``q`` quantile of the off-diagonal finite entries of square matrices (None when there
    are none), e.g. a threshold that the most alike ``1 - q`` of the pairs reach."""
    v = _offdiag_values(mats)
    return float(np.quantile(v, q)) if v.size else None


def offdiag_range(mats) -> tuple[float, float]:
    """Colour range over the off-diagonal finite entries of square matrices (the diagonal, an
    expert with itself, would otherwise wash the scale out)."""
    v = _offdiag_values(mats)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def similarity_heatmap(S, metric: str, *, distance: bool = False, zrange=None, groups=None, dropped=None,
                       title: str | None = None, height: int = 520, order=None, outlined=None,
                       values: bool | None = None) -> go.Figure:
    """Expert × expert matrix of one layer; ``groups`` (lists of experts merged together) are
    outlined cell by cell and ``dropped`` experts crossed on the diagonal. ``order``: the experts
    in the order to draw them (e.g. by clustering; default by index); ticks and hovers name the
    experts, not their positions. Beyond 32 experts the ticks thin out; zoom and pan (plotly's own
    drag and scroll) bring any block into view. ``zrange``: the colour range (default: the
    off-diagonal range); ``outlined``: expert pairs to outline (e.g. those beyond a threshold);
    ``values``: print each cell's value (default: up to 16 experts)."""
    S = np.asarray(S, dtype=float)
    E = S.shape[0]
    order = list(range(E)) if order is None else [int(e) for e in order]
    pos = {e: i for i, e in enumerate(order)}
    S = S[np.ix_(order, order)]
    lo, hi = zrange or offdiag_range([S])
    ids = np.array(order)
    show_values = E <= 16 if values is None else values
    fig = go.Figure(go.Heatmap(
        z=S, x=list(range(E)), y=list(range(E)), zmin=lo, zmax=hi,
        texttemplate="%{z:.2f}" if show_values else None, textfont=dict(size=10),
        customdata=np.stack(np.broadcast_arrays(ids[:, None], ids[None, :]), axis=-1),
        colorscale=SIMILAR, reversescale=distance, colorbar=dict(title=metric, thickness=12),
        hovertemplate=f"experts %{{customdata[0]}} and %{{customdata[1]}}<br>{metric} %{{z:.4f}}<extra></extra>",
    ))
    for k, g in enumerate(g for g in (groups or []) if len(g) > 1):
        xs = [pos[j] for i in g for j in g]
        ys = [pos[i] for i in g for _ in g]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"merged {'+'.join(map(str, g))}",
            marker=dict(symbol="square-open", size=max(6, 360 / E), line=dict(width=3),
                        color=GROUP_COLOURS[k % len(GROUP_COLOURS)]),
            hovertemplate=f"merged group {'+'.join(map(str, g))}<extra></extra>",
        ))
    if outlined:
        cells = [(pos[i], pos[j]) for i, j in outlined] + [(pos[j], pos[i]) for i, j in outlined]
        fig.add_trace(go.Scatter(
            x=[c[1] for c in cells], y=[c[0] for c in cells], mode="markers", name="beyond the threshold",
            marker=dict(symbol="square-open", size=max(5, 300 / E), color="#212529", line=dict(width=2)),
            hoverinfo="skip",
        ))
    if dropped:
        fig.add_trace(go.Scatter(
            x=[pos[e] for e in dropped], y=[pos[e] for e in dropped], mode="markers", name="dropped",
            customdata=list(dropped),
            marker=dict(symbol="x-thin-open", size=max(6, 300 / E), color="#c92a2a", line=dict(width=3, color="#c92a2a")),
            hovertemplate="expert %{customdata} dropped<extra></extra>",
        ))
    step = 1 if E <= 32 else max(1, E // 32)
    ticks = dict(tickmode="array", tickvals=list(range(0, E, step)), ticktext=[str(e) for e in order[::step]])
    fig.update_xaxes(title="expert", showgrid=False, constrain="domain", **ticks)
    fig.update_yaxes(title="expert", autorange="reversed", showgrid=False, scaleanchor="x", constrain="domain",
                     **ticks)
    fig.update_layout(legend=dict(orientation="h", y=-0.12), dragmode="zoom")
    return _layout(fig, title, height)


def similarity_small_multiples(mats: dict, metric: str, *, distance: bool = False, cols: int = 4,
                               zrange=None) -> go.Figure:
    """One heatmap per layer on one shared colour scale, in a grid as wide as the page (``cols``
    per row, each panel ~360 px high with expert ticks)."""
    layers = list(mats)
    cols = max(1, min(cols, len(layers)))
    rows = math.ceil(len(layers) / cols)
    lo, hi = zrange or offdiag_range(mats.values())
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {l}" for l in layers],
                        horizontal_spacing=0.05, vertical_spacing=min(0.3 / rows, 0.08) if rows > 1 else 0.0)
    for n, l in enumerate(layers):
        S = np.asarray(mats[l], dtype=float)
        E = S.shape[0]
        fig.add_trace(go.Heatmap(
            z=S, x=list(range(E)), y=list(range(E)), coloraxis="coloraxis",
            hovertemplate=f"layer {l}: experts %{{y}} and %{{x}}<br>{metric} %{{z:.4f}}<extra></extra>",
        ), row=n // cols + 1, col=n % cols + 1)
    E = max(np.asarray(m).shape[0] for m in mats.values())
    step = 1 if E <= 16 else max(1, E // 8)
    fig.update_yaxes(autorange="reversed", showgrid=False, dtick=step, tickfont=dict(size=9))
    fig.update_xaxes(showgrid=False, dtick=step, tickfont=dict(size=9))
    fig.update_layout(coloraxis=dict(colorscale=SIMILAR, reversescale=distance, cmin=lo, cmax=hi,
                                     colorbar=dict(title=metric, thickness=12)))
    fig.update_annotations(font=dict(size=12))
    fig = _layout(fig, None, 360 * rows + 60)
    fig.update_layout(margin=dict(t=40))  # room for the first row's panel titles (10 px clipped them)
    return fig


def layer_expert_heatmap(M, layers, name: str, *, colorscale=SIMILAR, reverse: bool = False, zmid=None,
                         fmt: str = ".4f", customdata=None, custom_label: str | None = None,
                         marks=None, mark_label: str = "", title: str | None = None) -> go.Figure:
    """Layer × expert map (NaN cells: the layer has fewer experts); ``marks`` = (layer, expert)
    cells to point out (e.g. the first expert a criterion would drop)."""
    M = np.asarray(M, dtype=float)
    y = [f"layer {l}" for l in layers]
    hover = f"%{{y}}, expert %{{x}}<br>{name} %{{z:{fmt}}}"
    if customdata is not None:
        hover += f"<br>{custom_label} %{{customdata}}"
    fig = go.Figure(go.Heatmap(
        z=M, x=list(range(M.shape[1])), y=y, colorscale=colorscale, reversescale=reverse, zmid=zmid,
        customdata=customdata, colorbar=dict(title=name, thickness=12), hovertemplate=hover + "<extra></extra>",
    ))
    if marks:
        fig.add_trace(go.Scatter(
            x=[e for _, e in marks], y=[f"layer {l}" for l, _ in marks], mode="markers", name=mark_label,
            marker=dict(symbol="circle-open", size=16, color="#e8590c", line=dict(width=3, color="#e8590c")),
            hovertemplate=f"%{{y}}, expert %{{x}}: {mark_label}<extra></extra>",
        ))
        fig.update_layout(legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title="expert", dtick=1 if M.shape[1] <= 64 else None, showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return _layout(fig, title, min(900, 120 + 34 * len(layers)))


def expert_bars(values, name: str, *, reference: float | None = None, reference_label: str = "",
                fmt: str = ".3f", title: str | None = None) -> go.Figure:
    v = np.asarray(values, dtype=float)
    fig = go.Figure(go.Bar(x=list(range(v.size)), y=v, marker_color="#3b5bdb",
                           hovertemplate=f"expert %{{x}}: {name} %{{y:{fmt}}}<extra></extra>"))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="#868e96", annotation_text=reference_label)
    fig.update_xaxes(title="expert", dtick=1 if v.size <= 64 else None)
    fig.update_yaxes(title=name, gridcolor="#e9ecef")
    return _layout(fig, title, 300)


def layer_bars(layers, series: dict[str, list[float]], *, yaxis: str, fmt: str = ".3f",
               title: str | None = None, yrange=None) -> go.Figure:
    """Grouped bars per layer, one series per entry of ``series``."""
    x = [f"layer {l}" for l in layers]
    fig = go.Figure([go.Bar(x=x, y=list(v), name=k, hovertemplate=f"%{{x}}: {k} %{{y:{fmt}}}<extra></extra>")
                     for k, v in series.items()])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title=yaxis, gridcolor="#e9ecef", range=yrange)
    return _layout(fig, title, 320)


def robust_range(values, name: str) -> tuple[float | None, float | None, str]:
    """``(cmin, cmax, colour-bar title)``: the values' own range, or, where outliers stretch it
    (beyond Tukey's far fence, Q3 + 3·IQR, or below Q1 − 3·IQR), the range of the other values, so
    that one extreme cell does not make all the others look alike; the title then says so (the
    hover keeps every cell's true value)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size < 4:
        return None, None, name
    q1, q3 = np.quantile(v, [0.25, 0.75])
    inside = v[(v >= q1 - 3 * (q3 - q1)) & (v <= q3 + 3 * (q3 - q1))]
    lo, hi = float(inside.min()), float(inside.max())
    if inside.size == v.size or hi <= lo:
        return float(v.min()), float(v.max()), name
    return lo, hi, f"{name}<br>(colours capped to {lo:.3g}–{hi:.3g};<br>extremes {v.min():.3g}, {v.max():.3g})"


def cell_picker(M, layers, name: str, *, state=None, fmt: str = ".3f", height: int | None = None) -> go.Figure:
    """Layer × expert cells as square markers that can be clicked or box/lasso-selected
    (plotly heatmaps cannot be selected); ``state[(layer, expert)]`` = "dropped" | "merged"
    draws a symbol on the cell. Every point carries ``customdata = [layer, expert]``."""
    M = np.asarray(M, dtype=float)
    xs, ys, zs, cd = [], [], [], []
    for i, l in enumerate(layers):
        for e in range(M.shape[1]):
            if np.isfinite(M[i, e]):
                xs.append(e)
                ys.append(i)
                zs.append(M[i, e])
                cd.append([int(l), int(e)])
    height = height or min(900, 140 + 40 * len(layers))
    # one square per cell without overlap: bounded by the row height and by ~1000 px across the experts
    size = max(3, min(34, (height - 120) / max(len(layers), 1) * 0.85, 1000 / max(M.shape[1], 1) * 0.85))
    cmin, cmax, title = robust_range(zs, name)
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers", customdata=cd, name=name, showlegend=False,
        marker=dict(symbol="square", size=size, color=zs, colorscale=SIMILAR, cmin=cmin, cmax=cmax,
                    colorbar=dict(title=title, thickness=12)),
        hovertemplate=f"layer %{{customdata[0]}}, expert %{{customdata[1]}}<br>{name} %{{marker.color:{fmt}}}<extra></extra>",
    ))
    for what, symbol, colour in (("dropped", "x-thin-open", "#c92a2a"), ("merged", "circle-open", "#212529")):
        cells = [(l, e) for (l, e), v in (state or {}).items() if v == what and l in layers]
        if cells:
            fig.add_trace(go.Scatter(
                x=[e for _, e in cells], y=[list(layers).index(l) for l, _ in cells], mode="markers", name=what,
                marker=dict(symbol=symbol, size=size * 0.7, color=colour, line=dict(width=3, color=colour)),
                hoverinfo="skip",
            ))
    fig.update_xaxes(title="expert", dtick=1 if M.shape[1] <= 64 else None, showgrid=False, zeroline=False)
    fig.update_yaxes(tickvals=list(range(len(layers))), ticktext=[f"layer {l}" for l in layers],
                     autorange="reversed", showgrid=False, zeroline=False)
    fig.update_layout(legend=dict(orientation="h", y=-0.2))  # Streamlit sets dragmode / clickmode for selections
    return _layout(fig, None, height)


def pair_picker(S, metric: str, *, distance: bool = False, groups=None, dropped=None, height: int = 460,
                zrange=None) -> go.Figure:
    """One layer's expert × expert matrix as selectable square markers (``customdata = [i, j]``);
    selecting cells asks to merge those pairs. Merged groups are outlined, dropped experts crossed.
    ``zrange``: the colour range, the measure's own (e.g. 0 to 1 for CKA, so 0.38 is never painted
    as alike as a near-duplicate); default the off-diagonal range."""
    S = np.asarray(S, dtype=float)
    E = S.shape[0]
    lo, hi = zrange or offdiag_range([S])
    ii, jj = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
    off = ii != jj
    size = max(5, min(40, (height - 100) / E * 0.9))
    fig = go.Figure(go.Scatter(
        x=jj[off], y=ii[off], mode="markers", customdata=np.stack([ii[off], jj[off]], -1), name=metric,
        showlegend=False,
        marker=dict(symbol="square", size=size, color=S[off], cmin=lo, cmax=hi, colorscale=SIMILAR,
                    reversescale=distance, colorbar=dict(title=metric, thickness=12)),
        hovertemplate=f"experts %{{y}} and %{{x}}<br>{metric} %{{marker.color:.4f}}<extra></extra>",
    ))
    for k, g in enumerate(g for g in (groups or []) if len(g) > 1):
        fig.add_trace(go.Scatter(
            x=[j for i in g for j in g if i != j], y=[i for i in g for j in g if i != j], mode="markers",
            name=f"merged {'+'.join(map(str, g))}", hoverinfo="skip",
            marker=dict(symbol="square-open", size=size, line=dict(width=3),
                        color=GROUP_COLOURS[k % len(GROUP_COLOURS)]),
        ))
    if dropped:
        fig.add_trace(go.Scatter(x=list(dropped), y=list(dropped), mode="markers", name="dropped", hoverinfo="skip",
                                 marker=dict(symbol="x-thin-open", size=size, color="#c92a2a",
                                             line=dict(width=3, color="#c92a2a"))))
    fig.update_xaxes(title="expert", dtick=1 if E <= 32 else None, range=[-0.5, E - 0.5], showgrid=False, zeroline=False,
                     constrain="domain")
    fig.update_yaxes(title="expert", dtick=1 if E <= 32 else None, range=[E - 0.5, -0.5], showgrid=False,
                     zeroline=False, scaleanchor="x", constrain="domain")
    fig.update_layout(legend=dict(orientation="h", y=-0.15))  # Streamlit sets dragmode / clickmode for selections
    return _layout(fig, None, height)


def selected_cells(event) -> list[tuple[int, int]]:
    """The ``customdata`` pairs of the points selected on a picker (a Streamlit plotly event, its
    ``selection`` dict, or None), first trace only, without duplicates, in selection order."""
    if not event:
        return []
    selection = event.get("selection", event) if hasattr(event, "get") else None
    out = []
    for p in (selection or {}).get("points", []) or []:
        cd = p.get("customdata")
        if isinstance(cd, dict):  # a typed-array customdata row arrives as {"0": i, "1": j}
            cd = [cd.get("0", cd.get(0)), cd.get("1", cd.get(1))]
        if p.get("curve_number", 0) != 0 or cd is None or len(cd) < 2 or None in cd[:2]:
            continue
        cell = (int(cd[0]), int(cd[1]))
        if cell not in out:
            out.append(cell)
    return out


ORIGINAL_SYMBOLS = ["diamond", "square", "cross", "triangle-up", "star"]


def _num(v) -> float | None:
    """A finite float, or None (missing, NaN, text)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _error(table, column: str, i: int) -> tuple[float, float] | None:
    """(minus, plus) of row ``i``'s 95 % range of ``column``, None without one."""
    low = _num(table[f"{column} low"].iloc[i]) if f"{column} low" in table.columns else None
    high = _num(table[f"{column} high"].iloc[i]) if f"{column} high" in table.columns else None
    value = _num(table[column].iloc[i])
    if low is None or high is None or value is None:
        return None
    return value - low, high - value


def compare_scatter(table, x: str, y: str, colours: dict[str, str], noisy: set[int], height: int = 460) -> go.Figure:
    """Quality ``y`` against cost ``x``, one trace per row of a comparison table (named in the
    legend, no labels on the points to overlap): error bars for the 95 % ranges on both axes,
    hollow markers for rows in ``noisy`` (within noise of their original), the originals as grey
    diamonds (squares, … for a second setting)."""
    fig = go.Figure()
    groups = list(dict.fromkeys(table["group"]))
    for i in range(len(table)):
        name = table["name"].iloc[i]
        vx, vy = _num(table[x].iloc[i]), _num(table[y].iloc[i])
        if vx is None or vy is None:
            continue
        original = table["experiment"].iloc[i] == "original"
        if original:
            symbol = ORIGINAL_SYMBOLS[groups.index(table["group"].iloc[i]) % len(ORIGINAL_SYMBOLS)]
        else:
            symbol = "circle-open" if i in noisy else "circle"
        ex, ey = _error(table, x, i), _error(table, y, i)
        colour = colours.get(name, "#1c7ed6")
        fig.add_trace(go.Scatter(
            x=[vx], y=[vy], mode="markers", name=name + (" (within noise)" if i in noisy else ""),
            marker=dict(color=colour, size=16 if original else 13, symbol=symbol, line=dict(width=2, color=colour)),
            error_x=dict(type="data", symmetric=False, array=[ex[1]], arrayminus=[ex[0]], color=colour, width=3)
            if ex else None,
            error_y=dict(type="data", symmetric=False, array=[ey[1]], arrayminus=[ey[0]], color=colour, width=3)
            if ey else None,
            hovertext=[f"{name} · {table['experiment'].iloc[i]}"], hoverinfo="text+x+y"))
    fig.update_layout(xaxis_title=x, yaxis_title=y, legend=dict(title="experiment"))
    return _layout(fig, None, height)


def domain_bars(sub, colours: dict[str, str], height: int = 420) -> go.Figure:
    """Perplexity per domain, one bar group per domain and a bar per experiment (originals in grey),
    each with its 95 % per-window range as an error bar."""
    fig = go.Figure()
    for name in dict.fromkeys(sub["experiment"]):
        rows = sub[sub["experiment"] == name]
        has = rows["low"].notna() & rows["high"].notna()
        fig.add_trace(go.Bar(
            x=list(rows["detail"]), y=list(rows["value"]), name=name, marker_color=colours.get(name, "#1c7ed6"),
            error_y=dict(type="data", symmetric=False, array=list((rows["high"] - rows["value"]).where(has, 0)),
                         arrayminus=list((rows["value"] - rows["low"]).where(has, 0)))))
    fig.update_layout(barmode="group", xaxis_title="domain", yaxis_title="perplexity (lower is better)",
                      legend=dict(title="experiment"))
    return _layout(fig, None, height)
