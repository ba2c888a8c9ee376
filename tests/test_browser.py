"""The real dashboard server in headless Chromium: every analysis page of the demo model loads
without an exception or error, driven the way a person would (set small calibration sizes, run
the analysis, compute the drop grid, make five named plans (by strategy, from the drop grid's
action, by clicking heatmap cells, frequency and merge), run them as background jobs, see all
five (queued, one at a time) in Compare against one original, with every verdict checked against a
paired computation on the stored per-window losses, and export
one: the default folder follows the chosen experiment; the hand-made plan keeps different
expert counts per layer, so Export writes the per-layer folder);
screenshots go to
``$MOESCOPE_TEST_ARTIFACTS/screenshots/`` (default: ``moescope-test-artifacts`` in the system's
temporary folder; a test run never writes into the repository).

Uses Debian's ``/usr/bin/chromium`` through Playwright's ``executable_path`` (no browser download).
Without it the test is skipped with the reason in pytest's summary, except under ``CI=true``,
where it fails: a CI run must not pass without having driven the browser.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("MOESCOPE_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("MOESCOPE_TEST_ARTIFACTS")
             or Path(tempfile.gettempdir()) / "moescope-test-artifacts") / "screenshots"
SERVER_CACHE: dict = {}


def _missing() -> str | None:
    """What the browser test lacks, as one line saying how to install it; None when it can run."""
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Playwright: pip install -e '.[dev]' (it drives Debian's chromium, no browser download)"
    return None


@pytest.fixture(scope="module")
def chromium_present():
    """Skip with the reason when Chromium or Playwright is missing, fail under CI=true."""
    why = _missing()
    if why and os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and the browser test cannot run: {why}", pytrace=False)
    if why:
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chromium_present, tmp_path_factory):
    """``streamlit run dashboard/app.py`` on a free port with an empty throw-away cache."""
    cache = tmp_path_factory.mktemp("browser-cache")
    SERVER_CACHE["root"] = cache  # the test reads the experiments the server stored
    # one torch thread: Chromium and the server share the cores, and two OpenMP threads that must
    # meet at every barrier slow down many times over when another process holds a core
    env = {**os.environ, "MOESCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = _free_port()
    log = (tmp_path_factory.mktemp("browser-log") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--", "--model", "demo"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium_present):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-dev-shm-usage"])
        yield b
        b.close()


def _settle(page, timeout: float = 90.0) -> None:
    """Wait until the script run has finished (Streamlit's running indicator stays hidden)."""
    page.wait_for_selector('[data-testid="stMain"]', timeout=timeout * 1000)
    deadline, quiet_since = time.time() + timeout, None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0 and \
            page.locator('[data-testid="stStatusWidget"]').first.is_visible()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 0.5:
            return
        page.wait_for_timeout(150)
    raise AssertionError("the page kept running")


def _check(page, name: str, expect: str, charts: int = 0) -> None:
    """Wait for ``expect`` and ``charts`` drawn plotly charts (plotly.js loads lazily), save a
    screenshot, and fail on any exception or error shown."""
    t0 = time.time()
    page.get_by_text(expect, exact=False).first.wait_for(timeout=60_000)
    _settle(page)
    deadline = time.time() + 30
    while page.locator(".js-plotly-plot").count() < charts and time.time() < deadline:
        page.wait_for_timeout(100)
    assert page.locator(".js-plotly-plot").count() >= charts, f"{name}: charts not drawn"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert page.locator('[data-testid="stException"]').count() == 0, f"{name}: exception shown"
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "Traceback" not in text and "Error:" not in text, f"{name}: {text[:500]}"
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, f"{name}: {errors.first.inner_text()}"
    print(f"{name}: {time.time() - t0:.1f}s")


def _number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    _settle(page)


def _click_point(page, chart: int, point: int) -> None:
    """Click one marker of the ``chart``-th plotly chart on the page (a point selection)."""
    marker = page.locator(".js-plotly-plot").nth(chart).locator(".scatterlayer .trace").first.locator("path.point")
    marker.nth(point).scroll_into_view_if_needed()  # the mouse can only press what is on screen
    box = marker.nth(point).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.up()
    _settle(page)


def _save_plan(page, name: str) -> None:
    """Save the current plan under ``name`` in the Plan page's named-plans section."""
    box = page.get_by_label("Name", exact=True)
    box.fill(name)
    box.press("Tab")
    _settle(page)
    page.get_by_role("button", name="Save the current plan").click()
    page.get_by_text(f"Saved '{name}'").first.wait_for(timeout=30_000)
    _settle(page)


def _open_choices(page, testid: str, label: str) -> None:
    """Open the option list of the select / multiselect labelled ``label`` (its "Open" button)."""
    box = page.locator(f'[data-testid="{testid}"]').filter(has=page.get_by_label(label, exact=True)).first
    box.scroll_into_view_if_needed()
    box.get_by_role("button", name="Open").click()
    page.get_by_role("option").first.wait_for(timeout=10_000)


def _multiselect(page, label: str, options: list[str]) -> None:
    for option in options:
        _open_choices(page, "stMultiSelect", label)
        page.get_by_role("option", name=option, exact=True).click()
        page.keyboard.press("Escape")
        _settle(page)


def _select(page, label: str, contains: str) -> None:
    _open_choices(page, "stSelectbox", label)
    page.get_by_role("option").filter(has_text=contains).first.click()
    _settle(page)


def _go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    _settle(page)


def test_missing_chromium_fails_under_ci_and_is_a_visible_skip_elsewhere(tmp_path):
    """The browser test in a child pytest, pointed at a Chromium that is not there."""
    test = f"{Path(__file__).resolve()}::test_every_page_loads_in_chromium"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MOESCOPE_CHROMIUM"] = str(tmp_path / "no-chromium")
    argv = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", test]
    why = f"no Chromium at {tmp_path / 'no-chromium'}: install Debian's package (apt-get install -y chromium)"
    ci = subprocess.run(argv, env={**env, "CI": "true"}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ci.returncode == 1, ci.stdout
    assert f"CI=true and the browser test cannot run: {why}" in ci.stdout
    assert "Traceback" not in ci.stdout and "1 error" in ci.stdout
    local = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stdout
    assert re.search(rf"^SKIPPED \[1\] tests/test_browser.py:\d+: {re.escape(why)}$", local.stdout, re.M), local.stdout
    assert "1 skipped" in local.stdout


@pytest.mark.slow
def test_every_page_loads_in_chromium(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(server)
    page.get_by_text("Structure").first.wait_for(timeout=90_000)
    _settle(page)
    _number(page, "Calibration samples", 8)
    _number(page, "Tokens per sample", 128)
    _check(page, "1-model-not-analysed", "Not analysed with these settings yet")
    page.get_by_role("button", name="Run the analysis").click()
    _check(page, "1-model", "Cached analysis: 4 MoE layers")
    assert "mixtral" in page.locator('[data-testid="stMain"]').inner_text()

    _go(page, "Similarity")
    _check(page, "2-similarity", "Most alike pairs", charts=1)

    _go(page, "Routing")
    _check(page, "3-routing-usage", "Balance (entropy / log E)", charts=2)
    page.get_by_text("Tokens", exact=True).click()
    _settle(page)
    _check(page, "3-routing-tokens", "Most frequent tokens")

    _go(page, "Expert maps")
    _check(page, "4-expert-maps", "Agreement with the drop grid", charts=1)

    _go(page, "Drop grid")
    _number(page, "Sequences", 2)
    _number(page, "Tokens per sequence", 64)
    page.get_by_role("button", name="Compute the drop grid").click()
    _check(page, "5-drop-grid", "Baseline perplexity", charts=1)

    _go(page, "Expert maps")
    _check(page, "4-expert-maps-vs-grid", "Mean Spearman ρ", charts=2)

    _go(page, "Plan")
    _check(page, "6-plan-strategy", "Make the plan")
    page.get_by_role("button", name="Make the plan").click()
    _check(page, "6-plan-strategy-made", "Valid plan (random)")
    _save_plan(page, "strategy plan")
    page.get_by_role("button", name="Clear the plan").click()
    _settle(page)

    # a second named plan from the drop grid's action
    _go(page, "Drop grid")
    page.get_by_role("button", name="Drop the 1 least needed in every layer").click()
    _check(page, "5-drop-grid-into-plan", "Added to the current plan")
    _go(page, "Plan")
    _check(page, "6-plan-from-grid", "Valid plan (manual): 28 of 32")
    _save_plan(page, "grid plan")
    page.get_by_role("button", name="Clear the plan").click()
    _settle(page)

    page.get_by_text("By hand", exact=True).click()
    _check(page, "6-plan-by-hand-start", "Every layer", charts=2)
    # merge by clicking the similarity cell of experts 2 and 5 (a real plotly selection event)
    pairs = [(i, j) for i in range(8) for j in range(8) if i != j]  # the picker's point order
    _click_point(page, 0, pairs.index((2, 5)))
    page.get_by_text("Selected: 2–5").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Merge the selected pairs").click()
    _check(page, "6-plan-by-hand", "Valid plan (manual): 31 of 32", charts=2)
    # drop by clicking layer 1, expert 0 on the every-layer map (points are layer-major)
    _click_point(page, 1, 8 * 1 + 0)
    page.get_by_text("Selected: L1·0").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Drop the selected").click()
    _check(page, "6-plan-by-hand-dropped", "Valid plan (manual): 30 of 32", charts=2)
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert "Plan (manual): L0→7, L1→7" in sidebar, sidebar  # layer 0 merged 2+5, layer 1 dropped 0
    _save_plan(page, "hand plan")
    page.get_by_role("button", name="Clear the plan").click()
    _settle(page)

    # two more by strategy: frequency, and a merge (its build shows its stages while it runs)
    page.get_by_text("Strategy", exact=True).first.click()
    _settle(page)
    for strategy in ("frequency", "merge"):
        _select(page, "Strategy", strategy)
        page.get_by_role("button", name="Make the plan").click()
        _check(page, f"6-plan-{strategy}", f"Valid plan ({strategy}")  # merge names its recipe too
        _save_plan(page, f"{strategy} plan")
        page.get_by_role("button", name="Clear the plan").click()
        _settle(page)
    plans = ["strategy plan", "grid plan", "hand plan", "frequency plan", "merge plan"]

    # the five named plans, their predicted cost (the original as the first row), all sent to Run
    page.get_by_role("button", name="Predict every plan's cost").click()
    _check(page, "6-plan-predicted", "Proxy: perplexity on")
    # the table is drawn on a canvas; its rows are the options of "Send to Run" (all five offered)
    _open_choices(page, "stMultiSelect", "Send to Run")
    offered = page.get_by_role("option").all_text_contents()
    assert set(plans) <= set(offered), offered
    page.keyboard.press("Escape")
    _multiselect(page, "Send to Run", plans)
    chosen = page.locator('[data-testid="stMultiSelect"]').filter(
        has=page.get_by_label("Send to Run", exact=True)).first.inner_text()
    assert all(p in chosen for p in plans), chosen
    page.get_by_role("button", name="Send", exact=True).click()
    _check(page, "7-run-queued", "Plans sent from the Plan page")  # Send switches to Run

    _go(page, "Similarity")
    _check(page, "2-similarity-with-plan", "Overlay the current plan", charts=1)

    # Run the five plans sent from the Plan page (one job each), then compare them with the original
    _go(page, "Run")
    _check(page, "7-run", "Plans sent from the Plan page")
    for label, value in (("Windows", 8), ("Tokens per window", 64), ("Samples per task (0: all)", 6)):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Tab")  # Enter would submit the form before every field is set
    _multiselect(page, "lm-eval tasks (offline)", ["moescope_demo_continuation"])
    page.get_by_text("Measure memory and tokens/s", exact=False).click()
    page.get_by_role("button", name="Run prune + evaluate").click()
    # the jobs queue: one runs, the others wait in the order sent
    page.get_by_text("Queue (in order)", exact=False).first.wait_for(timeout=60_000)
    page.get_by_text("in line", exact=False).first.wait_for(timeout=60_000)
    _check(page, "7-run-queue", "Queue (in order)")
    deadline = time.time() + 900
    while page.get_by_text("→ experiment", exact=False).count() < 5 and time.time() < deadline:
        page.wait_for_timeout(1000)
    _check(page, "7-run-done", "→ experiment")
    assert page.get_by_text("→ experiment", exact=False).count() == 5

    # Compare: all five by default, under one original named by the evaluation setting
    _go(page, "Compare")
    _check(page, "8-compare", "Download CSV", charts=2)
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert "Showing 5 of 5 experiments of demo" in main, main[:800]
    assert "different settings" not in main  # the Run page's one setting for all five
    legend = [t.replace(" (within noise)", "")
              for t in page.locator(".js-plotly-plot").first.locator(".legendtext").all_text_contents()]
    originals = [t for t in legend if t.startswith("original")]
    assert originals == ["original · ppl demo:all 8×64 · moescope_demo_continuation ≤6"], legend
    assert set(plans) <= set(legend), legend
    # the page's verdicts are those a paired computation on the stored per-window losses gives
    from moescope.analysis.core.cache import Cache
    from moescope.analysis.evaluation.paired import perplexity_ratio
    from moescope.analysis.run import experiments as X

    stored = [e for e in X.list_experiments(Cache(SERVER_CACHE["root"])) if e.plan]
    assert sorted(e.label for e in stored) == sorted(plans)
    assert len({X.spec_key(e.eval) for e in stored}) == 1
    windows = {e.label: e.result["ppl_windows"]["demo:all"] for e in stored}
    original = stored[0].reference["ppl_windows"]["demo:all"]
    tokens = original["tokens"]
    assert all(w["tokens"] == tokens and len(w["nll"]) == 8 for w in windows.values())
    said = {}
    for name, w in windows.items():  # against the original, window by window
        said.setdefault(perplexity_ratio(original["nll"], w["nll"], tokens).verdict("lower"), []).append(name)
    line = next(t for t in main.splitlines() if t.startswith("Verdict"))
    part = line.split("ppl demo:all — ")[1].split(" · ")[0]
    for verdict, names in said.items():
        label = f"{verdict} than the original: " if verdict in ("better", "worse") else f"{verdict}: "
        shown = next(p for p in part.split("; ") if p.startswith(label))[len(label):].split(", ")
        assert sorted(shown) == sorted(names), (verdict, part)
    # "best": the lowest perplexity, only where it is paired-better than every rival
    ppl = {name: sum(w["nll"]) for name, w in windows.items()}
    leader = min(ppl, key=ppl.get)
    beats = all(perplexity_ratio(windows[r]["nll"], windows[leader]["nll"], tokens).verdict("lower") == "better"
                for r in windows if r != leader)
    if beats:
        assert f"ppl demo:all: {leader} best beyond every rival's paired range" in line, line
    else:
        assert "ppl demo:all: no clear best" in line, line

    # the named plans survive a reload (a new session reads them from the cache)
    page.goto(server)  # a fresh load of the app: a new session
    page.get_by_text("Structure").first.wait_for(timeout=90_000)
    _go(page, "Plan")
    _check(page, "6-plan-after-reload", "Named plans (5 saved")

    _go(page, "Export")
    _check(page, "9-export", "Download plan JSON")
    ids = {e.label: e.id for e in stored}
    # the default folder follows the chosen experiment (named for its plan and id)
    for label in ("grid plan", "hand plan"):
        _select(page, "Experiment", label)
        want = f"{label.replace(' ', '-')}-{ids[label]}"
        # the folder box is redrawn under the new experiment's key: for a moment the old box is still
        # on screen beside it, so wait for the one box left
        boxes = page.locator('input[aria-label="Output folder"]')
        deadline = time.time() + 30
        while not (boxes.count() == 1 and boxes.first.input_value().endswith(want)) and time.time() < deadline:
            page.wait_for_timeout(200)
        folder = boxes.first.input_value()
        assert boxes.count() == 1 and folder.endswith(want), (label, [b.input_value() for b in boxes.all()])
    # the hand-made plan keeps 7/7/8/8 experts: Export writes the per-layer folder and says how it loads
    out = tmp_path / "hand-made"
    box = page.get_by_label("Output folder", exact=True)
    box.fill(str(out))
    box.press("Tab")
    page.get_by_role("button", name="Export", exact=True).click()
    page.get_by_text("trust_remote_code=True", exact=False).first.wait_for(timeout=120_000)
    _check(page, "9-export-done", "modeling_moescope.py")
    config = json.loads((out / "config.json").read_text())
    assert config["moescope_num_experts_per_layer"] == {"0": 7, "1": 7, "2": 8, "3": 8}, config
    assert (out / "modeling_moescope.py").is_file() and (out / "model.safetensors").is_file()
    page.close()
