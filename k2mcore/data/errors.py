"""The data package's one error type."""
from __future__ import annotations


class DataError(ValueError):
    """A data problem in one line that names the file or the config field (`data.blend`, ...).

    Raised before training starts (config checks, `check_data`, preprocessing), so a bad corpus
    costs seconds, not a failed job after start-up.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
