"""The config error every room raises and catches as core.config.ConfigError. Its own module so that
the modules the config validator calls (core.stage) can raise it without importing core.config."""


class ConfigError(ValueError):
    """A config problem; the message names the field path(s)."""
