"""``tl-plugin search``: Ray Tune over the learning rate *and* which layers to transfer, on your data.

It takes the model / data / task options of ``tl-plugin train`` (``--train_file``, ``--task``, ``--text_column`` ...)
and the search options (samples, ASHA, epochs, ``--address``, ``--resume``, the activation cache). Every trial
trains like ``tl-plugin train`` with the sampled transfer config and learning rate, and the printed final command
is a ``tl-plugin train`` command, with your data options, that reproduces the best trial.

Locally (the default) it starts a Ray with ``--num_cpus`` CPUs and shuts it down at the end; with ``--address``
(or ``RAY_ADDRESS``) it runs on that cluster, unchanged. Search options are spelled with underscores or dashes
(``--num_samples`` = ``--num-samples``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arguments import DataArguments, ModelArguments
from .errors import UsageError
from .parser import CommandParser
from .resume_check import data_fingerprint, explicit_options, resume_differences

__all__ = [
    "DEFAULT_NAME", "DEFAULT_OUTPUT_DIR", "build_search_parser", "initial_points", "main", "run_search",
    "user_train_flags", "validation_majority_rate",
]  # fmt: skip

DEFAULT_OUTPUT_DIR = "outputs/tune"
DEFAULT_NAME = "tl-search"

#: Data options a search sets itself (from `tl_plugin.tune.SearchSettings`), so they are not copied into the
#: trials' and the final command's flags twice.
_SETTINGS_FIELDS = ("train_size", "max_length", "activation_cache", "activation_cache_dir", "quick", "test_size")


def _both(name: str) -> list[str]:
    dashed = name.replace("_", "-")
    return [f"--{name}", f"--{dashed}"] if dashed != name else [f"--{name}"]


class SearchParser(CommandParser):
    """The parser of ``tl-plugin search``; ``parse_args`` returns one namespace with ``model`` and ``data``
    (the train options) and the search options."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(args or [])
        (model_args, data_args), rest = self.parse(argv)
        rest.explicit = explicit_options(self, argv)  # what --resume must check against the saved search
        rest.model = model_args
        rest.data = data_args
        rest.model_path = model_args.model_name_or_path
        rest.train_size = data_args.train_size
        rest.max_length = data_args.max_length
        rest.activation_cache = data_args.activation_cache
        rest.activation_cache_dir = data_args.activation_cache_dir
        return rest


def build_search_parser(prog: str = "tl-plugin search") -> SearchParser:
    """The parser of ``tl-plugin search``."""
    parser = SearchParser(
        [ModelArguments, DataArguments],
        prog=prog,
        description="Ray Tune search over the learning rate and which layers to transfer (ASHA; local Ray by "
        "default), with the model / data / task options of tl-plugin train.",
    )
    parser.set_defaults(train_size=400)
    where = parser.add_argument_group("where it runs")
    where.add_argument(*_both("address"), default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    where.add_argument(*_both("num_cpus"), type=int, default=2, help="CPUs of the local Ray (ignored with --address).")
    where.add_argument(*_both("cpus_per_trial"), type=float, default=1.0, help="CPUs reserved per trial.")
    where.add_argument(
        *_both("workers_per_trial"), type=int, default=1,
        help="Each trial an N-worker DDP run through Ray Train (gloo on CPU); --cpus/gpus_per_trial then count per worker.",
    )  # fmt: skip
    where.add_argument(*_both("gpus_per_trial"), type=float, default=0.0, help="GPU fraction per trial (e.g. 0.5).")
    where.add_argument(*_both("max_concurrent"), type=int, default=None, help="Most trials running at once.")
    where.add_argument(
        *_both("ship_package"),
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Upload tl_plugin to the workers (runtime_env py_modules). Default: on with --address, off locally.",
    )
    where.add_argument(*_both("quiet_workers"), action="store_true", help="Do not echo the workers' logs.")
    where.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Ray Tune progress output.")

    search = parser.add_argument_group("what is searched")
    search.add_argument(*_both("num_samples"), type=int, default=8, help="Trials (the first is the default config).")
    search.add_argument(*_both("max_epochs"), type=int, default=2, help="Epochs of a trial that is not stopped early.")
    search.add_argument(
        "--scheduler", default="asha", choices=("asha", "pbt"),
        help="asha: stop bad trials early; pbt: Population Based Training over the learning rate and the freeze "
        "boundary (a worse trial continues from a better one's checkpoint with perturbed values).",
    )  # fmt: skip
    search.add_argument(*_both("grace_period"), type=int, default=1, help="ASHA: epochs before a trial can be stopped.")
    search.add_argument(*_both("reduction_factor"), type=float, default=2.0, help="ASHA: keep the top 1/factor.")
    search.add_argument(
        *_both("perturbation_interval"), type=int, default=1, help="PBT: epochs between exploit/explore steps."
    )
    search.add_argument(
        *_both("max_failures"), type=int, default=1,
        help="Retries of a failing trial, each from its last epoch checkpoint (0: a failure is final).",
    )  # fmt: skip
    search.add_argument(*_both("lr_min"), type=float, default=1e-5, help="Smallest learning rate (log-uniform).")
    search.add_argument(*_both("lr_max"), type=float, default=5e-4, help="Largest learning rate.")
    search.add_argument(*_both("strategies"), nargs="+", default=["full", "partial", "layers"], choices=("full", "partial", "layers"))
    search.add_argument(
        *_both("gradual_unfreezing"), action="store_true", help="Also search the gradual-unfreezing pace (0, 1, 2, 4)."
    )
    search.add_argument("--l2sp", action="store_true", help="Also search the L2-SP strength (0, 1e-3, 1e-2, 0.1).")
    search.add_argument(
        *_both("no_baseline"), action="store_true", help="Do not start with the default config of tl-plugin train."
    )
    search.add_argument(
        "--metric", default="eval_accuracy", help="The eval metric to optimise (eval_accuracy, eval_macro_f1, eval_loss ...)."
    )
    search.add_argument("--mode", default="max", choices=("max", "min"))
    search.add_argument("--seed", type=int, default=42, help="Seed of the sampler and of every trial.")
    search.add_argument(
        "--prior", default="none", choices=("none", "scan"),
        help="scan: run tl-plugin scan first and search only the freeze boundaries near its recommendation, with "
        "its learning-rate range (unless --lr_min/--lr_max are given); the recommended config is the first trial.",
    )  # fmt: skip
    search.add_argument("--tiny", action="store_true", help="Tiny random BERT with the MiniLM tokenizer (smoke run).")

    out = parser.add_argument_group("outputs")
    out.add_argument(*_both("output_dir"), default=DEFAULT_OUTPUT_DIR, help="Results, best config, plot.")
    out.add_argument(*_both("storage_path"), default=None, help="Ray results (default: <output-dir>/ray_results).")
    out.add_argument("--name", default=DEFAULT_NAME, help="Experiment name (a folder under --storage-path).")
    out.add_argument("--resume", action="store_true", help="Finish an interrupted search (Tuner.restore).")
    out.add_argument(*_both("retry_failed"), action="store_true", help="With --resume: rerun failed trials too.")
    return parser


def user_train_flags(model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    """The user's model / data / task options as ``tl-plugin train`` flags: every option that differs from its
    default, except those the search settings carry (data size, max length, the cache, the model folder)."""
    import dataclasses

    flags: list[str] = []
    for instance in (model_args, data_args):
        for spec in dataclasses.fields(instance):
            if spec.name in _SETTINGS_FIELDS or spec.name == "model_name_or_path":
                continue
            value = getattr(instance, spec.name)
            default = spec.default if spec.default is not dataclasses.MISSING else None
            if value == default or value is None:
                continue
            if spec.name in ("train_file", "validation_file", "test_file", "train_dir", "validation_dir",
                             "test_dir", "dataset_dir", "dataset_name"):  # fmt: skip
                value = str(Path(value).resolve())  # trials run in other working directories
            flags += [f"--{spec.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The search space and scheduler options of a parsed command line, as saved in ``search.json``."""
    return {
        "num_samples": args.num_samples,
        "lr_range": [args.lr_min, args.lr_max],
        "strategies": list(args.strategies),
        "gradual_unfreezing": bool(args.gradual_unfreezing),
        "l2sp": bool(args.l2sp),
        "baseline": not args.no_baseline,
        "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor,
        "scheduler": args.scheduler,
        "perturbation_interval": args.perturbation_interval,
        "max_failures": args.max_failures,
        "workers_per_trial": args.workers_per_trial,
        "prior": args.prior,
    }


def _num_blocks(args: argparse.Namespace, model_path: str | None) -> int:
    """The block count of the search's model (for the search space), from layer discovery."""
    from .. import tune as tlt

    task = args.data.task
    if task in (None, "text-classification"):
        return tlt.count_blocks(model_path)
    from ..discovery import discover_layer_groups
    from .tasks import LabelInfo, get_task

    chosen = get_task(task)
    model = chosen.load_model(model_path or chosen.default_model_path(), LabelInfo(["a", "b"]), args.model)
    return discover_layer_groups(model).num_blocks


def _settings(args: argparse.Namespace, output_dir: Path) -> Any:
    from .. import tune as tlt
    from .tasks.models import check_model_folder

    if args.model_path and not args.tiny:
        check_model_folder(args.model_path)
    return tlt.search_settings_from_args(
        args,
        output_dir,
        block_counter=lambda path: _num_blocks(args, path),
        train_args=user_train_flags(args.model, args.data),
    )


def validation_majority_rate(settings: Any) -> float | None:
    """The majority-class rate of the validation split the trials are evaluated on: the share of its most frequent
    label, i.e. the accuracy of always answering that label (a trial whose accuracy equals it learned nothing).

    The split is the one every trial evaluates on, loaded as a trial loads it: the trials' own ``tl-plugin train``
    options (`tl_plugin.tune.trial_command_line`) through `load_task_data`, with the search's seed (the bundled
    reviews' fixed validation split, your ``--validation_file``, or the part held out of ``--train_file``). Only the
    labels are read, nothing is tokenized; rows that ``--drop_empty`` skips are skipped here too.

    Args:
        settings (`tl_plugin.tune.SearchSettings`): the search's settings.

    Returns:
        `float` or `None`: the rate, or `None` where it is not the baseline of the metric: a metric other than
        ``eval_accuracy``, or labels that are lists (multi-label, token classification).
    """
    from datasets import DatasetDict

    from .. import tune as tlt
    from .data import check_texts
    from .demo import majority_class_accuracy
    from .train import load_task_data, parse_train_args

    if settings.metric != "eval_accuracy":
        return None
    options = parse_train_args(tlt.trial_command_line({"learning_rate": 1e-4}, settings, "unused-output-dir"))
    task, columns, _, raw, _ = load_task_data(options.data, settings.seed)
    validation = DatasetDict(validation=raw["validation"])
    if task.name == "text-classification" and options.data.drop_empty:  # as its preprocessing does
        for column, flag in ((columns.input, "text_column"), (columns.pair, "text_pair_column")):
            if column is not None:
                validation = check_texts(validation, column, flag, drop_empty=True)
    labels = validation["validation"][columns.label]
    if not labels or any(isinstance(value, list) for value in labels):
        return None
    return majority_class_accuracy(validation["validation"], columns.label)


def _check_own_data(args: argparse.Namespace, settings: Any) -> None:
    """Load and check the data once in the driver, so bad data is one line before any trial starts."""
    from .train import load_task_data

    if args.data.uses_own_data():
        task, _, labels, raw, _ = load_task_data(args.data, settings.seed)
        sizes = " / ".join(f"{raw[s].num_rows} {s}" for s in raw)
        print(f"Data: {task.name}, {sizes} examples, {len(labels.names)} labels")


def run_search(args: argparse.Namespace, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the search described by the parsed arguments; returns a summary of the outputs."""
    from .. import tune as tlt
    from . import ray_checks, ray_trials

    tlt.require_ray()
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..tune.csv_callback import ResultsCSVCallback

    started = time.perf_counter()
    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_path = tlt.absolute_storage_path(args.storage_path or output_dir / "ray_results")
    experiment_path = f"{storage_path.rstrip('/')}/{args.name}"
    ray_checks.check_address(args.address)  # one line within seconds, not Ray's long connect retries
    ray_checks.check_storage_path(storage_path)  # before any trial starts
    settings_file = output_dir / "search.json"

    if args.resume:
        if not settings_file.is_file():
            raise UsageError(f"--resume: {settings_file} not found; is --output-dir the folder of the first run?")
        saved = json.loads(settings_file.read_text())
        differences = resume_differences(
            args, saved, explicit=getattr(args, "explicit", set()), train_flags=user_train_flags(args.model, args.data)
        )
        if differences:
            raise UsageError(
                f"--resume: not the search that was started in {output_dir}: " + "; ".join(differences)
                + ". Resume without changing these, or start a new search with another --output_dir."
            )
        settings = tlt.SearchSettings.from_dict(saved["settings"])
        search = saved["search"]
        search.setdefault("workers_per_trial", 1)
        experiment_path = saved["experiment_path"]
    else:
        if tune.Tuner.can_restore(experiment_path):  # before search.json is overwritten
            raise UsageError(
                f"an experiment already exists at {experiment_path}: pass --resume to finish it, or another "
                "--name / --output-dir for a new search"
            )
        settings = _settings(args, output_dir)
        _check_own_data(args, settings)
        search = search_options(args)
        if args.prior == "scan":
            from .search_prior import run_scan_prior

            prior = run_scan_prior(args, settings, user_train_flags(args.model, args.data), output_dir)
            search.update(lr_range=list(prior.lr_range), strategies=prior.strategies, prior=prior.to_dict())
        saved = {
            "settings": settings.to_dict(),
            "search": search,
            "experiment_path": experiment_path,
            "data_fingerprint": data_fingerprint(args.data),
        }
        settings_file.write_text(json.dumps(saved, indent=2) + "\n")

    csv_path = output_dir / "results.csv"
    baseline = validation_majority_rate(settings)  # before any trial; reads only the validation labels
    data_desc = " ".join(settings.train_args) or f"{settings.train_size} bundled fine-food reviews"
    print(
        f"Search: {search['num_samples']} trials x up to {settings.max_epochs} epochs, {settings.num_blocks}-block "
        f"model {settings.model_path or '(the task default)'}, data: {data_desc}, optimising {settings.metric} "
        f"({settings.mode})\nExperiment: {experiment_path}",
        flush=True,
    )
    with tlt.ray_session(
        args.address, num_cpus=args.num_cpus, ship_package=args.ship_package, log_to_driver=not args.quiet_workers
    ) as session:
        print(f"Ray: {'local, ' + str(args.num_cpus) + ' CPUs' if session['local'] else session['address']}")
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        trainable = tune.with_resources(
            tune.with_parameters(tlt.train_transfer_trial, settings=settings.to_dict()), resources
        )
        if search["workers_per_trial"] > 1:  # tl_plugin.app.ray_trials: a TorchTrainer per trial
            trainable = ray_trials.distributed_trainable(
                settings.to_dict(), search["workers_per_trial"], cpus_per_worker=args.cpus_per_trial,
                gpus_per_worker=args.gpus_per_trial, experiment_path=experiment_path,
                max_failures=search["max_failures"],
            )  # fmt: skip
        if args.resume:
            if not tune.Tuner.can_restore(experiment_path):
                raise UsageError(f"--resume: no restorable Ray Tune experiment at {experiment_path}")
            print(
                f"Resuming {experiment_path}: finished trials are kept, the others go on from their last epoch "
                "checkpoint."
            )
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
                freeze_blocks=search["prior"]["freeze_blocks"] if isinstance(search.get("prior"), dict) else None,
            )
            points = initial_points(search, settings.num_blocks)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=settings.metric,
                    mode=settings.mode,
                    num_samples=search["num_samples"],
                    scheduler=_scheduler(search, settings),
                    # the concurrency limit belongs to the generator (Tune ignores max_concurrent_trials with it)
                    search_alg=BasicVariantGenerator(
                        points_to_evaluate=points, random_state=settings.seed, max_concurrent=args.max_concurrent or 0
                    ),
                    trial_dirname_creator=tlt.trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=args.name,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=search["max_failures"], fail_fast=False),
                    # every epoch's Trainer checkpoint (weights, optimizer, scheduler, RNG, schedule phase); PBT keeps
                    # more, so that an exploit never reads one being deleted
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=4 if search.get("scheduler") == "pbt" else 2
                    ),
                    callbacks=[ResultsCSVCallback(csv_path, settings.to_dict()), *extra_callbacks],
                    verbose=args.verbose,
                ),
            )
        tuner.fit()
        # from the experiment folder (what a restore sees too); error files are read while Ray is up
        rows = tlt.rows_from_trials(tune.ExperimentAnalysis(experiment_path).trials, settings)

    return _finish(rows, search, settings, output_dir, csv_path, experiment_path, started, baseline)


def initial_points(search: dict[str, Any], num_blocks: int) -> list[dict[str, Any]]:
    """The points tried before any sampled one: the scan's recommendation and its neighbours (``--prior scan``),
    then the default config of ``tl-plugin train`` (unless ``--no_baseline``), each once: the default is left out
    when the scan recommends the same config (it would train the same trial twice).

    Example:

    ```python
    >>> from tl_plugin.app.search import initial_points
    >>> search = {"baseline": True, "strategies": ["layers"], "l2sp": False}
    >>> [(p["strategy"], p["freeze_bottom_blocks"]) for p in initial_points(search, num_blocks=6)]
    [('layers', 3)]

    ```
    """
    from .. import tune as tlt

    points = []
    if isinstance(search.get("prior"), dict):  # the scan's recommendation and its neighbours first
        points += [dict(p) for p in search["prior"]["first_points"]]
    if search["baseline"] and "layers" in search["strategies"]:
        baseline = tlt.baseline_point(num_blocks)
        if not any(_same_point(baseline, point) for point in points):
            points.append(baseline)
    for point in points:  # the optional knobs off, as tl-plugin train runs
        if search.get("gradual_unfreezing"):
            point["unfreeze_pace"] = 0
        if search["l2sp"]:
            point["l2sp_alpha"] = 0.0
    return points


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two points train the same config (learning rates equal to float rounding)."""
    if a.keys() != b.keys():
        return False
    return all(
        math.isclose(a[k], b[k], rel_tol=1e-9) if k == "learning_rate" else a[k] == b[k] for k in a
    )


def _scheduler(search: dict[str, Any], settings: Any) -> Any:
    """ASHA (the default) or PBT over the learning rate and the freeze boundary (``freeze_bottom_blocks``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if search.get("scheduler", "asha") == "pbt":
        low, high = search["lr_range"]
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=search.get("perturbation_interval", 1),
            synch=True,  # every trial reaches the interval before the bottom ones exploit the top ones
            hyperparam_mutations={
                "learning_rate": tune.loguniform(low, high),
                "freeze_bottom_blocks": list(range(1, settings.num_blocks + 1)),
            },
        )
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=settings.max_epochs,
        grace_period=min(search["grace_period"], settings.max_epochs),
        reduction_factor=search["reduction_factor"],
    )


def _finish(
    rows: list[dict[str, Any]],
    search: dict[str, Any],
    settings: Any,
    output_dir: Path,
    csv_path: Path,
    experiment_path: str,
    started: float,
    baseline: float | None = None,
) -> dict[str, Any]:
    from .. import tune as tlt

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
        "majority_rate": baseline,
    }
    if baseline is not None:
        at_it = [r["trial"] for r in rows if r.get(settings.metric) is not None
                 and abs(float(r[settings.metric]) - baseline) <= 1e-9]  # fmt: skip
        print(
            f"\nMajority-class rate of the validation split: {baseline:.4g} (the accuracy of always answering its "
            f"most frequent label); {len(at_it)} of {len(rows)} trials ended exactly at it"
            + (f": {', '.join(at_it)}" if at_it else "")
        )
    try:
        plot = tlt.plot_results(rows, output_dir / "results.png", settings.metric, baseline=baseline)
        summary["plot"] = str(plot)
    except ImportError as err:
        print(f"\nNo plot: {err}")
    best = tlt.save_best(rows, settings, output_dir)
    summary["best"] = best
    print(f"\nResults table: {csv_path}" + (f"\nPlot:          {summary['plot']}" if "plot" in summary else ""))
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
            f"  tl-plugin search --resume --output_dir {output_dir}"
        )
    print(f"\nWall time: {summary['wall_time_s']:.0f} s")
    return summary


def main(argv: Sequence[str]) -> int:
    """``tl-plugin search ARGV``: 0 when every trial finished, 1 when the search is incomplete."""
    summary = run_search(build_search_parser().parse_args(list(argv)))
    return 0 if summary["complete"] else 1
