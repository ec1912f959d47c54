"""docs/hyperparameter-search.md's real search: the stored CSV is the table printed on the page, and the picture is
redrawn from it by ``python recipes/plot_tune_results.py`` with the majority-class baseline."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "hyperparameter-search.md"
CSV = ROOT / "docs" / "data" / "tune-results-real-400.csv"


def _recipe():
    name = "plot_tune_results"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _page_table() -> list[dict[str, str]]:
    """The results table printed on the page (a fixed-width ```text block: header, dashes, rows), cells by column."""
    text = PAGE.read_text()
    block = re.search(r"The results table as printed.*?```text\n(.*?)```", text, re.S).group(1)
    header, dashes, *lines = block.rstrip("\n").splitlines()
    spans = [m.span() for m in re.finditer(r"-+", dashes)]
    names = [header[a:b].strip() for a, b in spans]
    # the last column runs to the end of the line
    spans[-1] = (spans[-1][0], max(len(line) for line in [header, *lines]))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, spans, strict=True)} for line in lines]


def test_the_stored_csv_is_the_table_printed_on_the_page():
    with CSV.open(newline="") as handle:
        stored = list(csv.DictReader(handle))
    printed = _page_table()
    assert len(printed) == 8
    assert stored == printed
    assert CSV.name in PAGE.read_text()


def test_the_plot_is_redrawn_from_the_csv_with_the_majority_baseline(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    kept = {}
    real_close = plt.close

    def keep(fig=None):
        ax = fig.axes[0]
        kept["baseline"] = [list(line.get_ydata()) for line in ax.get_lines() if line.get_gid() == "baseline"]
        kept["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        kept["points"] = sum(len(c.get_offsets()) for c in ax.collections)
        return real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    path = _recipe().main(["--output", str(tmp_path / "tune-results.png")])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert kept["baseline"] == [[0.65, 0.65]]
    assert "majority class 0.65 (5 of 8 trials on it)" in kept["legend"]
    assert kept["points"] == 8
    # the page's picture is this plot (same size; redraw it with the command above when the CSV changes)
    from PIL import Image

    with Image.open(path) as drawn, Image.open(ROOT / "docs" / "images" / "tune-results.png") as shown:
        assert drawn.size == shown.size


def test_the_page_names_the_trials_on_the_baseline():
    rows = _recipe().read_rows(CSV)
    on_it = sorted(r["trial"] for r in rows if r["eval_accuracy"] == 0.65)
    text = PAGE.read_text()
    section = text[text.index("What it says:") :]
    section = section[: section.index("\n## ")]
    named = sorted(set(re.findall(r"26790_\d{5}", section[: section.index("ended at exactly 0.65")])))
    assert named == on_it
    assert "predates" not in text
