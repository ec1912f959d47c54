"""The last block of a first-token classifier computed at the first position only (tl_plugin.last_block).

It must give the logits, loss and gradients of the full model (every supported layout, both attention
implementations, padded batches), train to the same weights in a real Trainer, run in full whenever a caller
asks for more than the classifier (hidden states, attentions) or the last block is frozen, refuse models it
cannot prune with an error naming the model and the supported ones, and leave the model as it was.
"""

from __future__ import annotations

import contextlib
import doctest
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

import tl_plugin.prefix.last_block as last_block_module  # noqa: E402
from tl_plugin import discover_layer_groups, freeze_all_but, freeze_bottom_blocks, unfreeze  # noqa: E402
from tl_plugin.cache import ActivationCache  # noqa: E402
from tl_plugin.last_block import (  # noqa: E402
    FirstTokenLastBlock,
    UnsupportedLastBlockError,
    first_token_support,
    resolve_last_block,
)
from tl_plugin.perf import FrozenPrefixNoGrad  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from instruments import EncoderFlops  # noqa: E402  (benchmarks/instruments.py)

VOCAB = 64
BASE = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37}
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {"pad_token_id": 1}),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {"dim": 32, "n_layers": 3, "n_heads": 2, "hidden_dim": 37},
    ),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", {"n_embd": 32, "n_layer": 3, "n_head": 2}),
    "bert-tokens": ("BertConfig", "BertForTokenClassification", {}),
}


def tiny(name: str, attn: str = "sdpa", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    config_name, model_name, extra = ARCHITECTURES[name]
    rates = {
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "dropout": dropout,
        "attention_dropout": dropout,
        "seq_classif_dropout": dropout,
    }
    config = getattr(transformers, config_name)(vocab_size=VOCAB, **{**BASE, **rates, **extra})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def padded_batch(seed: int = 0, size: int = 6) -> dict[str, torch.Tensor]:
    """Right-padded token ids of different lengths, with labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 11, size=size)
    ids = torch.zeros(size, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.from_numpy(rng.integers(5, VOCAB, size=length))
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(rng.integers(0, 2, size))}


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ docs
def test_docstring_examples_run() -> None:
    result = doctest.testmod(last_block_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["bert", "roberta", "electra", "distilbert"])
def test_logits_loss_and_gradients_equal_the_full_model(name: str, attn: str) -> None:
    model = tiny(name, attn).eval()
    freeze_bottom_blocks(model, 1)
    batch = padded_batch()
    logits_full, grads_full = loss_and_grads(model, batch)
    with FirstTokenLastBlock(model) as pruned:
        logits, grads = loss_and_grads(model, batch)
    assert pruned.calls == 1
    torch.testing.assert_close(logits, logits_full, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_full.keys()
    for name_ in grads_full:
        torch.testing.assert_close(grads[name_], grads_full[name_], rtol=1e-4, atol=1e-6, msg=name_)


def test_a_trainer_run_ends_at_the_same_weights(tmp_path: Path) -> None:
    """Plain SGD, so that rounding-level differences stay rounding-level (Adam would rescale the zero-mean
    noise of gradients that are exactly zero in exact arithmetic, such as the attention key biases')."""
    rng = np.random.default_rng(0)
    data = []
    for _ in range(32):
        ids = rng.integers(5, VOCAB, size=int(rng.integers(3, 11))).tolist()
        data.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(sum(ids) % 2)})

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        return {
            "input_ids": torch.tensor(
                [f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features]
            ),
            "attention_mask": torch.tensor(
                [f["attention_mask"] + [0] * (length - len(f["input_ids"])) for f in features]
            ),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def run(pruned: bool) -> tuple[list[float], dict[str, torch.Tensor], int]:
        model = tiny("bert", dropout=0.0)
        freeze_bottom_blocks(model, 1)
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"),
            optim="sgd",
            learning_rate=0.5,
            per_device_train_batch_size=8,
            num_train_epochs=2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        patch = FirstTokenLastBlock(model) if pruned else contextlib.nullcontext()
        with patch:
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return losses, weights, getattr(patch, "calls", 0)

    losses_full, weights_full, _ = run(pruned=False)
    losses, weights, calls = run(pruned=True)
    assert calls == 8  # 2 epochs x 4 steps
    np.testing.assert_allclose(losses, losses_full, rtol=1e-5)
    assert losses_full[0] != losses_full[-1]  # it trained
    for name in weights_full:
        torch.testing.assert_close(weights[name], weights_full[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ when it runs
def test_a_frozen_last_block_runs_in_full_until_it_is_unfrozen() -> None:
    model = tiny("bert").eval()
    freeze_all_but(model, ["head"])  # linear probe: the last block is frozen
    batch = padded_batch()
    with FirstTokenLastBlock(model) as pruned:
        assert not pruned.active
        model(**batch)
        assert pruned.calls == 0
        unfreeze(model, "blocks.2")
        assert pruned.active
        model(**batch)
        assert pruned.calls == 1


def test_asking_for_hidden_states_or_attentions_runs_the_last_block_in_full() -> None:
    model = tiny("bert", attn="eager").eval()
    batch = padded_batch()
    full = model(**batch, output_hidden_states=True, output_attentions=True)
    with FirstTokenLastBlock(model) as pruned:
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        assert pruned.calls == 0
        model(**batch)
        assert pruned.calls == 1
    assert out.hidden_states[-1].shape == full.hidden_states[-1].shape == (6, batch["input_ids"].shape[1], 32)
    torch.testing.assert_close(out.attentions[-1], full.attentions[-1])


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "gpt2",
            "GPT2ForSequenceClassification is not a first-token classifier.*BertForSequenceClassification",
        ),
        ("bert-tokens", "BertForTokenClassification is not a first-token classifier"),
    ],
)
def test_models_whose_head_reads_other_positions_are_refused(name: str, match: str) -> None:
    model = tiny(name)
    assert first_token_support(model) is not None
    with pytest.raises(UnsupportedLastBlockError, match=match):
        FirstTokenLastBlock(model)
    with pytest.raises(UnsupportedLastBlockError, match="last_block='first_token' is not possible"):
        resolve_last_block(model, "first_token")
    assert resolve_last_block(model, "auto") is None  # auto: the full block, silently correct
    assert "forward" not in model.get_submodule(model.base_model_prefix).__dict__


def test_a_block_that_computes_something_else_is_refused() -> None:
    model = tiny("bert")
    groups = discover_layer_groups(model)  # before the change: discovery would see two block classes
    block = model.bert.encoder.layer[-1]
    original_class = type(block)

    class ShiftedLayer(original_class):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs) + 0.5

    block.__class__ = ShiftedLayer
    with pytest.raises(UnsupportedLastBlockError, match="differs from the block's own forward by 0.5"):
        FirstTokenLastBlock(model, groups=groups)
    assert "forward" not in block.__dict__


def test_invalid_choice_names_the_argument_and_the_choices() -> None:
    model = tiny("bert")
    message = "`last_block` must be one of 'auto', 'first_token', 'full', got 'first'"
    with pytest.raises(ValueError, match=message):
        resolve_last_block(model, "first")
    with pytest.raises(ValueError, match=message):
        ActivationCache(model, storage="memory", last_block="first")  # type: ignore[arg-type]
    assert "forward" not in model.bert.encoder.layer[-1].__dict__


# ------------------------------------------------------------------------------------------------ with others
def test_the_cache_prunes_by_default_and_detach_restores_every_forward() -> None:
    model = tiny("bert")
    freeze_bottom_blocks(model, 1)
    layers: Any = model.bert.encoder.layer
    cache = ActivationCache(model, storage="memory")
    assert isinstance(cache.last_block, FirstTokenLastBlock)
    assert ActivationCache.__init__.__kwdefaults__["last_block"] == "auto"
    cache.detach()
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert "forward" not in model.__dict__
    full = ActivationCache(model, storage="memory", last_block="full")
    assert full.last_block is None
    full.detach()
    gpt2 = tiny("gpt2")
    freeze_bottom_blocks(gpt2, 1)
    cache = ActivationCache(gpt2, storage="memory")  # auto: not a first-token classifier, full block
    assert cache.last_block is None
    cache.detach()


def test_stacks_with_the_no_grad_prefix_and_unstacks_in_reverse_order() -> None:
    model = tiny("bert").eval()
    freeze_bottom_blocks(model, 1)
    batch = padded_batch()
    logits_full, grads_full = loss_and_grads(model, batch)
    last = model.bert.encoder.layer[-1]
    pruned = FirstTokenLastBlock(model)
    no_grad = FrozenPrefixNoGrad(model)
    logits, grads = loss_and_grads(model, batch)
    assert pruned.calls == 1
    torch.testing.assert_close(logits, logits_full, rtol=1e-5, atol=1e-6)
    for name in grads_full:
        torch.testing.assert_close(grads[name], grads_full[name], rtol=1e-4, atol=1e-6, msg=name)
    no_grad.remove()
    assert last.__dict__["forward"] is pruned._patched  # the no-grad prefix gave the pruned forward back
    pruned.remove()
    assert "forward" not in last.__dict__


def test_flop_model_counts_the_first_token_last_block() -> None:
    flops = EncoderFlops(hidden_size=384, intermediate_size=1536, num_layers=6, seq_len=64)
    pruned = flops.first_token_layer_forward / flops.layer_forward
    assert 0.17 < pruned < 0.18  # all-MiniLM-L6-v2 at 64 tokens
    half_plain = flops.training_flops(3)
    assert half_plain / flops.training_flops(3, cached=True) == pytest.approx(12 / 9, rel=0.01)
    both = half_plain / flops.training_flops(3, cached=True, first_token_last_block=True)
    assert both == pytest.approx(12 / (6 + 3 * pruned), rel=0.01)
    # a frozen last block (linear probe) is not pruned: nothing changes
    assert flops.training_flops(6, first_token_last_block=True) == flops.training_flops(6)
