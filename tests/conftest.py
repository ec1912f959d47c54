"""Shared test setup: offline, quiet Hugging Face libraries and a tiny seeded BERT.

The environment variables are set at import time, before any test module imports transformers, so no test can
reach the Hugging Face Hub. The tiny-model matrix for every architecture lives in ``tests/tiny_models.py``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny_bert  # noqa: E402


@pytest.fixture
def tiny_bert():
    """A fresh tiny BERT sequence classifier: hidden 32, 4 layers, 2 heads, intermediate 37, vocab 99, 2 labels."""
    return build_tiny_bert()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (tiny models run faster so, and far faster on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scan_error(capsys):
    """``scan_error(*args)``: run ``tl-plugin scan ARGS``, check it stops with exit code 2 and no traceback, and
    return the last line of its error output (the one-line message)."""
    from tl_plugin.cli import main

    def run(*args: str) -> str:
        code = main(["scan", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert "Traceback" not in err
        return err.splitlines()[-1]

    return run
