"""Check that the built HTML holds what each chapter must show without a kernel.

For every numbered notebook chapter in _toc.yml (``chapters/NN_topic``; the course page is not
one): at least MIN_FIGURES figures, at least one scrubbable
JavaScript animation (matplotlib's jshtml), and the saved ipywidgets state (so the live widgets
render as a snapshot). Exits non-zero with a list of what is missing.

    python scripts/check_html.py _build/ci/_build/html
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIN_FIGURES = 2


def toc_files(toc: Path) -> list[str]:
    """Return every `file:` entry of a Jupyter Book table of contents, in order."""
    files = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "root") and isinstance(value, str):
                    files.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    return files


def problems_of(page: Path) -> list[str]:
    html = page.read_text(encoding="utf-8")
    found = []
    figures = len(re.findall(r"<img[^>]+src=\"[^\"]*_images/[^\"]+\.png\"", html))
    figures += len(re.findall(r"<img[^>]+src=\"data:image/png", html))
    if figures < MIN_FIGURES:
        found.append(f"{figures} figures (need at least {MIN_FIGURES})")
    if 'class="animation"' not in html:
        found.append("no scrubbable animation (jshtml)")
    if "application/vnd.jupyter.widget-state+json" not in html:
        found.append("no saved widget state")
    return found


def main() -> int:
    html_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "_build" / "html")
    chapters = [f for f in toc_files(ROOT / "_toc.yml")
                if (ROOT / f"{f}.ipynb").is_file() and Path(f).name[:2].isdigit()]
    if not chapters:
        print("no notebook chapters in _toc.yml")
        return 1
    failures = {}
    for chapter in chapters:
        page = html_dir / f"{chapter}.html"
        if not page.is_file():
            failures[chapter] = ["page missing"]
            continue
        issues = problems_of(page)
        if issues:
            failures[chapter] = issues
    for chapter, issues in failures.items():
        print(f"{chapter}: " + "; ".join(issues))
    print(
        f"checked {len(chapters)} chapter pages in {html_dir}: "
        f"{len(chapters) - len(failures)} complete, {len(failures)} incomplete"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
