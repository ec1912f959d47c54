"""Make frozen layers cost nothing: run the frozen bottom of a model without autograd; count what it costs.

The *frozen prefix* of a model is its ``embeddings`` group followed by the longest run of frozen blocks above
it (``blocks.0`` .. ``blocks.k-1``, see `tl_plugin.discover_layer_groups`). When every parameter of those
modules is frozen, nothing below block ``k`` needs a gradient, so:

- `FrozenPrefixNoGrad` runs the prefix modules under `torch.no_grad()`: autograd records nothing there and
  keeps no activation of theirs for the backward pass. With ``prefix_dropout="off"`` (the default) it also
  runs them in eval mode, so that dropout in frozen layers is off: the frozen prefix is then a fixed function
  of the input, the same one the activation cache (`tl_plugin.cache.ActivationCache`) stores;
- `optimizer_state_bytes` measures that an optimizer holds state for the trainable parameters only (the
  `transformers.Trainer` optimizer only receives parameters with ``requires_grad=True``);
- `EncoderFlops` counts the FLOPs of a BERT-style encoder, for the ideal speed-ups of freezing and caching.

The boundary is re-read at every forward: when a freeze schedule unfreezes block ``k-1``, that block runs with
gradients again at the next step. Before the first step with gradients at a new boundary, the prefix runs once
with autograd on and its outputs are checked not to depend on any trainable parameter (if they did, running it
under `torch.no_grad()` would silently drop gradients, so that raises an `UnsupportedPrefixError`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .discovery import LayerGroups, discover_layer_groups

logger = logging.getLogger(__name__)

PrefixDropout = Literal["off", "forbid", "on"]
#: The ways to handle dropout in the frozen prefix, see `FrozenPrefixNoGrad`.
PREFIX_DROPOUT_CHOICES: tuple[str, ...] = ("off", "forbid", "on")

__all__ = [
    "PREFIX_DROPOUT_CHOICES",
    "EncoderFlops",
    "FrozenPrefix",
    "FrozenPrefixNoGrad",
    "UnsupportedPrefixError",
    "find_frozen_prefix",
    "optimizer_state_bytes",
]


class UnsupportedPrefixError(ValueError):
    """Raised when the frozen prefix of a model cannot be run (or cached) apart from the rest of the model."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the frozen prefix has run."""


def check_prefix_dropout(value: Any, allowed: tuple[str, ...] = PREFIX_DROPOUT_CHOICES) -> None:
    """Raise a `ValueError` naming the choices when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(
            f"`prefix_dropout` must be one of {', '.join(repr(c) for c in allowed)}, got {value!r}."
        )


# ----------------------------------------------------------------------------------------------- the prefix
def _embedding_module_names(model: nn.Module, groups: LayerGroups) -> list[str]:
    """The outermost modules that hold only ``embeddings`` parameters, in registration order."""
    if "embeddings" not in groups.names:
        return []
    embedding = set(groups.get("embeddings").param_names)
    mixed: set[str] = set()  # module paths holding at least one parameter outside the embeddings group
    for name, _ in model.named_parameters():
        if name in embedding:
            continue
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            mixed.add(".".join(parts[:i]))
    chosen: list[str] = []
    for name in groups.get("embeddings").param_names:
        parts = name.split(".")[:-1]
        top = None
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            if path not in mixed:
                top = path
                break
        if top is not None and top not in chosen:
            chosen.append(top)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=lambda n: order.get(n, len(order)))


@dataclass(frozen=True)
class FrozenPrefix:
    """The frozen bottom of a model: the ``embeddings`` modules and the first `num_blocks` blocks, all frozen.

    Args:
        num_blocks (`int`): how many blocks (from the bottom) are frozen above the frozen embeddings.
        total_blocks (`int`): how many blocks the model has.
        module_names (`tuple[str, ...]`): the module paths of the prefix (embeddings modules, then blocks).
    """

    num_blocks: int
    total_blocks: int
    module_names: tuple[str, ...]


def find_frozen_prefix(model: nn.Module, groups: LayerGroups | None = None) -> FrozenPrefix | None:
    """The frozen prefix of `model`, or `None` when its embeddings are trainable (or it has no embeddings).

    Args:
        model (`torch.nn.Module`): the model.
        groups (`LayerGroups`, *optional*): its layer groups; discovered when not given.

    Returns:
        `FrozenPrefix` or `None`.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_bottom_blocks
    >>> from tl_plugin.perf import find_frozen_prefix
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> find_frozen_prefix(model) is None
    True
    >>> _ = freeze_bottom_blocks(model, 2)
    >>> find_frozen_prefix(model).module_names
    ('bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1')

    ```
    """
    groups = groups if groups is not None else discover_layer_groups(model)
    units = _unit_layout(model, groups)
    frozen = _count_frozen_units([params for _, _, params in units])
    if frozen == 0:
        return None
    names: list[str] = []
    for unit_names, _, _ in units[:frozen]:
        names.extend(unit_names)
    return FrozenPrefix(num_blocks=frozen - 1, total_blocks=groups.num_blocks, module_names=tuple(names))


def _unit_layout(
    model: nn.Module, groups: LayerGroups
) -> list[tuple[list[str], list[nn.Module], list[nn.Parameter]]]:
    """The prefix *units* of a model: unit 0 is the embeddings (one or more modules), unit j is block j-1.

    Each unit lists its module paths, its modules and every parameter it owns (the group's parameters and any
    parameter inside its modules, such as a PEFT adapter: a unit counts as frozen only when all of them are).
    """
    embedding_names = _embedding_module_names(model, groups)
    if not embedding_names:
        raise UnsupportedPrefixError(
            f"{type(model).__name__} has no `embeddings` layer group (groups: {groups.summary()}): the "
            "frozen prefix starts at the embeddings, so there is nothing to run apart."
        )
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layout = []
    unit_names = [embedding_names] + [[b.module_name or ""] for b in groups.blocks]
    group_params = [groups.get("embeddings").param_names] + [b.param_names for b in groups.blocks]
    for names, owned in zip(unit_names, group_params, strict=True):
        mods = [modules[n] for n in names]
        found: dict[int, nn.Parameter] = {}
        for module in mods:
            for p in module.parameters():
                found.setdefault(id(p), p)
        for n in owned:
            found.setdefault(id(params[n]), params[n])
        layout.append((names, mods, list(found.values())))
    return layout


def _count_frozen_units(unit_params: list[list[nn.Parameter]]) -> int:
    for index, params in enumerate(unit_params):
        for p in params:
            if p.requires_grad:
                return index
    return len(unit_params)


def _trainable_leaves(output: Any, names: Mapping[int, str]) -> list[str]:
    """Names of the trainable parameters whose gradient would flow through `output` (autograd graph walk)."""
    tensors = [output] if isinstance(output, torch.Tensor) else [t for t in _flat(output) if t is not None]
    found: list[str] = []
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in names and names[id(variable)] not in found:
            found.append(names[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def _flat(output: Any) -> list[Any]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flat(item)]
    if isinstance(output, Mapping):
        return [t for item in output.values() for t in _flat(item)]
    return []


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


def _active_randomness(module: nn.Module) -> list[str]:
    """Submodules of `module` that behave differently in train and eval mode (dropout p>0, batch norm)."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            found.append(f"{name or type(module).__name__} ({type(sub).__name__} p={sub.p})")
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or type(module).__name__} ({type(sub).__name__})")
        else:
            for attr, value in vars(sub).items():
                if (
                    "dropout" in attr
                    and isinstance(value, float)
                    and not isinstance(value, bool)
                    and value > 0
                ):
                    found.append(f"{name or type(module).__name__}.{attr}={value}")
    return found


# ----------------------------------------------------------------------------------------------- controller
@dataclass
class _ForwardState:
    frozen_units: int
    slot: torch.Tensor | None = None
    cached_units: int = 0
    probe: bool = False
    prefix_done: bool = False
    probe_outputs: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Capture:
    """What one plain forward pass of the prefix showed (see `PrefixController.capture`)."""

    boundary: torch.Tensor
    outputs: Any
    calls: dict[str, int]
    forms: dict[str, Callable[[torch.Tensor], Any] | None]
    interstitial: list[tuple[int, str]]


_CONTROLLERS: weakref.WeakKeyDictionary[nn.Module, PrefixController] = weakref.WeakKeyDictionary()


class PrefixController:
    """Installs the per-module forwards that run, skip or replace the frozen prefix of one model.

    Internal machinery shared by `FrozenPrefixNoGrad` and `tl_plugin.cache.ActivationCache`; one per model.
    Each prefix-candidate module (the embeddings modules and every block) gets an instance-level ``forward``
    that, during a forward of the model, either returns a cached hidden state (the cache), runs the module
    under `torch.no_grad()` (and eval mode) when it is part of the frozen prefix, or runs it as is.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: LayerGroups | None = None,
        prefix_dropout: str = "off",
        extra_kwarg: str | None = None,
    ) -> None:
        check_prefix_dropout(prefix_dropout)
        if model in _CONTROLLERS:
            raise ValueError(
                f"{type(model).__name__} already has a frozen-prefix controller (a FrozenPrefixNoGrad or an "
                "ActivationCache); remove or detach it first."
            )
        self.model = model
        self.groups = groups if groups is not None else discover_layer_groups(model)
        self.prefix_dropout = prefix_dropout
        self.extra_kwarg = extra_kwarg
        layout = _unit_layout(model, self.groups)
        self.unit_names = [names for names, _, _ in layout]
        self.unit_modules = [mods for _, mods, _ in layout]
        self.unit_params = [params for _, _, params in layout]
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.provider: (
            Callable[[Any, inspect.BoundArguments, int], tuple[torch.Tensor, int] | None] | None
        ) = None
        self._state: _ForwardState | None = None
        self._passthrough = False
        self._forms: dict[int, Callable[[torch.Tensor], Any] | None] = {}
        self._verified: set[int] = set()
        # (module, our forward, the instance-level forward it replaced: None for the class's own)
        self._patched: list[tuple[nn.Module, Callable[..., Any], Callable[..., Any] | None]] = []
        self._interstitial: dict[int, nn.Module] = {}
        self._original_forward: Callable[..., Any] = model.forward
        self._signature = inspect.signature(self._original_forward)
        for index, modules in enumerate(self.unit_modules):
            for module in modules:
                self._patch(module, index, substitutable=True)
        self._patch_model_forward()
        _CONTROLLERS[model] = self

    # ------------------------------------------------------------------ installation
    def _patch(self, module: nn.Module, index: int, substitutable: bool) -> None:
        original = module.forward
        previous = module.__dict__.get("forward")
        subs = list(module.modules())
        controller = self
        key = id(module)
        ends_unit = substitutable and index > 0  # a block is a unit of one module: its end ends the unit

        def forward(*args: Any, **kwargs: Any) -> Any:
            state = controller._state
            if state is None or controller._passthrough or state.prefix_done:
                return original(*args, **kwargs)
            if index >= state.frozen_units:
                if substitutable:  # a trainable unit starts: the frozen prefix is over for this forward
                    state.prefix_done = True
                return original(*args, **kwargs)
            last = ends_unit and index == state.frozen_units - 1
            if substitutable and state.slot is not None and index < state.cached_units:
                form = controller._forms.get(key)
                if form is not None:
                    state.prefix_done = last
                    return form(state.slot)
            # Without gradients, unless an input needs them (e.g. `inputs_embeds` that require grad).
            no_grad = not state.probe and not _needs_grad(args, kwargs)
            with controller._frozen(subs, no_grad):
                out = original(*args, **kwargs)
            if state.probe:
                state.probe_outputs.append((type(module).__name__, out))
            state.prefix_done = last
            return out

        module.forward = forward
        self._patched.append((module, forward, previous))

    def _patch_model_forward(self) -> None:
        original = self._original_forward
        signature = self._signature
        extra = self.extra_kwarg
        controller = self

        def forward(model_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            ids = kwargs.pop(extra, None) if extra is not None else None
            return controller._call(original, ids, args, kwargs)

        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += list(signature.parameters.values())
        if extra is not None and extra not in signature.parameters:
            extra_param = inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, default=None)
            position = next(
                (i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params)
            )
            params.insert(position, extra_param)
        forward.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        bound = types.MethodType(forward, self.model)
        previous = self.model.__dict__.get("forward")
        self.model.forward = bound
        self._patched.append((self.model, bound, previous))

    def set_interstitial(self, modules: list[tuple[int, str]]) -> None:
        """Also run these modules (found between prefix modules) in eval mode and without gradients."""
        by_name = dict(self.model.named_modules())
        for index, name in modules:
            module = by_name[name]
            if id(module) not in self._interstitial:
                self._interstitial[id(module)] = module
                self._patch(module, index, substitutable=False)

    def remove(self) -> None:
        """Restore every patched ``forward``."""
        for module, patched, previous in reversed(self._patched):
            if module.__dict__.get("forward") is patched:
                if previous is None:
                    del module.forward
                else:  # another tool's instance-level forward (e.g. FirstTokenLastBlock) comes back
                    module.forward = previous
            else:
                logger.warning(
                    "The forward of %s was replaced again after tl_plugin patched it; leaving it as is.",
                    type(module).__name__,
                )
        self._patched.clear()
        _CONTROLLERS.pop(self.model, None)

    # ------------------------------------------------------------------ per-forward logic
    def frozen_units(self) -> int:
        """How many prefix units (embeddings, then blocks) are frozen from the bottom right now."""
        return _count_frozen_units(self.unit_params)

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
        self, original: Callable[..., Any], ids: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._state is not None or self._passthrough:
            return original(*args, **kwargs)
        frozen = self.frozen_units()
        state = _ForwardState(frozen_units=frozen)
        if ids is not None and self.provider is not None and frozen > 1:
            found = self.provider(ids, self._signature.bind_partial(*args, **kwargs), frozen)
            if found is not None:
                state.slot, state.cached_units = found
        if frozen and state.slot is None and torch.is_grad_enabled() and frozen not in self._verified:
            state.probe = True
        self._state = state
        try:
            out = original(*args, **kwargs)
        finally:
            self._state = None
        if state.probe:
            leaves = [n for _, o in state.probe_outputs for n in _trainable_leaves(o, self.param_names)]
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
                first = output if isinstance(output, torch.Tensor) else (_flat(output) or [None])[0]
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
            with _eval_mode(self.model), torch.set_grad_enabled(grad), contextlib.suppress(_StopForward):
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

    def set_forms(self, forms: Mapping[str, Callable[[torch.Tensor], Any] | None]) -> None:
        modules = dict(self.model.named_modules())
        for name, form in forms.items():
            self._forms[id(modules[name])] = form


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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modules = list(model.modules())
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


# ----------------------------------------------------------------------------------------------- public API
class FrozenPrefixNoGrad:
    """Run the frozen prefix of a model (embeddings + frozen bottom blocks) under `torch.no_grad()`.

    At every forward the frozen prefix is re-read from ``requires_grad`` (so a freeze schedule can move it);
    its modules then run without autograd, and their outputs do not require gradients. Nothing changes for the
    modules above it. Use it as a context manager, or call :meth:`remove` when done.

    Args:
        model (`torch.nn.Module`): the model, frozen by `tl_plugin.freeze` or a transfer config.
        groups (`LayerGroups`, *optional*): its layer groups; discovered when not given.
        prefix_dropout (`str`, *optional*, defaults to ``"off"``): dropout in the frozen prefix:

            - ``"off"``: the prefix modules always run in eval mode (dropout off, batch norm on its running
              statistics): the frozen prefix is a fixed function of the input, as with the activation cache;
            - ``"forbid"``: the prefix must have no dropout with p>0 and no batch norm (else a `ValueError`),
              so train and eval mode compute the same thing;
            - ``"on"``: the prefix follows the model's train/eval mode (dropout stays on in training).

    Raises:
        `ValueError`: for an unknown `prefix_dropout`, or ``"forbid"`` with dropout in the current prefix.
        `UnsupportedPrefixError`: when the model has no embeddings group, or (at the first training forward at
            a boundary) its prefix turns out to depend on a trainable parameter.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tl_plugin import freeze_bottom_blocks
    >>> from tl_plugin.perf import FrozenPrefixNoGrad
    >>> model = BertForSequenceClassification(
    ...     BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37)
    ... )
    >>> _ = freeze_bottom_blocks(model, 2)
    >>> with FrozenPrefixNoGrad(model) as no_grad:
    ...     model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([1])).loss.backward()
    ...     no_grad.frozen_blocks
    2
    >>> model.bert.embeddings.word_embeddings.weight.grad is None, model.classifier.weight.grad is not None
    (True, True)

    ```
    """

    def __init__(
        self, model: nn.Module, *, groups: LayerGroups | None = None, prefix_dropout: PrefixDropout = "off"
    ) -> None:
        check_prefix_dropout(prefix_dropout)
        self.model = model
        self.prefix_dropout = prefix_dropout
        self._groups = groups
        self._controller: PrefixController | None = None
        self.install()

    def install(self) -> FrozenPrefixNoGrad:
        """Patch the model (done by the constructor; again after :meth:`remove`)."""
        if self._controller is None:
            controller = PrefixController(self.model, self._groups, self.prefix_dropout)
            if self.prefix_dropout == "forbid":
                frozen = controller.frozen_units()
                active = [
                    found
                    for modules in controller.unit_modules[:frozen]
                    for module in modules
                    for found in _active_randomness(module)
                ]
                if active:
                    controller.remove()
                    raise ValueError(
                        "prefix_dropout='forbid' but the frozen prefix has modules that act differently in "
                        f"training: {active[:5]}. Set their dropout to 0, or use prefix_dropout='off'."
                    )
            self._controller = controller
        return self

    def remove(self) -> None:
        """Restore the model's original forwards."""
        if self._controller is not None:
            self._controller.remove()
            self._controller = None

    @property
    def frozen_blocks(self) -> int | None:
        """How many blocks the frozen prefix holds right now (`None`: the embeddings are trainable)."""
        if self._controller is None:
            return None
        units = self._controller.frozen_units()
        return units - 1 if units else None

    def __enter__(self) -> FrozenPrefixNoGrad:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (e.g. AdamW's two moments per parameter).

    Example:

    ```python
    >>> import torch
    >>> from tl_plugin.perf import optimizer_state_bytes
    >>> weight = torch.nn.Parameter(torch.zeros(10))
    >>> optimizer = torch.optim.AdamW([weight])
    >>> weight.grad = torch.ones(10)
    >>> optimizer.step()
    >>> optimizer_state_bytes(optimizer)  # two float32 moments of 10 values, plus the step counter
    84

    ```
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@dataclass(frozen=True)
class EncoderFlops:
    """FLOP counts of a BERT-style encoder classifier, per example, for ideal speed-up ratios.

    Per token, one encoder layer costs ``8 H^2 + 4 H I + 4 S H`` multiply-add FLOPs in its forward pass (the
    Q, K, V and output projections, the two feed-forward matmuls, and the attention scores and weighted sum
    over ``S`` positions). A backward pass costs twice its forward (gradients for the inputs and for the
    weights); a frozen layer only runs forward, a cached one not at all. The pooler (``2 H^2``) and the
    classifier (``2 H C``) run once per example. Embedding look-ups, layer norms, softmax and the optimizer
    update are not counted. A last block computed at the first position only
    (`tl_plugin.last_block.FirstTokenLastBlock`) costs ``4 S H^2`` (keys and values of every position) plus
    ``4 H^2 + 4 H I + 4 S H`` (the rest, for one position) per example.

    Args:
        hidden_size (`int`): ``H``.
        intermediate_size (`int`): ``I``.
        num_layers (`int`): the number of encoder layers.
        seq_len (`float`): ``S``, the mean padded sequence length of the batches.
        num_labels (`int`, *optional*, defaults to 2): ``C``.

    Example:

    ```python
    >>> from tl_plugin.perf import EncoderFlops
    >>> flops = EncoderFlops(hidden_size=384, intermediate_size=1536, num_layers=6, seq_len=64)
    >>> round(flops.training_flops(3) / flops.training_flops(3, cached=True), 3)  # half frozen: cache's limit
    1.333
    >>> round(flops.training_flops(3) / flops.training_flops(3, cached=True, first_token_last_block=True), 2)
    1.84

    ```
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    seq_len: float
    num_labels: int = 2

    @classmethod
    def from_config(cls, config: Any, seq_len: float) -> EncoderFlops:
        """Read ``H``, ``I`` and the depth of a BERT-family config (BERT, RoBERTa, ELECTRA, DistilBERT)."""
        names = (
            ("hidden_size", "dim"),
            ("intermediate_size", "hidden_dim"),
            ("num_hidden_layers", "n_layers"),
        )
        values = []
        for options in names:
            value = next(
                (getattr(config, n) for n in options if isinstance(getattr(config, n, None), int)), None
            )
            if value is None:
                raise ValueError(
                    f"`config` ({type(config).__name__}) has none of {list(options)}: EncoderFlops reads "
                    "BERT-family encoder configs."
                )
            values.append(value)
        return cls(values[0], values[1], values[2], seq_len, int(getattr(config, "num_labels", 2) or 2))

    @property
    def layer_forward(self) -> float:
        """Forward FLOPs of one layer for one example (``S`` tokens)."""
        h, i, s = self.hidden_size, self.intermediate_size, self.seq_len
        return s * (8 * h * h + 4 * h * i + 4 * s * h)

    @property
    def first_token_layer_forward(self) -> float:
        """Forward FLOPs of a layer computed at the first position only, for one example."""
        h, i, s = self.hidden_size, self.intermediate_size, self.seq_len
        return s * 4 * h * h + (4 * h * h + 4 * h * i + 4 * s * h)

    @property
    def head_forward(self) -> float:
        """Forward FLOPs of the pooler and the classifier for one example."""
        return 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * self.num_labels

    def training_flops(
        self,
        frozen_blocks: int | None,
        cached: bool = False,
        train_pooler: bool = True,
        first_token_last_block: bool = False,
    ) -> float:
        """FLOPs of one training step on one example.

        Args:
            frozen_blocks (`int` or `None`): frozen bottom blocks (``num_layers`` for a linear probe;
                `None` or 0: everything trains).
            cached (`bool`): the frozen blocks' outputs come from the activation cache.
            train_pooler (`bool`): the pooler trains (`False` for a linear probe).
            first_token_last_block (`bool`): a trained last block runs at the first position only.
        """
        frozen = frozen_blocks or 0
        if not 0 <= frozen <= self.num_layers:
            raise ValueError(f"`frozen_blocks` must be in [0, {self.num_layers}], got {frozen_blocks!r}.")
        trained = [self.layer_forward] * (self.num_layers - frozen)
        if trained and first_token_last_block:
            trained[-1] = self.first_token_layer_forward
        layers = (0 if cached else frozen) * self.layer_forward + 3 * sum(trained)
        pooler = 2 * self.hidden_size * self.hidden_size * (3 if train_pooler else 1)
        classifier = 3 * 2 * self.hidden_size * self.num_labels
        return layers + pooler + classifier

    def ideal_speedup(
        self, frozen_blocks: int | None, cached: bool = False, first_token_last_block: bool = False
    ) -> float:
        """Full fine-tuning FLOPs / FLOPs of the given setup (a linear probe freezes the pooler too)."""
        probe = (frozen_blocks or 0) == self.num_layers
        return self.training_flops(0) / self.training_flops(
            frozen_blocks, cached, train_pooler=not probe, first_token_last_block=first_token_last_block
        )
