"""The one error type of configuration: its own module, so that everything that checks a config
(the loader, validation, layout math, the converters) can raise it without importing the loader."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the dotted key and value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
