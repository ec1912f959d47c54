"""``tl-plugin lr-find``: a learning-rate range test (`tl_plugin.lr_finder.lr_find`) on the run ``tl-plugin train``
would make with the same options.

The model, data, task and transfer options are those of ``train`` (the same parser, the same preparation: the
transfer config is applied before the test, so the lr found is the one of the layers that train), plus
``--start_lr``, ``--end_lr`` and ``--num_steps``. The test trains nothing for good: the model is restored afterwards
and nothing but the results is written. Written to ``--output_dir``: ``lr_find.png`` (loss against lr, the
suggestion marked) and ``lr_find.json`` (the curve, the suggestion, its rule, and the ``tl-plugin train`` command
that uses it: the run's options with ``--learning_rate`` set to the suggestion).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from .errors import UsageError
from .train import (
    TrainOptions,
    build_run,
    build_train_parser,
    class_weight_loss,
    prepare_run,
    print_plan,
)

__all__ = ["LR_FIND_FLAGS", "build_lr_find_parser", "parse_lr_find_args", "run_lr_find", "train_command"]

DESCRIPTION = (
    "Learning-rate range test on the run `tl-plugin train` would make with the same options (model, data, task, "
    "transfer config applied): the lr rises exponentially from --start_lr to --end_lr over --num_steps steps, the "
    "smoothed training loss is recorded, and an lr is suggested (one decade below the lowest smoothed loss). The "
    "model is restored afterwards. Writes lr_find.png and lr_find.json (with the train command) to --output_dir."
)

#: The options ``lr-find`` adds to those of ``train`` (left out of the printed train command).
LR_FIND_FLAGS = ("--start_lr", "--end_lr", "--num_steps")


def build_lr_find_parser() -> Any:
    """``train``'s parser (`tl_plugin.app.train.build_train_parser`) plus the range test's options."""
    from ..lr_finder import LRFinderConfig

    parser = build_train_parser(prog="tl-plugin lr-find", description=DESCRIPTION)
    defaults = LRFinderConfig()
    group = parser.add_argument_group("range test (tl_plugin.lr_finder.lr_find)")
    group.add_argument("--start_lr", type=float, default=defaults.start_lr, help="The lr of the first step.")
    group.add_argument(
        "--end_lr",
        type=float,
        default=defaults.end_lr,
        help="The lr of the last step (the test usually stops earlier).",
    )
    group.add_argument(
        "--num_steps",
        type=int,
        default=defaults.num_steps,
        help="Optimizer steps from --start_lr to --end_lr.",
    )
    return parser


def parse_lr_find_args(argv: list[str]) -> tuple[TrainOptions, Any]:
    """The run's options (as ``train`` parses them) and the `tl_plugin.lr_finder.LRFinderConfig`; `UsageError` for
    anything wrong (an empty or inverted lr range names both values)."""
    from ..lr_finder import LRFinderConfig
    from .arguments import transfer_config_from_namespace

    (model_args, data_args, training_args), namespace = build_lr_find_parser().parse(argv)
    try:
        finder = LRFinderConfig(
            start_lr=namespace.start_lr, end_lr=namespace.end_lr, num_steps=namespace.num_steps
        )
    except ValueError as err:
        message = str(err)
        for name in ("start_lr", "end_lr", "num_steps"):
            message = message.replace(f"`{name}`", f"--{name} ")
        raise UsageError(message.replace(" =", " ")) from None
    transfer = transfer_config_from_namespace(namespace)
    if data_args.quick:  # as `tl-plugin train --quick`
        data_args.train_size = min(data_args.train_size, 400)
        data_args.test_size = min(data_args.test_size, 200)
        training_args.per_device_train_batch_size = 8
    if data_args.activation_cache:
        raise UsageError(
            "--activation_cache: lr-find runs without it (the cache's build would take longer than the test); "
            "drop the flag here and keep it for train"
        )
    return TrainOptions(model_args, data_args, training_args, transfer), finder


def train_command(argv: list[str], learning_rate: float) -> str:
    """The ``tl-plugin train`` command of `argv` (lr-find's options dropped) with ``--learning_rate`` set."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in (*LR_FIND_FLAGS, "--learning_rate"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["tl-plugin", "train", *kept, "--learning_rate", f"{learning_rate:.2e}"])


def _model_name(path: str) -> str:
    """A readable name for the plot: the folder's name, or its parent's for a bare ``model`` folder (the bundled
    MiniLM's package keeps its weights in one)."""
    folder = Path(path)
    return folder.parent.name if folder.name in ("model", "") and folder.parent.name else folder.name


def run_lr_find(argv: list[str]) -> dict[str, Any]:
    """Run ``tl-plugin lr-find`` with `argv`; returns what ``lr_find.json`` holds."""
    import transformers

    from ..distributed import check_ddp_will_wrap
    from ..lr_finder import LRRangeTestDivergedError, lr_find

    options, finder = parse_lr_find_args(argv)
    transformers.logging.set_verbosity_warning()
    started = time.perf_counter()
    prepared = prepare_run(options)
    training_args = options.training
    is_main = training_args.process_index == 0
    loss = class_weight_loss(options.data.class_weights, prepared)
    check_ddp_will_wrap(training_args, "tl-plugin lr-find")
    if is_main:
        print_plan(options, prepared)
        print(
            f"\nRange test: lr {finder.start_lr:g} -> {finder.end_lr:g} over at most {finder.num_steps} steps of "
            f"{training_args.per_device_train_batch_size} x {training_args.world_size} examples"
        )
    run = build_run(options, prepared, loss)
    try:
        result = lr_find(
            run.trainer, start_lr=finder.start_lr, end_lr=finder.end_lr, num_steps=finder.num_steps,
            smoothing=finder.smoothing, diverge_factor=finder.diverge_factor, apply_suggestion=False,
        )  # fmt: skip
    except LRRangeTestDivergedError as err:
        raise UsageError(
            str(err).replace("start_lr=", "--start_lr ").replace("(was ", "(was --start_lr ")
        ) from None
    finally:
        run.close()
    command = train_command(argv, result.suggestion)
    out = Path(training_args.output_dir)
    summary: dict[str, Any] = {
        "learning_rate": result.suggestion,
        "rule": result.rule,
        "train_command": command,
        "transfer_config": options.transfer.to_dict(),
        "model": prepared.model_path,
        "trainable": prepared.trainable.to_dict(),
        "runtime_s": round(time.perf_counter() - started, 1),
        **result.to_dict(),
    }
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        strategy = options.transfer.strategy
        plot = result.plot(
            out / "lr_find.png",
            title=f"Learning-rate range test: {_model_name(prepared.model_path)}, strategy {strategy} "
            f"({prepared.trainable.percent:.0f}% trainable)",
        )
        tmp = out / "lr_find.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / "lr_find.json")
        print("\n" + "=" * 64)
        print(f"suggested learning rate      {result.suggestion:.2e}   ({result.rule})")
        print(f"lowest smoothed loss at lr   {result.min_loss_lr:.2e}")
        print(f"steepest descent at lr       {result.steepest_lr:.2e}   (not used)")
        stop = "diverged" if result.diverged else "ran every step"
        print(f"steps                        {len(result.lrs)} ({stop})")
        for note in result.notes:
            print(f"note: {note}")
        print(f"plot                         {plot}")
        print(f"results                      {out / 'lr_find.json'}")
        print(f"\ntrain with it:\n  {command}")
        print("=" * 64)
    return summary
