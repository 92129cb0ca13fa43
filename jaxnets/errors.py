"""One error type per family of user-caused failure, so callers can catch them precisely.

The CLI turns any of these into one line on stderr (no traceback unless ``--debug``).
"""


class JaxnetsError(Exception):
    """Base class of every error jaxnets raises on purpose. ``exit_code`` is the CLI's."""

    exit_code = 1


class ConfigError(JaxnetsError):
    """A config file, a ``--set`` override or a command-line value is wrong (a usage error)."""

    exit_code = 2


class DataError(JaxnetsError):
    """A dataset is missing, corrupt or inconsistent."""


class ConversionError(JaxnetsError):
    """Weights do not match the model they are converted into."""


class CheckpointError(JaxnetsError):
    """A checkpoint cannot be written or read."""


class TrainingError(JaxnetsError):
    """Training cannot go on (a non-finite loss, with ``train.on_nonfinite = "stop"``)."""
