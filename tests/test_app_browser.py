"""The app in a real browser: Debian's chromium, headless, driven by playwright's Python package.

Runs an example end to end (the three outputs, the charts and the round view's tree show, and moving the round
slider redraws the tree), takes a screenshot, cancels a run mid-stream and checks the app still answers. Skips when chromium or playwright is missing (.ci/run installs chromium).
The screenshot goes to the test's temp folder; the tiny test model writes gibberish, so docs/screenshot.png is only
written on request, with the real model:
    NANOSPEC_APP_TEST_MODEL=embedded NANOSPEC_SCREENSHOT=docs/screenshot.png python -m pytest tests/test_app_browser.py
"""
import os
import shutil
import time

import pytest

from nanospec_core.bench.app_browser import CHROMIUM_ARGS  # the benchmark's flags: one list
from tests.conftest import AppServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RUN_TIMEOUT_MS = 120_000

if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """The shared tiny-model app, or the model in NANOSPEC_APP_TEST_MODEL (its shipped head, dtype auto)."""
    model = os.environ.get("NANOSPEC_APP_TEST_MODEL")
    if not model:
        yield request.getfixturevalue("app_server")
        return
    own = AppServer(model, tmp_path_factory.mktemp("app-browser") / "app.log", dtype="auto",
                    head=os.environ.get("NANOSPEC_HEAD"), threads=None)
    try:
        own.wait_ready(timeout_s=900)
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.wait_for_selector("#prompt textarea")
            yield page
        finally:
            browser.close()


def status(page) -> str:
    return page.locator("#status").inner_text()


def wait_done(page):
    page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').startsWith('done')",
                           timeout=RUN_TIMEOUT_MS)


SHOWN_ROUND = "() => (document.querySelector('#round-details').innerText.match(/Round (\\d+)/) || [])[1] || null"


def tree_points(page) -> int:
    """Markers drawn in NanoSpec's tree figure (nodes, root and bonus)."""
    return page.locator("#nanospec-tree .scatterlayer .point").count()


def test_an_example_streams_three_outputs_the_charts_and_the_round_view(page, tmp_path):
    page.get_by_role("button", name="translation", exact=True).click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.startsWith('Translate')")
    page.click("#generate")
    wait_done(page)
    for lane in ("plain", "eagle", "nanospec"):
        assert page.locator(f"#{lane}-output textarea").input_value().strip()
    assert page.locator('[data-testid="plotly"]').first.is_visible()
    assert "Plain decoding" in page.locator("#summary").inner_text()  # the reference row of the speed table
    page.wait_for_function("() => document.querySelectorAll('#nanospec-tree .scatterlayer .point').length >= 3")
    legend = page.locator("#nanospec-tree .legend").text_content()
    assert "rejected" in legend and "bonus" in legend
    if os.environ.get("NANOSPEC_APP_TEST_MODEL"):  # a trained head: the shown round (the longest path) has one
        assert "accepted" in legend
    # (the tiny model's random head never gets a draft accepted; tests/test_round_view.py checks the path drawn)
    shown = page.evaluate(SHOWN_ROUND)
    assert shown is not None
    page.locator("#round-slider input[type=range]").focus()
    page.keyboard.press("Home" if shown != "1" else "End")  # another round
    page.wait_for_function(f"(before) => {{ const now = ({SHOWN_ROUND})(); return now && now !== before; }}",
                           arg=shown)
    assert tree_points(page) >= 2
    identical = page.locator("#identical").inner_text()
    if os.environ.get("NANOSPEC_APP_TEST_MODEL"):  # a real model in bf16: equal, or the near-tie explained
        assert "Outputs identical: yes" in identical or "near-tie at" in identical
    else:  # the tiny model runs in float32: equal token for token
        assert "Outputs identical: yes" in identical
    assert "on this CPU" in status(page) or "on this GPU" in status(page)  # where and how it runs
    why = page.locator("#why").inner_text()  # the break-even arithmetic, from this run's own rounds
    assert "Why this speed" in why and "ms a token" in why and "plain steps" in why
    assert "x plain" in why and ("break even" in why or "commits more than" in why)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("NANOSPEC_SCREENSHOT"):  # never overwrite the README's picture from a plain test run
        shutil.copy(shot, os.environ["NANOSPEC_SCREENSHOT"])


def test_stop_cancels_mid_stream_and_the_app_still_answers(page, server):
    log_start = server.log_path.stat().st_size
    page.locator("#prompt textarea").fill("Write a long story about a fox, a train and a python.")
    page.click("#generate")
    page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').startsWith('running')")
    page.click("#stop")
    time.sleep(1.0)
    stopped_at = status(page)
    time.sleep(1.5)
    assert status(page) == stopped_at and not stopped_at.startswith("done")  # nothing arrives after Stop
    page.locator("#prompt textarea").fill("Translate into French: good morning")
    page.click("#generate")
    wait_done(page)
    assert page.locator("#plain-output textarea").input_value().strip()
    assert page.locator("#nanospec-output textarea").input_value().strip()
    with open(server.log_path, errors="replace") as log:
        log.seek(log_start)
        assert "Traceback" not in log.read()  # the cancelled run ended quietly


def test_float32_is_one_click_away_and_gives_equal_outputs(page):
    page.get_by_label("float32: exact greedy equality").check()
    page.locator("#prompt textarea").fill("Write python code to sum a list of numbers")
    page.click("#generate")
    wait_done(page)
    assert "float32" in status(page)
    assert "Outputs identical: yes" in page.locator("#identical").inner_text()


def test_the_benchmarks_browser_reads_the_speed_table_a_run_shows(page):
    """app-bench --browser: bench/app_browser.run_example clicks an example and Generate, then reads each lane's row
    (on this module's page: one playwright per thread), and browser_cpu_s counts the page's CPU while it ran."""
    from nanospec_core.bench.app_bench import frame_rows
    from nanospec_core.bench.app_browser import browser_cpu_s, run_example
    from nanospec_core.compare import lanes
    from nanospec_core.views import ui

    before = browser_cpu_s()
    rows = frame_rows(run_example(page, "translation"))
    assert browser_cpu_s() > before > 0  # chromium, started under this process, drew the run
    labels = [ui.lane_label(method) for method in lanes(ui.COPIES)]
    assert set(labels) <= set(rows), rows
    assert all(rows[label]["tokens_per_s"] > 0 and rows[label]["ms_per_round"] > 0 for label in labels), rows
