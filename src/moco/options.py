"""Every config option with its type, default, choices and the comment beside it in the source.

The typed dataclasses of :mod:`moco.config` (and each method's ``Options``) are the one place an
option is defined; its comment there is its documentation. This module reads both back, so the
config reference (``docs/reference/config.md``) cannot drift from
the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from moco.config import AUTO_OPTIONS, CHOICES, Config


@dataclass(frozen=True)
class OptionDoc:
    """One option as the reference lists it."""

    name: str              # section.key
    type: str              # the annotation, e.g. "int" or "Optional[list[float]]"
    default: Any
    choices: tuple[str, ...]
    comment: str           # the source comment on the field's line and the comment lines right below it
    auto: bool             # may be set to ``auto`` (derived from the data, moco.derive)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the ``#`` text on its line, plus comment-only lines that continue it
    (indented further than the field itself), joined with spaces. A comment line at the field's own
    indentation introduces the fields below it and belongs to none."""
    source = textwrap.dedent(inspect.getsource(cls))
    names = {f.name for f in dataclasses.fields(cls)}
    comment_at = {token.start[0]: (token.start[1], token.string.lstrip("#").strip())
                  for token in tokenize.generate_tokens(io.StringIO(source).readline)
                  if token.type == tokenize.COMMENT}
    comments: dict[str, list[str]] = {}
    current: str | None = None
    field_indent = 0
    for row, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        head = stripped.split(":", 1)[0].strip()
        if stripped and not stripped.startswith("#") and head in names:
            current, field_indent = head, len(line) - len(line.lstrip())
            comments[current] = [comment_at[row][1]] if row in comment_at else []
        elif stripped.startswith("#") and current is not None and comment_at[row][0] > field_indent:
            comments[current].append(comment_at[row][1])
        else:
            current = None
    return {name: " ".join(parts) for name, parts in comments.items() if parts}


def _type_name(annotation: Any) -> str:
    """A readable annotation: ``Optional[list[float]]`` rather than ``typing.Optional[...]``."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _section_docs(section: str, cls: type) -> list[OptionDoc]:
    """The options of one section (a dataclass), in source order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults = cls()
    docs = []
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name}"
        docs.append(OptionDoc(name, _type_name(hints[f.name]), getattr(defaults, f.name), CHOICES.get(name, ()),
                              comments.get(f.name, ""), name in AUTO_OPTIONS))
    return docs


def describe_options() -> dict[str, list[OptionDoc]]:
    """Every section's options: the fixed sections first, then each method's own section."""
    from moco.methods import METHODS

    sections: dict[str, list[OptionDoc]] = {}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name != "methods":
            sections[f.name] = _section_docs(f.name, hints[f.name])
    for name, method in METHODS.items():
        if dataclasses.fields(method.Options):
            sections[name] = _section_docs(name, method.Options)
    return sections
