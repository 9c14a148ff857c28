"""One help convention for every ``moco`` command: each argument's help ends with its default.

The parsers are defined where their commands live (``moco.cli``, ``moco.cli_eval``); this module
only formats them, so a new argument gets its default shown without repeating it by hand.
"""

from __future__ import annotations

import argparse

# Where every command writes, and the spellings older scripts use (kept as aliases).
OUTPUT_ALIASES = ("--out", "--output-dir")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus ``(default: X)`` after any help that does not already name its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        """The help text with the default appended where it means something and is not said already."""
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS, [], "") and not action.required
        if shown and "default" not in text and action.option_strings and action.nargs != 0:
            default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
                else str(action.default)
            text = f"{text} (default: {default.replace('%', '%%')})".strip()
        return text


def use_defaults_help(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-command's parser the :class:`DefaultsHelpFormatter`."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                use_defaults_help(command)


def print_configs(configs: dict[str, str]) -> None:
    """``moco configs``: one line per preset, its name and its description."""
    width = max(map(len, configs), default=0)
    for name, description in configs.items():
        print(f"{name:<{width}}  {description}")
