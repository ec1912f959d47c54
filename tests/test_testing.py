"""`tl_plugin.testing`: the tiny models and data sets every test builds on, defined once."""

from __future__ import annotations

import pytest
import torch

from tl_plugin import testing
from tl_plugin.testing import RandomTokens, run_doctests, save_tiny_bert, tiny_bert


def test_the_module_examples_run():
    result = run_doctests(testing)
    assert result.failed == 0
    assert result.attempted > 0


def test_random_tokens_are_seeded_and_their_labels_follow_the_rule():
    a, b, other = RandomTokens(seed=3), RandomTokens(seed=3), RandomTokens(seed=4)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)  # noqa: PT018
    assert not torch.equal(a.ids, other.ids)
    learnable = RandomTokens(n=64, labels="first_token")
    assert torch.equal(learnable.labels, (learnable.ids[:, 0] > 50).long())
    assert set(learnable.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"labels": "sorted"}, "`labels` must be one of 'random', 'first_token'; got 'sorted'"),
     ({"n": 0}, "`n` must be an integer >= 1, got 0"),
     ({"length": 2.5}, "`length` must be an integer >= 1, got 2.5")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RandomTokens(**kwargs)


def test_a_saved_tiny_bert_loads_with_the_real_tokenizer(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = save_tiny_bert(tmp_path / "bert", num_hidden_layers=3)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 3
    assert model.config.vocab_size == len(tokenizer) > 30000  # the MiniLM vocabulary
    logits = model(**tokenizer(["a fine review"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    assert tiny_bert(num_labels=3).config.num_labels == 3
