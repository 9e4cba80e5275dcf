"""Open every chapter of a built book in a real browser, offline, and check that it works.

    python scripts/check_browser.py _build/ci/_build/html

For each page of ``_toc.yml`` (Chromium, headless, every request outside the build refused):

- no JavaScript error, neither on the console nor uncaught;
- no failed request: everything a page loads comes from the build itself;
- equations are typeset (MathJax has turned every math element into rendered math);
- saved widget views are rendered by the widget manager;
- each animation's "Next frame" button changes the frame it shows;
- the chapter's Colab launch link points at that chapter's notebook.

The browser is the system Chromium (Debian package ``chromium``; ``CHROMIUM`` overrides the
path), driven by playwright; no browser is downloaded. Exits 1 with a list of what failed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
COLAB = re.compile(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/[^/]+/(.+\.ipynb)$")


def toc_pages() -> list[str]:
    """The book's pages in order, as paths without suffix (``chapters/01_diffusion``)."""
    text = (ROOT / "_toc.yml").read_text()
    return re.findall(r"(?:root|file):\s*(\S+)", text)


def _comes_true(page, condition: str, timeout_ms: int = 15_000) -> bool:
    """Whether the JavaScript expression ``condition`` becomes true on the page in time."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => {condition}", timeout=timeout_ms)
        return True
    except PlaywrightTimeout:
        return False


def check_page(browser, html: Path, page_name: str) -> list[str]:
    """Return what is wrong with one built page."""
    problems: list[str] = []
    context = browser.new_context()
    base = html.resolve().as_uri()

    def route(r):
        if r.request.url.startswith(base) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            problems.append(f"request outside the build: {r.request.url}")
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: r.url.startswith(base) and problems.append(
        f"failed request: {r.url}"))
    path = html / f"{page_name}.html"
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_timeout(300)

    # Equations: MathJax replaces the text of every math element by an mjx-container.
    n_math = page.locator(".math").count()
    if n_math and not _comes_true(page, "document.querySelectorAll('.math').length == "
                                        "document.querySelectorAll('.math mjx-container').length"):
        typeset = page.locator(".math mjx-container").count()
        problems.append(f"equations not typeset: {typeset} of {n_math}")

    # Widgets: the manager renders every saved view.
    views = page.locator("script[type='application/vnd.jupyter.widget-view+json']").count()
    if views and not _comes_true(page, "document.querySelectorAll('.jupyter-widgets"
                                       ".widget-container, .jupyter-widgets"
                                       ".widget-inline-hbox').length > 0"):
        problems.append(f"{views} widget view(s) saved, none rendered")

    # Animations (matplotlib's HTML player): stepping changes the frame shown.
    buttons = page.locator("button[title='Next frame']")
    for i in range(buttons.count()):
        img = buttons.nth(i).locator("xpath=ancestor::div[contains(@class,'animation')][1]//img")
        before = img.first.get_attribute("src")
        buttons.nth(i).click()
        page.wait_for_timeout(100)
        if img.first.get_attribute("src") == before:
            problems.append(f"animation {i + 1}: 'Next frame' did not change the frame")

    # The Colab launch link opens this chapter's notebook.
    if (ROOT / f"{page_name}.ipynb").is_file():
        links = [a.get_attribute("href") or "" for a in page.locator("a[href*='colab']").all()]
        targets = [m.group(1) for h in links if (m := COLAB.search(h))]
        if targets != [f"{page_name}.ipynb"]:
            problems.append(f"Colab links {links} do not open {page_name}.ipynb")
    context.close()
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the built book's html folder")
    args = parser.parse_args(argv)
    args.html = args.html.resolve()
    if not (args.html / "index.html").is_file():
        print(f"{args.html} holds no built book (index.html is missing)", file=sys.stderr)
        return 1
    if not Path(CHROMIUM).is_file():
        print(f"no Chromium at {CHROMIUM}: install the Debian package 'chromium' "
              "(make browser-setup) or set CHROMIUM", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    failed = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for name in toc_pages():
            problems = check_page(browser, args.html, name)
            status = "ok" if not problems else f"{len(problems)} problem(s)"
            print(f"{name:32s} {status}")
            for problem in problems:
                print(f"    {problem}")
            failed += bool(problems)
        browser.close()
    if failed:
        print(f"{failed} page(s) failed in the browser", file=sys.stderr)
        return 1
    print("every page works offline in Chromium")
    return 0


if __name__ == "__main__":
    sys.exit(main())
