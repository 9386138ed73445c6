"""The report in a real headless Chromium (Debian's `chromium`, driven by Playwright): it loads
from file:// with no console error and no request leaving file:// or data:, a script injected
through the data does not run, the gallery filters work, and a screenshot is saved for people
to look at (under the test's tmp folder, and in $MMDIAG_SCREENSHOT_DIR when set)."""

import os
import shutil
from pathlib import Path

import pytest

from mmdiag.reports import analyse, render

import report_fixtures as fx

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    if os.environ.get("MMDIAG_REQUIRE_BROWSER"):  # CI: the browser test must run, not skip
        raise RuntimeError("MMDIAG_REQUIRE_BROWSER is set but chromium is not installed: apt-get install -y chromium")
    pytest.skip("Debian's chromium is not installed: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    data = fx.attacked_data()
    summary, results, _ = fx.run("shortcut", data=data)
    analysis = analyse(summary, results, data)
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render(summary, results, data, analysis, fx.provenance(summary)), encoding="utf-8")
    return path, analysis


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, report):
    path, _ = report
    problems, requests = [], []
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems, requests


def test_loads_without_console_errors_or_network(page):
    view, problems, requests = page
    assert problems == []
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), requests


def test_injected_script_does_not_run_and_shows_as_text(page):
    view, _, _ = page
    assert view.evaluate("typeof window.__pwned") == "undefined"
    assert view.locator("p.caption", has_text="<script>window.__pwned=1</script>").count() == 1
    assert view.locator("img[src='x']").count() == 0


def test_the_check_would_see_a_script_that_runs(browser, tmp_path):
    """Control: the same check reports a script that does run on a page without our escaping."""
    path = tmp_path / "unsafe.html"
    path.write_text(f"<html><body><p>{fx.ATTACK}</p></body></html>")
    page = browser.new_page()
    page.goto(path.as_uri(), wait_until="load")
    assert page.evaluate("typeof window.__pwned") == "number"
    page.close()


def test_gallery_filters_by_category_and_slice(page, report):
    view, _, _ = page
    _, analysis = report
    cards = analysis["errors"]["cards"]
    category = cards[0]["category"]
    view.select_option("#filter-category", category)
    assert view.locator("article.err:visible").count() == sum(c["category"] == category for c in cards)
    view.select_option("#filter-category", "")
    first = analysis["errors"]["slices"][0]["id"]
    view.select_option("#filter-slice", first)
    assert view.locator("article.err:visible").count() == sum(first in c["slices"] for c in cards)
    assert view.inner_text("#filter-count") == str(sum(first in c["slices"] for c in cards))
    view.select_option("#filter-slice", "")


def test_screenshot_is_saved(page, tmp_path):
    view, _, _ = page
    view.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    view.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MMDIAG_SCREENSHOT_DIR"):
        folder = Path(os.environ["MMDIAG_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "report.png")
        view.locator("#gallery").scroll_into_view_if_needed()
        view.screenshot(path=str(folder / "gallery.png"))
    print(f"report screenshot: {shot}")
