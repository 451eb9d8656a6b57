"""k2mcore's one-line errors, in one place, under one base.

Every error that reports bad input or a broken environment to a user derives from `K2Error`, so a
command-line entry point catches that one type and prints the message as one line (exit status 2)
with no traceback. `K2Error` is a mixin: each class keeps the built-in base that callers and
`pytest.raises` already catch (`ValueError` for bad input, `RuntimeError` for a broken run).
Messages are folded to one line where they are raised, so whatever prints them prints one line.

No imports: the torch-free parts (config, layout, planner, checkpoint format) raise these.
"""
from __future__ import annotations


class K2Error(Exception):
    """Base of k2mcore's one-line errors; the message names the field, file or tensor at fault."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(K2Error, ValueError):
    """A configuration problem, naming the dotted key and its value."""


class DataError(K2Error, ValueError):
    """A data problem, naming the file or the config field (`data.blend`, ...). Raised before
    training starts (config checks, `check_data`, preprocessing), so a bad corpus costs seconds,
    not a failed job after start-up."""


class CheckpointError(K2Error, ValueError):
    """A checkpoint that cannot be used, naming the directory or file."""


class ConvertError(K2Error, ValueError):
    """Bad converter input or output path, naming the file or tensor."""


class DCPFormatError(K2Error, ValueError):
    """A torch_dist directory that cannot be read, naming the file or tensor."""


class HFFormatError(K2Error, ValueError):
    """A Hugging Face directory k2mcore cannot read, naming the file or tensor."""


class SafetensorsError(K2Error, ValueError):
    """A safetensors file that cannot be read, naming the file."""


class FP8FormatError(K2Error, ValueError):
    """A quantized weight and its scale that do not fit together, naming the tensor."""


class CompatError(K2Error, RuntimeError):
    """A megatron-core or torch patch target that is missing or changed, naming the patch."""


class TooManySkippedSteps(K2Error, RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient norm."""


class RLError(K2Error, RuntimeError):
    """The RL loop cannot go on: a reward function raised (naming the prompt), an engine's weight
    version does not match the policy's, a sync that does not fit the engine."""
