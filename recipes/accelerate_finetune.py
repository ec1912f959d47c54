"""Fine-tune with a transfer strategy under `accelerate launch` or `torchrun` (the same script runs everywhere).

    accelerate launch --config_file recipes/accelerate/two_process.yaml recipes/accelerate_finetune.py \
        --strategy layers --freeze_bottom_blocks half --output_dir outputs/ddp

    torchrun --nproc_per_node 2 recipes/accelerate_finetune.py --quick

Every `tl-plugin train` option works (see `tl-plugin train --help`). On a machine without GPUs the processes use
gloo on the CPU. Only the main process prints the report and writes the outputs.
"""

from __future__ import annotations

import sys

from tl_plugin.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        import torch

        if not torch.cuda.is_available() and "--ddp_backend" not in argv:
            argv += ["--ddp_backend", "gloo"]
    except ImportError:  # pragma: no cover
        pass
    sys.exit(main(["train", *argv]))
