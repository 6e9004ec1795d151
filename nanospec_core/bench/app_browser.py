"""The app as a visitor sees it: headless chromium (playwright) on the same machine runs an example, reads the table.

On a 2-core machine the browser's own work (laying out each streamed update, Plotly redraws) shares the cores with
the server's rounds, so a lane's tokens/s in a browser can only be at or under the headless client's. app-bench
--browser adds this figure next to it:

    with AppBrowser(url) as browser:
        frame = browser.run("code")   # the speed table: {"headers": [...], "data": [[...], ...]}, as gradio_client
                                      # returns it (app_bench.frame_rows reads both)
        browser.last_cpu              # {"cpu_s", "wall_s", "share"}: the page's CPU during that run (browser_cpu_s)
"""
from __future__ import annotations

import shutil
import time

from ..errors import NanoSpecError
from ..views import ui

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT_MS = 600_000

# The speed table as the page shows it, by ARIA role (Gradio's dataframe draws its body as a virtual grid of divs):
# the column titles, then each body row's cell texts.
READ_TABLE = """() => {
  const grid = document.querySelector('#summary');
  if (!grid) return null;
  const headers = [...grid.querySelectorAll('[role=columnheader]')].map((th) => th.getAttribute('title') || '');
  const rows = [...grid.querySelectorAll('[role=row][data-index]')].map(
    (row) => [...row.querySelectorAll('[role=gridcell]')].map((cell) => cell.innerText.trim()));
  return {headers, rows};
}"""


def number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def browser_cpu_s() -> float:
    """CPU seconds (user + system) used so far by the chromium processes under this one (playwright's driver starts
    them): the page's parsing, layout and Plotly drawing, all of it on the cores the server decodes on."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name().lower():
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # a process that ended between the listing and the read
            continue
    return total


def run_example(page, label: str) -> dict:
    """On a page showing the app: click example `label`, Generate, wait for 'done'; the speed table read."""
    prompt = dict(ui.EXAMPLES)[label]
    page.get_by_role("button", name=label, exact=True).click()
    page.wait_for_function("(p) => document.querySelector('#prompt textarea').value === p", arg=prompt)
    before = page.locator("#status").inner_text()
    page.click("#generate")
    page.wait_for_function("(before) => { const s = document.querySelector('#status')?.innerText || ''; "
                           "return s.startsWith('done') && s !== before; }", arg=before, timeout=RUN_TIMEOUT_MS)
    table = page.evaluate(READ_TABLE)
    if not table or not table["rows"]:
        raise NanoSpecError("the page's speed table (#summary) was not found or empty")
    return {"headers": table["headers"], "data": [[number(cell) for cell in row] for row in table["rows"]]}


class AppBrowser:
    """One chromium page on the app at `url`; run(label) clicks that example, Generate, waits for 'done'."""

    def __init__(self, url: str, executable: str | None = None):
        executable = executable or shutil.which("chromium") or shutil.which("chromium-browser")
        if not executable:
            raise NanoSpecError("--browser needs chromium (apt-get install chromium) and playwright (pip install "
                                "playwright)")
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                                         headless=True)
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(60_000)
        self.page.goto(url)
        self.page.wait_for_selector("#prompt textarea")
        self.last_cpu: dict = {}

    def run(self, label: str) -> dict:
        """run_example on this page; last_cpu: the page's CPU seconds over the run's wall seconds (share: in cores,
        1.0 = one core busy drawing for the whole run, half of a 2-core machine)."""
        cpu, started = browser_cpu_s(), time.perf_counter()
        frame = run_example(self.page, label)
        wall, used = time.perf_counter() - started, browser_cpu_s() - cpu
        self.last_cpu = {"cpu_s": round(used, 3), "wall_s": round(wall, 3), "share": round(used / wall, 4)}
        return frame

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()

    def __enter__(self) -> "AppBrowser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
