"""README's layer-scan line on the real model and data: ``tl-plugin scan --quick`` scans the bundled all-MiniLM-L6-v2
on 400 bundled fine-food reviews (about a minute on one loaded core) and writes its table, plot, scan.json and a
transfer config that ``tl-plugin train`` reads.

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

from tl_plugin import TransferConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model


def readme_scan_command() -> str:
    (line,) = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(".venv/bin/tl-plugin scan")
    ]
    return line


def test_readme_has_one_scan_line_on_the_bundled_model_and_data():
    assert readme_scan_command() == ".venv/bin/tl-plugin scan --quick --output_dir outputs/scan"


def test_readme_scan_command_scans_every_layer_of_the_bundled_model(tmp_path):
    tl_plugin = str(Path(sys.executable).parent / "tl-plugin")
    result = subprocess.run(
        ["bash", "-c", re.sub(r"^\.venv/bin/tl-plugin", tl_plugin, readme_scan_command())],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "scan"
    saved = json.loads((out / "scan.json").read_text())
    scan = saved["scan"]
    assert [s["layer"] for s in scan["layers"]] == ["embeddings", *[f"blocks.{i}" for i in range(6)]]
    assert (scan["num_examples"], scan["num_classes"], scan["pooling"], scan["notes"]) == (
        400,
        2,
        "pooler",
        [],
    )
    assert scan["majority_accuracy"] == pytest.approx(0.65)
    assert max(s["probe_accuracy"] for s in scan["layers"]) > scan["majority_accuracy"]
    assert (
        TransferConfig.load(out / "transfer_config.yaml").to_dict()
        == saved["recommendation"]["transfer_config"]
    )
    assert (out / "scan.png").read_bytes()[:4] == b"\x89PNG"
    assert "layer        boundary probe acc     LogME" in result.stdout
    assert (
        "train with it: tl-plugin train --transfer_config outputs/scan/transfer_config.yaml" in result.stdout
    )
