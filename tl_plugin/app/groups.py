"""``tl-plugin groups``: a model's layer groups and their parameter counts, before choosing what to transfer."""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import TASKS, ModelArguments
from .parser import CommandParser

__all__ = ["run_groups"]


@dataclass
class GroupsArguments:
    task: str = field(
        default="text-classification",
        metadata={"help": "The task whose head the model gets.", "choices": TASKS},
    )
    num_labels: int = field(default=2, metadata={"help": "Size of the head (it is shown, not trained)."})


def run_groups(argv: list[str]) -> None:
    """Print the layer groups of ``--model_name_or_path`` (default: the task's bundled model)."""
    parser = CommandParser(
        [ModelArguments, GroupsArguments],
        prog="tl-plugin groups",
        description="Print a model's layer groups (embeddings -> blocks -> other -> head) and their sizes.",
    )
    (model_args, groups_args), _ = parser.parse(argv)
    from ..discovery import discover_layer_groups
    from ..freezing import trainable_report
    from .tasks import LabelInfo, get_task
    from .tasks.models import check_model_folder

    task = get_task(groups_args.task)
    if model_args.model_name_or_path:
        check_model_folder(model_args.model_name_or_path)
    path = model_args.model_name_or_path or task.default_model_path()
    labels = LabelInfo(names=[f"label_{i}" for i in range(groups_args.num_labels)])
    model = task.load_model(path, labels, model_args)
    groups = discover_layer_groups(model)
    print(f"{path}\n{groups.summary()}\n\n{trainable_report(model, groups)}")
