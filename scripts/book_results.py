"""Collect every value the chapters glue into one file: ``_build/results.json``.

The book's numbers live in the executed notebooks as myst-nb glue outputs. This script reads
them from a build's ``jupyter_execute`` folder and writes ``{"<notebook stem>": {"<glue name>":
value}}``, numbers as numbers and short strings as strings (figures and other rich outputs are
left out), so that two builds can be compared without opening the HTML.

    python scripts/book_results.py _build            # writes _build/results.json
    python scripts/book_results.py _build --check    # and checks every {glue:text} has a value
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

GLUE_PREFIX = "application/papermill.record/"
MAX_STRING = 200  # longer text is not a result but prose or a table
_REFERENCE = re.compile(r"\{glue(?::text|:md|:any)?\}`([A-Za-z_][A-Za-z0-9_]*)")


def _as_value(text: str):
    """A glued value's plain-text form as a number or a string (None for anything else)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str):
        try:  # a number formatted for the prose ("0.82") is still a number
            return float(value) if value.strip() and value.strip() == value else value
        except ValueError:
            return value if len(value) <= MAX_STRING else None
    return value


def _output_value(output: dict):
    """The value of one glue output, or None for a figure or other rich output."""
    data = {k.removeprefix(GLUE_PREFIX): v for k, v in output.get("data", {}).items()}
    if set(data) - {"text/plain"}:  # a figure, HTML or other rich output
        return None
    text = data.get("text/plain")
    text = "".join(text) if isinstance(text, list) else text
    return _as_value(text) if text is not None else None


def glued_values(notebook: dict) -> dict:
    """Return ``{name: value}`` for every glue output left in an executed notebook."""
    values = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            value = _output_value(output) if name is not None else None
            if value is not None:
                values[name] = value
    return values


def referenced_names(notebook: dict) -> set[str]:
    """Return the glue names the notebook's markdown cells refer to."""
    names = set()
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "markdown":
            source = cell.get("source", "")
            text = "".join(source) if isinstance(source, list) else source
            names.update(_REFERENCE.findall(text))
    return names


def collect(build: Path) -> dict[str, dict]:
    """Return the glued values of every executed chapter below ``build/jupyter_execute``.

    myst-nb moves a notebook's glue outputs into ``<stem>.glue.json`` beside it; outputs still
    in the notebook count too.
    """
    results = {}
    for path in sorted((build / "jupyter_execute").rglob("*.ipynb")):
        values = glued_values(json.loads(path.read_text(encoding="utf-8")))
        store = path.with_suffix(".glue.json")
        if store.is_file():
            for name, output in json.loads(store.read_text(encoding="utf-8")).items():
                value = _output_value(output)
                if value is not None:
                    values[name] = value
        results[path.stem] = dict(sorted(values.items()))
    return results


def write(build: Path) -> Path:
    """Write ``build/results.json`` and return its path."""
    out = build / "results.json"
    out.write_text(json.dumps(collect(build), indent=1, sort_keys=True) + "\n")
    return out


def check(build: Path, chapters: Path) -> list[str]:
    """Return what is wrong with ``build/results.json``: chapters missing from it, and glue
    names a chapter's text refers to without a value there."""
    results = json.loads((build / "results.json").read_text())
    problems = []
    for source in sorted(chapters.glob("*.ipynb")):
        if source.stem not in results:
            problems.append(f"{source.stem}: not in results.json")
            continue
        wanted = referenced_names(json.loads(source.read_text(encoding="utf-8")))
        missing = sorted(wanted - set(results[source.stem]))
        if missing:
            problems.append(f"{source.stem}: no value for {', '.join(missing)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="the build folder (holds jupyter_execute/)")
    parser.add_argument("--check", action="store_true", help="check it against the chapters")
    args = parser.parse_args()
    out = write(args.build)
    count = sum(map(len, json.loads(out.read_text()).values()))
    print(f"{out}: {count} values")
    if args.check:
        problems = check(args.build, Path(__file__).resolve().parents[1] / "chapters")
        for line in problems:
            print(line)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
