"""User-facing errors: the CLI prints their one-line message and exits with code 2."""


class UserError(Exception):
    """A problem with the command line, the data or the files on disk that the user can fix."""


class ConfigError(UserError):
    """Invalid flags or flag combinations."""


class CheckpointError(UserError):
    """A checkpoint that is missing or belongs to another setting."""


class NaNLossError(UserError):
    """Training diverged; the last good checkpoint is kept."""
