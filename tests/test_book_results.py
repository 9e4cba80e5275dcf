"""scripts/book_results.py: the glued values of a build, collected into results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "book_results.py"
spec = importlib.util.spec_from_file_location("book_results", SCRIPT)
book_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book_results)


def _executed(tmp_path: Path) -> Path:
    """A chapter-like notebook that glues a number, a formatted number, a string and a figure,
    executed by a real kernel into build/jupyter_execute/chapters/."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("IoU {glue:text}`iou`, {glue:text}`steps` steps, "
                                      "{glue:text}`best` wins; {glue:text}`missing`."),
        nbformat.v4.new_code_cell(
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "from myst_nb import glue\n"
            "glue('iou', 0.8125, display=False)\n"
            "glue('steps', 3000, display=False)\n"
            "glue('ratio', f'{1.0123:.2f}', display=False)\n"
            "glue('best', 'GrabCut', display=False)\n"
            "glue('long', 'x' * 500, display=False)\n"
            "fig = plt.figure()\n"
            "glue('figure', fig, display=False)\n"),
    ]
    NotebookClient(nb, timeout=120).execute()
    out = tmp_path / "build" / "jupyter_execute" / "chapters" / "01_demo.ipynb"
    out.parent.mkdir(parents=True)
    nbformat.write(nb, out)
    source = tmp_path / "chapters" / "01_demo.ipynb"
    source.parent.mkdir()
    nbformat.write(nb, source)
    return tmp_path


def test_results_hold_numbers_and_short_strings_and_leave_figures_out(tmp_path):
    root = _executed(tmp_path)
    path = book_results.write(root / "build")
    results = json.loads(path.read_text())
    assert results == {"01_demo": {"iou": 0.8125, "steps": 3000, "ratio": 1.01,
                                   "best": "GrabCut"}}
    # The check names the glue the text refers to that has no value.
    problems = book_results.check(root / "build", root / "chapters")
    assert problems == ["01_demo: no value for missing"]
    assert book_results.referenced_names(json.loads((root / "chapters" / "01_demo.ipynb")
                                                    .read_text())) == {"iou", "steps", "best",
                                                                       "missing"}


def test_values_myst_nb_moved_into_glue_json_are_read(tmp_path):
    chapters = tmp_path / "build" / "jupyter_execute" / "chapters"
    chapters.mkdir(parents=True)
    (chapters / "02_x.ipynb").write_text(json.dumps({"cells": []}))
    record = book_results.GLUE_PREFIX
    (chapters / "02_x.glue.json").write_text(json.dumps({
        "fd_ratio": {"output_type": "display_data",
                     "metadata": {"scrapbook": {"name": "fd_ratio", "mime_prefix": record}},
                     "data": {"text/plain": "'1.01'"}},
        "steps": {"output_type": "display_data", "metadata": {}, "data": {"text/plain": "3000"}},
        "fig": {"output_type": "display_data", "metadata": {},
                "data": {"text/plain": "<Figure>", "image/png": "iVBOR"}},
    }))
    assert book_results.collect(tmp_path / "build") == {"02_x": {"fd_ratio": 1.01, "steps": 3000}}


def test_recorded_build_times_name_a_file_inside_or_outside_the_repository(tmp_path,
                                                                          monkeypatch):
    # the build records its command; a --record-times file outside the repository used to
    # crash it after every chapter had run
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_book.py"
    monkeypatch.syspath_prepend(str(path.parent))  # it imports its neighbour book_results
    spec = importlib.util.spec_from_file_location("build_book", path)
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    inside = build_book.ROOT / "data" / "results" / "chapter_times.json"
    assert build_book._shown(inside) == Path("data/results/chapter_times.json")
    assert build_book._shown(tmp_path / "times.json") == (tmp_path / "times.json").resolve()
