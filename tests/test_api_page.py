"""docs/api.md names every public name, and the docstrings' Hugging Face style is rewritten so that it renders."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = (ROOT / "docs" / "api.md").read_text()

#: The public modules whose ``__all__`` the API page must cover (tl_plugin.scan: see its own section).
PUBLIC_MODULES = [
    "tl_plugin",
    "tl_plugin.callbacks",
    "tl_plugin.tune",
    "tl_plugin.prefix",
    "tl_plugin.schedule",
    "tl_plugin.checks",
    "tl_plugin.testing",
    "tl_plugin.lr_finder",
    "tl_plugin.trainer",
    "tl_plugin.optim",
    "tl_plugin.losses",
    "tl_plugin.metrics",
    "tl_plugin.training",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_on_the_api_page(module):
    names = importlib.import_module(module).__all__
    missing = [n for n in names if not re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", API_PAGE)]
    assert not missing, f"docs/api.md does not name these names of {module}.__all__: {missing}"
    assert module == "tl_plugin" or module in API_PAGE, f"docs/api.md never names the module {module}"


def _hf_docstrings():
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        return importlib.import_module("hf_docstrings")
    finally:
        sys.path.remove(str(ROOT / "docs" / "hooks"))


def test_hf_style_argument_types_lose_backticks_and_flags():
    rewrite = _hf_docstrings().rewrite
    text = (
        "Record it, see :meth:`ordered` and :func:`torch.no_grad`.\n\n"
        "Args:\n"
        "    every_n_steps (`int`, *optional*, defaults to 1): interval.\n"
        "    blocks (`str` or `list[str]`, *optional*): override,\n"
        "        continued.\n"
        "    shape (`tuple[int, int]`): a pair.\n\n"
        "Returns:\n"
        "    `Path`: the written file.\n\n"
        "Raises:\n"
        "    `LayerDiscoveryError`: when nothing matches.\n"
    )
    out = rewrite(text, lambda name: "tl_plugin.discovery.LayerGroups.ordered" if name == "ordered" else None)
    assert "every_n_steps (int): interval." in out
    assert "blocks (str | list[str]): override," in out
    assert "shape (tuple[int, int]): a pair." in out
    assert "    Path: the written file." in out
    assert "    LayerDiscoveryError: when nothing matches." in out
    assert (
        '<autoref identifier="tl_plugin.discovery.LayerGroups.ordered" optional><code>ordered</code></autoref>'
        in out
    )
    assert "`torch.no_grad`" in out  # not documented here: plain code, no link
    for literal in (":meth:", ":func:", "*optional*"):
        assert literal not in out


def test_mkdocs_loads_the_extension():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    python = next(p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    extensions = python["handlers"]["python"]["options"]["extensions"]
    assert "docs/hooks/hf_docstrings.py:HFDocstrings" in extensions
    assert hasattr(_hf_docstrings(), "HFDocstrings")
