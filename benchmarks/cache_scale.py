"""How the activation cache scales: build and one cached epoch, time and peak resident memory, by data size.

    HF_HUB_OFFLINE=1 python benchmarks/cache_scale.py                 # 25k, 50k, 100k, 200k examples
    HF_HUB_OFFLINE=1 python benchmarks/cache_scale.py --quick         # 2k and 4k: a smoke run (under a minute)

Synthetic token data (random ids, 64 tokens per example, no padding) and a small BERT classifier built from its
config (hidden 64, 4 layers, 2 heads): the bottom 3 blocks are frozen and cached on disk (``--dtype``, float16 by
default), the top block and the head train. Each size runs in its own process, one after the other, so that its
peak resident set size (``ru_maxrss``) is its own: the model, the data set, the cache build (rows appended to the
file) and one epoch of cached training steps (rows read back with ``pread``). Each time is measured twice: wall
clock and the process's CPU time (user + system, ``time.process_time``), which other jobs on a shared machine
change much less than the wall clock; reading the rows back from the page cache counts in both. The targets of issue #13.4: time
per example within 20 % across sizes (build and epoch linear in N), peak RSS under 2 GB at every size.

Writes ``benchmarks/results/cache_scale.json`` and prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "cache_scale.json"
SEQ_LEN = 64
VOCAB = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--quick", action="store_true", help="sizes 2000 and 4000 (a smoke run)")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [2_000, 4_000]
    for size in args.sizes:
        if size < args.batch_size:
            parser.error(f"--sizes must be at least --batch_size ({args.batch_size}), got {size}.")
    return args


class SyntheticTokens:
    """`n` examples of `SEQ_LEN` random token ids (seeded) with a 0/1 label: a map-style dataset."""

    def __init__(self, n: int, seed: int = 0) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.ids = rng.integers(5, VOCAB, size=(n, SEQ_LEN), dtype=np.int64)
        self.labels = (self.ids[:, 1] > VOCAB // 2).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "label": int(self.labels[i])}


def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np
    import torch

    batch = {"input_ids": torch.from_numpy(np.stack([f["input_ids"] for f in features]))}
    if "label" in features[0]:
        batch["labels"] = torch.tensor([f["label"] for f in features])
    return batch


def child(size: int, args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """One size, in this process: build, then one cached epoch."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tl_plugin import freeze_bottom_blocks
    from tl_plugin.prefix import ActivationCache

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=SEQ_LEN,
        )
    )
    freeze_bottom_blocks(model, 3)
    data = SyntheticTokens(size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu_started = time.perf_counter(), time.process_time()
    cache = ActivationCache(
        model, data_collator=collate, cache_dir=cache_dir, dtype=args.dtype, max_bytes=64 * 1024**3
    )
    rows = cache.prepare(data, name="train")
    build, build_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, size, args.batch_size):
        batch = cache.data_collator([rows[i] for i in order[start : start + args.batch_size]])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    epoch, epoch_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stats = dict(cache.stats)
    nbytes = cache.nbytes
    cache.detach()
    return {
        "examples": size,
        "build_s": round(build, 2),
        "epoch_s": round(epoch, 2),
        "build_us_per_example": round(1e6 * build / size, 1),
        "epoch_us_per_example": round(1e6 * epoch / size, 1),
        "build_cpu_us_per_example": round(1e6 * build_cpu / size, 1),
        "epoch_cpu_us_per_example": round(1e6 * epoch_cpu / size, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_cache_mb": round(rss_before / 1024, 1),
        "stored_mb": round(nbytes / 1024**2, 1),
        "cached_batches": stats["cached_batches"],
        "uncached_batches": stats["uncached_batches"],
    }


def _spread(values: list[float]) -> float:
    """The largest over the smallest, minus 1 (0.2: the slowest size took 20 % longer per example)."""
    return round(max(values) / min(values) - 1, 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args, args.cache_dir)))
        return {}
    results = []
    with tempfile.TemporaryDirectory(prefix="tl-cache-scale-") as tmp:
        root = args.cache_dir or Path(tmp)
        for size in args.sizes:
            command = [
                sys.executable,
                __file__,
                "--child",
                str(size),
                "--dtype",
                args.dtype,
                "--batch_size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--cache_dir",
                str(root / f"n{size}"),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"size {size} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps(result), flush=True)
    per_build = [r["build_us_per_example"] for r in results]
    per_epoch = [r["epoch_us_per_example"] for r in results]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average": os.getloadavg(),
        },  # fmt: skip
        "dtype": args.dtype,
        "sequence_length": SEQ_LEN,
        "results": results,
        "build_spread": _spread(per_build),
        "epoch_spread": _spread(per_epoch),
        "build_cpu_spread": _spread([r["build_cpu_us_per_example"] for r in results]),
        "epoch_cpu_spread": _spread([r["epoch_cpu_us_per_example"] for r in results]),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(
        "\n| examples | build (s) | build µs/ex (wall / CPU) | cached epoch (s) | epoch µs/ex (wall / CPU) "
        "| peak RSS (MB) | stored (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['examples']:,} | {r['build_s']} | {r['build_us_per_example']} / {r['build_cpu_us_per_example']} "
            f"| {r['epoch_s']} | {r['epoch_us_per_example']} / {r['epoch_cpu_us_per_example']} | {r['peak_rss_mb']} "
            f"| {r['stored_mb']} |"
        )
    print(
        f"\ntime per example spread (max/min - 1), wall: build {100 * report['build_spread']:.0f} %, epoch "
        f"{100 * report['epoch_spread']:.0f} %; CPU: build {100 * report['build_cpu_spread']:.0f} %, epoch "
        f"{100 * report['epoch_cpu_spread']:.0f} % (target <= 20 %); peak RSS {report['max_peak_rss_mb']} MB "
        "(target < 2048); load average at the end "
        + " ".join(f"{x:.1f}" for x in report["machine"]["load_average"])
    )
    return report


if __name__ == "__main__":
    main()
