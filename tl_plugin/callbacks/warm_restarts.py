"""LR warm restarts of the phased callbacks: the lr function of a fresh schedule of the Trainer's type, and lr
functions stitched together at restart steps (`tl_plugin.callbacks.phases.PhasedCallback` wraps the Trainer's
`LambdaLR` with them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainingArguments

__all__ = ["fresh_lr_lambda", "stitched_lr_lambda"]


def fresh_lr_lambda(args: TrainingArguments, num_training_steps: int, warmup: int) -> Callable[[int], float]:
    """The lr function of a fresh scheduler of ``args.lr_scheduler_type`` over `num_training_steps` steps."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=dummy,
        num_warmup_steps=warmup,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs
        if isinstance(args.lr_scheduler_kwargs, dict)
        else {},
    )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"A warm restart needs an lr schedule given by a function of the step; `lr_scheduler_type`="
            f"{args.lr_scheduler_type!r} is not one (use linear, cosine, constant_with_warmup, polynomial, ...)."
        )
    return scheduler.lr_lambdas[0]


def stitched_lr_lambda(
    original: Callable[[int], float], restarts: list[tuple[int, Callable[[int], float]]]
) -> Callable[[int], float]:
    if not restarts:
        return original

    def lr_lambda(step: int) -> float:
        for start, fresh in reversed(restarts):
            if step >= start:
                return fresh(step - start)
        return original(step)

    return lr_lambda
