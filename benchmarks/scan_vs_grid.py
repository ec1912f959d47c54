"""The layer scan against the freeze-boundary grid it is meant to replace (issue #13), side by side in one run.

One command (offline)::

    .venv/bin/python benchmarks/scan_vs_grid.py            # the full grid: boundaries 0-6, 3 seeds, 2,000 reviews
    .venv/bin/python benchmarks/scan_vs_grid.py --quick    # boundaries 0, 2, 4, 6; 1 seed; 300 train / 200 test

On the bundled fine-food reviews with the bundled all-MiniLM-L6-v2 (6 blocks), every run a fresh subprocess with
the same environment (``OMP_NUM_THREADS`` and torch threads from ``--threads``):

1. ``tl-plugin scan`` on the training split: each layer's probe accuracy and LogME, and its recommendation;
2. the grid: ``tl-plugin train`` for every freeze boundary (and the recommended one, when the grid lacks it) (0 = ``--strategy full``; ``b`` > 0 = ``--strategy
   layers --freeze_bottom_blocks b``: the embeddings and the bottom ``b`` blocks frozen), the same learning rate
   and epochs, for each seed; the test accuracy of each run;
3. a table: per boundary, the grid's mean test accuracy and the scan's scores of the features that boundary's first
   trained block reads; the Spearman correlation of each scan score with the grid accuracy; the recommended
   boundary's accuracy against the grid's best; the scan's wall time against one full fine-tuning run's
   (boundary 0, first seed; both as subprocess wall times, model loading included).

The JSON goes to ``benchmarks/results/scan_vs_grid.json`` (``scan_vs_grid_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

FULL = {"boundaries": [0, 1, 2, 3, 4, 5, 6], "seeds": [42, 43, 44], "train_size": 2000, "test_size": 500, "batch_size": 16}
#: A smoke run of the whole pipeline (tl-plugin train --quick's data and batch size), not a measurement of the targets.
QUICK = {"boundaries": [0, 2, 4, 6], "seeds": [42], "train_size": 400, "test_size": 200, "batch_size": 8}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="boundaries 0,2,4,6; 1 seed; 400 train / 200 test; batch 8")
    parser.add_argument("--boundaries", type=int, nargs="+", help="freeze boundaries of the grid (default 0-6)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the grid (default 42 43 44)")
    parser.add_argument("--train_size", type=int, help="training reviews (default 2000)")
    parser.add_argument("--test_size", type=int, help="test reviews (default 500)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--pooling", default="auto", help="the scan's --pooling (default: the model's own)")
    parser.add_argument("--threads", type=int, default=1, help="OMP / torch threads of every subprocess")
    parser.add_argument("--json", type=Path, help="where the results go (default: benchmarks/results/...)")
    parser.add_argument(
        "--reuse_grid", type=Path, metavar="JSON",
        help="take the grid's accuracies and the full run's time from an earlier results file of the same settings "
        "and run only the scan (after a change to the scan)",
    )  # fmt: skip
    parser.add_argument(
        "--from_log", type=Path, nargs=2, metavar=("LOG", "WORK_DIR"),
        help="summarise an interrupted run from its printed output (settings, scan and grid lines) and the scan "
        "in its work folder (scan-vs-grid-* in the temporary directory): the grid has the runs that finished",
    )  # fmt: skip
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the preset (full or quick) with the explicit flags over it."""
    preset = dict(QUICK if args.quick else FULL)
    for key in ("boundaries", "seeds", "train_size", "test_size"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    bad = [b for b in preset["boundaries"] if not 0 <= b <= 6]
    if bad:
        raise SystemExit(f"--boundaries must be between 0 and 6 (MiniLM has 6 blocks), got {bad}")
    return {**preset, "epochs": args.epochs, "learning_rate": args.learning_rate, "pooling": args.pooling}


def transfer_flags(boundary: int) -> list[str]:
    """The train flags of one freeze boundary."""
    if boundary == 0:
        return ["--strategy", "full"]
    return ["--strategy", "layers", "--freeze_bottom_blocks", str(boundary)]


def data_flags(run: dict[str, Any]) -> list[str]:
    return ["--train_size", str(run["train_size"]), "--test_size", str(run["test_size"])]


def train_command(run: dict[str, Any], boundary: int, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tl_plugin.cli", "train", *data_flags(run), *transfer_flags(boundary),
        "--num_train_epochs", str(run["epochs"]), "--learning_rate", str(run["learning_rate"]), "--seed", str(seed),
        "--per_device_train_batch_size", str(run.get("batch_size", 16)),
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out),
    ]  # fmt: skip


def scan_command(run: dict[str, Any], out: Path) -> list[str]:
    return [sys.executable, "-m", "tl_plugin.cli", "scan", *data_flags(run), "--pooling", run["pooling"],
            "--output_dir", str(out)]  # fmt: skip


def with_recommended(boundaries: Sequence[int], recommended: int) -> list[int]:
    """The grid's boundaries, with the scan's recommendation added when missing (its accuracy is then measured)."""
    return sorted({*boundaries, recommended})


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
    )  # fmt: skip
    return env


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run `command`, its output to `log`; its wall time in seconds (a failure stops the benchmark). Its CPU time
    (user + system of the process and of the children it waited for) is added to `CPU_SECONDS[str(log)]`."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[str(log)] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); its output: {log}")
    return seconds


#: CPU seconds of each `timed` command, by its log file (the wall clock of a run on a machine shared with other
#: jobs says more about the other jobs than about the run; with one thread per run, CPU time is its own cost).
CPU_SECONDS: dict[str, float] = {}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); `None` with fewer than 3 points or a constant."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def summarise(
    scan: dict[str, Any],
    grid: dict[int, list[float]],
    scan_seconds: float,
    full_seconds: float,
    cpu: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The side-by-side numbers of one benchmark run."""
    layers = {layer["boundary"]: layer for layer in scan["scan"]["layers"]}
    combined = scan["recommendation"]["combined_scores"]
    boundaries = sorted(grid)
    mean = {b: statistics.fmean(grid[b]) for b in boundaries}
    rows = [
        {
            "boundary": b,
            "grid_accuracy_mean": mean[b],
            "grid_accuracy_sd": statistics.stdev(grid[b]) if len(grid[b]) > 1 else 0.0,
            "grid_accuracies": grid[b],
            "layer": layers[b]["layer"],
            "probe_accuracy": layers[b]["probe_accuracy"],
            "logme": layers[b]["logme"],
            "combined": combined[layers[b]["layer"]],
        }
        for b in boundaries
    ]
    best = max(boundaries, key=lambda b: mean[b])
    recommended = scan["recommendation"]["boundary"]
    accuracies = [mean[b] for b in boundaries]
    return {
        "rows": rows,
        "grid_best_boundary": best,
        "grid_best_accuracy": mean[best],
        "recommended_boundary": recommended,
        "recommended_accuracy": mean.get(recommended),
        "recommended_minus_best_points": (
            None if recommended not in mean else round(100 * (mean[recommended] - mean[best]), 2)
        ),
        "recommended_learning_rate_range": scan["recommendation"]["learning_rate_range"],
        "spearman": {
            key: spearman([row[key] for row in rows], accuracies) for key in ("probe_accuracy", "logme", "combined")
        },
        "scan_seconds": round(scan_seconds, 1),
        "full_run_seconds": round(full_seconds, 1),
        "scan_over_full_run": round(scan_seconds / full_seconds, 3),
        **(
            {}
            if cpu is None
            else {
                "scan_cpu_seconds": round(cpu[0], 1),
                "full_run_cpu_seconds": round(cpu[1], 1),
                "scan_over_full_run_cpu": round(cpu[0] / cpu[1], 3),
            }
        ),
    }


def format_report(summary: dict[str, Any]) -> str:
    lines = [
        f"{'boundary':>8} {'layer read':<11} {'grid test acc':>15} {'probe acc':>9} {'LogME':>8} {'combined':>8}",
    ]
    for row in summary["rows"]:
        marks = ("  <- grid best" if row["boundary"] == summary["grid_best_boundary"] else "") + (
            "  <- recommended" if row["boundary"] == summary["recommended_boundary"] else ""
        )
        grid = f"{row['grid_accuracy_mean']:.4f}±{row['grid_accuracy_sd']:.4f}"
        lines.append(
            f"{row['boundary']:>8} {row['layer']:<11} {grid:>15} {row['probe_accuracy']:>9.4f} {row['logme']:>8.4f} "
            f"{row['combined']:>8.3f}{marks}"
        )
    rho = summary["spearman"]
    lines += [
        "",
        "Spearman (scan score at boundary b vs grid accuracy at b): "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:+.2f}'}" for k, v in rho.items()),
        f"recommended boundary {summary['recommended_boundary']}: "
        + (
            "not in the grid"
            if summary["recommended_accuracy"] is None
            else f"{summary['recommended_accuracy']:.4f} vs grid best {summary['grid_best_accuracy']:.4f} "
            f"(boundary {summary['grid_best_boundary']}): {summary['recommended_minus_best_points']:+.2f} points"
        ),
        f"wall time: scan {summary['scan_seconds']:.0f} s, one full fine-tuning run {summary['full_run_seconds']:.0f} s: "
        f"ratio {summary['scan_over_full_run']:.2f}",
    ]
    if "scan_cpu_seconds" in summary:
        lines.append(
            f"CPU time: scan {summary['scan_cpu_seconds']:.0f} s, one full fine-tuning run "
            f"{summary['full_run_cpu_seconds']:.0f} s: ratio {summary['scan_over_full_run_cpu']:.2f} (target <= 0.25)"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()}


def run_grid(run: dict[str, Any], env: dict[str, str], work: Path) -> tuple[dict[int, list[float]], float]:
    """Fine-tune every boundary for every seed; the test accuracies and the first full run's wall time."""
    grid: dict[int, list[float]] = {b: [] for b in run["boundaries"]}
    full_seconds = None
    for seed in run["seeds"]:
        for boundary in run["boundaries"]:
            out = work / f"b{boundary}-s{seed}"
            seconds = timed(train_command(run, boundary, seed, out), env, work / f"b{boundary}-s{seed}.log")
            accuracy = json.loads((out / "metrics.json").read_text())["test_accuracy"]
            grid[boundary].append(accuracy)
            if boundary == 0 and full_seconds is None:
                full_seconds = seconds
                CPU_SECONDS["full run"] = CPU_SECONDS[str(work / f"b{boundary}-s{seed}.log")]
            cpu = CPU_SECONDS[str(work / f"b{boundary}-s{seed}.log")]
            print(f"grid: boundary {boundary} seed {seed}: test accuracy {accuracy:.4f} ({seconds:.0f} s wall, "
                  f"{cpu:.0f} s CPU)", flush=True)  # fmt: skip
    if full_seconds is None:  # boundary 0 not in the grid: time one full run on its own
        full_seconds = timed(train_command(run, 0, run["seeds"][0], work / "full"), env, work / "full.log")
        CPU_SECONDS["full run"] = CPU_SECONDS[str(work / "full.log")]
    return grid, full_seconds


def reused_grid(path: Path, run: dict[str, Any]) -> tuple[dict[int, list[float]], float]:
    """The grid of an earlier results file; its settings must be this run's (boundaries aside)."""
    earlier = json.loads(path.read_text())
    keys = ("seeds", "train_size", "test_size", "batch_size", "epochs", "learning_rate")
    differ = {k: (earlier["settings"].get(k), run.get(k)) for k in keys if earlier["settings"].get(k) != run.get(k)}
    if differ:
        raise SystemExit(f"--reuse_grid {path}: its settings differ from this run's (earlier, now): {differ}")
    summary = earlier["summary"]
    grid = {row["boundary"]: row["grid_accuracies"] for row in summary["rows"]}
    return grid, summary["full_run_seconds"]


GRID_LINE = re.compile(r"grid: boundary (\d+) seed (\d+): test accuracy ([\d.]+) \((\d+) s wall, (\d+) s CPU\)")
SCAN_LINE = re.compile(r"scan: (\d+) s wall, (\d+) s CPU")


def from_log(log: Path, work: Path) -> tuple[dict[str, Any], dict[str, Any], dict[int, list[float]], list[float]]:
    """The settings, scan, grid and times (scan wall, scan CPU, full wall, full CPU) of an interrupted run."""
    text = log.read_text()
    run = ast.literal_eval(text.split("settings: ", 1)[1].splitlines()[0])
    scan = json.loads((work / "scan" / "scan.json").read_text())
    scan_wall, scan_cpu = (float(x) for x in SCAN_LINE.search(text).groups())  # type: ignore[union-attr]
    grid: dict[int, list[float]] = {}
    full: list[float] = []
    for boundary, seed, accuracy, wall, cpu in GRID_LINE.findall(text):
        grid.setdefault(int(boundary), []).append(float(accuracy))
        if int(boundary) == 0 and int(seed) == run["seeds"][0]:
            full = [float(wall), float(cpu)]
    if not full:
        raise SystemExit(f"--from_log {log}: the first full run (boundary 0, seed {run['seeds'][0]}) did not finish")
    return run, scan, grid, [scan_wall, scan_cpu, *full]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.from_log is not None:
        run, scan, grid, (scan_seconds, scan_cpu, full_seconds, full_cpu) = from_log(*args.from_log)
        run["boundaries"] = sorted(grid)
        run["runs_per_boundary"] = {b: len(v) for b, v in sorted(grid.items())}
        summary = summarise(scan, grid, scan_seconds, full_seconds, (scan_cpu, full_cpu))
        print(format_report(summary))
        result = {"command": f"python benchmarks/scan_vs_grid.py --from_log {args.from_log[0]} WORK_DIR",
                  "grid_from": "the finished runs of an interrupted run (its log)", "machine": machine(),
                  "settings": run, "summary": summary, "scan": scan}  # fmt: skip
        return save_result(result, args.json or RESULTS / "scan_vs_grid.json")
    run = settings(args)
    env = subprocess_env(args.threads)
    started = datetime.now(timezone.utc)
    print(f"settings: {run}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scan-vs-grid-") as tmp:
        work = Path(tmp)
        scan_seconds = timed(scan_command(run, work / "scan"), env, work / "scan.log")
        scan = json.loads((work / "scan" / "scan.json").read_text())
        recommended = scan["recommendation"]["boundary"]
        scan_cpu = CPU_SECONDS[str(work / "scan.log")]
        print(f"scan: {scan_seconds:.0f} s wall, {scan_cpu:.0f} s CPU; recommends boundary {recommended}", flush=True)
        if args.reuse_grid is not None:  # the earlier grid as it is (a recommendation outside it is said so)
            grid, full_seconds = reused_grid(args.reuse_grid, run)
            run["boundaries"] = sorted(grid)
        else:
            run["boundaries"] = with_recommended(run["boundaries"], recommended)
            grid, full_seconds = run_grid(run, env, work)
    full_cpu = CPU_SECONDS.get("full run")
    summary = summarise(scan, grid, scan_seconds, full_seconds, None if full_cpu is None else (scan_cpu, full_cpu))
    print("\n" + format_report(summary))
    result = {
        "command": " ".join(["python benchmarks/scan_vs_grid.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "cpu_seconds": {Path(k).name if "/" in k else k: round(v, 1) for k, v in CPU_SECONDS.items()},
        "threads": args.threads,
        "settings": run,
        "summary": summary,
        "scan": scan,
        "grid_from": str(args.reuse_grid) if args.reuse_grid is not None else "this run",
    }
    return save_result(result, args.json or RESULTS / ("scan_vs_grid_quick.json" if args.quick else "scan_vs_grid.json"))


def save_result(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write a benchmark's `result` as JSON to `path` (its folder made) and say where; returns `result`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return result


if __name__ == "__main__":
    main()
