"""The hooks that run, skip or replace the frozen prefix of one model during its forward.

`PrefixRunner` adds one `tl_plugin.prefix.hooks.ModuleHook` to every prefix unit module (the embeddings modules
and every block) and one to the model. During a forward of the model each unit hook either returns a stored
hidden state (the activation cache), runs its module under `torch.no_grad()` (and in eval mode, unless
``prefix_dropout="on"``) when it is part of the frozen prefix, or runs it as is. The boundary is re-read from
``requires_grad`` at every forward of the model. Before the first forward with gradients at a new boundary, the
prefix runs once with autograd on and its outputs are checked not to depend on a trainable parameter.

It is the engine below `tl_plugin.prefix.FrozenPrefixNoGrad` and `tl_plugin.prefix.ActivationCache`; one runner per
model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .hooks import HookSet, ModuleHook, hooks_of
from .layout import PrefixLayout, UnsupportedPrefixError
from .verify import check_prefix_dropout, eval_mode, flat_tensors, trainable_leaves

__all__ = ["Capture", "PrefixRunner", "SlotProvider"]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the frozen prefix has run."""


class SlotProvider(Protocol):
    """Gives the stored output of the prefix for a batch: ``(hidden state, units it covers)`` or `None`."""

    def __call__(
        self, ids: Any, bound: inspect.BoundArguments, frozen_units: int
    ) -> tuple[torch.Tensor, int] | None: ...


def _needs_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))


def _output_form(output: Any) -> Callable[[torch.Tensor], Any] | None:
    """How to rebuild a module's output from a replacement hidden state (None when it can't be)."""
    if isinstance(output, torch.Tensor):
        return _same
    if (
        type(output) is tuple
        and output
        and isinstance(output[0], torch.Tensor)
        and all(item is None for item in output[1:])
    ):
        return _TupleForm(len(output))
    return None


def _same(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@dataclass(frozen=True)
class _TupleForm:
    length: int

    def __call__(self, hidden: torch.Tensor) -> tuple[Any, ...]:
        return (hidden,) + (None,) * (self.length - 1)


@dataclass
class _ForwardState:
    frozen_units: int
    slot: torch.Tensor | None = None
    cached_units: int = 0
    probe: bool = False
    prefix_done: bool = False
    boundary: torch.Tensor | None = None
    probe_outputs: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Capture:
    """What one plain forward pass of the prefix showed (see `PrefixRunner.capture`)."""

    boundary: torch.Tensor
    outputs: Any
    calls: dict[str, int]
    forms: dict[str, Callable[[torch.Tensor], Any] | None]
    interstitial: list[tuple[int, str]]


class _UnitHook(ModuleHook):
    """Runs one prefix module: substituted, without autograd, or as is (see the module docstring)."""

    def __init__(self, runner: PrefixRunner, module: nn.Module, index: int, substitutable: bool) -> None:
        self.runner = runner
        self.index = index
        self.substitutable = substitutable
        self.ends_unit = substitutable and index > 0  # a block is a unit of one module: its end ends the unit
        self.subs = list(module.modules())

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        runner = self.runner
        state = runner._state
        if state is None or runner._passthrough or state.prefix_done:
            return call_next(*args, **kwargs)
        if self.index >= state.frozen_units:
            if self.substitutable:  # a trainable unit starts: the frozen prefix is over for this forward
                state.prefix_done = True
            return call_next(*args, **kwargs)
        last = self.ends_unit and self.index == state.frozen_units - 1
        if self.substitutable and state.slot is not None and self.index < state.cached_units:
            form = runner._forms.get(id(module))
            if form is not None:
                state.prefix_done = last
                return form(state.slot)
        # Without gradients, unless an input needs them (e.g. `inputs_embeds` that require grad).
        no_grad = not state.probe and not _needs_grad(args, kwargs)
        with runner._frozen(self.subs, no_grad):
            out = call_next(*args, **kwargs)
        if state.probe:
            state.probe_outputs.append((type(module).__name__, out))
        if last and runner.on_boundary is not None:
            state.boundary = out if isinstance(out, torch.Tensor) else (flat_tensors(out) or [None])[0]
        state.prefix_done = last
        return out


class _ModelHook(ModuleHook):
    """Starts the per-forward state of the runner; takes the cache ids out of the model's keywords."""

    def __init__(self, runner: PrefixRunner, extra_kwarg: str | None) -> None:
        self.runner = runner
        self.extra_kwarg = extra_kwarg
        self.consumes = (extra_kwarg,) if extra_kwarg is not None else ()

    def forward(
        self, module: nn.Module, call_next: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ids = kwargs.pop(self.extra_kwarg, None) if self.extra_kwarg is not None else None
        return self.runner._call(call_next, ids, args, kwargs)


class PrefixRunner:
    """Hooks that run, skip or replace the frozen prefix of `model` (see the module docstring).

    Args:
        model (`torch.nn.Module`): the model.
        layout (`PrefixLayout`): its prefix layout (derived once by the caller).
        prefix_dropout (`str`, *optional*, defaults to ``"off"``): ``"on"`` lets the prefix follow the model's
            train/eval mode; otherwise the frozen prefix runs in eval mode.
        extra_kwarg (`str`, *optional*): a keyword the model's forward accepts on top of its own (the cache ids).

    Raises:
        `ValueError`: when the model already has a runner (a `FrozenPrefixNoGrad` or an `ActivationCache`).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: PrefixLayout,
        prefix_dropout: str = "off",
        extra_kwarg: str | None = None,
    ) -> None:
        check_prefix_dropout(prefix_dropout)
        if any(isinstance(hook, _ModelHook) for hook in hooks_of(model)):
            raise ValueError(
                f"{type(model).__name__} already has a frozen-prefix runner (a FrozenPrefixNoGrad or an "
                "ActivationCache); remove or detach it first."
            )
        self.model = model
        self.layout = layout
        self.prefix_dropout = prefix_dropout
        self.provider: SlotProvider | None = None
        #: Called after a forward that computed the frozen prefix, with the output of its last unit.
        self.on_boundary: Callable[[torch.Tensor], None] | None = None
        self._state: _ForwardState | None = None
        self._passthrough = False
        self._forms: dict[int, Callable[[torch.Tensor], Any] | None] = {}
        self._verified: set[int] = set()
        self._interstitial: dict[int, nn.Module] = {}
        self._hooks = HookSet()
        self._original_forward: Callable[..., Any] = model.forward
        self._signature = inspect.signature(self._original_forward)
        for index, modules in enumerate(layout.unit_modules):
            for module in modules:
                self._hooks.add(module, _UnitHook(self, module, index, substitutable=True))
        self._hooks.add(model, _ModelHook(self, extra_kwarg))

    @property
    def unit_names(self) -> list[list[str]]:
        return self.layout.unit_names

    @property
    def unit_modules(self) -> list[list[nn.Module]]:
        return self.layout.unit_modules

    def frozen_units(self) -> int:
        """How many prefix units (embeddings, then blocks) are frozen from the bottom right now."""
        return self.layout.frozen_units()

    def set_interstitial(self, modules: list[tuple[int, str]]) -> None:
        """Also run these modules (found between prefix modules) in eval mode and without gradients."""
        by_name = dict(self.model.named_modules())
        for index, name in modules:
            module = by_name[name]
            if id(module) not in self._interstitial:
                self._interstitial[id(module)] = module
                self._hooks.add(module, _UnitHook(self, module, index, substitutable=False))

    def set_forms(self, forms: Mapping[str, Callable[[torch.Tensor], Any] | None]) -> None:
        modules = dict(self.model.named_modules())
        for name, form in forms.items():
            self._forms[id(modules[name])] = form

    def remove(self) -> None:
        """Remove every hook of this runner."""
        self._hooks.remove()

    # ------------------------------------------------------------------ per-forward logic
    @contextlib.contextmanager
    def _frozen(self, subs: list[nn.Module], no_grad: bool) -> Iterator[None]:
        grad = torch.no_grad() if no_grad else contextlib.nullcontext()
        if self.prefix_dropout == "on":
            with grad:
                yield
            return
        flags = [s.training for s in subs]
        for s in subs:
            s.training = False
        try:
            with grad:
                yield
        finally:
            for s, flag in zip(subs, flags, strict=True):
                s.training = flag

    def _call(
        self, call_next: Callable[..., Any], ids: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._state is not None or self._passthrough:
            return call_next(*args, **kwargs)
        frozen = self.frozen_units()
        state = _ForwardState(frozen_units=frozen)
        if self.provider is not None and frozen > 1:
            found = self.provider(ids, self._signature.bind_partial(*args, **kwargs), frozen)
            if found is not None:
                state.slot, state.cached_units = found
        if frozen and state.slot is None and torch.is_grad_enabled() and frozen not in self._verified:
            state.probe = True
        self._state = state
        try:
            out = call_next(*args, **kwargs)
        finally:
            self._state = None
        if state.boundary is not None and self.on_boundary is not None:
            self.on_boundary(state.boundary)
        if state.probe:
            names = self.layout.param_names
            leaves = [n for _, o in state.probe_outputs for n in trainable_leaves(o, names)]
            if leaves:
                raise UnsupportedPrefixError(
                    f"The frozen prefix of {type(self.model).__name__} (embeddings + {frozen - 1} blocks) "
                    f"depends on trainable parameters outside it: {sorted(set(leaves))[:5]}. Running it "
                    "without gradients (or caching it) would silently stop training them; freeze them too, "
                    "or do not use FrozenPrefixNoGrad / the activation cache for this model."
                )
            self._verified.add(frozen)
        return out

    def run_with_slot(self, batch: Mapping[str, Any], slot: torch.Tensor, cached_units: int) -> Any:
        """Run the model's forward with the first `cached_units` units replaced by `slot`."""
        state = _ForwardState(frozen_units=self.frozen_units(), slot=slot, cached_units=cached_units)
        self._state = state
        try:
            return self._original_forward(**batch)
        finally:
            self._state = None

    # ------------------------------------------------------------------ capture
    def capture(self, batch: Mapping[str, Any], units: int, *, stop: bool, grad: bool) -> Capture:
        """Run the plain model (in eval mode) on `batch` and record the output of prefix unit ``units - 1``.

        Args:
            batch: model inputs.
            units: length of the prefix (1 = embeddings only, k+1 = embeddings and k blocks).
            stop: end the forward as soon as that unit has run (it must run once per forward).
            grad: keep autograd on (to check what the prefix depends on).
        """
        last = self.unit_modules[units - 1]
        prefix_ids = {id(m) for mods in self.unit_modules[:units] for m in mods}
        names = {id(m): n for n, m in self.model.named_modules()}
        calls: dict[str, int] = {}
        forms: dict[str, Callable[[torch.Tensor], Any] | None] = {}
        boundary: list[torch.Tensor] = []
        events: list[tuple[str, str]] = []
        handles = []

        def unit_hook(module: nn.Module, args: Any, output: Any) -> None:
            name = names[id(module)]
            calls[name] = calls.get(name, 0) + 1
            forms.setdefault(name, _output_form(output))
            if module in last:
                first = output if isinstance(output, torch.Tensor) else (flat_tensors(output) or [None])[0]
                if not isinstance(first, torch.Tensor):
                    raise UnsupportedPrefixError(
                        f"{name} returns {type(output).__name__}, not a tensor or a tuple starting with one: "
                        "its output cannot be cached."
                    )
                boundary[:] = [first]
                if stop and len(last) == 1:
                    raise _StopForward

        def pre_event(module: nn.Module, args: Any) -> None:
            events.append(("start", names[id(module)]))

        def post_event(module: nn.Module, args: Any, output: Any) -> None:
            events.append(("end", names[id(module)]))

        for mods in self.unit_modules[:units]:
            for module in mods:
                handles.append(module.register_forward_hook(unit_hook))
        if not stop:
            for module in self.model.modules():
                handles.append(module.register_forward_pre_hook(pre_event))
                handles.append(module.register_forward_hook(post_event))
        outputs = None
        self._passthrough = True
        try:
            with eval_mode(self.model), torch.set_grad_enabled(grad), contextlib.suppress(_StopForward):
                outputs = self._original_forward(**batch)
        finally:
            self._passthrough = False
            for handle in handles:
                handle.remove()
        if not boundary:
            raise UnsupportedPrefixError(
                f"Block {self.unit_names[units - 1]} of {type(self.model).__name__} did not run in a forward "
                "pass: the prefix cannot be split there."
            )
        prefix_names = {names[i] for i in prefix_ids}
        interstitial = _interstitial(events, prefix_names, self.unit_names[:units]) if not stop else []
        return Capture(boundary[0], outputs, calls, forms, interstitial)


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _interstitial(
    events: list[tuple[str, str]], prefix_names: set[str], unit_names: list[list[str]]
) -> list[tuple[int, str]]:
    """Modules that start between the first prefix module's start and the last one's end, outside all of them.

    Each comes with the index of the unit that starts after it: it belongs to the prefix when that unit does.
    """
    unit_of = {name: i for i, names in enumerate(unit_names) for name in names}
    starts = [i for i, (kind, name) in enumerate(events) if kind == "start" and name in prefix_names]
    ends = [i for i, (kind, name) in enumerate(events) if kind == "end" and name in prefix_names]
    if not starts or not ends:
        return []
    first, last = starts[0], ends[-1]
    started_units: set[int] = set()
    found: list[tuple[int, str]] = []
    for i in range(first, last + 1):
        kind, name = events[i]
        if kind != "start":
            continue
        if name in unit_of:
            started_units.add(unit_of[name])
            continue
        if any(_inside(name, p) or _inside(p, name) for p in prefix_names):
            continue  # inside a prefix module, or one of their ancestors
        index = max(started_units) + 1 if started_units else 0
        if (index, name) not in found:
            found.append((index, name))
    return found
