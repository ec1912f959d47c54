"""``tl-plugin search --prior scan``: the layer scan narrows the search and orders its first trials."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_plugin.app import search_prior
from tl_plugin.app.search_prior import prior_from_recommendation
from tl_plugin.testing import run_doctests, save_tiny_bert

TL_PLUGIN = str(Path(sys.executable).with_name("tl-plugin"))


def test_the_module_examples_run():
    result = run_doctests(search_prior)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize(
    ("boundary", "blocks", "expected"),
    [(0, 6, [1, 2]), (1, 6, [1, 2]), (3, 6, [2, 3, 4]), (5, 6, [4, 5]), (1, 2, [1])],
)
def test_the_boundaries_searched_are_the_recommendation_and_its_neighbours(boundary, blocks, expected):
    prior = prior_from_recommendation(boundary, (1e-4, 4e-4), num_blocks=blocks)
    assert prior.freeze_blocks == expected
    first = prior.first_points[0 if boundary else 1]
    assert first["freeze_bottom_blocks"] == max(1, boundary)
    assert first["learning_rate"] == pytest.approx(2e-4)  # the middle of the range, geometrically
    assert all(p["freeze_bottom_blocks"] in expected for p in prior.first_points)


def test_the_users_lr_range_is_kept_and_a_bad_boundary_is_refused():
    kept = prior_from_recommendation(2, (5e-5, 2e-4), num_blocks=6, keep_lr_range=(1e-5, 1e-3))
    assert kept.lr_range == (1e-5, 1e-3)
    with pytest.raises(ValueError, match=r"`boundary` must be in \[0, 5\] for a 6-block model, got 6"):
        prior_from_recommendation(6, (5e-5, 2e-4), num_blocks=6)


def test_the_search_space_takes_the_narrowed_boundaries():
    pytest.importorskip("ray")
    from tl_plugin.tune import build_search_space

    space = build_search_space(6, freeze_blocks=[3, 2, 4])
    assert space["freeze_bottom_blocks"].categories == [2, 3, 4]
    with pytest.raises(ValueError, match=r"`freeze_blocks` must be block counts in \[1, 6\], got \[0, 7\]"):
        build_search_space(6, freeze_blocks=[0, 7])


@pytest.mark.slow  # about 2 minutes on 2 cores (a scan, then 3 one-epoch trials); passed on 2026-12-01
@pytest.mark.ray
def test_search_with_the_scan_prior_runs_the_recommendation_first_within_the_narrowed_space(tmp_path):
    pytest.importorskip("ray")
    model = save_tiny_bert(tmp_path / "tiny-bert", num_hidden_layers=4)
    out = tmp_path / "search"
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [
        TL_PLUGIN, "search", "--prior", "scan", "--model_name_or_path", str(model), "--train_size", "64",
        "--max_epochs", "1", "--num_samples", "3", "--max_concurrent", "1", "--no_baseline",
        "--output_dir", str(out), "--quiet_workers", "--verbose", "0",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Prior: boundaries" in done.stdout
    prior = json.loads((out / "search.json").read_text())["search"]["prior"]
    scan = json.loads((out / "scan" / "scan.json").read_text())
    assert prior["boundary"] == scan["recommendation"]["boundary"]
    with (out / "results.csv").open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["trial"])
    assert len(rows) == 3
    configs = [json.loads(r["config"]) for r in rows]
    # the first trials are the prior's points, in order: the recommendation first
    for config, point in zip(configs, prior["first_points"], strict=False):
        assert config["freeze_bottom_blocks"] == point["freeze_bottom_blocks"]
        assert config["strategy"] == point["strategy"]
        assert float(config["learning_rate"]) == pytest.approx(point["learning_rate"])
    assert all(c["freeze_bottom_blocks"] in prior["freeze_blocks"] for c in configs)


def test_the_default_config_is_not_tried_twice_when_the_scan_recommends_it():
    """Found by benchmarks/search_vs_prior.py: with the scan recommending boundary 3 at lr 1e-4 (the middle of
    5e-5..2e-4) on a 6-block model, the default config of tl-plugin train was appended as a 4th point, and a
    4-trial seeded search trained the same config twice instead of sampling one."""
    from tl_plugin.app.search import initial_points
    from tl_plugin.app.search_prior import prior_from_recommendation

    prior = prior_from_recommendation(3, (5e-5, 2e-4), num_blocks=6)
    search = {"baseline": True, "strategies": ["layers"], "l2sp": False, "prior": prior.to_dict()}
    points = initial_points(search, num_blocks=6)
    assert [(p["strategy"], p["freeze_bottom_blocks"]) for p in points] == [
        ("layers", 3),
        ("layers", 2),
        ("layers", 4),
    ]
    # a recommendation that differs from the default keeps the default as the last point
    other = prior_from_recommendation(2, (1e-4, 5e-4), num_blocks=6)
    points = initial_points({**search, "prior": other.to_dict()}, num_blocks=6)
    assert [(p["freeze_bottom_blocks"], round(p["learning_rate"], 6)) for p in points] == [
        (2, 0.000224),
        (1, 0.000224),
        (3, 0.000224),
        (3, 0.0001),
    ]
    # without the prior: only the default; with --no_baseline: nothing
    assert len(initial_points({**search, "prior": None}, num_blocks=6)) == 1
    assert initial_points({**search, "prior": None, "baseline": False}, num_blocks=6) == []


def test_the_search_module_examples_run():
    from tl_plugin.app import search

    result = run_doctests(search)
    assert result.failed == 0
    assert result.attempted > 0
