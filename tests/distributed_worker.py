"""One rank of a 2-process DDP run over gloo, launched by tests/test_distributed.py with torchrun.

Each rank trains the same tiny BERT with the real `transformers.Trainer` under a named scenario, then writes
``rank<k>.json`` holding, per parameter *name*, a digest of its initial and final values and its final
``requires_grad``, plus what proves DDP: the class of `Trainer.model_wrapped` during training (DDP wraps the
model), the digest of the rank's first training batch (the ranks got different shards) and the parallel mode.
The ``no_ddp_*`` scenarios launch 2 processes that the Trainer does not wrap in DDP (``use_cpu=False`` on CPUs):
a plain Trainer, which trains each rank alone (the negative control of the weight comparison), and runs that a
tl_plugin callback or `TransferTrainer` must refuse; a rank that raised writes ``rank<k>.error.json``. The parent
test compares the ranks' files: the gloo exit abort that hits some 2-process runs
after training (``terminate called without an active exception``) cannot hide a real failure, because a rank
that failed never writes its file. A rank that wrote its file leaves with `os._exit`, skipping the interpreter
teardown where gloo aborts or (seen once) hangs.

The activation-cache scenarios (`CACHE_SCENARIOS`) train a dropout-free BERT with its bottom 2 of 4 blocks
frozen on variable-length examples: with `tl_plugin.cache.prepare_cached_training` and a cache directory shared
by the ranks (``<out>/cache``), or uncached with the frozen prefix and the last block computed the same way.
Their rank files also hold the cache's stats, and ``rank<k>.safetensors`` the final trainable tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from tl_plugin import testing  # noqa: E402


def RandomTokens(n: int = 64) -> torch.utils.data.Dataset:  # noqa: N802  (a data set, named as one)
    """64 learnable examples (label: first token id above 50), `tl_plugin.testing.RandomTokens`."""
    return testing.RandomTokens(n=n, labels="first_token")


class RaggedTokens(torch.utils.data.Dataset):
    """Tokenized, unpadded examples of 4 to 12 tokens (`pad_collate` pads them per batch)."""

    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(4, 13, (n,), generator=generator).tolist()
        self.ids = [torch.randint(5, 99, (length,), generator=generator) for length in lengths]
        self.labels = [int(ids[0] > 50) for ids in self.ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": torch.tensor(self.labels[i])}


def pad_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` to the longest example of the batch, with its ``attention_mask``."""
    ids = torch.zeros(len(features), max(len(f["input_ids"]) for f in features), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        ids[row, :length] = torch.as_tensor(feature["input_ids"])
        mask[row, :length] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in features[0]:
        batch["labels"] = torch.stack([torch.as_tensor(f["labels"]) for f in features])
    return batch


def tiny_bert(**config: Any) -> BertForSequenceClassification:
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99,
            **config,
        )
    )  # fmt: skip


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def build_scenario(name: str, model: torch.nn.Module) -> tuple[list[Any], dict[str, Any], type[Trainer]]:
    """Callbacks, extra TrainingArguments and the Trainer class of a scenario."""
    from tl_plugin import TransferConfig

    scenarios = _scenarios(TransferConfig)
    if name not in scenarios:
        raise SystemExit(f"unknown scenario {name!r}; known: {sorted([*scenarios, *CACHE_SCENARIOS])}")
    return scenarios[name](model)


def _scenarios(TransferConfig: Any) -> dict[str, Any]:  # noqa: N803 - a class passed in
    from tl_plugin.callbacks import (
        GradualUnfreezingCallback,
        LayerwiseLRDecayCallback,
        TransferCallback,
    )
    from tl_plugin.trainer import TransferTrainer

    unused = {"ddp_find_unused_parameters": True}
    # torchrun on CPUs without use_cpu: Accelerate finds no multi-process backend, parallel_mode is NOT_PARALLEL
    # and the Trainer does not wrap the model in DDP. With ddp_backend="gloo" a process group exists and the data
    # is split between the ranks (what the recipe did before it passed --use_cpu true); without, only WORLD_SIZE.
    no_ddp = {"use_cpu": False, "ddp_backend": "gloo"}
    no_ddp_no_group = {"use_cpu": False, "ddp_backend": None}
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
        # tests/test_restore_best.py: phase 0 ends after epoch 1 (4 steps a rank), evaluated at steps 2 and 4;
        # "max" restores the step-2 weights (the loss falls), which the ranks must load identically
        "gradual_restore_best": lambda m: (
            [GradualUnfreezingCallback(every_n_epochs=1, restore_best="loss", restore_best_mode="max")],
            {**unused, "eval_strategy": "steps", "eval_steps": 2},
            Trainer,
        ),
        "gradual_unsafe": lambda m: (
            [GradualUnfreezingCallback(every_n_epochs=1)],
            {"ddp_find_unused_parameters": False},
            Trainer,
        ),
        "llrd": lambda m: ([LayerwiseLRDecayCallback(0.7)], {}, Trainer),
        "llrd_transfer_trainer": lambda m: ([LayerwiseLRDecayCallback(0.7)], {}, TransferTrainer),
        # tests/test_multi_node.py: two torchrun node groups of one process each, unfreezing plus layer-wise LR decay
        "gradual_llrd": lambda m: (
            [GradualUnfreezingCallback(every_n_epochs=1), LayerwiseLRDecayCallback(MULTI_NODE_LR_DECAY)],
            unused,
            Trainer,
        ),
        # negative control: a plain Trainer with no tl_plugin callback bypasses the check and trains without DDP
        "no_ddp_plain": lambda m: ([], no_ddp, Trainer),
        # refused before the first step: by a callback (process group, split data) and by TransferTrainer alone
        "no_ddp_gradual": lambda m: (
            [GradualUnfreezingCallback(every_n_epochs=1)],
            {**no_ddp, **unused},
            Trainer,
        ),
        "no_ddp_transfer_trainer": lambda m: ([], no_ddp_no_group, TransferTrainer),
    }


#: Scenarios of tests/test_multi_node.py: their rank files also hold the launcher's node view (``GROUP_RANK``,
#: ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and each optimizer group's initial lr.
MULTI_NODE_SCENARIOS = ("gradual_llrd",)
MULTI_NODE_LR_DECAY = 0.8

#: Frozen prefix of the cache scenarios: the embeddings and the bottom 2 of the 4 blocks.
CACHE_FROZEN_BLOCKS = 2
CACHE_PREFIX = ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")
CACHE_SCENARIOS = ("cached", "cached_per_rank_prefix", "uncached")


def build_cache_scenario(
    name: str, model: torch.nn.Module, cache_dir: Path
) -> tuple[dict[str, Any], Callable[[], contextlib.AbstractContextManager[Any]], Any]:
    """Trainer keyword arguments, the context to train in and the `ActivationCache` (or None) of a cache scenario.

    ``cached`` and ``uncached`` start from the same frozen prefix on every rank (as after `from_pretrained`: a
    checkpoint, here seed 0) and a different rest per rank; ``cached_per_rank_prefix`` keeps the per-rank
    initialisation of the prefix too, so each rank keys its cache on different prefix weights until DDP
    broadcasts rank 0's. Rank 0's initial weights, which DDP gives every rank, are the same in all three.
    """
    from tl_plugin import freeze_bottom_blocks
    from tl_plugin.cache import prepare_cached_training
    from tl_plugin.last_block import FirstTokenLastBlock
    from tl_plugin.perf import FrozenPrefixNoGrad

    if name != "cached_per_rank_prefix":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pretrained = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).state_dict()
        model.load_state_dict(
            {k: v for k, v in pretrained.items() if k.startswith(CACHE_PREFIX)}, strict=False
        )
    freeze_bottom_blocks(model, CACHE_FROZEN_BLOCKS)
    if name == "uncached":  # a plain Trainer; the frozen prefix and the last block computed as the cache does

        @contextlib.contextmanager
        def like_the_cache() -> Any:
            with FirstTokenLastBlock(model), FrozenPrefixNoGrad(model):
                yield

        kwargs = {"model": model, "train_dataset": RaggedTokens(), "data_collator": pad_collate}
        return kwargs, like_the_cache, None
    prepared = prepare_cached_training(
        model, RaggedTokens(), data_collator=pad_collate, cache_dir=cache_dir, prefix_dropout="forbid"
    )
    return prepared.trainer_kwargs(), contextlib.nullcontext, prepared.cache


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    options = parser.parse_args()
    out = Path(options.out)
    rank = int(os.environ.get("RANK", "0"))

    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    cached = options.scenario in CACHE_SCENARIOS
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if cached else tiny_bert()
    cache: Any = None
    trainer: Any = None
    seen: dict[str, Any] = {"steps": 0, "first_batch": None, "wrapped": None, "restored": []}
    try:
        if cached:
            trainer_kwargs, context, cache = build_cache_scenario(options.scenario, model, out / "cache")
            extra_args: dict[str, Any] = {}
            trainer_cls: type[Trainer] = Trainer
        else:
            callbacks, extra_args, trainer_cls = build_scenario(options.scenario, model)
            trainer_kwargs = {"model": model, "train_dataset": RandomTokens(), "callbacks": callbacks}
            if extra_args.get("eval_strategy", "no") != "no":
                trainer_kwargs["eval_dataset"] = RandomTokens(16)
            context = contextlib.nullcontext
        arguments: dict[str, Any] = {"use_cpu": True, "ddp_backend": "gloo", **extra_args}
        args = TrainingArguments(
            output_dir=str(out / "trainer"), num_train_epochs=options.epochs, per_device_train_batch_size=8,
            learning_rate=5e-3, max_grad_norm=1.0, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
            **arguments,
        )  # fmt: skip
        trainer = trainer_cls(args=args, **trainer_kwargs)
        start: dict[str, str] = {}

        from transformers import TrainerCallback

        class StartDigest(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                for name, param in kwargs["model"].named_parameters():
                    start[name] = digest(param)

            def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                # right after a tl_plugin callback restored a phase's best weights (restore_best): what it loaded
                for callback in trainer.callback_handler.callbacks:
                    for event in getattr(callback, "events", []):
                        if "tl/restored_best_step" in event and event["step"] == state.global_step:
                            weights = {n: digest(p) for n, p in kwargs["model"].named_parameters()}
                            seen["restored"].append({**event, "weights": weights})

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                # what the Trainer really trains: DDP(model) under DDP, the bare model otherwise
                wrapped = type(trainer.model_wrapped)
                seen["wrapped"] = f"{wrapped.__module__}.{wrapped.__qualname__}"

        trainer.add_callback(StartDigest())
        training_step = trainer.training_step

        def recording_step(model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> Any:
            if seen["first_batch"] is None:  # which examples this rank got: ranks must get different shards
                seen["first_batch"] = {k: digest(v) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            seen["steps"] += 1
            return training_step(model, inputs, *rest, **kwargs)

        trainer.training_step = recording_step
        with context():
            trainer.train()
    except Exception as err:  # the parent reads the error from the rank's files
        (out / f"rank{rank}.error.txt").write_text(f"{type(err).__name__}: {err}")
        (out / f"rank{rank}.error.json").write_text(
            json.dumps(
                {
                    "type": type(err).__name__,
                    "module": type(err).__module__,
                    "message": str(err),
                    "trainer_built": trainer is not None,
                    "training_steps": seen["steps"],  # training_step calls before the error
                    "world_size_env": os.environ.get("WORLD_SIZE"),
                    "process_group": torch.distributed.is_initialized(),
                }
            )
        )
        raise
    result = {
        "rank": rank,
        "world_size": args.world_size,
        "start": start,
        "final": {name: digest(p) for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "global_step": trainer.state.global_step,
        "parallel_mode": str(args.parallel_mode.value),
        "wrapped": seen["wrapped"],
        "first_batch": seen["first_batch"],
        "training_steps": seen["steps"],
        "restored": seen["restored"],
    }
    if options.scenario in MULTI_NODE_SCENARIOS:
        result["node"] = {
            key: os.environ.get(key) for key in ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        }
        result["initial_lr"] = {g["group_name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    if cached:
        from safetensors.torch import save_file

        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(out / f"rank{rank}.safetensors"))
        result["trainable_file"] = f"rank{rank}.safetensors"
    if cache is not None:
        result["cache"] = {"stats": dict(cache.stats), "frozen_blocks": cache.frozen_blocks}
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(out / f"rank{rank}.json")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown: there, freeing DDP's reducer destroys the gloo process group, whose
    # destructor (holding the GIL) joins a gloo thread that waits for the GIL to free the barrier's work: seen
    # to hang a rank for good after it wrote its results. The results are written; nothing is left to clean.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
