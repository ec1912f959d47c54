"""A plain ASHA search against a scan-seeded one of the same trial budget, and one full fine-tuning run (#13).

One command (offline; starts a local Ray of ``--num_cpus`` CPUs for each search and stops it)::

    .venv/bin/python benchmarks/search_vs_prior.py                 # 4 trials each, 2,000 reviews, 2 epochs
    .venv/bin/python benchmarks/search_vs_prior.py --quick         # 3 trials each, 400 reviews (a smoke run)

On the bundled fine-food reviews with the bundled all-MiniLM-L6-v2, side by side in one run, every command a fresh
subprocess with the same environment:

1. ``tl-plugin train --strategy full`` (the same data, epochs, batch and seed as a trial): the unit of cost;
2. ``tl-plugin search`` (ASHA over strategy, freeze boundary, learning rate ...; the first trial is the default
   config of ``tl-plugin train``);
3. ``tl-plugin search --prior scan``: the layer scan first, then only the boundaries near its recommendation, its
   learning-rate range, the recommendation as the first trial.

Ray's workers run at niceness 0 here (``RAY_worker_niceness=0``; Ray's default, 15, starves the trials on a
shared machine and would make their times incomparable with the full run's). Both searches use the activation cache (``--activation_cache``: trials with frozen bottom blocks train on cached
activations) and the same ``--num_samples``, ``--max_epochs``, ASHA settings, data and seed.

Compute is counted in trial seconds (each trial's ``time_s``: Tune's ``time_total_s``; with ``--num_cpus 2`` two
trials run at once, one CPU each), plus the scan's wall time for the seeded search. Reported: each search's best
validation accuracy, its total compute, the compute the seeded search spent (scan + its trials in start order)
until a trial reached the plain search's best, and both totals over one full fine-tuning run.
The JSON goes to ``benchmarks/results/search_vs_prior.json`` (``..._quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_vs_grid  # noqa: E402  (machine(), subprocess_env(), timed(), RESULTS)

FULL = {"num_samples": 4, "train_size": 2000, "max_epochs": 2}
QUICK = {"num_samples": 3, "train_size": 400, "max_epochs": 2}
METRIC = "eval_accuracy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials each, 400 reviews")
    parser.add_argument("--num_samples", type=int, help="trials of each search (default 4)")
    parser.add_argument("--train_size", type=int, help="training reviews (default 2000)")
    parser.add_argument("--max_epochs", type=int, help="epochs of a trial not stopped early (default 2)")
    parser.add_argument("--num_cpus", type=int, default=2, help="CPUs of each search's local Ray (one per trial)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, help="where the results go (default: benchmarks/results/...)")
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(QUICK if args.quick else FULL)
    for key in preset:
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["num_samples"] < 1:
        raise SystemExit(f"--num_samples must be at least 1, got {preset['num_samples']}")
    return {**preset, "num_cpus": args.num_cpus, "seed": args.seed, "batch_size": 16, "max_length": 64}


def full_run_command(run: dict[str, Any], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tl_plugin.cli", "train", "--strategy", "full", "--train_size", str(run["train_size"]),
        "--max_length", str(run["max_length"]), "--num_train_epochs", str(run["max_epochs"]),
        "--per_device_train_batch_size", str(run["batch_size"]), "--seed", str(run["seed"]),
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out),
    ]  # fmt: skip


def search_command(run: dict[str, Any], out: Path, prior: str) -> list[str]:
    return [
        sys.executable, "-m", "tl_plugin.cli", "search", "--num_samples", str(run["num_samples"]),
        "--max_epochs", str(run["max_epochs"]), "--train_size", str(run["train_size"]),
        "--max_length", str(run["max_length"]), "--num_cpus", str(run["num_cpus"]), "--cpus_per_trial", "1",
        "--seed", str(run["seed"]), "--activation_cache", "--quiet_workers", "--verbose", "0",
        "--prior", prior, "--output_dir", str(out),
    ]  # fmt: skip


def read_rows(csv_path: Path) -> list[dict[str, Any]]:
    """The search's results rows in trial start order (trial ids end with a counter), metric and time as floats."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row[METRIC] = float(row[METRIC]) if row.get(METRIC) not in (None, "") else None
        row["time_s"] = float(row["time_s"]) if row.get("time_s") not in (None, "") else 0.0
    return sorted(rows, key=lambda row: row["trial"])


def compute_to_reach(rows: Sequence[dict[str, Any]], target: float, start: float = 0.0) -> float | None:
    """Seconds spent (`start`, then each trial's time in start order) until a trial's metric reaches `target`."""
    spent = start
    for row in rows:
        spent += row["time_s"]
        if row[METRIC] is not None and row[METRIC] >= target - 1e-9:
            return spent
    return None


def summarise(plain: list[dict[str, Any]], seeded: list[dict[str, Any]], scan_s: float, full_s: float) -> dict[str, Any]:
    plain_best = max(r[METRIC] for r in plain if r[METRIC] is not None)
    seeded_best = max(r[METRIC] for r in seeded if r[METRIC] is not None)
    plain_total = sum(r["time_s"] for r in plain)
    seeded_trials = sum(r["time_s"] for r in seeded)
    reach = compute_to_reach(seeded, plain_best, start=scan_s)
    return {
        "plain_best": plain_best,
        "seeded_best": seeded_best,
        "plain_compute_s": round(plain_total, 1),
        "seeded_compute_s": round(scan_s + seeded_trials, 1),
        "scan_s": round(scan_s, 1),
        "full_run_s": round(full_s, 1),
        "seeded_to_reach_plain_best_s": None if reach is None else round(reach, 1),
        "seeded_to_reach_over_plain_total": None if reach is None else round(reach / plain_total, 3),
        "plain_over_full_run": round(plain_total / full_s, 2),
        "seeded_over_full_run": round((scan_s + seeded_trials) / full_s, 2),
    }


def format_rows(name: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"{name}:", f"  {'trial':<12} {'status':<14} {'strategy':<8} {'frozen':>6} {'lr':>9} {METRIC:>13} {'time_s':>7}"]
    for r in rows:
        value = "-" if r[METRIC] is None else f"{r[METRIC]:.4f}"
        lines.append(f"  {r['trial']:<12} {r['status']:<14} {r['strategy']:<8} {r['frozen_blocks']:>6} "
                     f"{float(r['learning_rate']):>9.3g} {value:>13} {r['time_s']:>7.1f}")  # fmt: skip
    return lines


def format_report(summary: dict[str, Any], plain: list[dict[str, Any]], seeded: list[dict[str, Any]]) -> str:
    s = summary
    reach = (
        "never (its best is below)"
        if s["seeded_to_reach_plain_best_s"] is None
        else f"{s['seeded_to_reach_plain_best_s']:.0f} s = {100 * s['seeded_to_reach_over_plain_total']:.0f} % of the "
        "plain search's compute (target <= 50 %)"
    )
    return "\n".join([
        *format_rows("plain search", plain), "", *format_rows("scan-seeded search", seeded), "",
        f"best {METRIC}: plain {s['plain_best']:.4f}, seeded {s['seeded_best']:.4f}",
        f"compute: plain {s['plain_compute_s']:.0f} s ({s['plain_over_full_run']:.2f}x one full run), seeded "
        f"{s['seeded_compute_s']:.0f} s incl. the scan's {s['scan_s']:.0f} s ({s['seeded_over_full_run']:.2f}x one "
        f"full run; target <= 3x); one full fine-tuning run {s['full_run_s']:.0f} s",
        f"the seeded search reached the plain search's best after {reach}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    run = settings(args)
    env = scan_vs_grid.subprocess_env(1)
    # Ray starts its workers at niceness 15 (to keep its own processes responsive): on a machine shared with other
    # jobs the trials then starve (a 2-trial tiny search took 494 s instead of ~60), and a trial's time says more
    # about the other jobs than about the trial. At 0 they compete like the full run they are compared with.
    env["RAY_worker_niceness"] = "0"
    started = datetime.now(timezone.utc)
    print(f"settings: {run}", flush=True)
    with tempfile.TemporaryDirectory(prefix="search-vs-prior-") as tmp:
        work = Path(tmp)
        full_s = scan_vs_grid.timed(full_run_command(run, work / "full"), env, work / "full.log")
        print(f"one full fine-tuning run: {full_s:.0f} s", flush=True)
        walls = {}
        for prior in ("none", "scan"):
            began = time.perf_counter()
            scan_vs_grid.timed(search_command(run, work / prior, prior), env, work / f"search-{prior}.log")
            walls[prior] = round(time.perf_counter() - began, 1)
            print(f"search --prior {prior}: {walls[prior]:.0f} s wall", flush=True)
        plain = read_rows(work / "none" / "results.csv")
        seeded = read_rows(work / "scan" / "results.csv")
        scan_json = json.loads((work / "scan" / "scan" / "scan.json").read_text())
    summary = summarise(plain, seeded, float(scan_json["total_seconds"]), full_s)
    summary["search_wall_s"] = walls
    print("\n" + format_report(summary, plain, seeded))
    result = {
        "command": " ".join(["python benchmarks/search_vs_prior.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": scan_vs_grid.machine(),
        "settings": run,
        "summary": summary,
        "plain_rows": plain,
        "seeded_rows": seeded,
        "scan_recommendation": scan_json["recommendation"],
    }
    default = scan_vs_grid.RESULTS / ("search_vs_prior_quick.json" if args.quick else "search_vs_prior.json")
    return scan_vs_grid.save_result(result, args.json or default)


if __name__ == "__main__":
    main()
