"""MkDocs hooks: the reference pages generated from the code, and a check that what the API
reference shows is documented.

- ``reference/cli.md`` from the argparse parsers of ``moco.cli.build_parser``: every command's
  usage, description and arguments with their help and defaults.
- ``reference/config.md`` from the typed config (``moco.options.describe_options``): every
  option's name, type, default, choices and the comment beside it in the source.
- Every object named on ``reference/api.md`` (``::: identifier``), and every public member it shows,
  must have a docstring; a missing one is a warning, so ``mkdocs build --strict`` fails on it.

Everything is generated from the installed package at build time, offline.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.plugins.moco_reference")
API_PAGE = "reference/api.md"


# --- the CLI -----------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Markdown-table-safe text."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _default(action: argparse.Action) -> str:
    """An argument's default as the reference shows it ("" when there is none to show)."""
    if action.default in (None, argparse.SUPPRESS, False) or action.required:
        return ""
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default))
    return str(action.default)


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    """One row per argument: its spellings, its help, its default."""
    rows = ["| argument | what | default |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):  # a command's own sub-commands (moco transfer TASK)
            rows.append(f"| `{action.dest}` | {_cell(action.help or '')} (one of: {', '.join(action.choices)}) |  |")
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
        if action.metavar and action.option_strings:
            names += f" `{action.metavar}`"
        help_text = (action.help or "") % {"default": action.default, "prog": parser.prog} if action.help else ""
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| {names} | {_cell(help_text)} | {_cell(_default(action))} |")
    return rows


def cli_reference() -> str:
    """The CLI reference page, one section per ``moco`` command."""
    from moco.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = ["# Command line", "", "Generated from the `moco` command's own parsers: what `moco COMMAND --help` "
             "prints, as tables. Options of the form `section.key=value` are config overrides "
             "([config options](config.md)).", "", "```", parser.format_usage().strip(), "```", "",
             *_arguments_table(parser), ""]
    for name, command in sub.choices.items():
        lines += _command_section(f"moco {name}", helps.get(name) or "", command)
    return "\n".join(lines)


def _command_section(name: str, help_text: str, command: argparse.ArgumentParser) -> list[str]:
    """A command's section; a command with sub-commands (``moco transfer``) gets one for each."""
    lines = [f"## {name}", "", _cell(help_text), ""]
    if command.description:
        lines += [command.description, ""]
    lines += ["```", command.format_usage().strip(), "```", "", *_arguments_table(command), ""]
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for sub_name, sub_command in action.choices.items():
                lines += _command_section(f"{name} {sub_name}", helps.get(sub_name) or "", sub_command)
    return lines


# --- the config ----------------------------------------------------------------------------------------
def _value(value: Any) -> str:
    """A default as YAML would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_reference() -> str:
    """The config reference page: every section's options in source order."""
    from moco.options import describe_options

    lines = ["# Config options", "",
             "Generated from the typed config (`moco.config` and each method's `Options`). Set any option in a "
             "YAML config, as `section.key=value` on the command line (the value is read as YAML: "
             "`\"model.widths=[64,128,256,512]\"`), or as `section__key=value` in `moco.pretrain`. Options "
             "marked *auto* may be `auto`: derived from the data when the run starts, and printed with the reason "
             "(`moco pretrain CONFIG --print-config`). Unknown keys, wrong types and impossible values are "
             "refused before any work starts.", ""]
    for section, options in describe_options().items():
        lines += [f"## {section}", "", "| option | type | default | what |", "|---|---|---|---|"]
        for o in options:
            what = o.comment or ""
            if o.choices:
                what += ("; " if what else "") + "one of " + ", ".join(f"`{c}`" for c in o.choices)
            if o.auto:
                what += ("; " if what else "") + "*auto* allowed"
            lines.append(f"| `{o.name}` | `{o.type}` | `{_value(o.default)}` | {_cell(what)} |")
        lines.append("")
    return "\n".join(lines)


# --- docstrings of what the API reference shows --------------------------------------------------------
def _resolve(identifier: str) -> Any:
    """The object an mkdocstrings identifier names (``package.module.Name.attr``)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(identifier)


def _public_members(obj: Any, listed: list[str] | None) -> dict[str, Any]:
    """What the page shows of a module or class: the ``members`` listed, else its public names
    (a module's ``__all__``, or the functions and classes it defines)."""
    if listed is not None:
        return {name: getattr(obj, name) for name in listed}
    if inspect.ismodule(obj):
        names = getattr(obj, "__all__", None) or [n for n, v in vars(obj).items() if not n.startswith("_")
                                                   and getattr(v, "__module__", None) == obj.__name__
                                                   and (inspect.isclass(v) or inspect.isfunction(v))]
        return {name: getattr(obj, name) for name in names}
    members = {}
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if inspect.isfunction(value) or isinstance(value, property):
            members[name] = getattr(obj, name) if not isinstance(value, property) else value
    return members


def _documented(obj: Any, owner: Any = None, name: str = "") -> bool:
    """A docstring of its own, or one inherited from the base class it overrides."""
    if inspect.getdoc(obj):
        return bool(inspect.getdoc(obj).strip()) if not inspect.isclass(obj) else bool((obj.__doc__ or "").strip())
    if owner is not None and inspect.isclass(owner):
        return any(inspect.getdoc(getattr(base, name, None)) for base in owner.__mro__[1:] if name in vars(base))
    return False


def undocumented(identifier: str, listed: list[str] | None = None) -> list[str]:
    """The names shown for ``identifier`` on the API page that have no docstring."""
    obj = _resolve(identifier)
    missing = [] if (inspect.getdoc(obj) or "").strip() else [identifier]
    if inspect.ismodule(obj) or inspect.isclass(obj):
        for name, member in _public_members(obj, listed).items():
            if not (inspect.isclass(member) or inspect.isfunction(member) or inspect.ismethod(member)
                    or isinstance(member, property)):
                continue  # constants and registries are described by their module's docstring
            if not _documented(member, obj, name):
                missing.append(f"{identifier}.{name}")
            elif inspect.isclass(member) and not inspect.isclass(obj):
                missing += undocumented(f"{identifier}.{name}")
    return missing


def api_identifiers(markdown: str) -> list[tuple[str, list[str] | None]]:
    """``(identifier, members)`` for every ``::: identifier`` on a page (members: the listed ones, if any)."""
    found = []
    blocks = re.split(r"^::: ", markdown, flags=re.M)[1:]
    for block in blocks:
        identifier = block.split("\n", 1)[0].strip()
        listed = re.search(r"members:\s*\[([^\]]*)\]", block.split("\n\n", 1)[0])
        members = [m.strip() for m in listed.group(1).split(",") if m.strip()] if listed else None
        found.append((identifier, members))
    return found


# --- the hooks -----------------------------------------------------------------------------------------
def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages, and check the API page's docstrings."""
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    api = Path(config["docs_dir"]) / API_PAGE
    for identifier, members in api_identifiers(api.read_text()):
        for name in undocumented(identifier, members):
            log.warning(f"{API_PAGE}: {name} is public and has no docstring")
    return files
