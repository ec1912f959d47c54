"""A Griffe extension that lets mkdocstrings render tl_plugin's Hugging Face-style docstrings.

The docstrings follow the transformers convention inside Google-style sections::

    Args:
        every_n_steps (`int`, *optional*, defaults to 1): recording interval in optimizer steps.
    Returns:
        `Path`: the written file.

and use Sphinx roles (``:meth:`freeze```) for cross-references. Griffe's Google parser reads the parenthesised
part as a Python type expression, so the page showed the backticks and asterisks literally. Before parsing, this
extension rewrites each docstring:

- a parameter's ``(`A` or `B`, *optional*, defaults to X)`` becomes the type ``A | B`` (the default is shown in the
  table's Default column, from the signature);
- the leading `` `Type`: `` of a Returns / Yields / Raises item loses its backticks, so it becomes the item's type;
- ``:meth:`name``` (and ``:func:``, ``:class:``, ``:attr:``, ``:data:``, ``:mod:``, ``:obj:``) becomes a link to the
  documented object when the name is a member of the object, its parent or its module, or a ``tl_plugin.`` path,
  and code otherwise (an optional cross-reference: a name not on the API page stays plain code, never a warning).

Loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Attributes|Returns|Yields|Raises):\s*$")
PARAM = re.compile(r"^(\s+)(\*{0,2}[\w.]+) \((.+?)\):(\s|$)")
TYPED_ITEM = re.compile(r"^(\s+)(`[^`]+`(?:,? (?:or|and) `[^`]+`)*)(\s*):(\s|$)")
ROLE = re.compile(r":(?:meth|func|class|attr|data|mod|obj|exc):`~?([\w.]+)(?:\(\))?`")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(" and 1 or 0
        depth -= char in "])" and 1 or 0
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def _plain_type(text: str) -> str:
    return re.sub(r"\s+or\s+", " | ", text.replace("`", "")).strip()


def param_type(inside: str) -> str:
    """``(`A` or `B`, *optional*, defaults to X)``'s inside -> ``A | B`` (empty when only flags remain)."""
    kept = [
        p
        for p in _split_top_level(inside)
        if p and p.strip("*") != "optional" and not p.startswith("defaults to")
    ]
    return ", ".join(_plain_type(p) for p in kept)


def rewrite(text: str, resolve: Any = None) -> str:
    """Rewrite one docstring's text as described in the module docstring."""
    lines, out, section, section_indent = text.splitlines(), [], None, 0
    for line in lines:
        head = SECTION.match(line)
        if head:
            section, section_indent = head.group(2), len(head.group(1))
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if section and line.strip() and indent <= section_indent:
            section = None
        if section in ("Returns", "Yields", "Raises") and (m := TYPED_ITEM.match(line)):
            line = f"{m.group(1)}{_plain_type(m.group(2))}:{line[m.end() - len(m.group(4)) :]}"
        elif section and (m := PARAM.match(line)):
            kind = param_type(m.group(3))
            typed = f" ({kind})" if kind else ""
            line = f"{m.group(1)}{m.group(2)}{typed}:{line[m.end() - len(m.group(4)) :]}"
        out.append(line)
    joined = "\n".join(out) + ("\n" if text.endswith("\n") else "")

    def role(match: re.Match[str]) -> str:
        name = match.group(1)
        target = resolve(name) if resolve else None
        shown = name.rsplit(".", 1)[-1] if "`~" in match.group(0) else name
        code = f"<code>{shown}</code>"
        return f'<autoref identifier="{target}" optional>{code}</autoref>' if target else f"`{name}`"

    return ROLE.sub(role, joined)


def _resolver(obj: griffe.Object) -> Any:
    def resolve(name: str) -> str | None:
        if name.startswith("tl_plugin."):
            return name
        first = name.split(".", 1)[0]
        scope: Any = obj
        while scope is not None:
            if first in getattr(scope, "members", {}):
                return f"{scope.path}.{name}"
            scope = scope.parent
        return None

    return resolve


class HFDocstrings(griffe.Extension):
    """Rewrite every docstring of the loaded objects before mkdocstrings parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, _resolver(obj))
