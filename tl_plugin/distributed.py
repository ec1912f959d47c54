"""Refuse a multi-process run that the `transformers.Trainer` would not wrap in DistributedDataParallel.

Why. Launched with ``torchrun`` or ``accelerate launch`` on a machine without GPUs, a script whose
`TrainingArguments` do not say ``use_cpu=True`` starts several processes that do **not** train together. What
transformers 5.x then does (`TrainingArguments._setup_devices`, Accelerate's `PartialState`):

- Accelerate picks a multi-process backend only for an accelerator (NCCL on CUDA, ...) or, with ``cpu=True``, gloo
  on the CPU (``DistributedType.MULTI_CPU``). Without a GPU and without ``use_cpu`` the distributed type is ``NO``,
  so `TrainingArguments.parallel_mode` is ``NOT_PARALLEL`` and the Trainer never wraps the model in DDP;
- with ``ddp_backend="gloo"`` a gloo process group of the launcher's world size is still created, and the Trainer's
  data loaders are split between the processes: each rank trains alone, on its share of the data, with no
  gradient all-reduce, and rank 0 saves its own half-trained model. Without ``ddp_backend`` every rank trains
  alone on all of the data. transformers only logs a warning ("torch.distributed process group is initialized,
  but parallel_mode != ParallelMode.DISTRIBUTED").

Callbacks that must know whether DDP wraps the model (``ddp_find_unused_parameters`` for freeze schedules) then
see no DDP and cannot protect anything. :func:`check_ddp_will_wrap` turns that state into an error before the
first step; every tl_plugin callback (at ``on_init_end`` and ``on_train_begin``) and `TransferTrainer` (in its
constructor) call it. A script of your own, or a command-line entry point, calls it once the `TrainingArguments`
exist:

```python
from tl_plugin.distributed import check_ddp_will_wrap

check_ddp_will_wrap(training_args, "my_script.py")
```
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DistributedSetupError", "check_ddp_will_wrap", "is_distributed", "launched_world_size"]

#: Environment variables that launchers set to the number of processes (torchrun / accelerate, then MPI ones,
#: the same list Accelerate reads).
WORLD_SIZE_ENV_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedSetupError(RuntimeError):
    """Several processes were launched, but the Trainer would train each of them alone (no DDP)."""


def launched_world_size() -> int:
    """The number of processes of this run: the size of the initialised `torch.distributed` process group, or
    what the launcher's environment says (``WORLD_SIZE``, or the MPI equivalents), whichever is larger; 1 when
    neither exists."""
    size = 1
    for name in WORLD_SIZE_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            size = max(size, int(value))
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return size
    if dist.is_available() and dist.is_initialized():
        size = max(size, int(dist.get_world_size()))
    return size


def _parallel_mode_name(mode: Any) -> str:
    value = getattr(mode, "value", mode)
    return f"ParallelMode.{str(value).upper()}" if value is not None else "None"


def is_distributed(args: Any) -> bool:
    """Whether the Trainer wraps the model for multi-process data parallelism (DDP, FSDP or DeepSpeed): whether
    ``args.parallel_mode`` is ``ParallelMode.DISTRIBUTED``.

    This is what decides the wrap in `transformers.Trainer`; a run launched on several processes that is not
    distributed in this sense trains each process alone, which :func:`check_ddp_will_wrap` refuses.
    """
    from transformers.training_args import ParallelMode

    return getattr(args, "parallel_mode", None) == ParallelMode.DISTRIBUTED


def check_ddp_will_wrap(args: Any, who: str) -> None:
    """Raise `DistributedSetupError` when several processes were launched but the Trainer will not wrap the model
    in DistributedDataParallel, so that the processes would train independently, without gradient sync.

    Call it once the `TrainingArguments` exist and before training starts (e.g. right after parsing them in a
    command-line entry point): it reads ``args.parallel_mode``, which sets up the devices (and the process group)
    exactly as the Trainer does. A single process (no process group, no ``WORLD_SIZE`` above 1) always passes.
    Runs the Trainer parallelises without DDP on purpose (TPU / XLA, SageMaker) pass too; only
    ``ParallelMode.NOT_PARALLEL`` and ``ParallelMode.NOT_DISTRIBUTED`` with more than one process are refused.

    Args:
        args (`transformers.TrainingArguments`): the run's arguments.
        who (`str`): what is checking (a callback's or script's name), named in the message.

    Raises:
        `DistributedSetupError`: naming the world size, the parallel mode and the fix (on CPUs:
            ``use_cpu=True``, i.e. ``--use_cpu true``, or ``ACCELERATE_USE_CPU=true`` in the environment).

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import TrainingArguments
    >>> from tl_plugin.distributed import check_ddp_will_wrap
    >>> check_ddp_will_wrap(TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[]), "example")

    ```
    """
    world_size = launched_world_size()
    if world_size <= 1:
        return
    from transformers.training_args import ParallelMode

    mode = getattr(args, "parallel_mode", None)
    if mode not in (ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED):
        return
    use_cpu = getattr(args, "use_cpu", None)
    backend = getattr(args, "ddp_backend", None)
    raise DistributedSetupError(
        f"{who}: {world_size} processes were launched (torch.distributed / WORLD_SIZE), but "
        f"TrainingArguments.parallel_mode is {_parallel_mode_name(mode)}, so the Trainer will not wrap the model in "
        f"DistributedDataParallel: each process would train alone on its share of the data, without gradient "
        f"synchronisation, and the ranks would end with different weights. Cause: the launcher started "
        f"{world_size} processes but Accelerate found no multi-process backend for these arguments (use_cpu="
        f"{use_cpu!r}, ddp_backend={backend!r}); on a machine without GPUs this happens unless use_cpu is set. "
        f"Fix: on CPUs pass `--use_cpu true` (TrainingArguments(use_cpu=True), or ACCELERATE_USE_CPU=true in the "
        f"environment) to get DDP over gloo; on GPUs make sure each process sees a CUDA device (NCCL). Or launch "
        f"one process."
    )
