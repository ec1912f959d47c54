"""The hook mechanism of tl_plugin.prefix and the plan of the subpackage.

Hooks chain on one instance-level dispatcher per module, run outermost-last-added, come off in any order, and
leave the module exactly as it was (its class forward, or someone else's instance-level forward); keywords a hook
consumes appear in the dispatcher's signature (the Trainer keeps those columns). The layout is derived once per
cache. Inside `tl_plugin.prefix` each module imports only the modules below it (the plan in docs/performance.md).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import tl_plugin.prefix.layout as layout_module  # noqa: E402
from tl_plugin import freeze_bottom_blocks  # noqa: E402
from tl_plugin.prefix import ActivationCache, FirstTokenLastBlock, FrozenPrefixNoGrad  # noqa: E402
from tl_plugin.prefix.hooks import HookSet, ModuleHook, add_hook, hooks_of, remove_hook  # noqa: E402

PREFIX = Path(__file__).resolve().parents[1] / "tl_plugin" / "prefix"


class Tag(ModuleHook):
    """Appends its name to a shared list, then calls the next hook."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.seen.append(self.name)
        return call_next(*args, **kwargs)


class Consume(ModuleHook):
    consumes = ("row_id",)

    def __init__(self) -> None:
        self.got: list[Any] = []

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.got.append(kwargs.pop("row_id", None))
        return call_next(*args, **kwargs)


def tiny_bert(layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )


@pytest.mark.parametrize(
    "name", ["hooks", "layout", "verify", "no_grad", "cache", "last_block", "memo", "options"]
)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"tl_plugin.prefix.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_hooks_chain_outermost_last_and_come_off_in_any_order() -> None:
    layer = nn.Linear(2, 2)
    seen: list[str] = []
    first, second, third = (add_hook(layer, Tag(n, seen)) for n in ("first", "second", "third"))
    dispatcher = layer.__dict__["forward"]
    x = torch.ones(1, 2)
    expected = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert seen == ["third", "second", "first"]
    assert remove_hook(layer, second) is True
    assert remove_hook(layer, second) is False  # already off
    assert layer.__dict__["forward"] is dispatcher  # one dispatcher while any hook is on
    seen.clear()
    layer(x)
    assert seen == ["third", "first"]
    remove_hook(layer, third)
    remove_hook(layer, first)
    assert "forward" not in layer.__dict__
    assert hooks_of(layer) == []
    seen.clear()
    torch.testing.assert_close(layer(x), expected)
    assert seen == []


def test_a_foreign_instance_forward_is_wrapped_and_given_back() -> None:
    layer = nn.Linear(2, 2)

    def foreign(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 2)

    layer.forward = foreign  # someone else's patch, before ours
    seen: list[str] = []
    hooks = HookSet()
    hooks.add(layer, Tag("ours", seen))
    assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))  # we call through to their forward
    assert seen == ["ours"]
    hooks.remove()
    assert layer.__dict__["forward"] is foreign


def test_a_patch_on_top_of_ours_is_left_in_place_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    layer = nn.Linear(2, 2)
    seen: list[str] = []
    hook = add_hook(layer, Tag("ours", seen))
    inner = layer.forward

    def on_top(x: torch.Tensor) -> torch.Tensor:
        return inner(x) + 1

    layer.forward = on_top
    with caplog.at_level(logging.WARNING, logger="tl_plugin.prefix.hooks"):
        remove_hook(layer, hook)
    assert "replaced after tl_plugin's hooks were added" in caplog.text
    assert layer.__dict__["forward"] is on_top
    layer(torch.ones(1, 2))
    assert seen == []  # our dispatcher passes straight through now


def test_consumed_keywords_are_in_the_signature_and_never_reach_the_module() -> None:
    model = tiny_bert()
    hook = add_hook(model, Consume())
    assert "row_id" in inspect.signature(model.forward).parameters
    assert "input_ids" in inspect.signature(model.forward).parameters
    model(input_ids=torch.tensor([[2, 5, 3]]), row_id=7)
    assert hook.got == [7]
    remove_hook(model, hook)
    assert "row_id" not in inspect.signature(model.forward).parameters


def test_one_runner_per_model_and_tools_stack_on_one_dispatcher() -> None:
    model = tiny_bert()
    freeze_bottom_blocks(model, 1)
    last = model.bert.encoder.layer[-1]
    pruned = FirstTokenLastBlock(model)
    with FrozenPrefixNoGrad(model):
        assert [type(h).__name__ for h in hooks_of(last)] == ["_FirstTokenHook", "_UnitHook"]
        with pytest.raises(ValueError, match="already has a frozen-prefix runner"):
            FrozenPrefixNoGrad(model)
    assert [type(h).__name__ for h in hooks_of(last)] == ["_FirstTokenHook"]
    pruned.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_cache_derives_the_layout_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_bert()
    freeze_bottom_blocks(model, 1)
    calls: list[int] = []
    real = layout_module.discover_layer_groups

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layout_module, "discover_layer_groups", counting)
    for name in ("tl_plugin.prefix.last_block", "tl_plugin.prefix.cache"):
        if hasattr(importlib.import_module(name), "discover_layer_groups"):
            monkeypatch.setattr(f"{name}.discover_layer_groups", counting)
    cache = ActivationCache(model, storage="memory")
    assert isinstance(cache.last_block, FirstTokenLastBlock)
    assert len(calls) == 1
    cache.detach()


# ------------------------------------------------------------------------------------------------ the plan
#: Which modules of tl_plugin.prefix each module may import (besides torch, numpy, the standard library).
ALLOWED: dict[str, set[str]] = {
    "hooks": set(),
    "layout": {"tl_plugin.discovery"},
    "verify": {"layout"},
    "runner": {"hooks", "layout", "verify"},
    "no_grad": {"tl_plugin.discovery", "layout", "runner", "verify"},
    "last_block": {"tl_plugin.discovery", "hooks", "layout"},
    "rows": set(),
    "keys": {"layout"},
    "store": {"rows"},
    "memo": {"store"},
    "options": {"last_block", "store", "verify"},
    "cache": {
        "tl_plugin.callbacks.base",  # ActivationCacheCallback is a TLCallback (callbacks never import prefix)
        "tl_plugin.discovery",
        "keys",
        "last_block",
        "layout",
        "memo",
        "no_grad",
        "options",
        "rows",
        "runner",
        "store",
        "verify",
    },
    "trainer": {"cache"},
}


def _package_imports(path: Path) -> set[str]:
    """tl_plugin modules imported by `path` at run time (imports under ``if TYPE_CHECKING:`` excluded)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(node.module or "")
            elif node.level == 2:
                found.add(f"tl_plugin.{node.module}")
            elif node.module and node.module.startswith("tl_plugin"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tl_plugin"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_each_prefix_module_imports_only_modules_below_it(name: str) -> None:
    imported = _package_imports(PREFIX / f"{name}.py")
    assert imported <= ALLOWED[name], f"prefix/{name}.py imports {sorted(imported - ALLOWED[name])}"


def test_the_plan_covers_every_module_and_none_is_too_long() -> None:
    modules = {p.stem for p in PREFIX.glob("*.py")} - {"__init__"}
    assert modules == set(ALLOWED)
    for path in PREFIX.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 720, path.name  # "about 700 lines" (issue #15)
