"""The arithmetic of the benchmarks' side-by-side reports (fast, nothing trained): what "the seeded search reached
the plain search's best with X % of its compute" and the scan's CPU-time ratio mean."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def row(trial: str, accuracy: float | None, seconds: float) -> dict:
    return {"trial": trial, "eval_accuracy": accuracy, "time_s": seconds, "status": "completed",
            "strategy": "layers", "frozen_blocks": 3, "learning_rate": 1e-4}  # fmt: skip


def test_seeded_search_compute_counts_the_scan_and_its_trials_in_start_order_until_the_plain_best():
    bench = load("search_vs_prior")
    plain = [row("a_00000", 0.65, 100.0), row("a_00001", 0.80, 100.0), row("a_00002", 0.70, 200.0)]
    seeded = [row("b_00000", 0.75, 50.0), row("b_00001", 0.81, 60.0), row("b_00002", 0.90, 40.0)]
    summary = bench.summarise(plain, seeded, scan_s=30.0, full_s=100.0)
    assert summary["plain_best"] == 0.80
    assert summary["seeded_best"] == 0.90
    # the scan (30) + the first seeded trial (50, below 0.80) + the second (60, reaches it): 140 of the plain 400
    assert summary["seeded_to_reach_plain_best_s"] == 140.0
    assert summary["seeded_to_reach_over_plain_total"] == pytest.approx(0.35)
    assert summary["seeded_compute_s"] == 180.0
    assert summary["seeded_over_full_run"] == 1.8
    assert summary["plain_over_full_run"] == 4.0


def test_a_seeded_search_that_never_reaches_the_plain_best_says_so():
    bench = load("search_vs_prior")
    plain = [row("a_00000", 0.80, 100.0)]
    seeded = [row("b_00000", 0.79, 50.0), row("b_00001", None, 10.0)]  # a failed trial has no metric
    summary = bench.summarise(plain, seeded, scan_s=30.0, full_s=100.0)
    assert summary["seeded_to_reach_plain_best_s"] is None
    assert "never" in bench.format_report(summary, plain, seeded)


def test_the_scan_benchmark_reports_the_cpu_time_ratio_next_to_the_wall_time_one():
    bench = load("scan_vs_grid")
    scan = {
        "scan": {"layers": [{"layer": "embeddings", "boundary": 0, "probe_accuracy": 0.6, "logme": -0.7},
                            {"layer": "blocks.0", "boundary": 1, "probe_accuracy": 0.7, "logme": -0.6}]},
        "recommendation": {"boundary": 1, "learning_rate_range": [1e-4, 5e-4],
                           "combined_scores": {"embeddings": 0.0, "blocks.0": 1.0}},
    }  # fmt: skip
    summary = bench.summarise(
        scan, {0: [0.8], 1: [0.7]}, scan_seconds=20.0, full_seconds=40.0, cpu=(10.0, 50.0)
    )
    assert summary["scan_over_full_run"] == 0.5
    assert summary["scan_over_full_run_cpu"] == 0.2
    assert "CPU time: scan 10 s, one full fine-tuning run 50 s: ratio 0.20" in bench.format_report(summary)


def test_an_interrupted_grid_is_summarised_from_the_runs_its_log_shows(tmp_path):
    import json

    bench = load("scan_vs_grid")
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "scan.json").write_text(json.dumps({"scan": {}, "recommendation": {"boundary": 1}}))
    log = tmp_path / "run.log"
    log.write_text(
        "settings: {'boundaries': [0, 1], 'seeds': [42, 43], 'train_size': 2000}\n"
        "scan: 296 s wall, 66 s CPU; recommends boundary 1\n"
        "grid: boundary 0 seed 42: test accuracy 0.7980 (861 s wall, 385 s CPU)\n"
        "grid: boundary 1 seed 42: test accuracy 0.7900 (700 s wall, 300 s CPU)\n"
        "grid: boundary 0 seed 43: test accuracy 0.8100 (500 s wall, 380 s CPU)\n"
    )
    run, scan, grid, times = bench.from_log(log, tmp_path)
    assert run["seeds"] == [42, 43]
    assert grid == {0: [0.798, 0.81], 1: [0.79]}
    assert times == [296.0, 66.0, 861.0, 385.0]  # the full run is the first seed's
    assert scan["recommendation"]["boundary"] == 1
