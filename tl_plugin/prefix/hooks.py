"""One way to wrap a module's ``forward``: hooks chained on one instance-level dispatcher.

Everything in `tl_plugin.prefix` that changes how a module runs (the frozen prefix without autograd, the cache
substituting stored hidden states, the last block at the first position only) is a `ModuleHook`. `add_hook`
gives a module one instance-level ``forward`` (a *dispatcher*) the first time a hook is added to it; the hooks
then run outermost-last-added, each deciding whether and how to call the next one, down to the module's own
``forward``. `remove_hook` takes one hook out, in any order; the dispatcher goes away with the last hook, and the
module's ``forward`` is what it was before the first hook (its class's, or an instance-level one set by someone
else). `HookSet` groups the hooks of one tool so that they are installed and removed together.

A hook can consume keyword arguments the module does not take (``consumes``): the dispatcher's signature lists
them, so that `transformers.Trainer` keeps the matching dataset columns, and the hook must pop them before calling
the next one.

Example:

```python
>>> import torch
>>> from tl_plugin.prefix.hooks import ModuleHook, add_hook, remove_hook
>>> class Double(ModuleHook):
...     def forward(self, module, call_next, args, kwargs):
...         return 2 * call_next(*args, **kwargs)
>>> layer = torch.nn.Identity()
>>> hook = add_hook(layer, Double())
>>> layer(torch.tensor(3.0)), "forward" in layer.__dict__
(tensor(6.), True)
>>> remove_hook(layer, hook)
True
>>> layer(torch.tensor(3.0)), "forward" in layer.__dict__
(tensor(3.), False)

```
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["HookSet", "ModuleHook", "add_hook", "hooks_of", "remove_hook"]

_CHAIN_ATTR = "_tl_prefix_hooks"


class ModuleHook:
    """Something that runs around a module's ``forward``; override :meth:`forward`.

    Attributes:
        consumes (`tuple[str, ...]`): keyword arguments this hook takes out of the call (the module's own
            ``forward`` never sees them); they are added to the dispatcher's signature.
    """

    consumes: tuple[str, ...] = ()

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run the module: call ``call_next(*args, **kwargs)`` (the next hook, or the module's own forward)."""
        return call_next(*args, **kwargs)


class _Next:
    """Calls hook ``index`` of a chain (or the module's own forward below index 0)."""

    __slots__ = ("chain", "index")

    def __init__(self, chain: _HookChain, index: int) -> None:
        self.chain, self.index = chain, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.chain.run(self.index, args, kwargs)


class _HookChain:
    """The hooks of one module and the forward they wrap."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward")  # an instance-level forward set by someone else
        self.inner: Callable[..., Any] = module.forward
        self.hooks: list[ModuleHook] = []
        chain = self

        def forward(module_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return chain.run(len(chain.hooks) - 1, args, kwargs)

        self.function = forward
        self.dispatcher = types.MethodType(forward, module)
        self.update_signature()

    def run(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if index < 0:
            return self.inner(*args, **kwargs)
        return self.hooks[index].forward(self.module, _Next(self, index - 1), args, kwargs)

    def update_signature(self) -> None:
        try:
            signature = inspect.signature(self.inner)
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            return
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += list(signature.parameters.values())
        for hook in self.hooks:
            for name in hook.consumes:
                if any(p.name == name for p in params):
                    continue
                extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
                params.insert(at, extra)
        self.function.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]


def _chain(module: nn.Module) -> _HookChain | None:
    chain = module.__dict__.get(_CHAIN_ATTR)
    return chain if isinstance(chain, _HookChain) else None


def hooks_of(module: nn.Module) -> list[ModuleHook]:
    """The hooks on `module`, innermost first."""
    chain = _chain(module)
    return list(chain.hooks) if chain is not None else []


def dispatcher_of(module: nn.Module) -> Callable[..., Any] | None:
    """The instance-level forward that runs `module`'s hooks, or `None` when it has none."""
    chain = _chain(module)
    return chain.dispatcher if chain is not None and chain.hooks else None


def add_hook(module: nn.Module, hook: ModuleHook) -> ModuleHook:
    """Run `hook` around `module`'s forward (outside the hooks already there) and return it."""
    chain = _chain(module)
    if chain is None or module.__dict__.get("forward") is not chain.dispatcher:
        chain = _HookChain(module)  # first hook, or someone replaced our dispatcher: wrap what is there now
        object.__setattr__(module, _CHAIN_ATTR, chain)  # not a submodule/parameter: bypass nn.Module
        module.forward = chain.dispatcher
    chain.hooks.append(hook)
    chain.update_signature()
    return hook


def remove_hook(module: nn.Module, hook: ModuleHook) -> bool:
    """Take `hook` off `module` (`False` when it was not there); the last one restores the module's forward."""
    chain = _chain(module)
    if chain is None or not any(h is hook for h in chain.hooks):
        return False
    chain.hooks = [h for h in chain.hooks if h is not hook]
    chain.update_signature()
    if chain.hooks:
        return True
    if module.__dict__.get("forward") is chain.dispatcher:
        if chain.previous is None:
            del module.forward
        else:
            module.forward = chain.previous
        del module.__dict__[_CHAIN_ATTR]
    else:  # someone wrapped our dispatcher after us: it now passes straight through, left in place
        logger.warning(
            "The forward of %s was replaced after tl_plugin's hooks were added; leaving it as is.",
            type(module).__name__,
        )
    return True


class HookSet:
    """The hooks one tool added: one install per module, one :meth:`remove` for all of them."""

    def __init__(self) -> None:
        self._added: list[tuple[nn.Module, ModuleHook]] = []

    def add(self, module: nn.Module, hook: ModuleHook) -> ModuleHook:
        self._added.append((module, add_hook(module, hook)))
        return hook

    def __len__(self) -> int:
        return len(self._added)

    def remove(self) -> None:
        """Remove every hook of this set, last added first."""
        for module, hook in reversed(self._added):
            remove_hook(module, hook)
        self._added.clear()
