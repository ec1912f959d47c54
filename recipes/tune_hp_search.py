"""Entry point (a): ``Trainer.hyperparameter_search(backend="ray")`` over learning rate and which layers to transfer.

The search space is tl_plugin's (`tl_plugin.tune.build_search_space`, block counts from layer discovery). Ray
hands every trial's sampled point to the Trainer: ``learning_rate`` is a `TrainingArguments` field and is set on
the arguments; ``strategy``, ``freeze_bottom_blocks``, ``reinit_top_k`` and ``lr_decay`` are not (the Trainer logs
"Trying to set ... but there is no corresponding field" for each), but the whole point still reaches ``model_init``,
where `TransferModelInit` turns it into a `TransferConfig` and applies it. `SearchTrainer` builds the layer-wise
LR-decay optimizer for that config (the Trainer refuses ``optimizers=`` with ``model_init``). An ASHA scheduler
stops poor trials after an epoch.

    python recipes/tune_hp_search.py --n-trials 8 --max-epochs 2 --train-size 400
    python recipes/tune_hp_search.py --tiny --n-trials 4               # smoke run on a tiny BERT

Outputs (``--output-dir``, default ``outputs/tune-hp``): ``results.csv``, ``results.png``, ``best.yaml``,
``best_training_args.json`` (with the final ``tl-plugin train`` command, also printed) and the Ray experiment
under ``<output-dir>/ray_results``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recipes/tune_hp_search.py",
        description="Trainer.hyperparameter_search(backend='ray') over learning rate and which layers to transfer.",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)."
    )
    parser.add_argument(
        "--num-cpus", type=int, default=2, help="CPUs of the local Ray (ignored with --address)."
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--lr-max", type=float, default=5e-4)
    parser.add_argument("--metric", default="eval_accuracy")
    parser.add_argument("--mode", default="max", choices=("max", "min"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--model-path", default=None, help="Local model folder (default: bundled all-MiniLM-L6-v2)."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny random BERT with the MiniLM tokenizer (smoke run)."
    )
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output-dir", default="outputs/tune-hp")
    parser.add_argument("--name", default="tl-hp-search")
    parser.add_argument("--quiet-workers", action="store_true", help="Do not echo the workers' logs.")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2, 3))
    return parser


def run_hp_search(
    args: argparse.Namespace, hp_space: Callable[[Any], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Run the search with `Trainer.hyperparameter_search`; returns the best run and the outputs' paths.

    ``hp_space`` replaces tl_plugin's search space (`tl_plugin.tune.ray_hp_space`).
    """
    import torch
    from transformers import AutoTokenizer

    from tl_plugin import tune as tlt
    from tl_plugin.data import load_fine_food_reviews, majority_class_accuracy, tokenize_dataset
    from tl_plugin.metrics import build_compute_metrics

    tlt.require_ray()
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = tlt.search_settings_from_args(args, output_dir)
    resolved_model = tlt._resolve_model_path(settings.model_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved_model)
    data = tokenize_dataset(
        load_fine_food_reviews(train_size=settings.train_size, test_size=1, seed=42),
        tokenizer,
        max_length=settings.max_length,
    )
    # Absolute: Tune runs every trial in its own working directory.
    training_args = tlt.trial_training_arguments(
        settings,
        1e-4,
        str(output_dir / "trainer"),
        do_eval=True,
        use_cpu=args.gpus_per_trial == 0 or not torch.cuda.is_available(),
    )
    trainer = tlt.SearchTrainer(
        model_init=tlt.TransferModelInit(
            settings.model_path, seed=settings.seed, default=tlt.baseline_point(settings.num_blocks)
        ),
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(("accuracy", "f1")),
    )
    with tlt.ray_session(args.address, num_cpus=args.num_cpus, log_to_driver=not args.quiet_workers):
        best_run = trainer.hyperparameter_search(
            hp_space=hp_space
            or functools.partial(
                tlt.ray_hp_space, num_blocks=settings.num_blocks, lr_range=(args.lr_min, args.lr_max)
            ),
            compute_objective=functools.partial(tlt.metric_objective, metric=settings.metric),
            n_trials=args.n_trials,
            direction="maximize" if settings.mode == "max" else "minimize",
            backend="ray",
            # the rest goes to ray.tune.run
            scheduler=ASHAScheduler(
                metric="objective", mode=settings.mode, max_t=settings.max_epochs, grace_period=1
            ),
            search_alg=BasicVariantGenerator(random_state=settings.seed),
            resources_per_trial={"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
            storage_path=str(output_dir / "ray_results"),
            name=args.name,
            trial_dirname_creator=tlt.trial_dirname,
            raise_on_failed_trial=False,  # a failed trial is recorded, the search goes on
            verbose=args.verbose,
        )
        rows = tlt.rows_from_trials(best_run.run_summary.trials, settings)  # reads error files: Ray still up
    csv_path = tlt.write_results_csv(rows, output_dir / "results.csv", settings.metric)
    print(
        f"\nResults ({len(rows)} trials):\n\n{tlt.format_results_table(rows, settings.metric, settings.mode)}"
    )
    summary: dict[str, Any] = {"best_run": best_run, "rows": rows, "csv": str(csv_path)}
    try:
        # the accuracy of always answering the validation split's most frequent label: a trial on it learned nothing
        baseline = None
        if settings.metric == "eval_accuracy":
            baseline = majority_class_accuracy(data["validation"])
            summary["majority_rate"] = baseline
        summary["plot"] = str(tlt.plot_results(rows, output_dir / "results.png", settings.metric, baseline=baseline))
    except ImportError as err:
        print(f"\nNo plot: {err}")
    best = tlt.save_best(rows, settings, output_dir)
    summary["best"] = best
    print(
        f"\nTrainer's best run: trial {best_run.run_id}, objective {best_run.objective:.4f}, "
        f"hyperparameters {best_run.hyperparameters}"
    )
    if best is not None:
        print(f"Best config: {best['transfer_config']}\n\nFinal run:\n  {best['command']}")
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    print(f"\nWall time: {summary['wall_time_s']:.0f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    run_hp_search(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
