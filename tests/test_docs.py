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
DOC_FILES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_BLOCK = re.compile(r"^```bash[^\n]*\n(.*?)^```", re.S | re.M)
#: A page with this marker has its ``tl-plugin`` shell commands run too, after its Python blocks, in the same folder.
RUN_COMMANDS = "<!-- doc-test: run-commands -->"


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


def tl_plugin_commands(path: Path) -> list[list[str]]:
    """The ``tl-plugin`` commands of a page's bash blocks (continuation lines joined), as argument lists."""
    import shlex

    commands = []
    for block in SHELL_BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0].endswith("tl-plugin"):
                commands.append(words[1:])
    return commands


COMMAND_PAGES = [p for p in DOC_FILES if RUN_COMMANDS in p.read_text()]


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=[p.name for p in COMMAND_PAGES])
def test_every_command_on_the_page_runs(page: Path, tmp_path: Path, monkeypatch):
    """The page's Python blocks make its example files; then each ``tl-plugin`` command runs as written."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    namespace = prelude(tmp_path)
    for number, block in enumerate(python_blocks(page), start=1):
        exec(compile(block, f"{page.name}[block {number}]", "exec"), namespace)
    commands = tl_plugin_commands(page)
    assert commands, f"{page.name} is marked to run its commands but has none"
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "tl_plugin.cli", *command], capture_output=True, text=True, timeout=900,
            check=False, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )  # fmt: skip
        assert result.returncode == 0, f"{page.name}: tl-plugin {' '.join(command)}\n{result.stderr[-3000:]}"


def test_docs_have_examples_to_run():
    assert len(PAGES) >= 2, [p.name for p in DOC_FILES]


def test_every_nav_page_exists():
    import yaml

    def pages_of(items: list) -> list[str]:
        found = []
        for item in items:
            value = next(iter(item.values()))
            found += pages_of(value) if isinstance(value, list) else [value]
        return found

    pages = pages_of(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"


