"""Ray Tune recipe: which layers should I transfer and train, and at what learning rate?

Searches the learning rate, the transfer strategy (full / partial / layers), the number of frozen bottom blocks, the
number of re-initialised top blocks and the layer-wise LR decay (optionally the L2-SP strength) of the bundled
all-MiniLM-L6-v2 on the bundled fine-food reviews, with an ASHA scheduler that stops poor trials after an epoch.
Every trial trains exactly like ``tl-plugin train`` and reports its eval metrics each epoch.

Locally (the default) it starts a Ray with ``--num-cpus`` CPUs and no dashboard, and shuts it down at the end;
with ``--address`` (or ``RAY_ADDRESS``) it runs on that cluster, unchanged.

    python recipes/tune_search.py --num-samples 8 --max-epochs 2 --train-size 400
    python recipes/tune_search.py --tiny --num-samples 4            # smoke run on a tiny BERT (a minute)
    python recipes/tune_search.py --resume --output-dir outputs/tune  # finish an interrupted search

Outputs (``--output-dir``, default ``outputs/tune``): ``results.csv`` (rewritten after every trial event),
``results.png`` (metric vs learning rate, coloured by frozen blocks), ``best.yaml`` (a transfer config for
``tl-plugin train --transfer_config``), ``best_training_args.json`` (learning rate, epochs, seed, data size and the
exact final command, which is also printed), ``search.json`` (the settings, read back by ``--resume``) and the
Ray experiment under ``--storage-path`` (default ``<output-dir>/ray_results``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUTPUT_DIR = "outputs/tune"
DEFAULT_NAME = "tl-search"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recipes/tune_search.py",
        description="Ray Tune search over learning rate and which layers to transfer (ASHA, local Ray by default).",
    )
    where = parser.add_argument_group("where it runs")
    where.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)."
    )
    where.add_argument(
        "--num-cpus", type=int, default=2, help="CPUs of the local Ray (ignored with --address)."
    )
    where.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial.")
    where.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPU fraction per trial (e.g. 0.5).")
    where.add_argument("--max-concurrent", type=int, default=None, help="Most trials running at once.")
    where.add_argument(
        "--ship-package",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Upload tl_plugin to the workers (runtime_env py_modules). Default: on with --address, off locally.",
    )
    where.add_argument("--quiet-workers", action="store_true", help="Do not echo the workers' logs.")
    where.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Ray Tune progress output.")

    search = parser.add_argument_group("what is searched")
    search.add_argument(
        "--num-samples", type=int, default=8, help="Trials (the first is the default config)."
    )
    search.add_argument(
        "--max-epochs", type=int, default=2, help="Epochs of a trial that is not stopped early."
    )
    search.add_argument(
        "--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped."
    )
    search.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the top 1/factor.")
    search.add_argument("--lr-min", type=float, default=1e-5)
    search.add_argument("--lr-max", type=float, default=5e-4)
    search.add_argument("--strategies", nargs="+", default=["full", "partial", "layers"])
    search.add_argument(
        "--gradual-unfreezing",
        action="store_true",
        help="Also search the gradual-unfreezing pace (0, 1, 2, 4).",
    )
    search.add_argument(
        "--l2sp", action="store_true", help="Also search the L2-SP strength (0, 1e-3, 1e-2, 0.1)."
    )
    search.add_argument(
        "--no-baseline", action="store_true", help="Do not start with the default config of tl-plugin train."
    )
    search.add_argument("--metric", default="eval_accuracy", help="eval_accuracy, eval_f1 or eval_loss.")
    search.add_argument("--mode", default="max", choices=("max", "min"))
    search.add_argument("--seed", type=int, default=42, help="Seed of the sampler and of every trial.")

    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model-path", default=None, help="Local model folder (default: bundled all-MiniLM-L6-v2)."
    )
    data.add_argument(
        "--tiny", action="store_true", help="Tiny random BERT with the MiniLM tokenizer (smoke run)."
    )
    data.add_argument("--train-size", type=int, default=400, help="Training reviews per trial.")
    data.add_argument("--max-length", type=int, default=64)
    data.add_argument(
        "--activation-cache",
        action="store_true",
        help="Trials train on cached frozen-prefix activations (tl_plugin.cache); trials with the same freeze "
        "boundary share one file. Frozen layers then run in eval mode.",
    )
    data.add_argument(
        "--activation-cache-dir",
        default=None,
        help="Cache directory, on a disk every trial sees (default: <output-dir>/activation-cache).",
    )

    out = parser.add_argument_group("outputs")
    out.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    out.add_argument("--storage-path", default=None, help="Ray results (default: <output-dir>/ray_results).")
    out.add_argument("--name", default=DEFAULT_NAME, help="Experiment name (a folder under --storage-path).")
    out.add_argument("--resume", action="store_true", help="Finish an interrupted search (Tuner.restore).")
    out.add_argument("--retry-failed", action="store_true", help="With --resume: rerun failed trials too.")
    return parser


def run_search(args: argparse.Namespace, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the search described by the parsed arguments; returns a summary of the outputs."""
    from tl_plugin import tune as tlt

    tlt.require_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_path = tlt.absolute_storage_path(args.storage_path or output_dir / "ray_results")
    experiment_path = f"{storage_path.rstrip('/')}/{args.name}"
    settings_file = output_dir / "search.json"

    if args.resume:
        if not settings_file.is_file():
            raise SystemExit(
                f"--resume: {settings_file} not found; is --output-dir the folder of the first run?"
            )
        saved = json.loads(settings_file.read_text())
        settings = tlt.SearchSettings.from_dict(saved["settings"])
        search = saved["search"]
        experiment_path = saved["experiment_path"]
    else:
        if tune.Tuner.can_restore(experiment_path):  # before search.json is overwritten
            raise SystemExit(
                f"An experiment already exists at {experiment_path}: pass --resume to finish it, or another "
                "--name / --output-dir for a new search."
            )
        settings = tlt.search_settings_from_args(args, output_dir)
        search = {
            "num_samples": args.num_samples,
            "lr_range": [args.lr_min, args.lr_max],
            "strategies": list(args.strategies),
            "gradual_unfreezing": bool(args.gradual_unfreezing),
            "l2sp": bool(args.l2sp),
            "baseline": not args.no_baseline,
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
        }
        settings_file.write_text(
            json.dumps(
                {"settings": settings.to_dict(), "search": search, "experiment_path": experiment_path},
                indent=2,
            )
            + "\n"
        )

    csv_path = output_dir / "results.csv"
    print(
        f"Search: {search['num_samples']} trials x up to {settings.max_epochs} epochs, {settings.num_blocks}-block "
        f"model {settings.model_path or 'all-MiniLM-L6-v2 (bundled)'}, {settings.train_size} training reviews, "
        f"optimising {settings.metric} ({settings.mode})\nExperiment: {experiment_path}",
        flush=True,
    )
    with tlt.ray_session(
        args.address,
        num_cpus=args.num_cpus,
        ship_package=args.ship_package,
        log_to_driver=not args.quiet_workers,
    ) as session:
        print(f"Ray: {'local, ' + str(args.num_cpus) + ' CPUs' if session['local'] else session['address']}")
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        trainable = tune.with_resources(
            tune.with_parameters(tlt.train_transfer_trial, settings=settings.to_dict()), resources
        )
        if args.resume:
            if not tune.Tuner.can_restore(experiment_path):
                raise SystemExit(f"--resume: no restorable Ray Tune experiment at {experiment_path}.")
            print(f"Resuming {experiment_path}: finished trials are kept, the others are run.")
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=args.retry_failed,
            )
        else:
            space = tlt.build_search_space(
                settings.num_blocks,
                lr_range=tuple(search["lr_range"]),
                strategies=search["strategies"],
                unfreeze_paces=(0, 1, 2, 4) if search.get("gradual_unfreezing") else None,
                l2sp_alphas=(0.0, 1e-3, 1e-2, 1e-1) if search["l2sp"] else None,
            )
            points = []
            if search["baseline"] and "layers" in search["strategies"]:
                point = tlt.baseline_point(settings.num_blocks)
                if search.get("gradual_unfreezing"):
                    point["unfreeze_pace"] = 0
                if search["l2sp"]:
                    point["l2sp_alpha"] = 0.0
                points.append(point)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=settings.metric,
                    mode=settings.mode,
                    num_samples=search["num_samples"],
                    scheduler=ASHAScheduler(
                        time_attr="training_iteration",
                        max_t=settings.max_epochs,
                        grace_period=min(search["grace_period"], settings.max_epochs),
                        reduction_factor=search["reduction_factor"],
                    ),
                    # the concurrency limit belongs to the generator (Tune ignores max_concurrent_trials with it)
                    search_alg=BasicVariantGenerator(
                        points_to_evaluate=points,
                        random_state=settings.seed,
                        max_concurrent=args.max_concurrent or 0,
                    ),
                    trial_dirname_creator=tlt.trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=args.name,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=[tlt.ResultsCSVCallback(csv_path, settings.to_dict()), *extra_callbacks],
                    verbose=args.verbose,
                ),
            )
        tuner.fit()
        # from the experiment folder (what a restore sees too); error files are read while Ray is up
        rows = tlt.rows_from_trials(tune.ExperimentAnalysis(experiment_path).trials, settings)

    finished = [r for r in rows if r["status"] in ("completed", "stopped early", "failed")]
    complete = len(finished) >= search["num_samples"]
    tlt.write_results_csv(rows, csv_path, settings.metric)
    print(f"\nResults ({len(finished)} of {search['num_samples']} trials finished):\n")
    print(tlt.format_results_table(rows, settings.metric, settings.mode))
    summary: dict[str, Any] = {
        "rows": rows,
        "complete": complete,
        "csv": str(csv_path),
        "experiment_path": experiment_path,
        "settings": settings.to_dict(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    try:
        summary["plot"] = str(tlt.plot_results(rows, output_dir / "results.png", settings.metric))
    except ImportError as err:
        print(f"\nNo plot: {err}")
    best = tlt.save_best(rows, settings, output_dir)
    summary["best"] = best
    print(
        f"\nResults table: {csv_path}" + (f"\nPlot:          {summary['plot']}" if "plot" in summary else "")
    )
    if best is None:
        print("No trial reported the metric: no best config.")
    else:
        print(
            f"Best trial {best['trial']}: {settings.metric} = {best['value']:.4f} (lr {best['learning_rate']:.3g})\n"
            f"Best config:   {best['transfer_config']}\n"
            f"Training args: {output_dir / 'best_training_args.json'}\n\n"
            f"Final run:\n  {best['command']}"
        )
        if best.get("not_in_command"):
            print(f"  (tl-plugin train has no flag for {best['not_in_command']}: add that callback yourself)")
    if not complete:
        print(
            f"\nThe search is incomplete ({len(finished)}/{search['num_samples']} trials). Resume it with:\n"
            f"  python recipes/tune_search.py --resume --output-dir {output_dir}"
        )
    print(f"\nWall time: {summary['wall_time_s']:.0f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run_search(args)
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
