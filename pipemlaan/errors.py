"""User-facing errors: each carries one line that says what is wrong and how to fix it.

`pipemlaan.train` turns any of these into that one line on stderr and a non-zero exit,
on every rank, before anything is written to the run directory.
"""


class PipemlaanError(Exception):
    """Base class: the message is shown to the user as is, so it must name the fix."""


class ConfigError(PipemlaanError):
    """An unknown key, a bad value, or an impossible combination of settings."""


class DataError(PipemlaanError):
    """A data folder or file that is missing or malformed."""


class PipelineError(PipemlaanError):
    """A distributed failure: a peer that died, timed out, or sent tensors of the wrong shape."""
