"""Every ```python example in docs/ and README.md runs.

The blocks of one page run in order in one namespace, so a page can build on its earlier blocks. Each page starts
from a small prelude that stands in for "your existing script": a tiny BERT ``model``, a ``train_dataset`` /
``eval_dataset`` of random tokens and a ``training_args`` (alias ``args``) writing to a temporary folder. A block
whose first line is ``# doc-test: skip`` is not run (use it only for code that needs hardware or a cluster).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import RandomTokens

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return [b for b in BLOCK.findall(path.read_text()) if not b.lstrip().startswith("# doc-test: skip")]


def prelude(tmp_path: Path) -> dict[str, object]:
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    )
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
    )  # fmt: skip
    return {
        "model": model,
        "train_dataset": RandomTokens(),
        "eval_dataset": RandomTokens(16, seed=1),
        "training_args": training_args,
        "args": training_args,
        "RandomTokens": RandomTokens,
        "__name__": "__docs__",
    }


PAGES = [p for p in DOC_FILES if python_blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_python_example_on_the_page_runs(page: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = prelude(tmp_path)
    for number, block in enumerate(python_blocks(page), start=1):
        try:
            exec(compile(block, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name}, python block {number} failed:\n{block}") from err


def test_docs_have_examples_to_run():
    assert len(PAGES) >= 2, [p.name for p in DOC_FILES]


def test_every_nav_page_exists():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [next(iter(item.values())) for item in nav]
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"


