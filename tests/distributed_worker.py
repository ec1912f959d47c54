"""One rank of a 2-process DDP run over gloo, launched by tests/test_distributed.py with torchrun.

Each rank trains the same tiny BERT with the real `transformers.Trainer` under a named scenario, then writes
``rank<k>.json`` holding, per parameter *name*, a digest of its initial and final values and its final
``requires_grad``. The parent test compares the ranks' files: the gloo exit abort that hits some 2-process runs
after training (``terminate called without an active exception``) cannot hide a real failure, because a rank
that failed never writes its file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 99, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def build_scenario(name: str, model: torch.nn.Module) -> tuple[list[Any], dict[str, Any], type[Trainer]]:
    """Callbacks, extra TrainingArguments and the Trainer class of a scenario."""
    from tl_plugin import TransferConfig

    scenarios = _scenarios(TransferConfig)
    if name not in scenarios:
        raise SystemExit(f"unknown scenario {name!r}; known: {sorted(scenarios)}")
    return scenarios[name](model)


def _scenarios(TransferConfig: Any) -> dict[str, Any]:  # noqa: N803 - a class passed in
    from tl_plugin.callbacks import (
        GradualUnfreezingCallback,
        LayerwiseLRDecayCallback,
        TransferCallback,
    )
    from tl_plugin.optim import TransferTrainer

    unused = {"ddp_find_unused_parameters": True}
    return {
        "full": lambda m: ([TransferCallback(TransferConfig(strategy="full"))], {}, Trainer),
        "partial": lambda m: (
            [TransferCallback(TransferConfig(strategy="partial", reinit_top_k=1, reinit_seed=0))],
            {},
            Trainer,
        ),
        "layers": lambda m: (
            [TransferCallback(TransferConfig(strategy="layers", freeze_bottom_blocks=2))],
            {},
            Trainer,
        ),
        "gradual": lambda m: ([GradualUnfreezingCallback(every_n_epochs=1)], unused, Trainer),
        "gradual_unsafe": lambda m: (
            [GradualUnfreezingCallback(every_n_epochs=1)],
            {"ddp_find_unused_parameters": False},
            Trainer,
        ),
        "llrd": lambda m: ([LayerwiseLRDecayCallback(0.7)], {}, Trainer),
        "llrd_transfer_trainer": lambda m: ([LayerwiseLRDecayCallback(0.7)], {}, TransferTrainer),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    options = parser.parse_args()
    out = Path(options.out)
    rank = int(os.environ.get("RANK", "0"))

    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    )
    try:
        callbacks, extra_args, trainer_cls = build_scenario(options.scenario, model)
        args = TrainingArguments(
            output_dir=str(out / "trainer"), num_train_epochs=options.epochs, per_device_train_batch_size=8,
            learning_rate=5e-3, max_grad_norm=1.0, report_to=[], save_strategy="no", use_cpu=True,
            ddp_backend="gloo", disable_tqdm=True, seed=0, **extra_args,
        )  # fmt: skip
        trainer = trainer_cls(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks)
        start: dict[str, str] = {}

        from transformers import TrainerCallback

        class StartDigest(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                for name, param in kwargs["model"].named_parameters():
                    start[name] = digest(param)

        trainer.add_callback(StartDigest())
        trainer.train()
    except Exception as err:  # the parent reads the error from the rank's file
        (out / f"rank{rank}.error.txt").write_text(f"{type(err).__name__}: {err}")
        raise
    result = {
        "rank": rank,
        "world_size": args.world_size,
        "start": start,
        "final": {name: digest(p) for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(out / f"rank{rank}.json")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
