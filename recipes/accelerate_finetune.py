"""Fine-tune with a transfer strategy under `accelerate launch` or `torchrun` (the same script runs everywhere).

    accelerate launch --config_file recipes/accelerate/two_process.yaml recipes/accelerate_finetune.py \
        --strategy layers --freeze_bottom_blocks half --output_dir outputs/ddp

    torchrun --nproc_per_node 2 recipes/accelerate_finetune.py --quick

Every `tl-plugin train` option works (see `tl-plugin train --help`). Each process trains a replica wrapped in
DistributedDataParallel: NCCL on GPUs; on a machine without GPUs this script adds ``--use_cpu true --ddp_backend
gloo`` (unless you pass those options yourself), because without ``use_cpu`` transformers does not wrap the model
in DDP on CPUs and each process would train alone on its share of the data. Only the main process prints the
report and writes the outputs.
"""

from __future__ import annotations

import sys

from tl_plugin.cli import main


def _given(argv: list[str], option: str) -> bool:
    """Whether `option` is on the command line, as ``--option value`` or ``--option=value``."""
    return any(arg == option or arg.startswith(option + "=") for arg in argv)


def cpu_defaults(argv: list[str], cuda_available: bool) -> list[str]:
    """`argv` plus, without CUDA, ``--use_cpu true`` (real DDP on CPUs) and ``--ddp_backend gloo``, unless given."""
    argv = list(argv)
    if not cuda_available:
        if not _given(argv, "--use_cpu"):
            argv += ["--use_cpu", "true"]
        if not _given(argv, "--ddp_backend"):
            argv += ["--ddp_backend", "gloo"]
    return argv


if __name__ == "__main__":
    import torch

    sys.exit(main(["train", *cpu_defaults(sys.argv[1:], torch.cuda.is_available())]))
