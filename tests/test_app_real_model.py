"""README's own-data command on the real model: all-MiniLM-L6-v2 trained through ``--train_file`` on the real
fine-food reviews exported to CSV (``tl-plugin demo-data``) reaches the built-in path's accuracy (>= 0.80).

The command is read from README.md and run as written (in a temporary folder, with this environment's
``tl-plugin``), so the README cannot drift from what is tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model


def readme_own_data_command() -> str:
    (line,) = [
        line for line in (ROOT / "README.md").read_text().splitlines() if "tl-plugin demo-data" in line and "&&" in line
    ]
    return line


def test_readme_own_data_command_reaches_the_builtin_accuracy(tmp_path):
    command = readme_own_data_command()
    tl_plugin = str(Path(sys.executable).parent / "tl-plugin")
    result = subprocess.run(
        ["bash", "-c", re.sub(r"\.venv/bin/tl-plugin", tl_plugin, command) + " --disable_tqdm true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1500, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "my-data" / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["test_examples"]) == (2000, 500)
    assert metrics["labels"] == ["other", "great"]  # --label_order: the ids of the built-in demo
    assert metrics["majority_class_accuracy"] == pytest.approx(0.658)
    assert metrics["test_accuracy"] >= 0.80
    assert (tmp_path / "outputs" / "my-data" / "confusion_matrix.png").is_file()
    assert "test accuracy" in result.stdout
