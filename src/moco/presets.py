"""The configs that ship with the package, found by name.

A preset is a YAML file in ``moco/configs/``. Its first line is a comment that describes it in one
line (``moco configs`` prints it); the comment lines after it say why its values are what they
are. Keeping the description in a comment, rather than a key, leaves the file a plain config:
every key in it is an option that :func:`moco.config.load_config` validates.
"""

from __future__ import annotations

from pathlib import Path

from moco.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (the ablation presets live apart, in ``configs/ablate``)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def describe_preset(path: Path) -> str:
    """The one-line description a preset file opens with (its first line, a ``#`` comment)."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def shipped_configs() -> dict[str, str]:
    """Every shipped preset's name and one-line description, sorted by name."""
    return {name: describe_preset(CONFIG_DIR / f"{name}.yaml") for name in preset_names()}


def resolve_config_path(name: str) -> Path:
    """A config path, or the name of a shipped config (``fmnist_v2`` -> ``configs/fmnist_v2.yaml``).

    A file of that name wins over a preset, so a local ``fmnist_v3.yaml`` is never shadowed."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config ({', '.join(preset_names())})")
