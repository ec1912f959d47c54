"""The activation cache streams its rows from disk and can store them in half precision (issue #13.4).

Rows are appended to the file while it is built and read back with ``pread`` when a batch needs them: the file is
never memory-mapped (checked in /proc/self/maps), so resident memory does not grow with the number of examples.
A float16 or bfloat16 store gives the float32 store's logits and gradients within half-precision tolerance, at
half the bytes. (benchmarks/cache_scale.py measures time and peak RSS at 25k-200k examples.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from tl_plugin import freeze_bottom_blocks  # noqa: E402
from tl_plugin.prefix import ActivationCache  # noqa: E402
from tl_plugin.prefix.store import RowFile, decode, encode  # noqa: E402
from tl_plugin.testing import pad_collate as pad  # noqa: E402

VOCAB = 64


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=37,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def rows(n: int) -> Any:
    rng = np.random.default_rng(0)
    ids = [[2] + rng.integers(5, VOCAB, size=int(rng.integers(2, 11))).tolist() + [3] for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "label": [r[1] % 2 for r in ids]}
    )


def cached_logits_and_grads(tmp_path: Path, dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    cache = ActivationCache(
        model, data_collator=pad, cache_dir=tmp_path / dtype, dtype=dtype, last_block="full"
    )
    data = cache.prepare(rows(40))
    batch = cache.data_collator([data[i] for i in (1, 5, 9, 13, 17, 21, 25, 29)])
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert "activations.npy" not in maps, "the activations file is memory-mapped"
    assert isinstance(cache._slots[0].array, RowFile)
    nbytes = cache.nbytes
    stats = dict(cache.stats)
    cache.detach()
    return out.logits.detach(), grads, (nbytes, stats)


def test_rows_stream_from_disk_and_half_precision_matches_float32(tmp_path: Path) -> None:
    logits32, grads32, (bytes32, stats32) = cached_logits_and_grads(tmp_path, "float32")
    assert stats32["cached_batches"] == 1
    for dtype in ("float16", "bfloat16"):
        logits, grads, (nbytes, stats) = cached_logits_and_grads(tmp_path, dtype)
        assert stats["cached_batches"] == 1
        assert nbytes * 2 == bytes32
        torch.testing.assert_close(logits, logits32, rtol=0.05, atol=2e-2, msg=dtype)
        assert grads.keys() == grads32.keys()
        for name, grad in grads32.items():
            torch.testing.assert_close(grads[name], grad, rtol=0.1, atol=5e-3, msg=f"{dtype} {name}")
        assert not torch.equal(logits, logits32)  # really stored in half precision


def test_a_stored_file_is_read_back_row_by_row(tmp_path: Path) -> None:
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    first = ActivationCache(model, data_collator=pad, cache_dir=tmp_path)
    first.prepare(rows(24))
    first.detach()
    path = next(p for p in tmp_path.iterdir() if p.is_dir()) / "activations.npy"
    whole = np.load(path)  # a valid .npy file
    stored = RowFile(path)
    np.testing.assert_array_equal(stored[[3, 0, 17]], whole[[3, 0, 17]])
    assert stored.shape == whole.shape
    assert stored.nbytes == whole.nbytes
    stored.close()
    second = ActivationCache(model, data_collator=pad, cache_dir=tmp_path)
    second.prepare(rows(24))
    assert (second.stats["loads"], second.stats["builds"]) == (1, 0)
    second.detach()


def test_bfloat16_rows_keep_bfloat16_values() -> None:
    values = torch.randn(3, 5, 4) * 100
    stored = encode(values, "bfloat16")
    assert stored.dtype == np.int16
    torch.testing.assert_close(decode(stored, "bfloat16"), values.to(torch.bfloat16), rtol=0, atol=0)
    np.testing.assert_array_equal(encode(values, "float16"), values.numpy().astype(np.float16))


@pytest.mark.slow
def test_the_scale_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    """benchmarks/cache_scale.py --quick (2k and 4k examples, ~1.5 min on a loaded 2-core machine)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/cache_scale.py", "--quick", "--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["examples"] for r in report["results"]] == [2000, 4000]
    for result in report["results"]:
        assert result["cached_batches"] == -(-result["examples"] // 64)
        assert result["uncached_batches"] == 0
        assert result["peak_rss_mb"] < 2048
