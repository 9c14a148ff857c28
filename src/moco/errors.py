"""Errors every layer may raise, in a module that imports nothing of ours (so any module can use them)."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""
