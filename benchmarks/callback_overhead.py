"""Per-step overhead of the tl_plugin freeze / LR callbacks on a tiny model (not a test).

Runs the same tiny-BERT `Trainer` with and without the callbacks, interleaved, several times, and prints:

- the **attributed per-step overhead**: the time spent inside the tl_plugin callbacks' per-step event handlers (each
  handler is timed; everything but ``on_init_end`` / ``on_train_begin`` / ``on_train_end``, which run once and are
  reported separately) per optimizer step, relative to the median step time;
- the **end-to-end ratio**: median step time with the callbacks / without. Both arms do the same work (the layer-wise
  optimizer in both, and a schedule whose phases all train every group, so that freezing does not make the
  backward pass cheaper); on a busy machine this ratio is noisier than 1%.

    python benchmarks/callback_overhead.py --steps 300 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
)

from tl_plugin.callbacks import FreezeScheduleCallback, LayerwiseLRDecayCallback, TLCallback  # noqa: E402
from tl_plugin.trainer import TransferTrainer  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 99, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (from one ``on_step_begin`` to the next)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def step_times(self, skip: int = 5) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


ONE_OFF_EVENTS = ("on_init_end", "on_train_begin", "on_train_end")


def instrument(callback: TLCallback, totals: dict[str, float]) -> None:
    """Time every ``on_*`` event handler of `callback` (instance attributes shadow the methods), adding to
    ``totals["per_step"]`` or ``totals["one_off"]``."""
    for name in dir(callback):
        if not name.startswith("on_"):
            continue
        handler = getattr(callback, name)
        key = "one_off" if name in ONE_OFF_EVENTS else "per_step"

        @functools.wraps(handler)
        def timed(*args: Any, _handler: Any = handler, _key: str = key, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _handler(*args, **kwargs)
            finally:
                totals[_key] += time.perf_counter() - start

        setattr(callback, name, timed)


def run(steps: int, with_callbacks: bool, threads: int) -> tuple[list[float], dict[str, float]]:
    """One training run; returns the step times and the seconds inside tl_plugin handlers (per step / one-off)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    )
    clock = StepClock()
    totals = {"per_step": 0.0, "one_off": 0.0}
    callbacks: list[TrainerCallback] = []
    if with_callbacks:
        third = steps // 3
        schedule = FreezeScheduleCallback(
            {
                "phases": [
                    {"train": ["all"], "until_step": third},
                    {"train": ["all"], "until_step": 2 * third},
                    {"train": ["all"], "warm_restart": True},
                ]
            }
        )
        callbacks = [schedule, LayerwiseLRDecayCallback(0.8)]
        for callback in callbacks:
            assert isinstance(callback, TLCallback)
            instrument(callback, totals)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3, warmup_steps=10,
            report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**9, seed=0,
        )  # fmt: skip
        trainer = TransferTrainer(
            model=model,
            args=args,
            train_dataset=RandomTokens(16 * steps),
            callbacks=[*callbacks, clock],
            lr_decay=0.8,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    totals["per_step"] /= steps
    return clock.step_times(), totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()

    run(20, True, options.threads)  # warm-up (imports, allocator)
    medians: dict[bool, list[float]] = {False: [], True: []}
    per_step: list[float] = []
    one_off: list[float] = []
    for repeat in range(options.repeats):
        for with_callbacks in (False, True) if repeat % 2 == 0 else (True, False):
            times, totals = run(options.steps, with_callbacks, options.threads)
            medians[with_callbacks].append(statistics.median(times))
            if with_callbacks:
                per_step.append(totals["per_step"] / statistics.median(times))
                one_off.append(totals["one_off"])
    base, with_cb = statistics.median(medians[False]), statistics.median(medians[True])
    print(
        f"tiny BERT (4 blocks, hidden 32), batch 16 x 16 tokens, {options.steps} steps x {options.repeats} repeats"
    )
    print(f"median step time without callbacks: {base * 1e3:.3f} ms")
    print(f"median step time with callbacks:    {with_cb * 1e3:.3f} ms")
    print(f"end-to-end ratio (with / without):  {with_cb / base:.4f}")
    print(
        f"attributed per-step overhead (tl_plugin handlers / step time): median {100 * statistics.median(per_step):.4f}%"
        f", max {100 * max(per_step):.4f}%"
    )
    print(
        f"one-off cost (on_init_end + on_train_begin + on_train_end): median {1e3 * statistics.median(one_off):.1f} ms"
    )


if __name__ == "__main__":
    main()
