"""Every chapter is a lesson (design.md): learning goals first, one main line, a summary,
exercises with solutions (conceptual ones too), then "Going further"; cells stay small enough to
read, and the package's code is shown by cells, not by directives only the book understands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb"))
CHAPTERS = [p for p in NOTEBOOKS if p.name[:2].isdigit()]
MAX_MARKDOWN_WORDS = 250
MAX_CODE_LINES = 40
MAX_MAIN_LINE_WORDS = {"01_diffusion": 1600}

EXERCISE = re.compile(r"```\{exercise\}.*?\n:label: (\S+)", re.S)
SOLUTION = re.compile(r"```\{solution(-start)?\} (\S+)")


def cells(path: Path) -> list[dict]:
    return [{"type": c["cell_type"], "source": "".join(c["source"]),
             "tags": c.get("metadata", {}).get("tags", [])}
            for c in json.loads(path.read_text())["cells"]]


def words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def heading_index(chapter: list[dict], heading: str) -> int:
    found = [i for i, c in enumerate(chapter)
             if c["type"] == "markdown" and re.search(rf"^## {heading}\s*$", c["source"], re.M)]
    assert len(found) == 1, f"expected one '## {heading}' section, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_is_a_lesson(path):
    chapter = cells(path)
    first = next(c for c in chapter if c["type"] == "markdown")
    assert "{admonition} Learning goals" in first["source"], "the chapter opens with its goals"
    summary, exercises, further = (heading_index(chapter, h)
                                   for h in ("Summary", "Exercises", "Going further"))
    assert summary < exercises < further


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution_and_some_are_conceptual(path):
    chapter = cells(path)
    text = "\n".join(c["source"] for c in chapter if c["type"] == "markdown")
    exercises = EXERCISE.findall(text)
    solutions = {}  # label: the cell that answers it
    for i, c in enumerate(chapter):
        found = SOLUTION.search(c["source"]) if c["type"] == "markdown" else None
        if found:
            assert found.group(1), "solutions are gated: a cell answers, collapsed everywhere"
            solutions[found.group(2)] = chapter[i + 1]
    assert len(exercises) >= 3
    assert sorted(exercises) == sorted(solutions), "one solution per exercise"
    for answer in solutions.values():
        # Colab hides a form cell's code behind its title; the book collapses the solution.
        assert answer["type"] == "code" and answer["source"].startswith("# @title Solution")
    # A conceptual exercise is answered in words: a cell that only renders its text.
    assert any("Markdown(" in a["source"] for a in solutions.values())
    assert "Solutions follow" not in text and "no solution" not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_stay_small(path):
    too_long = [f"cell {i}: {words(c['source'])} words" for i, c in enumerate(cells(path))
                if c["type"] == "markdown" and words(c["source"]) > MAX_MARKDOWN_WORDS]
    too_long += [f"cell {i}: {len(c['source'].splitlines())} lines"
                 for i, c in enumerate(cells(path))
                 if c["type"] == "code" and len(c["source"].splitlines()) > MAX_CODE_LINES]
    assert not too_long


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_is_shown_by_cells_that_run_anywhere(path):
    for c in cells(path):
        # literalinclude and hide-cell only work in the book: on Colab the first shows nothing
        # and the second shows the solution in plain view.
        assert "literalinclude" not in c["source"]
        assert "hide-cell" not in c["tags"]


@pytest.mark.parametrize("stem,limit", MAX_MAIN_LINE_WORDS.items())
def test_main_line_length(stem, limit):
    chapter = cells(next(p for p in CHAPTERS if p.stem == stem))
    summary = heading_index(chapter, "Summary")
    main_line = sum(words(c["source"]) for c in chapter[:summary] if c["type"] == "markdown")
    assert main_line < limit
