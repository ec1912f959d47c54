"""The frozen-prefix activation cache and the no-grad prefix (tl_plugin.cache, tl_plugin.perf), tiny models.

Cached training must give the same losses and final weights as uncached training when dropout in the frozen
prefix is off; the cache must be rebuilt when the freeze boundary moves, the data or the prefix weights
change; it must respect its size bound; concurrent processes sharing a cache directory must build one file.
"""

from __future__ import annotations

import contextlib
import doctest
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import tl_plugin.prefix.cache as cache_module  # noqa: E402
import tl_plugin.prefix.no_grad as perf_module  # noqa: E402
from tl_plugin import freeze_all_but, freeze_bottom_blocks, unfreeze  # noqa: E402
from tl_plugin.cache import (  # noqa: E402
    ActivationCache,
    ActivationCacheError,
    CacheTooLargeError,
    prepare_cached_training,
)
from tl_plugin.last_block import FirstTokenLastBlock  # noqa: E402
from tl_plugin.perf import (  # noqa: E402
    FrozenPrefixNoGrad,
    UnsupportedPrefixError,
    find_frozen_prefix,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from instruments import EncoderFlops, optimizer_state_bytes  # noqa: E402  (benchmarks/instruments.py)

from tl_plugin.testing import pad_collate  # noqa: E402

VOCAB = 64


def tiny_bert(dropout: float = 0.0, layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[call-arg]  # num_labels is a PretrainedConfig keyword
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def make_rows(n: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(4, 13))
        ids = [2] + rng.integers(5, VOCAB, size=length - 2).tolist() + [3]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "label": int(sum(ids) % 2)})
    return rows


def make_dataset(n: int = 48, seed: int = 0) -> Any:
    rows = make_rows(n, seed)
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def training_args(tmp_path: Path, epochs: int = 2, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": epochs,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "use_cpu": True,
    }
    values.update(overrides)
    return TrainingArguments(**values)


class LossRecorder:
    """Records the training loss of every forward (a forward hook on the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.losses: list[float] = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and getattr(output, "loss", None) is not None:
            self.losses.append(output.loss.item())


class UnfreezeAtEpoch(TrainerCallback):
    """A tiny gradual-unfreezing schedule: unfreeze `selector` when epoch `epoch` begins."""

    def __init__(self, epoch: int, selector: str) -> None:
        self.epoch, self.selector = epoch, selector

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if round(state.epoch or 0) == self.epoch:
            unfreeze(model, self.selector)


def like_the_cache(model: nn.Module, last_block: str) -> contextlib.AbstractContextManager[Any]:
    """For an uncached run: compute the last block as a cache with `last_block` does."""
    return FirstTokenLastBlock(model) if last_block == "first_token" else contextlib.nullcontext()


LAST_BLOCKS = pytest.mark.parametrize("last_block", ["full", "first_token"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_run(cached: tuple[list[float], dict], plain: tuple[list[float], dict]) -> None:
    losses_c, weights_c = cached
    losses_p, weights_p = plain
    assert len(losses_c) == len(losses_p) > 0
    np.testing.assert_allclose(losses_c, losses_p, rtol=1e-5, atol=1e-6)
    assert weights_c.keys() == weights_p.keys()
    for name in weights_p:
        torch.testing.assert_close(weights_c[name], weights_p[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ docs
@pytest.mark.parametrize("module", [perf_module, cache_module], ids=["perf", "cache"])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------ correctness
@LAST_BLOCKS
@pytest.mark.parametrize("frozen_blocks", [2, 4], ids=["bottom-half", "linear-probe"])
def test_cached_training_equals_plain_training_with_dropout_off(
    tmp_path: Path, frozen_blocks: int, last_block: str
) -> None:
    data, evaluation = make_dataset(48, seed=0), make_dataset(16, seed=1)

    def run(cached: bool) -> tuple[list[float], dict, dict, Any]:
        model = tiny_bert(dropout=0.0)
        if frozen_blocks == 4:
            freeze_all_but(model, ["head"])  # linear probe: the pooler is frozen too
        else:
            freeze_bottom_blocks(model, frozen_blocks)
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        recorder = LossRecorder(model)
        cache = None
        if cached:
            prepared = prepare_cached_training(
                model,
                data,
                evaluation,
                data_collator=pad_collate,
                cache_dir=tmp_path / "cache",
                last_block=last_block,
            )
            trainer = Trainer(args=training_args(tmp_path), **prepared.trainer_kwargs())
            cache = prepared.cache
            trainer.train()
            metrics = trainer.evaluate()
        else:  # a plain Trainer: nothing from tl_plugin.perf / tl_plugin.cache
            trainer = Trainer(
                model=model,
                args=training_args(tmp_path),
                train_dataset=data,
                eval_dataset=evaluation,
                data_collator=pad_collate,
            )
            pruned = last_block == "first_token" and frozen_blocks < 4  # a frozen last block runs in full
            with like_the_cache(model, "first_token" if pruned else "full"):
                trainer.train()
                metrics = trainer.evaluate()
        for name, value in frozen_before.items():
            assert torch.equal(dict(model.named_parameters())[name], value), f"frozen {name} changed"
        return recorder.losses, trainable_state(model), metrics, cache

    losses_c, weights_c, metrics_c, cache = run(cached=True)
    losses_p, weights_p, metrics_p, _ = run(cached=False)
    assert_same_run((losses_c, weights_c), (losses_p, weights_p))
    assert metrics_c["eval_loss"] == pytest.approx(metrics_p["eval_loss"], rel=1e-5)
    assert cache.frozen_blocks == frozen_blocks
    assert cache.stats["cached_batches"] == len(losses_c) + 1  # every training step and the eval batch
    assert cache.stats["uncached_batches"] == 0


@LAST_BLOCKS
def test_cache_equals_uncached_prefix_in_eval_mode_with_dropout_on_above(
    tmp_path: Path, last_block: str
) -> None:
    """With dropout on, prefix_dropout='off' means: prefix in eval mode, cached or not; the rest as usual."""
    data = make_dataset(32)

    def run(cached: bool) -> tuple[list[float], dict]:
        model = tiny_bert(dropout=0.2)
        freeze_bottom_blocks(model, 2)
        recorder = LossRecorder(model)
        if cached:
            prepared = prepare_cached_training(
                model, data, data_collator=pad_collate, storage="memory", last_block=last_block
            )
            Trainer(args=training_args(tmp_path), **prepared.trainer_kwargs()).train()
        else:
            with like_the_cache(model, last_block), FrozenPrefixNoGrad(model, prefix_dropout="off"):
                Trainer(
                    model=model, args=training_args(tmp_path), train_dataset=data, data_collator=pad_collate
                ).train()
        return recorder.losses, trainable_state(model)

    assert_same_run(run(cached=True), run(cached=False))
    model = tiny_bert(dropout=0.2)
    freeze_bottom_blocks(model, 2)
    with pytest.raises(ValueError, match="prefix_dropout='forbid'.*Dropout p=0.2"):
        ActivationCache(model, data_collator=pad_collate, prefix_dropout="forbid").prepare(data)


# ------------------------------------------------------------------------------------------- invalidation
@LAST_BLOCKS
def test_moving_the_boundary_rebuilds_the_cache_and_training_still_matches(
    tmp_path: Path, last_block: str
) -> None:
    data = make_dataset(32)

    def run(cached: bool) -> tuple[list[float], dict, Any]:
        model = tiny_bert(dropout=0.0)
        freeze_bottom_blocks(model, 2)
        recorder = LossRecorder(model)
        # The optimizer holds every parameter, so that unfreezing trains them.
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        schedule = UnfreezeAtEpoch(1, "blocks.1")
        cache = None
        if cached:
            prepared = prepare_cached_training(
                model, data, data_collator=pad_collate, cache_dir=tmp_path / "cache", last_block=last_block
            )
            cache = prepared.cache
            kwargs = prepared.trainer_kwargs()
            kwargs["callbacks"] = [schedule, *kwargs["callbacks"]]  # the cache callback after the schedule
            Trainer(args=training_args(tmp_path), optimizers=(optimizer, None), **kwargs).train()
        else:
            with like_the_cache(model, last_block):
                Trainer(
                    model=model,
                    args=training_args(tmp_path),
                    train_dataset=data,
                    data_collator=pad_collate,
                    callbacks=[schedule],
                    optimizers=(optimizer, None),
                ).train()
        return recorder.losses, trainable_state(model), cache

    losses_c, weights_c, cache = run(cached=True)
    losses_p, weights_p, _ = run(cached=False)
    assert "bert.encoder.layer.1.output.dense.weight" in weights_c  # block 1 trained in epoch 2
    assert_same_run((losses_c, weights_c), (losses_p, weights_p))
    assert cache.frozen_blocks == 1
    assert cache.stats["boundary_changes"] == 1
    assert cache.stats["builds"] == 2  # one per boundary
    assert cache.stats["uncached_batches"] == 0


def test_moved_boundary_without_the_callback_runs_uncached_and_trains_the_unfrozen_block() -> None:
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    cache = ActivationCache(model, data_collator=pad_collate, storage="memory")
    data = cache.prepare(make_dataset(16))
    batch = cache.data_collator([data[i] for i in range(8)])
    unfreeze(model, "blocks.1")  # a freeze schedule moved the boundary; nobody called refresh()
    loss = model(**batch).loss
    loss.backward()
    assert cache.stats["uncached_batches"] == 1
    assert cache.stats["cached_batches"] == 0
    layers: Any = model.bert.encoder.layer
    assert layers[1].output.dense.weight.grad is not None
    assert layers[0].output.dense.weight.grad is None
    plain = {k: v for k, v in batch.items() if k != "tl_cache_id"}
    cache.detach()
    assert model(**plain).loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_data_changes_and_weight_changes_invalidate_the_cache(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    data = make_dataset(24)
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)

    def fresh_cache() -> ActivationCache:
        return ActivationCache(model, data_collator=pad_collate, cache_dir=directory)

    first = fresh_cache()
    first.prepare(data)
    assert (first.stats["builds"], first.stats["loads"]) == (1, 0)
    first.detach()

    second = fresh_cache()  # same weights, data, boundary: the file is reused
    second.prepare(data)
    assert (second.stats["builds"], second.stats["loads"]) == (0, 1)
    # Same data with different labels (not a model input): still the same activations.
    second.prepare(data.map(lambda row: {"label": 1 - row["label"]}))
    assert (second.stats["builds"], second.stats["loads"]) == (0, 2)
    # One token changed: a new key, a new build.
    changed = data.map(
        lambda row, i: {"input_ids": [2, 7] + row["input_ids"][2:]} if i == 5 else {}, with_indices=True
    )
    second.prepare(changed)
    assert second.stats["builds"] == 1
    assert len([p for p in directory.iterdir() if p.is_dir()]) == 2
    second.detach()

    # Rows edited after prepare() are caught at lookup, not silently given stale activations.
    third = fresh_cache()
    rows = third.prepare(data)
    edited = rows.map(
        lambda row, i: {"input_ids": [2, 9] + row["input_ids"][2:]} if i == 3 else {}, with_indices=True
    )
    with pytest.raises(ActivationCacheError, match=r"Examples \[3\].*changed after `prepare\(\)`"):
        model(**third.data_collator([edited[i] for i in range(4)]))
    # New prefix weights (e.g. a resumed checkpoint) are detected by refresh(check_weights=True).
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[5] += 1.0
    assert third.refresh() is False
    assert third.refresh(check_weights=True) is True
    assert third.stats["builds"] == 1
    third.detach()


def test_prefix_weights_changed_without_a_refresh_run_uncached_not_stale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """E.g. DDP broadcasting rank 0's weights after each rank prepared its own cache, with no cache callback."""
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    cache = ActivationCache(model, data_collator=pad_collate, storage="memory")
    rows = cache.prepare(make_dataset(16))
    batch = cache.data_collator([rows[i] for i in range(8)])
    plain = {k: v for k, v in batch.items() if k != "tl_cache_id"}
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(1.5)  # behind the cache's back
    model.eval()
    with caplog.at_level(logging.WARNING, logger="tl_plugin.cache"):
        logits = model(**batch).logits
    assert "weights changed after the activation cache was built" in caplog.text
    assert (cache.stats["cached_batches"], cache.stats["uncached_batches"]) == (0, 1)
    cache.detach()
    expected = model(**plain).logits  # the whole model, new weights
    torch.testing.assert_close(logits, expected)

    cache = ActivationCache(model, data_collator=pad_collate, storage="memory")
    rows = cache.prepare(make_dataset(16))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(2.0)
    assert cache.refresh(check_weights=True) is True  # what cache.callback() does at train begin
    model(**cache.data_collator([rows[i] for i in range(8)]))
    assert cache.stats["builds"] == 2
    assert (cache.stats["cached_batches"], cache.stats["uncached_batches"]) == (1, 0)
    # Weights changed between two prepare() calls: the dataset stored first is rebuilt with the second.
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(0.5)
    other = cache.prepare(make_dataset(8, seed=3), name="other")
    assert cache.stats["builds"] == 4  # "other", and the first dataset again
    batch = cache.data_collator([rows[i] for i in range(8)])
    logits = model(**batch).logits
    assert (cache.stats["cached_batches"], cache.stats["uncached_batches"]) == (2, 0)
    cache.detach()
    torch.testing.assert_close(logits, model(**{k: v for k, v in batch.items() if k != "tl_cache_id"}).logits)
    assert len(other) == 8


@pytest.mark.parametrize("last_block", ["auto", "full"])
def test_a_linear_probe_of_a_first_token_classifier_stores_the_first_position_only(last_block: str) -> None:
    """Every block frozen and a head that reads position 0: one position per example is all the cache needs
    (with last_block="full", every position); unfreezing the last block (LP-FT) stores every position again."""
    model = tiny_bert().eval()
    freeze_all_but(model, ["head"])
    cache = ActivationCache(model, data_collator=pad_collate, storage="memory", last_block=last_block)
    data = make_dataset(16)
    rows = cache.prepare(data)
    longest = max(len(ids) for ids in data["input_ids"])
    positions = 1 if last_block == "auto" else longest
    assert cache.nbytes == 16 * positions * 32 * 4  # examples x positions x hidden x float32
    batch = cache.data_collator([rows[i] for i in range(8)])
    plain = {k: v for k, v in batch.items() if k != "tl_cache_id"}
    logits = model(**batch).logits
    assert cache.stats["cached_batches"] == 1
    unfreeze(model, "blocks.3")  # the fine-tuning phase of LP-FT: the last block trains again
    assert cache.refresh() is True
    assert cache.nbytes == 16 * longest * 32 * 4
    after = model(**batch).logits
    assert cache.stats["cached_batches"] == 2
    cache.detach()
    torch.testing.assert_close(logits, model(**plain).logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, model(**plain).logits, rtol=1e-5, atol=1e-6)


def no_mask_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = pad_collate(features)
    del batch["attention_mask"]
    return batch


def test_a_corrupt_file_is_rebuilt_and_a_batch_dependent_prefix_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_dataset(24)
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    first = ActivationCache(model, data_collator=pad_collate, cache_dir=tmp_path)
    first.prepare(data)
    first.detach()
    stored = np.load(next(p for p in tmp_path.iterdir() if p.is_dir()) / "activations.npy", mmap_mode="r+")
    stored[0] += 1.0  # a damaged file (same name, wrong content)
    stored.flush()
    del stored
    second = ActivationCache(model, data_collator=pad_collate, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="tl_plugin.cache"):
        rows = second.prepare(data)
    assert "differ from a fresh computation" in caplog.text
    assert (second.stats["loads"], second.stats["builds"]) == (1, 1)
    batch = second.data_collator([rows[i] for i in range(4)])
    cached = model.eval()(**batch).logits
    second.detach()
    del batch["tl_cache_id"]
    torch.testing.assert_close(model(**batch).logits, cached)

    # Padding without an attention mask changes every position: the activations depend on the batch.
    with pytest.raises(ActivationCacheError, match="depend on how the examples are batched.*attention_mask"):
        ActivationCache(model, data_collator=no_mask_collate, storage="memory").prepare(data)
    assert "forward" not in model.__dict__  # a failed prepare() leaves the model untouched


def test_nothing_frozen_means_nothing_cached_and_other_columns_never_reach_the_collator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def strict_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        assert "text" not in features[0], "the Trainer would have dropped this column"
        return pad_collate(features)

    model = tiny_bert()
    data = make_dataset(16).add_column("text", ["a review"] * 16)
    cache = ActivationCache(model, data_collator=strict_collate, storage="memory")
    with caplog.at_level(logging.WARNING, logger="tl_plugin.cache"):
        cache.prepare(data)
    assert "no frozen prefix to cache" in caplog.text
    assert cache.frozen_blocks is None
    freeze_bottom_blocks(model, 2)  # e.g. a freeze schedule's first phase
    assert cache.refresh() is True
    assert cache.frozen_blocks == 2
    assert cache.stats["builds"] == 1
    cache.detach()


# ------------------------------------------------------------------------------------------------ bounds
def test_size_bound_raises_or_falls_back_to_uncached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_dataset(16)
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    strict = ActivationCache(model, data_collator=pad_collate, cache_dir=tmp_path, max_bytes=1000)
    with pytest.raises(CacheTooLargeError, match=r"16 examples x \[12, 32\] x 4 B.*exceed max_bytes=1000"):
        strict.prepare(data, name="train")
    strict.detach()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-written left behind

    loose = ActivationCache(
        model, data_collator=pad_collate, storage="memory", max_bytes=1000, on_too_large="uncached"
    )
    with caplog.at_level(logging.WARNING, logger="tl_plugin.cache"):
        rows = loose.prepare(data, name="train")
    assert "without the activation cache" in caplog.text
    assert loose.nbytes == 0
    batch = loose.data_collator([rows[i] for i in range(8)])
    model(**batch).loss.backward()
    assert loose.stats["uncached_batches"] == 1

    # float16 storage halves the bytes.
    half = ActivationCache(tiny_bert(), data_collator=pad_collate, storage="memory", dtype="float16")
    freeze_bottom_blocks(half.model, 2)
    half.prepare(data)
    assert half.nbytes == 16 * 12 * 32 * 2


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    import tl_plugin.cache as c
    from tl_plugin import freeze_bottom_blocks

    def pad(features):
        n = max(len(f["input_ids"]) for f in features)
        return {
            "input_ids": torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features]
            ),
        }

    build = c.ActivationCache._build
    def slow_build(self, *args, **kwargs):  # long enough for the other process to find the lock taken
        time.sleep(1.0)
        return build(self, *args, **kwargs)
    c.ActivationCache._build = slow_build
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37
        )
    )
    freeze_bottom_blocks(model, 2)
    rows = [{"input_ids": [2] + [5 + (i * 7 + j) % 50 for j in range(2 + i % 6)] + [3]} for i in range(24)]
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.01)
    cache = c.ActivationCache(model, data_collator=pad, cache_dir=sys.argv[1])
    cache.prepare(rows)
    print(json.dumps(cache.stats))
    """
)


def test_concurrent_processes_build_one_file_and_share_it(tmp_path: Path) -> None:
    """Like Ray Tune trials with the same boundary and a shared cache_dir: one builds, the other loads."""
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "shared"), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        assert all(proc.poll() is None for proc in procs), procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    go.touch()  # both start building at the same moment
    stats = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        stats.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((s["builds"], s["loads"]) for s in stats) == [(0, 1), (1, 0)]
    entries = list((tmp_path / "shared").iterdir())
    assert len([p for p in entries if p.is_dir()]) == 1
    assert not any(p.name.startswith(".tmp") for p in entries)
    directory = next(p for p in entries if p.is_dir())
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["examples"] == 24
    assert meta["frozen_blocks"] == 2
    assert np.load(directory / "activations.npy", mmap_mode="r").shape[:1] == (24,)


def test_a_writer_that_loses_the_rename_race_uses_the_winners_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a working file lock (some network filesystems) the atomic rename still keeps one good file."""
    import contextlib

    import filelock

    data = make_dataset(16)
    model = tiny_bert()
    freeze_bottom_blocks(model, 2)
    winner = ActivationCache(model, data_collator=pad_collate, cache_dir=tmp_path / "winner")
    winner.prepare(data)
    winner_dir = next(p for p in (tmp_path / "winner").iterdir() if p.is_dir())
    winner.detach()

    monkeypatch.setattr(filelock, "FileLock", lambda *args, **kwargs: contextlib.nullcontext())
    real_rename = os.rename

    def rename_after_the_other_writer(src: Any, dst: Any) -> None:
        if not Path(dst).exists():  # the other process finishes first, between our build and our rename
            real_rename(winner_dir, dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_the_other_writer)
    loser = ActivationCache(model, data_collator=pad_collate, cache_dir=tmp_path / "shared")
    rows = loser.prepare(data)
    assert loser.stats["builds"] == 1
    assert loser.nbytes > 0
    entries = list((tmp_path / "shared").iterdir())
    assert [p.is_dir() for p in entries].count(True) == 1
    assert not any(p.name.startswith(".tmp") for p in entries)
    model(**loser.data_collator([rows[i] for i in range(4)]))
    assert loser.stats["cached_batches"] == 1
    loser.detach()


@pytest.mark.ray
def test_ray_tune_trials_with_the_same_boundary_share_one_cache(tmp_path: Path) -> None:
    """A real local Ray: three trials, two with 2 frozen blocks (one build, one load), one with 1."""
    pytest.importorskip("ray")
    from ray import tune

    from tl_plugin.tune import ray_session

    def trial(config: dict[str, Any]) -> None:
        import torch
        from ray import tune as ray_tune
        from transformers import BertConfig, BertForSequenceClassification

        from tl_plugin import freeze_bottom_blocks
        from tl_plugin.cache import ActivationCache

        def pad(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            n = max(len(f["input_ids"]) for f in features)
            ids = [f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features]
            mask = [[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

        torch.manual_seed(0)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=37,
            )
        )
        freeze_bottom_blocks(model, config["frozen"])
        rows = [
            {"input_ids": [2] + [5 + (i * 7 + j) % 50 for j in range(2 + i % 6)] + [3]} for i in range(24)
        ]
        cache = ActivationCache(model, data_collator=pad, cache_dir=config["cache_dir"])
        cache.prepare(rows)
        ray_tune.report(
            {"builds": cache.stats["builds"], "loads": cache.stats["loads"], "blocks": cache.frozen_blocks}
        )

    shared = str(tmp_path / "shared-cache")
    space = {
        "frozen": tune.grid_search([2, 2, 1]),  # e.g. a learning-rate search over two freeze boundaries
        "lr": tune.grid_search([1e-3]),
        "cache_dir": shared,
    }
    with ray_session(num_cpus=2, log_to_driver=False):
        results = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1}),
            param_space=space,
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray_results"), verbose=0),
        ).fit()
    trials = [results[i] for i in range(len(results))]
    assert all(r.error is None for r in trials), [r.error for r in trials]
    metrics = [r.metrics or {} for r in trials]
    by_blocks: dict[int, list[tuple[int, int]]] = {}
    for m in metrics:
        by_blocks.setdefault(m["blocks"], []).append((m["builds"], m["loads"]))
    assert sorted(by_blocks[2]) == [(0, 1), (1, 0)]  # one trial built the file, the other loaded it
    assert by_blocks[1] == [(1, 0)]
    assert len([p for p in Path(shared).iterdir() if p.is_dir()]) == 2


def tiny_classifier(name: str) -> nn.Module:
    """A tiny sequence classifier of another architecture, all dropout off."""
    no_dropout = {
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "seq_classif_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
    }
    base = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37}
    specs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {"pad_token_id": 1}),
        "distilbert": (
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            {"dim": 32, "n_layers": 3, "n_heads": 2, "hidden_dim": 37},
        ),
        "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}),
        "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", {}),
        "gpt2": (
            "GPT2Config",
            "GPT2ForSequenceClassification",
            {
                "n_embd": 32,
                "n_layer": 3,
                "n_head": 2,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 1,
            },
        ),
        "llama": (
            "LlamaConfig",
            "LlamaForSequenceClassification",
            {"num_key_value_heads": 2, "pad_token_id": 0},
        ),
        "albert": ("AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 16}),
    }
    config_name, model_name, extra = specs[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=VOCAB, **{**base, **no_dropout, **extra})
    return getattr(transformers, model_name)(config)


@pytest.mark.parametrize("name", ["roberta", "distilbert", "electra", "deberta-v2", "gpt2", "llama"])
def test_other_architectures_train_the_same_cached_or_not(name: str) -> None:
    model = tiny_classifier(name)
    freeze_bottom_blocks(model, 2)
    cache = ActivationCache(model, data_collator=pad_collate, storage="memory")
    rows = cache.prepare(make_rows(20))
    batch = cache.data_collator([rows[i] for i in (3, 7, 11, 0)])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cache.detach()
    del batch["tl_cache_id"]
    with FrozenPrefixNoGrad(model):
        plain_loss = model(**batch).loss
        plain_loss.backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert cache.stats["cached_batches"] == 1
    assert plain_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert cached.keys() == plain.keys()
    for key, grad in plain.items():
        torch.testing.assert_close(cached[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_albert_shared_layers_are_refused() -> None:
    model = tiny_classifier(
        "albert"
    )  # one layer group, run num_hidden_layers times: no block boundary to cut
    freeze_bottom_blocks(model, 1)
    with pytest.raises(
        UnsupportedPrefixError, match="AlbertForSequenceClassification.*changes the model's outputs"
    ):
        ActivationCache(model, data_collator=pad_collate, storage="memory").prepare(make_rows(8))


# ------------------------------------------------------------------------------------------------ the split
class ResidualToHead(nn.Module):
    """Uses the embeddings output twice (in the head too): a prefix the cache cannot replace."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> Any:
        x = self.embeddings(input_ids)
        h = x
        for layer in self.layers:
            h = torch.relu(layer(h))
        logits = self.head((h + x).mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


class HeadScaledEmbeddings(ResidualToHead):
    """Its embeddings are scaled by a trainable parameter of the head: the frozen prefix depends on it."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> Any:
        h = self.embeddings(input_ids) * self.head.bias.sum()
        for layer in self.layers:
            h = torch.relu(layer(h))
        logits = self.head(h.mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


def test_unsupported_models_fail_loudly() -> None:
    data = make_rows(8)
    model = ResidualToHead()
    freeze_bottom_blocks(model, 2)
    with pytest.raises(UnsupportedPrefixError, match="changes the model's outputs.*Supported: BERT-family"):
        ActivationCache(model, data_collator=pad_collate, storage="memory").prepare(data)

    model = HeadScaledEmbeddings()
    freeze_bottom_blocks(model, 2)
    with pytest.raises(UnsupportedPrefixError, match=r"depends on trainable parameters \['head.bias'\]"):
        ActivationCache(model, data_collator=pad_collate, storage="memory").prepare(data)
    with FrozenPrefixNoGrad(model), pytest.raises(UnsupportedPrefixError, match="head.bias"):
        model(**pad_collate(data[:4]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"storage": "ssd"}, "`storage` must be one of 'disk', 'memory', got 'ssd'"),
        ({"prefix_dropout": "on"}, "`prefix_dropout` must be one of 'off', 'forbid', got 'on'"),
        ({"max_bytes": 0}, "`max_bytes` must be a positive integer, got 0"),
        ({"on_too_large": "skip"}, "`on_too_large` must be one of 'error', 'uncached'"),
        ({"dtype": "int8"}, "`dtype` must be one of 'float32', 'float16', 'bfloat16', got 'int8'"),
    ],
)
def test_invalid_arguments_name_the_argument_and_choices(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationCache(tiny_bert(layers=2), **kwargs)


# ------------------------------------------------------------------------------------------------ no grad
def test_frozen_prefix_runs_without_autograd_in_eval_mode_and_follows_the_boundary() -> None:
    model = tiny_bert(dropout=0.5).train()
    freeze_bottom_blocks(model, 2)
    seen: dict[str, list[tuple[bool, bool, bool]]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, []).append(
                (torch.is_grad_enabled(), module.training, bool(output.requires_grad))
            )

        return hook

    model.bert.embeddings.dropout.register_forward_hook(record("embeddings.dropout"))
    model.bert.encoder.layer[1].output.register_forward_hook(record("layer1"))
    model.bert.encoder.layer[2].output.register_forward_hook(record("layer2"))
    batch = pad_collate(make_rows(4))
    with FrozenPrefixNoGrad(model) as no_grad:
        assert no_grad.frozen_blocks == 2
        for _ in range(2):  # the first training forward checks the prefix with autograd on
            model(**batch).loss.backward()
        assert seen["embeddings.dropout"][1] == (False, False, False)  # no autograd, eval mode
        assert seen["layer1"][1] == (False, False, False)
        assert seen["layer2"][1] == (True, True, True)  # above the boundary: as usual
        assert model.bert.embeddings.word_embeddings.weight.grad is None
        assert model.bert.encoder.layer[2].output.dense.weight.grad is not None
        unfreeze(model, "blocks.1")
        assert no_grad.frozen_blocks == 1
        model(**batch).loss.backward()
        assert seen["layer1"][-1] == (True, True, True)
        assert model.bert.encoder.layer[1].output.dense.weight.grad is not None
    assert "forward" not in model.__dict__
    assert "forward" not in model.bert.embeddings.__dict__
    with pytest.raises(ValueError, match="prefix_dropout='forbid'.*Dropout p=0.5"):
        FrozenPrefixNoGrad(model, prefix_dropout="forbid")
    prefix = find_frozen_prefix(model)
    assert prefix is not None
    assert prefix.num_blocks == 1


def test_trainer_keeps_optimizer_state_for_trainable_parameters_only(tmp_path: Path) -> None:
    data = make_dataset(16)
    sizes = {}
    for setup in ("full", "head"):
        model = tiny_bert()
        if setup == "head":
            freeze_all_but(model, ["head"])
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, max_steps=1),
            train_dataset=data,
            data_collator=pad_collate,
        )
        trainer.train()
        optimizer = trainer.optimizer
        assert optimizer is not None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sizes[setup] = optimizer_state_bytes(optimizer)
        held = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        assert held == trainable
        assert sizes[setup] == 2 * 4 * trainable + 4 * len(optimizer.state)  # AdamW: 2 moments + step
        if setup == "head":
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert sizes["head"] / sizes["full"] < 0.01


def test_flop_model_gives_the_ideal_ratios() -> None:
    flops = EncoderFlops.from_config(tiny_bert(layers=6).config, seq_len=12)
    assert flops.num_layers == 6
    assert flops.hidden_size == 32
    ratio = flops.training_flops(3) / flops.training_flops(3, cached=True)
    assert 1.3 < ratio < 1.34  # (3 forward + 3 x 3) / (3 x 3), plus the small head
    assert flops.ideal_speedup(6, cached=True) > 100 * flops.ideal_speedup(6, cached=False)
    with pytest.raises(ValueError, match="BERT-family encoder configs"):
        EncoderFlops.from_config(object(), seq_len=8)
