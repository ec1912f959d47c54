"""Side by side in one run: the frozen-prefix benchmark (``perf_benchmark.py``) of an earlier commit and of this
working tree, alternated, with the ratios of each next to each other.

Usage (from the repository root; the earlier commit is checked out into a temporary git worktree, removed at the
end):

    HF_HUB_OFFLINE=1 python benchmarks/compare_commits.py f4f1870 --quick --repeats 1

Each repeat runs the earlier tree's own ``benchmarks/perf_benchmark.py``, then this tree's, each with its own
``tl_plugin`` first on ``PYTHONPATH`` (``--skip_memory``, results to a temporary folder, nothing in
``benchmarks/results`` or ``docs/images`` touched). It prints, for every ratio both report, the median of each side
and after / before; a refactoring that changed nothing gives ratios of about 1 (the noise of a loaded machine is
what the repeats show).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the earlier commit (any git revision)")
    parser.add_argument("--quick", action="store_true", help="perf_benchmark.py --quick on both sides")
    parser.add_argument("--repeats", type=int, default=1, help="alternations of before / after (default 1)")
    return parser.parse_args(argv)


def run_side(tree: Path, out: Path, quick: bool) -> dict[str, Any]:
    """One perf_benchmark.py run of `tree` (its own script and package); its report."""
    json_path = out / "perf.json"
    command = [sys.executable, str(tree / "benchmarks" / "perf_benchmark.py"), "--skip_memory",
               "--json", str(json_path), "--png", str(out / "perf.png")]  # fmt: skip
    if quick:
        command.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tree / "benchmarks", env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"perf_benchmark.py of {tree} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(json_path.read_text())


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """(name, before median, after median, after / before) for every ratio and throughput both sides report."""
    rows = []
    for key in before[0]["ratios"]:
        if all(key in r["ratios"] for r in before + after):
            b = statistics.median(r["ratios"][key]["measured"] for r in before)
            a = statistics.median(r["ratios"][key]["measured"] for r in after)
            rows.append((key, b, a, a / b))
    for setup in before[0]["throughput"]:
        if all(setup in r["throughput"] for r in before + after):
            b = statistics.median(r["throughput"][setup]["samples_per_second"] for r in before)
            a = statistics.median(r["throughput"][setup]["samples_per_second"] for r in after)
            rows.append((f"samples/s {setup}", b, a, a / b))
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, float]]:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="tl-compare-"))
    tree = scratch / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    before, after = [], []
    try:
        for repeat in range(args.repeats):
            for label, side, reports in (("before", tree, before), ("after", ROOT, after)):
                out = scratch / f"{label}-{repeat}"
                out.mkdir()
                print(f"repeat {repeat + 1}/{args.repeats}: {label} ({side})", flush=True)
                reports.append(run_side(side, out, args.quick))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    rows = compare(before, after)
    width = max(len(name) for name, *_ in rows)
    print(f"\n{'':<{width}}  {'before':>9}  {'after':>9}  {'after/before':>12}   ({args.before} vs this tree)")
    for name, b, a, ratio in rows:
        print(f"{name:<{width}}  {b:>9.2f}  {a:>9.2f}  {ratio:>12.2f}")
    return rows


if __name__ == "__main__":
    main()
