"""The one error type a user's configuration can cause."""


class ConfigError(ValueError):
    """A configuration value, file or argument is invalid; the message names it and its source."""
