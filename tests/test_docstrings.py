"""The examples in the docstrings of the public modules run and give the output they show.

Add a module to `MODULES` to have its docstring examples checked.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tl_plugin.discovery",
    "tl_plugin.freezing",
    "tl_plugin.config",
    "tl_plugin.transfer",
    "tl_plugin.optim",
    "tl_plugin.trainer",
    "tl_plugin.callbacks.base",
    "tl_plugin.callbacks.transfer",
    "tl_plugin.callbacks.schedules",
    "tl_plugin.schedule.format",
    "tl_plugin.callbacks.lr",
    "tl_plugin.app.report",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run_and_match_their_output(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.attempted > 0, f"{module_name} has no docstring example"
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} docstring examples of {module_name} failed"
    )
