"""`tl_plugin.tune.plot_results` draws the majority-class baseline when given one (no Ray needed to plot rows)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from tl_plugin.tune import plot_results  # noqa: E402

#: The 8 trials of docs/hyperparameter-search.md's "Results from a real run" (validation majority rate 0.65).
ROWS = [
    {"trial": t, "status": "completed", "learning_rate": lr, "strategy": s, "frozen_blocks": f, "eval_accuracy": a}
    for t, lr, s, f, a in [
        ("01", 2.07e-4, "partial", 0, 0.75), ("05", 1.24e-4, "partial", 0, 0.75), ("07", 2.55e-4, "full", 0, 0.7175),
        ("00", 1e-4, "layers", 3, 0.65), ("02", 1.53e-4, "full", 0, 0.65), ("03", 1.96e-4, "layers", 5, 0.65),
        ("04", 5.82e-5, "partial", 0, 0.65), ("06", 2.43e-5, "full", 0, 0.65),
    ]
]  # fmt: skip


def _drawn(monkeypatch, **kwargs):
    """Plot ROWS and keep the figure's axes (read before the figure is closed)."""
    import matplotlib.pyplot as plt

    kept = {}
    real_close = plt.close

    def keep(fig=None):
        kept["ax"] = fig.axes[0]
        kept["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return kept


def test_baseline_is_drawn_and_counts_the_trials_on_it(tmp_path, monkeypatch):
    kept = _drawn(monkeypatch)
    path = plot_results(ROWS, tmp_path / "results.png", "eval_accuracy", baseline=0.65)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [line for line in kept["ax"].get_lines() if line.get_gid() == "baseline"]
    assert len(lines) == 1
    assert list(lines[0].get_ydata()) == [0.65, 0.65]
    assert "majority class 0.65 (5 of 8 trials on it)" in kept["legend"]


def test_no_baseline_no_line_and_a_bad_one_is_refused(tmp_path, monkeypatch):
    kept = _drawn(monkeypatch)
    plot_results(ROWS, tmp_path / "results.png", "eval_accuracy")
    assert not [line for line in kept["ax"].get_lines() if line.get_gid() == "baseline"]
    assert not any("majority" in text for text in kept["legend"])
    with pytest.raises(ValueError, match="`baseline` must be a finite number or None, got nan"):
        plot_results(ROWS, tmp_path / "results.png", "eval_accuracy", baseline=float("nan"))
